"""`jaxpref-data validate`: what training would make of a data file, before a run.

The validator walks `records.scan`, the very pass the training reader makes, so a record
it calls bad is one training rejects, with the same message. A bad record (or a file-wide
problem such as scores in only some records) makes training stop, so the result is a
failure; `--skip_invalid_records` would skip and count them instead.

Some records training reads but you may not want; they are listed as warnings and do not
fail the check: pairs whose chosen and rejected texts are identical (no preference to
learn, a zero gradient for DPO-style losses), records whose prompt and responses repeat an
earlier record's, and, with a tokenizer and `max_len`, responses that
BOS + prompt + response + EOS does not fit (training truncates them, `pairs._layout`, or
with --truncation=drop drops their group) and prompts over --max_prompt_len; when
--truncation=drop would drop every group, training stops, and so the check fails.
Lengths are in tokens with a tokenizer and in characters without.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping

import numpy as np

from jaxpref.data import pairs
from jaxpref.data import records as rec
from jaxpref.data.tokenizer import Tokenizer


@dataclasses.dataclass
class Validation:
  """Counts and listings of one `validate` run; `ok` means training would read the data."""

  path: str
  kind: str
  n_total: int = 0
  n_valid: int = 0
  bad: dict[str, int] = dataclasses.field(default_factory=collections.Counter)  # by reason
  errors: list[str] = dataclasses.field(default_factory=list)  # every bad record
  fatal: str | None = None  # a file-wide problem: what training would raise
  warnings: list[str] = dataclasses.field(default_factory=list)
  n_duplicates: int = 0
  n_identical: int = 0  # pairs with chosen == rejected
  n_over_length: int = 0  # records with a response truncated at max_len; None: not checked
  prompt_lengths: list[int] = dataclasses.field(default_factory=list)
  response_lengths: list[int] = dataclasses.field(default_factory=list)
  unit: str = "characters"
  n_tokens: int = 0  # with a tokenizer: prompt + response tokens of the valid records,
  n_unk: int = 0  # and how many of them are the unknown piece (text the tokenizer never saw)
  max_len: int | None = None
  truncation: pairs.Truncation = pairs.Truncation()  # the policy the over-length check applies

  @property
  def ok(self) -> bool:
    return not self.errors and self.fatal is None

  def render(self) -> str:
    lines = [f"{self.path}: {self.n_total} records ({self.kind}): {self.n_valid} valid, "
             f"{self.n_total - self.n_valid} bad"]
    if self.bad:
      by_count = sorted(self.bad.items(), key=lambda kv: (-kv[1], kv[0]))
      lines.append("bad by reason: " + ", ".join(f"{n}x {r}" for r, n in by_count))
      lines.append("bad records (training stops at the first):")
      lines += [f"  {e}" for e in self.errors]
    if self.warnings:
      lines.append("warnings (training reads these records):")
      lines += [f"  {w}" for w in self.warnings]
    policy = "" if self.truncation.is_default else (
        f"; --truncation={self.truncation.mode}"
        + (f", --max_prompt_len={self.truncation.max_prompt_len}"
           if self.truncation.max_prompt_len else ""))
    over = (f"{self.n_over_length} (over --max_len={self.max_len} after tokenization{policy})"
            if self.max_len else "not checked (needs --tokenizer and --max_len)")
    lines.append(f"duplicates: {self.n_duplicates}; chosen identical to rejected: "
                 f"{self.n_identical}; over-length: {over}")
    if self.unit == "tokens":
      lines.append(f"unknown tokens: {self.n_unk} of {self.n_tokens}")
    for name, values in (("prompt", self.prompt_lengths), ("response", self.response_lengths)):
      lines += histogram(values, f"{name} length ({self.unit})")
    if self.fatal:
      lines.append(f"FAIL: training would stop: {self.fatal}")
    elif self.errors:
      lines.append(f"FAIL: training would stop at {self.errors[0].split(': ')[0]} "
                   f"(--skip_invalid_records would skip the {len(self.errors)} bad records)")
    else:
      lines.append(f"OK: training reads all {self.n_valid} records")
    return "\n".join(lines)


def histogram(values, title: str, bins: int = 10, width: int = 40) -> list[str]:
  """A text histogram: one line per bin of integer values, bars scaled to `width`."""
  if not values:
    return [f"{title}: no records"]
  v = np.asarray(values)
  lines = [f"{title}: min {v.min()}, median {int(np.median(v))}, "
           f"p95 {int(np.percentile(v, 95))}, max {v.max()}"]
  step = max(1, -(-(v.max() - v.min() + 1) // bins))  # equal integer-wide bins, <= `bins`
  edges = v.min() + step * np.arange(-(-(v.max() - v.min() + 1) // step) + 1)
  counts, _ = np.histogram(v, edges)
  for lo, hi, n in zip(edges[:-1], edges[1:], counts):
    bar = "#" * int(round(width * n / counts.max()))
    lines.append(f"  {lo:>6} - {hi - 1:<6} {n:>7} {bar}".rstrip())
  return lines


def _texts(kind: str, r) -> tuple[str, list[tuple[str, str]]]:
  """(prompt, [(our field name, response text)]) of a record."""
  if kind == "pairs":
    return r.prompt, [("chosen", r.chosen), ("rejected", r.rejected)]
  if kind == "unpaired":
    return r.prompt, [("completion", r.completion)]
  return r.prompt, [(f"completions[{i}]", t) for i, t in enumerate(r.responses)]


def validate(path: str, kind: str = "pairs", fields: str | Mapping[str, str] = "",
             tok: Tokenizer | None = None, max_len: int | None = None,
             truncation: pairs.Truncation | None = None) -> Validation:
  """Reads `path` as training would (`kind` in `records.KINDS`) and reports on every record;
  over-length records are judged by `truncation` (the run's --truncation, --max_prompt_len).

  A bad `fields` spec raises ValueError; everything wrong with the data is in the result.
  """
  if kind not in rec.KINDS:
    raise ValueError(f"--format must be one of {', '.join(rec.KINDS)}, got {kind!r}")
  mapping = rec.parse_fields(fields, "--fields")
  if max_len is not None and max_len < 3:
    raise ValueError(f"--max_len must be >= 3 (BOS, a token, EOS), got {max_len}")
  out = Validation(path, kind, unit="tokens" if tok else "characters",
                   max_len=max_len if tok else None, truncation=truncation or pairs.Truncation())
  encode = tok.encode if tok else (lambda text: text)  # lengths in tokens or characters
  valid, where, seen = [], [], {}
  try:
    for file, line, record, problem in rec.scan(path, kind, mapping):
      out.n_total += 1
      if problem is not None:
        out.bad[problem[0]] += 1
        out.errors.append(f"{file}:{line}: {problem[1]}")
        continue
      valid.append(record)
      where.append((file, line))
      at = f"{file}:{line}"
      prompt, responses = _texts(kind, record)
      key = (prompt, *(t for _, t in responses))
      if key in seen:
        out.n_duplicates += 1
        out.warnings.append(f"{at}: duplicate: the same prompt and responses as {seen[key]}")
      seen.setdefault(key, at)
      if kind == "pairs" and record.chosen == record.rejected:
        out.n_identical += 1
        out.warnings.append(rec.rename(f"{at}: fields 'chosen'/'rejected' are identical (no "
                                       "preference to learn)", mapping))
      p, rs = encode(prompt), [encode(t) for _, t in responses]
      if tok:
        out.n_tokens += len(p) + sum(len(r) for r in rs)
        out.n_unk += sum(x == tok.unk_id for ids in (p, *rs) for x in ids)
      out.prompt_lengths.append(len(p))
      out.response_lengths += [len(r) for r in rs]
      if out.max_len:
        out.n_over_length += _over_length(out, at, tok, p, zip(responses, rs), mapping)
  except rec.DataError as e:  # no such file, an empty folder, an unreadable Parquet file
    out.fatal, out.n_valid = str(e), len(valid)
    return out
  out.n_valid = len(valid)
  if not valid and out.fatal is None:
    first = f"; first: {out.errors[0]}" if out.errors else ""
    out.fatal = f"{path}: no valid records ({len(out.errors)} skipped{first})"
  elif valid:
    out.fatal = rec.consistency_error(kind, valid, where, mapping)
  tr = out.truncation
  if (out.fatal is None and valid and out.max_len and tr.mode == "drop"
      and out.n_over_length == len(valid)):  # as `pairs._finish`: training would stop
    out.fatal = (f"{path}: every one of the {len(valid)} groups is over "
                 f"{tr.limits(out.max_len)} and --truncation=drop would drop them all: raise "
                 "the limit, or cut them with --truncation=keep_end or keep_start")
  return out


def _over_length(out: Validation, at: str, tok: Tokenizer, p: list[int], responses,
                 mapping) -> bool:
  tr = out.truncation
  action = "training drops its group" if tr.mode == "drop" else "training truncates it"
  prompt_cut = 0 < tr.max_prompt_len < len(p)
  if prompt_cut:
    out.warnings.append(rec.rename(
        f"{at}: field 'prompt' is over --max_prompt_len={tr.max_prompt_len} after tokenization "
        f"({len(p)} tokens); {action}", mapping))
  any_cut = prompt_cut
  p = tr.cut(p, tr.max_prompt_len) if prompt_cut else p  # as `pairs._layout` cuts it first
  for (name, _), r in responses:
    if pairs._layout(tok, p, r, out.max_len, tr)[3]:  # the truncation test training applies
      any_cut = True
      out.warnings.append(rec.rename(
          f"{at}: field '{name}' is over --max_len={out.max_len} after tokenization "
          f"(BOS + {len(p)} prompt + {len(r)} response tokens + EOS = {len(p) + len(r) + 2}); "
          f"{action}", mapping))
  return any_cut
