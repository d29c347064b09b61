"""Losses that read more than the pair: a rationale (RDPO, R-ORPO), a condition pair (MAPL,
OmniDPO) or source models' log-probs in place of the reference (InfiFPO); online, GRAO's
reference answer (the record's `chosen`, appended to the sampled group by the rollouts).

Groups are K = 3 for the first four: member 2 is built by the data layer from a record
field (`jaxpref/data/extra_members.py`): (rationale prompt, r) for `rationale`, and
(x-, y_w) for `rejected_prompt`. `RECORD_FIELDS` says which field each loss needs, so
the data layer builds members only for them. Notation as in pairwise.py (docs/losses.md#notation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.losses.common import (avg_logps, chosen_nll, log1mexp, logratios, pair_loss,
                                   pair_metrics, weighted_mean)
from jaxpref.losses.registry import _terms, register
from jaxpref.types import Logps

logsig = jax.nn.log_sigmoid

RECORD_FIELDS = {"rdpo": ("rationale",), "rorpo": ("rationale",),
                 "mapl": ("rejected_prompt",), "omnidpo": ("rejected_prompt",),
                 "infifpo": ("source_logps",),
                 # online: the record's answer joins the sampled group as its last member
                 "grao": ("chosen",)}
RATIONALE_TERMS = ("logsig", "linear")


def record_fields(loss: str) -> tuple[str, ...]:
  """The extra record fields `loss` (a name or a weighted sum) reads, in a fixed order."""
  need = {f for _, name in _terms(loss) for f in RECORD_FIELDS.get(name, ())}
  return tuple(f for f in ("rationale", "rejected_prompt", "source_logps", "chosen")
               if f in need)


def member_fields(loss: str) -> tuple[str, ...]:
  """The fields of `record_fields` that add a group member (member 2, 3, ... in order)."""
  return tuple(f for f in record_fields(loss) if f != "source_logps")


def _third_member(lp: Logps, loss: str, field: str) -> None:
  # Indexing past K would clamp silently in JAX; a wrong K must stop the run at start-up.
  if lp.policy.ndim != 2 or lp.policy.shape[1] != 3:
    raise ValueError(f"loss {loss!r} scores group member 2, built from the records' '{field}' "
                     f"field: it needs --data_format=pairs with '{field}' in every record "
                     f"(groups of 3); got groups of shape {tuple(lp.policy.shape)}")


def _rationale_term(s: jax.Array, gamma: float, rationale_term: str) -> jax.Array:
  """-logsig(gamma S) (the released code) or -gamma S (the plain weighted likelihood)."""
  if rationale_term == "logsig":
    return -logsig(gamma * s)
  if rationale_term == "linear":
    return -gamma * s
  raise ValueError(f"rationale_term must be one of {RATIONALE_TERMS}, got {rationale_term!r}")


@register("rdpo", ranges={"beta": "> 0"})
def rdpo(lp: Logps, *, beta: float = 0.1, gamma: float = 0.1, rationale_term: str = "logsig"):
  """Data-Centric Preference Optimization with Rationales, RDPO (docs/losses.md#rdpo).

  l = -logsig(beta h) - logsig(gamma S), S = S_pol(r | x, y_w, y_l) the summed policy
  log-prob of the pair's rationale (member 2); `rationale_term="linear"`: -gamma S.
  """
  _third_member(lp, "rdpo", "rationale")
  rho = logratios(lp)
  pref = -logsig(beta * (rho[:, 0] - rho[:, 1]))
  rat = _rationale_term(lp.policy[:, 2], gamma, rationale_term)
  loss, metrics = pair_loss(lp, pref + rat, beta * rho[:, :2],
                            dpo=weighted_mean(pref, lp.weight),
                            rationale=weighted_mean(rat, lp.weight))
  metrics["logps/rationale"] = weighted_mean(jax.lax.stop_gradient(lp.policy[:, 2]), lp.weight)
  return loss, metrics


@register("rorpo", ranges={"beta": "> 0"})
def rorpo(lp: Logps, *, beta: float = 0.1, gamma: float = 1.0, rationale_term: str = "linear"):
  """Data-Centric Preference Optimization with Rationales, R-ORPO (docs/losses.md#rorpo).

  l = NLL(y_w) - [beta logsig(logodds(y_w) - logodds(y_l)) + gamma S] ("rorpo-simple";
  `beta` is the paper's lambda, as in `orpo`), S = S_pol(r | x, y_w, y_l) summed;
  `rationale_term="logsig"` puts logsig(gamma S) in place of gamma S (the released "rorpo").
  """
  _third_member(lp, "rorpo", "rationale")
  a = avg_logps(lp)[:, :2]
  logodds = a - log1mexp(a)
  ratio = weighted_mean(logsig(logodds[:, 0] - logodds[:, 1]), lp.weight)
  rat = weighted_mean(_rationale_term(lp.policy[:, 2], gamma, rationale_term), lp.weight)
  nll = chosen_nll(lp)
  metrics = pair_metrics(lp, beta * a)
  metrics.update({"loss/nll": nll, "loss/log_odds_ratio": ratio, "loss/rationale": rat,
                  "logps/rationale": weighted_mean(jax.lax.stop_gradient(lp.policy[:, 2]),
                                                   lp.weight)})
  return nll - beta * ratio + rat, metrics


def condition_dpo(lp: Logps, loss: str, beta: float, condition_weight: float):
  """-logsig(beta h) - w logsig(beta [rho(y_w | x) - rho(y_w | x-)]), member 2 = (x-, y_w)."""
  _third_member(lp, loss, "rejected_prompt")
  rho = logratios(lp)
  pref = -logsig(beta * (rho[:, 0] - rho[:, 1]))
  cond = -logsig(beta * (rho[:, 0] - rho[:, 2]))
  loss_value, metrics = pair_loss(lp, pref + condition_weight * cond, beta * rho[:, :2],
                                  dpo=weighted_mean(pref, lp.weight),
                                  condition=weighted_mean(cond, lp.weight))
  margin = jax.lax.stop_gradient(beta * (rho[:, 0] - rho[:, 2]))
  metrics["rewards/condition_margin"] = weighted_mean(margin, lp.weight)
  return loss_value, metrics


@register("mapl", ranges={"beta": "> 0"})
def mapl(lp: Logps, *, beta: float = 0.1, condition_weight: float = 1.0):
  """Multi-level Aware Preference Learning (MAPL), a reading of the abstract (docs/losses.md#mapl).

  DPO on the response pair plus `condition_weight` times DPO on the prompt-side pair:
  the chosen response under its prompt x (member 0) over the same response under a
  varied prompt x- it does not satisfy (member 2). UNVERIFIED: the weight and the shared
  beta are ours; the multi-instruction pairs are the data's to build.
  """
  return condition_dpo(lp, "mapl", beta, condition_weight)


@register("omnidpo", ranges={"beta": "> 0"})
def omnidpo(lp: Logps, *, beta: float = 0.1, condition_weight: float = 1.0):
  """OmniDPO (omni-modal hallucination), a reading (docs/losses.md#omnidpo).

  l_DPO(text pair) + lambda l_DPO(condition pair): the same response under the original
  and a corrupted input (here a text prompt x-, member 2); lambda = `condition_weight`.
  """
  return condition_dpo(lp, "omnidpo", beta, condition_weight)


FUSIONS = ("mean", "max_margin")


@register("infifpo", ranges={"beta": "> 0"})
def infifpo(lp: Logps, *, beta: float = 2.5, length_normalize: bool = True, fusion: str = "mean",
            with_reference: bool = False, clip: bool = True, ref_offset: float = 5.0):
  """InfiFPO: Implicit Model Fusion via Preference Optimization (Gu et al. 2025), a reading
  (docs/losses.md#infifpo, a reading).

  DPO with the reference replaced by a fused source model: s_k(y) = S_src_k(y) (/ L(y) with
  `length_normalize`, L in the policy's tokens, the policy's log-probs likewise averaged);
  `fusion="mean"`: f(y) = mean_k s_k(y); `"max_margin"`: per pair the source with the
  largest s_k(y_w) - s_k(y_l). `with_reference` counts the pivot's reference as one more
  source. `clip`: f(y) >= sg(pol(y)) - ref_offset for both responses, so a source far
  below the pivot cannot dominate the pair's log-ratio.
  l = -logsig(beta [(pol(y_w) - f(y_w)) - (pol(y_l) - f(y_l))]).
  """
  if lp.source_logps is None:
    raise ValueError("loss 'infifpo' reads the records' 'source_logps' field (per source model, "
                     "[chosen, rejected] summed log-probs); the data has none")
  if fusion not in FUSIONS:
    raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
  pol, src = lp.policy[:, :2], lp.source_logps  # [B, 2], [B, S, 2]
  if with_reference:
    src = jnp.concatenate([lp.ref[:, None, :2], src], axis=1)
  if length_normalize:
    length = jnp.maximum(lp.length[:, :2], 1.0)
    pol, src = pol / length, src / length[:, None, :]
  if fusion == "mean":
    fused = jnp.mean(src, axis=1)
  else:
    best = jnp.argmax(src[:, :, 0] - src[:, :, 1], axis=1)  # first source on ties
    fused = jnp.take_along_axis(src, best[:, None, None], axis=1)[:, 0]
  if clip:
    fused = jnp.maximum(fused, jax.lax.stop_gradient(pol) - ref_offset)
  rho = pol - fused
  per = -logsig(beta * (rho[:, 0] - rho[:, 1]))
  loss, metrics = pair_loss(lp, per, beta * rho)
  metrics["infifpo/fused_margin"] = weighted_mean(fused[:, 0] - fused[:, 1], lp.weight)
  return loss, metrics
