"""FID and CLIP score with the standard networks, from weight files the user provides.

Nothing here downloads. Each network's weights are read from a safetensors file whose
tensor names are those of the usual PyTorch release, and a missing file raises
FileNotFoundError naming the file and how to make it.

FID (Heusel et al. 2017): Fréchet distance between Inception-v3 pool3 features (2048-d) of
two image sets, with the network of pytorch-fid (`FIDInceptionA/C/E_1/E_2`: TensorFlow's
2015-12-05 Inception graph ported to PyTorch). Convert its weights once, with torch:

    # pt_inception-2015-12-05-6726825d.pth: pytorch-fid's GitHub release "fid_weights"
    python -c "import torch, safetensors.torch; \
      sd = torch.load('pt_inception-2015-12-05-6726825d.pth'); \
      safetensors.torch.save_file(sd, 'inception_fid.safetensors')"

Inputs are resized to 299x299 bilinearly (as torch's `interpolate(..., align_corners=False)`,
no antialiasing) and scaled to [-1, 1], as pytorch-fid does.

CLIP score (Hessel et al. 2021; torchmetrics' convention): mean over (image, text) pairs of
max(100 * cos(E_image, E_text), 0), with the CLIP towers of a Hugging Face CLIPModel snapshot
(e.g. `openai/clip-vit-base-patch32`: model.safetensors, config.json, vocab.json, merges.txt).
Both towers and the byte-level BPE tokenizer are implemented here (see the CLIP section).
"""

import functools
import json
import os
import unicodedata
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from launch import quality

HIGHEST = jax.lax.Precision.HIGHEST  # FID must not run its convs in bf16 on TPU

INCEPTION_FILE = "inception_fid.safetensors"
INCEPTION_HOWTO = (
    "Download pt_inception-2015-12-05-6726825d.pth (pytorch-fid's GitHub release "
    "'fid_weights') and convert it once with torch:\n  python -c \"import torch, "
    "safetensors.torch; sd = torch.load('pt_inception-2015-12-05-6726825d.pth'); "
    "safetensors.torch.save_file(sd, 'inception_fid.safetensors')\"")
CLIP_HOWTO = ("Download a Hugging Face CLIPModel snapshot (e.g. openai/clip-vit-base-patch32: "
              "model.safetensors, config.json, vocab.json, merges.txt) and pass the weights "
              "file and the folder holding vocab.json and merges.txt.")


def _require_file(path, what: str, howto: str) -> str:
  if path is None or not os.path.isfile(path):
    raise FileNotFoundError(f"{what} not found at {path!r}. {howto}")
  return path


