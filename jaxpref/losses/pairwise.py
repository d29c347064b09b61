"""Pairwise (K=2, chosen first) objectives on sequence log-ratios against a reference.

Notation (docs/losses.md#notation): rho(y) = S_pol(y) - S_ref(y), h = rho(y_w) - rho(y_l), L(y) the
response length. Each loss returns the weighted mean over pairs and the standard metrics
with its implicit rewards (beta * rho unless stated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.losses.common import (check_pairs, chosen_nll, logratios, pair_loss, pair_metrics,
                                   smoothed_logistic, weighted_mean)
from jaxpref.losses.registry import register
from jaxpref.types import Logps

logsig = jax.nn.log_sigmoid


def score_gap(lp: Logps, who: str) -> jax.Array:
  """s_w - s_l from the records' `chosen_score`/`rejected_score` (`Logps.scores`), [B]."""
  if lp.scores is None:
    raise ValueError(f"{who} needs per-pair scores: give every record 'chosen_score' and "
                     "'rejected_score'")
  return lp.scores[:, 0] - lp.scores[:, 1]


@register("dpo", ranges={"beta": "> 0", "label_smoothing": "[0, 0.5]"})
def dpo(lp: Logps, *, beta: float = 0.1, label_smoothing: float = 0.0, margin: float = 0.0,
        score_margin: float = 0.0):
  """Direct Preference Optimization: Your Language Model is Secretly a Reward Model.

  l = -(1-eps) logsig(beta h - m) - eps logsig(-(beta h - m)) (docs/losses.md#dpo):
  eps = 0 is DPO, eps > 0 conservative DPO (cDPO, eps the assumed flip rate), and m a
  target margin on the implicit reward difference (the BT-with-margin form of docs/reward_models.md#bt):
  m = margin + score_margin * (s_w - s_l), the second term from the records' scores
  (Llama-2's rating-gap margins). When the records carry a `label_smoothing` field
  (`Logps.label_smoothing`, [B]) each pair uses its own eps and the scalar is ignored.
  """
  check_pairs(lp)
  rho = logratios(lp)
  h = rho[:, 0] - rho[:, 1]
  m = margin + (score_margin * score_gap(lp, "--loss.score_margin") if score_margin else 0.0)
  return pair_loss(lp, smoothed_logistic(beta * h - m, flip_rate(lp, label_smoothing)), beta * rho)


def flip_rate(lp: Logps, label_smoothing: float):
  """cDPO's eps: the records' per-pair values [B] when they have them, else the scalar."""
  return label_smoothing if lp.label_smoothing is None else lp.label_smoothing


@register("robust_dpo", ranges={"beta": "> 0", "label_smoothing": "[0, 0.5)"})
def robust_dpo(lp: Logps, *, beta: float = 0.1, label_smoothing: float = 0.1):
  """Provably Robust DPO (Chowdhury et al. 2024), docs/losses.md#robust_dpo.

  l = [-(1-eps) logsig(beta h) + eps logsig(-beta h)] / (1 - 2 eps): unbiased for the clean
  DPO loss when labels flip with probability eps < 1/2.
  """
  check_pairs(lp)
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"robust_dpo: label_smoothing must lie in [0, 0.5), got {label_smoothing}")
  rho = logratios(lp)
  z = beta * (rho[:, 0] - rho[:, 1])
  per = (-(1 - label_smoothing) * logsig(z) + label_smoothing * logsig(-z)) / (1 - 2 * label_smoothing)
  return pair_loss(lp, per, beta * rho)


@register("ipo", ranges={"beta": "> 0"})
def ipo(lp: Logps, *, beta: float = 0.1, length_normalize: bool = True):
  """A General Theoretical Paradigm to Understand Learning from Human Preferences (IPO).

  l = (h - 1/(2 beta))^2 (docs/losses.md#ipo); with `length_normalize` (TRL's convention,
  confirmed by the IPO authors) h uses per-token log-ratios rho(y)/L(y).
  """
  check_pairs(lp)
  rho = logratios(lp)
  r = rho / jnp.maximum(lp.length, 1.0) if length_normalize else rho
  h = r[:, 0] - r[:, 1]
  return pair_loss(lp, (h - 1.0 / (2.0 * beta)) ** 2, beta * rho)


