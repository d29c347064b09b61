"""Reading preference records from JSONL, with errors that name the file, line and field.

Nothing is dropped silently: a bad record stops the read with a `DataError`, or, with
`skip_invalid=True`, is skipped and counted by reason in the returned `ReadReport`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

PAIR_FIELDS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
  """A problem with a data file; the message starts with `FILE:LINE:`."""


@dataclasses.dataclass(frozen=True)
class PairRecord:
  prompt: str
  chosen: str
  rejected: str


@dataclasses.dataclass
class ReadReport:
  path: str
  n_read: int = 0
  n_skipped: int = 0
  reasons: dict = dataclasses.field(default_factory=collections.Counter)
  first_errors: list = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    s = f"{self.path}: read {self.n_read} records, skipped {self.n_skipped}"
    if self.n_skipped:
      s += " (" + ", ".join(f"{n}x {r}" for r, n in self.reasons.most_common()) + ")"
    return s


def _check_record(obj, fields) -> tuple[str, str] | None:
  """(reason, message) for the first problem of a decoded record, or None."""
  if not isinstance(obj, dict):
    return "record is not a JSON object", f"expected a JSON object, got {type(obj).__name__}"
  for name in fields:
    if name not in obj:
      return f"missing field '{name}'", f"field '{name}' is missing"
    value = obj[name]
    if not isinstance(value, str):
      return (f"field '{name}' is not a string",
              f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
      return f"field '{name}' is empty", f"field '{name}' is empty"
  return None


def read_pairs(path: str, *, skip_invalid: bool = False) -> tuple[list[PairRecord], ReadReport]:
  """Reads `{prompt, chosen, rejected}` records (blank lines are ignored, not counted)."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  report = ReadReport(path)
  records = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      problem = None
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        problem = ("invalid UTF-8", f"bytes are not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
      else:
        if not line.strip():
          continue
        try:
          obj = json.loads(line.strip())
        except json.JSONDecodeError as e:
          problem = ("invalid JSON", f"invalid JSON ({e.msg} at column {e.colno})")
        else:
          problem = _check_record(obj, PAIR_FIELDS)
      if problem is None:
        records.append(PairRecord(*(obj[k] for k in PAIR_FIELDS)))
        report.n_read += 1
        continue
      message = f"{path}:{lineno}: {problem[1]}"
      if not skip_invalid:
        raise DataError(message + " (pass --skip_invalid_records to skip and count such records)")
      report.n_skipped += 1
      report.reasons[problem[0]] += 1
      if len(report.first_errors) < 5:
        report.first_errors.append(message)
  if not records:
    raise DataError(f"{path}: no valid records ({report.n_skipped} skipped)")
  return records, report
