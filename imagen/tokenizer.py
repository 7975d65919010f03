"""T5's text tokenizer: a sentencepiece model with T5's conventions, batched to numpy.

T5 (Raffel et al. 2020, sec. 2.2) tokenizes with a sentencepiece unigram model whose
special ids are fixed: padding 0, end of sequence 1, unknown 2, and no beginning-of-sequence
token. Imagen (Saharia et al. 2022, sec. 2.1) feeds the encoder at most 128 tokens. So a
caption becomes

  input_ids      = pieces[:max_length - 1] + [EOS=1] + [PAD=0] * (padding),
  attention_mask = 1 on the pieces and the EOS, 0 on the padding,

which is what Hugging Face's T5 tokenizer gives with padding="max_length" and
truncation=True (it truncates the pieces and keeps the EOS last; tests/test_tokenizer.py
checks id for id against `transformers.T5Tokenizer` on the same unigram .model file, the
type of T5's vocabulary; transformers converts any spiece.model as a unigram one, so it does
not read the BPE offline default right).

Real T5 checkpoints come with their vocabulary (`spiece.model` in a Hugging Face directory,
32,000 pieces; the model's 32,128 embedding rows also cover 100 sentinel ids that captions
never use). `load_tokenizer` reads either.

OFFLINE DEFAULT: with no checkpoint at hand, `default_tokenizer()` loads a small
sentencepiece model trained on the captions of the embedded data, the digits and the moving
digits (imagen/assets/digits_spm.model, 256 pieces, built by `regenerate_default_asset`).
It is NOT T5's vocabulary: ids from it mean nothing to a pretrained T5, and it pairs only
with a randomly initialised encoder. It is a BPE model, not T5's unigram: on a corpus this
small and repetitive the unigram trainer stops at 124 pieces and spells "left", "right",
"up", "down" letter by letter, which left a text-to-video model no word for the motion
(direction accuracy at chance); BPE makes every caption word one piece.
"""

import hashlib
import io
import logging
import os
import string
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5's fixed special ids (no BOS)
DEFAULT_MAX_LENGTH = 128  # Imagen's text length
ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_SPM_PATH = os.path.join(ASSET_DIR, "digits_spm.model")
DEFAULT_VOCAB_SIZE = 256  # an upper bound (hard_vocab_limit=False)
OFFLINE_WARNING = ("OFFLINE DEFAULT: small sentencepiece model trained on digit captions, "
                   "not T5's vocabulary")

# Always in the offline vocabulary, so any plain-ASCII prompt tokenizes into characters
# rather than <unk>, even words that never occur in a digit caption.
_REQUIRED_CHARS = string.ascii_letters + string.digits + ".,;:!?'\"-()"


