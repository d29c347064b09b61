"""PPO in the online role (jaxpref/train/ppo.py): a short run whose value loss falls, the
KL controller carried in the train state, exact resume after a kill, and its start-up
checks."""

import json
import os
import shutil

import numpy as np
import pytest

from cli_util import ROOT
from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.losses import resolve
from jaxpref.train import loop
from jaxpref.train.config import DataConfig, OnlineConfig, RunConfig

TINY = make_tiny.OUT
LENGTH = os.path.join(ROOT, "tests", "online_rewards.py") + ":length"
KEYS = ("loss", "loss/policy", "loss/value", "reward/mean", "length/mean",
        "kl/sequence_mean", "ppo/kl_coef", "ppo/returns_mean", "grad_norm")


def config(workdir, steps=4, loss_hparams=None, lr=None, **online):
  o = dict(num_generations=4, max_new_tokens=6, reward_fn=LENGTH, advantage="plain", **online)
  kw = {}
  if lr is not None:
    from jaxpref.train.config import OptimConfig
    kw["optim"] = OptimConfig(learning_rate=lr, warmup_steps=0)
  return RunConfig(
      workdir=str(workdir), model=models.get_config("tiny"), role="online", loss="ppo",
      loss_hparams=dict(loss_hparams or {}), mesh="data:-1", steps=steps, log_every=1,
      eval_every=steps, checkpoint_every=2, progress=False, plot=False,
      online=OnlineConfig(**o), **kw,
      data=DataConfig(train_data=f"{TINY}/prompts_train.jsonl",
                      eval_data=f"{TINY}/prompts_eval.jsonl", batch_size=8, eval_batch_size=8,
                      tokenizer=f"{TINY}/tokenizer.model"))


def rows(workdir, split="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def ppo_config(workdir):
  """Four rollouts, two updates each, the adaptive KL controller aiming at KL 1."""
  return config(workdir, kl_target=1.0, kl_horizon=100.0, updates_per_rollout=2, lr=1e-2)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ppo")
  loop.run(ppo_config(workdir))
  return workdir


@pytest.mark.slow  # the run: ~20 s on 2 cores
def test_ppo_run_trains_its_value_head_and_moves_the_kl_coefficient(ppo_run):
  train = rows(ppo_run)
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  for r in train:
    assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert r["loss/value"] >= 0 and 0 <= r["clip/fraction"] <= 1
  # Step 1's rollout: the policy is the reference (KL 0) and the zero-initialised head
  # gives V = 0; the head then regresses onto the returns and its loss falls.
  assert train[0]["kl/sequence_mean"] == 0.0 and train[0]["ppo/old_values_mean"] == 0.0
  assert train[-1]["ppo/old_values_mean"] > 0.1
  assert train[-1]["loss/value"] < 0.5 * train[0]["loss/value"]
  # The adaptive controller: step 1 uses --online.kl_coef, each later step the previous
  # coefficient moved by c * clip((kl - target) / target, -0.2, 0.2) * n / horizon.
  assert train[0]["ppo/kl_coef"] == pytest.approx(0.2)
  for prev, cur in zip(train, train[1:]):
    err = np.clip((prev["kl/sequence_mean"] - 1.0) / 1.0, -0.2, 0.2)
    want = prev["ppo/kl_coef"] * (1 + err * 32 / 100.0)  # 8 prompts x 4 samples
    assert cur["ppo/kl_coef"] == pytest.approx(want, rel=1e-5)


@pytest.mark.slow  # a second run and its resume (~10 s)
def test_ppo_resume_is_exact(ppo_run, tmp_path):
  """Killed after its step-2 checkpoint (what followed removed, as a SIGKILL right after
  it would leave) and resumed: the same rollouts, losses and KL coefficients."""
  workdir = tmp_path / "resumed"
  cfg = ppo_config(workdir)
  loop.run(cfg)
  shutil.rmtree(workdir / "checkpoints" / "4")
  with open(workdir / "metrics.jsonl") as f:  # keep the rows a kill at step 2 leaves
    kept = [line for line in f if json.loads(line)["step"] <= 2]
  with open(workdir / "metrics.jsonl", "w") as f:
    f.writelines(kept)
  loop.run(cfg)
  got, want = rows(workdir), rows(ppo_run)
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  for a, b in zip(got, want):
    for k in KEYS:
      assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["step"], k)


