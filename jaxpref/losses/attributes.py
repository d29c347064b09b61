"""Multi-objective reward models: one Bradley-Terry term per attribute (docs/reward_models.md#attribute_bt).

An attribute head (`--role=reward --reward_head=attributes --reward_dim=A`) scores every
response on A attributes, in `RewardOutputs.embed` [B, 2, A]. The records' `attribute_prefs` (a
list of A entries: 1 = the chosen response shows the attribute more, -1 = the rejected one
does, 0 = don't care) arrive as `RewardOutputs.attribute_prefs` [B, A].
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxpref.losses.common import half_wins
from jaxpref.losses.registry import register
from jaxpref.losses.reward import calibration_bins
from jaxpref.types import RewardOutputs


def attribute_scores(lp: RewardOutputs) -> jax.Array:
  """zeta(y) [B, 2, A]: the attribute head's scores (a scalar reward head: A = 1)."""
  s = lp.embed if lp.embed is not None else lp.reward[..., None]
  chex.assert_rank(s, 3)
  if s.shape[1] != 2:
    raise ValueError(f"attribute_bt needs pairs (K=2, chosen first), got groups of {s.shape[1]}")
  return s


def attribute_prefs(lp: RewardOutputs, n_attr: int) -> jax.Array:
  """prefs [B, A] in {1, -1, 0}; records without the field prefer the chosen response on
  every attribute (each attribute is then a BT model of the overall label)."""
  if lp.attribute_prefs is None:
    return jnp.ones((lp.weight.shape[0], n_attr), jnp.float32)
  if lp.attribute_prefs.shape[-1] != n_attr:
    raise ValueError(f"attribute_bt: the records' attribute_prefs have "
                     f"{lp.attribute_prefs.shape[-1]} entries but the head scores {n_attr} "
                     "attributes (--reward_dim)")
  return lp.attribute_prefs.astype(jnp.float32)


@register("attribute_bt", role="reward", ranges={"tau": "> 0"})
def attribute_bt(lp: RewardOutputs, *, tau: float = 1.0):
  """AlignDiff's attribute-strength model (docs/reward_models.md#attribute_bt), with don't-care masks.

  l = sum_{b,a} w_b m_ba [-logsig(t_ba (zeta_a(y_w) - zeta_a(y_l)) / tau)] / sum_{b,a} w_b m_ba,
  t_ba = attribute_prefs in {1, -1}, m_ba = |t_ba| (0: don't care, no term): the mean BT
  loss over the cared-for (pair, attribute) entries. AlignDiff's -log(P + 1e-8) is the
  same term without the 1e-8. With A = 1 and every pref 1 this is `bt` (tau).
  """
  s = attribute_scores(lp)
  t = attribute_prefs(lp, s.shape[-1])
  d = (s[:, 0] - s[:, 1]) / tau  # [B, A]
  m = jnp.abs(t) * lp.weight[:, None]
  total = jnp.maximum(jnp.sum(m), 1e-8)
  loss = jnp.sum(-jax.nn.log_sigmoid(t * d) * m) / total
  sd = jax.lax.stop_gradient(t * d)  # > 0: the model agrees with the record
  win, tie = half_wins(sd)
  cared = jnp.maximum(jnp.sum(m, 0), 1e-8)
  metrics = {"rewards/accuracy": jnp.sum(win * m) / total, "rewards/ties": jnp.sum(tie * m) / total,
             "rewards/margin": jnp.sum(sd * tau * m) / total}
  for a in range(s.shape[-1]):
    metrics[f"rewards/accuracy_attr{a}"] = jnp.sum(win[:, a] * m[:, a]) / cared[a]
    metrics[f"rewards/ties_attr{a}"] = jnp.sum(tie[:, a] * m[:, a]) / cared[a]
  # Calibration of every cared-for entry, P(the record's side wins) = sig(t d).
  flat_w = m.reshape(-1)
  metrics.update(calibration_bins(jax.nn.sigmoid(sd).reshape(-1), flat_w))
  return loss, metrics
