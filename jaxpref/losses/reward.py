"""Reward-model and general-preference-model objectives (docs/reward_models.md#formulas-and-sources).

The reward role (`jaxpref/train/roles/reward.py`) fills `RewardOutputs.reward` [B, 2] with a
scalar reward per response (chosen first), or `RewardOutputs.embed` [B, 2, 2k] with a
preference embedding per response. `dr = r_w - r_l`; a per-pair strength `mu = s_w - s_l`
comes from the records' `chosen_score`/`rejected_score` (`RewardOutputs.scores`): to use
an ensemble's strength (docs/reward_models.md#ensemble-preference-strength), write `chosen_score = mu, rejected_score = 0`, or map
`jaxpref-strength`'s `ensemble_chosen_reward`/`ensemble_rejected_reward` onto them. Records without
scores give the strength losses nothing to act on: they are then `bt` (as `osp` is `dpo`).

Every loss here reports the same metrics: `rewards/accuracy` (a tie counts half),
`rewards/margin` (mean dr, or the GPM score s), and the calibration of the model's
preference probability sig(dr/tau) as per-bin sums that `finish_metrics` turns into
`rewards/ece` after averaging over batches, so the eval ECE is exact over the whole set.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from jaxpref.losses.common import half_wins, smoothed_logistic, weighted_mean
from jaxpref.losses.pairwise import flip_rate
from jaxpref.losses.registry import register
from jaxpref.types import RewardOutputs

logsig = jax.nn.log_sigmoid
ECE_BINS = 10


def _rewards(lp: RewardOutputs, who: str) -> jax.Array:
  """The scalar rewards [B, 2] (chosen, rejected)."""
  if lp.embed is not None:
    raise ValueError(f"{who} reads a scalar reward per response; the run has a preference "
                     f"embedding head (--reward_dim={lp.embed.shape[-1]}): use --reward_dim=1")
  chex.assert_rank(lp.reward, 2)
  if lp.reward.shape[1] != 2:
    raise ValueError(f"{who} needs pairs (K=2, chosen first), got groups of {lp.reward.shape[1]}")
  return lp.reward


def calibration_bins(prob: jax.Array, weight: jax.Array) -> dict[str, jax.Array]:
  """Signed per-bin calibration gaps of P(chosen wins) = `prob` [B], as weighted means.

  Both orientations of a pair count (`prob` with outcome 1, `1 - prob` with outcome 0), in
  ECE_BINS equal-width bins over [0, 1]; the ECE is the sum of the bins' |gap|. This is the
  confidence ECE of Guo et al. (2017) on max(p, 1-p), written as means so that averaging
  over batches first and taking |.| after gives the ECE of the whole set.
  """
  def bin_of(p):
    return jnp.clip(jnp.floor(p * ECE_BINS), 0, ECE_BINS - 1).astype(jnp.int32)
  hit_w = jax.nn.one_hot(bin_of(prob), ECE_BINS) * (prob - 1.0)[:, None]  # [B, bins]
  hit_l = jax.nn.one_hot(bin_of(1.0 - prob), ECE_BINS) * (1.0 - prob)[:, None]
  gaps = 0.5 * (hit_w + hit_l)
  return {f"calib/gap_{b}": weighted_mean(gaps[:, b], weight) for b in range(ECE_BINS)}


def reward_metrics(lp: RewardOutputs, margin: jax.Array, prob: jax.Array,
                   rewards: jax.Array | None = None) -> dict[str, jax.Array]:
  """margin [B]: dr or the GPM score; prob [B]: the model's P(chosen wins); rewards [B, 2]."""
  margin, prob = jax.lax.stop_gradient(margin), jax.lax.stop_gradient(prob)
  m = lambda x: weighted_mean(x, lp.weight)
  win, tie = half_wins(margin)
  out = {"rewards/accuracy": m(win), "rewards/ties": m(tie), "rewards/margin": m(margin),
         **calibration_bins(prob, lp.weight)}
  if rewards is not None:
    r = jax.lax.stop_gradient(rewards)
    out.update({"rewards/chosen": m(r[:, 0]), "rewards/rejected": m(r[:, 1]),
                "rewards/mean": m(r.mean(1)), "rewards/sq_mean": m((r * r).mean(1))})
  return out


