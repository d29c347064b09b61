"""Extra group members and per-record source log-probs, for losses that read more than the pair.

A pair group is (x, y_w), (x, y_l). Some losses score a third whole sequence, built here
from a record field and appended as member 2 (so K = 3):

  `rationale`        -> (RATIONALE_TEMPLATE filled with x, y_w, y_l;  the rationale r)
                        rdpo / rorpo read S_pol(r | x, y_w, y_l) (docs/losses.md#rdpo)
  `rejected_prompt`  -> (x-, y_w): the chosen response under a prompt it does not satisfy
                        mapl / omnidpo contrast it with member 0 = (x, y_w) (docs/losses.md#mapl)

`source_logps` adds no member: it is a list of S `[chosen, rejected]` summed log-probs of
the pair under S source models (docs/losses.md#infifpo), carried as `GroupBatch.source_logps`.
Nor do `ref_chosen_logps`/`ref_rejected_logps` (TRL's column names): the reference model's
summed log-probs of each response, which `--reference=precomputed` then reads instead of
running the reference (`train/loop.py`).

Which fields a loss needs is the loss's business (`jaxpref.losses.record_fields`); the
data layer builds members only when asked, so ordinary pairs stay K = 2.
"""

from __future__ import annotations

import math

# The rationale prompt of "Data-Centric Preference Optimization with Rationales" (docs/losses.md#rdpo),
# in our words: the question and both responses, chosen first, then the request.
RATIONALE_TEMPLATE = (
    "Given the prompt: {prompt}\n"
    "Which of the following assistant's responses is more preferable, "
    "Assistant 1: {chosen}\nor Assistant 2: {rejected}?\n"
    "Provide a rationale of your answer.\n")

MEMBER_FIELDS = ("rationale", "rejected_prompt")  # string fields that add a group member
SOURCE_FIELD = "source_logps"
REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")  # both or neither, in every record or none
EXTRA_FIELDS = MEMBER_FIELDS + (SOURCE_FIELD,)


def rationale_prompt(prompt: str, chosen: str, rejected: str) -> str:
  return RATIONALE_TEMPLATE.format(prompt=prompt, chosen=chosen, rejected=rejected)


def member_texts(record, field: str) -> tuple[str, str]:
  """(prompt, response) of the member that `field` adds to `record`'s group."""
  if field == "rationale":
    return rationale_prompt(record.prompt, record.chosen, record.rejected), record.rationale
  if field == "rejected_prompt":
    return record.rejected_prompt, record.chosen
  raise ValueError(f"{field!r} adds no group member; member fields: {', '.join(MEMBER_FIELDS)}")


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_source_logps(value) -> tuple[str, str] | None:
  """(reason, message) if `value` is not a non-empty list of [chosen, rejected] log-probs."""
  shape = "a list of [chosen, rejected] summed log-probs, one per source model"
  if not isinstance(value, list) or not value:
    return (f"field '{SOURCE_FIELD}' is not a list of pairs",
            f"field '{SOURCE_FIELD}' must be {shape}, got {value!r}")
  for i, pair in enumerate(value):
    if not (isinstance(pair, list) and len(pair) == 2 and all(map(_is_number, pair))):
      return (f"field '{SOURCE_FIELD}' is not a list of pairs",
              f"field '{SOURCE_FIELD}'[{i}] must be [chosen, rejected] finite numbers ({shape}), "
              f"got {pair!r}")
    if max(pair) > 0:
      return (f"field '{SOURCE_FIELD}' has a positive log-prob",
              f"field '{SOURCE_FIELD}'[{i}] must hold log-probs <= 0, got {pair!r}")
  return None


def parse_source_logps(value) -> tuple[tuple[float, float], ...]:
  return tuple((float(c), float(r)) for c, r in value)


def check(obj: dict, check_strings) -> tuple[str, str] | None:
  """(reason, message) for a bad extra field of a pair record, or None; `check_strings` is
  the records' own non-empty-string check, so these fields read like prompt/chosen."""
  problem = check_strings(obj, [k for k in MEMBER_FIELDS if k in obj])
  if problem is None and SOURCE_FIELD in obj:
    problem = check_source_logps(obj[SOURCE_FIELD])
  return problem or check_ref_logps(obj)


def check_ref_logps(obj: dict) -> tuple[str, str] | None:
  """(reason, message) unless the record has both reference log-prob fields, finite and
  <= 0, or neither."""
  present = [k for k in REF_FIELDS if k in obj]
  if len(present) == 1:
    missing = REF_FIELDS[1 - REF_FIELDS.index(present[0])]
    return (f"field '{missing}' is missing",
            f"field '{missing}' is missing, but the record has '{present[0]}' (both or neither)")
  for k in present:
    if not _is_number(obj[k]) or obj[k] > 0:
      return (f"field '{k}' is not a log-prob",
              f"field '{k}' must be a finite summed log-prob <= 0, got {obj[k]!r}")
  return None


def parse(obj: dict) -> dict:
  """PairRecord keyword arguments for the extra fields (None where absent)."""
  src = obj.get(SOURCE_FIELD)
  ref = tuple(float(obj[k]) for k in REF_FIELDS) if REF_FIELDS[0] in obj else None
  return dict(rationale=obj.get("rationale"), rejected_prompt=obj.get("rejected_prompt"),
              source_logps=None if src is None else parse_source_logps(src), ref_logps=ref)


def consistency_error(records: list, where: list, require=()) -> str | None:
  """The first record lacking a `require`d field, or whose number of sources differs from
  the first record's (one [B, S, 2] array per batch), as `FILE:LINE: ...`; else None."""
  for field in require:
    if field not in EXTRA_FIELDS:
      raise ValueError(f"{field!r} is not an extra pair field; valid: {', '.join(EXTRA_FIELDS)}")
    for r, (file, line) in zip(records, where):
      if getattr(r, field) is None:
        return (f"{file}:{line}: field '{field}' is missing; the selected loss needs it in "
                "every record (docs/data.md, extra group members)")
  n_src = [None if r.source_logps is None else len(r.source_logps) for r in records]
  has_ref = [r.ref_logps is not None for r in records]
  if any(has_ref) and not all(has_ref):
    file, line = where[has_ref.index(not has_ref[0])]
    return (f"{file}:{line}: fields {'/'.join(REF_FIELDS)} are "
            f"{'missing' if has_ref[0] else 'present'}, unlike in {where[0][0]}:{where[0][1]} "
            "(reference log-probs must be in every record or in none)")
  count = lambda n: "no" if n is None else f"{n} source models in"
  for n, (file, line) in zip(n_src, where):
    if n != n_src[0]:
      return (f"{file}:{line}: {count(n)} field '{SOURCE_FIELD}', but {where[0][0]}:"
              f"{where[0][1]} has {count(n_src[0])} it (one [B, S, 2] array per batch: every "
              "record needs the same sources, or none)")
  return None


def member_ids(tok, record, index: int, fields) -> list[tuple[list[int], list[int]]]:
  """(prompt ids, response ids) of each extra member `fields` adds to record `index`'s group;
  a record without one is an error, never a silently invalid member."""
  out = []
  for field in fields:
    if field not in MEMBER_FIELDS:
      raise ValueError(f"{field!r} adds no group member; member fields: {', '.join(MEMBER_FIELDS)}")
    if getattr(record, field) is None:
      raise ValueError(f"record {index}: field '{field}' is missing; the selected loss scores a "
                       "group member built from it (read_pairs(require=...) names file and line)")
    prompt, response = member_texts(record, field)
    out.append((tok.encode(prompt), tok.encode(response)))
  return out
