"""Reading preference records, with errors that name the file, line and field.

Nothing is dropped silently: a bad record stops the read with a `DataError`, or, with
`skip_invalid=True`, is skipped and counted by reason in the returned `ReadReport`.

A path is a JSONL file, a Parquet file, a folder of them or a glob of shards (`sources.py`);
a "line" is a JSONL line or a 1-based Parquet row. A pair record is one JSON object (or row)
with string fields `prompt`, `chosen` and `rejected`, and optionally numbers `weight` (>= 0,
default 1: the pair's weight in the loss) and `chosen_score` / `rejected_score` (both or
neither, and then in every record: ratings that strength-aware losses and score margins read
as `Logps.scores`) and `label_smoothing` (in [0, 0.5], in every record or in none: the pair's
assumed flip rate, which `dpo` uses instead of its scalar `--loss.label_smoothing`), `user`
(an int >= 0) and `attribute_prefs` (a list of 1/-1/0), both in every record or in none
(docs/reward_models.md); `rationale`, `rejected_prompt` and `source_logps` for the losses
that read extra group members (`extra_members.py`); other fields are ignored, but for the one
a `--curriculum` names (`keep`). Every number read must fit float32 (user ids int32): 1e308
or a 400-digit integer is a bad record, not an inf in the loss. Chat layouts (message lists,
HH-RLHF transcripts) are turned into these three strings first (`chat.py`). All three must
hold some non-whitespace text: an empty response has no tokens to score but the EOS, and an
empty prompt almost always means a field was mislabelled upstream, so both are reported
rather than trained on. A pair whose chosen and rejected texts are identical is read (its
loss gradient is zero for DPO-style losses) and counted by `jaxpref-data validate`. Blank
lines are ignored and not counted. A JSONL file is read as bytes and decoded line by line,
so one non-UTF-8 line is reported with its number instead of failing the whole read.

`scan` is the one reading pass: training (`read_*`) and the validator both consume it.

`fields` renames a dataset's own field names to ours (`--data_fields=prompt:question,...`);
errors then name the dataset's fields, as they appear in the file.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterator, Mapping

from jaxpref.data import chat
from jaxpref.data import curriculum
from jaxpref.data import extra_members
from jaxpref.data import sources
from jaxpref.data.fields import FIELD_NAMES, parse_fields, rename  # noqa: F401 (re-exported)
from jaxpref.data.fields import remap as _remap
from jaxpref.data.sources import DataError

PAIR_FIELDS = ("prompt", "chosen", "rejected")
MAX_FIRST_ERRORS = 5
SCORE_FIELDS = ("chosen_score", "rejected_score")
MAX_LABEL_SMOOTHING = 0.5  # a flip rate above 1/2 would mean the labels are mostly wrong
FLOAT32_MAX = 3.4028234663852886e38
INT32_MAX = 2**31 - 1
_NUMBER_FIELDS = ("weight", "chosen_score", "rejected_score", "label_smoothing",
                  *extra_members.REF_FIELDS)


@dataclasses.dataclass(frozen=True)
class PairRecord:
  prompt: str
  chosen: str
  rejected: str
  weight: float = 1.0
  scores: tuple[float, float] | None = None  # (chosen, rejected), higher is better
  label_smoothing: float | None = None  # this pair's flip rate; None: the loss's scalar
  user: int | None = None  # the annotator's id (PAL, docs/reward_models.md)
  attribute_prefs: tuple[int, ...] | None = None  # per attribute: 1 chosen, -1 rejected, 0 either
  rationale: str | None = None  # these three: extra_members.py (read, unused, by other losses)
  rejected_prompt: str | None = None
  source_logps: tuple[tuple[float, float], ...] | None = None  # S x (chosen, rejected)
  ref_logps: tuple[float, float] | None = None  # the reference's (chosen, rejected), given
  curriculum_value: float | None = None  # the --curriculum field kept (data/curriculum.py)


@dataclasses.dataclass
class ReadReport:
  """What a read took and skipped; `reasons` counts skipped records by kind of problem."""

  path: str
  n_read: int = 0
  n_skipped: int = 0
  reasons: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  first_errors: list[str] = dataclasses.field(default_factory=list)  # full messages, <= 5
  files: list[str] = dataclasses.field(default_factory=list)  # read, in order
  ignored: list[str] = dataclasses.field(default_factory=list)  # in a folder, not read

  def summary(self) -> str:
    s = f"{self.path}: read {self.n_read} records, skipped {self.n_skipped}"
    if len(self.files) > 1:
      s += f" ({len(self.files)} files)"
    if self.ignored:
      s += (f"; {len(self.ignored)} files in the folder not read (not "
            f"{'/'.join(sources.FILE_SUFFIXES)}: {', '.join(self.ignored[:5])})")
    if self.n_skipped:
      by_count = sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
      s += " (" + ", ".join(f"{n}x {r}" for r, n in by_count) + ")"
      s += f"; first: {self.first_errors[0]}"
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
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:  # a lone "\ud800" escape: valid JSON, not encodable text
      return (f"field '{name}' is not valid unicode",
              f"field '{name}' contains an unpaired surrogate escape (\\ud800-\\udfff)")
  return None


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _check_numbers(obj) -> tuple[str, str] | None:
  """(reason, message) for a bad optional numeric field, or None."""
  if "weight" in obj and not (_is_number(obj["weight"]) and obj["weight"] >= 0):
    return ("field 'weight' is not a number >= 0",
            f"field 'weight' must be a finite number >= 0, got {obj['weight']!r}")
  present = [k for k in SCORE_FIELDS if k in obj]
  if len(present) == 1:
    missing = SCORE_FIELDS[1 - SCORE_FIELDS.index(present[0])]
    return f"missing field '{missing}'", f"field '{missing}' is missing (it comes with '{present[0]}')"
  for k in present:
    if not _is_number(obj[k]):
      return f"field '{k}' is not a number", f"field '{k}' must be a finite number, got {obj[k]!r}"
  eps = obj.get("label_smoothing", 0.0)
  if not (_is_number(eps) and 0.0 <= eps <= MAX_LABEL_SMOOTHING):
    return (f"field 'label_smoothing' is not a number in [0, {MAX_LABEL_SMOOTHING}]",
            f"field 'label_smoothing' must be a finite number in [0, {MAX_LABEL_SMOOTHING}], "
            f"got {eps!r}")
  return None


def _numbers(name: str, v):
  """(path, number) for every number in a field's value (lists and objects walked)."""
  if isinstance(v, (dict, list)):
    for k, x in (v.items() if isinstance(v, dict) else enumerate(v)):
      yield from _numbers(f"{name}.{k}" if isinstance(v, dict) else f"{name}[{k}]", x)
  elif isinstance(v, (int, float)) and not isinstance(v, bool):
    yield name, v


