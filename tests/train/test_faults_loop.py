"""docs/reliability.md's cases that live in the loop and the CLI, end to end through
`jaxpref-train`: the workdir lock, a resume with other flags, the numeric guard, the
hyperparameter ranges, weights all 0, SIGTERM and a run killed after its last checkpoint."""

import os
import signal
import subprocess
import time

import pytest

from cli_util import ROOT, env, metrics, train, train_cmd
from jaxpref.train import workdir as workdir_lib

SHORT = ("--steps=4", "--log_every=1", "--eval_every=4", "--checkpoint_every=2", "--noplot")


def last_line(proc) -> str:
  return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run") / "w"
  train(workdir, *SHORT)
  return workdir


def test_a_held_workdir_is_refused_with_the_holder(tmp_path):
  lock = workdir_lib.WorkdirLock(str(tmp_path / "w")).acquire()
  try:
    proc = train(tmp_path / "w", *SHORT, check=False)
  finally:
    lock.release()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "in use by another run" in last_line(proc) and str(os.getpid()) in last_line(proc)


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_resume_with_other_flags_is_refused_and_flags_txt_kept(finished):
  before = open(finished / "flags.txt").read()
  proc = train(finished, *SHORT[:-1], "--steps=6", "--loss.beta=0.2", "--noplot", check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "--loss.beta" in last_line(proc) and "--steps" in last_line(proc)
  assert open(finished / "flags.txt").read() == before  # the run's record is untouched


@pytest.mark.slow  # trains 2 more steps
def test_allowed_flag_changes_resume_and_are_recorded(finished, tmp_path):
  import shutil
  workdir = tmp_path / "w"
  shutil.copytree(finished, workdir)
  proc = train(workdir, *SHORT[:-1], "--steps=6", "--allow_flag_changes", "--noplot")
  assert [r["step"] for r in metrics(workdir, "train")] == list(range(1, 7))
  assert "history" in open(workdir / "run.json").read(), proc.stdout[-1000:]


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_a_nonfinite_step_stops_the_run_naming_it(tmp_path):
  proc = train(tmp_path / "w", *SHORT, "--loss.beta=1e30", check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  line = last_line(proc)
  assert line.startswith("FATAL: step 1:") and "not finite" in line and "groups:" in line
  assert not os.path.exists(tmp_path / "w" / "checkpoints" / "2")  # nothing past it saved
  assert not os.path.exists(tmp_path / "w" / "final_metrics.json")


def test_nonfinite_skip_counts_the_skipped_steps(tmp_path):
  proc = train(tmp_path / "w", *SHORT, "--loss.beta=1e30", "--nonfinite=skip")
  out = proc.stdout + proc.stderr
  assert "non-finite step(s) skipped" in out and "4 in all" in out


@pytest.mark.parametrize("flag, says", [
    ("--loss.beta=-1", "--loss.beta=-1.0 is out of range for loss 'dpo': it must be > 0"),
    ("--learning_rate=-1", "--learning_rate must be > 0"),
    ("--loss=-1*dpo", "a term's weight must be > 0"),
])
def test_out_of_range_flags_are_one_line_errors(tmp_path, flag, says):
  proc = train(tmp_path / "w", *SHORT, flag, check=False)
  assert proc.returncode == 2 and says in last_line(proc), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_weights_all_zero_are_refused(tmp_path):
  data = tmp_path / "zero.jsonl"
  data.write_text('{"prompt": "name a fruit.", "chosen": "apple.", "rejected": "red.", '
                  '"weight": 0}\n' * 4)
  proc = train(tmp_path / "w", *SHORT, f"--train_data={data}", "--eval_data=", check=False)
  assert proc.returncode == 2 and "weight 0" in last_line(proc), proc.stderr[-2000:]


@pytest.mark.slow  # a run stopped with SIGTERM, then resumed
def test_sigterm_saves_exits_3_and_the_rerun_finishes(tmp_path):
  workdir = tmp_path / "w"
  flags = ("--steps=200", "--log_every=1", "--eval_every=200", "--checkpoint_every=100",
           "--noplot")
  proc = subprocess.Popen(train_cmd(workdir, *flags), cwd=ROOT, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while time.time() < deadline and not os.path.exists(workdir / "metrics.jsonl"):
    time.sleep(0.2)
  while time.time() < deadline and len(metrics(workdir, "train")) < 5:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 3, err[-2000:]
  assert err.strip().splitlines()[-1].startswith("PREEMPTED: SIGTERM: stopped at step")
  assert not os.path.exists(workdir / "final_metrics.json")
  stopped = max(r["step"] for r in metrics(workdir, "train"))
  assert str(stopped) in os.listdir(workdir / "checkpoints")
  train(workdir, *flags)
  assert [r["step"] for r in metrics(workdir, "train")] == list(range(1, 201))
  assert os.path.exists(workdir / "final_metrics.json")


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_a_run_killed_after_its_last_checkpoint_is_finished_by_a_rerun(finished, tmp_path):
  import shutil
  workdir = tmp_path / "w"
  shutil.copytree(finished, workdir)
  os.remove(workdir / "final_metrics.json")
  train(workdir, *SHORT)
  assert os.path.getsize(workdir / "final_metrics.json") > 0
