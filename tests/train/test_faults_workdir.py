"""Issue 19, workdir integrity: an exclusive lock naming its holder (a dead holder's lock is
taken over and said), and a run record that refuses a resume with other settings."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxpref import models
from jaxpref.cli_errors import UserError, WorkdirError
from jaxpref.data import make_tiny
from jaxpref.train import workdir as wd
from jaxpref.train.config import DataConfig, RunConfig

TINY = make_tiny.OUT
HOLD = """
import sys, time
from jaxpref.train.workdir import WorkdirLock
lock = WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(workdir):
  """A separate process that holds the workdir's lock until killed."""
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE,
                          text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_second_run_is_refused_with_the_holders_pid_and_host(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(WorkdirError) as e:
      wd.WorkdirLock(str(tmp_path)).acquire()
    msg = str(e.value)
    assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and "\n" not in msg
    assert isinstance(e.value, UserError)  # one FATAL line, exit 2
  finally:
    proc.kill()
    proc.wait()


def test_lock_of_a_killed_run_is_taken_over_and_said(tmp_path):
  proc = _holder(tmp_path)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  lock = wd.WorkdirLock(str(tmp_path)).acquire()
  try:
    assert lock.note and f"pid {proc.pid}" in lock.note and "not running" in lock.note
    held = json.loads(open(tmp_path / wd.LOCK_FILE).read())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
  finally:
    lock.release()


def test_in_process_second_lock_is_refused_and_a_clean_release_leaves_no_note(tmp_path):
  with wd.WorkdirLock(str(tmp_path)) as lock:
    assert lock.held and lock.note is None
    with pytest.raises(WorkdirError, match=f"pid {os.getpid()}"):
      wd.WorkdirLock(str(tmp_path)).acquire()
  assert open(tmp_path / wd.LOCK_FILE).read() == ""  # released: the file names nobody
  with wd.WorkdirLock(str(tmp_path)) as again:
    assert again.note is None


def _cfg(workdir, **kw):
  data = dict(kw.pop("data", {}))
  kw.setdefault("model", models.get_config("tiny"))
  return RunConfig(workdir=str(workdir),
                   data=DataConfig(train_data=data.pop("train_data", f"{TINY}/train.jsonl"),
                                   eval_data=f"{TINY}/eval.jsonl",
                                   tokenizer=f"{TINY}/tokenizer.model", **data), **kw)


def test_settings_cover_what_changes_the_result_and_skip_what_does_not(tmp_path):
  base = wd.settings_of(_cfg(tmp_path))
  assert base["loss"] == "dpo" and base["model.d_model"] == 64 and base["max_len"] == 32
  assert base["model"] == "tiny" and base["data_seed"] == 0 and base["learning_rate"] > 0
  assert base["train_data files"]["train.jsonl"]["sha256"]
  assert base["tokenizer files"]["tokenizer.model"]["size"] > 0
  for key in ("workdir", "log_every", "progress", "mesh", "checkpoint_every",
              "eval_batch_size"):
    assert key not in base
  same = wd.settings_of(_cfg(tmp_path / "other", log_every=1, progress=False, mesh="data:1"))
  assert wd.differences(base, same) == {}


CHANGES = {
    "loss": dict(loss="ipo"),
    "loss.beta": dict(loss_hparams={"beta": 0.5}),
    "model.rope_theta": dict(model=dataclasses.replace(models.get_config("tiny"),
                                                       rope_theta=500000.0)),
    "max_len": dict(data={"max_len": 48}),
    "batch_size": dict(data={"batch_size": 16}),
    "train_data": dict(data={"train_data": f"{TINY}/eval.jsonl"}),
    "model": dict(model_preset="small"),
}


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_resume_with_other_settings_is_refused_listing_them(tmp_path, key):
  wd.record(str(tmp_path), wd.settings_of(_cfg(tmp_path)))
  before = open(tmp_path / wd.RUN_FILE).read()
  other = wd.settings_of(_cfg(tmp_path, **CHANGES[key]))
  with pytest.raises(WorkdirError) as e:
    wd.check_resume(str(tmp_path), other)
  assert f"--{key}:" in str(e.value) and "--allow_flag_changes" in str(e.value)
  assert open(tmp_path / wd.RUN_FILE).read() == before  # a refused resume changes nothing


def test_changed_data_bytes_are_refused(tmp_path):
  data = tmp_path / "train.jsonl"
  data.write_text(open(f"{TINY}/train.jsonl").read())
  cfg = _cfg(tmp_path, data={"train_data": str(data)})
  wd.record(str(tmp_path), wd.settings_of(cfg))
  with open(data, "a") as f:
    f.write('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
  with pytest.raises(WorkdirError, match="--train_data files"):
    wd.check_resume(str(tmp_path), wd.settings_of(cfg))


def test_allowed_changes_are_recorded_as_a_new_segment(tmp_path):
  wd.record(str(tmp_path), wd.settings_of(_cfg(tmp_path)))
  assert wd.check_resume(str(tmp_path), wd.settings_of(_cfg(tmp_path))) == []
  other = wd.settings_of(_cfg(tmp_path, loss="ipo"))
  lines = wd.check_resume(str(tmp_path), other, allow_changes=True, step=20)
  assert lines == ['--loss: "dpo" -> "ipo"']
  rec = json.loads(open(tmp_path / wd.RUN_FILE).read())
  assert rec["settings"]["loss"] == "ipo"
  assert [s["segment"] for s in rec["history"]] == [0, 1]
  segment = rec["history"][1]
  assert segment["changed"] == {"loss": ["dpo", "ipo"]} and segment["step"] == 20
  assert wd.check_resume(str(tmp_path), other) == []  # the new settings are the record now
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # written atomically


def test_workdir_without_a_record_is_recorded_and_said(tmp_path):
  lines = wd.check_resume(str(tmp_path), {"loss": "dpo"})
  assert len(lines) == 1 and "recorded" in lines[0]
  assert wd.read_record(str(tmp_path))["settings"] == {"loss": "dpo"}


def test_unreadable_record_is_one_line(tmp_path):
  (tmp_path / wd.RUN_FILE).write_text('{"settings": {"lo')
  with pytest.raises(WorkdirError, match="not a readable run record"):
    wd.check_resume(str(tmp_path), {"loss": "dpo"})


def test_large_file_fingerprint_hashes_its_first_mib(tmp_path, monkeypatch):
  monkeypatch.setattr(wd, "_FULL_HASH_BELOW", 10)
  f = tmp_path / "big.jsonl"
  f.write_bytes(b"x" * 100)
  fp = wd.file_fingerprint(str(f))
  assert set(fp) == {"size", "mtime", "sha256_first_mib"}
  os.utime(f, (time.time() + 100, time.time() + 100))
  assert wd.file_fingerprint(str(f)) != fp  # past the first MiB only size/mtime tell


def test_begin_records_a_fresh_run_and_checks_a_resumed_one(tmp_path):
  assert wd.begin(_cfg(tmp_path), resuming=False) == []
  assert wd.begin(_cfg(tmp_path), resuming=True, step=2) == []
  with pytest.raises(WorkdirError, match="--max_len: 32 -> 48"):
    wd.begin(_cfg(tmp_path, data={"max_len": 48}), resuming=True)
  assert wd.begin(_cfg(tmp_path, data={"max_len": 48}), resuming=False) == []  # a fresh start