def _check_range(obj, keep: str = "") -> tuple[str, str] | None:
  """(reason, message) for the first number read that float32 (user ids: int32) cannot
  hold, or None. Ints are compared exactly (float() would raise OverflowError); NaN and inf
  are left to the fields' own checks, which run after this one."""
  for field in (*_NUMBER_FIELDS, keep, "user", "completions", extra_members.SOURCE_FIELD):
    for name, v in _numbers(field, obj.get(field)) if field else ():
      kind, limit, bound = (("int32", INT32_MAX, "2**31 - 1") if field == "user" else
                            ("float32", FLOAT32_MAX, "3.4e38: training would compute with inf"))
      if (isinstance(v, int) or math.isfinite(v)) and abs(v) > limit:
        shown = f"an integer of {len(str(abs(v)))} digits" if isinstance(v, int) else repr(v)
        return (f"field '{name}' is beyond {kind}'s range",
                f"field '{name}' is {shown}, beyond {kind}'s range (|x| <= {bound})")
  return None


def _check_pair_extras(obj) -> tuple[str, str] | None:
  """(reason, message) for a bad `user` (an int >= 0) or `attribute_prefs` (a non-empty list
  of 1 = chosen better, -1 = rejected better, 0 = don't care), or None."""
  user = obj.get("user", 0)
  if not (isinstance(user, int) and not isinstance(user, bool) and user >= 0):
    return ("field 'user' is not an integer >= 0",
            f"field 'user' must be an integer >= 0 (a user id), got {user!r}")
  prefs = obj.get("attribute_prefs", [1])
  if not (isinstance(prefs, list) and prefs and all(
      p in (-1, 0, 1) and not isinstance(p, bool) for p in prefs)):
    return ("field 'attribute_prefs' is not a list of 1/-1/0",
            f"field 'attribute_prefs' must be a non-empty list of 1 (chosen better), -1 "
            f"(rejected better) or 0 (don't care), got {prefs!r}")
  return None


