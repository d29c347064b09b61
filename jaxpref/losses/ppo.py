"""PPO's pure pieces for RLHF with a value model (docs/game_methods.md#ppo).

The recipe of "Unpacking DPO and PPO" (Ivison et al. 2024), whose PPO follows Ziegler et
al. 2019 ("Fine-Tuning Language Models from Human Preferences") and Schulman et al. 2017:
  1. per-token reward: -kl_coef (logp_t - logp_ref_t) on every response token, plus the
     sequence reward on the last one (`kl_penalised_rewards`);
  2. GAE(gamma, lam) over each response's tokens with the value model's V_t (`gae`);
  3. advantages whitened over the batch's response tokens (`whiten`);
  4. the clipped policy loss and the clipped value loss (`ppo_policy_loss`,
     `ppo_value_loss`), both token means over the batch;
  5. kl_coef fixed or moved by Ziegler et al.'s proportional controller (`adaptive_kl_coef`).
Every function is pure jnp over any leading shape [...] and a token axis T last; `mask`
is 1 on response tokens (their log-probs, values and rewards count) and 0 elsewhere.
The registered `ppo` loss (`losses/ppo_loss.py`) and the rollout side
(`train/ppo.py`) use them (docs/online.md#ppo).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

sg = jax.lax.stop_gradient


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """sum(x mask) / sum(mask) over every axis (a token mean over the batch), scalar."""
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0,
        lam: float = 0.95):
  """Generalized advantage estimation (Schulman et al. 2016, eq. 16) per response token.

  rewards [..., T], mask [..., T]; values [..., T+1] (the last column the bootstrap value
  of the state after the row's last response token: 0 for a response that ended) or
  [..., T] (bootstrap 0). Over the masked tokens only, in order (tokens off the mask are
  skipped, so a prompt before or padding after the response does not cut the chain):
    delta_t = r_t + gamma V_next - V_t,  A_t = delta_t + gamma lam A_next,
  with (V_next, A_next) those of the next masked token, (bootstrap, 0) after the last.
  Returns (advantages [..., T], returns = A_t + V_t [..., T]), both 0 off the mask and
  without gradient (they are targets).
  """
  rewards, mask = sg(rewards), sg(mask).astype(rewards.dtype)
  t = rewards.shape[-1]
  values = sg(values).astype(rewards.dtype)
  if values.shape[-1] == t + 1:
    boot, values = values[..., t], values[..., :t]
  elif values.shape[-1] == t:
    boot = jnp.zeros(values.shape[:-1], rewards.dtype)
  else:
    raise ValueError(f"gae: values' last axis must be T+1 or T = {t}, got {values.shape}")
  if values.shape != rewards.shape or mask.shape != rewards.shape:
    raise ValueError(f"gae: rewards {rewards.shape}, values {values.shape} and mask "
                     f"{mask.shape} must share [..., T]")

  def step(carry, x):  # carry: (V_next, A_next) [...]; x: (r_t, V_t, m_t) [...]
    v_next, a_next = carry
    r, v, m = x
    a = r + gamma * v_next - v + gamma * lam * a_next
    on = m > 0
    new = (jnp.where(on, v, v_next), jnp.where(on, a, a_next))
    return new, jnp.where(on, a, 0.0)

  xs = tuple(jnp.moveaxis(x, -1, 0) for x in (rewards, values, mask))  # [T, ...]
  _, adv = jax.lax.scan(step, (boot, jnp.zeros_like(boot)), xs, reverse=True)
  adv = jnp.moveaxis(adv, 0, -1)
  return adv, (adv + values) * mask


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8,
           axis=None) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the masked entries, 0 off the mask.

  axis=None: over the whole batch (TRL's `masked_whiten`); axis=-1: per row. The
  population variance (ddof 0), so the result has mean 0 and std 1 over the mask;
  `shift_mean=False` adds the mean back (the option TRL uses for rewards).
  """
  mask = mask.astype(x.dtype)
  keep = axis is not None
  n = jnp.maximum(jnp.sum(mask, axis=axis, keepdims=keep), 1.0)
  mean = jnp.sum(x * mask, axis=axis, keepdims=keep) / n
  var = jnp.sum(jnp.square(x - mean) * mask, axis=axis, keepdims=keep) / n
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


def last_token(mask: jax.Array) -> jax.Array:
  """One-hot [..., T] of each row's last masked position (all 0 for an empty row)."""
  t = mask.shape[-1]
  pos = jnp.arange(t)
  last = jnp.max(jnp.where(mask > 0, pos, -1), axis=-1, keepdims=True)  # [..., 1]
  return (pos == last).astype(mask.dtype)


def kl_penalised_rewards(score: jax.Array, logp: jax.Array, logp_ref: jax.Array,
                         mask: jax.Array, kl_coef) -> jax.Array:
  """Ziegler et al. 2019 eq. 2 per token: r_t = -kl_coef (logp_t - logp_ref_t) on every
  response token, plus the sequence reward `score` [...] on the last one; [..., T].

  logp / logp_ref are the sampling policy's and the reference's per-token log-probs
  [..., T] (the sampled tokens'); logp - logp_ref is the one-sample (k1) KL estimate.
  """
  mask = mask.astype(logp.dtype)
  kl = (sg(logp) - sg(logp_ref)) * mask
  return -kl_coef * kl + sg(score)[..., None] * last_token(mask)


def fixed_kl_coef(kl_coef, kl=None, n_steps: int = 1):
  """The fixed controller: kl_coef unchanged (the signature of `adaptive_kl_coef`)."""
  del kl, n_steps
  return kl_coef


def adaptive_kl_coef(kl_coef, kl, *, target: float, horizon: float, n_steps: int = 1):
  """Ziegler et al. 2019 §2.2's proportional controller, after a batch of n_steps samples
  whose mean KL(pi || ref) was `kl`:
    e = clip((kl - target) / target, -0.2, 0.2),  kl_coef <- kl_coef (1 + e n_steps / horizon).
  KL above the target raises the coefficient, below lowers it, by at most 0.2 n / horizon.
  """
  err = jnp.clip((kl - target) / target, -0.2, 0.2)
  return kl_coef * (1.0 + err * n_steps / horizon)


def ppo_policy_loss(policy_tok: jax.Array, old_tok: jax.Array, adv_tok: jax.Array,
                    mask: jax.Array, eps: float = 0.2):
  """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss, per token:
    l_t = max(-A_t c_t, -A_t clip(c_t, 1 - eps, 1 + eps)),  c_t = exp(lp_t - old_t),
  token mean over the batch's masked tokens. policy_tok carries the gradient; old_tok
  (the sampling policy's) and adv_tok (whitened GAE advantages) do not. All [..., T].
  Returns (loss, metrics).
  """
  mask = mask.astype(policy_tok.dtype)  # 0/1, or per-token weights (a group's weight)
  # 0 off the mask, so exp never overflows; the mask's weights stay out of the ratio.
  log_ratio = jnp.where(mask > 0, policy_tok - sg(old_tok), 0.0)
  ratio = jnp.exp(log_ratio)
  adv = sg(adv_tok)
  per_tok = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - eps, 1.0 + eps))
  clipped = (jnp.abs(ratio - 1.0) > eps).astype(ratio.dtype)
  metrics = {
      "loss/policy": sg(_masked_mean(per_tok, mask)),
      "clip/fraction": _masked_mean(sg(clipped), mask),
      "policy/ratio_mean": _masked_mean(sg(ratio), mask),
      # Schulman's k3 estimate of KL(old || new), the usual early-stopping signal.
      "policy/approx_kl": _masked_mean(sg(jnp.expm1(log_ratio) - log_ratio), mask),
  }
  return _masked_mean(per_tok, mask), metrics


