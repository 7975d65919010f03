"""Rebuild the offline tokenizer asset (imagen/assets/digits_spm.model) from the digits captions.

  python -m launch.tokenizer_asset

The offline default tokenizer (imagen.tokenizer.default_tokenizer) is a small sentencepiece
model trained on every phrasing of every digit caption (launch.data.digits). The captions
live on the data side (launch/) and the sentencepiece trainer in the library (imagen/,
which never imports launch/), so this command joins them. Run it after changing the
caption templates; tests/test_tokenizer.py checks that the shipped asset equals a fresh
build.
"""

import logging
import os

from imagen import tokenizer as tok_lib
from launch.data import digits


def digits_caption_corpus() -> list[str]:
  """Every phrasing of every digit caption (launch.data.digits), the offline corpus."""
  return [c for label in range(digits.NUM_CLASSES) for c in digits.caption_phrasings(label)]


def main():
  logging.basicConfig(level=logging.INFO)
  written = tok_lib.regenerate_default_asset(digits_caption_corpus())
  logging.info("Wrote %s (%d bytes, %d pieces)", written, os.path.getsize(written),
               tok_lib.T5Tokenizer(written).vocab_size)


if __name__ == "__main__":
  main()