def finish_metrics(metrics: dict) -> dict:
  """Host-side, after averaging: per-bin gaps -> `rewards/ece`, second moment -> `rewards/std`.

  Other metrics pass through; a dict without these keys (the policy role) is unchanged.
  """
  out = {k: v for k, v in metrics.items() if not k.startswith("calib/gap_") and k != "rewards/sq_mean"}
  gaps = [float(v) for k, v in metrics.items() if k.startswith("calib/gap_")]
  if gaps:
    out["rewards/ece"] = sum(abs(g) for g in gaps)
  if "rewards/sq_mean" in metrics:
    mean = float(metrics["rewards/mean"])
    out["rewards/std"] = math.sqrt(max(float(metrics["rewards/sq_mean"]) - mean * mean, 0.0))
  return out


def _strength(lp: RewardOutputs) -> jax.Array:
  """mu = s_w - s_l [B], or zeros when the records carry no scores."""
  if lp.scores is None:
    return jnp.zeros(lp.reward.shape[:1], jnp.float32)
  return lp.scores[:, 0] - lp.scores[:, 1]


def _bt_result(lp: RewardOutputs, per_pair: jax.Array, r: jax.Array, tau: float, **terms):
  d = r[:, 0] - r[:, 1]
  metrics = reward_metrics(lp, d, jax.nn.sigmoid(d / tau), r)
  metrics.update({f"loss/{k}": v for k, v in terms.items()})
  return weighted_mean(per_pair, lp.weight), metrics


@register("bt", role="reward", ranges={"label_smoothing": "[0, 0.5]", "tau": "> 0"})
def bt(lp: RewardOutputs, *, margin: float = 0.0, tau: float = 1.0, label_smoothing: float = 0.0,
       center_rewards: float = 0.0):
  """Bradley-Terry reward-model loss (docs/reward_models.md#bt; Secrets of RLHF II smoothing).

  l = -(1-eps) logsig(z) - eps logsig(-z) + c (r_w + r_l)^2,  z = (r_w - r_l - margin)/tau.
  eps per pair from the records' `label_smoothing` field when present; c is TRL's
  `center_rewards_coefficient` (keeps rewards centred on 0 without changing dr).
  """
  r = _rewards(lp, "bt")
  z = (r[:, 0] - r[:, 1] - margin) / tau
  per = smoothed_logistic(z, flip_rate(lp, label_smoothing))
  centre = (r[:, 0] + r[:, 1]) ** 2
  if center_rewards:
    per = per + center_rewards * centre
  return _bt_result(lp, per, r, tau, center=weighted_mean(centre, lp.weight))


@register("bt_adaptive_margin", role="reward", ranges={"tau": "> 0"})
def bt_adaptive_margin(lp: RewardOutputs, *, margin_scale: float = 1.0, margin_clip: float = 0.0,
                       tau: float = 1.0):
  """Secrets of RLHF in LLMs Part II: Reward Modeling, adaptive margin (docs/reward_models.md#bt_adaptive_margin, a reading).

  l = -logsig((r_w - r_l - f(mu))/tau),  f(mu) = margin_scale * clip(mu, -c, c) (c =
  margin_clip, 0: no clip): strongly preferred pairs must be separated more, and pairs an
  ensemble doubts (mu < 0) are asked less than a tie.
  """
  r = _rewards(lp, "bt_adaptive_margin")
  mu = _strength(lp)
  if margin_clip:
    mu = jnp.clip(mu, -margin_clip, margin_clip)
  per = -logsig((r[:, 0] - r[:, 1] - margin_scale * mu) / tau)
  return _bt_result(lp, per, r, tau)


@register("bt_flip", role="reward", ranges={"tau": "> 0"})
def bt_flip(lp: RewardOutputs, *, flip_below: float = 0.0, tau: float = 1.0):
  """Secrets of RLHF in LLMs Part II, label flipping (docs/reward_models.md#bt_flip, a reading).

  Pairs whose strength mu is below `flip_below` are taken as mislabelled and trained the
  other way: l = -logsig(sign * (r_w - r_l)/tau), sign = -1 if mu < flip_below else 1.
  The metrics still score the records' labels; `rewards/flipped` is the flipped share.
  """
  r = _rewards(lp, "bt_flip")
  flip = (_strength(lp) < flip_below) & (lp.scores is not None)  # no scores: nothing flips
  sign = jnp.where(flip, -1.0, 1.0)
  per = -logsig(sign * (r[:, 0] - r[:, 1]) / tau)
  loss, metrics = _bt_result(lp, per, r, tau)
  metrics["rewards/flipped"] = weighted_mean(flip.astype(jnp.float32), lp.weight)
  return loss, metrics


