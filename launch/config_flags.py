"""Experiment configs: `--config path.py:arg` plus `--config.key=value` overrides.

A config file defines `get_config(arg=None)` returning an `ml_collections.ConfigDict`.
Entry points define the flag with `define_config_flag()` (absl + ml_collections'
`DEFINE_config_file`); tests and `launch.evaluate` use the plain-Python twin
`load_config(path_with_arg, overrides)`, which goes through the very same flag parser, so
an override means the same thing in both places:

    python -m launch.train --config configs/vdm/digits.py:small \
        --config.model.channels=64 --config.train.num_steps=1000

    config = load_config("configs/vdm/digits.py:small", ["model.channels=64"])

Values are parsed with the type of the field they override: an int field takes "64", a
tuple field "(1, 2, 4)", a list field "[1, 2]". A field whose default is None takes any
Python literal, or else the text as a string; to keep such a field typed, declare it with
`ml_collections.config_dict.placeholder(int)`.

An override naming a key that the config does not have is an error listing the valid keys,
nearest first (ml_collections alone only suggests a single close match, or nothing).
Returned configs are locked, so that a typo in code (`config.modle`) raises as well.

A config path that does not exist is a flags error naming the file and the nearest
config files, at parse time (ml_collections alone defers it to the first attribute access,
inside a long traceback).

`config_to_json` / `config_from_json` round-trip a config through JSON exactly (tuples are
tagged, since JSON only has lists); the trainer stores this JSON beside each checkpoint.

The entry points share two helpers for bad input: `run_main` runs an absl main and prints
an `InputError` (or another error the entry point names) as one message, exit status 1,
without a traceback; `fresh_output` picks where outputs go without overwriting earlier ones.
"""

import ast
import difflib
import json
import os
import sys
from typing import Any, Callable, Iterable, Sequence

from absl import app, flags
from etils import epath
import ml_collections
from ml_collections.config_flags import config_flags as ml_config_flags
from ml_collections.config_flags import config_path

ConfigDict = ml_collections.ConfigDict

_TUPLE_TAG = "__tuple__"
_MAX_KEYS_LISTED = 40


class InputError(ValueError):
  """Bad input that the user fixes (a missing file or checkpoint, a batch size the devices
  do not divide). Its message names the problem and the fix; `run_main` prints it alone."""


class UnknownConfigKeyError(flags.Error, ValueError):
  """An override names a key the config does not have.

  A `flags.Error`, so that `absl.app.run` prints it as a flags error (no traceback).
  """


# --- listing keys and checking overrides ---------------------------------------------


def config_keys(config: Any, prefix: str = "") -> list[str]:
  """All dotted paths into `config`: nested ConfigDicts and their leaves, depth first."""
  keys = []
  items = config.items() if isinstance(config, (ConfigDict, dict)) else ()
  for name, value in items:
    path = f"{prefix}{name}"
    keys.append(path)
    if isinstance(value, (ConfigDict, dict)):
      keys.extend(config_keys(value, prefix=path + "."))
  return keys


def _nearest_first(key: str, valid: Sequence[str]) -> list[str]:
  """Valid keys sorted by similarity to `key` (difflib ratio; ties keep config order)."""

  def score(candidate):
    # Compare both the full path and its last component, so that "model.chanels" ranks
    # "model.channels" first and "chanels" alone still finds "model.channels".
    return max(
        difflib.SequenceMatcher(None, key, candidate).ratio(),
        difflib.SequenceMatcher(None, key.split(".")[-1],
                                candidate.split(".")[-1]).ratio())

  return sorted(valid, key=score, reverse=True)


def unknown_key_message(key: str, config: Any, flag_name: str = "config") -> str:
  """The error text for an unknown override: the key, then the valid keys nearest first."""
  valid = config_keys(config)
  ranked = _nearest_first(key, valid)
  shown = ranked[:_MAX_KEYS_LISTED]
  more = len(ranked) - len(shown)
  lines = "\n".join(f"  --{flag_name}.{k}" for k in shown)
  tail = f"\n  ... and {more} more" if more > 0 else ""
  return (f"Unknown config key --{flag_name}.{key}: the config has no field '{key}'.\n"
          f"Valid keys (nearest first):\n{lines}{tail}")


def check_override_keys(config: Any, keys: Iterable[str], flag_name: str = "config"):
  """Raises UnknownConfigKeyError for the first key that does not exist in `config`.

  Existence is decided by ml_collections' own path lookup (`a.b`, `a.b[0]`), so every
  key it accepts passes here.
  """
  for key in keys:
    try:
      config_path.get_value(key, config)
    except (KeyError, AttributeError, IndexError, TypeError):
      raise UnknownConfigKeyError(unknown_key_message(key, config, flag_name)) from None


# --- the absl flag --------------------------------------------------------------------


