"""Metric sinks: `metrics.jsonl` (one object per logged step and split) and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np


def _scalar(v) -> float:
  v = float(np.asarray(v))
  return v if math.isfinite(v) else float("nan")


class MetricWriter:
  """Appends to WORKDIR/metrics.jsonl; on resume, first drops rows logged after the checkpoint.

  Rows past the restored step were written by the killed run and are about to be logged
  again, so keeping them would duplicate steps.
  """

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True,
               enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = self._tb = None
    if not enabled:  # multi-host: every process computes the rows, process 0 writes them
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(rows)
    self._file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # heavy import, only when used
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, split: str, metrics: Mapping[str, object]) -> dict:
    row = {"step": int(step), "split": split, **{k: _scalar(v) for k, v in metrics.items()}}
    if self._file is None:
      return row
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "split"):
          self._tb.add_scalar(f"{split}/{k}", v, step)
    return row

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
