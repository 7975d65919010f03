"""launch/config_flags.py: config files, typed overrides, unknown keys, JSON round trip."""

import textwrap

from absl import flags
import ml_collections
import pytest

from launch import config_flags
from launch.config_flags import UnknownConfigKeyError, load_config

_CONFIG_FILE = textwrap.dedent("""
    import ml_collections

    def get_config(arg=None):
      config = ml_collections.ConfigDict()
      config.seed = 0
      config.model = ml_collections.ConfigDict()
      config.model.channels = 8 if arg == "small" else 32
      config.model.mults = (1, 2)
      config.model.use_attention = True
      config.model.dropout = 0.1
      config.train = ml_collections.ConfigDict()
      config.train.lr = 1e-3
      config.train.schedule = "cosine"
      config.train.optimizer = ml_collections.ConfigDict({"name": "adam", "b2": 0.99})
      config.train.eval_steps = [10, 20]
      config.data = None
      return config
""")

# Written by hand from the file above, in the config's own order.
_ALL_KEYS = ["seed", "model", "model.channels", "model.mults", "model.use_attention",
             "model.dropout", "train", "train.lr", "train.schedule", "train.optimizer",
             "train.optimizer.name", "train.optimizer.b2", "train.eval_steps", "data"]


@pytest.fixture
def config_path(tmp_path):
  path = tmp_path / "tiny_config.py"
  path.write_text(_CONFIG_FILE)
  return str(path)


def test_arg_and_typed_nested_overrides(config_path):
  config = load_config(f"{config_path}:small", [
      "model.channels=64", "model.mults=(1, 2, 4)", "train.lr=0.5", "model.use_attention=false",
      "train.optimizer.b2=0.9", "--config.train.schedule=linear"])
  assert config.model.channels == 64 and type(config.model.channels) is int
  assert config.model.mults == (1, 2, 4) and type(config.model.mults) is tuple
  assert config.train.lr == 0.5 and type(config.train.lr) is float
  assert config.model.use_attention is False
  assert config.train.optimizer.b2 == 0.9 and config.train.optimizer.name == "adam"
  assert config.train.schedule == "linear"
  # Untouched fields keep the file's values; the arg reached get_config.
  assert config.model.dropout == 0.1 and config.train.eval_steps == [10, 20]
  assert load_config(config_path, []).model.channels == 32
  assert load_config(f"{config_path}:small", []).model.channels == 8


def test_list_and_none_fields_can_be_overridden(config_path):
  config = load_config(config_path, ["train.eval_steps=[5]", "data=digits"])
  assert config.train.eval_steps == [5] and type(config.train.eval_steps) is list
  assert config.data == "digits"
  assert load_config(config_path, ["data={'levels': 17}"]).data.levels == 17
  with pytest.raises(flags.IllegalFlagValueError, match="expected a list"):
    load_config(config_path, ["train.eval_steps=5"])


def test_config_is_locked(config_path):
  config = load_config(config_path, [])
  with pytest.raises(AttributeError):
    config.model.chanels = 3  # a typo in code cannot add a field
  with pytest.raises(AttributeError):
    _ = config.modle
  with pytest.raises(TypeError):
    config.model.channels = "many"  # type-safe: an int field stays an int


def test_wrong_value_type_is_an_error(config_path):
  with pytest.raises(flags.IllegalFlagValueError, match="model.channels"):
    load_config(config_path, ["model.channels=lots"])


@pytest.mark.parametrize("typo, nearest", [("model.chanels", "model.channels"),
                                           ("train.optimiser.b2", "train.optimizer.b2"),
                                           ("lr", "train.lr")])
def test_unknown_key_lists_valid_keys_nearest_first(config_path, typo, nearest):
  with pytest.raises(UnknownConfigKeyError) as info:
    load_config(config_path, [f"{typo}=3"])
  message = str(info.value)
  assert f"--config.{typo}" in message.splitlines()[0]
  listed = [line.strip().removeprefix("--config.") for line in message.splitlines()
            if line.startswith("  --config.")]
  assert sorted(listed) == sorted(_ALL_KEYS)
  assert listed[0] == nearest


def test_command_line_flag_behaves_like_load_config(config_path):
  argv = ["train.py", f"--config={config_path}:small", "--config.model.channels=16",
          "--config.train.eval_steps=[1, 2, 3]"]
  flag_values = flags.FlagValues()
  holder = config_flags.define_config_flag("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  assert holder.value.model.channels == 16 and holder.value.train.eval_steps == [1, 2, 3]
  assert holder.value.is_locked

  argv = ["train.py", f"--config={config_path}", "--config.modle.channels=16"]
  flag_values = flags.FlagValues()
  config_flags.define_config_flag("config", flag_values=flag_values, sys_argv=argv)
  with pytest.raises(flags.Error, match="Valid keys"):  # absl.app prints flags.Error cleanly
    flag_values(argv)


def test_json_round_trip(config_path):
  config = load_config(f"{config_path}:small", ["model.mults=(2, 3)"])
  text = config_flags.config_to_json(config)
  back = config_flags.config_from_json(text)
  assert back == config  # ConfigDict equality: same fields, same lock state
  assert back.to_dict() == config.to_dict()
  assert type(back.model.mults) is tuple and back.model.mults == (2, 3)
  assert type(back.train.eval_steps) is list
  assert back.data is None and back.train.optimizer.name == "adam"
  assert isinstance(back.train.optimizer, ml_collections.ConfigDict) and back.is_locked

  nested = ml_collections.ConfigDict({"a": ((1, None), [2.5, "x"]), "b": {"c": []}})
  back = config_flags.config_from_json(config_flags.config_to_json(nested))
  assert back.a == ((1, None), [2.5, "x"]) and type(back.a[0]) is tuple
  assert type(back.a[1]) is list and back.b.c == []


def test_json_rejects_values_it_cannot_store():
  with pytest.raises(TypeError, match="model.act"):
    config_flags.config_to_json(ml_collections.ConfigDict({"model": {"act": print}}))


def test_fill_missing_adds_only_absent_keys_recursively():
  saved = ml_collections.ConfigDict({"a": 1, "m": {"x": 5}})
  defaults = ml_collections.ConfigDict({"a": 2, "b": 3, "m": {"x": 0, "y": 7}, "n": {"z": 1}})
  added = config_flags.fill_missing(saved, defaults)
  assert sorted(added) == ["b", "m.y", "n"]
  assert saved.a == 1 and saved.b == 3 and saved.m.x == 5 and saved.m.y == 7 and saved.n.z == 1
