"""Rebuild the offline tokenizer asset (imagen/assets/digits_spm.model) from the captions of
the embedded data: the digits and the moving digits.

  python -m launch.tokenizer_asset

The offline default tokenizer (imagen.tokenizer.default_tokenizer) is a small sentencepiece
model trained on every phrasing of every digit caption (launch.data.digits) and every
moving-digits caption (launch.data.moving_digits), so the motion words ("left", "bouncing",
"sliding") are pieces of their own, as the digit words are, rather than spelled out letter
by letter for the text encoder to reassemble. The captions
live on the data side (launch/) and the sentencepiece trainer in the library (imagen/,
which never imports launch/), so this command joins them. Run it after changing the
caption templates; tests/test_tokenizer.py checks that the shipped asset equals a fresh
build.
"""

import logging
import os

from imagen import tokenizer as tok_lib
from launch.data import digits, moving_digits


def digits_caption_corpus() -> list[str]:
  """Every phrasing of every digit caption (launch.data.digits) and of every moving-digits
  caption (each digit with each motion, launch.data.moving_digits): the offline corpus."""
  still = [c for label in range(digits.NUM_CLASSES) for c in digits.caption_phrasings(label)]
  moving = [c for label in range(digits.NUM_CLASSES)
            for direction in range(len(moving_digits.DIRECTIONS))
            for c in moving_digits.caption_phrasings(label, direction)]
  return still + moving


def main():
  logging.basicConfig(level=logging.INFO)
  written = tok_lib.regenerate_default_asset(digits_caption_corpus())
  logging.info("Wrote %s (%d bytes, %d pieces)", written, os.path.getsize(written),
               tok_lib.T5Tokenizer(written).vocab_size)


if __name__ == "__main__":
  main()