@register("hinge", ranges={"beta": "> 0"})
def hinge(lp: Logps, *, beta: float = 0.1):
  """SLiC-HF: Sequence Likelihood Calibration with Human Feedback; l = relu(1 - beta h)."""
  check_pairs(lp)
  rho = logratios(lp)
  return pair_loss(lp, jax.nn.relu(1.0 - beta * (rho[:, 0] - rho[:, 1])), beta * rho)


@register("sigmoid_norm", ranges={"beta": "> 0"})
def sigmoid_norm(lp: Logps, *, beta: float = 0.1):
  """Length-normalised DPO (LN-DPO, TRL `sigmoid_norm`, OpenRLHF `dpo_norm`), docs/losses.md#sigmoid_norm.

  l = -logsig(beta (rho(y_w)/L(y_w) - rho(y_l)/L(y_l))).
  """
  check_pairs(lp)
  rho = logratios(lp)
  r = rho / jnp.maximum(lp.length, 1.0)
  return pair_loss(lp, -logsig(beta * (r[:, 0] - r[:, 1])), beta * r)


@register("rpo", ranges={"beta": "> 0"})
def rpo(lp: Logps, *, beta: float = 0.1, alpha: float = 1.0):
  """Iterative Reasoning Preference Optimization: DPO + alpha * NLL(y_w) (docs/losses.md#rpo).

  The NLL is TRL's: the token-mean cross-entropy over the batch's chosen tokens.
  """
  check_pairs(lp)
  rho = logratios(lp)
  nll = chosen_nll(lp)
  dpo_term = -logsig(beta * (rho[:, 0] - rho[:, 1]))
  loss, metrics = pair_loss(lp, dpo_term, beta * rho, nll=nll, dpo=weighted_mean(dpo_term, lp.weight))
  return loss + alpha * nll, metrics


@register("sft_dpo", ranges={"beta": "> 0"})
def sft_dpo(lp: Logps, *, beta: float = 0.1, alpha: float = 1.0):
  """SFT-DPO of "3D-Properties of DPO" (docs/losses.md#sft_dpo): DPO + alpha * NLL(y_w), as `rpo`."""
  return rpo(lp, beta=beta, alpha=alpha)


@register("exo_pair", ranges={"beta": "> 0", "label_smoothing": "[0, 0.5]"})
def exo_pair(lp: Logps, *, beta: float = 0.1, label_smoothing: float = 1e-3):
  """Towards Efficient Exact Optimization of Language Model Alignment (EXO), pairwise form.

  Reverse KL between the model's pair distribution sig(+-beta h) and the smoothed labels
  (1-eps, eps): sig(z)(logsig(z) - log(1-eps)) + sig(-z)(logsig(-z) - log eps), z = beta h.
  """
  check_pairs(lp)
  eps = max(label_smoothing, 1e-3)
  rho = logratios(lp)
  z = beta * (rho[:, 0] - rho[:, 1])
  per = (jax.nn.sigmoid(z) * (logsig(z) - jnp.log1p(-eps))
         + jax.nn.sigmoid(-z) * (logsig(-z) - jnp.log(eps)))
  return pair_loss(lp, per, beta * rho)


@register("nca_pair", ranges={"beta": "> 0"})
def nca_pair(lp: Logps, *, beta: float = 0.1):
  """Noise Contrastive Alignment of Language Models with Explicit Rewards (NCA), pairwise.

  l = -logsig(r_w) - 1/2 logsig(-r_w) - 1/2 logsig(-r_l), r = beta rho: optimises absolute
  rewards, so the chosen likelihood is not pushed down with the rejected one.
  """
  check_pairs(lp)
  r = beta * logratios(lp)
  per = -logsig(r[:, 0]) - 0.5 * logsig(-r[:, 0]) - 0.5 * logsig(-r[:, 1])
  return pair_loss(lp, per, r)


