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

In a `gs://` workdir (an object store has no appends) both are written to local files as
above and uploaded whole to the bucket (`_Upload`): when a checkpoint is saved (`sync`), at
the end, and at most every UPLOAD_EVERY_S seconds in between. So after a preemption the
bucket holds every row up to the last checkpoint, which is all that a resume keeps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from typing import Mapping, Optional

import numpy as np

from jaxpref import paths
from jaxpref.cli_errors import WriterError

UPLOAD_EVERY_S = 60.0


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


class _Upload:
  """A local file standing in for an object in a bucket: `start` fetches the object (if
  any), `push` uploads the file whole, `maybe` does so once UPLOAD_EVERY_S have passed."""

  def __init__(self, remote: str):
    self.remote = remote
    self._dir = tempfile.mkdtemp(prefix="jaxpref_upload_")
    self.local = os.path.join(self._dir, remote.rstrip("/").rsplit("/", 1)[-1])
    self._last = time.monotonic()

  def start(self) -> str:
    try:
      if paths.exists(self.remote):
        paths.copy(self.remote, self.local)
    except OSError as e:
      raise _fail(self.remote, "read", e) from e
    return self.local

  def push(self) -> None:
    try:
      paths.copy(self.local, self.remote)
    except OSError as e:
      raise _fail(self.remote, "upload", e) from e
    self._last = time.monotonic()

  def maybe(self) -> None:
    if time.monotonic() - self._last >= UPLOAD_EVERY_S:
      self.push()

  def close(self) -> None:
    shutil.rmtree(self._dir, ignore_errors=True)


class _Lines:
  """An append-only JSONL file written one whole line per `os.write` (a gs:// one through a
  local file, `_Upload`)."""

  def __init__(self, path: str):
    self.path = path
    self._upload = _Upload(path) if paths.is_remote(path) else None
    local = self._upload.start() if self._upload else path
    try:
      self._fd = os.open(local, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
      raise _fail(path, "open for appending", e) from e

  def write(self, obj: dict) -> None:
    data = (json.dumps(obj) + "\n").encode()
    try:
      while data:  # a regular file takes it whole unless the disk fills up mid-line
        data = data[os.write(self._fd, data):]
    except OSError as e:
      raise _fail(self.path, "append a row", e) from e
    if self._upload:
      self._upload.maybe()

  def sync(self) -> None:
    try:
      os.fsync(self._fd)
    except OSError as e:
      raise _fail(self.path, "sync", e) from e
    if self._upload:
      self._upload.push()

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
      if self._upload:
        try:
          self._upload.push()
        finally:
          self._upload.close()


class TensorBoard:
  """Scalars as TensorBoard events, written in the calling thread (see the module doc):
  `write` returns or raises WriterError, it never waits on another thread."""

  def __init__(self, logdir: str, purge_step: Optional[int] = None):
    from tensorboardX.event_file_writer import EventsWriter  # heavy, only when used
    from tensorboardX.proto.event_pb2 import Event, SessionLog  # heavy, only when used
    from tensorboardX.proto.summary_pb2 import Summary  # heavy, only when used
    self._Event, self._Summary = Event, Summary
    self.logdir = logdir
    # gs://: tensorboardX's own gs:// writer uploads the whole file at every flush (here every
    # row); events go to a local file, uploaded as metrics.jsonl is (module doc).
    self._upload = _Upload(paths.join(logdir, "events")) if paths.is_remote(logdir) else None
    local = os.path.dirname(self._upload.local) if self._upload else logdir
    try:
      os.makedirs(local, exist_ok=True)
      # The pid keeps a resumed run (started within the same second) off the old file.
      self._writer = EventsWriter(os.path.join(local, "events"), f".{os.getpid()}")
      if self._upload:  # uploaded under the event file's own name (which only it knows)
        self._upload.local = self._writer._file_name  # noqa: SLF001
        self._upload.remote = paths.join(logdir, os.path.basename(self._writer._file_name))
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
    if self._upload:
      self._upload.maybe()

  def sync(self) -> None:
    if self._upload:
      self._upload.push()

  def close(self) -> None:
    with contextlib.suppress(OSError):  # the error that matters was raised by `write`
      self._writer.close()
    if self._upload:
      try:
        self._upload.push()
      finally:
        self._upload.close()


class MetricWriter:
  """Appends to WORKDIR/metrics.jsonl; on resume, first drops rows logged after the checkpoint.

  Rows past the restored step were written by the killed run and are about to be logged
  again, so keeping them would duplicate steps; a fresh start (`resume_step` 0) keeps none
  (a run killed before its first checkpoint logs its step-0 eval again). `notes`: what the
  clean-up dropped, for the loop to say.
  """

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True,
               enabled: bool = True, tie_accuracy: str = "half"):
    self.path = paths.join(workdir, "metrics.jsonl")
    self.tie_accuracy = tie_accuracy
    self.notes: list[str] = []
    self._file = self._tb = None
    if not enabled:  # multi-host: every process computes the rows, process 0 writes them
      return
    self.notes += _keep_until(self.path, resume_step)
    self._file = _Lines(self.path)
    if tensorboard:
      self._tb = TensorBoard(paths.join(workdir, "tensorboard"), purge_step=resume_step + 1)

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
    if self._tb is not None:
      self._tb.sync()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_rows(path: str) -> tuple[list[dict], list[str]]:
  """(rows, notes): the rows of a JSONL log; a line that does not parse is dropped and noted
  (a torn last line is what a kill or a full disk mid-write leaves)."""
  rows, notes = [], []
  with paths.open(path, "rb") as f:
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
  if not paths.exists(path):
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
    if paths.is_remote(path):  # an object is replaced whole or not at all
      with paths.open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      return notes
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
    paths.makedirs(paths.join(workdir, "records"))
    self.path = paths.join(workdir, "records", f"process_{process_index}.jsonl")
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
