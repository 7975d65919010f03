"""Conditional sampling from an unconditional diffusion model: reconstruction guidance and
the replacement method (Ho et al. 2022, "Video Diffusion Models", sec. 3.1).

The task: draw x^b ~ p(x^b | x^a) from a model trained on the joint p(x), where x^a is known.
Here "known" is a linear observation y = A x of the whole tensor x:
  * frames (temporal extension): A keeps the entries of a boolean mask (x^a = the mask's
    entries, x^b the rest); `known_entries`, `known_frames`;
  * spatial super-resolution: A is average pooling by a factor, y the low-resolution video;
    `low_resolution`.
Every observation carries A^+ (its pseudo-inverse), which the replacement method needs.

Replacement method (the paper's baseline): at every step the observed part of z_t is replaced
by a fresh sample of the forward process given y, z^a_t ~ q(z^a_t | x^a) = N(alpha_t x^a,
sigma_t^2 I), while z^b_t comes from the model as usual (`replace_known`). For a general A it
replaces the component of z in A's row space: z <- z - A^+ A z + A^+ (alpha y + sigma A eps),
so A z_t ~ q(A z_t | y); with average pooling this is ILVR's low-pass replacement. Its x-hat^b
= E[x^b | z_t] sees x^a only through the noisy z^a_t and is not the E[x^b | z_t, x^a] the
sampler needs: at high noise it hardly depends on x^a, and the samples come out less coherent
with it (Ho et al., sec. 3.1 and Table 6; tests/test_reconstruction_guidance.py measures the
error on a Gaussian whose conditional is known).

Reconstruction guidance, eq. 7, as read here. Bayes on q(x^b | z_t, x^a) and Tweedie's
formula give

  E[x^b | z_t, x^a] = E[x^b | z_t] + (sigma_t^2 / alpha_t) grad_{z^b_t} log q(x^a | z_t),

and with the approximation q(x^a | z_t) ~ N(x-hat^a(z_t), (sigma_t^2 / alpha_t^2) I) the
factor sigma_t^2 / alpha_t times -alpha_t^2 / (2 sigma_t^2) leaves -alpha_t / 2:

  x-tilde^b(z_t) = x-hat^b(z_t) - (w_r alpha_t / 2) grad_{z^b_t} ||x^a - x-hat^a(z_t)||_2^2.  (7)

So w_r = 1 is that Gaussian approximation (exact in the limit sigma_t -> 0, where Cov[x^a |
z_t] -> sigma_t^2 / alpha_t^2 I); the paper finds w_r > 1 better, since the approximation
overstates the variance of x^a given z_t at high noise and so under-weights the gradient.
alpha_t is sqrt(sigmoid(logsnr_t)) (the VP alpha, not alpha^2 or the SNR), the norm is the
plain squared L2 norm summed over every known entry (not a mean), and the gradient goes
through the denoiser (one VJP per step). x-tilde^a is left as x-hat^a: with replacement z^a
is overwritten at the next step anyway. For super-resolution the paper takes the same
adjustment over all of z_t with x-hat^a = A x-hat (the model's output downsampled):
x-tilde = x-hat - (w_r alpha_t / 2) grad_{z_t} ||y - A x-hat(z_t)||^2; with a mask
observation A x-hat is x-hat^a and the gradient is restricted to z^b, which is eq. 7.
x-tilde replaces x-hat in the ancestral / DDIM update (eps-hat and v-hat are recomputed from
it and z_t). Combined with replacement (the default here, `replace=True`), this is the method
the paper compares with plain replacement; `w_r = 0` with replacement is the replacement
method, and `w_r = 0` without replacement is unconditional sampling (the same numbers as
`samplers.sample`).

Uses: `extend_video` with a `window_sampler` (autoregressive extension beyond the trained
length: the last k frames known, the next F - k generated, repeated), `super_resolve` (from
a low-resolution video).

Denoisers have the samplers' interface: `denoise_fn(z, logsnr [B], cond) -> process.Prediction`
of the whole tensor (wrap a bare x-hat function with `process.from_x`). Examples must be
independent given z (no cross-example layers), so that the gradient of the batch's summed
loss is each example's own gradient.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from vdm import process
from vdm import samplers


# --- observations y = A x -----------------------------------------------------------------


class Observation(NamedTuple):
  """A linear observation y = A x of the tensor being sampled.

  y: the known measurements (shape of A x).
  forward: A, linear, x -> y (batched like x).
  pinv: A^+, y -> x, with A A^+ = I: used by replacement and the final projection.
  guide: where eq. 7's gradient acts: a mask broadcastable to x (True = unknown, z^b), or
    None for all of z_t (super-resolution).
  """
  y: jax.Array
  forward: Callable[[jax.Array], jax.Array]
  pinv: Callable[[jax.Array], jax.Array]
  guide: jax.Array | None


def known_entries(x_known, mask) -> Observation:
  """x^a = the entries of x_known where `mask` (bool, broadcastable to x) is True.

  A keeps the masked entries and zeroes the rest, so A = A^T = A^+ and y lives in x's shape.
  """
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"the known-entries mask must be boolean (True = known), got dtype "
                     f"{mask.dtype}; pass mask.astype(bool)")
  x_known = jnp.asarray(x_known, jnp.float32)
  try:
    jnp.broadcast_shapes(mask.shape, x_known.shape)
  except ValueError:
    raise ValueError(f"mask of shape {mask.shape} does not broadcast against x of shape "
                     f"{x_known.shape}") from None
  keep = lambda x: jnp.where(mask, x, 0.0)
  return Observation(y=keep(x_known), forward=keep, pinv=keep, guide=~mask)


def frame_mask(num_frames: int, num_known: int, ndim: int, frame_axis: int = 1):
  """Boolean mask, True on the first `num_known` of `num_frames` frames, shaped to broadcast
  against a video of `ndim` axes with frames on `frame_axis` (e.g. [B, F, H, W, C])."""
  if not 0 < num_known < num_frames:
    raise ValueError(f"need 0 < num_known < num_frames, got num_known={num_known}, "
                     f"num_frames={num_frames}")
  shape = [1] * ndim
  shape[frame_axis] = num_frames
  return (jnp.arange(num_frames) < num_known).reshape(shape)


def known_frames(known, num_frames: int, frame_axis: int = 1) -> Observation:
  """The first k frames known (`known`: [B, k, ...] with frames on `frame_axis`), the next
  num_frames - k unknown: the observation of autoregressive extension."""
  known = jnp.asarray(known, jnp.float32)
  k = known.shape[frame_axis]
  mask = frame_mask(num_frames, k, known.ndim, frame_axis)
  pad = [(0, 0)] * known.ndim
  pad[frame_axis] = (0, num_frames - k)
  return known_entries(jnp.pad(known, pad), mask)


def _check_factor(x, factor: int):
  if not isinstance(factor, int) or factor < 1:
    raise ValueError(f"the downsampling factor must be a positive int, got {factor!r}")
  h, w = x.shape[-3], x.shape[-2]
  if h % factor or w % factor:
    raise ValueError(f"spatial size {h}x{w} (axes -3, -2 of [..., H, W, C]) is not divisible "
                     f"by the factor {factor}")


def avg_pool(x, factor: int):
  """Average pooling by `factor` over the spatial axes of [..., H, W, C] (A for SR)."""
  _check_factor(x, factor)
  *lead, h, w, c = x.shape
  x = x.reshape(*lead, h // factor, factor, w // factor, factor, c)
  return x.mean(axis=(-4, -2))


def upsample_nearest(y, factor: int):
  """Nearest-neighbour upsampling of [..., h, w, C]: the pseudo-inverse of `avg_pool`
  (A^+ = A^T (A A^T)^{-1} = factor^2 A^T, and A A^+ = I)."""
  return jnp.repeat(jnp.repeat(y, factor, axis=-3), factor, axis=-2)


def low_resolution(y_low, factor: int) -> Observation:
  """y = avg_pool(x, factor): super-resolution from a low-resolution video [..., h, w, C]."""
  y_low = jnp.asarray(y_low, jnp.float32)
  return Observation(y=y_low, forward=functools.partial(avg_pool, factor=factor),
                     pinv=functools.partial(upsample_nearest, factor=factor), guide=None)


# --- one step's pieces (pure) ---------------------------------------------------------------


def replace_known(z, obs: Observation, logsnr, noise):
  """Replacement: the observed component of z_t redrawn from q(A z_t | y).

  z <- z - A^+ A z + A^+ (alpha_t y + sigma_t A noise), noise ~ N(0, I) shaped like z. For a
  mask this sets z^a = alpha_t x^a + sigma_t noise^a and leaves z^b as it is.
  """
  alpha, sigma = process.alpha_sigma(process.per_example(logsnr, obs.y))
  return z - obs.pinv(obs.forward(z)) + obs.pinv(alpha * obs.y + sigma * obs.forward(noise))


def guided_prediction(denoise_fn, z, logsnr, cond, obs: Observation, w_r) -> process.Prediction:
  """The denoiser's prediction with x-hat adjusted by reconstruction guidance (eq. 7).

  x-tilde = x-hat - (w_r alpha_t / 2) * guide * grad_z ||y - A x-hat(z)||^2, per example;
  eps-hat is moved consistently (eps-tilde = eps-hat - (alpha_t / sigma_t)(x-tilde - x-hat),
  so z_t = alpha x-tilde + sigma eps-tilde still holds) and v-hat recomputed. A w_r that is
  the Python number 0 returns the denoiser's prediction untouched, without a backward pass.
  """
  if isinstance(w_r, (int, float)) and w_r == 0:
    return denoise_fn(z, logsnr, cond)

  def loss(zz):
    pred = denoise_fn(zz, logsnr, cond)
    return jnp.sum(jnp.square(obs.y - obs.forward(pred.x))), pred

  grad, pred = jax.grad(loss, has_aux=True)(z)
  if obs.guide is not None:
    grad = jnp.where(obs.guide, grad, 0.0)
  alpha, sigma = process.alpha_sigma(process.per_example(logsnr, z))
  dx = -(jnp.asarray(w_r, z.dtype) * alpha / 2.0) * grad
  x, eps = pred.x + dx, pred.eps - (alpha / sigma) * dx
  return process.Prediction(x=x, eps=eps, v=process.v_from_x_eps(x, eps, logsnr))


def project(x, obs: Observation):
  """x + A^+ (y - A x): the nearest x (along A's row space) with A x = y; for a mask it writes
  the known entries back (bit-exactly: computed as x - A^+ A x + A^+ y)."""
  return x - obs.pinv(obs.forward(x)) + obs.pinv(obs.y)


# --- the sampling loop ----------------------------------------------------------------------


def conditional_sample(denoise_fn: Callable[..., process.Prediction],
                       logsnr_fn: Callable[[jax.Array], jax.Array],
                       obs: Observation,
                       shape,
                       rng,
                       *,
                       num_steps: int,
                       w_r=1.0,
                       replace: bool = True,
                       sampler: str = "ancestral",
                       eta: float = 0.0,
                       clip_x: Callable[[jax.Array], jax.Array] = samplers.no_clip,
                       cond: Any = None,
                       z_init=None):
  """Samples x of `shape` given y = A x, on `samplers.sample`'s grid t_i = i / num_steps.

  Each of the num_steps - 1 steps from t_i to t_{i-1}: replace the observed part of z
  (if `replace`), evaluate the guided prediction (eq. 7, weight w_r; then `clip_x`), and take
  the ancestral or DDIM step of vdm/samplers.py. The last evaluation, at t = 1 / num_steps,
  returns x-tilde; with `replace` it is projected onto A x = y (known frames written back).

  w_r = 0, replace=True: the replacement method. w_r = 0, replace=False: unconditional
  sampling, the same numbers as samplers.sample with the same rng. One lax.fori_loop: jit
  it with everything but the arrays static.
  """
  if sampler not in samplers.STEP_SAMPLERS:
    raise ValueError(f"reconstruction guidance steps one rule at a time: sampler {sampler!r} "
                     f"is not one of {samplers.STEP_SAMPLERS}")
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive Python int (static under jit), "
                     f"got {num_steps!r}")
  if isinstance(w_r, (int, float)) and w_r < 0:
    raise ValueError(f"the reconstruction guidance weight w_r must be >= 0, got {w_r}")
  shape = tuple(shape)
  want_y = jax.eval_shape(obs.forward, jax.ShapeDtypeStruct(shape, jnp.float32)).shape
  if tuple(obs.y.shape) != tuple(want_y):
    raise ValueError(f"the observation y has shape {tuple(obs.y.shape)} but A maps x of shape "
                     f"{shape} to {tuple(want_y)}: sample a shape that matches the known "
                     "frames / low-resolution video (same batch, frames, channels)")
  # The same start and steps as samplers.sample, so w_r = 0 runs match it.
  z_init, loop_rng, logsnr_at = samplers.loop_start(rng, shape, z_init, logsnr_fn, num_steps)
  replace_rng = jax.random.fold_in(loop_rng, num_steps + 1)  # indices the steps never use

  def predict(z, i):
    logsnr = logsnr_at(i)
    if replace:
      noise = jax.random.normal(jax.random.fold_in(replace_rng, i), shape, jnp.float32)
      z = replace_known(z, obs, logsnr, noise)
    pred = guided_prediction(denoise_fn, z, logsnr, cond, obs, w_r)
    return samplers.clip_prediction(pred, z, logsnr, clip_x), z

  def body(k, z):
    i = num_steps - k  # k = 0 .. N-2 steps from t = i/N to s = (i-1)/N.
    pred, z = predict(z, i)
    return samplers.step_to(sampler, eta, pred, z, i, logsnr_at, loop_rng)

  z = jax.lax.fori_loop(0, num_steps - 1, body, z_init)
  x = predict(z, 1)[0].x
  return project(x, obs) if replace else x


def replacement_sample(denoise_fn, logsnr_fn, obs: Observation, shape, rng, **kwargs):
  """The replacement method: `conditional_sample` with w_r = 0 and replacement on."""
  return conditional_sample(denoise_fn, logsnr_fn, obs, shape, rng, w_r=0.0, replace=True,
                            **kwargs)


# --- uses -----------------------------------------------------------------------------------


def window_sampler(denoise_fn, logsnr_fn, num_frames: int, *, frame_axis: int = 1,
                   jit: bool = True, **kwargs):
  """A window sampler for `extend_video`: (known [B, k, ...], rng, w_r=1.0) -> a window
  [B, num_frames, ...] whose first k frames are `known` and the rest are sampled by
  `conditional_sample` (kwargs go there: replace, num_steps, sampler, cond, ...).

  w_r is an argument of the returned function, so under jit (the default) one compiled
  program serves every guidance weight (w_r = 0 with replacement: the replacement method).
  """
  if "w_r" in kwargs:
    raise ValueError("pass w_r to the returned window sampler, not to window_sampler")

  def sample_window(known, rng, w_r=1.0):
    obs = known_frames(known, num_frames, frame_axis)
    shape = list(known.shape)
    shape[frame_axis] = num_frames
    return conditional_sample(denoise_fn, logsnr_fn, obs, shape, rng, w_r=w_r, **kwargs)

  return jax.jit(sample_window) if jit else sample_window


def extend_video(sample_window, video, rng, *, num_known: int, total_frames: int,
                 frame_axis: int = 1):
  """Extends `video` ([B, F0, ...], F0 >= num_known) autoregressively to `total_frames`.

  `sample_window(known, rng)` (e.g. `window_sampler(...)`, with w_r bound by
  functools.partial if not 1) returns a window of the model's
  training length F whose first `num_known` frames are `known`: each round passes the last
  `num_known` frames so far and appends the window's F - num_known new frames (the last
  round only as many as are still missing). Returns [B, total_frames, ...], starting with
  `video` unchanged; round r uses jax.random.fold_in(rng, r).
  """
  video = jnp.asarray(video, jnp.float32)
  have = video.shape[frame_axis]
  if num_known < 1:
    raise ValueError(f"num_known must be >= 1, got {num_known}")
  if have < num_known:
    raise ValueError(f"the video has {have} frames but num_known={num_known} must be known")
  if total_frames < have:
    raise ValueError(f"total_frames={total_frames} is shorter than the video ({have} frames)")
  pieces, n, r = [video], have, 0
  while n < total_frames:
    known = jax.lax.slice_in_dim(jnp.concatenate(pieces, frame_axis), n - num_known, n,
                                 axis=frame_axis)
    window = sample_window(known, jax.random.fold_in(rng, r))
    num_frames = window.shape[frame_axis]
    if num_frames <= num_known:
      raise ValueError(f"sample_window returned {num_frames} frames, no more than the "
                       f"{num_known} known: it must return the whole window")
    take = min(num_frames - num_known, total_frames - n)
    pieces.append(jax.lax.slice_in_dim(window, num_known, num_known + take, axis=frame_axis))
    n, r = n + take, r + 1
  return jnp.concatenate(pieces, frame_axis)


def super_resolve(denoise_fn, logsnr_fn, low_res, rng, *, factor: int, replace: bool = False,
                  **kwargs):
  """Samples a video [..., factor h, factor w, C] whose average pooling is `low_res`.

  Reconstruction guidance over all of z_t with x-hat^a = avg_pool(x-hat) (the paper's form for
  spatial super-resolution); `replace=True` adds ILVR-style replacement of the low-pass part,
  and `w_r=0, replace=True` is the replacement method alone.
  """
  low_res = jnp.asarray(low_res, jnp.float32)
  *lead, h, w, c = low_res.shape
  shape = (*lead, h * factor, w * factor, c)
  return conditional_sample(denoise_fn, logsnr_fn, low_resolution(low_res, factor), shape, rng,
                            replace=replace, **kwargs)