@register("bco_pair", ranges={"beta": "> 0"})
def bco_pair(lp: Logps, *, beta: float = 0.1, delta: str = "batch_mean"):
  """Binary Classifier Optimization (Jung et al. 2024), pairwise form.

  l = -logsig(r_w - delta) - logsig(-(r_l - delta)), r = beta rho. The paper's delta is a
  running mean of rewards across steps; `delta="batch_mean"` (a pure function's stand-in)
  takes the batch's mean reward (stop-gradient, over the whole sharded batch), and
  `delta="none"` is delta = 0, TRL's form since its DPO refactor (docs/trl.md).
  """
  check_pairs(lp)
  if delta not in ("batch_mean", "none"):
    raise ValueError(f"bco_pair: delta must be batch_mean or none, got {delta!r}")
  r = beta * logratios(lp)
  w = lp.weight[:, None]
  d = 0.0
  if delta == "batch_mean":
    d = jax.lax.stop_gradient(jnp.sum(r * w) / jnp.maximum(2.0 * jnp.sum(lp.weight), 1e-8))
  per = -logsig(r[:, 0] - d) - logsig(-(r[:, 1] - d))
  return pair_loss(lp, per, r, delta=jnp.asarray(d, jnp.float32))


@register("sppo_hard", ranges={"beta": "> 0"})
def sppo_hard(lp: Logps, *, beta: float = 0.1):
  """Self-Play Preference Optimization, hard-label form (TRL `sppo_hard`, docs/losses.md#sppo_hard).

  l = (rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2.
  """
  check_pairs(lp)
  rho = logratios(lp)
  per = (rho[:, 0] - 0.5 / beta) ** 2 + (rho[:, 1] + 0.5 / beta) ** 2
  return pair_loss(lp, per, beta * rho)


@register("sppo", ranges={"beta": "> 0"})
def sppo(lp: Logps, *, beta: float = 0.1):
  """Self-Play Preference Optimization with estimated win rates (docs/losses.md#sppo).

  l = 1/2 [(rho_w - (p_w - 1/2) / beta)^2 + (rho_l - (p_l - 1/2) / beta)^2], where the
  scores p are each response's win rate against the policy's other samples (the online
  role's pairwise sources, e.g. `pref_rm` over a GPM: GPO). Without scores, p_w = 1 and
  p_l = 0: half of `sppo_hard`.
  """
  check_pairs(lp)
  rho = logratios(lp)
  p = jnp.array([1.0, 0.0]) if lp.scores is None else lp.scores
  per = 0.5 * jnp.sum((rho - (p - 0.5) / beta) ** 2, axis=-1)
  return pair_loss(lp, per, beta * rho)


def _aot(lp: Logps, a: jax.Array, b: jax.Array, beta: float, label_smoothing: float):
  """Alignment via Optimal Transport compares the batch's sorted quantiles of a and b.

  Padded groups (weight 0) are sorted to the end of both lists with one sentinel, so they
  meet each other and drop out; real pairs count equally (quantiles carry no weights).
  """
  real = lp.weight > 0
  top = jnp.finfo(a.dtype).max
  delta = jnp.sort(jnp.where(real, a, top)) - jnp.sort(jnp.where(real, b, top))
  n_real = jnp.sum(real)
  keep = jnp.arange(a.shape[0]) < n_real
  per = smoothed_logistic(beta * delta, label_smoothing)
  return jnp.sum(jnp.where(keep, per, 0.0)) / jnp.maximum(n_real, 1)


