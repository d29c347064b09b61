"""A sentencepiece tokenizer that never adds control tokens on its own.

The caller places BOS and EOS (`jaxpref.data.pairs`), so a prompt and a response can be
encoded separately and joined without a doubled or missing control token. Text that
spells "<s>" or "</s>" stays text: sentencepiece never matches control symbols in input.
"""

from __future__ import annotations

import os
from typing import Sequence

import sentencepiece as spm


class Tokenizer:
  """`encode`/`decode` plus the special ids; see `train_tokenizer` for jaxpref's layout."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str = "<memory>"):
    self._sp = processor
    self.path = path
    for name in ("bos", "eos"):
      if getattr(self._sp, f"{name}_id")() < 0:
        raise ValueError(f"{path}: the tokenizer has no {name.upper()} id; train it with "
                         "jaxpref.data.train_tokenizer (pad 0, unk 1, bos 2, eos 3)")

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--tokenizer: no sentencepiece model at {path!r}")
    try:
      processor = spm.SentencePieceProcessor(model_file=path)
    except RuntimeError as e:  # sentencepiece's only error type; say which flag and file
      raise ValueError(f"--tokenizer: {path!r} is not a sentencepiece model ({e})") from None
    return cls(processor, path)

  @classmethod
  def from_bytes(cls, model: bytes) -> "Tokenizer":
    return cls(spm.SentencePieceProcessor(model_proto=model))

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, add_bos=False, add_eos=False)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    # A model without a pad piece (-1) pads with 0: padding is masked out everywhere.
    return max(self._sp.pad_id(), 0)

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()
