"""jaxpref/losses/egpo.py: float64 references for one step, and the paper's qualitative result
on the tabular game (experiments/repro/egpo_game)."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.losses import egpo

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _load_run():
  spec = importlib.util.spec_from_file_location(
      "egpo_game_run", ROOT / "experiments/repro/egpo_game/run.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# numpy references, from the formulas (docs/game_methods.md#egpo)

def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _rho(theta, theta_ref):
  lse = lambda x: np.log(np.exp(x - x.max()).sum()) + x.max()
  return (theta - lse(theta)) - (theta_ref - lse(theta_ref))


def _oipo_grad(theta, theta_ref, P, opp, beta):
  """d/dtheta of N^-2 sum (d_y - d_y')^2, d = rho - P opp / beta: (4 / N)(d - mean d)."""
  d = _rho(theta, theta_ref) - P @ opp / beta
  return 4.0 / len(theta) * (d - d.mean())


def _egpo_ref(theta, theta_ref, P, beta, lr):
  half = theta - lr * _oipo_grad(theta, theta_ref, P, _softmax(theta), beta)
  return theta - lr * _oipo_grad(theta, theta_ref, P, _softmax(half), beta), half


def _gap_ref(theta, theta_ref, P, beta):
  pi, ref = _softmax(theta), _softmax(theta_ref)
  br = _softmax(np.log(ref) + P @ pi / beta)
  kl = lambda p: np.sum(p * np.log(p / ref))
  v = lambda p1, p2: p1 @ P @ p2 - beta * kl(p1) + beta * kl(p2)
  return v(br, pi) - v(pi, br)


def test_egpo_step_by_hand_on_a_2x2_game():
  # P = [[.5, .8], [.2, .5]], beta = .5, lr = .1, theta = (.2, -.2), theta_ref = 0.
  # For N = 2, w_0 - w_1 = P[0, 1] - 1/2 = 0.3 whatever the opponent, so
  # d_0 - d_1 = (rho_0 - rho_1) - 0.3 / 0.5 = 0.4 - 0.6 = -0.2 and the gradient is
  # (4 / 2)(d - mean d) = (d_0 - d_1)(1, -1) = (-0.2, 0.2): theta' = (0.22, -0.22).
  P = jnp.array([[0.5, 0.8], [0.2, 0.5]])
  theta, ref = jnp.array([0.2, -0.2]), jnp.zeros(2)
  half = egpo.egpo_extrapolate(theta, ref, P, 0.5, 0.1)
  new = egpo.egpo_step(theta, ref, P, 0.5, 0.1)
  assert new.dtype == jnp.float64
  np.testing.assert_allclose(half, [0.22, -0.22], atol=1e-15)
  np.testing.assert_allclose(new, [0.22, -0.22], atol=1e-15)
  # the loss itself: N^-2 * 2 * (d_0 - d_1)^2 = 0.02
  pi = jax.nn.softmax(theta)
  assert float(egpo.online_ipo_loss(theta, ref, P, pi, 0.5)) == pytest.approx(0.02, rel=1e-12)


def _game(seed=3, n=5):
  rng = np.random.default_rng(seed)
  low = np.tril(rng.uniform(size=(n, n)), -1)
  P = low + np.triu(1.0 - low.T, 1) + 0.5 * np.eye(n)
  return P, rng.normal(size=n), rng.normal(size=n)


def test_one_step_of_each_method_matches_float64_reference():
  P, theta, ref = _game()
  beta, lr = 0.1, 0.05
  new, half = _egpo_ref(theta, ref, P, beta, lr)
  j = lambda x: jnp.asarray(x)
  np.testing.assert_allclose(egpo.egpo_extrapolate(j(theta), j(ref), j(P), beta, lr), half,
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(egpo.egpo_update(j(theta), j(half), j(ref), j(P), beta, lr), new,
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(egpo.egpo_step(j(theta), j(ref), j(P), beta, lr), new,
                             rtol=1e-12, atol=1e-12)
  # the extragradient matters for N > 2: the update differs from online IPO's
  omd = egpo.online_ipo_step(j(theta), j(ref), j(P), beta, lr)
  np.testing.assert_allclose(omd, half, rtol=1e-12, atol=1e-12)
  assert np.max(np.abs(np.asarray(omd) - new)) > 1e-3
  # Nash-MD: the opponent is pi^(1 - m) pi_ref^m, m = 2 lr / N
  m = 2 * lr / len(theta)
  mix = _softmax((1 - m) * np.log(_softmax(theta)) + m * np.log(_softmax(ref)))
  np.testing.assert_allclose(egpo.nash_md_step(j(theta), j(ref), j(P), beta, lr),
                             theta - lr * _oipo_grad(theta, ref, P, mix, beta),
                             rtol=1e-12, atol=1e-12)


def test_online_ipo_2_gradient_matches_reference():
  # d/drho_k of sum pi_y pi_y' (rho_y - rho_y' - b_yy')^2 with b = (P - 1/2) / beta
  # antisymmetric is 4 pi_k sum_y' pi_y' (rho_k - rho_y' - b_ky'); through the softmax,
  # d/dtheta = g - pi sum(g).
  P, theta, ref = _game(4)
  beta, lr = 0.1, 0.05
  pi, rho, b = _softmax(theta), _rho(theta, ref), (P - 0.5) / beta
  g = 4 * pi * ((rho[:, None] - rho[None, :] - b) @ pi)
  want = theta - lr * (g - pi * g.sum())
  np.testing.assert_allclose(egpo.online_ipo_2_step(*map(jnp.asarray, (theta, ref, P)),
                                                    beta, lr), want, rtol=1e-12, atol=1e-12)


def test_duality_gap_matches_reference_and_vanishes_at_the_equilibrium():
  P, theta, ref = _game(5)
  beta = 0.1
  got = float(egpo.duality_gap(*map(jnp.asarray, (theta, ref, P)), beta))
  assert got == pytest.approx(_gap_ref(theta, ref, P, beta), rel=1e-12)
  assert got > 0
  # the regularised equilibrium is the fixed point theta = theta_ref + P pi / beta;
  # iterate its damped map to convergence and check the gap there
  t = ref.copy()
  for _ in range(20000):
    t = 0.99 * t + 0.01 * (ref + P @ _softmax(t) / beta)
  assert abs(float(egpo.duality_gap(*map(jnp.asarray, (t, ref, P)), beta))) < 1e-12


def test_batched_games_map_over_leading_axes():
  games = [_game(s, 4) for s in range(3)]
  P, theta, ref = (jnp.asarray(np.stack(x)) for x in zip(*games))
  batched = egpo.egpo_step(theta, ref, P, 0.1, 0.05)
  for i, (p, t, r) in enumerate(games):
    np.testing.assert_allclose(batched[i], _egpo_ref(t, r, p, 0.1, 0.05)[0], rtol=1e-12)


def test_egpo_gap_falls_fastest_on_the_tabular_game():
  """The paper's qualitative result, on the paper's game construction (N = 10, 10 games) and
  its two tabular schedules: EGPO's gap falls below 1e-6 on every game first."""
  run = _load_run()
  for beta, lr in [(0.1, 0.1), (0.01, 0.02)]:
    res = run.run_all(beta=beta, lr=lr, iters=1000)
    first = {m: run.first_below(g, 1e-6) for m, (g, _) in res.items()}
    assert first["EGPO"] >= 0, (beta, first)
    for m, k in first.items():
      if m != "EGPO":
        assert k == -1 or k > first["EGPO"], (beta, first)
    final = {m: float(np.median(g[-1])) for m, (g, _) in res.items()}
    assert final["EGPO"] <= min(final.values()) + 1e-15, (beta, final)
  # at beta = 0.01 the others have not converged in 1000 iterations at all
  assert min(v for m, v in final.items() if m != "EGPO") > 1e-2
  assert final["EGPO"] < 1e-8