def _parse_pair(obj):
  """(PairRecord, None) or (None, (reason, message)) for one decoded record."""
  if isinstance(obj, dict) and chat.is_chat(obj):
    obj, problem = chat.to_pair(obj)
    if problem is not None:
      return None, problem
  problem = (_check_record(obj, PAIR_FIELDS) or _check_numbers(obj) or _check_pair_extras(obj)
             or extra_members.check(obj, _check_record))
  if problem is not None:
    return None, problem
  scores = tuple(float(obj[k]) for k in SCORE_FIELDS) if SCORE_FIELDS[0] in obj else None
  eps = float(obj["label_smoothing"]) if "label_smoothing" in obj else None
  return PairRecord(*(obj[k] for k in PAIR_FIELDS), weight=float(obj.get("weight", 1.0)),
                    scores=scores, label_smoothing=eps, user=obj.get("user"),
                    attribute_prefs=(tuple(int(p) for p in obj["attribute_prefs"])
                                     if "attribute_prefs" in obj else None),
                    **extra_members.parse(obj)), None


def scan(path: str, kind: str, fields: str | Mapping[str, str] = "", keep: str = ""
         ) -> Iterator[tuple]:
  """`(file, line, record, None)` or `(file, line, None, (reason, message))` for every record
  of `path` parsed as `kind` (a key of `KINDS`): the one pass that training (`_read`) and
  `jaxpref-data validate` share. `keep`: a numeric field every record must have, kept as its
  `curriculum_value` (`--curriculum=FIELD`)."""
  mapping, parse = parse_fields(fields), KINDS[kind]
  for file, line, obj, problem in sources.rows(path):
    record, obj = None, _remap(obj, mapping) if problem is None else obj
    problem = problem or (_check_range(obj, keep) if isinstance(obj, dict) else None)
    if problem is None:
      record, problem = parse(obj)
      if problem is None and keep:
        value, problem = curriculum.record_value(obj, keep)
        record = None if problem else dataclasses.replace(record, curriculum_value=value)
    if problem is not None:
      problem = rename(problem[0], mapping), rename(problem[1], mapping)
    yield file, line, record, problem


def _read(path: str, kind: str, skip_invalid: bool, fields, keep: str = ""
          ) -> tuple[list, ReadReport, list]:
  """The shared read loop; returns the records, the report and each record's (file, line)."""
  files, ignored = sources.resolve(path)
  report = ReadReport(path, files=files, ignored=ignored)
  records, where = [], []
  for file, line, record, problem in scan(path, kind, fields, keep):
    if problem is None:
      records.append(record)
      where.append((file, line))
      report.n_read += 1
      continue
    message = f"{file}:{line}: {problem[1]}"
    if not skip_invalid:
      raise DataError(message + " (pass --skip_invalid_records to skip and count such records)")
    report.n_skipped += 1
    report.reasons[problem[0]] += 1
    if len(report.first_errors) < MAX_FIRST_ERRORS:
      report.first_errors.append(message)
  if not records:
    detail = f"; first: {report.first_errors[0]}" if report.first_errors else ""
    raise DataError(f"{path}: no valid records ({report.n_skipped} skipped{detail})")
  return records, report, where


def consistency_error(kind: str, records: list, where: list, fields="", require=()) -> str | None:
  """What makes a whole file unreadable although each record is fine, or None; `require`:
  extra pair fields the selected loss needs in every record (extra_members.EXTRA_FIELDS)."""
  if kind != "pairs":
    return None
  mapping = parse_fields(fields)
  with_scores = [r.scores is not None for r in records]
  if any(with_scores) and not all(with_scores):
    file, line = where[with_scores.index(False)]
    return rename(f"{file}:{line}: fields 'chosen_score'/'rejected_score' are missing, but "
                   f"other records have them (scores must be in every record or in none)", mapping)
  # A batch holds one array of flip rates, so a record without one has no value to carry.
  with_eps = [r.label_smoothing is not None for r in records]
  if any(with_eps) and not all(with_eps):
    file, line = where[with_eps.index(False)]
    return rename(f"{file}:{line}: field 'label_smoothing' is missing, but other records "
                   f"have it (per-pair label smoothing must be in every record or in none)", mapping)
  for name in ("user", "attribute_prefs"):  # one array per batch: all records or none
    has = [getattr(r, name) is not None for r in records]
    if any(has) and not all(has):
      file, line = where[has.index(False)]
      return rename(f"{file}:{line}: field '{name}' is missing, but other records have it "
                    f"(it must be in every record or in none)", mapping)
  sizes = [len(r.attribute_prefs) for r in records if r.attribute_prefs is not None]
  bad = next((i for i, n in enumerate(sizes) if n != sizes[0]), None)
  if bad is not None:
    return rename(f"{where[bad][0]}:{where[bad][1]}: field 'attribute_prefs' has {sizes[bad]} "
                  f"entries, the first record {sizes[0]} (one per attribute, in every record)", mapping)
  error = extra_members.consistency_error(records, where, require)
  return error and rename(error, mapping)


