"""An Imagen stage trains the same from cached text embeddings and from the frozen T5 encoder
run inside the train step (the encoder's weights passed to the step as a sharded argument)."""

import jax
import numpy as np

from launch import config_flags, families, trainer
from launch import setup as setup_lib
from launch import workdir as workdir_lib
from launch.data import pipeline


def _losses(workdir, text_source, *, zero_text=False, steps=5):
  """Losses of the first `steps` steps, with a large constant learning rate."""
  config = config_flags.load_config("configs/imagen/digits_base.py:runlocal",
                                    [f"data.text_source={text_source}", "mesh.ici=(2, 1, 1)",
                                     "optim.warmup_steps=0", "optim.lr=0.01"])
  setup = setup_lib.build(config, jax.devices()[:2], workdir=str(workdir),
                          frozen_module=workdir_lib.frozen_module(config))
  state = setup.init()
  loader = iter(pipeline.make_loader(setup.source, global_batch_size=config.train.batch_size,
                                     seed=config.seed))
  batches = [next(loader) for _ in range(steps)]
  if zero_text:
    for b in batches:
      b["text_emb"] = np.zeros_like(b["text_emb"])
  compiled, _ = trainer.compile_step(
      setup, families.device_batch(batches[0], setup.family.batch_keys))
  out = []
  for b in batches:
    state, metrics = compiled(state, setup_lib.put_batch(setup, b), *setup_lib.frozen_args(setup))
    out.append(float(metrics["loss"]))
  return setup, batches[0], np.array(out)


def test_cached_and_in_step_text_give_the_same_training(tmp_path):
  setup_c, batch_c, cache = _losses(tmp_path / "cache", "cache")
  setup_e, batch_e, encoder = _losses(tmp_path / "encoder", "encoder")
  _, _, no_text = _losses(tmp_path / "cache", "cache", zero_text=True)
  assert "text_emb" in batch_c and "input_ids" not in batch_c
  assert "input_ids" in batch_e and "text_emb" not in batch_e
  assert not setup_c.frozen and setup_e.frozen        # only the encoder path has a frozen T5
  np.testing.assert_array_equal(batch_c["image"], batch_e["image"])
  # Same images, draws and init; the cache holds bf16 embeddings, the step f32 ones.
  np.testing.assert_allclose(encoder, cache, rtol=1e-4)
  # The text does reach the loss by the fifth step (zero-initialised output and text
  # projections keep it out before): without text the loss moves over 10x further.
  assert abs(no_text[-1] - cache[-1]) > max(1e-4, 10 * abs(encoder[-1] - cache[-1])), (
      cache, encoder, no_text)