def _load_safetensors(path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(path)


def to_unit_images(images) -> np.ndarray:
  """uint8 [N, H, W, C] (0..255) or float (0..1), C in {1, 3} -> float32 RGB in [0, 1]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}.")
  if images.shape[0] == 0:
    raise ValueError("got 0 images; pass at least one (two per set for a Fréchet distance).")
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 255.0
  elif np.issubdtype(images.dtype, np.floating):
    if images.size and (images.min() < 0 or images.max() > 1):
      raise ValueError(f"float images must lie in [0, 1], got {images.min()}..{images.max()}.")
  else:
    raise ValueError(f"images must be uint8 (0..255) or float in [0, 1], got {images.dtype}; "
                     "convert integer levels with launch.images.to_uint8(images, num_levels).")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images.astype(np.float32)


# =============================================================================================
# Inception-v3 (pytorch-fid's FID variant), NHWC, every BasicConv2d = conv -> BN(eps 1e-3) ->
# ReLU with BN folded into the conv at load time.
# =============================================================================================

class ConvSpec(NamedTuple):
  cin: int
  cout: int
  kernel: tuple[int, int]
  stride: int = 1
  same: bool = True  # pad by kernel // 2 (torchvision's explicit padding); else no padding


def _block_convs(kind: str, cin: int, arg: int = 0) -> dict[str, ConvSpec]:
  """The BasicConv2d layers of one torchvision Inception block, by attribute name."""
  c = ConvSpec
  if kind == "A":  # arg: pool_features
    return {"branch1x1": c(cin, 64, (1, 1)), "branch5x5_1": c(cin, 48, (1, 1)),
            "branch5x5_2": c(48, 64, (5, 5)), "branch3x3dbl_1": c(cin, 64, (1, 1)),
            "branch3x3dbl_2": c(64, 96, (3, 3)), "branch3x3dbl_3": c(96, 96, (3, 3)),
            "branch_pool": c(cin, arg, (1, 1))}
  if kind == "B":
    return {"branch3x3": c(cin, 384, (3, 3), 2, False), "branch3x3dbl_1": c(cin, 64, (1, 1)),
            "branch3x3dbl_2": c(64, 96, (3, 3)), "branch3x3dbl_3": c(96, 96, (3, 3), 2, False)}
  if kind == "C":  # arg: channels_7x7
    return {"branch1x1": c(cin, 192, (1, 1)), "branch7x7_1": c(cin, arg, (1, 1)),
            "branch7x7_2": c(arg, arg, (1, 7)), "branch7x7_3": c(arg, 192, (7, 1)),
            "branch7x7dbl_1": c(cin, arg, (1, 1)), "branch7x7dbl_2": c(arg, arg, (7, 1)),
            "branch7x7dbl_3": c(arg, arg, (1, 7)), "branch7x7dbl_4": c(arg, arg, (7, 1)),
            "branch7x7dbl_5": c(arg, 192, (1, 7)), "branch_pool": c(cin, 192, (1, 1))}
  if kind == "D":
    return {"branch3x3_1": c(cin, 192, (1, 1)), "branch3x3_2": c(192, 320, (3, 3), 2, False),
            "branch7x7x3_1": c(cin, 192, (1, 1)), "branch7x7x3_2": c(192, 192, (1, 7)),
            "branch7x7x3_3": c(192, 192, (7, 1)),
            "branch7x7x3_4": c(192, 192, (3, 3), 2, False)}
  if kind == "E":
    return {"branch1x1": c(cin, 320, (1, 1)), "branch3x3_1": c(cin, 384, (1, 1)),
            "branch3x3_2a": c(384, 384, (1, 3)), "branch3x3_2b": c(384, 384, (3, 1)),
            "branch3x3dbl_1": c(cin, 448, (1, 1)), "branch3x3dbl_2": c(448, 384, (3, 3)),
            "branch3x3dbl_3a": c(384, 384, (1, 3)), "branch3x3dbl_3b": c(384, 384, (3, 1)),
            "branch_pool": c(cin, 192, (1, 1))}
  raise ValueError(kind)


# (name, block kind, in channels, block argument) in forward order, after the stem.
INCEPTION_BLOCKS = (
    ("Mixed_5b", "A", 192, 32), ("Mixed_5c", "A", 256, 64), ("Mixed_5d", "A", 288, 64),
    ("Mixed_6a", "B", 288, 0),
    ("Mixed_6b", "C", 768, 128), ("Mixed_6c", "C", 768, 160), ("Mixed_6d", "C", 768, 160),
    ("Mixed_6e", "C", 768, 192),
    ("Mixed_7a", "D", 768, 0), ("Mixed_7b", "E", 1280, 0), ("Mixed_7c", "E", 2048, 0),
)
INCEPTION_STEM = {
    "Conv2d_1a_3x3": ConvSpec(3, 32, (3, 3), 2, False),
    "Conv2d_2a_3x3": ConvSpec(32, 32, (3, 3), 1, False),
    "Conv2d_2b_3x3": ConvSpec(32, 64, (3, 3)),
    "Conv2d_3b_1x1": ConvSpec(64, 80, (1, 1)),
    "Conv2d_4a_3x3": ConvSpec(80, 192, (3, 3), 1, False),
}
INCEPTION_CONVS: dict[str, ConvSpec] = dict(INCEPTION_STEM)
for _name, _kind, _cin, _arg in INCEPTION_BLOCKS:
  INCEPTION_CONVS.update({f"{_name}.{k}": v for k, v in _block_convs(_kind, _cin, _arg).items()})
BN_EPS = 1e-3  # torchvision BasicConv2d


def inception_tensor_shapes() -> dict[str, tuple[int, ...]]:
  """Every tensor the FID network reads: torchvision names -> PyTorch shapes (OIHW convs)."""
  shapes = {}
  for name, s in INCEPTION_CONVS.items():
    shapes[f"{name}.conv.weight"] = (s.cout, s.cin) + s.kernel
    for t in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.bn.{t}"] = (s.cout,)
  return shapes


def _fold_batchnorm(tensors: dict[str, np.ndarray], name: str):
  """conv (OIHW, no bias) + BN(running stats) -> (HWIO kernel, bias): one affine conv."""
  g = lambda t: np.asarray(tensors[f"{name}.{t}"], np.float64)
  scale = g("bn.weight") / np.sqrt(g("bn.running_var") + BN_EPS)
  kernel = g("conv.weight") * scale[:, None, None, None]
  bias = g("bn.bias") - g("bn.running_mean") * scale
  return (jnp.asarray(kernel.transpose(2, 3, 1, 0), jnp.float32),
          jnp.asarray(bias, jnp.float32))


def load_inception(weights_path) -> dict:
  """Reads and checks pytorch-fid's Inception weights (safetensors); returns folded params.

  Extra tensors in the file (fc.*, AuxLogits.*, bn.num_batches_tracked) are ignored.
  """
  _require_file(weights_path, f"FID Inception weights ({INCEPTION_FILE})", INCEPTION_HOWTO)
  tensors = _load_safetensors(weights_path)
  expected = inception_tensor_shapes()
  missing = [k for k in expected if k not in tensors]
  wrong = [f"{k}: {tensors[k].shape} != {v}" for k, v in expected.items()
           if k in tensors and tuple(tensors[k].shape) != v]
  if missing or wrong:
    raise ValueError(f"{weights_path} is not pytorch-fid's Inception state dict: "
                     f"{len(missing)} missing tensors {missing[:4]}, {len(wrong)} with wrong "
                     f"shapes {wrong[:4]}. {INCEPTION_HOWTO}")
  return {name: _fold_batchnorm(tensors, name) for name in INCEPTION_CONVS}


def _conv(params, name, x):
  """BasicConv2d with BN folded: relu(conv(x) + b), torchvision's stride and padding."""
  kernel, bias = params[name]
  spec = INCEPTION_CONVS[name]
  pad = [(k // 2, k // 2) if spec.same else (0, 0) for k in spec.kernel]
  y = jax.lax.conv_general_dilated(x, kernel, (spec.stride,) * 2, pad, precision=HIGHEST,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(y + bias)


def _max_pool(x, stride: int, pad: int):
  """3x3 max pool (torch pads max pools with -inf)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               [(0, 0), (pad, pad), (pad, pad), (0, 0)])


def _avg_pool_exclude_pad(x):
  """3x3 stride-1 average pool over valid pixels only (count_include_pad=False, the FID
  patch: TensorFlow's average pool does not count the zero padding)."""
  window = lambda v: jax.lax.reduce_window(v, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                                           [(0, 0), (1, 1), (1, 1), (0, 0)])
  return window(x) / window(jnp.ones_like(x[..., :1]))


def _inception_block(params, name: str, kind: str, x):
  """One Mixed block; branch outputs are concatenated in torchvision's order."""
  c = lambda sub, h: _conv(params, f"{name}.{sub}", h)
  if kind == "A":
    return jnp.concatenate([
        c("branch1x1", x),
        c("branch5x5_2", c("branch5x5_1", x)),
        c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
        c("branch_pool", _avg_pool_exclude_pad(x))], axis=-1)
  if kind == "B":
    return jnp.concatenate([
        c("branch3x3", x),
        c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
        _max_pool(x, 2, 0)], axis=-1)
  if kind == "C":
    b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
    d7 = x
    for i in range(1, 6):
      d7 = c(f"branch7x7dbl_{i}", d7)
    return jnp.concatenate([c("branch1x1", x), b7, d7,
                            c("branch_pool", _avg_pool_exclude_pad(x))], axis=-1)
  if kind == "D":
    b7 = x
    for i in range(1, 5):
      b7 = c(f"branch7x7x3_{i}", b7)
    return jnp.concatenate([c("branch3x3_2", c("branch3x3_1", x)), b7, _max_pool(x, 2, 0)],
                           axis=-1)
  if kind == "E":  # Mixed_7b pools by average (FIDInceptionE_1), Mixed_7c by max (E_2)
    b3 = c("branch3x3_1", x)
    d3 = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
    pool = _max_pool(x, 1, 1) if name == "Mixed_7c" else _avg_pool_exclude_pad(x)
    return jnp.concatenate([
        c("branch1x1", x),
        c("branch3x3_2a", b3), c("branch3x3_2b", b3),
        c("branch3x3dbl_3a", d3), c("branch3x3dbl_3b", d3),
        c("branch_pool", pool)], axis=-1)
  raise ValueError(kind)


def resize_bilinear(x, size: int):
  """[N, H, W, C] -> [N, size, size, C], as torch interpolate(bilinear, align_corners=False)."""
  n, _, _, ch = x.shape
  return jax.image.resize(x, (n, size, size, ch), "bilinear", antialias=False)


@jax.jit
def inception_pool3(params, images):
  """Pool3 features [N, 2048] of RGB images [N, H, W, 3] in [0, 1] (pytorch-fid's block 3)."""
  x = 2.0 * resize_bilinear(images, 299) - 1.0
  for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
    x = _conv(params, name, x)
  x = _max_pool(x, 2, 0)
  x = _conv(params, "Conv2d_4a_3x3", _conv(params, "Conv2d_3b_1x1", x))
  x = _max_pool(x, 2, 0)
  for name, kind, _, _ in INCEPTION_BLOCKS:
    x = _inception_block(params, name, kind, x)
  return x.mean(axis=(1, 2))  # adaptive average pool to 1x1


@functools.lru_cache(maxsize=2)
def _cached_inception(path: str, mtime: float):
  del mtime  # part of the cache key only: a rewritten file is read again
  return load_inception(path)


def _batched(fn, images: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over fixed-size batches (the last one padded) so that one compilation serves all."""
  outs = []
  for i in range(0, len(images), batch_size):
    batch = images[i:i + batch_size]
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
    outs.append(np.asarray(fn(jnp.asarray(batch)))[:batch_size - pad])
  return np.concatenate(outs).astype(np.float64)


def check_inception_file(weights_path) -> str:
  """The path, or FileNotFoundError naming it and how to make it (call before long runs)."""
  return _require_file(weights_path, f"FID Inception weights ({INCEPTION_FILE})",
                       INCEPTION_HOWTO)


def inception_features(images, weights_path, batch_size: int = 50) -> np.ndarray:
  """Inception-v3 pool3 features [N, 2048] (float64) of uint8 or [0, 1] float images."""
  check_inception_file(weights_path)
  params = _cached_inception(os.path.abspath(weights_path), os.path.getmtime(weights_path))
  images = to_unit_images(images)
  return _batched(functools.partial(inception_pool3, params), images,
                  min(batch_size, len(images)))


def fid_from_images(images_a, images_b, weights_path, batch_size: int = 50) -> float:
  """FID between two image sets (uint8 or [0, 1] float, [N, H, W, 1 or 3]).

  Biased upwards at small N like every Fréchet distance (quality.frechet_distance); the
  standard protocol uses 50,000 samples, and numbers are comparable only at equal N.
  """
  return quality.frechet_distance(inception_features(images_a, weights_path, batch_size),
                                  inception_features(images_b, weights_path, batch_size))


# =============================================================================================
# CLIP (Radford et al. 2021) in Hugging Face CLIPModel's layout: ViT image tower and causal
# text transformer, both pre-LN, pooled (class token / end-of-text token) and projected.
# =============================================================================================

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class ClipTowerConfig(NamedTuple):
  num_heads: int
  layer_norm_eps: float
  hidden_act: str


def _tower_config(config: dict, hidden: int, default_heads: int) -> ClipTowerConfig:
  act = config.get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise ValueError(f"unsupported CLIP activation {act!r}; supported: quick_gelu, gelu.")
  return ClipTowerConfig(int(config.get("num_attention_heads", default_heads)),
                         float(config.get("layer_norm_eps", 1e-5)), act)


def _linear(tensors, name, bias: bool = True):
  """torch Linear [out, in] (+ bias) -> (kernel [in, out], bias or None)."""
  w = jnp.asarray(tensors[f"{name}.weight"].T, jnp.float32)
  return (w, jnp.asarray(tensors[f"{name}.bias"], jnp.float32) if bias else None)


def _norm(tensors, name):
  return (jnp.asarray(tensors[f"{name}.weight"], jnp.float32),
          jnp.asarray(tensors[f"{name}.bias"], jnp.float32))


def _encoder_layers(tensors, prefix) -> list[dict]:
  layers = []
  while f"{prefix}.encoder.layers.{len(layers)}.layer_norm1.weight" in tensors:
    p = f"{prefix}.encoder.layers.{len(layers)}"
    layers.append({
        "ln1": _norm(tensors, f"{p}.layer_norm1"), "ln2": _norm(tensors, f"{p}.layer_norm2"),
        **{k: _linear(tensors, f"{p}.self_attn.{k}_proj") for k in ("q", "k", "v", "out")},
        "fc1": _linear(tensors, f"{p}.mlp.fc1"), "fc2": _linear(tensors, f"{p}.mlp.fc2")})
  if not layers:
    raise ValueError(f"no {prefix}.encoder.layers.* tensors found: not a CLIPModel file.")
  return layers


def load_clip(weights_path) -> tuple[dict, dict]:
  """Reads CLIPModel weights (model.safetensors) and config.json beside it, if present.

  Returns (params, configs) with configs {"vision": ClipTowerConfig, "text": ...}. Without
  config.json, heads default to hidden_size // 64 (true of the released CLIP models).
  """
  _require_file(weights_path, "CLIP weights (model.safetensors)", CLIP_HOWTO)
  tensors = _load_safetensors(weights_path)
  config_path = os.path.join(os.path.dirname(os.path.abspath(weights_path)), "config.json")
  config = {}
  if os.path.isfile(config_path):
    with open(config_path) as f:
      config = json.load(f)
  try:
    params = {
        "vision": {
            "patch": jnp.asarray(
                tensors["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
                jnp.float32),
            "cls": jnp.asarray(tensors["vision_model.embeddings.class_embedding"], jnp.float32),
            "pos": jnp.asarray(tensors["vision_model.embeddings.position_embedding.weight"],
                               jnp.float32),
            "pre_ln": _norm(tensors, "vision_model.pre_layrnorm"),  # sic, HF's name
            "layers": _encoder_layers(tensors, "vision_model"),
            "post_ln": _norm(tensors, "vision_model.post_layernorm"),
            "proj": _linear(tensors, "visual_projection", bias=False)[0]},
        "text": {
            "tok": jnp.asarray(tensors["text_model.embeddings.token_embedding.weight"],
                               jnp.float32),
            "pos": jnp.asarray(tensors["text_model.embeddings.position_embedding.weight"],
                               jnp.float32),
            "layers": _encoder_layers(tensors, "text_model"),
            "final_ln": _norm(tensors, "text_model.final_layer_norm"),
            "proj": _linear(tensors, "text_projection", bias=False)[0]},
    }
  except KeyError as e:
    raise ValueError(f"{weights_path} lacks tensor {e}: not a Hugging Face CLIPModel "
                     f"safetensors file. {CLIP_HOWTO}") from None
  configs = {
      "vision": _tower_config(config.get("vision_config", {}), params["vision"]["cls"].shape[0],
                              params["vision"]["cls"].shape[0] // 64),
      "text": _tower_config(config.get("text_config", {}), params["text"]["tok"].shape[1],
                            params["text"]["tok"].shape[1] // 64)}
  return params, configs


def _layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p[0] + p[1]


def _dense(x, p):
  w, b = p
  y = jnp.einsum("...i,io->...o", x, w, precision=HIGHEST)
  return y if b is None else y + b


def _transformer(layers, x, cfg: ClipTowerConfig, causal: bool):
  """Pre-LN encoder: x += attn(LN1(x)); x += mlp(LN2(x)); MLP act quick_gelu x*sigmoid(1.702x)."""
  n, length, width = x.shape
  head_dim = width // cfg.num_heads
  mask = jnp.tril(jnp.ones((length, length), bool)) if causal else None
  act = ((lambda h: h * jax.nn.sigmoid(1.702 * h)) if cfg.hidden_act == "quick_gelu"
         else functools.partial(jax.nn.gelu, approximate=False))
  split = lambda h: h.reshape(n, length, cfg.num_heads, head_dim)
  for p in layers:
    h = _layer_norm(x, p["ln1"], cfg.layer_norm_eps)
    q, k, v = (split(_dense(h, p[name])) for name in ("q", "k", "v"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) / np.sqrt(head_dim)
    if mask is not None:
      logits = jnp.where(mask, logits, -jnp.inf)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, precision=HIGHEST)
    x = x + _dense(attn.reshape(n, length, width), p["out"])
    h = _layer_norm(x, p["ln2"], cfg.layer_norm_eps)
    x = x + _dense(act(_dense(h, p["fc1"])), p["fc2"])
  return x


@functools.partial(jax.jit, static_argnums=(1,))
def clip_image_embeds(params, cfg: ClipTowerConfig, pixels):
  """Projected image embeddings [N, P] of CLIP-normalised pixels [N, S, S, 3] (NHWC)."""
  patch = params["patch"].shape[0]
  x = jax.lax.conv_general_dilated(pixels, params["patch"], (patch, patch), "VALID",
                                   precision=HIGHEST, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = x.reshape(x.shape[0], -1, x.shape[-1])  # patches in row-major order, as torch flatten
  cls = jnp.broadcast_to(params["cls"], (x.shape[0], 1, x.shape[-1]))
  x = jnp.concatenate([cls, x], axis=1) + params["pos"]
  x = _layer_norm(x, params["pre_ln"], cfg.layer_norm_eps)
  x = _transformer(params["layers"], x, cfg, causal=False)
  pooled = _layer_norm(x[:, 0], params["post_ln"], cfg.layer_norm_eps)
  return jnp.einsum("bd,dp->bp", pooled, params["proj"], precision=HIGHEST)


@functools.partial(jax.jit, static_argnums=(1, 3))
def clip_text_embeds(params, cfg: ClipTowerConfig, token_ids, eot_id: int):
  """Projected text embeddings [N, P] of token ids [N, L], pooled at the first end-of-text."""
  length = token_ids.shape[1]
  x = params["tok"][token_ids] + params["pos"][:length]
  x = _transformer(params["layers"], x, cfg, causal=True)
  x = _layer_norm(x, params["final_ln"], cfg.layer_norm_eps)
  eot = jnp.argmax(token_ids == eot_id, axis=1)
  return jnp.einsum("bd,dp->bp", x[jnp.arange(x.shape[0]), eot], params["proj"],
                    precision=HIGHEST)


def clip_preprocess(images, image_size: int) -> np.ndarray:
  """[N, H, W, C] images -> CLIP input: shortest side resized to `image_size` (bicubic,
  antialiased), centre crop, mean/std normalisation. HF's CLIPImageProcessor does the same
  with PIL on uint8, so pixels differ from it by interpolation rounding only."""
  x = to_unit_images(images)
  n, h, w, _ = x.shape
  # the short side becomes image_size, the long side int(image_size * long / short) (HF's rule)
  nh, nw = ((image_size, int(image_size * w / h)) if h <= w
            else (int(image_size * h / w), image_size))
  x = jax.image.resize(jnp.asarray(x), (n, nh, nw, 3), "bicubic", antialias=True)
  top, left = (nh - image_size) // 2, (nw - image_size) // 2
  x = jnp.clip(x[:, top:top + image_size, left:left + image_size], 0.0, 1.0)
  return np.array((x - CLIP_MEAN) / CLIP_STD, np.float32)  # a writable copy


# --- CLIP's byte-level BPE tokenizer -----------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


_CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
                 r"|[^\s\p{L}\p{N}]+")


class ClipTokenizer:
  """CLIP's tokenizer from a Hugging Face snapshot's vocab.json and merges.txt.

  Matches transformers' CLIPTokenizer: NFC, whitespace collapsed, lower case; words split by
  CLIP's pattern; bytes mapped to unicode; BPE with "</w>" marking a word's end; ids framed
  by <|startoftext|> ... <|endoftext|> and padded with <|endoftext|>.
  """

  def __init__(self, tokenizer_path):
    folder = tokenizer_path if os.path.isdir(str(tokenizer_path)) else None
    for name in ("vocab.json", "merges.txt"):
      _require_file(os.path.join(folder, name) if folder else None,
                    f"CLIP tokenizer file {name} (in folder {tokenizer_path!r})", CLIP_HOWTO)
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
      self.vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
      lines = [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#version")]
    self.ranks = {tuple(l.split()): i for i, l in enumerate(lines)}
    self.byte_chars = _bytes_to_unicode()
    self.bos_id = self.vocab["<|startoftext|>"]
    self.eot_id = self.vocab["<|endoftext|>"]
    try:
      import regex  # pylint: disable=g-import-not-at-top  (\p{L} classes; ships with transformers)
      self._split = regex.compile(_CLIP_PATTERN).findall
    except ImportError:  # re has no \p{..}: letters = [^\W\d_], numbers = \d (same for ASCII)
      import re  # pylint: disable=g-import-not-at-top
      self._split = re.compile(_CLIP_PATTERN.replace(r"[\p{L}]+", r"[^\W\d_]+")
                               .replace(r"[\p{N}]", r"\d")
                               .replace(r"[^\s\p{L}\p{N}]+", r"(?:[^\s\w]|_)+")).findall

  def _bpe(self, word: str) -> list[str]:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      pairs = [(self.ranks.get(p, np.inf), i) for i, p in enumerate(zip(parts, parts[1:]))]
      rank, i = min(pairs)
      if rank == np.inf:
        break
      parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without the start/end tokens."""
    text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
    ids = []
    for word in self._split(text):
      if word in ("<|startoftext|>", "<|endoftext|>"):
        ids.append(self.vocab[word])
        continue
      mapped = "".join(self.byte_chars[b] for b in word.encode("utf-8"))
      ids.extend(self.vocab.get(t, self.eot_id) for t in self._bpe(mapped))  # unk = eot, as HF
    return ids

  def __call__(self, texts, context_length: int) -> np.ndarray:
    """[N, context_length] int32 ids: bos, tokens (truncated), eot, eot padding."""
    out = np.full((len(texts), context_length), self.eot_id, np.int32)
    for i, text in enumerate(texts):
      ids = [self.bos_id] + self.encode(text)[:context_length - 2] + [self.eot_id]
      out[i, :len(ids)] = ids
    return out


@functools.lru_cache(maxsize=2)
def _cached_clip(path: str, mtime: float):
  del mtime
  return load_clip(path)


def clip_embeddings(images, texts, weights_path, tokenizer_path, batch_size: int = 64):
  """(image embeddings [N, P], text embeddings [N, P]), both L2-normalised, float64."""
  _require_file(weights_path, "CLIP weights (model.safetensors)", CLIP_HOWTO)
  tokenizer = ClipTokenizer(tokenizer_path)
  params, cfg = _cached_clip(os.path.abspath(weights_path), os.path.getmtime(weights_path))
  patch = params["vision"]["patch"].shape[0]
  image_size = patch * int(round(np.sqrt(params["vision"]["pos"].shape[0] - 1)))
  pixels = clip_preprocess(images, image_size)
  ids = tokenizer(list(texts), params["text"]["pos"].shape[0])
  n = min(batch_size, len(pixels))
  img = _batched(lambda x: clip_image_embeds(params["vision"], cfg["vision"], x), pixels, n)
  txt = _batched(lambda t: clip_text_embeds(params["text"], cfg["text"], t, tokenizer.eot_id),
                 ids, min(batch_size, len(ids)))
  normalise = lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True)
  return normalise(img), normalise(txt)


def clip_score(images, texts, weights_path, tokenizer_path, batch_size: int = 64) -> float:
  """Mean over pairs of max(100 * cos(image_i, text_i), 0) (CLIPScore, torchmetrics' scale).

  images: uint8 or [0, 1] float [N, H, W, 1 or 3]; texts: N strings (the prompts).
  """
  if len(texts) != len(np.asarray(images)):
    raise ValueError(f"got {len(np.asarray(images))} images but {len(texts)} texts; "
                     "clip_score pairs image i with text i.")
  img, txt = clip_embeddings(images, texts, weights_path, tokenizer_path, batch_size)
  return float(np.mean(np.maximum(100.0 * np.sum(img * txt, axis=-1), 0.0)))
