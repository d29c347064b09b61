"""The quickstart end to end, as a user runs it: CLI, outputs, resume after SIGKILL, re-run."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from cli_util import ROOT, env, metrics, train, train_cmd

SHORT = ("--steps=40", "--log_every=1", "--eval_every=20", "--checkpoint_every=10",
         "--log_records")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run") / "quickstart")
  proc = train(workdir, *SHORT)
  return workdir, proc


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_quickstart_writes_everything(short_run):
  workdir, proc = short_run
  for name in ("flags.txt", "metrics.jsonl", "metrics.png", "final_metrics.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert "40" in os.listdir(os.path.join(workdir, "checkpoints"))
  train_rows, eval_rows = metrics(workdir, "train"), metrics(workdir, "eval")
  assert [r["step"] for r in train_rows] == list(range(1, 41))
  assert [r["step"] for r in eval_rows] == [0, 20, 40]
  assert eval_rows[0]["rewards/accuracy"] == 0.5  # policy == reference at step 0
  assert abs(eval_rows[0]["loss"] - np.log(2)) < 1e-5
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
              "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"):
    assert key in train_rows[-1], key
  assert eval_rows[-1]["loss"] < eval_rows[0]["loss"]
  assert "eval" in proc.stdout and "train data:" in proc.stdout


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_resume_after_sigkill_matches_uninterrupted_run(short_run, tmp_path):
  reference, _ = short_run
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(train_cmd(workdir, *SHORT), cwd=ROOT, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 600
  # Kill once the first checkpoint (step 10) is final: 30 steps remain, a wide window.
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
    if any(int(d) >= 10 for d in done):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "run finished before it could be killed; make it longer"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(r["step"] for r in metrics(workdir, "train"))
  assert killed_at < 40
  train(workdir, *SHORT)
  got = {r["step"]: r["loss"] for r in metrics(workdir, "train")}
  want = {r["step"]: r["loss"] for r in metrics(reference, "train")}
  assert sorted(got) == list(range(1, 41))  # no step lost, none duplicated
  np.testing.assert_allclose([got[s] for s in range(1, 41)], [want[s] for s in range(1, 41)],
                             atol=1e-6, rtol=0)
  # The same records, step by step: the groups each step read (--log_records).
  read = lambda w: [json.loads(line) for line in open(os.path.join(w, "records", "process_0.jsonl"))]
  got_ids, want_ids = read(workdir), read(reference)
  assert [r["step"] for r in got_ids] == list(range(1, 41))
  assert got_ids == want_ids
  assert all(len(r["groups"]) == 32 for r in want_ids)  # --batch_size of experiments/tiny.flags
  assert len({tuple(r["groups"]) for r in want_ids}) == 40  # a new batch every step


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_flags_txt_reproduces_the_run(short_run, tmp_path):
  reference, _ = short_run
  flagfile = os.path.join(reference, "flags.txt")
  text = open(flagfile).read()
  assert "--loss.beta=0.1" in text and "--steps=40" in text and "# --workdir=" in text
  rerun = str(tmp_path / "rerun")
  train(rerun, flagfile=flagfile)
  a = [r["loss"] for r in metrics(reference, "train")]
  b = [r["loss"] for r in metrics(rerun, "train")]
  np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_data_parallel_over_8_devices_matches_one_device(short_run, tmp_path):
  """The same run with the batch sharded over 8 (fake CPU) devices logs the same losses."""
  import jax

  from jaxpref import models
  from jaxpref.train import loop
  from jaxpref.train.config import DataConfig, RunConfig

  assert jax.device_count() == 8, "conftest sets --xla_force_host_platform_device_count=8"
  reference, _ = short_run
  tiny = os.path.join(ROOT, "jaxpref", "data", "tiny")
  cfg = RunConfig(
      workdir=str(tmp_path / "dp8"), model=models.get_config("tiny"), mesh="data:8",
      data=DataConfig(train_data=f"{tiny}/train.jsonl", eval_data=f"{tiny}/eval.jsonl",
                      tokenizer=f"{tiny}/tokenizer.model"),
      steps=40, log_every=1, eval_every=20, checkpoint_every=10, progress=False, plot=False)
  final = loop.run(cfg)
  got = [r["loss"] for r in metrics(cfg.workdir, "train")]
  want = [r["loss"] for r in metrics(reference, "train")]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  assert abs(final["rewards/accuracy"] - metrics(reference, "eval")[-1]["rewards/accuracy"]) < 0.01


def test_rerun_of_a_finished_workdir_changes_nothing(short_run):
  workdir, _ = short_run
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  proc = train(workdir, *SHORT)
  assert "already finished 40" in proc.stdout
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before
