"""Tests of imagen/tokenizer.py: T5 conventions, against Hugging Face's T5 tokenizer."""

import pickle
import re
import shutil
import this  # the Zen of Python, a small English corpus that ships with Python

import numpy as np
import pytest

from imagen import tokenizer as tok_lib
from launch import tokenizer_asset
from launch.data import digits


def _zen_lines():
  text = "".join(this.d.get(c, c) for c in this.s)  # the module stores it rot13-encoded
  return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def english_spm(tmp_path_factory):
  """A second, larger vocabulary (English + captions), trained here like the asset."""
  prefix = tmp_path_factory.mktemp("spm") / "english"
  corpus = _zen_lines() * 3 + tokenizer_asset.digits_caption_corpus()
  return tok_lib.train_offline_spm(corpus, str(prefix), vocab_size=200, model_type="unigram")


TEXTS = [
    "a handwritten digit seven",
    "Beautiful is better than ugly.",
    "  leading, trailing   and   repeated spaces  ",
    "",
    "Unicode: ünïcode ﬁ café – ½ and ＡＢＣ (NFKC folds these)",
    "tab\tand\nnewline",
    "an unseen word: xylophone quokka 12345",
    " ".join(["Errors should never pass silently."] * 12),  # longer than max_length
]


@pytest.mark.parametrize("max_length", [16, 64])
def test_matches_transformers_t5_tokenizer(max_length, english_spm, tmp_path):
  """On a unigram vocabulary, T5's type (transformers reads every spiece.model as one)."""
  transformers = pytest.importorskip("transformers")  # test-only: pip install transformers
  spm_path = english_spm
  shutil.copy(spm_path, tmp_path / "spiece.model")  # a Hugging Face T5 directory
  reference = transformers.T5Tokenizer.from_pretrained(str(tmp_path))
  ours = tok_lib.T5Tokenizer(spm_path, max_length=max_length)
  expected = reference(TEXTS, padding="max_length", truncation=True,
                       max_length=max_length, return_tensors="np")
  got = ours(TEXTS)
  assert got["input_ids"].dtype == np.int32 and got["attention_mask"].dtype == np.int32
  assert got["input_ids"].shape == (len(TEXTS), max_length)
  np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
  np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"])
  # The long text really was truncated, with EOS kept last; "" is EOS alone.
  assert len(ours.encode(TEXTS[-1])[0]) >= max_length
  assert got["input_ids"][-1, -1] == tok_lib.EOS_ID and got["attention_mask"][-1].all()
  assert list(got["input_ids"][3, :2]) == [tok_lib.EOS_ID, tok_lib.PAD_ID]
  # And decoding agrees with HF's on the untruncated texts.
  for row, text in zip(got["input_ids"][:3], TEXTS[:3]):
    assert ours.decode(row) == reference.decode(row, skip_special_tokens=True)


def test_conventions_by_hand():
  tok = tok_lib.default_tokenizer(max_length=6)
  pieces = tok.encode(["a handwritten digit seven moving left", "7"])
  out = tok(["a handwritten digit seven moving left", "7"])
  long, short = pieces
  assert len(long) > 5
  np.testing.assert_array_equal(out["input_ids"][0], long[:5] + [1])
  np.testing.assert_array_equal(out["input_ids"][1], short + [1] + [0] * (5 - len(short)))
  np.testing.assert_array_equal(out["attention_mask"][1],
                                [1] * (len(short) + 1) + [0] * (5 - len(short)))
  assert tok("7")["input_ids"].shape == (1, 6)  # a single str is a batch of one
  with pytest.raises(TypeError, match="str"):
    tok([b"bytes"])


def test_offline_vocabulary_covers_digit_captions_and_round_trips():
  tok = tok_lib.default_tokenizer(max_length=32)
  assert 50 < tok.vocab_size <= tok_lib.DEFAULT_VOCAB_SIZE
  captions = tokenizer_asset.digits_caption_corpus()
  out = tok(captions)
  assert not (out["input_ids"] == tok_lib.UNK_ID).any()  # no <unk> in any caption
  assert out["attention_mask"][:, -1].sum() == 0  # none needed truncation at 32
  assert tok.decode(out["input_ids"]) == captions
  # Every word of every caption is one piece: the motion words ("left", "up") as much as the
  # digit words, which a letter-by-letter spelling would hide from a small encoder.
  words = {w for c in captions for w in re.findall(r"[a-z0-9]+", c)}
  assert {"left", "right", "up", "down", "bouncing", "seven", "3"} <= words
  assert all(len(tok.encode(w)[0]) == 1 for w in words), [
      w for w in words if len(tok.encode(w)[0]) != 1]
  # Unseen ASCII words fall back to characters, not <unk>.
  assert tok_lib.UNK_ID not in tok.encode("Quokka XYZ!")[0]
  assert tok.decode(tok("Quokka XYZ!")["input_ids"][0]) == "Quokka XYZ!"


def test_offline_default_is_labelled(caplog):
  with caplog.at_level("WARNING"):
    tok_lib.default_tokenizer()
  assert "OFFLINE DEFAULT" in caplog.text and "not T5's vocabulary" in caplog.text


def test_asset_is_reproducible(tmp_path):
  """The shipped asset equals a fresh build from today's caption templates."""
  path = tok_lib.regenerate_default_asset(tokenizer_asset.digits_caption_corpus(),
                                          str(tmp_path / "digits_spm.model"))
  with open(path, "rb") as a, open(tok_lib.DEFAULT_SPM_PATH, "rb") as b:
    assert a.read() == b.read(), "stale asset: run `python -m launch.tokenizer_asset`"


def test_pickle_and_errors(tmp_path):
  tok = tok_lib.default_tokenizer(max_length=8)
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone(["the number 3"])["input_ids"],
                                tok(["the number 3"])["input_ids"])
  assert clone.sha256 == tok.sha256 and repr(clone) == repr(tok)
  with pytest.raises(FileNotFoundError, match="spiece.model"):
    tok_lib.T5Tokenizer(tmp_path / "missing.model")
  with pytest.raises(FileNotFoundError, match="spiece.model"):
    tok_lib.load_tokenizer(str(tmp_path))
  # A sentencepiece model with sentencepiece's default ids (unk 0, bos 1, eos 2).
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(tokenizer_asset.digits_caption_corpus()), model_prefix=str(
          tmp_path / "plain"), vocab_size=60, hard_vocab_limit=False, minloglevel=2)
  with pytest.raises(ValueError, match="pad_id=0, eos_id=1"):
    tok_lib.T5Tokenizer(tmp_path / "plain.model")
  with pytest.raises(ValueError, match="max_length"):
    tok_lib.T5Tokenizer(tok_lib.DEFAULT_SPM_PATH, max_length=0)


def test_load_tokenizer_from_directory(tmp_path):
  shutil.copy(tok_lib.DEFAULT_SPM_PATH, tmp_path / "spiece.model")
  tok = tok_lib.load_tokenizer(str(tmp_path), max_length=10)
  assert tok.sha256 == tok_lib.T5Tokenizer(tok_lib.DEFAULT_SPM_PATH).sha256
  assert digits.caption_for(7, 3) == tok.decode(tok([digits.caption_for(7, 3)])["input_ids"])[0]