@register("aot", ranges={"beta": "> 0", "label_smoothing": "[0, 0.5]"})
def aot(lp: Logps, *, beta: float = 0.1, label_smoothing: float = 0.0):
  """Distributional Preference Alignment of LLMs via Optimal Transport (AOT), paired form.

  delta = sort_batch(S_pol(y_w) - S_pol(y_l)) - sort_batch(S_ref(y_w) - S_ref(y_l)).
  """
  check_pairs(lp)
  loss = _aot(lp, lp.policy[:, 0] - lp.policy[:, 1], lp.ref[:, 0] - lp.ref[:, 1], beta,
              label_smoothing)
  return loss, pair_metrics(lp, beta * logratios(lp))


@register("aot_pair", ranges={"beta": "> 0", "label_smoothing": "[0, 0.5]"})
def aot_pair(lp: Logps, *, beta: float = 0.1, label_smoothing: float = 0.0):
  """AOT, unpaired form: delta = sort_batch(rho(y_w)) - sort_batch(rho(y_l))."""
  check_pairs(lp)
  rho = logratios(lp)
  return _aot(lp, rho[:, 0], rho[:, 1], beta, label_smoothing), pair_metrics(lp, beta * rho)


@register("apo_zero", ranges={"beta": "> 0"})
def apo_zero(lp: Logps, *, beta: float = 0.1):
  """Anchored Preference Optimization (D'Oosterlinck et al. 2024), APO-zero.

  l = (1 - sig(beta rho_w)) + sig(beta rho_l): raise the chosen and lower the rejected
  likelihood, each against the reference.
  """
  check_pairs(lp)
  r = beta * logratios(lp)
  return pair_loss(lp, 1.0 - jax.nn.sigmoid(r[:, 0]) + jax.nn.sigmoid(r[:, 1]), r)


@register("apo_down", ranges={"beta": "> 0"})
def apo_down(lp: Logps, *, beta: float = 0.1):
  """Anchored Preference Optimization, APO-down: l = sig(beta rho_w) + 1 - sig(beta h)."""
  check_pairs(lp)
  r = beta * logratios(lp)
  return pair_loss(lp, jax.nn.sigmoid(r[:, 0]) + 1.0 - jax.nn.sigmoid(r[:, 0] - r[:, 1]), r)


@register("discopop", ranges={"beta": "> 0", "tau": "> 0"})
def discopop(lp: Logps, *, beta: float = 0.1, tau: float = 0.05):
  """Discovering Preference Optimization Algorithms with and for LLMs (DiscoPOP, LRML).

  With z = beta h and m = sig(z / tau): l = (1 - m) (-logsig(z)) + m exp(-z). The second
  term is evaluated as exp(-z + logsig(z/tau)) so that it stays finite where exp(-z)
  alone would overflow.
  """
  check_pairs(lp)
  rho = logratios(lp)
  z = beta * (rho[:, 0] - rho[:, 1])
  per = -jax.nn.sigmoid(-z / tau) * logsig(z) + jnp.exp(-z + logsig(z / tau))
  return pair_loss(lp, per, beta * rho)


@register("gamma_dpo", ranges={"beta": "> 0"})
def gamma_dpo(lp: Logps, *, beta: float = 0.1, gamma: float = 1.0):
  """gamma-attenuated DPO of "Preference Learning Algorithms Do Not Learn Preference Rankings".

  l = -logsig(beta [(S_pol(y_w) - S_pol(y_l)) + gamma (S_ref(y_l) - S_ref(y_w))]) (docs/losses.md#gamma_dpo):
  gamma = 1 is DPO, gamma = 0 drops the reference.
  """
  check_pairs(lp)
  z = beta * ((lp.policy[:, 0] - lp.policy[:, 1]) + gamma * (lp.ref[:, 1] - lp.ref[:, 0]))
  return pair_loss(lp, -logsig(z), beta * logratios(lp))


