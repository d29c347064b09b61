"""EGPO in the online loop (jaxpref/train/egpo_rollouts.py): one step's extrapolated
weights are theta_t - lr grad (the gradient taken here independently), the update starts
from theta_t again with the re-estimated targets, a short run logs `egpo/target_shift`,
and flags that do not apply are refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpref.train import loop, online
from jaxpref.train.config import OnlineConfig, OptimConfig
from jaxpref.train.optimizer import learning_rate_schedule, make_optimizer
from jaxpref.train.roles import forward as role_forward
from test_online import config, rows


def egpo_config(workdir, **kw):
  cfg = config(workdir, loss="egpo", steps=2, num_generations=2, **kw)
  # adam_eps=1: Adam's first step is about lr g / (|g| + 1), so float32 noise in a gradient
  # near 0 cannot flip a parameter's step (at eps=1e-8 it is lr sign(g)).
  return dataclasses.replace(cfg, optim=OptimConfig(learning_rate=0.5, warmup_steps=0,
                                                    adam_eps=1.0))


@pytest.mark.parametrize("extrapolation_lr", [0.0, 2.0])  # 0: the schedule's rate
def test_extrapolation_is_sgd_on_a_copy_and_the_update_starts_from_theta_t(tmp_path,
                                                                            extrapolation_lr):
  cfg = egpo_config(tmp_path, extrapolation_lr=extrapolation_lr)
  s = loop.setup(cfg)
  prog = online.program(s)
  theta0 = jax.tree.map(jnp.copy, prog.state.params)
  opt0 = jax.tree.map(jnp.copy, prog.state.opt_state)
  # The step's `Rollouts` (in the batch function's closure) holds the extrapolation;
  # capture the weights it hands the sampler for the opponents of step (b).
  prog_rollouts, = [c.cell_contents for c in prog.batch.__closure__
                    if isinstance(c.cell_contents, online.Rollouts)]
  ext, seen = prog_rollouts.egpo, {}
  sampling = ext.sampling_params

  def capture(p, r):
    seen["half"] = jax.tree.map(jnp.copy, p)
    return sampling(p, r)

  ext.sampling_params = capture
  host, placed = prog.batch(0)
  forward, loss_fn = role_forward(cfg, prog.graphdef), cfg.loss_spec.fn
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(forward(p, prog.ref, b))[0]))
  lr = extrapolation_lr or float(learning_rate_schedule(cfg.optim, cfg.steps)(0))
  assert lr > 0 and prog_rollouts.stats["egpo/extrapolation_lr"] == pytest.approx(lr)
  g_t = grad(theta0, ext.first_batch)
  want_half = jax.tree.map(lambda p, g: p - lr * g, theta0, g_t)
  for a, b in zip(jax.tree.leaves(seen["half"]), jax.tree.leaves(want_half)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
  assert max(lr * np.abs(np.asarray(g)).max() for g in jax.tree.leaves(g_t)) > 1e-2
  # the same responses, the targets re-estimated against pi_{theta_half}'s samples
  np.testing.assert_array_equal(host.tokens, ext.first_batch.tokens)
  shift = np.abs(host.scores - ext.first_batch.scores).mean()
  assert prog_rollouts.stats["egpo/target_shift"] == pytest.approx(shift, rel=1e-5, abs=1e-7)
  prog.state, metrics = prog.train_step(prog.state, prog.ref, placed)
  g_new = grad(theta0, host)
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  updates, _ = optimizer.update(g_new, opt0, theta0)
  want = optax.apply_updates(theta0, updates)
  for a, b in zip(jax.tree.leaves(prog.state.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def test_a_short_egpo_run_logs_the_target_shift_and_bad_flags_are_refused(tmp_path):
  final = loop.run(egpo_config(tmp_path / "run"))
  train = rows(tmp_path / "run")
  assert [r["step"] for r in train] == [1, 2]
  for r in train:
    assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert 0.0 <= r["egpo/target_shift"] <= 1.0 and r["egpo/extrapolation_lr"] > 0
    assert 0.0 < r["rewards/win_rate"] < 1.0 and np.isfinite(r["egpo/target_gap"])
    assert r["reward/mean"] > 0 and r["reward/opponent_mean"] > 0  # text length / 10
  assert final["step"] == 2
  with pytest.raises(ValueError, match="--online.prompt_pool does not apply"):
    loop.run(egpo_config(tmp_path / "a", prompt_pool=16))
  with pytest.raises(ValueError, match="--online.pairs=ranked"):
    loop.run(egpo_config(tmp_path / "b", pairs="ranked"))
  with pytest.raises(ValueError, match="updates_per_rollout must be 1"):
    loop.run(egpo_config(tmp_path / "c", updates_per_rollout=2))
  with pytest.raises(ValueError, match="combine with no other loss"):
    loop.run(dataclasses.replace(egpo_config(tmp_path / "d"), loss="0.5*egpo+grpo"))
  with pytest.raises(ValueError, match="extrapolation_lr=0.1 is EGPO's step"):
    loop.run(config(tmp_path / "e", loss="grpo", steps=1, extrapolation_lr=0.1))


class _Reward:
  """A length reward, scalar (each response's length) or pairwise (P(a beats b) =
  1 / 0.5 / 0 as a is longer / as long / shorter), with weight 2."""

  def __init__(self, pairwise):
    fn = lambda: None
    fn.pairwise = pairwise
    self.terms, self.pairwise = [(2.0, "fake", fn, None)], pairwise

  def parts(self, prompts, groups, **kw):
    if self.pairwise:
      p = [[2.0 * (0.5 + 0.5 * np.sign(len(a) - len(b))), 0.0] for a, b in groups]
      return np.array(p), {}
    return np.array([[float(len(t)) for t in g] for g in groups]), {}


@pytest.mark.parametrize("pairwise", [False, True])
def test_win_rates_average_the_preference_over_the_opponents(pairwise):
  from jaxpref.train import egpo_rollouts
  b, k = 2, 3
  pol_len, opp_len = np.array([1, 4, 2, 3, 3, 0]), np.array([2, 2, 5, 1, 3, 4])
  fake = lambda n: (np.zeros((len(n), 8)), np.zeros(len(n), int), n, np.ones(len(n), bool))
  r = type("R", (), {})()
  r.reward, r.o = _Reward(pairwise), OnlineConfig()
  r.decode = lambda tokens, starts, ends: ["x" * int(e) for e in ends]
  texts = r.decode(*fake(pol_len)[:3])
  own = ((None if pairwise else pol_len.reshape(b, k).astype(float)), pol_len,
         np.ones(b * k, bool))
  w, _ = egpo_rollouts._win_rates(r, ["p", "q"], texts, own, fake(opp_len), b, k, pairwise)
  d = pol_len.reshape(b, k)[:, :, None] - opp_len.reshape(b, k)[:, None, :]
  want = (0.5 + 0.5 * np.sign(d)) if pairwise else 1 / (1 + np.exp(-d))
  np.testing.assert_allclose(w, want.mean(-1), rtol=1e-12)
