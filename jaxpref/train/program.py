"""What the one loop steps: a `Program`, built by `loop.program` (one model of the offline
roles), `online.program` (rollouts in the loop) or `eval.ensemble` (M vmapped members)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from jaxpref.losses.reward import finish_metrics
from jaxpref.train.config import RunConfig


@dataclasses.dataclass
class Program:
  """What the loop steps. `members` models share one program (1, or an ensemble's M
  vmapped members, whose states, batches and metrics carry a leading member axis)."""

  cfg: RunConfig
  mesh: Any
  graphdef: Any
  state: Any  # TrainState
  ref: Any  # reference.Reference
  train_step: Callable
  eval_step: Callable
  batchers: list  # one data.batching.Batcher per member
  batch: Callable[[int], Any]  # step -> (host batch, placed batch)
  put_eval: Callable[[Any], Any]
  workdirs: list[str]  # where each member's metrics go
  members: int = 1
  hooks: list = dataclasses.field(default_factory=list)  # extra hooks (an ensemble's finish)
  # The online role's: held-out evaluation by sampling (rows per member) instead of the
  # eval step over a dataset, host-side metrics of the last rollout for the train row, and
  # what the run's plot shows.
  evaluate: Optional[Callable[[], list[dict]]] = None
  extra: Optional[Callable[[], dict]] = None
  panels: Optional[tuple] = None

  def rows(self, metrics: dict) -> list[dict]:
    """Host metrics (leaves [M] for an ensemble) -> one finished row per member."""
    if self.members == 1:
      return [finish_metrics(metrics)]
    return [finish_metrics({k: np.asarray(v)[j] for k, v in metrics.items()})
            for j in range(self.members)]

  def order(self) -> str:
    return " | ".join(b.describe() for b in self.batchers)
