"""EGPO, online IPO and Nash-MD on the tabular preference game (docs/game_methods.md#egpo).

Zhou et al. 2025, "Extragradient Preference Optimization (EGPO): Beyond Last-Iterate
Convergence for Nash Learning from Human Feedback" (arXiv 2503.08942, COLM 2025), as its
official `simulations/` code runs it. The game: N responses, a preference matrix P [N, N]
with P + P^T = 1 (P[y, y'] = Prob(y beats y')), a reference policy softmax(theta_ref) and
the KL-regularised value
  V(pi1, pi2) = pi1^T P pi2 - beta KL(pi1 || ref) + beta KL(pi2 || ref).
The policy is softmax(theta), theta [N] (any leading batch shape [...] works: every
function maps over it). All updates are plain gradient steps theta <- theta - lr grad.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

sg = jax.lax.stop_gradient


def log_ratio(theta: jax.Array, theta_ref: jax.Array) -> jax.Array:
  """rho_y = log pi(y) - log pi_ref(y), [..., N]."""
  return jax.nn.log_softmax(theta, -1) - jax.nn.log_softmax(theta_ref, -1)


def win_rates(P: jax.Array, pi: jax.Array) -> jax.Array:
  """w_y = P(y beats pi) = sum_y' P[y, y'] pi(y'), [..., N]."""
  return jnp.einsum("...ij,...j->...i", P, pi)


def online_ipo_loss(theta, theta_ref, P, opponent, beta: float) -> jax.Array:
  """Online IPO's loss, the paper's exact ("OIPO-1") form, scalar per game [...]:
    l(theta) = N^-2 sum_{y, y'} [(rho_y - rho_y') - (w_y - w_y') / beta]^2,
  w = P sg(opponent); y, y' range uniformly over the N responses. Its gradient is
  (4 / N)(d - mean(d)), d = rho - w / beta, so one step with lr is online mirror descent
  with step eta = 4 lr / (N beta) toward pi_ref exp(w / beta).
  """
  rho = log_ratio(theta, theta_ref)
  c = win_rates(P, sg(opponent)) / beta
  d = rho - c
  n = theta.shape[-1]
  diff = d[..., :, None] - d[..., None, :]  # [..., N, N]
  return jnp.sum(jnp.square(diff), axis=(-2, -1)) / n**2


def online_ipo_loss_2(theta, theta_ref, P, beta: float) -> jax.Array:
  """The paper's second online IPO form ("OIPO-2"), both responses from sg(pi):
    l(theta) = sum_{y, y'} pi(y) pi(y') [(rho_y - rho_y') - (P[y, y'] - 1/2) / beta]^2."""
  rho = log_ratio(theta, theta_ref)
  pi = sg(jax.nn.softmax(theta, -1))
  diff = rho[..., :, None] - rho[..., None, :] - (P - 0.5) / beta
  return jnp.einsum("...i,...ij,...j->...", pi, jnp.square(diff), pi)


def _sgd(loss_fn, theta, lr: float):
  """theta - lr grad(sum over games of loss_fn)(theta): games are independent."""
  return theta - lr * jax.grad(lambda t: jnp.sum(loss_fn(t)))(theta)


def online_ipo_step(theta, theta_ref, P, beta: float, lr: float):
  """Online IPO (= OMD): one step on l(theta; opponent = pi_theta)."""
  pi = jax.nn.softmax(theta, -1)
  return _sgd(lambda t: online_ipo_loss(t, theta_ref, P, pi, beta), theta, lr)


def egpo_extrapolate(theta, theta_ref, P, beta: float, lr: float):
  """EGPO's extrapolation step (Algorithm 1, first half):
  theta_half = theta_t - lr grad l(theta_t; opponent pi_{theta_t})."""
  return online_ipo_step(theta, theta_ref, P, beta, lr)


def egpo_update(theta, theta_half, theta_ref, P, beta: float, lr: float):
  """EGPO's update step: theta_{t+1} = theta_t - lr grad l(theta_t; opponent pi_{theta_half})
  -- the gradient at theta_t, but against the extrapolated policy (the extragradient)."""
  pi_half = jax.nn.softmax(theta_half, -1)
  return _sgd(lambda t: online_ipo_loss(t, theta_ref, P, pi_half, beta), theta, lr)


def egpo_step(theta, theta_ref, P, beta: float, lr: float):
  """One EGPO iteration: extrapolate, then update from theta_t (two gradient calls)."""
  half = egpo_extrapolate(theta, theta_ref, P, beta, lr)
  return egpo_update(theta, half, theta_ref, P, beta, lr)


def nash_md_mixture(theta, theta_ref, mix: float) -> jax.Array:
  """Nash-MD's geometric mixture (Munos et al. 2024, "Nash Learning from Human Feedback"):
  pi_mix proportional to pi^(1 - mix) pi_ref^mix, mix = eta beta; [..., N]."""
  logits = ((1.0 - mix) * jax.nn.log_softmax(theta, -1)
            + mix * jax.nn.log_softmax(theta_ref, -1))
  return jax.nn.softmax(logits, -1)


def nash_md_step(theta, theta_ref, P, beta: float, lr: float):
  """Nash-MD as the EGPO code runs it: the online IPO step against pi_mix, whose weight
  mix = eta beta uses eta = 2 lr / (beta N) (so mix = 2 lr / N)."""
  n = theta.shape[-1]
  mix = nash_md_mixture(theta, theta_ref, 2.0 * lr / n)
  return _sgd(lambda t: online_ipo_loss(t, theta_ref, P, mix, beta), theta, lr)


def online_ipo_2_step(theta, theta_ref, P, beta: float, lr: float):
  """One step on the OIPO-2 loss."""
  return _sgd(lambda t: online_ipo_loss_2(t, theta_ref, P, beta), theta, lr)


def _kl(theta, theta_ref) -> jax.Array:
  return jnp.sum(jax.nn.softmax(theta, -1) * log_ratio(theta, theta_ref), -1)


def game_value(P, beta: float, theta1, theta2, theta_ref) -> jax.Array:
  """V(pi1, pi2) = pi1^T P pi2 - beta KL(pi1 || ref) + beta KL(pi2 || ref), [...]."""
  pi1, pi2 = jax.nn.softmax(theta1, -1), jax.nn.softmax(theta2, -1)
  return (jnp.einsum("...i,...ij,...j->...", pi1, P, pi2)
          - beta * _kl(theta1, theta_ref) + beta * _kl(theta2, theta_ref))


def best_response(theta, theta_ref, P, beta: float) -> jax.Array:
  """argmax_pi V(pi, pi_theta): logits theta_ref + P pi_theta / beta (a Gibbs policy).
  By P + P^T = 1 it is also the minimising player's best response to pi_theta."""
  return theta_ref + win_rates(P, jax.nn.softmax(theta, -1)) / beta


def duality_gap(theta, theta_ref, P, beta: float) -> jax.Array:
  """The paper's metric, DualGap(pi) = max_pi1 V(pi1, pi) - min_pi2 V(pi, pi2) >= 0, zero
  only at the regularised game's Nash equilibrium; [...]."""
  br = best_response(theta, theta_ref, P, beta)
  return (game_value(P, beta, br, theta, theta_ref)
          - game_value(P, beta, theta, br, theta_ref))


STEPS = {
    "EGPO": egpo_step,
    "Online IPO 1 (OMD)": online_ipo_step,
    "Online IPO 2": online_ipo_2_step,
    "Nash-MD": nash_md_step,
}


def run(method: str, theta0, theta_ref, P, beta: float, lr: float, iters: int):
  """`iters` steps of `method` from theta0; the duality gap before every step and after
  the last, [iters + 1, ...] (a lax.scan: one compile)."""
  step = STEPS[method]

  def body(theta, _):
    return step(theta, theta_ref, P, beta, lr), duality_gap(theta, theta_ref, P, beta)

  last, gaps = jax.lax.scan(body, theta0, None, length=iters)
  return jnp.concatenate([gaps, duality_gap(last, theta_ref, P, beta)[None]], 0)