class T5Tokenizer:
  """A sentencepiece model used with T5's conventions (see the module docstring).

  `tokenizer(texts)` -> {"input_ids": int32 [B, max_length], "attention_mask": int32
  [B, max_length]}; `decode(ids)` inverts it (up to sentencepiece's normalisation).
  Picklable (it carries the model bytes), so grain worker processes can use it.
  """

  def __init__(self, spm_path: str, max_length: int = DEFAULT_MAX_LENGTH):
    spm_path = os.fspath(spm_path)
    if not os.path.isfile(spm_path):
      raise FileNotFoundError(
          f"sentencepiece model {spm_path!r} not found. Pass the spiece.model of a T5 "
          "checkpoint (e.g. from a Hugging Face t5-v1_1 directory), or use "
          "default_tokenizer() for the offline digits vocabulary.")
    with open(spm_path, "rb") as f:
      proto = f.read()
    self._setup(proto, spm_path, max_length)

  def _setup(self, proto: bytes, path: str, max_length: int):
    if int(max_length) < 1:
      raise ValueError(f"max_length must be >= 1 (room for the EOS), got {max_length}")
    self.path = path
    self.max_length = int(max_length)
    self._proto = proto
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    special = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
    if special != (PAD_ID, EOS_ID, UNK_ID, -1):
      raise ValueError(
          f"{path!r} is not a T5-style sentencepiece model: its (pad, eos, unk, bos) ids are "
          f"{special}, T5 needs (0, 1, 2, -1). Train it with pad_id=0, eos_id=1, unk_id=2, "
          "bos_id=-1 (see train_offline_spm).")

  @property
  def vocab_size(self) -> int:
    """Pieces in the sentencepiece model (the encoder's embedding needs at least this)."""
    return self._sp.get_piece_size()

  @property
  def sha256(self) -> str:
    """Fingerprint of the model file, to tell vocabularies apart in caches."""
    return hashlib.sha256(self._proto).hexdigest()

  def encode(self, texts: str | Sequence[str]) -> list[list[int]]:
    """Pieces of each text, unpadded and without EOS (sentencepiece's own output)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for t in texts:
      if not isinstance(t, str):
        raise TypeError(f"captions must be str, got {type(t).__name__}: {t!r}")
    return self._sp.encode(texts)

  def __call__(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
    """Batched ids and mask, [B, max_length] int32 each (a single str gives B = 1)."""
    pieces = self.encode(texts)
    ids = np.full((len(pieces), self.max_length), PAD_ID, np.int32)
    mask = np.zeros((len(pieces), self.max_length), np.int32)
    for row, p in enumerate(pieces):
      p = p[:self.max_length - 1] + [EOS_ID]  # truncate, keep the EOS last
      ids[row, :len(p)] = p
      mask[row, :len(p)] = 1
    return {"input_ids": ids, "attention_mask": mask}

  def decode(self, ids) -> str | list[str]:
    """Text of each row of ids, read up to its first EOS; padding is ignored.

    A 1-D input gives a str, a 2-D input a list of str.
    """
    ids = np.asarray(ids)
    if ids.ndim not in (1, 2):
      raise ValueError(f"decode takes ids of shape [L] or [B, L], got {ids.shape}")
    rows = ids[None] if ids.ndim == 1 else ids
    texts = []
    for row in rows.tolist():
      if EOS_ID in row:
        row = row[:row.index(EOS_ID)]
      texts.append(self._sp.decode([i for i in row if i != PAD_ID]))
    return texts[0] if ids.ndim == 1 else texts

  def __getstate__(self):
    return {"proto": self._proto, "path": self.path, "max_length": self.max_length}

  def __setstate__(self, state):
    self._setup(state["proto"], state["path"], state["max_length"])

  def __repr__(self) -> str:
    return (f"T5Tokenizer({self.path!r}, max_length={self.max_length}, "
            f"vocab_size={self.vocab_size})")


def train_offline_spm(captions: Iterable[str], out_prefix: str,
                      vocab_size: int = DEFAULT_VOCAB_SIZE, model_type: str = "bpe") -> str:
  """Trains a sentencepiece model (BPE by default, see the module docstring's OFFLINE
  DEFAULT; "unigram" as T5's) with T5's special ids on `captions`; returns its .model path.

  Same special ids as T5 (pad 0, eos 1, unk 2, no bos) and T5's default normaliser
  (nmt_nfkc). `vocab_size` is an upper bound (hard_vocab_limit=False): a small corpus
  stops with fewer pieces. One thread, so the same captions give the same file.
  Writes only `{out_prefix}.model`.
  """
  captions = [c for c in captions if c]
  if not captions:
    raise ValueError("train_offline_spm needs at least one non-empty caption")
  minimum = len(_REQUIRED_CHARS) + 3 + 1  # required characters, 3 specials, "▁"
  if vocab_size < minimum:
    raise ValueError(f"vocab_size={vocab_size} is too small: the model keeps "
                     f"{minimum} pieces for ASCII letters, digits, punctuation and specials")
  buffer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(captions), model_writer=buffer, model_type=model_type,
      vocab_size=int(vocab_size), hard_vocab_limit=False, character_coverage=1.0,
      required_chars=_REQUIRED_CHARS, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID,
      bos_id=-1, normalization_rule_name="nmt_nfkc", num_threads=1, minloglevel=2)
  path = os.fspath(out_prefix) + ".model"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(buffer.getvalue())
  return path


def regenerate_default_asset(captions: Iterable[str], path: str = DEFAULT_SPM_PATH) -> str:
  """Rebuilds imagen/assets/digits_spm.model from `captions` (every digits caption phrasing).

  The captions come from the data side: run `python -m launch.tokenizer_asset` after
  changing the caption templates (launch/data/digits.py).
  """
  if not path.endswith(".model"):
    raise ValueError(f"the asset path must end in .model, got {path!r}")
  return train_offline_spm(captions, path[:-len(".model")])


def default_tokenizer(max_length: int = DEFAULT_MAX_LENGTH) -> T5Tokenizer:
  """The OFFLINE DEFAULT tokenizer (digits vocabulary, not T5's), with a logged warning."""
  if not os.path.isfile(DEFAULT_SPM_PATH):
    raise FileNotFoundError(
        f"the offline tokenizer asset {DEFAULT_SPM_PATH} is missing: reinstall the package "
        "(it is package data) or rebuild it with `python -m launch.tokenizer_asset`.")
  logging.warning("%s (%s)", OFFLINE_WARNING, DEFAULT_SPM_PATH)
  return T5Tokenizer(DEFAULT_SPM_PATH, max_length)


def load_tokenizer(spec: str, max_length: int = DEFAULT_MAX_LENGTH) -> T5Tokenizer:
  """A tokenizer from "default", a .model file, or a directory holding spiece.model."""
  if spec == "default":
    return default_tokenizer(max_length)
  if os.path.isdir(spec):
    path = os.path.join(spec, "spiece.model")
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"{spec!r} has no spiece.model: a Hugging Face T5 directory keeps its sentencepiece "
          "vocabulary there (tokenizer.json alone is not read); pass the .model path.")
    return T5Tokenizer(path, max_length)
  return T5Tokenizer(spec, max_length)
