"""Metric sinks: `metrics.jsonl` (one object per logged step and split) and TensorBoard.

Neither can hang the run or tear the log:
- each row is one `os.write` of a whole line to a file opened O_APPEND (no buffer that
  could flush half a line), fsynced when a checkpoint is saved (`sync`); a torn last line
  (a kill or a full disk mid-write) is dropped on resume and said so (`notes`);
- TensorBoard events are written synchronously by this process (tensorboardX's record
  writer, one event per row), not through tensorboardX's writer thread: that thread dies
  on an error such as ENOSPC and `SummaryWriter.add_scalar` then blocks forever in
  `queue.put`. Here the error surfaces at once;
- any failure to write becomes a `WriterError` naming the path and the reason, which the
  CLI prints as one FATAL line (the loop saves a checkpoint first when it can).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from typing import Mapping, Optional

import numpy as np

from jaxpref.cli_errors import WriterError


# TRL's DPOTrainer names (plural), written beside ours in every row: a TRL user's scripts and
# TensorBoard tags read a jaxpref run unchanged, and ours stay for the loop, plots and tools.
TRL_ALIASES = {"rewards/accuracy": "rewards/accuracies", "rewards/margin": "rewards/margins"}
TIE_ACCURACY = ("half", "loss")


def finish_row(metrics: Mapping[str, float], tie_accuracy: str = "half") -> dict:
  """A row as logged. `tie_accuracy="loss"` (TRL's rule) counts an exact tie as a loss in
  every `rewards/accuracy*` that has a `rewards/ties*` share beside it (the losses count a
  tie half, `losses/common.half_wins`): minus half that share. Then TRL's aliases."""
  if tie_accuracy not in TIE_ACCURACY:
    raise ValueError(f"--tie_accuracy={tie_accuracy!r} is not one of {', '.join(TIE_ACCURACY)}")
  out = dict(metrics)
  for key, value in metrics.items():
    ties = key.replace("rewards/accuracy", "rewards/ties", 1)
    if tie_accuracy == "loss" and key.startswith("rewards/accuracy") and ties in metrics:
      out[key] = value - 0.5 * metrics[ties]
  out.update({alias: out[key] for key, alias in TRL_ALIASES.items() if key in out})
  return out


def _scalar(v) -> float:
  v = float(np.asarray(v))
  return v if math.isfinite(v) else float("nan")


def _fail(path: str, what: str, e: OSError) -> WriterError:
  return WriterError(f"{path}: cannot {what} ({e.strerror or e}); the run stops here (free "
                     "space or fix the storage, then re-run the same command to resume)")


class _Lines:
  """An append-only JSONL file written one whole line per `os.write`."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
      raise _fail(path, "open for appending", e) from e

  def write(self, obj: dict) -> None:
    data = (json.dumps(obj) + "\n").encode()
    try:
      while data:  # a regular file takes it whole unless the disk fills up mid-line
        data = data[os.write(self._fd, data):]
    except OSError as e:
      raise _fail(self.path, "append a row", e) from e

  def sync(self) -> None:
    try:
      os.fsync(self._fd)
    except OSError as e:
      raise _fail(self.path, "sync", e) from e

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


class TensorBoard:
  """Scalars as TensorBoard events, written in the calling thread (see the module doc):
  `write` returns or raises WriterError, it never waits on another thread."""

  def __init__(self, logdir: str, purge_step: Optional[int] = None):
    from tensorboardX.event_file_writer import EventsWriter  # heavy, only when used
    from tensorboardX.proto.event_pb2 import Event, SessionLog  # heavy, only when used
    from tensorboardX.proto.summary_pb2 import Summary  # heavy, only when used
    self._Event, self._Summary = Event, Summary
    self.logdir = logdir
    try:
      os.makedirs(logdir, exist_ok=True)
      # The pid keeps a resumed run (started within the same second) off the old file.
      self._writer = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}")
      if purge_step is not None:  # as SummaryWriter(purge_step=): hides the killed run's tail
        self._writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                       session_log=SessionLog(status=SessionLog.START)))
      self._writer.flush()
    except OSError as e:
      raise _fail(logdir, f"write TensorBoard events on {socket.gethostname()}", e) from e

  def write(self, step: int, values: Mapping[str, float]) -> None:
    summary = self._Summary(value=[self._Summary.Value(tag=k, simple_value=float(v))
                                   for k, v in values.items()])
    try:
      self._writer.write_event(self._Event(step=int(step), wall_time=time.time(),
                                           summary=summary))
      self._writer.flush()
    except OSError as e:
      raise _fail(self.logdir, "write TensorBoard events", e) from e

  def close(self) -> None:
    with contextlib.suppress(OSError):  # the error that matters was raised by `write`
      self._writer.close()


class MetricWriter:
  """Appends to WORKDIR/metrics.jsonl; on resume, first drops rows logged after the checkpoint.

  Rows past the restored step were written by the killed run and are about to be logged
  again, so keeping them would duplicate steps; a fresh start (`resume_step` 0) keeps none
  (a run killed before its first checkpoint logs its step-0 eval again). `notes`: what the
  clean-up dropped, for the loop to say.
  """

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True,
               enabled: bool = True, tie_accuracy: str = "half"):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tie_accuracy = tie_accuracy
    self.notes: list[str] = []
    self._file = self._tb = None
    if not enabled:  # multi-host: every process computes the rows, process 0 writes them
      return
    self.notes += _keep_until(self.path, resume_step)
    self._file = _Lines(self.path)
    if tensorboard:
      self._tb = TensorBoard(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, split: str, metrics: Mapping[str, object]) -> dict:
    metrics = finish_row({k: _scalar(v) for k, v in metrics.items()}, self.tie_accuracy)
    row = {"step": int(step), "split": split, **metrics}
    if self._file is None:
      return row
    self._file.write(row)
    if self._tb is not None:
      self._tb.write(step, {f"{split}/{k}": v for k, v in row.items()
                            if k not in ("step", "split")})
    return row

  def sync(self) -> None:
    """fsync metrics.jsonl: call when a checkpoint is saved, so its rows outlive a crash."""
    if self._file is not None:
      self._file.sync()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_rows(path: str) -> tuple[list[dict], list[str]]:
  """(rows, notes): the rows of a JSONL log; a line that does not parse is dropped and noted
  (a torn last line is what a kill or a full disk mid-write leaves)."""
  rows, notes = [], []
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or "step" not in row:
        raise ValueError("not a row")
    except ValueError:
      last = all(not rest.strip() for rest in lines[i + 1:])
      notes.append(f"{path}:{i + 1}: dropped " + (
          f"a torn last line ({len(line)} bytes; the run was stopped mid-write)" if last else
          "a line that is not a JSON row"))
      continue
    rows.append(row)
  return rows, notes


def _keep_until(path: str, resume_step: int) -> list[str]:
  """Keeps the rows of a JSONL log up to `resume_step` (none for a fresh start), each
  (step, split) once; rewrites the file atomically. Returns what it noted."""
  if not os.path.exists(path):
    return []
  try:
    rows, notes = read_rows(path)
  except OSError as e:
    raise _fail(path, "read on resume", e) from e
  kept, seen = [], set()
  for row in rows:
    key = (row["step"], row.get("split"))
    if resume_step > 0 and row["step"] <= resume_step and key not in seen:
      seen.add(key)
      kept.append(row)
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    raise _fail(path, "rewrite on resume", e) from e
  return notes


class RecordLog:
  """WORKDIR/records/process_P.jsonl (`--log_records`): `{"step", "groups"}` per train step,
  the dataset indices of the groups this host read, in row order. A resumed run drops the
  killed run's rows past the checkpoint and writes them again, so the file of a run that was
  killed and resumed equals that of one that was not, exactly when the same data was read."""

  def __init__(self, workdir: str, process_index: int, resume_step: int = 0):
    os.makedirs(os.path.join(workdir, "records"), exist_ok=True)
    self.path = os.path.join(workdir, "records", f"process_{process_index}.jsonl")
    self.notes = _keep_until(self.path, resume_step)
    self._file = _Lines(self.path)

  def write(self, step: int, groups) -> None:
    # One write per row: a SIGKILL must not lose the rows before the last checkpoint.
    self._file.write({"step": int(step), "groups": [int(g) for g in np.ravel(groups)]})

  def sync(self) -> None:
    self._file.sync()

  def close(self) -> None:
    self._file.close()


def read_metrics(path: str) -> list[dict]:
  """The rows of metrics.jsonl; a torn last line (a killed run) is left out."""
  return read_rows(path)[0]