@pytest.mark.slow  # two rollouts (~10 s)
def test_a_separate_value_model_starts_from_the_policy_and_trains(tmp_path):
  """--online.value=model: a second decoder under the value head, initialised from the
  policy's weights; the value loss moves its values off the zero-initialised head's 0."""
  import jax
  from flax import nnx
  from jaxpref.train import online, setup
  cfg = config(tmp_path / "vm", steps=2, value="model", lr=1e-2)
  prog = online.program(setup.setup(cfg))
  model = nnx.merge(prog.graphdef, prog.state.params)
  vm = model.value_model
  trunk = nnx.state(model, lambda path, _: path[0] != "value_model")
  mine, theirs = jax.tree.leaves(nnx.state(vm.decoder)), jax.tree.leaves(trunk)
  assert len(mine) == len(theirs)
  for a, b in zip(mine, theirs):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.any(np.asarray(vm.head.value_proj[...]))
  loop.run(cfg)
  train = rows(tmp_path / "vm")
  assert [r["step"] for r in train] == [1, 2]
  assert train[0]["ppo/old_values_mean"] == 0.0 and train[1]["ppo/old_values_mean"] != 0.0
  assert all(np.isfinite(r["loss/value"]) for r in train)


@pytest.mark.parametrize("online, lora, message", [
    ({"value": "critic"}, False, "--online.value must be one of head, model"),
    ({"value_init": "rm"}, False, "--online.value_init=rm starts a separate value model"),
    ({"lam": 1.5}, False, "--online.lam must be in [0, 1]"),
    ({"whiten": "group"}, False, "--online.whiten must be batch, row or none"),
    ({}, True, "would leave frozen in the LoRA base"),
])
def test_ppo_flags_are_checked_at_start_up(tmp_path, online, lora, message):
  import dataclasses
  from jaxpref.models.lora import LoraConfig
  from jaxpref.train.roles import online as role
  cfg = config(tmp_path, **online)
  if lora:
    cfg = dataclasses.replace(cfg, lora=LoraConfig(rank=2))
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")
                     .replace("(", r"\(").replace(")", r"\)")):
    role.check(cfg)


def test_only_ppo_asks_for_values():
  assert resolve("ppo").needs.values and resolve("ppo").role == "online"
  for name in ("grpo", "dapo", "gspo", "dpo"):
    assert not resolve(name).needs.values


def targets_ref(scores, old, ref, values, on, kl_coef, gamma, lam, whiten):
  """float64 from the formulas: r_t = -kl_coef (old_t - ref_t) on response tokens plus the
  score at the last; A_t = delta_t + gamma lam A_next over the response tokens (bootstrap
  0); R_t = A_t + V_t; whitening (x - mean) / sqrt(var + 1e-8) over the chosen tokens."""
  b, k, t = on.shape
  rewards = -kl_coef * (old - ref) * on
  adv = np.zeros_like(rewards)
  for i in range(b):
    for j in range(k):
      idx = np.nonzero(on[i, j])[0]
      if len(idx):
        rewards[i, j, idx[-1]] += scores[i, j]
      v_next = a_next = 0.0
      for p in idx[::-1]:
        a_next = rewards[i, j, p] + gamma * v_next - values[i, j, p] + gamma * lam * a_next
        adv[i, j, p], v_next = a_next, values[i, j, p]
  returns = (adv + values) * on

  def white(x, m):
    mean = (x * m).sum() / m.sum()
    var = ((x - mean) ** 2 * m).sum() / m.sum()
    return (x - mean) / np.sqrt(var + 1e-8) * m

  if whiten == "batch":
    out = white(adv, on)
  elif whiten == "row":
    out = np.zeros_like(adv)
    for i in range(b):
      for j in range(k):
        if on[i, j].any():
          out[i, j] = white(adv[i, j], on[i, j])
  else:
    out = adv
  return rewards, out, returns