@register("bt_soft", role="reward", ranges={"tau": "> 0"})
def bt_soft(lp: RewardOutputs, *, tau: float = 1.0, score_temperature: float = 1.0):
  """Soft-label BT for judge strengths (Self-Reference AI feedback, docs/reward_models.md#bt_soft, a reading).

  l = -p logsig(dr/tau) - (1-p) logsig(-dr/tau),  p = sig(mu / score_temperature): the
  judge's probability that the chosen response is better. For a judge probability p,
  write chosen_score = log(p/(1-p)) and rejected_score = 0. Minimised at dr/tau = logit p.
  """
  r = _rewards(lp, "bt_soft")
  p = jax.nn.sigmoid(_strength(lp) / score_temperature) if lp.scores is not None else 1.0
  per = smoothed_logistic((r[:, 0] - r[:, 1]) / tau, 1.0 - p)
  return _bt_result(lp, per, r, tau)


def gpm_score(v_w: jax.Array, v_l: jax.Array, gate: jax.Array | None = None) -> jax.Array:
  """<R(x) v_w, v_l> with R(x) = blockdiag(lambda_b(x) [[0, -1], [1, 0]]):
  sum_b lambda_b (v_w[2b] v_l[2b+1] - v_w[2b+1] v_l[2b]).

  [..., 2k] x [..., 2k] (x gate [..., k], the eigenvalues lambda >= 0; None: all 1) -> [...];
  skew-symmetric for every gate, so s(a, b) = -s(b, a) and s(a, a) = 0.
  """
  per_block = v_w[..., 0::2] * v_l[..., 1::2] - v_w[..., 1::2] * v_l[..., 0::2]
  return jnp.sum(per_block if gate is None else gate * per_block, axis=-1)


@register("gpm", role="reward", ranges={"tau": "> 0"})
def gpm(lp: RewardOutputs, *, tau: float = 0.1, margin: float = 0.0, normalize: bool = False):
  """Beyond Bradley-Terry Models: A General Preference Model for Language Model Alignment
  (GPM, docs/reward_models.md#gpm).

  l = -logsig((s - margin)/tau),  s = <R(x) v_w, v_l>, v the 2k-dim preference embeddings;
  the eigenvalues are all 1 (plain model), or the prompt-gated lambda(x) [B, k] in
  `RewardOutputs.gate` of a `--reward_head=gpm_gated` head (the paper's "MoE" variant);
  `normalize` puts v on the unit sphere first (the paper's description; off in the code).
  """
  if lp.embed is None:
    raise ValueError("gpm reads a preference embedding per response: run --role=reward "
                     "with an even --reward_dim=2k (e.g. 4)")
  chex.assert_rank(lp.embed, 3)
  if lp.embed.shape[1] != 2 or lp.embed.shape[2] % 2:
    raise ValueError(f"gpm needs pairs of even-dimensional embeddings [B, 2, 2k], got "
                     f"{lp.embed.shape}")
  if lp.gate is not None and lp.gate.shape != (lp.embed.shape[0], lp.embed.shape[2] // 2):
    raise ValueError(f"gpm: the gate must hold one eigenvalue per rotation block [B, k] = "
                     f"{[lp.embed.shape[0], lp.embed.shape[2] // 2]}, got {list(lp.gate.shape)}")
  v = lp.embed
  if normalize:
    v = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-6)
  s = gpm_score(v[:, 0], v[:, 1], lp.gate)
  per = -logsig((s - margin) / tau)
  metrics = reward_metrics(lp, s, jax.nn.sigmoid(s / tau))
  metrics["embed/norm"] = weighted_mean(jnp.linalg.norm(lp.embed, axis=-1).mean(1), lp.weight)
  if lp.gate is not None:  # k: every prompt on one block; 1: the plain model's uniform gate
    metrics["gpm/gate_max"] = weighted_mean(jax.lax.stop_gradient(lp.gate).max(-1), lp.weight)
  return weighted_mean(per, lp.weight), metrics


