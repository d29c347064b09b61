"""Passes over a whole dataset, every group exactly once, in eval-sized batches: the one
loop behind scoring a dataset (reference log-probs, round margins, rewards, strengths) and
behind weighted evaluation."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from jaxpref import cli_errors
from jaxpref.data.pairs import eval_batches


def map_batches(fn: Callable[[Any], Any], ds, batch_size: int,
                put: Callable[[Any], Any] = lambda b: b) -> Any:
  """`fn(put(batch))` over every group of `ds`; each output leaf [batch_size, ...] is
  gathered into one host array [N, ...] with the padding rows of the last batch dropped."""
  parts, n = [], ds.n
  for start, batch in zip(range(0, n, batch_size), eval_batches(ds, batch_size)):
    keep = min(batch_size, n - start)
    parts.append(jax.tree.map(lambda x: np.asarray(x)[:keep], jax.device_get(fn(put(batch)))))
  if not parts:
    raise ValueError("map_batches over an empty dataset")
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def weighted_means(step: Callable[[Any], tuple[dict, Any]], ds, batch_size: int,
                   put: Callable[[Any], Any] = lambda b: b) -> dict:
  """The group-weighted mean of every metric of `step(batch) -> (metrics, weight)` over
  the whole of `ds`. Metrics may carry a leading member axis ([M], an ensemble's); the
  means then keep it, each member weighted by its own weights."""
  totals, weight = {}, 0.0
  for batch in eval_batches(ds, batch_size):
    metrics, w = jax.device_get(step(put(batch)))
    w = np.asarray(w, np.float64)
    for k, v in metrics.items():
      totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64) * w
    weight = weight + w
  if np.any(np.asarray(weight) == 0):
    raise cli_errors.DataError("every group of the data has weight 0 (the records' 'weight' "
                               "field): nothing to average")
  return {k: v / weight for k, v in totals.items()}
