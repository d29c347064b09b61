"""Tokenizers that never add control tokens on their own: sentencepiece models and Hugging
Face `tokenizer.json` files (or a Hugging Face model folder holding either).

The caller places BOS and EOS (`jaxpref.data.pairs`), so a prompt and a response can be
encoded separately and joined without a doubled or missing control token. Text that
spells "<s>" or "</s>" stays text with sentencepiece (it never matches control symbols in
input); a `tokenizer.json` matches its added special tokens in text, as transformers does,
which is what lets a chat template's rendered "<|eot_id|>" become that token.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import sentencepiece as spm

# A Hugging Face folder's tokenizer, in the order transformers prefers them.
FILES = ("tokenizer.json", "tokenizer.model")


class Tokenizer:
  """`encode`/`decode` plus the special ids; see `train_tokenizer` for jaxpref's layout."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str = "<memory>"):
    self._sp = processor
    self.path = path
    for name in ("bos", "eos"):
      if getattr(self._sp, f"{name}_id")() < 0:
        raise ValueError(f"{path}: the tokenizer has no {name.upper()} id; train it with "
                         "jaxpref.data.train_tokenizer (pad 0, unk 1, bos 2, eos 3)")

  # What a chat template sees (`chat.py`); set by the Hugging Face loader.
  chat_template: str | None = None
  folder: str = ""
  # Whether a sequence gets the BOS id first and the EOS id last (`frame`). A chat template
  # that writes no BOS (ChatML) or ends a turn with something else than EOS ("<|im_end|>\n",
  # Gemma's "<end_of_turn>\n") turns them off (`chat_template.resolve`), so the ids are the
  # ones `apply_chat_template` gives.
  add_bos: bool = True
  add_eos: bool = True
  # The BOS is part of the rendered text (the template wrote it): the text after it is
  # encoded as following it, which a tokenizer that marks a text's first word can tell.
  bos_in_text: bool = False

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """A sentencepiece `.model`, a `tokenizer.json`, or a Hugging Face folder holding either
    (tokenizer.json preferred, as transformers does)."""
    if os.path.isdir(path):
      found = find(path)
      if found is None:
        raise FileNotFoundError(f"--tokenizer: {path!r} is a folder with neither "
                                f"{' nor '.join(FILES)}")
      path = found
    if path.endswith(".json"):
      return HFTokenizer.load(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--tokenizer: no sentencepiece model at {path!r}")
    try:
      processor = spm.SentencePieceProcessor(model_file=path)
    except RuntimeError as e:  # sentencepiece's only error type; say which flag and file
      raise ValueError(f"--tokenizer: {path!r} is not a sentencepiece model ({e})") from None
    tok = cls(processor, path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):  # a Hugging Face folder
      tok.folder, tok.chat_template = folder, chat_template_of(folder)
    return tok

  @classmethod
  def from_bytes(cls, model: bytes) -> "Tokenizer":
    return cls(spm.SentencePieceProcessor(model_proto=model))

  def describe(self) -> str:
    return f"{self.path} (sentencepiece, {self.vocab_size} pieces)"

  def token(self, i: int) -> str:
    """The text of piece `i` (a chat template's bos_token/eos_token)."""
    return self._sp.id_to_piece(i)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, add_bos=False, add_eos=False)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def encode_pair(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids). sentencepiece encodes each on its own (jaxpref's own
    tokenizers put a word boundary there); `HFTokenizer` splits the whole text's ids."""
    return self.encode(prompt), self.encode(response)

  def frame(self, prompt_ids: list[int], response_ids: list[int],
            eos: bool = True) -> tuple[list[int], int]:
    """(BOS + prompt + response + EOS as `add_bos`/`add_eos` say, the position of the first
    response token); `eos=False` leaves the EOS off a response cut short."""
    head = [self.bos_id] if self.add_bos else []
    tail = [self.eos_id] if self.add_eos and eos else []
    return head + prompt_ids + response_ids + tail, len(head) + len(prompt_ids)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    # A model without a pad piece (-1) pads with 0: padding is masked out everywhere.
    return max(self._sp.pad_id(), 0)

  # The tokenizer's own ids; declared_pad_id is -1 when it has none (a model's pad_token_id).
  declared_pad_id = property(lambda self: self._sp.pad_id())
  unk_id = property(lambda self: self._sp.unk_id())
  bos_id = property(lambda self: self._sp.bos_id())
  eos_id = property(lambda self: self._sp.eos_id())


