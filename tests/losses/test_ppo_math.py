"""jaxpref/losses/ppo.py against float64 numpy references written from the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.losses import ppo


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _rollout(seed=0, b=4, t=9):
  """Rewards, values [B, T+1] and a mask with a prompt before and padding after each
  response (row 3 empty), float64."""
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=(b, t))
  values = rng.normal(size=(b, t + 1))
  mask = np.zeros((b, t))
  for i, (s, e) in enumerate([(2, 7), (1, 9), (4, 5), (0, 0)]):
    mask[i, s:e] = 1.0
  return rewards, values, mask


def gae_ref(rewards, values, mask, gamma, lam):
  """Schulman et al. 2016 eq. 16 by a loop over each row's masked positions."""
  b, t = rewards.shape
  adv = np.zeros((b, t))
  for i in range(b):
    idx = np.nonzero(mask[i])[0]
    v_next, a_next = values[i, t], 0.0
    for j in idx[::-1]:
      delta = rewards[i, j] + gamma * v_next - values[i, j]
      a_next = delta + gamma * lam * a_next
      adv[i, j], v_next = a_next, values[i, j]
  return adv, (adv + values[:, :t]) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_reference(gamma, lam):
  r, v, m = _rollout()
  adv, ret = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, lam)
  adv_ref, ret_ref = gae_ref(r, v, m, gamma, lam)
  assert adv.dtype == jnp.float64
  np.testing.assert_allclose(adv, adv_ref, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(ret, ret_ref, rtol=1e-12, atol=1e-12)
  assert np.all(np.asarray(adv)[m == 0] == 0)


def test_gae_lambda_one_is_reward_to_go_minus_value():
  r, v, m = _rollout(1)
  v[:, -1] = 0.0  # terminated responses: no bootstrap
  adv, ret = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), 1.0, 1.0)
  to_go = np.cumsum((r * m)[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(adv, (to_go - v[:, :-1]) * m, atol=1e-12)
  np.testing.assert_allclose(ret, to_go * m, atol=1e-12)  # returns = the reward-to-go


def test_gae_lambda_zero_is_the_td_error():
  r, v, m = _rollout(2)
  gamma = 0.9
  adv, _ = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, 0.0)
  for i in range(r.shape[0]):
    idx = list(np.nonzero(m[i])[0])
    for k, j in enumerate(idx):
      v_next = v[i, idx[k + 1]] if k + 1 < len(idx) else v[i, -1]
      assert float(adv[i, j]) == pytest.approx(r[i, j] + gamma * v_next - v[i, j], abs=1e-12)


def test_gae_values_without_bootstrap_column_bootstrap_zero():
  r, v, m = _rollout(3)
  v0 = v.copy()
  v0[:, -1] = 0.0
  a1, r1 = ppo.gae(jnp.asarray(r), jnp.asarray(v[:, :-1]), jnp.asarray(m), 0.95, 0.9)
  a2, r2 = ppo.gae(jnp.asarray(r), jnp.asarray(v0), jnp.asarray(m), 0.95, 0.9)
  np.testing.assert_allclose(a1, a2, atol=1e-12)
  np.testing.assert_allclose(r1, r2, atol=1e-12)
  # ... and the bootstrap column does matter when it is not 0
  a3, _ = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), 0.95, 0.9)
  assert not np.allclose(a1, a3)


def test_gae_leading_axes_and_bad_shapes():
  r, v, m = _rollout(4)
  adv, _ = ppo.gae(jnp.asarray(r)[None], jnp.asarray(v)[None], jnp.asarray(m)[None], 1.0, 0.9)
  np.testing.assert_allclose(adv[0], gae_ref(r, v, m, 1.0, 0.9)[0], atol=1e-12)
  with pytest.raises(ValueError, match="T\\+1 or T"):
    ppo.gae(jnp.asarray(r), jnp.asarray(v[:, :3]), jnp.asarray(m))