@pytest.mark.parametrize("whiten,gamma,lam", [("batch", 1.0, 0.95), ("row", 0.9, 0.5),
                                              ("none", 1.0, 1.0)])
def test_rollout_targets_match_reference(whiten, gamma, lam):
  import jax
  import jax.numpy as jnp
  from jaxpref.train import ppo
  rng = np.random.default_rng(3)
  b, k, t = 2, 3, 9
  on = np.zeros((b, k, t))
  for (i, j), (s, e) in zip(np.ndindex(b, k), [(3, 8), (3, 5), (3, 9), (2, 7), (2, 3), (0, 0)]):
    on[i, j, s:e] = 1.0  # a prompt before each response, padding after; (1, 2) empty
  old, ref = rng.normal(-2, 1, (b, k, t)) * on, rng.normal(-2, 1, (b, k, t)) * on
  values, scores = rng.normal(0, 1, (b, k, t)) * on, rng.normal(0, 1, (b, k))
  with jax.enable_x64(True):
    rewards, _, adv, returns = ppo.targets(*map(jnp.asarray, (scores, old, ref, values, on)),
                                           0.05, gamma, lam, whiten)
  want_r, want_a, want_ret = targets_ref(scores, old, ref, values, on, 0.05, gamma, lam, whiten)
  np.testing.assert_allclose(rewards, want_r, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(adv, want_a, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(returns, want_ret, rtol=1e-12, atol=1e-12)


def _seq_cls_folder(cfg, path, model_cfg):
  """A random scalar reward model of `model_cfg` written as an HF seq-cls folder."""
  from flax import nnx
  from jaxpref.data.tokenizer import Tokenizer
  from jaxpref.models import hf_reward
  from jaxpref.models.heads import RewardModel
  rm = RewardModel(model_cfg, 1, rngs=nnx.Rngs(5))
  tok = Tokenizer.load(cfg.data.tokenizer)
  hf_reward.save(nnx.state(rm), model_cfg, str(path), pad_token_id=tok.pad_id,
                 eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
  shutil.copy(cfg.data.tokenizer, path / "tokenizer.model")
  return rm


def test_a_value_model_starts_from_a_reward_model(tmp_path):
  """--online.value_init: the value model's decoder and head are a scalar reward model's
  (here an HF sequence-classification folder written from a random tiny reward model)."""
  import jax
  from flax import nnx
  from jaxpref.train import online, setup
  cfg = config(tmp_path / "run", steps=1, value="model", value_init=str(tmp_path / "rm"))
  rm = _seq_cls_folder(cfg, tmp_path / "rm", cfg.model)
  prog = online.program(setup.setup(cfg))
  vm = nnx.merge(prog.graphdef, prog.state.params).value_model
  mine, theirs = jax.tree.leaves(nnx.state(vm.decoder)), jax.tree.leaves(nnx.state(rm.decoder))
  assert len(mine) == len(theirs)
  for a, b in zip(mine, theirs):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(vm.head.value_proj[...]), np.asarray(rm.head[...]),
                             rtol=1e-6)
  assert not np.any(np.asarray(vm.head.value_bias[...]))


def test_a_reward_model_of_another_shape_is_refused_in_one_line(tmp_path):
  from jaxpref.cli_errors import FlagError
  from jaxpref.train import online, setup
  cfg = config(tmp_path / "run", steps=1, value="model", value_init=str(tmp_path / "rm"))
  _seq_cls_folder(cfg, tmp_path / "rm", models.get_config("tiny", n_layers=1))
  with pytest.raises(FlagError, match=r"--online.value_init=.*rm: its parameters do not fit "
                     r"the policy's architecture \(first difference at"):
    online.program(setup.setup(cfg))
