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
    _keep_until(self.path, resume_step)
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


def _keep_until(path: str, resume_step: int) -> None:
  """Drops the rows of a JSONL log written after `resume_step` (by a run killed since)."""
  if os.path.exists(path):
    with open(path) as f:
      rows = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
    with open(path, "w") as f:
      f.writelines(rows)


class RecordLog:
  """WORKDIR/records/process_P.jsonl (`--log_records`): `{"step", "groups"}` per train step,
  the dataset indices of the groups this host read, in row order. A resumed run drops the
  killed run's rows past the checkpoint and writes them again, so the file of a run that was
  killed and resumed equals that of one that was not, exactly when the same data was read."""

  def __init__(self, workdir: str, process_index: int, resume_step: int = 0):
    os.makedirs(os.path.join(workdir, "records"), exist_ok=True)
    self.path = os.path.join(workdir, "records", f"process_{process_index}.jsonl")
    _keep_until(self.path, resume_step)
    self._file = open(self.path, "a")

  def write(self, step: int, groups) -> None:
    self._file.write(json.dumps({"step": int(step),
                                 "groups": [int(g) for g in np.ravel(groups)]}) + "\n")
    self._file.flush()  # a SIGKILL must not lose the rows before the last checkpoint

  def close(self) -> None:
    self._file.close()


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
