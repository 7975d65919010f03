"""CLIP's byte-level BPE tokenizer, read from a Hugging Face snapshot's vocab.json and merges.txt.

The same tokenizer as transformers' CLIPTokenizer (Radford et al. 2021; GPT-2's byte-level BPE
with CLIP's word pattern and lower-casing), written out so that the CLIP score (clip.py) needs
no transformers at run time.
"""

import json
import os
import unicodedata

import numpy as np

from evaluation import pretrained

CLIP_HOWTO = ("Download a Hugging Face CLIPModel snapshot (e.g. openai/clip-vit-base-patch32: "
              "model.safetensors, config.json, vocab.json, merges.txt) and pass the weights "
              "file and the folder holding vocab.json and merges.txt.")


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
      pretrained.require_file(os.path.join(folder, name) if folder else None,
                              f"CLIP tokenizer file {name} (in folder {tokenizer_path!r})",
                              CLIP_HOWTO)
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
