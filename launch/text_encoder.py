"""Frozen T5 text encoders for Imagen: captions -> (embeddings, mask), from checkpoints or presets.

`load_text_encoder(spec)` builds a `TextEncoder` (tokenizer + jitted frozen encoder) from
  "hf:/dir"            a Hugging Face T5 v1.1 checkpoint (config.json, safetensors, spiece.model);
  "t5x:/dir@preset"    a T5X checkpoint of that size (with tokenizer=PATH: T5X ships none);
  a preset name        ("tiny", "small", ...) a RANDOMLY INITIALISED encoder.
Imagen keeps T5 frozen (Saharia et al. 2022, sec. 2.1). A TextEncoder rounds its embeddings
to bfloat16 for the text-embedding cache (launch.data.text_cache), and its `identity` records
which model and vocabulary made them; `module=True` gives the raw (T5Encoder, tokenizer) pair
instead, for running the frozen encoder inside a train step.

OFFLINE DEFAULT: the preset "tiny" is a RANDOMLY INITIALISED tiny T5 encoder with the offline
digits tokenizer (imagen.tokenizer.default_tokenizer). It runs with no download and is
logged as such; its embeddings identify a caption but carry no language knowledge.
"""

import dataclasses
import hashlib
import json
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen import t5
from imagen import t5_checkpoints
from imagen import tokenizer as tok_lib

RANDOM_WARNING = ("OFFLINE DEFAULT: randomly initialised T5 encoder (preset {preset!r}, "
                  "seed {seed}), not pretrained: embeddings carry no language knowledge")


@dataclasses.dataclass
class TextEncoder:
  """A tokenizer and a frozen encoder: captions -> (emb [B, L, d], mask [B, L]).

  `embed(input_ids, attention_mask)` returns the embeddings (numpy, float32 or bfloat16),
  zero at padding; `identity`
  is a JSON-able description stored in the manifest (a cache is only resumed or read
  with the same identity).
  """
  tokenizer: object
  embed: Callable[[np.ndarray, np.ndarray], np.ndarray]
  d_model: int
  identity: dict

  @property
  def max_length(self) -> int:
    return self.tokenizer.max_length

  def __call__(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tokens = self.tokenizer(captions)
    emb = self.embed(tokens["input_ids"], tokens["attention_mask"])
    return np.asarray(emb), tokens["attention_mask"]


def _sha256_json(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _checkpoint_fingerprint(directory: str) -> str:
  """sha256 of config.json and the safetensors files' names and sizes: cheap, and tells
  checkpoints of the same shape apart unless they are the same size to the byte."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name == "config.json":
      with open(path, "rb") as f:
        h.update(f.read())
    elif name.endswith(".safetensors"):
      h.update(f"{name}:{os.path.getsize(path)};".encode())
  return h.hexdigest()


def t5_text_encoder(encoder, tokenizer, identity: dict) -> TextEncoder:
  """Wraps an imagen.t5.T5Encoder: one jitted function, embeddings rounded to bf16."""
  graphdef, state = nnx.split(encoder)

  @jax.jit
  def embed(state, ids, mask):
    emb, _ = t5.encode(nnx.merge(graphdef, state), ids, mask)
    return emb.astype(jnp.bfloat16)

  config = encoder.config
  identity = dict(identity, config_sha256=_sha256_json(dataclasses.asdict(config)))
  if config.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the encoder embeds "
                     f"only {config.vocab_size}: they do not belong together")
  identity = dict(identity, tokenizer_sha256=tokenizer.sha256,
                  max_length=tokenizer.max_length)

  def embed_numpy(ids, mask):
    return np.asarray(jax.device_get(embed(state, ids, mask)))

  return TextEncoder(tokenizer, embed_numpy, int(config.d_model), identity)


def load_text_encoder(spec: str, *, max_length: int = 128, tokenizer: str | None = None,
                      seed: int = 0, module: bool = False):
  """A TextEncoder from "hf:/dir" (a Hugging Face T5 checkpoint), "t5x:/dir@preset" (a T5X
  checkpoint of that size, e.g. t5x:/ckpts/t5_1_1_xxl/checkpoint_1000000@xxl) or a preset name.

  A preset ("tiny", "small", ...) is a RANDOM encoder, logged as the offline default;
  its tokenizer defaults to the offline digits vocabulary. A checkpoint's tokenizer
  defaults to its directory's spiece.model. `tokenizer` ("default" or a path) overrides.
  With module=True, returns (T5Encoder module, tokenizer) instead of a TextEncoder.
  """
  if spec.startswith("hf:"):
    directory = spec[len("hf:"):]
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"T5 checkpoint directory {directory!r} not found (--t5 "
                              "hf:/dir wants a Hugging Face T5 directory with config.json, "
                              "safetensors weights and spiece.model)")
    _, encoder = t5_checkpoints.load_hf(directory)
    tok = tok_lib.load_tokenizer(tokenizer or directory, max_length)
    identity = {"t5": f"hf:{os.path.basename(os.path.normpath(directory))}", "random": False,
                "files": _checkpoint_fingerprint(directory)}
  elif spec.startswith("t5x:"):
    path, _, preset = spec[len("t5x:"):].partition("@")
    if not tokenizer:
      raise ValueError("a T5X checkpoint has no tokenizer beside it: pass --tokenizer "
                       "/path/to/spiece.model (e.g. gs://t5-data/vocabs/cc_all.32000/"
                       "sentencepiece.model copied locally)")
    encoder = t5_checkpoints.load_t5x(path, t5.T5Config.preset(preset or "xxl"))
    tok = tok_lib.load_tokenizer(tokenizer, max_length)
    identity = {"t5": f"t5x:{os.path.basename(os.path.normpath(path))}@{preset or 'xxl'}",
                "random": False}
  else:
    config = t5.T5Config.preset(spec)  # raises on unknown names
    logging.warning(RANDOM_WARNING.format(preset=spec, seed=seed))
    encoder = t5.T5Encoder(config, rngs=nnx.Rngs(seed))
    tok = tok_lib.load_tokenizer(tokenizer or "default", max_length)
    identity = {"t5": spec, "seed": int(seed), "random": True}
  if module:   # the raw (T5Encoder, tokenizer), for running the encoder inside a step
    return encoder, tok
  return t5_text_encoder(encoder, tok, identity)