def test_whiten_mean_zero_std_one_over_the_mask():
  rng = np.random.default_rng(5)
  x = rng.normal(3.0, 5.0, size=(3, 7))
  m = (rng.uniform(size=(3, 7)) < 0.6).astype(float)
  w = np.asarray(ppo.whiten(jnp.asarray(x), jnp.asarray(m), eps=0.0))
  sel = w[m == 1]
  assert abs(sel.mean()) < 1e-12 and abs(sel.std() - 1.0) < 1e-12
  assert np.all(w[m == 0] == 0)
  ref = (x - x[m == 1].mean()) / x[m == 1].std()
  np.testing.assert_allclose(w[m == 1], ref[m == 1], rtol=1e-12)
  kept = np.asarray(ppo.whiten(jnp.asarray(x), jnp.asarray(m), shift_mean=False, eps=0.0))
  assert kept[m == 1].mean() == pytest.approx(x[m == 1].mean(), rel=1e-12)


def test_kl_penalised_rewards():
  rng = np.random.default_rng(6)
  lp, lr = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
  m = np.array([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], float)
  score = np.array([2.0, -1.0, 5.0])
  got = np.asarray(ppo.kl_penalised_rewards(*map(jnp.asarray, (score, lp, lr, m)), 0.05))
  ref = -0.05 * (lp - lr) * m
  ref[0, 3] += 2.0
  ref[1, 5] += -1.0  # row 2 has no response token: no reward anywhere
  np.testing.assert_allclose(got, ref, atol=1e-12)


def test_kl_controllers():
  assert ppo.fixed_kl_coef(0.05, kl=100.0, n_steps=64) == 0.05
  kw = dict(target=6.0, horizon=10000.0, n_steps=512)
  up = float(ppo.adaptive_kl_coef(0.2, 7.0, **kw))
  down = float(ppo.adaptive_kl_coef(0.2, 5.0, **kw))
  assert up == pytest.approx(0.2 * (1 + (1 / 6) * 512 / 10000), rel=1e-12)
  assert down == pytest.approx(0.2 * (1 - (1 / 6) * 512 / 10000), rel=1e-12)
  # Far from the target the proportional error is clipped at +-0.2.
  far_up = float(ppo.adaptive_kl_coef(0.2, 60.0, **kw))
  far_down = float(ppo.adaptive_kl_coef(0.2, 0.0, **kw))
  assert far_up == pytest.approx(0.2 * (1 + 0.2 * 512 / 10000), rel=1e-12)
  assert far_down == pytest.approx(0.2 * (1 - 0.2 * 512 / 10000), rel=1e-12)
  assert float(ppo.adaptive_kl_coef(0.2, 6.0, **kw)) == pytest.approx(0.2)
  # Iterated on a KL that falls as the coefficient grows, it settles at the target.
  coef, kl_of = 0.01, lambda c: 0.3 / c  # a toy: KL inversely proportional to the penalty
  for _ in range(3000):
    coef = float(ppo.adaptive_kl_coef(coef, kl_of(coef), target=6.0, horizon=100.0, n_steps=8))
  assert kl_of(coef) == pytest.approx(6.0, rel=1e-3)


def _ppo_ref(lp, old, adv, m, eps):
  c = np.exp(lp - old)
  per = np.maximum(-adv * c, -adv * np.clip(c, 1 - eps, 1 + eps))
  return (per * m).sum() / m.sum()


def test_ppo_policy_loss_value_and_gradient():
  rng = np.random.default_rng(7)
  lp, old, adv = rng.normal(size=(3, 2, 5)) * [[[0.4]], [[0.4]], [[1.0]]]
  m = (rng.uniform(size=(2, 5)) < 0.7).astype(float)
  loss, met = ppo.ppo_policy_loss(*map(jnp.asarray, (lp, old, adv, m)), eps=0.2)
  assert float(loss) == pytest.approx(_ppo_ref(lp, old, adv, m, 0.2), rel=1e-12)
  c = np.exp(lp - old)
  assert float(met["clip/fraction"]) == pytest.approx(
      ((np.abs(c - 1) > 0.2) * m).sum() / m.sum(), rel=1e-12)
  assert 0 < float(met["clip/fraction"]) < 1  # the draw exercises both branches
  g = np.asarray(jax.grad(lambda x: ppo.ppo_policy_loss(
      x, *map(jnp.asarray, (old, adv, m)), eps=0.2)[0])(jnp.asarray(lp)))
  h = 1e-6
  for idx in [(0, 1), (1, 2), (0, 4), (1, 0)]:
    up, dn = lp.copy(), lp.copy()
    up[idx] += h
    dn[idx] -= h
    fd = (_ppo_ref(up, old, adv, m, 0.2) - _ppo_ref(dn, old, adv, m, 0.2)) / (2 * h)
    assert g[idx] == pytest.approx(fd, abs=1e-7)
  # On policy (ratio 1) the gradient is -A m / sum(m): the policy gradient.
  g0 = jax.grad(lambda x: ppo.ppo_policy_loss(x, jnp.asarray(lp), jnp.asarray(adv),
                                              jnp.asarray(m))[0])(jnp.asarray(lp))
  np.testing.assert_allclose(g0, -adv * m / m.sum(), atol=1e-12)