# --- Secrets of RLHF II contrastive auxiliary (docs/reward_models.md#bt_contrastive) ---

# Losses whose head's channel 0 is the scalar reward although --reward_dim > 1 (the rest is
# a representation): jaxpref-eval scores their pairs by channel 0, not by the GPM score.
FIRST_CHANNEL_REWARD = ("bt_contrastive",)
_PAD_LOGIT = -1e9  # a padded pair as a negative: exp(-1e9) = 0, finite (no NaN at weight 0)


def simcse_infonce(z1: jax.Array, z2: jax.Array, weight: jax.Array,
                   temperature: float) -> jax.Array:
  """SimCSE's InfoNCE between two views [B, D] of B items: row i's positive is z2[i], the
  other rows of z2 with weight > 0 its negatives; s = cos / temperature; the weighted mean
  over rows of -log softmax(s_i)[i]."""
  unit = lambda z: z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
  sim = unit(z1) @ unit(z2).T / temperature  # [B, B]
  sim = jnp.where(weight[None, :] > 0, sim, _PAD_LOGIT)
  per = jax.nn.logsumexp(sim, axis=-1) - jnp.diagonal(sim)
  return weighted_mean(per, weight)


def _dropout_views(z: jax.Array, rate: float, seed: int) -> tuple[jax.Array, jax.Array]:
  """Two dropout views of z. A loss sees no PRNG key, so the key is folded from the batch's
  own values: fixed for a batch, fresh for every new batch or parameter update."""
  if rate <= 0:
    return z, z
  # A wrapping integer sum of the values' bits: unlike a float sum it does not depend on
  # the reduction order, so a batch sharded over devices draws the same masks.
  bits = jnp.sum(jax.lax.bitcast_convert_type(jax.lax.stop_gradient(z).astype(jnp.float32),
                                              jnp.uint32), dtype=jnp.uint32)
  k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(seed), bits))
  keep = lambda k: jax.random.bernoulli(k, 1.0 - rate, z.shape).astype(z.dtype) / (1.0 - rate)
  return z * keep(k1), z * keep(k2)


@register("bt_contrastive", role="reward", ranges={"tau": "> 0", "temperature": "> 0"})
def bt_contrastive(lp: RewardOutputs, *, contrastive_weight: float = 0.1, temperature: float = 0.05,
                   dropout: float = 0.1, tau: float = 1.0, seed: int = 0):
  """Secrets of RLHF in LLMs Part II, contrastive auxiliary (SimCSE variant; docs/reward_models.md#bt_contrastive, a reading).

  l = -logsig(dr/tau) + lambda * InfoNCE(drop(z), drop'(z)),  z = phi(x, y_w) - phi(x, y_l).
  One head of --reward_dim=2k: channel 0 is the reward r, channels 1.. the projection phi of
  the same last-token state; the two dropout views of a pair's z are positives, the other
  pairs of the batch negatives (cosine / temperature).
  """
  if lp.embed is None:
    raise ValueError("bt_contrastive reads a reward and a representation from one head: run "
                     "--role=reward with --reward_dim=2k >= 2 (e.g. 8): channel 0 is the "
                     "reward, the other 2k-1 the representation")
  chex.assert_rank(lp.embed, 3)
  if lp.embed.shape[1] != 2:
    raise ValueError(f"bt_contrastive needs pairs (K=2, chosen first), got {lp.embed.shape}")
  if not 0 <= dropout < 1:
    raise ValueError(f"bt_contrastive: dropout must be in [0, 1), got {dropout}")
  r, phi = lp.embed[..., 0], lp.embed[..., 1:]
  d = r[:, 0] - r[:, 1]
  bt_term = weighted_mean(-logsig(d / tau), lp.weight)
  cl = simcse_infonce(*_dropout_views(phi[:, 0] - phi[:, 1], dropout, seed), lp.weight,
                      temperature)
  metrics = reward_metrics(lp, d, jax.nn.sigmoid(d / tau), r)
  metrics.update({"loss/bt": bt_term, "loss/contrastive": cl})
  return bt_term + contrastive_weight * cl, metrics