class _ListParser(flags.ArgumentParser):
  """Parses `[1, 2]` (or `(1, 2)`) as a Python list, for list-valued fields."""

  def parse(self, argument):
    if isinstance(argument, (list, tuple)):  # the field's default, passed by absl
      return list(argument)
    try:
      value = ast.literal_eval(argument)
    except (SyntaxError, ValueError):
      raise ValueError(f"{argument!r} is not a Python list literal; write e.g. "
                       "'[1, 2, 3]'.") from None
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"{argument!r} is a {type(value).__name__}, expected a list like "
                       "'[1, 2, 3]'.")
    return list(value)

  def flag_type(self):
    return "list"


# ml_collections 1.1.0 cannot override list fields or fields whose default is None (their
# type, NoneType, has no parser). Register parsers for both (a process-wide addition to
# ml_collections' table): lists take a list literal; a None field takes any Python
# literal, or else the text as a string (`--config.data=digits`, `--config.seed=3`).
ml_config_flags.register_flag_parser_for_type(list, _ListParser())
ml_config_flags.register_flag_parser_for_type(type(None), ml_config_flags._LiteralParser())  # pylint: disable=protected-access


def _config_files(folder: epath.Path) -> list[epath.Path]:
  """The config files in `folder` and its subfolders, package markers left out."""
  files = list(folder.glob("*.py")) + list(folder.glob("*/*.py"))
  return sorted(p for p in files if p.name != "__init__.py")


def missing_config_message(path: str, flag_name: str = "config") -> str:
  """The error text for a config path that does not exist: the path, where relative paths
  are read from, the nearest config files, and an example of the flag."""
  file = epath.Path(path)
  folder = file.parent
  if folder.is_dir():
    files = _config_files(folder)
    names = difflib.get_close_matches(file.name, sorted({p.name for p in files}), n=3,
                                      cutoff=0.6)
    near = [str(p) for name in names for p in files if p.name == name][:4]
    hint = f" (nearest: {', '.join(near)})" if near else ""
  else:
    hint = f" (the folder {folder} does not exist either)"
  where = "" if file.is_absolute() else f" (relative to the current directory {os.getcwd()})"
  return (f"config file {path} does not exist{where}{hint}. Pass an existing config file, "
          f"e.g. --{flag_name}=configs/vdm/digits.py, optionally with :arg (e.g. "
          f"configs/vdm/digits.py:runlocal).")


class _ConfigFileParser(ml_config_flags.ConfigFileFlagParser):
  """ml_collections' config-file parser, with a missing or unreadable file a flags error."""

  def parse(self, path):
    if isinstance(path, str):
      file = epath.Path(path.split(":", 1)[0])
      if not file.exists():
        raise ValueError(missing_config_message(str(file), self.name))
      if file.is_dir():
        example = next(iter(_config_files(file)), file / "config.py")
        raise ValueError(f"config path {file} is a folder; pass a config file, e.g. "
                         f"--{self.name}={example}.")
    config = super().parse(path)
    error = getattr(config, "_error", None)   # ml_collections' _ErrorConfig: an IOError
    if isinstance(error, OSError):
      raise ValueError(f"config file {path} could not be read: {error}")
    return config


class _CheckedConfigFlag(ml_config_flags._ConfigFlag):  # pylint: disable=protected-access
  """ml_collections' config-file flag, with unknown override keys listed in the error.

  `_initialize_missing_parent_fields(config, overrides)` is the first place where
  ml_collections (1.1.0) sees both the loaded config and the override keys; checking there
  replaces its terse KeyError ("Did you mean ...?", or nothing) by our message.
  """

  def _initialize_missing_parent_fields(self, config, overrides):
    if isinstance(config, ConfigDict):
      check_override_keys(config, overrides, self.name)
    super()._initialize_missing_parent_fields(config, overrides)


def define_config_flag(name: str = "config",
                       default: str | None = None,
                       help_string: str = "Config file, `path/to/file.py[:arg]`.",
                       flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: list[str] | None = None,
                       required: bool = False) -> flags.FlagHolder:
  """Defines `--name path.py:arg` with `--name.key=value` overrides; returns its holder.

  Like `config_flags.DEFINE_config_file(name, lock_config=True)`, but an unknown override
  key raises UnknownConfigKeyError listing the valid keys, and a file that does not exist
  is a flags error naming it. `holder.value` is the locked ConfigDict once absl has parsed
  the command line; `required`: absl refuses a command line without the flag.
  """
  flag = _CheckedConfigFlag(
      parser=_ConfigFileParser(name=name, lock_config=True),
      serializer=flags.ArgumentSerializer(),
      name=name,
      default=default,
      help_string=help_string,
      flag_values=flag_values,
      accept_new_attributes=False,
      sys_argv=sys_argv)
  return flags.DEFINE_flag(flag, flag_values, required=required)


