"""The diffusion model every experiment builds: a denoising network, the parameterization
of its output, and a noise schedule.

`denoise(z, logsnr, cond)` gives every prediction (x-hat, eps-hat, v-hat) from the network's
output; `logsnr(t)` is the schedule. VDM models and Imagen stages are subclasses that add
how they read a batch (`data_and_cond`) and how their conditioning is dropped for
classifier-free guidance (`drop_conditioning`), which is all that distillation and guided
sampling need to know of them.
"""

import jax
from flax import nnx

from vdm import process


class DiffusionModel(nnx.Module):
  """Network + parameterization + schedule for images of `image_shape` with `num_levels`
  grey levels per channel."""

  def __init__(self, net: nnx.Module, schedule: nnx.Module, parameterization: str,
               num_levels: int, image_shape: tuple):
    if parameterization not in process.PARAMETERIZATIONS:
      raise ValueError(f"unknown parameterization {parameterization!r}; choose one of "
                       f"{process.PARAMETERIZATIONS}")
    self.net, self.schedule = net, schedule
    self.parameterization = parameterization
    self.num_levels, self.image_shape = num_levels, tuple(image_shape)

  def denoise(self, z, logsnr, cond=None, *, dropout_key=None) -> process.Prediction:
    out = self.net(z, logsnr, cond, dropout_key=dropout_key)
    return process.predict(z, logsnr, out, self.parameterization)

  def logsnr(self, t):
    return self.schedule(t)

  def data_and_cond(self, batch: dict, rng: jax.Array, cfg) -> tuple:
    """(x in [-1, 1] at this model's resolution, the network's cond at sampling time) of a
    batch; cfg is config.model."""
    raise NotImplementedError(f"{type(self).__name__} does not define data_and_cond")

  def sampling_cond(self, cond: dict, num: int) -> dict:
    """cond (text, labels) of `num` samples completed with what else the network takes at
    sampling time (a video stage: its frame rate); nothing by default."""
    del num
    return cond

  @staticmethod
  def drop_conditioning(cond: dict, keep: jax.Array) -> dict:
    """cond with the guidance-relevant conditioning removed where keep is False."""
    raise NotImplementedError("this model has no droppable conditioning")
