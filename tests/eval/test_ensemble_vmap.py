"""`jaxpref-strength --ensemble_vectorize` (jaxpref/eval/ensemble.py): the vmapped members
are the sequential members (per-step losses, eval metrics, checkpoints, strengths), a
finished ensemble is reused by either path, a run killed midway resumes exactly, and what it
does not support is refused."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cli_util import ROOT, env
from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.eval import ensemble, strength
from jaxpref.train.config import DataConfig, RunConfig

TINY = make_tiny.OUT
BASE = os.path.join(ROOT, "experiments", "repro", "label_noise", "base.flags")
M, STEPS = 2, 4


def config(workdir, mesh="data:8", **kw):
  return RunConfig(workdir=str(workdir), model=models.get_config("tiny"), steps=STEPS, mesh=mesh,
                   progress=False, plot=False, role="reward", reward_dim=1, loss="bt",
                   log_every=1, eval_every=STEPS, checkpoint_every=STEPS, **kw,
                   data=DataConfig(train_data=f"{TINY}/train.jsonl",
                                   eval_data=f"{TINY}/eval.jsonl", eval_batch_size=104,
                                   tokenizer=f"{TINY}/tokenizer.model"))


def rows(workdir, j, split):
  with open(os.path.join(workdir, f"member_{j}", "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  """(sequential workdir, vectorised workdir, their rewards [M, N, 2]) on 8 fake devices."""
  path = f"{TINY}/eval.jsonl"
  _, records = strength.read_records(path, "")
  out = []
  for name, vectorize in (("seq", False), ("vmap", True)):
    cfg = config(tmp_path_factory.mktemp(name))
    out.append((cfg.workdir, strength.run_ensemble(cfg, records, path, M, lambda _: None,
                                                   vectorize)))
  return out[0][0], out[1][0], out[0][1], out[1][1]


@pytest.mark.slow  # the module fixture trains 2 x 2 members (~1-2 min)
def test_vmapped_members_train_as_the_sequential_ones(both):
  seq, vec, _, _ = both
  for j in range(M):
    a, b = rows(seq, j, "train"), rows(vec, j, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
      for k in ("loss", "rewards/accuracy", "rewards/margin", "grad_norm", "learning_rate"):
        assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-5), (j, ra["step"], k)
    ea, eb = rows(seq, j, "eval"), rows(vec, j, "eval")
    assert [r["step"] for r in ea] == [r["step"] for r in eb] == [0, STEPS]
    for ra, rb in zip(ea, eb):
      assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-5)
  # The members differ from each other (own seed and data order), so equality is per member.
  first = [rows(vec, j, "train")[0]["loss"] for j in range(M)]
  assert len(set(first)) == M
  # Both leave one final checkpoint per member; the vectorised log has every member's rows.
  for j in range(M):
    assert os.listdir(os.path.join(vec, f"member_{j}", "checkpoints")) == [str(STEPS)]
  with open(os.path.join(vec, ensemble.METRICS)) as f:
    logged = [json.loads(line) for line in f]
  assert sorted({r["member"] for r in logged}) == list(range(M))
  assert {(r["member"], r["seed"], r["data_seed"]) for r in logged} == {(j, j, j) for j in range(M)}


@pytest.mark.slow  # the module fixture trains 2 x 2 members (~1-2 min)
def test_vmapped_strengths_match_the_sequential_ones(both):
  _, _, r_seq, r_vec = both
  assert r_seq.shape == r_vec.shape == (M, 300, 2)
  np.testing.assert_allclose(r_vec, r_seq, rtol=1e-4, atol=1e-5)
  s_seq, s_vec = strength.ensemble_stats(r_seq), strength.ensemble_stats(r_vec)
  np.testing.assert_allclose(s_vec["strength_mean"], s_seq["strength_mean"], atol=1e-5)
  np.testing.assert_allclose(s_vec["strength_std"], s_seq["strength_std"], atol=1e-5)


@pytest.mark.slow  # the module fixture trains 2 x 2 members (~1-2 min)
def test_finished_members_are_reused_and_partial_ones_refused(both, tmp_path):
  _, vec, _, r_vec = both
  said = []
  cfg = config(vec)
  path = f"{TINY}/eval.jsonl"
  _, records = strength.read_records(path, "")
  again = strength.run_ensemble(cfg, records, path, M, said.append, vectorize=True)
  np.testing.assert_array_equal(again, r_vec)
  assert any("members 0, 1 already finished; reused" in s for s in said), said
  assert len(rows(vec, 0, "train")) == STEPS  # nothing trained again
  # A member checkpointed part-way (by the sequential loop) cannot be resumed vectorised.
  work = tmp_path / "partial"
  from jaxpref.train import loop
  member = strength.member_config(dataclasses.replace(config(work), steps=2), 1)
  loop.run(member)
  members = [strength.member_config(config(work), j) for j in range(2)]
  with pytest.raises(ValueError, match=r"cannot resume members trained part-way: .*member_1 "
                                       r"\(step 2\) of --steps=4"):
    ensemble.train(config(work), members, said.append)


@pytest.mark.parametrize("change, match", [
    (dict(grad_accum=2), "--grad_accum=2"),
    (dict(mesh="fsdp:8"), "--mesh=fsdp:8"),
    (dict(export_hf="x"), "--export_hf"),
])
def test_refusals(tmp_path, change, match):
  cfg = dataclasses.replace(config(tmp_path), **change)
  with pytest.raises(ValueError, match=f"does not support .*{match}.*without "
                                       "--ensemble_vectorize"):
    ensemble.check(cfg)


def test_refuses_length_bucketed_batches(tmp_path):
  cfg = config(tmp_path)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batching="buckets"))
  with pytest.raises(ValueError, match="--batching=buckets .*stacking needs --batching=pad"):
    ensemble.check(cfg)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxpref.eval.strength", *args], cwd=ROOT,
                        env=env(), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_cli_vectorised_then_reused_by_both_paths(tmp_path):
  """One CPU device, as a user runs it: the vectorised ensemble's output, then a re-run of
  either path reuses its members and writes the same strengths, which a sequential run
  from scratch matches."""
  work = tmp_path / "ens"
  args = [f"--flagfile={BASE}", f"--workdir={work}", f"--train_data={TINY}/eval.jsonl",
          "--eval_data=", "--loss=bt", "--ensemble_size=2", "--steps=6", "--log_every=3",
          "--checkpoint_every=6", "--noprogress"]
  proc = _cli(*args, "--ensemble_vectorize")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 members 0, 1 vectorised" in proc.stdout and "step      6 train loss" in proc.stdout
  first = [json.loads(line) for line in open(work / "strength.jsonl")]
  assert len(first) == 300 and max(r["strength_std"] for r in first) > 0
  for flag in ("--ensemble_vectorize", "--noensemble_vectorize"):
    proc = _cli(*args, flag)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vectorised (jax.vmap)" not in proc.stdout  # nothing trained again
    again = [json.loads(line) for line in open(work / "strength.jsonl")]
    assert [r["strength_mean"] for r in again] == [r["strength_mean"] for r in first]
  assert len(rows(work, 1, "train")) == 2  # steps 3 and 6, written once
  # On one device too, the vectorised members are the sequential ones.
  seq = tmp_path / "seq"
  proc = _cli(*args[:1], f"--workdir={seq}", *args[2:])
  assert proc.returncode == 0, proc.stderr[-3000:]
  for j in range(2):
    for a, b in zip(rows(seq, j, "train"), rows(work, j, "train"), strict=True):
      assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
  mu = [json.loads(line)["strength_mean"] for line in open(seq / "strength.jsonl")]
  np.testing.assert_allclose([r["strength_mean"] for r in first], mu, atol=1e-4)


def test_cli_refuses_before_training(tmp_path):
  proc = _cli(f"--flagfile={BASE}", f"--workdir={tmp_path}/w", f"--train_data={TINY}/eval.jsonl",
              "--eval_data=", "--loss=bt", "--ensemble_vectorize", "--grad_accum=2")
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "FATAL: --ensemble_vectorize does not support --grad_accum=2" in proc.stderr
  assert not os.path.exists(tmp_path / "w" / "member_0")  # nothing was trained


def _cli_cmd(*args):
  return [sys.executable, "-m", "jaxpref.eval.strength", *args]


def _member_rows(workdir, j, split):
  """Member j's (step, loss) rows of `split`, in the order they were logged."""
  return [(r["step"], r["loss"]) for r in rows(workdir, j, split)]