@register("flex_dpo")
def flex_dpo(lp: Logps, *, beta_chosen: float = 0.1, beta_rejected: float = 0.1):
  """Flex-DPO of "3D-Properties of DPO" (docs/losses.md#flex_dpo, a reading: constants not checked).

  l = -logsig(beta_w rho_w - beta_l rho_l); beta_l > beta_w slows the collapse of the
  rejected likelihood. Equal betas are DPO.
  """
  check_pairs(lp)
  rho = logratios(lp)
  rewards = rho * jnp.array([beta_chosen, beta_rejected])
  return pair_loss(lp, -logsig(rewards[:, 0] - rewards[:, 1]), rewards)


def _cap_exp(x: jax.Array) -> jax.Array:
  """exp, capped below float overflow (TRL's cap_exp)."""
  return jnp.exp(jnp.minimum(x, jnp.log(jnp.finfo(x.dtype).max)))


@register("f_dpo", ranges={"beta": "> 0", "label_smoothing": "[0, 0.5]"})
def f_dpo(lp: Logps, *, beta: float = 0.1, divergence: str = "reverse_kl", alpha: float = 1.0,
          label_smoothing: float = 0.0, convention: str = "jaxpref"):
  """Beyond Reverse KL: Generalizing DPO with Diverse Divergence Constraints (f-DPO).

  The DPO logit under an f-divergence with u = pi/pi_ref (so log u = rho): `reverse_kl`
  h (DPO); `js_divergence` h - (softplus(rho_w) - softplus(rho_l)) (from log(2u/(1+u)));
  `alpha_divergence` (u_l^-alpha - u_w^-alpha) / alpha (alpha = 1: forward KL, also named
  `forward_kl`). Then cDPO's loss on beta * logit.

  `convention="trl"` reads `alpha` as TRL's f_alpha_divergence_coef a, whose score is
  u^(a-1) / (a-1) (a = 1: reverse KL): the same logit at alpha = 1 - a; TRL's sigmoid loss
  reads no label_smoothing, so it must be 0 (docs/trl.md).
  """
  check_pairs(lp)
  if convention not in ("jaxpref", "trl"):
    raise ValueError(f"f_dpo: convention must be jaxpref or trl, got {convention!r}")
  if convention == "trl":
    if label_smoothing:
      raise ValueError("f_dpo: convention=trl is TRL's sigmoid loss, which has no "
                       f"label_smoothing; got {label_smoothing}")
    if divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6:
      divergence = "reverse_kl"  # TRL's limit case
    alpha = 1.0 - alpha
  if divergence == "forward_kl":
    divergence, alpha = "alpha_divergence", 1.0
  rho = logratios(lp)
  if divergence == "reverse_kl":
    logit = rho[:, 0] - rho[:, 1]
  elif divergence == "js_divergence":
    logit = (rho[:, 0] - rho[:, 1]) - (jax.nn.softplus(rho[:, 0]) - jax.nn.softplus(rho[:, 1]))
  elif divergence == "alpha_divergence":
    if convention == "jaxpref" and alpha <= 0:  # TRL's a > 1 (alpha < 0) is a valid logit
      raise ValueError(f"f_dpo: alpha must be > 0, got {alpha}")
    logit = (_cap_exp(-alpha * rho[:, 1]) - _cap_exp(-alpha * rho[:, 0])) / alpha
  else:
    raise ValueError(f"f_dpo: divergence must be reverse_kl, forward_kl, js_divergence or "
                     f"alpha_divergence, got {divergence!r}")
  return pair_loss(lp, smoothed_logistic(beta * logit, label_smoothing), beta * rho)


@register("sft")
def sft(lp: Logps):
  """Supervised fine-tuning on the chosen responses: token-mean NLL over the batch.

  Alone it is SFT on preference data; as a term of a weighted sum (`--loss=dpo+sft`) it
  is the SFT part of RPO-style and mixed preference objectives.
  """
  check_pairs(lp)
  nll = chosen_nll(lp)
  return nll, {**pair_metrics(lp, logratios(lp)), "loss/nll": nll}
