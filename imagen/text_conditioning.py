"""Text conditioning inside a training or sampling step: cached embeddings, or the frozen T5.

Two ways to get the text embedding of a batch, chosen by what the batch carries:
  - "text_emb", "text_mask": embeddings precomputed once by `python -m launch.encode_text`
    and read with `launch.data.text_cache.WithTextEmbeddings` (the fast path; imagen-pytorch
    users found on-the-fly encoding dominating step time);
  - "input_ids", "attention_mask": tokens (from `Tokenize` in the input pipeline), encoded
    in the step by a frozen T5 encoder (gradients stopped).
Either way the result is float32 embeddings, zero at padding, and the mask.
"""

import jax
import jax.numpy as jnp
import numpy as np


class Tokenize:
  """Input-pipeline transform: example["caption"] -> example["input_ids"], ["attention_mask"].

  A plain callable on dicts (launch.data.pipeline.make_loader accepts those); picklable when
  the tokenizer is (imagen.tokenizer.T5Tokenizer is), so grain workers can run it.
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, example: dict) -> dict:
    tokens = self.tokenizer([example["caption"]])
    out = dict(example)
    out["input_ids"] = np.asarray(tokens["input_ids"][0], np.int32)
    out["attention_mask"] = np.asarray(tokens["attention_mask"][0], np.int32)
    return out


def text_embeddings(batch: dict, encoder=None):
  """(emb float32 [B, L, d] zero at padding, mask int32 [B, L]) for a batch; see module doc."""
  if "text_emb" in batch:
    mask = jnp.asarray(batch["text_mask"]).astype(jnp.int32)
    emb = jnp.asarray(batch["text_emb"]).astype(jnp.float32)
    return emb * mask[..., None], mask
  if "input_ids" not in batch:
    raise ValueError("the batch carries neither cached text embeddings ('text_emb', "
                     "'text_mask') nor tokens ('input_ids', 'attention_mask'): add "
                     "imagen.text_conditioning.Tokenize to the input pipeline or read a cache "
                     "made by `python -m launch.encode_text`")
  if encoder is None:
    raise ValueError("the batch carries tokens but no text encoder was given to encode them; "
                     "pass the frozen T5 encoder or use cached embeddings")
  mask = jnp.asarray(batch["attention_mask"]).astype(jnp.int32)
  emb = jax.lax.stop_gradient(encoder(batch["input_ids"], mask)).astype(jnp.float32)
  return emb * mask[..., None], mask
