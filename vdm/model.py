"""The diffusion model every experiment builds: a denoising network, the parameterization
of its output, and a noise schedule.

`denoise(z, logsnr, cond)` gives every prediction (x-hat, eps-hat, v-hat) from the network's
output; `logsnr(t)` is the schedule. VDM models and Imagen stages are subclasses that add
how they read a batch (`data_and_cond`) and how their conditioning is dropped for
classifier-free guidance (`drop_conditioning`), which is all that distillation and guided
sampling need to know of them.

Self-conditioning (Chen et al. 2022, sec. 3.2; `self_condition=True`): the network also sees
the model's previous estimate of x, cond["x_self"] (zeros when absent), concatenated to z on
the channel axis (vdm/self_conditioning.py); the network is built with twice the input
channels of z and the output channels of a plain model.
"""

import jax
from flax import nnx

from vdm import process, self_conditioning


class DiffusionModel(nnx.Module):
  """Network + parameterization + schedule for images of `image_shape` with `num_levels`
  grey levels per channel."""

  def __init__(self, net: nnx.Module, schedule: nnx.Module, parameterization: str,
               num_levels: int, image_shape: tuple, *, self_condition: bool = False):
    if parameterization not in process.PARAMETERIZATIONS:
      raise ValueError(f"unknown parameterization {parameterization!r}; choose one of "
                       f"{process.PARAMETERIZATIONS}")
    self.net, self.schedule = net, schedule
    self.parameterization = parameterization
    self.num_levels, self.image_shape = num_levels, tuple(image_shape)
    self.self_condition = bool(self_condition)

  def denoise(self, z, logsnr, cond=None, *, dropout_key=None) -> process.Prediction:
    net_in, cond = self_conditioning.network_input(z, cond, self.self_condition)
    out = self.net(net_in, logsnr, cond, dropout_key=dropout_key)
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
