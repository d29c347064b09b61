"""Per-token log-probabilities of realised tokens: one signature, four implementations.

`impl`:
- "naive": `log_softmax` then gather. Autodiff keeps float32 `[N, V]` arrays alive; it is
  the baseline the benchmarks measure against and the simplest statement of the math.
- "xla": the vocabulary-streamed twin (`xla_logps`), custom VJP, no `[N, V]` temporaries.
- "pallas": the Pallas kernels (`pallas_logps`), compiled for TPU (grid layout) or GPU
  (loop layout); on the CPU they run in interpret mode, which is for tests, not speed.
- "auto": "pallas" on TPU and GPU, "xla" elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxpref.ops import pallas_logps, xla_logps

IMPLS = ("auto", "pallas", "xla", "naive")
DEFAULT_BLOCK_V = 2048


def _naive(logits, targets, mask):
  x = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(x, axis=-1)
  picked = jnp.take_along_axis(x, targets[:, None], axis=-1)[:, 0]
  return (picked - lse) * mask, lse


def resolve(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
  return impl


def _row_axes(mesh, n: int) -> tuple[str, ...]:
  """The mesh axes (size > 1, not already manual, in mesh order) that split `n` rows:
  the longest run of them whose sizes' product divides `n`."""
  axes, size = [], 1
  for name in mesh.axis_names:
    k = mesh.shape[name]
    if k == 1 or name in mesh.manual_axes:
      continue
    if n % (size * k):
      break
    axes.append(name)
    size *= k
  return tuple(axes)


def _per_shard(fn, x, t, m):
  """fn (the Pallas `(logits, targets, mask) -> (logp, lse)`) on each device's rows under
  the ambient mesh, the vocabulary whole on each; directly when no mesh axis splits the rows."""
  # A Pallas call is opaque to XLA's SPMD partitioner, which would gather all [N, V] logits.
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else _row_axes(mesh, x.shape[0])
  if not axes:
    return fn(x, t, m)
  rows = P(axes)
  return jax.shard_map(fn, mesh=mesh, in_specs=(P(axes, None), rows, rows),
                       out_specs=(rows, rows), check_vma=False)(x, t, m)


def token_logps(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *,
                impl: str = "auto", block_n: int | None = None, block_v: int | None = None,
                layout: str | None = None, interpret: bool | None = None):
  """log softmax(logits)[target] and the log-sum-exp, for every row.

  logits: float[..., V] (any float dtype; math in float32). targets: int[...] in [0, V).
  mask: optional float[...]; masked rows get log-prob 0 and no gradient through it.
  Returns (logp float32[...], lse float32[...]). Gradients flow into `logits` only.
  """
  *lead, v = logits.shape
  if targets.shape != tuple(lead):
    raise ValueError(f"targets {targets.shape} must match logits {logits.shape} without V")
  flat = lambda a: a.reshape(-1, *a.shape[len(lead):])
  x, t = flat(logits), flat(targets).astype(jnp.int32)
  m = jnp.ones(t.shape, jnp.float32) if mask is None else flat(mask).astype(jnp.float32)
  impl = resolve(impl)
  if impl == "naive":
    logp, lse = _naive(x, t, m)
  elif impl == "xla":
    logp, lse = xla_logps.streamed(block_v or DEFAULT_BLOCK_V)(x, t, m)
  else:
    layout = layout or pallas_logps.default_layout()
    bn, bv = pallas_logps.default_blocks(layout)
    if interpret is None:
      interpret = jax.default_backend() not in ("tpu", "gpu")
    fn = pallas_logps.kernel(layout, block_n or bn, block_v or bv, interpret)
    logp, lse = _per_shard(fn, x, t, m)
  return logp.reshape(lead), lse.reshape(lead)


def next_token_logps(logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
                     impl: str = "auto", **kw) -> jax.Array:
  """log p(tokens[t] | tokens[<t]) for t >= 1, and 0 at t = 0 (and where `mask` is 0).

  logits: float[N, T, V], the prediction at position t is for token t+1.
  tokens: int32[N, T]; mask: optional float[N, T] aligned with `tokens` (the loss mask).
  Returns float32[N, T], aligned with `tokens`. The targets are shifted rather than the
  logits sliced, so no copy of the `[N, T, V]` logits is made.
  """
  n, t = tokens.shape
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  shifted = jnp.ones((n, t - 1), jnp.float32) if mask is None else mask[:, 1:]
  logp, _ = token_logps(logits, targets, jnp.pad(shifted, ((0, 0), (0, 1))), impl=impl, **kw)
  return jnp.pad(logp[:, :-1], ((0, 0), (1, 0)))


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum over the last axis of `x * mask` (mask is 0/1, same shape)."""
  return jnp.sum(x * mask, axis=-1)