def find(folder: str) -> str | None:
  """The tokenizer file of a Hugging Face folder, or None."""
  for name in FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# ---------------------------------------------------------------------------------------------

SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "config.json")


def _read_json(file: str) -> dict:
  if not os.path.isfile(file):
    return {}
  try:
    with open(file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"--tokenizer: {file} is not valid JSON ({e})") from None


def chat_template_of(folder: str) -> str | None:
  """The folder's Jinja chat template: chat_template.jinja (transformers >= 4.43 saves it
  there), else tokenizer_config.json's `chat_template` (a string, or named templates of
  which "default" is the one transformers applies)."""
  file = os.path.join(folder, "chat_template.jinja")
  if os.path.isfile(file):
    with open(file) as f:
      return f.read()
  template = _read_json(os.path.join(folder, "tokenizer_config.json")).get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) else None


def _content(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
  """A `tokenizers` tokenizer.json; the special tokens are found as transformers finds them:
  tokenizer_config.json, then special_tokens_map.json (token strings), then config.json
  (`bos_token_id`, ...), all in the tokenizer file's folder."""

  def __init__(self, tokenizer, path: str = "<memory>", folder: str = ""):
    self._tk = tokenizer
    self.path, self.folder = path, folder
    self._ids = {name: self._special_id(name, required=name in ("bos", "eos"))
                 for name in ("bos", "eos", "pad", "unk")}
    self.chat_template = chat_template_of(folder) if folder else None

  @classmethod
  def load(cls, path: str) -> "HFTokenizer":
    import tokenizers  # only tokenizer.json runs pay for the import
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--tokenizer: no tokenizer.json at {path!r}")
    try:
      tk = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
      raise ValueError(f"--tokenizer: {path!r} is not a tokenizers tokenizer.json ({e})") from None
    return cls(tk, path, os.path.dirname(os.path.abspath(path)))

  def _special_id(self, name: str, required: bool) -> int:
    files = [os.path.join(self.folder, f) for f in SIDE_FILES] if self.folder else []
    configs = [_read_json(f) for f in files]
    for file, config in zip(files[:2], configs[:2]):
      token = _content(config.get(f"{name}_token"))
      if token is not None:
        i = self._tk.token_to_id(token)
        if i is None:
          raise ValueError(f"{file}: {name}_token {token!r} is not in {self.path}'s vocabulary")
        return i
    if configs:
      i = configs[2].get(f"{name}_token_id")
      i = i[0] if isinstance(i, list) and i else i  # several EOS ids: the first is the one we write
      if isinstance(i, int):
        return i
    if not required:
      return -1
    checked = ", ".join(files) if files else "(no folder)"
    raise ValueError(f"--tokenizer {self.path}: no {name.upper()} token: none of {checked} "
                     f"names {name}_token (or {name}_token_id in config.json); jaxpref places "
                     f"BOS and EOS itself, so the tokenizer must say which they are")

  def describe(self) -> str:
    template = ", chat template" if self.chat_template else ""
    return f"{self.path} (tokenizer.json, {self.vocab_size} tokens{template})"

  def token(self, i: int) -> str:
    return self._tk.id_to_token(i)

  def encode(self, text: str) -> list[int]:
    return self._tk.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

  def encode_pair(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """The ids of prompt + response encoded as one text, split where the response starts:
    what `apply_chat_template` gives for the whole conversation. Encoded apart they can
    differ at the seam: byte-level BPE merges a prompt's trailing "\n\n" that the whole
    text splits before the next word, and a Metaspace tokenizer prefixes "▁" to the response.
    A token that straddles the seam goes to the response."""
    bos = self.token(self.bos_id) if self.bos_in_text else ""
    enc = self._tk.encode(bos + prompt + response, add_special_tokens=False)
    ids, offsets = list(enc.ids), enc.offsets
    if bos and ids[:1] == [self.bos_id]:
      ids, offsets = ids[1:], offsets[1:]
    n = len(bos) + len(prompt)
    cut = next((i for i, (_, end) in enumerate(offsets) if end > n), len(ids))
    return ids[:cut], ids[cut:]

  @property
  def vocab_size(self) -> int:
    return self._tk.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return max(self._ids["pad"], 0)  # none: pad with 0, masked out everywhere

  @property
  def declared_pad_id(self) -> int:
    return self._ids["pad"]

  @property
  def unk_id(self) -> int:
    return self._ids["unk"]  # -1 (byte-level BPE has none): nothing counts as unknown

  @property
  def bos_id(self) -> int:
    return self._ids["bos"]

  @property
  def eos_id(self) -> int:
    return self._ids["eos"]
