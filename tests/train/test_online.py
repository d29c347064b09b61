"""The online role (jaxpref/train/online.py): rollouts laid out as groups, the pair rule,
exact resume, 8 devices against 1, bad reward functions, and online DPO through the same
loop."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from cli_util import ROOT, env, train_cmd
from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.train import loop
from jaxpref.train.config import DataConfig, OnlineConfig, RunConfig
from jaxpref.train.online import pair_rule
from jaxpref.types import GroupBatch

TINY = make_tiny.OUT
VERIFIER = os.path.join(ROOT, "examples", "rewards", "tiny_verifier.py") + ":reward"
TINY_FLAGS = os.path.join(ROOT, "experiments", "tiny.flags")
LENGTH = os.path.join(ROOT, "tests", "online_rewards.py") + ":length"
KEYS = ("loss", "reward/mean", "length/mean", "rewards/accuracy", "kl/mean", "grad_norm")


def config(workdir, loss="grpo", mesh="data:-1", steps=4, **online):
  o = {**dict(num_generations=4, max_new_tokens=6, reward_fn=LENGTH), **online}
  return RunConfig(
      workdir=str(workdir), model=models.get_config("tiny"), role="online", loss=loss,
      mesh=mesh, steps=steps, log_every=1, eval_every=steps, checkpoint_every=2,
      progress=False, plot=False, online=OnlineConfig(**o),
      data=DataConfig(train_data=f"{TINY}/prompts_train.jsonl",
                      eval_data=f"{TINY}/prompts_eval.jsonl", batch_size=8, eval_batch_size=8,
                      tokenizer=f"{TINY}/tokenizer.model"))


def rows(workdir, split="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def test_pair_rule_takes_each_groups_best_and_worst():
  t = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  batch = GroupBatch(tokens=t, loss_mask=t * 1.0, segment_ids=t, valid=np.ones((2, 3), bool),
                     weight=np.array([1.0, 0.0], np.float32),
                     scores=np.array([[0.2, 0.9, -1.0], [0.5, 0.5, 0.5]], np.float32))
  pairs = pair_rule(batch)
  assert pairs.tokens.shape == (2, 2, 4)
  np.testing.assert_array_equal(pairs.tokens[0], t[0, [1, 2]])  # best 0.9, worst -1.0
  np.testing.assert_array_equal(pairs.scores[0], np.float32([0.9, -1.0]))
  np.testing.assert_array_equal(pairs.weight, [1.0, 0.0])


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("grpo")
  final = loop.run(config(workdir))
  return workdir, final


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_an_online_run_logs_its_rollouts(grpo_run):
  workdir, final = grpo_run
  train = rows(workdir)
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  for r in train:
    assert 0.0 < r["reward/mean"] <= 6.0  # text length / 10
    assert 1 <= r["length/mean"] <= 6 and r["length/max"] <= 6
    assert 0.0 <= r["length/truncated_fraction"] <= 1.0
    assert r["rollout/tokens_per_sec"] > 0
    assert 0.0 <= r["groups/zero_variance_fraction"] <= 1.0
    assert abs(r["advantages/mean"]) < 1e-5  # group-centred
    assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
  assert {"time/sample_share", "time/update_share"} <= set(train[-1])
  assert set(final) >= {"reward/mean", "length/mean"} and final["step"] == 4
  assert os.path.exists(os.path.join(workdir, "checkpoints", "4"))


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_online_resume_is_exact(grpo_run, tmp_path):
  """Killed after its step-2 checkpoint and run again: the same rollouts and losses."""
  reference, _ = grpo_run
  workdir = tmp_path / "resumed"
  loop.run(config(workdir, steps=4))
  # Drop what followed the step-2 checkpoint, as a SIGKILL right after it would leave.
  import shutil
  shutil.rmtree(workdir / "checkpoints" / "4")
  loop.run(config(workdir, steps=4))
  got, want = rows(workdir), rows(reference)
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  for a, b in zip(got, want):
    for k in KEYS:
      assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["step"], k)


@pytest.mark.slow  # a second process compiles the sampler and step again (~1 min)
def test_eight_devices_sample_and_train_as_one(grpo_run, tmp_path):
  """The in-process runs use 8 fake CPU devices; the CLI run here has one."""
  reference, _ = grpo_run
  one = tmp_path / "one"
  proc = subprocess.run(
      train_cmd(one, "--role=online", "--loss=grpo", "--steps=4", "--log_every=1",
                "--eval_every=4", "--checkpoint_every=2", "--batch_size=8",
                "--eval_batch_size=8", f"--train_data={TINY}/prompts_train.jsonl",
                f"--eval_data={TINY}/prompts_eval.jsonl", f"--online.reward_fn={LENGTH}",
                "--online.num_generations=4", "--online.max_new_tokens=6", "--noplot"),
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for a, b in zip(rows(one), rows(reference)):
    # The same samples at every step, exactly.
    assert a["reward/mean"] == b["reward/mean"] and a["length/mean"] == b["length/mean"]
    # Step 1 starts from the same parameters: the same loss and gradient up to the 8-way
    # reduction order. Later steps follow the same samples from parameters that differ in
    # their last float32 digits, which the clipped ratios amplify step by step.
    tight = a["step"] == 1
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5 if tight else 1e-3), a["step"]
    for k in ("kl/mean", "grad_norm"):
      assert a[k] == pytest.approx(b[k], rel=1e-4 if tight else 5e-2, abs=1e-6), (a["step"], k)


def test_online_dpo_trains_pairs_of_best_and_worst(tmp_path):
  final = loop.run(config(tmp_path / "dpo", loss="dpo", steps=2))
  train = rows(tmp_path / "dpo")
  assert len(train) == 2 and all(np.isfinite(r["loss"]) for r in train)
  assert "rewards/margin" in train[0] and "reward/mean" in final


def test_updates_per_rollout_reuses_the_rollout(tmp_path):
  loop.run(config(tmp_path / "mu", steps=2, updates_per_rollout=3))
  train = rows(tmp_path / "mu")
  # The third update's ratio has moved off 1: the old log-probs were held fixed.
  assert any(abs(r["policy/ratio_mean"] - 1.0) > 1e-6 for r in train)


def test_a_bad_reward_function_stops_the_run_in_one_line(tmp_path):
  bad = os.path.join(ROOT, "tests", "online_rewards.py")
  proc = subprocess.run(
      train_cmd(tmp_path / "w", "--role=online", "--loss=grpo", "--steps=2",
                f"--train_data={TINY}/prompts_train.jsonl", "--eval_data=",
                f"--online.reward_fn={bad}:nan", "--online.max_new_tokens=4",
                "--batch_size=8"),
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("FATAL: step 0:") and "online_rewards.py" in last, last
  assert "Traceback" not in proc.stderr


def test_online_flags_are_checked_at_start_up(tmp_path):
  proc = subprocess.run(
      train_cmd(tmp_path / "w", "--role=online", "--loss=bt", "--steps=2",
                f"--train_data={TINY}/prompts_train.jsonl", "--eval_data=",
                f"--online.reward_fn={VERIFIER}", flagfile=TINY_FLAGS),
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "reward-role loss" in proc.stderr, proc.stderr[-2000:]


def test_prompts_come_from_any_prompt_bearing_file(tmp_path):
  from jaxpref.data import Tokenizer, prompts
  tok = Tokenizer.load(f"{TINY}/tokenizer.model")
  pairs = prompts.load(f"{TINY}/train.jsonl", tok)
  assert pairs.n == 2000 and pairs.texts[0]
  assert all(ids[0] == tok.bos_id for ids in pairs.ids[:5])
  bad = tmp_path / "p.jsonl"
  bad.write_text('{"prompt": "name a fruit."}\n{"question": "x"}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:2: .*prompt"):
    prompts.load(str(bad), tok)
  assert prompts.load(str(bad), tok, skip_invalid=True).skipped == 1
  padded, lengths = pairs.padded(np.arange(3), (4, 16, 32), tok.pad_id)
  assert padded.shape == (3, 16) and list(lengths) == [len(pairs.ids[i]) for i in range(3)]


@pytest.mark.slow  # two CLI runs and a killed one (~2 min)
def test_online_run_killed_with_sigkill_resumes_to_the_same_rollouts(tmp_path):
  """A `jaxpref-train --role=online` run killed after its first checkpoint and run again
  samples the same responses and logs the same losses as one that was not killed."""
  flags = ("--role=online", "--loss=grpo", "--steps=30", "--log_every=1", "--eval_every=30",
           "--checkpoint_every=5", "--batch_size=8", "--noplot",
           f"--train_data={TINY}/prompts_train.jsonl", "--eval_data=",
           f"--online.reward_fn={LENGTH}", "--online.num_generations=4",
           "--online.max_new_tokens=6", "--log_records")
  reference = tmp_path / "whole"
  proc = subprocess.run(train_cmd(reference, *flags), cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  killed = tmp_path / "killed"
  run = subprocess.Popen(train_cmd(killed, *flags), cwd=ROOT, env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts, deadline = killed / "checkpoints", time.time() + 600
  while time.time() < deadline and run.poll() is None:
    if ckpts.is_dir() and any(d.isdigit() and int(d) >= 5 for d in os.listdir(ckpts)):
      break
    time.sleep(0.05)
  assert run.poll() is None, "the run finished before it could be killed; make it longer"
  run.send_signal(signal.SIGKILL)
  run.wait()
  assert max(r["step"] for r in rows(killed)) < 30
  proc = subprocess.run(train_cmd(killed, *flags), cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got, want = rows(killed), rows(reference)
  assert [r["step"] for r in got] == list(range(1, 31))
  for a, b in zip(got, want):
    for k in ("reward/mean", "length/mean", "loss", "grad_norm"):
      assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["step"], k)
  read = lambda w: open(w / "records" / "process_0.jsonl").read()
  assert read(killed) == read(reference)  # the same prompts, step by step


@pytest.mark.parametrize("rule", ["keep", "mask", "penalize"])
def test_truncated_responses_are_kept_masked_or_penalised(tmp_path, rule):
  """--online.truncated on a rollout of 1 prompt x 2: response 0 ended on EOS, response 1
  ran out of tokens."""
  from jaxpref.train.online import Rollouts
  r = Rollouts.__new__(Rollouts)
  r.cfg = config(tmp_path, truncated=rule, truncated_score=-1.0, dynamic_sampling=False)
  r.o, r.stats, r.packs = r.cfg.online, {}, False  # the [B, K, T] layout, read row by row
  tokens = np.arange(2 * 6, dtype=np.int32).reshape(2, 6)
  starts, ends = np.array([2, 2]), np.array([4, 6])
  batch = r.layout(tokens, starts, ends, np.array([True, False]), np.array([[1.0, 3.0]]), 1, 2)
  np.testing.assert_array_equal(batch.loss_mask[0, 0], [0, 0, 1, 1, 0, 0])
  want_mask = [0, 0, 0, 0, 0, 0] if rule == "mask" else [0, 0, 1, 1, 1, 1]
  np.testing.assert_array_equal(batch.loss_mask[0, 1], want_mask)
  assert batch.valid[0].tolist() == [True, rule != "mask"]
  assert batch.scores[0].tolist() == [1.0, -1.0 if rule == "penalize" else 3.0]
  if rule == "mask":  # the one valid response is its group's only member: advantage 0
    assert batch.advantages[0].tolist() == [0.0, 0.0]
  else:  # two responses, group-normalised
    assert batch.advantages[0, 0] == -batch.advantages[0, 1] != 0


def test_shared_prompt_layout_trains_as_the_plain_one(tmp_path):
  """--online.shared_prompt (the default) runs each prompt once per group and the LM head
  on response tokens only; the same samples give the same loss, KL and gradient as the
  [B, K, T] layout, with updates_per_rollout=2 so the old log-probs are read too."""
  got = loop.run(config(tmp_path / "packed", steps=2, updates_per_rollout=2))
  want = loop.run(config(tmp_path / "plain", steps=2, updates_per_rollout=2,
                         shared_prompt=False))
  assert got["reward/mean"] == want["reward/mean"]
  for a, b in zip(rows(tmp_path / "packed"), rows(tmp_path / "plain")):
    assert a["reward/mean"] == b["reward/mean"] and a["length/mean"] == b["length/mean"]
    assert a["data/padding_efficiency"] > b["data/padding_efficiency"]
    for k in ("loss", "kl/mean", "grad_norm", "policy/ratio_mean"):
      assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
