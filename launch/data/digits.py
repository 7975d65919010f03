"""scikit-learn's bundled handwritten digits: the offline default data set.

`sklearn.datasets.load_digits` ships 1,797 greyscale images of 8x8 pixels whose values are
the integers 0..16 (each pixel counts the "on" cells of a 4x4 block of a 32x32 bitmap), with
labels 0..9. No download is needed, so every entry point can run on real data offline.

Images are returned as uint8 arrays of shape (8, 8, 1) with values 0..16, so the discrete
decoder sees `num_levels = 17` grey levels (not 256: see shared/DESIGN.md on deriving noise
settings from the number of levels).

Split (deterministic, no shuffling): "train" is the first 1,500 examples of `load_digits`,
"test" the last 297. Example `i` of a split keeps its index in `load_digits` as its global
index (`train[i]` is example `i`, `test[i]` is example `1500 + i`), and captions are chosen
from that global index, so a caption never depends on which split holds the example.
The arrays, the split and the digit words come from evaluation/digits_classifier.py, which
trains and scores its classifier on the same examples: they are defined there once.

Captions are made from labels with several phrasings per digit ("a handwritten digit seven",
"the number 7", "a picture of a seven", "7", ...); `caption_for(label, i)` picks one from
the example index with a fixed hash, so the text model does not see one fixed string per
class. The Imagen code reuses `CAPTION_TEMPLATES` and `caption_for` for its prompts.
"""

import zlib

# The data's facts, the arrays and the split are the evaluation's too (one definition).
from evaluation.digits_classifier import (  # pylint: disable=unused-import
    DIGIT_WORDS, IMAGE_SHAPE, NUM_CLASSES, NUM_EXAMPLES, NUM_LEVELS, NUM_TRAIN, SPLITS,
    load_all, split_indices)

# Each template names the digit exactly once, as a word ({word}, {a_word}: "a seven" /
# "an eight") or as a numeral ({numeral}: "7"), and mentions no other number.
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {numeral}",
    "a picture of {a_word}",
    "{numeral}",
    "a handwritten {numeral}",
    "the digit {word}, written by hand",
    "a small grey image of the number {word}",
    "a blurry, low resolution {numeral}",
)


def with_article(word: str) -> str:
  """"a seven", "an eight", "a one" (the article goes by sound: "one" starts with a w)."""
  return ("an " if word[0] in "aeiou" and word != "one" else "a ") + word


def caption_phrasings(label: int) -> list[str]:
  """Every phrasing of the caption for one digit, in the order of CAPTION_TEMPLATES."""
  if not 0 <= int(label) < NUM_CLASSES:
    raise ValueError(f"digit label must be in 0..9, got {label}")
  word = DIGIT_WORDS[int(label)]
  return [t.format(word=word, a_word=with_article(word), numeral=str(int(label)))
          for t in CAPTION_TEMPLATES]


def caption_for(label: int, i: int) -> str:
  """The caption of example `i` with digit `label`: one phrasing, fixed by a hash of `i`.

  crc32 (not Python's salted `hash`) keeps the choice identical across runs and machines,
  and decorrelates it from the label (load_digits' early examples cycle through 0..9).
  """
  phrasings = caption_phrasings(label)
  return phrasings[zlib.crc32(str(int(i)).encode()) % len(phrasings)]


class DigitsSource:
  """Random-access source over one split of the digits.

  `source[i]` is {"image": uint8 (8, 8, 1) in 0..16, "label": int32, "caption": str}
  ("caption" only when `with_captions`). Metadata: num_levels=17, num_classes=10,
  image_shape=(8, 8, 1).
  """

  num_levels = NUM_LEVELS
  num_classes = NUM_CLASSES
  image_shape = IMAGE_SHAPE

  def __init__(self, split: str = "train", with_captions: bool = True):
    self.split = split
    self.with_captions = with_captions
    self._indices = split_indices(split)
    self._images, self._labels = load_all()

  def __len__(self) -> int:
    return len(self._indices)

  def global_index(self, i: int) -> int:
    """The index in `load_digits` of this split's example `i`."""
    return int(self._indices[i])

  def __getitem__(self, i: int) -> dict:
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for digits split {self.split!r} "
                       f"of {len(self)} examples")
    g = self.global_index(i)
    label = self._labels[g]
    example = {"image": self._images[g], "label": label}
    if self.with_captions:
      example["caption"] = caption_for(label, g)
    return example

  def __repr__(self) -> str:
    # grain checks repr(source) when restoring an iterator state: keep it free of addresses.
    return f"DigitsSource(split={self.split!r}, with_captions={self.with_captions})"
