"""Cached embeddings and the frozen encoder run in the step give the same conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen import t5, text_conditioning, tokenizer as tokenizer_lib
from launch import text_encoder as text_encoder_lib
from launch.data import digits, text_cache


def test_cache_and_in_step_encoder_agree(tmp_path):
  tok = tokenizer_lib.default_tokenizer(max_length=16)
  encoder = t5.T5Encoder(t5.T5Config.preset("tiny"), rngs=nnx.Rngs(0))
  source = digits.DigitsSource("test", with_captions=True)
  text_encoder = text_encoder_lib.t5_text_encoder(encoder, tok, {"name": "tiny-test"})

  class First8:
    def __init__(self, s):
      self.s, self.num_levels, self.num_classes, self.image_shape = (
          s, s.num_levels, s.num_classes, s.image_shape)
    def __len__(self):
      return 8
    def __getitem__(self, i):
      return self.s[i]
    def caption(self, i):
      return self.s[i]["caption"]
    def __repr__(self):
      return "First8(digits test)"

  small = First8(source)
  text_cache.encode_split(small, str(tmp_path), "test", text_encoder, captions_name="digits",
                          process_index=0, process_count=1, batch_size=4)
  cached = text_cache.WithTextEmbeddings(small, text_cache.EmbeddingCache(str(tmp_path), "test"))
  tokenize = text_conditioning.Tokenize(tok)
  examples = [tokenize(cached[i]) for i in range(8)]
  batch = {k: np.stack([e[k] for e in examples]) for k in
           ("text_emb", "text_mask", "input_ids", "attention_mask")}

  emb_cached, mask_cached = text_conditioning.text_embeddings(
      {"text_emb": batch["text_emb"], "text_mask": batch["text_mask"]})
  emb_step, mask_step = text_conditioning.text_embeddings(
      {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, encoder)
  np.testing.assert_array_equal(mask_cached, mask_step)
  # The cache stores bf16: equal to the float32 encoder up to bf16 rounding.
  np.testing.assert_allclose(emb_cached, emb_step, rtol=1e-2, atol=1e-2)
  assert float(jnp.abs(emb_step * (1 - mask_step[..., None])).max()) == 0.0
  # The encoder is frozen: no gradient reaches its parameters.
  graphdef, state = nnx.split(encoder)
  grads = jax.grad(lambda s: jnp.sum(text_conditioning.text_embeddings(
      {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
      nnx.merge(graphdef, s))[0]))(state)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_clear_errors():
  with pytest.raises(ValueError, match="encode_text"):
    text_conditioning.text_embeddings({"image": np.zeros((1, 8, 8, 1))})
  with pytest.raises(ValueError, match="no text encoder"):
    text_conditioning.text_embeddings({"input_ids": np.zeros((1, 4), np.int32),
                                       "attention_mask": np.ones((1, 4), np.int32)})


def test_t5x_spec_needs_a_tokenizer():
  with pytest.raises(ValueError, match="--tokenizer"):
    text_encoder_lib.load_text_encoder("t5x:/nonexistent@tiny")
