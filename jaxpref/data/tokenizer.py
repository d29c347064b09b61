"""A sentencepiece tokenizer that never adds control tokens on its own."""

from __future__ import annotations

import os

import sentencepiece as spm


class Tokenizer:

  def __init__(self, processor: spm.SentencePieceProcessor, path: str = ""):
    self._sp = processor
    self.path = path
    for name in ("bos", "eos"):
      if getattr(self, f"{name}_id") < 0:
        raise ValueError(f"{path}: the tokenizer has no {name.upper()} id")

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--tokenizer: no sentencepiece model at {path!r}")
    return cls(spm.SentencePieceProcessor(model_file=path), path)

  def encode(self, text: str) -> list[int]:
    # Control symbols (<s>, </s>) inside text are encoded as ordinary text by sentencepiece.
    return self._sp.encode(text, add_bos=False, add_eos=False)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return max(self._sp.pad_id(), 0)  # pad id -1 (none): pad with 0, masked out anyway

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()
