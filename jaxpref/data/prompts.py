"""Prompts for online training and generation: the `prompt` of every record of any
prompt-bearing file (prompt files, pairs, unpaired, ranked records; JSONL, Parquet, shards),
tokenized as training lays out a prompt (BOS + prompt; chat records rendered with the
run's template), and batched in a seeded order that is a pure function of the step.

Batches are padded to one of a few lengths (`buckets`), so a new prompt length does not
compile a new sampler.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpref import cli_errors
from jaxpref.data import chat, sources
from jaxpref.data.pairs import batch_indices
from jaxpref.data.records import parse_fields


@dataclasses.dataclass
class PromptDataset:
  texts: list[str]  # the prompts as the reward functions read them
  ids: list[list[int]]  # BOS + prompt tokens
  path: str
  skipped: int = 0  # records without a usable prompt (counted, reported)
  truncated: int = 0  # prompts cut to max_prompt_len (their start kept off)
  negatives: list[list[int]] | None = None  # each record's rejected response (DRIFT)
  answers: list[list[int]] | None = None  # each record's chosen answer (GRAO's reference)

  @property
  def n(self) -> int:
    return len(self.texts)

  def summary(self) -> str:
    return (f"{self.n} prompts from {self.path}"
            + (f", {self.skipped} records without a prompt skipped" if self.skipped else "")
            + (f", {self.truncated} cut to their last tokens" if self.truncated else ""))

  def indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
    return batch_indices(self.n, batch_size, step, seed)

  def padded(self, idx: np.ndarray, buckets: tuple[int, ...], pad_id: int):
    """(int32[len(idx), P] right-padded prompt ids, int32[len(idx)] lengths), P the
    smallest bucket that holds the longest prompt."""
    lengths = np.array([len(self.ids[i]) for i in idx], np.int32)
    p = next((b for b in buckets if b >= lengths.max()), int(lengths.max()))
    out = np.full((len(idx), p), pad_id, np.int32)
    for row, i in enumerate(idx):
      out[row, :lengths[row]] = self.ids[i]
    return out, lengths


def _response_of(obj, fields: dict, key: str) -> str | None:
  """A record's `key` response (chosen or rejected) as text: the field, or a chat pair's."""
  if not isinstance(obj, dict):
    return None
  if chat.is_chat(obj):
    rec, _ = chat.to_pair(obj)
    return rec[key] if rec else None
  value = obj.get(fields.get(key, key))
  return value if isinstance(value, str) and value.strip() else None


def _prompt_of(obj, fields: dict) -> str | None:
  if not isinstance(obj, dict):
    return None
  if chat.is_chat(obj):  # a chat pair: the prompt the pair reader renders for it
    rec, _ = chat.to_pair(obj)
    return rec["prompt"] if rec else None
  value = obj.get(fields.get("prompt", "prompt"))
  if isinstance(value, list):  # a message list, in the plain "User: ...\nAssistant:" format
    return chat.render(value)
  return value if isinstance(value, str) and value.strip() else None


# What each response field is read for, for the error naming a record without it.
_WHY = {"rejected": "--online.pairs=drift pairs each prompt's best sample with its record's "
                    "rejected response",
        "chosen": "--loss=grao puts each record's chosen answer in its group as the "
                  "reference answer"}


def load(path: str, tok, max_prompt_len: int = 0, fields: str = "",
         skip_invalid: bool = False, negatives: bool = False,
         answers: bool = False) -> PromptDataset:
  """Every record's prompt, in file order (and, with `negatives` / `answers`, its rejected /
  chosen response's tokens). A record without one is an error naming its file, line and
  field, or (with --skip_invalid_records) skipped and counted."""
  mapping = parse_fields(fields)
  texts, ids, skipped, truncated = [], [], 0, 0
  wanted = [key for key, on in (("rejected", negatives), ("chosen", answers)) if on]
  extra = {key: [] for key in wanted}
  for file, line, obj, problem in sources.rows(path):
    text = None if problem is not None else _prompt_of(obj, mapping)
    got = {key: _response_of(obj, mapping, key) for key in wanted} if text is not None else {}
    missing = next((key for key in wanted if got.get(key) is None), None)
    if text is None or missing:
      if not skip_invalid:
        why = (problem[1] if problem is not None else "no 'prompt' string field"
               if text is None else f"no '{missing}' string field ({_WHY[missing]})")
        raise cli_errors.DataError(f"{file}:{line}: {why} (online training reads each "
                                   "record's prompt; --skip_invalid_records skips it)")
      skipped += 1
      continue
    for key in wanted:
      extra[key].append(tok.encode(got[key]))
    body = tok.encode(text)
    if 0 < max_prompt_len < len(body):
      body, truncated = body[-max_prompt_len:], truncated + 1  # the question sits at the end
    framed, _ = tok.frame(body, [], eos=False)
    texts.append(text)
    ids.append(framed)
  if not texts:
    raise cli_errors.DataError(f"{path}: no record has a prompt ({skipped} skipped)")
  return PromptDataset(texts, ids, path, skipped, truncated, extra.get("rejected"),
                       extra.get("chosen"))
