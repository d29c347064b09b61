"""Strength-aware pairwise objectives: the preference's strength (from the records' scores)
sets how hard a pair pushes (OSP's soft preference, SPO's preference degree).

Notation as in pairwise.py (docs/losses.md#notation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.losses.common import (check_pairs, logratios, pair_loss, smoothed_logistic,
                                   weighted_mean)
from jaxpref.losses.pairwise import logsig, score_gap
from jaxpref.losses.registry import register
from jaxpref.types import Logps


@register("osp", ranges={"beta": "> 0", "temperature": "> 0"})
def osp(lp: Logps, *, beta: float = 0.1, temperature: float = 1.0):
  """Online Self-Preferring Language Models: soft-preference cross-entropy (docs/losses.md#osp).

  A reading (the exact strength mapping is UNVERIFIED): with preference strength
  p = sig((s_w - s_l) / temperature) from the records' scores (p = 1 without scores, which
  is DPO), l = -[p logsig(beta h) + (1-p) logsig(-beta h)], i.e. cDPO with a per-pair
  eps = 1 - p.
  """
  check_pairs(lp)
  rho = logratios(lp)
  p = 1.0 if lp.scores is None else jax.nn.sigmoid(score_gap(lp, "osp") / temperature)
  return pair_loss(lp, smoothed_logistic(beta * (rho[:, 0] - rho[:, 1]), 1.0 - p), beta * rho)


def degree_class(lp: Logps, num_degrees: int) -> jax.Array:
  """SPO's preference-degree class per pair, [B] int: the score gap s_w - s_l rounded and
  clipped to 0..num_degrees-1 (scores on the degree scale, e.g. key contents kept)."""
  gap = jnp.round(score_gap(lp, "spo"))
  return jnp.clip(gap, 0, num_degrees - 1).astype(jnp.int32)


def degree_cross_entropy(z: jax.Array, degree: jax.Array, num_degrees: int,
                         degree_margin: float) -> jax.Array:
  """-log softmax_c(-(z - c delta)^2 / 2)[degree] for margins z [B]: a fixed classifier
  whose class c sits at margin c * delta, so the likeliest degree grows with the margin."""
  centres = degree_margin * jnp.arange(num_degrees, dtype=z.dtype)
  logits = -0.5 * (z[:, None] - centres[None, :]) ** 2
  own = jnp.take_along_axis(logits, degree[:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(logits, axis=1) - own


@register("spo", ranges={"beta": "> 0"})
def spo(lp: Logps, *, beta: float = 0.1, degree_weight: float = 0.1, num_degrees: int = 4,
        degree_margin: float = 1.0):
  """Self-supervised Preference Optimization (SPO, Li et al. 2024), docs/losses.md#spo.

  A reading (UNVERIFIED: the official repository holds only a LICENSE). The paper adds to
  the alignment loss a cross-entropy that classifies a response's preference degree (how
  much key content was removed) from the LM: l = l_DPO + degree_weight * CE(degree). A
  loss of sequence log-probs has no representation to classify, so here the classifier
  reads the pair's implicit reward margin z = beta h, with class c centred at margin
  c * degree_margin (logits -(z - c * degree_margin)^2 / 2), and the degree label is the
  records' score gap rounded to 0..num_degrees-1 (`degree_class`). The optimal margin then
  grows with the degree instead of running to infinity for every pair. Without scores the
  degree term is absent and this is DPO.
  """
  check_pairs(lp)
  if num_degrees < 2:
    raise ValueError(f"spo: num_degrees must be >= 2, got {num_degrees}")
  rho = logratios(lp)
  z = beta * (rho[:, 0] - rho[:, 1])
  align = -logsig(z)
  if lp.scores is None:
    degree = jnp.zeros_like(align)
  else:
    degree = degree_cross_entropy(z, degree_class(lp, num_degrees), num_degrees, degree_margin)
  return pair_loss(lp, align + degree_weight * degree, beta * rho,
                   dpo=weighted_mean(align, lp.weight), degree=weighted_mean(degree, lp.weight))