def read_pairs(path: str, *, skip_invalid: bool = False, fields: str | Mapping[str, str] = "",
               require: tuple[str, ...] = (), keep: str = ""
               ) -> tuple[list[PairRecord], ReadReport]:
  """Reads `{prompt, chosen, rejected}` records (blank lines are ignored, not counted);
  every record must hold the extra fields in `require` (`jaxpref.losses.record_fields`)."""
  records, report, where = _read(path, "pairs", skip_invalid, fields, keep)
  error = consistency_error("pairs", records, where, fields, require)
  if error:
    raise DataError(error)
  return records, report


UNPAIRED_FIELDS = ("prompt", "completion")


@dataclasses.dataclass(frozen=True)
class UnpairedRecord:
  """One response with a desirability label (KTO-style data)."""

  prompt: str
  completion: str
  label: bool
  weight: float = 1.0
  curriculum_value: float | None = None


def _check_unpaired(obj) -> tuple[str, str] | None:
  problem = _check_record(obj, UNPAIRED_FIELDS) or _check_numbers(obj)
  if problem is None:
    if "label" not in obj:
      return "missing field 'label'", "field 'label' is missing"
    if obj["label"] not in (True, False, 0, 1):
      return ("field 'label' is not a boolean",
              f"field 'label' must be true/false (or 1/0), got {obj['label']!r}")
  return problem


def _checked(convert, check, build):
  """A record parser: message lists -> strings (`convert`, as `_parse_pair` does), then
  `check`, then `build`; (record, None) or (None, (reason, message))."""
  def parse(obj):
    obj, problem = convert(obj)
    problem = problem or check(obj)
    return (None, problem) if problem is not None else (build(obj), None)
  return parse


_parse_unpaired = _checked(chat.to_unpaired, _check_unpaired, lambda obj: UnpairedRecord(
    obj["prompt"], obj["completion"], bool(obj["label"]), float(obj.get("weight", 1.0))))


def read_unpaired(path: str, *, skip_invalid: bool = False, fields: str | Mapping[str, str] = "",
                  keep: str = "") -> tuple[list[UnpairedRecord], ReadReport]:
  """Reads `{prompt, completion, label}` records; `label` true marks a desirable completion."""
  records, report, _ = _read(path, "unpaired", skip_invalid, fields, keep)
  return records, report


def unpair(records: list[PairRecord]) -> list[UnpairedRecord]:
  """Each pair becomes two unpaired records: chosen desirable, rejected undesirable."""
  out = []
  for r in records:
    out += [UnpairedRecord(r.prompt, r.chosen, True, r.weight, r.curriculum_value),
            UnpairedRecord(r.prompt, r.rejected, False, r.weight, r.curriculum_value)]
  return out


@dataclasses.dataclass(frozen=True)
class RankedRecord:
  """A prompt with several rated responses (UltraFeedback-style), in file order."""

  prompt: str
  responses: tuple[str, ...]
  scores: tuple[float, ...]  # higher is better
  weight: float = 1.0
  curriculum_value: float | None = None


def _check_ranked(obj) -> tuple[str, str] | None:
  problem = _check_record(obj, ("prompt",)) or _check_numbers(obj)
  if problem is not None:
    return problem
  items = obj.get("completions")
  if not isinstance(items, list):
    return ("field 'completions' is missing or not a list",
            "field 'completions' must be a list of {\"response\": str, \"score\": number}")
  if len(items) < 2:
    return "fewer than 2 completions", f"field 'completions' has {len(items)} entries; need >= 2"
  for i, item in enumerate(items):
    problem = _check_record(item, ("response",))
    if problem is None and not _is_number(item.get("score")):
      problem = ("field 'score' is not a number", f"field 'score' must be a finite number, "
                 f"got {item.get('score')!r}")
    if problem is not None:
      return problem[0], f"completions[{i}]: {problem[1]}"
  return None


_parse_ranked = _checked(chat.to_ranked, _check_ranked, lambda obj: RankedRecord(
    obj["prompt"], tuple(c["response"] for c in obj["completions"]),
    tuple(float(c["score"]) for c in obj["completions"]), float(obj.get("weight", 1.0))))


def read_ranked(path: str, *, skip_invalid: bool = False, fields: str | Mapping[str, str] = "",
                keep: str = "") -> tuple[list[RankedRecord], ReadReport]:
  """Reads `{prompt, completions: [{response, score}, ...]}` records."""
  records, report, _ = _read(path, "ranked", skip_invalid, fields, keep)
  return records, report


KINDS = {"pairs": _parse_pair, "unpaired": _parse_unpaired, "ranked": _parse_ranked}