def load_config(path_with_arg: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Loads `path.py[:arg]` and applies overrides given as "key=value" strings.

  Parses exactly as the command line would (a private absl FlagValues), so "64" becomes an
  int for an int field and "(1, 2)" a tuple for a tuple field. A leading "--config." on an
  override is accepted and ignored; a bare "key" sets a bool field to True, as on the
  command line. Returns a locked ConfigDict.
  """
  if isinstance(overrides, str):
    raise TypeError(f"overrides must be a list of 'key=value' strings, got the string "
                    f"{overrides!r}; wrap it in a list.")
  argv = ["load_config", f"--config={path_with_arg}"]
  for override in overrides:
    override = override.removeprefix("--").removeprefix("config.")
    argv.append(f"--config.{override}")
  flag_values = flags.FlagValues()
  holder = define_config_flag("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  config = holder.value
  if not isinstance(config, ConfigDict):
    # ml_collections defers file-loading errors to the first attribute access; surface them.
    getattr(config, "lock")
    raise TypeError(f"get_config() in {path_with_arg} returned {type(config).__name__}; "
                    "it must return an ml_collections.ConfigDict.")
  config.lock()
  return config


# --- JSON round trip --------------------------------------------------------------------


def _to_jsonable(value: Any, path: str) -> Any:
  """Nested ConfigDict -> JSON-ready dicts/lists; tuples become {"__tuple__": [...]}."""
  if isinstance(value, (ConfigDict, dict)):
    out = {}
    for key, item in value.items():
      if not isinstance(key, str):
        raise TypeError(f"Config key {path}{key!r} is not a string; JSON needs string keys.")
      out[key] = _to_jsonable(item, f"{path}{key}.")
    return out
  if isinstance(value, tuple):
    return {_TUPLE_TAG: [_to_jsonable(v, f"{path}[{i}].") for i, v in enumerate(value)]}
  if isinstance(value, list):
    return [_to_jsonable(v, f"{path}[{i}].") for i, v in enumerate(value)]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"Config field '{path.rstrip('.')}' holds a {type(value).__name__} "
                  f"({value!r}), which JSON cannot store exactly; use None, bool, int, "
                  "float, str, list, tuple or a nested ConfigDict.")


def _from_jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    if set(value) == {_TUPLE_TAG}:
      return tuple(_from_jsonable(v) for v in value[_TUPLE_TAG])
    return {k: _from_jsonable(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_from_jsonable(v) for v in value]
  return value


def config_to_json(config: ConfigDict, indent: int | None = 2) -> str:
  """JSON text that `config_from_json` turns back into an equal ConfigDict."""
  return json.dumps(_to_jsonable(config, ""), indent=indent, sort_keys=False)


def config_from_json(text: str) -> ConfigDict:
  """Inverse of `config_to_json`; returns a locked ConfigDict (nested dicts as ConfigDicts)."""
  data = _from_jsonable(json.loads(text))
  if not isinstance(data, dict):
    raise ValueError(f"Config JSON must hold an object at the top, got {type(data).__name__}.")
  config = ConfigDict(data)
  config.lock()
  return config


def fill_missing(config: ConfigDict, defaults: ConfigDict, prefix: str = "") -> list[str]:
  """Adds to `config` (unlocked) every key of `defaults` it lacks, recursively, and returns
  the dotted names added: a checkpoint saved before a key existed still loads, with that
  key's default. Existing values are never changed."""
  added = []
  for key, value in defaults.items():
    name = f"{prefix}{key}"
    if key not in config:
      config[key] = value
      added.append(name)
    elif isinstance(value, ConfigDict) and isinstance(config[key], ConfigDict):
      added += fill_missing(config[key], value, name + ".")
  return added


# --- entry-point helpers ------------------------------------------------------------------


def run_main(main: Callable[[list[str]], Any], *errors: type[Exception]):
  """`absl.app.run(main)`, with bad input reported as one message and exit status 1.

  An InputError (or one of `errors`, e.g. launch.checkpoint.CheckpointError) raised by
  `main` is printed alone, as "Error: <message>", without a traceback: its message already
  names the problem and the fix, and a traceback would bury it. Any other exception keeps
  its traceback (that is a bug to report, not bad input).
  """

  def main_reporting_bad_input(argv):
    try:
      return main(argv)
    except (InputError, *errors) as e:
      sys.exit(f"Error: {e}")

  app.run(main_reporting_bad_input)


def fresh_output(path: str, *, chosen: bool, overwrite: bool, flag: str = "--out") -> str:
  """Where an entry point writes its output (a file or a folder), never over earlier output.

  A default path (`chosen` False) that already holds output gets the first free numbered
  sibling (`x.png` -> `x_1.png`, `cascade` -> `cascade_1`): a user who named no output
  expects each run's results to be kept. A path the user chose that holds output is
  refused unless `overwrite`: writing elsewhere would surprise them, and replacing the
  files would lose the earlier run's results. An empty folder counts as free.
  """
  target = epath.Path(path)

  def taken(p):
    return p.exists() and (not p.is_dir() or any(p.iterdir()))

  if not taken(target) or (chosen and overwrite):
    return path
  if chosen:
    raise InputError(f"{flag} {path} already holds the output of an earlier run; pass a new "
                     f"{flag} path, or --overwrite to replace it.")
  stem, suffix = (target.stem, target.suffix) if target.suffix else (target.name, "")
  i = 1
  while taken(target.parent / f"{stem}_{i}{suffix}"):
    i += 1
  return os.fspath(target.parent / f"{stem}_{i}{suffix}")