@pytest.mark.slow  # three CLI runs (~3-5 min on 2 busy CPU cores)
def test_cli_vectorised_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
  """A vectorised ensemble killed (SIGKILL) after its first checkpoint and run again logs,
  for every member, the rows of a run that was not interrupted: no step lost or twice."""
  steps, every = 60, 10  # a kill after checkpoint 10 leaves a wide window: 50 steps
  flags = lambda work: [
      f"--flagfile={ROOT}/experiments/losses/bt.flags", f"--workdir={work}",
      f"--train_data={TINY}/train.jsonl", "--ensemble_size=2", "--ensemble_vectorize",
      f"--steps={steps}", f"--checkpoint_every={every}", "--log_every=1",
      f"--eval_every={steps}", "--progress=false", "--plot=false"]
  straight = tmp_path / "straight"
  proc = subprocess.run(_cli_cmd(*flags(straight)), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]

  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cli_cmd(*flags(killed)), cwd=ROOT, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = killed / "checkpoints"  # the stacked members' checkpoints, the loop's own
  deadline = time.time() + 600
  # Kill once the first checkpoint is final (orbax renames its folder to the bare step).
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in os.listdir(ckpts) if d.isdigit()] if ckpts.is_dir() else []
    if any(int(d) >= every for d in done):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed; make it longer"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  for j in range(M):
    killed_at = max(step for step, _ in _member_rows(killed, j, "train"))
    assert every <= killed_at < steps, killed_at
    # Member folders get their checkpoint only when the whole run has finished.
    assert not (killed / f"member_{j}" / "checkpoints").exists()
  assert not (killed / "strength.jsonl").exists()

  proc = subprocess.run(_cli_cmd(*flags(killed)), cwd=ROOT, env=env(), capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming from step" in proc.stdout, proc.stdout[-3000:]
  for j in range(M):
    got, want = _member_rows(killed, j, "train"), _member_rows(straight, j, "train")
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, steps + 1)), j
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], atol=1e-6, rtol=0)
    got, want = _member_rows(killed, j, "eval"), _member_rows(straight, j, "eval")
    assert [s for s, _ in got] == [s for s, _ in want] == [0, steps], j
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], atol=1e-6, rtol=0)
    assert os.listdir(killed / f"member_{j}" / "checkpoints") == [str(steps)]
  # The members differ (own seed and data order): equality above is per member.
  assert _member_rows(straight, 0, "train")[0] != _member_rows(straight, 1, "train")[0]
  read = lambda w, name: [json.loads(line) for line in open(w / name)]
  assert ([(r["member"], r["step"], r["split"]) for r in read(killed, ensemble.METRICS)]
          == [(r["member"], r["step"], r["split"]) for r in read(straight, ensemble.METRICS)])
  np.testing.assert_allclose([r["strength_mean"] for r in read(killed, "strength.jsonl")],
                             [r["strength_mean"] for r in read(straight, "strength.jsonl")],
                             atol=1e-5)