def test_ppo_value_loss_is_clipped():
  v_old = np.array([[0.0, 1.0, 2.0, 0.5]])
  v = np.array([[0.5, 1.1, 1.0, 3.0]])
  ret = np.array([[1.0, 1.0, 0.0, 0.0]])
  m = np.array([[1.0, 1.0, 1.0, 0.0]])
  loss, met = ppo.ppo_value_loss(*map(jnp.asarray, (v, v_old, ret, m)), clip=0.2)
  v_clip = v_old + np.clip(v - v_old, -0.2, 0.2)
  per = 0.5 * np.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
  # by hand: token 0 clipped to 0.2 -> 0.5 * 0.64; token 1 unclipped 0.5 * 0.01;
  # token 2 clipped to 1.8 -> 0.5 * 3.24; token 3 off the mask
  assert per[0, :3].tolist() == pytest.approx([0.32, 0.005, 1.62])
  assert float(loss) == pytest.approx((0.32 + 0.005 + 1.62) / 3, rel=1e-12)
  assert float(met["value/clip_fraction"]) == pytest.approx(2 / 3)
  g = np.asarray(jax.grad(lambda x: ppo.ppo_value_loss(
      x, *map(jnp.asarray, (v_old, ret, m)), clip=0.2)[0])(jnp.asarray(v)))
  # clipped tokens get no gradient through V; the unclipped one gets (V - R) / 3
  np.testing.assert_allclose(g, [[0.0, 0.1 / 3, 0.0, 0.0]], atol=1e-12)


def test_ppo_loss_sums_the_parts():
  rng = np.random.default_rng(8)
  lp, old, adv, v, v_old, ret = map(jnp.asarray, rng.normal(size=(6, 2, 4)))
  m = jnp.ones((2, 4))
  total, met = ppo.ppo_loss(lp, old, adv, v, v_old, ret, m, vf_coef=0.5)
  pg, _ = ppo.ppo_policy_loss(lp, old, adv, m)
  vf, _ = ppo.ppo_value_loss(v, v_old, ret, m)
  assert float(total) == pytest.approx(float(pg + 0.5 * vf), rel=1e-12)
  assert {"loss/policy", "loss/value", "clip/fraction"} <= set(met)


def test_pipeline_jits():
  """rewards -> GAE -> whiten -> loss under one jit, finite, float32."""
  r, v, m = (jnp.asarray(x, jnp.float32) for x in _rollout(9))
  lp = jnp.zeros_like(r)

  @jax.jit
  def f(lp):
    rew = ppo.kl_penalised_rewards(jnp.ones(4, jnp.float32), lp, lp - 0.1, m, 0.05) + r
    adv, ret = ppo.gae(rew, v, m, 1.0, 0.95)
    return ppo.ppo_loss(lp, lp, ppo.whiten(adv, m), v[:, :-1], v[:, :-1], ret, m)[0]

  out = f(lp)
  assert out.dtype == jnp.float32 and np.isfinite(float(out))


def test_whiten_per_row():
  rng = np.random.default_rng(10)
  x = rng.normal(size=(3, 6)) * [[1.0], [10.0], [0.1]]
  m = np.ones((3, 6))
  m[1, 4:] = 0
  w = np.asarray(ppo.whiten(jnp.asarray(x), jnp.asarray(m), eps=0.0, axis=-1))
  for i in range(3):
    sel = w[i][m[i] == 1]
    assert abs(sel.mean()) < 1e-12 and abs(sel.std() - 1.0) < 1e-12
  assert np.all(w[1, 4:] == 0)
