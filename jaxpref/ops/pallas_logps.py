"""Pallas kernels for per-token log-probs: an online log-sum-exp forward, a blockwise backward.

Two forward layouts share `online_update` with the XLA twin:
- "grid" (TPU/Mosaic): grid (row blocks, vocab blocks); the vocabulary axis is the inner,
  sequential one, and the [rows, 1] outputs stay resident across it as the running
  (max, sum, picked) accumulators. Blocks are (8k, 128k)-shaped for the TPU's tiles.
- "loop" (GPU/Triton): grid over row blocks only; each program walks the vocabulary with
  masked loads, because Triton programs run in parallel and cannot accumulate across a grid
  axis. Block sides are powers of two, as Triton requires.
Both run in interpret mode on the CPU, which is how the tests check them against the twin.
The backward (`g * (onehot - softmax)`, recomputed from the saved lse) is elementwise per
block, so one (row, vocab)-gridded kernel serves both backends.

Every pallas_call names its compiler explicitly (`compiler_params`): on GPU the Triton
params select Triton (jax 0.10 otherwise picks Mosaic GPU, whose lowering of these
kernels asks for more shared memory than an H100 has); on TPU the Mosaic params mark the
row axis parallel (megacore chips split it between their TensorCores) and the vocabulary
axis of the forward "arbitrary" (sequential: it carries the accumulators), and set a VMEM
limit sized from the blocks. tests/ops/test_kernel_lowering.py lowers all of them for both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxpref.ops.xla_logps import NEG_INF, online_update, with_vjp


def _iota(shape, dim):
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


# Triton: 4 warps for a (16, 1024) tile; 2 stages let the next vocab block's load overlap
# the current block's exp and sums.
TRITON_WARPS, TRITON_STAGES = 4, 2
MIB = 1 << 20


def vmem_limit(bn: int, bv: int, itemsize: int) -> int:
  """Scoped VMEM for one (bn, bv) block: the input double-buffered, ~6 float32 temporaries
  of the block (upcast, iota, exp, selects), 50% headroom, in whole MiB, at least the
  16 MiB default: (256, 2048) bf16 gets 21 MiB."""
  need = 2 * bn * bv * itemsize + 6 * bn * bv * 4
  return max(16 * MIB, -(-need * 3 // 2 // MIB) * MIB)


def compiler_params(layout: str, semantics: tuple[str, ...], bn: int, bv: int, itemsize: int):
  """The explicit compiler of a kernel: Mosaic TPU for "grid", Triton for "loop"."""
  if layout == "grid":
    from jax.experimental.pallas import tpu as pltpu  # TPU-only module, imported lazily
    return pltpu.CompilerParams(dimension_semantics=semantics,
                                vmem_limit_bytes=vmem_limit(bn, bv, itemsize))
  from jax.experimental.pallas import triton as pltriton  # GPU-only module, imported lazily
  return pltriton.CompilerParams(num_warps=TRITON_WARPS, num_stages=TRITON_STAGES)


def _grid_fwd_kernel(t_ref, x_ref, m_ref, s_ref, p_ref, *, v, bv):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
    s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)
    p_ref[...] = jnp.zeros(p_ref.shape, jnp.float32)

  cols = j * bv + _iota(x_ref.shape, 1)
  x = jnp.where(cols < v, x_ref[...].astype(jnp.float32), NEG_INF)
  carry = (m_ref[:, 0], s_ref[:, 0], p_ref[:, 0])
  m, s, p = online_update(carry, x, cols, t_ref[:, 0])
  m_ref[...], s_ref[...], p_ref[...] = m[:, None], s[:, None], p[:, None]


def _grid_forward(logits, targets, *, bn, bv, interpret):
  n, v = logits.shape
  row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
  stat = jax.ShapeDtypeStruct((n, 1), jnp.float32)
  m, s, p = pl.pallas_call(
      functools.partial(_grid_fwd_kernel, v=v, bv=bv),
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      in_specs=[row, pl.BlockSpec((bn, bv), lambda i, j: (i, j))],
      out_specs=[row, row, row],
      out_shape=[stat, stat, stat],
      compiler_params=compiler_params("grid", ("parallel", "arbitrary"), bn, bv,
                                      logits.dtype.itemsize),
      interpret=interpret,
  )(targets[:, None], logits)
  return p[:, 0], m[:, 0] + jnp.log(s[:, 0])


def _loop_fwd_kernel(t_ref, x_ref, m_ref, s_ref, p_ref, *, n, v, bn, bv):
  from jax.experimental.pallas import triton as plgpu  # GPU-only module, imported lazily
  i = pl.program_id(0)
  rows = i * bn + _iota((bn,), 0)
  in_rows = rows < n
  targets = plgpu.load(t_ref.at[pl.ds(i * bn, bn)], mask=in_rows, other=0)

  def body(j, carry):
    cols = j * bv + _iota((1, bv), 1)
    ok = in_rows[:, None] & (cols < v)
    x = plgpu.load(x_ref.at[pl.ds(i * bn, bn), pl.ds(j * bv, bv)], mask=ok, other=NEG_INF)
    return online_update(carry, x.astype(jnp.float32), cols, targets)

  init = (jnp.full((bn,), NEG_INF, jnp.float32), jnp.zeros((bn,), jnp.float32),
          jnp.zeros((bn,), jnp.float32))
  m, s, p = jax.lax.fori_loop(0, pl.cdiv(v, bv), body, init)
  for ref, val in ((m_ref, m), (s_ref, s), (p_ref, p)):
    plgpu.store(ref.at[pl.ds(i * bn, bn)], val, mask=in_rows)


def _loop_forward(logits, targets, *, bn, bv, interpret):
  n, v = logits.shape
  stat = jax.ShapeDtypeStruct((n,), jnp.float32)
  m, s, p = pl.pallas_call(
      functools.partial(_loop_fwd_kernel, n=n, v=v, bn=bn, bv=bv),
      grid=(pl.cdiv(n, bn),),
      out_shape=[stat, stat, stat],
      compiler_params=compiler_params("loop", ("parallel",), bn, bv, logits.dtype.itemsize),
      interpret=interpret,
  )(targets, logits)
  return p, m + jnp.log(s)


def _bwd_kernel(t_ref, lse_ref, gp_ref, gl_ref, x_ref, dx_ref, *, bv):
  cols = pl.program_id(1) * bv + _iota(x_ref.shape, 1)
  p = jnp.exp(x_ref[...].astype(jnp.float32) - lse_ref[...])
  g_logp = gp_ref[...]
  grad = jnp.where(cols == t_ref[...], g_logp, 0.0) + (gl_ref[...] - g_logp) * p
  dx_ref[...] = grad.astype(dx_ref.dtype)


def _backward(logits, targets, lse, g_logp, g_lse, *, bn, bv, interpret, layout):
  n, v = logits.shape
  row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
  block = pl.BlockSpec((bn, bv), lambda i, j: (i, j))
  col = lambda a: a[:, None]
  return pl.pallas_call(
      functools.partial(_bwd_kernel, bv=bv),
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      in_specs=[row, row, row, row, block],
      out_specs=block,
      out_shape=jax.ShapeDtypeStruct(logits.shape, logits.dtype),
      # Elementwise per block: both axes parallel. The output block is as large as the
      # input's, so the VMEM estimate counts it among the temporaries.
      compiler_params=compiler_params(layout, ("parallel", "parallel"), bn, bv,
                                      logits.dtype.itemsize),
      interpret=interpret,
  )(col(targets), col(lse), col(g_logp), col(g_lse), logits)


def default_layout() -> str:
  return "loop" if jax.default_backend() == "gpu" else "grid"


def default_blocks(layout: str) -> tuple[int, int]:
  # TPU: rows a multiple of 8 sublanes, vocab a multiple of 128 lanes, sized so a bf16
  # (256, 2048) block double-buffered fits VMEM. GPU: one warp-friendly power-of-two tile.
  return (256, 2048) if layout == "grid" else (16, 1024)


@functools.lru_cache(maxsize=None)
def kernel(layout: str, bn: int, bv: int, interpret: bool):
  """The Pallas `(logits, targets, mask) -> (logp, lse)` with its recomputing backward."""
  forward = {"grid": _grid_forward, "loop": _loop_forward}[layout]
  opts = dict(bn=bn, bv=bv, interpret=interpret)
  return with_vjp(functools.partial(forward, **opts),
                  functools.partial(_backward, layout=layout, **opts))
