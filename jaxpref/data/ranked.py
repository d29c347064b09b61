"""Ranked lists -> `GroupBatch` with K = `group_size`, best first, for listwise losses.

Each record's responses are sorted by score (descending; ties keep file order). A record
with more than K responses keeps its K best, and the dropped responses are counted; one
with fewer leaves its last members invalid (`valid` False), which every listwise loss
masks out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxpref.data import curriculum
from jaxpref.data.pairs import PairDataset, Truncation, encode_pair
from jaxpref.data.records import PairRecord, RankedRecord
from jaxpref.data.tokenizer import Tokenizer


class RankedDataset(PairDataset):
  """Arrays `[N, K, T]`, `scores [N, K]` (0 on missing members), `members [N, K]`."""

  def __init__(self, records: Sequence[RankedRecord], tok: Tokenizer, max_len: int,
               group_size: int, *, truncation: Truncation | None = None, whole: bool = True):
    """`truncation`, `whole`: as `PairDataset`'s."""
    if group_size < 2:
      raise ValueError(f"--group_size must be >= 2, got {group_size}")
    orders = [sorted(range(len(r.scores)), key=lambda i: -r.scores[i])[:group_size]
              for r in records]
    self.n_dropped_responses = sum(len(r.scores) - len(o) for r, o in zip(records, orders))
    self._fill(tok, max_len, ((None, [encode_pair(tok, r.prompt, r.responses[i]) for i in o])
                              for r, o in zip(records, orders)), len(records),
               counted=tuple(range(group_size)), k=group_size, truncation=truncation)
    self.weight = np.array([r.weight for r in records], np.float32)
    self.curriculum_values = curriculum.kept_values(records)  # each group its record's
    self.scores = np.zeros((len(records), group_size), np.float32)
    for i, (r, o) in enumerate(zip(records, orders)):
      self.scores[i, :len(o)] = [r.scores[j] for j in o]
    self._finish(whole)


PAIRING_MODES = ("best_vs_worst", "best_vs_rest", "all_pairs")


def pairs_from_ratings(records: list[RankedRecord], mode: str) -> tuple[list[PairRecord], int]:
  """Pairs from rated responses, the scores kept as the pair's `scores`; returns the pairs
  and how many candidate pairs were dropped because their scores tie (no preference)."""
  if mode not in PAIRING_MODES:
    raise ValueError(f"pairing mode must be one of {', '.join(PAIRING_MODES)}, got {mode!r}")
  pairs, ties = [], 0
  for r in records:
    order = sorted(range(len(r.scores)), key=lambda i: -r.scores[i])  # stable: file order on ties
    if mode == "best_vs_worst":
      candidates = [(order[0], order[-1])]
    elif mode == "best_vs_rest":
      candidates = [(order[0], j) for j in order[1:]]
    else:
      candidates = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
    for w, l in candidates:
      if r.scores[w] == r.scores[l]:
        ties += 1
        continue
      pairs.append(PairRecord(r.prompt, r.responses[w], r.responses[l], r.weight,
                              (r.scores[w], r.scores[l]), curriculum_value=r.curriculum_value))
  return pairs, ties
