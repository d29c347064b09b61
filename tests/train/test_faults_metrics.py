"""Issue 19, writers: a full disk never hangs the run (TensorBoard written without a writer
thread), metrics.jsonl is appended line-atomically, a torn last line is dropped on resume
and said, and a kill before the first checkpoint does not duplicate the step-0 eval row."""

import errno
import glob
import json
import os
import struct
import threading

import pytest

from jaxpref.cli_errors import RunError, WriterError
from jaxpref.train import metrics as metrics_lib
from jaxpref.train.metrics import MetricWriter, RecordLog, read_metrics

BOUND_S = 10.0  # a failing writer must answer well within this


def _enospc(*a, **k):
  raise OSError(errno.ENOSPC, "No space left on device")


def _bounded(fn):
  """Runs `fn` in a thread; returns its exception (or None) or fails if it hangs."""
  out = {}

  def target():
    try:
      fn()
    except BaseException as e:  # noqa: BLE001
      out["error"] = e
  t = threading.Thread(target=target, daemon=True)
  t.start()
  t.join(BOUND_S)
  assert not t.is_alive(), f"the writer hung for over {BOUND_S} s"
  return out.get("error")


def _events(logdir):
  """(step, tag, value) of every scalar in a TensorBoard folder's event files."""
  from tensorboardX.proto.event_pb2 import Event
  out = []
  for path in sorted(glob.glob(f"{logdir}/events.out.tfevents.*")):
    data = open(path, "rb").read()
    while data:
      (n,) = struct.unpack("<Q", data[:8])
      event = Event.FromString(data[12:12 + n])
      data = data[12 + n + 4:]
      out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return out


def test_tensorboard_enospc_raises_writer_error_within_bounded_time(tmp_path, monkeypatch):
  writer = MetricWriter(str(tmp_path), tensorboard=True)
  writer.write(1, "train", {"loss": 0.5})
  from tensorboardX import record_writer
  monkeypatch.setattr(record_writer.RecordWriter, "write", _enospc)
  error = _bounded(lambda: [writer.write(s, "train", {"loss": 0.5}) for s in range(2, 200)])
  assert isinstance(error, WriterError) and isinstance(error, RunError)
  assert "No space left on device" in str(error) and "tensorboard" in str(error)
  assert "\n" not in str(error)
  writer.close()


def test_metrics_jsonl_enospc_raises_writer_error_within_bounded_time(tmp_path, monkeypatch):
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  monkeypatch.setattr(metrics_lib.os, "write", _enospc)
  error = _bounded(lambda: writer.write(1, "train", {"loss": 0.5}))
  assert isinstance(error, WriterError) and "metrics.jsonl" in str(error)
  monkeypatch.undo()
  writer.close()


def test_tensorboard_events_hold_the_rows(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(0, "eval", {"loss": 0.7})
  writer.write(1, "train", {"loss": 0.5, "grad_norm": 2.0})
  writer.close()
  got = _events(tmp_path / "tensorboard")
  assert (0, "eval/loss", pytest.approx(0.7)) in got and (1, "train/grad_norm", 2.0) in got


def test_each_row_is_one_write_of_a_whole_line(tmp_path, monkeypatch):
  calls = []
  real = os.write
  monkeypatch.setattr(metrics_lib.os, "write", lambda fd, b: calls.append(b) or real(fd, b))
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  for step in range(3):
    writer.write(step, "train", {"loss": 1.0 / (step + 1)})
  writer.sync()
  writer.close()
  assert len(calls) == 3 and all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in calls)
  assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [0, 1, 2]


def _rows(path, steps, tail=b""):
  with open(path, "wb") as f:
    for s in steps:
      f.write(json.dumps({"step": s, "split": "train", "loss": 1.0}).encode() + b"\n")
    f.write(tail)


def test_torn_last_line_is_dropped_on_resume_and_said(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _rows(path, [1, 2, 3, 4], tail=b'{"step": 5, "split": "tr')
  assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3, 4]  # sweep, plots
  writer = MetricWriter(str(tmp_path), resume_step=4, tensorboard=False)
  assert len(writer.notes) == 1 and "torn last line" in writer.notes[0]
  assert "metrics.jsonl:5" in writer.notes[0]
  writer.write(5, "train", {"loss": 0.5})
  writer.close()
  assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3, 4, 5]
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # rewritten atomically


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _rows(path, [1, 2, 3, 4, 5, 6])
  MetricWriter(str(tmp_path), resume_step=4, tensorboard=False).close()
  assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3, 4]


def test_kill_before_first_checkpoint_does_not_duplicate_step_0_eval(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with open(path, "w") as f:  # the killed run's step-0 eval and first train rows
    f.write(json.dumps({"step": 0, "split": "eval", "loss": 0.69}) + "\n")
    f.write(json.dumps({"step": 1, "split": "train", "loss": 0.68}) + "\n")
  writer = MetricWriter(str(tmp_path), resume_step=0, tensorboard=False)  # no checkpoint
  writer.write(0, "eval", {"loss": 0.69})  # the fresh start logs its step-0 eval again
  writer.close()
  keys = [(r["step"], r["split"]) for r in read_metrics(str(path))]
  assert keys == [(0, "eval")]


def test_duplicate_rows_from_mixed_runs_are_kept_once(tmp_path):
  path = tmp_path / "metrics.jsonl"
  _rows(path, [1, 2, 1, 2, 3])
  MetricWriter(str(tmp_path), resume_step=3, tensorboard=False).close()
  assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3]


def test_record_log_keeps_its_behaviour(tmp_path):
  log = RecordLog(str(tmp_path), 0)
  for step in (1, 2, 3):
    log.write(step, [step, step + 10])
  log.close()
  log = RecordLog(str(tmp_path), 0, resume_step=2)
  log.write(3, [7])
  log.close()
  rows = read_metrics(str(tmp_path / "records" / "process_0.jsonl"))
  assert rows == [{"step": 1, "groups": [1, 11]}, {"step": 2, "groups": [2, 12]},
                  {"step": 3, "groups": [7]}]


def test_unusable_metrics_path_is_a_writer_error(tmp_path):
  (tmp_path / "metrics.jsonl").mkdir()  # unwritable even for root, unlike a chmod
  with pytest.raises(WriterError, match="metrics.jsonl.*Is a directory"):
    MetricWriter(str(tmp_path), tensorboard=False)
