"""Unpaired (KTO-style) data -> `GroupBatch` with K=2: the labelled completion and a
mismatched completion for the KL reference point.

KTO estimates its reference point from completions that do not answer their prompt (TRL
pairs each prompt with the next example's completion in the batch). Member 0 of group i is
(prompt_i, completion_i) with `label` 1 (desirable) or 0 (undesirable); member 1 is
(prompt_i, completion_j), j = i + N/2 mod N, with `label` -1, scored only for that
estimate. Half the dataset away rather than the next record, because split pairs
(`unpair`) put a prompt's two completions next to each other. The mismatch is fixed by
dataset order rather than drawn per batch, so a batch is still a pure function of its
indices (exact resume).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxpref.data import curriculum
from jaxpref.data.pairs import PairDataset, Truncation
from jaxpref.data.records import UnpairedRecord
from jaxpref.data.tokenizer import Tokenizer
from jaxpref.types import GroupBatch

KL_LABEL = -1


class UnpairedDataset(PairDataset):
  """Arrays `[N, 2, T]` as `PairDataset`, plus `label int32[N, 2]`."""

  def __init__(self, records: Sequence[UnpairedRecord], tok: Tokenizer, max_len: int, *,
               truncation: Truncation | None = None):
    """`truncation`: as `PairDataset`'s; only the labelled completion's cut counts (and,
    with --truncation=drop, drops the group): the KL member is another record's."""
    n = len(records)
    prompts = [tok.encode(r.prompt) for r in records]
    completions = [tok.encode(r.completion) for r in records]
    shift = max(n // 2, 1)
    self._fill(tok, max_len, ((prompts[i], (completions[i], completions[(i + shift) % n]))
                              for i in range(n)), n, counted=(0,), truncation=truncation)
    self.weight = np.array([r.weight for r in records], np.float32)
    self.curriculum_values = curriculum.kept_values(records)
    self.scores = None
    self.label = np.stack([np.array([int(r.label) for r in records], np.int32),
                           np.full(n, KL_LABEL, np.int32)], axis=1)
    self._finish()

  @property
  def n_desirable(self) -> int:
    return int(self.label[:, 0].sum())

  def batch(self, indices: np.ndarray, weight: np.ndarray | None = None) -> GroupBatch:
    return dataclasses.replace(super().batch(indices, weight), label=self.label[np.asarray(indices)])
