"""Curricula: train groups in stages ordered by a per-group number (`--curriculum`).

`--curriculum=FIELD[:asc|desc] --curriculum_stages=N` sorts the train groups by FIELD, cuts
the sorted order into N stages of (nearly) equal size, and makes every epoch visit stage 1,
then stage 2, ..., each stage shuffled by (seed, epoch, stage). Curry-DPO (Pattnaik et al.,
2024, "Enhancing Alignment using Curriculum Learning & Ranked Preferences") trains easy
pairs first, easy meaning a large gap between the chosen and rejected scores: `score_gap`
therefore sorts descending unless told otherwise.

FIELD is one of `FIELDS`, or any other top-level numeric field of the records (say
`difficulty`): the readers then keep that one field (`record_value`) and every group
carries its record's value (a pair made from a rated record inherits the record's).
`policy_margin` is the model's own implicit reward margin, re-scored between `--rounds`
(`jaxpref/train/rounds.py`).

The order is a pure function of (values, stages, seed, epoch), so a resumed run sees the
batches it would have seen. Each epoch repeats the curriculum (easy to hard again).
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np

# Field -> (default direction, what it is). Every one is read from the tokenized dataset,
# so any --data_format that has the field works.
FIELDS = {
    "score_gap": ("desc", "scores of the first minus the last member (chosen - rejected)"),
    "weight": ("desc", "the record's weight"),
    "label_smoothing": ("asc", "the record's label_smoothing (flip rate)"),
    "length": ("asc", "real tokens of the whole group"),
    "policy_margin": ("desc", "the policy's implicit reward margin, re-scored every --rounds"),
}
MODEL_FIELDS = ("policy_margin",)  # from the model, not the records
OTHER_DIRECTION = "asc"  # a record field of the data's own: smallest first


def parse(spec: str) -> tuple[str, bool]:
  """'FIELD[:asc|desc]' -> (field, descending)."""
  field, _, direction = spec.partition(":")
  if not re.fullmatch(r"[A-Za-z_][\w.-]*", field):
    raise ValueError(f"--curriculum={spec!r}: {field!r} is not a field name; one of "
                     + ", ".join(f"{k} ({v[1]})" for k, v in FIELDS.items())
                     + ", or a numeric field of the records (e.g. difficulty)")
  direction = direction or FIELDS.get(field, (OTHER_DIRECTION,))[0]
  if direction not in ("asc", "desc"):
    raise ValueError(f"--curriculum={spec!r}: the direction after ':' must be asc or desc")
  return field, direction == "desc"


def record_field(spec: str) -> str:
  """The record field the readers must keep for `spec` ('' when none: ours or the model's)."""
  if not spec:
    return ""
  field = parse(spec)[0]
  return "" if field in FIELDS else field


def record_value(obj, field: str) -> tuple[float | None, tuple[str, str] | None]:
  """(value, None) or (None, (reason, message)): `field` of a decoded record, a finite number."""
  if field not in obj:
    return None, (f"missing field '{field}'",
                  f"field '{field}' is missing (--curriculum={field} needs it in every record)")
  v = obj[field]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    return None, (f"field '{field}' is not a finite number",
                  f"field '{field}' must be a finite number (--curriculum={field}), got {v!r}")
  return float(v), None


def kept_values(records) -> np.ndarray | None:
  """float64[N]: the kept curriculum field of each record, or None when none was kept."""
  if not records or getattr(records[0], "curriculum_value", None) is None:
    return None
  return np.array([r.curriculum_value for r in records], np.float64)


def field_values(ds, field: str) -> np.ndarray:
  """float64[N]: the field per group of a tokenized dataset; a clear error when absent."""
  if field == "score_gap":
    if ds.scores is None:
      raise ValueError("--curriculum=score_gap needs scores in the records (pairs: "
                       "chosen_score/rejected_score; ranked: each completion's score)")
    last = ds.members.sum(1) - 1  # ranked groups may have fewer than K members
    values = ds.scores[:, 0] - ds.scores[np.arange(ds.n), np.maximum(last, 0)]
  elif field == "weight":
    values = ds.weight
  elif field == "label_smoothing":
    if ds.label_smoothing is None:
      raise ValueError("--curriculum=label_smoothing needs a label_smoothing field in every record")
    values = ds.label_smoothing
  elif field == "length":
    values = (ds.segment_ids > 0).sum((1, 2))
  elif field == "policy_margin":  # round 1: policy == reference, every margin is 0
    values = np.zeros(ds.n)
  else:
    values = getattr(ds, "curriculum_values", None)
    if values is None:
      raise ValueError(f"--curriculum={field}: not one of {', '.join(FIELDS)}, and the dataset "
                       f"holds no {field!r} values of its records (read with keep={field!r}, "
                       "as the train loop does)")
  values = np.asarray(values, np.float64)
  bad = ~np.isfinite(values)
  if bad.any():
    raise ValueError(f"--curriculum={field}: {int(bad.sum())} groups have a non-finite value "
                     f"(first at group {int(np.flatnonzero(bad)[0])})")
  return values


class Curriculum:
  """The stages of a dataset under one spec, and each epoch's order."""

  def __init__(self, values: np.ndarray, n_stages: int, descending: bool, seed: int,
               spec: str = ""):
    n = len(values)
    if not 1 <= n_stages <= n:
      raise ValueError(f"--curriculum_stages must be in [1, {n}] (the train groups), got {n_stages}")
    # Stable, so tied groups keep file order and the stages do not depend on the seed.
    order = np.argsort(-values if descending else values, kind="stable")
    self.stages = np.array_split(order, n_stages)
    self.values, self.seed, self.spec = values, seed, spec

  @property
  def boundaries(self) -> np.ndarray:
    """int[n_stages + 1]: stage s occupies positions [b[s], b[s+1]) of every epoch."""
    return np.cumsum([0] + [len(s) for s in self.stages])

  @functools.lru_cache(maxsize=4)
  def epoch_order(self, epoch: int) -> np.ndarray:
    rngs = (np.random.default_rng([self.seed, epoch, s]) for s in range(len(self.stages)))
    out = np.concatenate([rng.permutation(stage) for rng, stage in zip(rngs, self.stages)])
    out.flags.writeable = False  # shared by every caller through the cache
    return out

  def describe(self) -> str:
    ranges = [f"{self.values[s].min():.3g}..{self.values[s].max():.3g}" for s in self.stages]
    return f"{len(self.stages)} stages of ~{len(self.stages[0])} groups, values " + ", ".join(ranges)


def from_spec(ds, spec: str, n_stages: int, seed: int) -> Curriculum | None:
  """The run's curriculum, or None for `spec` ''."""
  if not spec:
    return None
  field, descending = parse(spec)
  return Curriculum(field_values(ds, field), n_stages, descending, seed,
                    f"{field}:{'desc' if descending else 'asc'}")
