"""A shortened experiments/repro/suboptimal_on_policy: on the 100-response bandit whose
reward peaks where the reference has 0.2% of its mass, on-policy sampling with a negative
gradient (GRPO, online DPO) reaches the peak, offline DPO on reference samples does not,
and best-of-N SFT gets to 90% of the maximum reward later than GRPO."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_run():
  spec = importlib.util.spec_from_file_location(
      "suboptimal_on_policy_run", ROOT / "experiments/repro/suboptimal_on_policy/run.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_reference_and_reward_are_the_papers_bandit():
  run = _load_run()
  ref = np.exp(run.reference_logp())
  assert abs(ref.sum() - 1.0) < 1e-12 and ref.min() > 0
  # P(tanh X in the bin of 70) for X ~ Cauchy(-0.7, 0.4), from the CDF by hand
  lo, hi = np.arctanh(-1 + 2 * 70 / 100), np.arctanh(-1 + 2 * 71 / 100)
  want = (np.arctan((hi + 0.7) / 0.4) - np.arctan((lo + 0.7) / 0.4)) / np.pi
  assert abs(ref[70] - want) < 1e-12 and ref[70] < 0.003
  r = run.reward()
  assert r.argmax() == 70 and r[70] == 1.0 and abs(r[60] - np.exp(-1)) < 1e-12
  assert ref @ r < 0.05  # the reference scores 0.039


@pytest.mark.slow  # 4 methods compiled and run: 12 s of CPU, more on a loaded machine
def test_on_policy_negative_gradient_reaches_the_peak_offline_does_not():
  run = _load_run()
  seeds, steps = [0, 1, 2], 150
  res = {m: run.run_method(m, [0.1], seeds, steps) for m in
         ("GRPO", "online DPO", "offline DPO", run.SFT_ALL)}
  fin, peak, hits = {}, {}, {}
  for m, r in res.items():
    f, p, h = run.summary(r)
    fin[m], peak[m], hits[m] = f[0], p[0], h[0]
  for m in ("GRPO", "online DPO"):
    assert (fin[m] > 0.95).all() and (peak[m] > 0.9).all(), (m, fin[m], peak[m])
    assert (hits[m] >= 0).all(), (m, hits[m])
  # offline DPO: every label is as informative, but its samples rarely reach the peak
  assert (hits["offline DPO"] == -1).all() and (fin["offline DPO"] < 0.8).all(), fin
  assert (peak["offline DPO"] < 0.2).all(), peak
  # best-of-N SFT gets there too, later than GRPO on every seed
  assert (hits[run.SFT_ALL] > hits["GRPO"]).all(), hits


def test_tabular_gradients_match_float64_references():
  """The repro's losses on the table have the gradients their formulas give: for a response
  y, d log pi(y) / d theta = e_y - pi."""
  run = _load_run()
  rng = np.random.default_rng(0)
  n, b, k = 100, 4, 8
  with jax.enable_x64(True):
    logref = run.reference_logp(n)
    r = run.reward(n)
    theta = logref + rng.normal(scale=0.5, size=n)
    y = rng.integers(55, 85, size=(b, k))  # responses on the reward's hill: distinct rewards
    y[0] = 10  # a group whose samples all score the same (no pair, zero advantages)
    pi = np.exp(theta - theta.max())
    pi /= pi.sum()
    lp = np.log(pi)
    eye = np.eye(n)
    grad = lambda m: np.asarray(jax.grad(run.make_loss(m, jnp.asarray(logref), jnp.asarray(r)))(
        jnp.asarray(theta), jnp.asarray(y)))
    # GRPO on policy: d/dlp of -A r + beta k3 is -A + beta (1 - exp(ref - lp)); A is the
    # group-centred reward over its Bessel std + 1e-4; token, group and batch means are 1/(BK)
    ry = r[y]
    adv = (ry - ry.mean(1, keepdims=True)) / (ry.std(1, ddof=1, keepdims=True) + 1e-4)
    want = sum((-adv[i, j] + 0.04 * (1 - np.exp(logref[y[i, j]] - lp[y[i, j]])))
               * (eye[y[i, j]] - pi) for i in range(b) for j in range(k)) / (b * k)
    # advantages.compute works in float32 (its inputs are cast), hence the looser tolerance
    np.testing.assert_allclose(grad("GRPO"), want, rtol=1e-6, atol=1e-7)
    assert np.abs(want).max() > 1e-2
    # the pairs: first best and first worst; weight 1 when their rewards differ by >= 0.2
    best = y[np.arange(b), ry.argmax(1)]
    worst = y[np.arange(b), ry.argmin(1)]
    w = (r[best] - r[worst] >= 0.2).astype(float)
    assert w[0] == 0 and w[1:].sum() > 0
    # DPO: -logsig(beta h), h = (lp_w - ref_w) - (lp_l - ref_l); weighted mean over pairs
    h = (lp[best] - logref[best]) - (lp[worst] - logref[worst])
    sig = 1 / (1 + np.exp(0.1 * h))
    want = sum(-w[i] * 0.1 * sig[i] * (eye[best[i]] - eye[worst[i]]) for i in range(b)) / w.sum()
    np.testing.assert_allclose(grad("online DPO"), want, atol=1e-10)
    np.testing.assert_allclose(grad("offline DPO"), want, atol=1e-10)
    # SFT: -log pi(best) averaged over the counted groups (all, or the weighted pairs only)
    want = sum(-(eye[best[i]] - pi) for i in range(b)) / b
    np.testing.assert_allclose(grad(run.SFT_ALL), want, atol=1e-10)
    want = sum(-w[i] * (eye[best[i]] - pi) for i in range(b)) / w.sum()
    np.testing.assert_allclose(grad(run.SFT_PAIRS), want, atol=1e-10)
