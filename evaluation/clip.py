"""CLIP score with the CLIP towers of a Hugging Face CLIPModel snapshot the user provides.

CLIP score (Hessel et al. 2021; torchmetrics' convention): mean over (image, text) pairs of
max(100 * cos(E_image, E_text), 0), with the CLIP towers of a Hugging Face CLIPModel snapshot
(e.g. `openai/clip-vit-base-patch32`: model.safetensors, config.json, vocab.json, merges.txt).
Both towers are implemented here, the byte-level BPE tokenizer in clip_tokenizer.py. Nothing
downloads: a missing file raises FileNotFoundError naming the file and how to get it.
"""

import functools
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from evaluation import pretrained
from evaluation.clip_tokenizer import CLIP_HOWTO, ClipTokenizer

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
  pretrained.require_file(weights_path, "CLIP weights (model.safetensors)", CLIP_HOWTO)
  tensors = pretrained.load_safetensors(weights_path)
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
  y = jnp.einsum("...i,io->...o", x, w, precision=pretrained.HIGHEST)
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
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        precision=pretrained.HIGHEST) / np.sqrt(head_dim)
    if mask is not None:
      logits = jnp.where(mask, logits, -jnp.inf)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v,
                      precision=pretrained.HIGHEST)
    x = x + _dense(attn.reshape(n, length, width), p["out"])
    h = _layer_norm(x, p["ln2"], cfg.layer_norm_eps)
    x = x + _dense(act(_dense(h, p["fc1"])), p["fc2"])
  return x


@functools.partial(jax.jit, static_argnums=(1,))
def clip_image_embeds(params, cfg: ClipTowerConfig, pixels):
  """Projected image embeddings [N, P] of CLIP-normalised pixels [N, S, S, 3] (NHWC)."""
  patch = params["patch"].shape[0]
  x = jax.lax.conv_general_dilated(pixels, params["patch"], (patch, patch), "VALID",
                                   precision=pretrained.HIGHEST,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = x.reshape(x.shape[0], -1, x.shape[-1])  # patches in row-major order, as torch flatten
  cls = jnp.broadcast_to(params["cls"], (x.shape[0], 1, x.shape[-1]))
  x = jnp.concatenate([cls, x], axis=1) + params["pos"]
  x = _layer_norm(x, params["pre_ln"], cfg.layer_norm_eps)
  x = _transformer(params["layers"], x, cfg, causal=False)
  pooled = _layer_norm(x[:, 0], params["post_ln"], cfg.layer_norm_eps)
  return jnp.einsum("bd,dp->bp", pooled, params["proj"], precision=pretrained.HIGHEST)


@functools.partial(jax.jit, static_argnums=(1, 3))
def clip_text_embeds(params, cfg: ClipTowerConfig, token_ids, eot_id: int):
  """Projected text embeddings [N, P] of token ids [N, L], pooled at the first end-of-text."""
  length = token_ids.shape[1]
  x = params["tok"][token_ids] + params["pos"][:length]
  x = _transformer(params["layers"], x, cfg, causal=True)
  x = _layer_norm(x, params["final_ln"], cfg.layer_norm_eps)
  eot = jnp.argmax(token_ids == eot_id, axis=1)
  return jnp.einsum("bd,dp->bp", x[jnp.arange(x.shape[0]), eot], params["proj"],
                    precision=pretrained.HIGHEST)


def clip_preprocess(images, image_size: int) -> np.ndarray:
  """[N, H, W, C] images -> CLIP input: shortest side resized to `image_size` (bicubic,
  antialiased), centre crop, mean/std normalisation. HF's CLIPImageProcessor does the same
  with PIL on uint8, so pixels differ from it by interpolation rounding only."""
  x = pretrained.to_unit_images(images)
  n, h, w, _ = x.shape
  # the short side becomes image_size, the long side int(image_size * long / short) (HF's rule)
  nh, nw = ((image_size, int(image_size * w / h)) if h <= w
            else (int(image_size * h / w), image_size))
  x = jax.image.resize(jnp.asarray(x), (n, nh, nw, 3), "bicubic", antialias=True)
  top, left = (nh - image_size) // 2, (nw - image_size) // 2
  x = jnp.clip(x[:, top:top + image_size, left:left + image_size], 0.0, 1.0)
  return np.array((x - CLIP_MEAN) / CLIP_STD, np.float32)  # a writable copy


@functools.lru_cache(maxsize=2)
def _cached_clip(path: str, mtime: float):
  del mtime
  return load_clip(path)


def clip_embeddings(images, texts, weights_path, tokenizer_path, batch_size: int = 64):
  """(image embeddings [N, P], text embeddings [N, P]), both L2-normalised, float64."""
  pretrained.require_file(weights_path, "CLIP weights (model.safetensors)", CLIP_HOWTO)
  tokenizer = ClipTokenizer(tokenizer_path)
  params, cfg = _cached_clip(os.path.abspath(weights_path), os.path.getmtime(weights_path))
  patch = params["vision"]["patch"].shape[0]
  image_size = patch * int(round(np.sqrt(params["vision"]["pos"].shape[0] - 1)))
  pixels = clip_preprocess(images, image_size)
  ids = tokenizer(list(texts), params["text"]["pos"].shape[0])
  n = min(batch_size, len(pixels))
  img = pretrained.batched(lambda x: clip_image_embeds(params["vision"], cfg["vision"], x),
                           pixels, n)
  txt = pretrained.batched(
      lambda t: clip_text_embeds(params["text"], cfg["text"], t, tokenizer.eot_id),
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