def ppo_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
                   mask: jax.Array, clip: float = 0.2):
  """The clipped value loss of PPO2 (as in EasyLM's PPO, used by "Unpacking DPO and PPO"):
    0.5 max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -clip, clip) - R_t)^2),
  token mean over the masked tokens; values carry the gradient, old_values (the rollout's)
  and returns (GAE's A + V_old) do not. All [..., T]. Returns (loss, metrics).
  """
  mask = mask.astype(values.dtype)
  old, ret = sg(old_values), sg(returns)
  v_clip = old + jnp.clip(values - old, -clip, clip)
  per_tok = 0.5 * jnp.maximum(jnp.square(values - ret), jnp.square(v_clip - ret))
  clipped = (jnp.square(v_clip - ret) > jnp.square(values - ret)).astype(values.dtype)
  metrics = {
      "loss/value": sg(_masked_mean(per_tok, mask)),
      "value/clip_fraction": _masked_mean(sg(clipped), mask),
      "value/mean": _masked_mean(sg(values), mask),
  }
  return _masked_mean(per_tok, mask), metrics


def ppo_loss(policy_tok, old_tok, adv_tok, values, old_values, returns, mask, *,
             eps: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1):
  """policy loss + vf_coef * value loss (vf_coef 0.1: EasyLM's and TRL's default); one
  backward pass reaches both a separate value model and a value head on the trunk."""
  pg, m_pg = ppo_policy_loss(policy_tok, old_tok, adv_tok, mask, eps)
  vf, m_vf = ppo_value_loss(values, old_values, returns, mask, value_clip)
  return pg + vf_coef * vf, {**m_pg, **m_vf}
