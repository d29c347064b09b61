"""Per-token log-prob ops: every implementation against a float64 numpy reference.

The Pallas kernels run in interpret mode here (no accelerator in CI); both layouts (the TPU
grid and the GPU loop) are checked, with block sizes that do not divide the shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref import ops

BACKEND = jax.default_backend()
IMPLS = {
    "naive": dict(impl="naive"),
    "xla": dict(impl="xla", block_v=48),
    # Each layout is compiled on its own backend and interpreted everywhere else.
    "pallas_grid": dict(impl="pallas", layout="grid", block_n=8, block_v=128,
                        interpret=BACKEND != "tpu"),
    "pallas_loop": dict(impl="pallas", layout="loop", block_n=8, block_v=32,
                        interpret=BACKEND != "gpu"),
}


def ref_logps(x, t, m):
  """float64: logp = m * (x[t] - lse), lse, and d/dx of sum(a * logp + b * lse)."""
  x = x.astype(np.float64)
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  picked = np.take_along_axis(x, t[..., None], -1)[..., 0]
  return m * (picked - lse), lse


def ref_grad(x, t, m, a, b):
  x = x.astype(np.float64)
  _, lse = ref_logps(x, t, m)
  p = np.exp(x - lse[..., None])
  onehot = np.eye(x.shape[-1])[t]
  return (a * m)[..., None] * (onehot - p) + b[..., None] * p


def _data(shape, v, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(*shape, v)) * scale).astype(np.float32)
  t = rng.integers(0, v, shape).astype(np.int32)
  m = (rng.uniform(size=shape) > 0.3).astype(np.float32)
  a = rng.normal(size=shape).astype(np.float32)  # cotangent of logp
  b = rng.normal(size=shape).astype(np.float32)  # cotangent of lse
  return x, t, m, a, b


def _value_and_grad(kw, x, t, m, a, b):
  def f(x):
    logp, lse = ops.token_logps(x, t, m, **kw)
    return jnp.sum(a * logp) + jnp.sum(b * lse), (logp, lse)
  (_, (logp, lse)), g = jax.jit(jax.value_and_grad(f, has_aux=True))(x)
  return logp, lse, g


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("n,v", [(37, 300), (8, 128), (1, 7)])
def test_values_and_gradients_match_float64_reference(name, n, v):
  x, t, m, a, b = _data((n,), v)
  logp, lse, g = _value_and_grad(IMPLS[name], x, t, m, a, b)
  want_logp, want_lse = ref_logps(x, t, m)
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(g, ref_grad(x, t, m, a, b), rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("name", IMPLS)
def test_bfloat16_logits(name):
  """bf16 in, float32 math: error is the input rounding only (tolerance: bf16 epsilon)."""
  x, t, m, a, b = _data((19,), 200, seed=1)
  xb = jnp.asarray(x, jnp.bfloat16)
  logp, lse, g = _value_and_grad(IMPLS[name], xb, t, m, a, b)
  assert g.dtype == jnp.bfloat16
  x64 = np.asarray(xb.astype(jnp.float32))
  want_logp, want_lse = ref_logps(x64, t, m)
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=5e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=5e-5)
  np.testing.assert_allclose(np.asarray(g, np.float32), ref_grad(x64, t, m, a, b),
                             rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["xla", "pallas_grid", "pallas_loop"])
def test_pallas_and_twin_agree_with_leading_dims_and_vmap(name):
  x, t, m, _, _ = _data((3, 5), 130, seed=2)
  want = ops.token_logps(x, t, m, impl="naive")
  got = ops.token_logps(x, t, m, **IMPLS[name])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  vmapped = jax.vmap(functools.partial(ops.token_logps, **IMPLS[name]))(x, t, m)
  np.testing.assert_allclose(vmapped[0], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(vmapped[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["xla", "pallas_grid"])
def test_sharded_rows_on_a_mesh(name):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (conftest fakes 8 CPU devices)")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))  # as parallel.make_mesh
  x, t, m, a, b = _data((16,), 96, seed=3)
  put = lambda arr, spec: jax.device_put(arr, NamedSharding(mesh, spec))
  xs, ts, ms = put(x, P("data", None)), put(t, P("data")), put(m, P("data"))
  logp, lse, g = _value_and_grad(IMPLS[name], xs, ts, ms, a, b)
  np.testing.assert_allclose(logp, ref_logps(x, t, m)[0], rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(g, ref_grad(x, t, m, a, b), rtol=1e-4, atol=2e-6)


def test_streamed_twin_holds_no_logits_sized_temporary():
  """The compiled fwd+bwd of the XLA twin needs far less scratch than one [N, V] float32.

  float32 logits: for bfloat16 ones XLA:CPU hoists a whole-array convert (xla_logps.py).
  """
  n, v = 256, 8192
  x = jax.ShapeDtypeStruct((n, v), jnp.float32)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)

  def temp_bytes(impl):
    f = jax.grad(lambda x, t: ops.token_logps(x, t, impl=impl, block_v=512)[0].sum())
    return jax.jit(f).lower(x, t).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes("xla") < n * v * 4 / 4


def test_next_token_logps_alignment_and_mask():
  x, _, _, _, _ = _data((3, 7), 11, seed=4)
  tokens = np.random.default_rng(5).integers(0, 11, (3, 7))
  mask = (np.random.default_rng(6).uniform(size=(3, 7)) > 0.4).astype(np.float32)
  got = ops.next_token_logps(jnp.asarray(x), jnp.asarray(tokens), jnp.asarray(mask))
  logp64, _ = ref_logps(x[:, :-1], tokens[:, 1:], mask[:, 1:])
  want = np.pad(logp64, ((0, 0), (1, 0)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[:, 0] == 0)


def test_unknown_impl_and_shape_errors():
  x, t, _, _, _ = _data((4,), 10)
  with pytest.raises(ValueError, match="impl must be one of"):
    ops.token_logps(x, t, impl="cuda")
  with pytest.raises(ValueError, match="targets"):
    ops.token_logps(x, t[:3])


# -- fused LM head ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,d,v,block_v", [(37, 16, 1000, 128), (5, 8, 64, 64), (4, 3, 10, 4)])
def test_fused_linear_matches_float64_reference(n, d, v, block_v):
  rng = np.random.default_rng(7)
  h = rng.normal(size=(n, d)).astype(np.float32)
  w = (rng.normal(size=(d, v)) * 0.5).astype(np.float32)
  _, t, m, a, b = _data((n,), v, seed=8)

  def f(h, w):
    logp, lse = ops.fused_linear_logps(h, w, t, m, block_v=block_v)
    return jnp.sum(a * logp) + jnp.sum(b * lse), (logp, lse)

  (_, (logp, lse)), (dh, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(h, w)
  logits = h.astype(np.float64) @ w.astype(np.float64)
  want_logp, want_lse = ref_logps(logits, t, m)
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=5e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=5e-5)
  dlogits = ref_grad(logits, t, m, a, b)
  np.testing.assert_allclose(dh, dlogits @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, h.T.astype(np.float64) @ dlogits, rtol=1e-4, atol=1e-4)


def test_fused_linear_never_materialises_the_logits():
  n, d, v = 512, 64, 16384
  h = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  f = jax.grad(lambda h, w, t: ops.fused_linear_logps(h, w, t, block_v=1024)[0].sum(), (0, 1))
  temp = jax.jit(f).lower(h, w, t).compile().memory_analysis().temp_size_in_bytes
  assert temp < n * v * 4 / 4


# -- policy/reference log-ratio ----------------------------------------------------------------

def test_token_logratio_sums_lengths_and_gradient_only_into_policy():
  rng = np.random.default_rng(9)
  b, k, t, v = 2, 3, 6, 13
  pol = rng.normal(size=(b, k, t, v)).astype(np.float32)
  ref = rng.normal(size=(b, k, t, v)).astype(np.float32)
  tokens = rng.integers(0, v, (b, k, t))
  mask = np.zeros((b, k, t), np.float32)
  mask[..., 2:5] = 1
  out = ops.token_logratio(pol, ref, tokens, mask, impl="xla", block_v=4)
  flat = lambda a: a.reshape(b * k, *a.shape[2:])
  want_pol = np.pad(ref_logps(flat(pol)[:, :-1], flat(tokens)[:, 1:], flat(mask)[:, 1:])[0],
                    ((0, 0), (1, 0))).reshape(b, k, t)
  want_ref = np.pad(ref_logps(flat(ref)[:, :-1], flat(tokens)[:, 1:], flat(mask)[:, 1:])[0],
                    ((0, 0), (1, 0))).reshape(b, k, t)
  np.testing.assert_allclose(out.ratio_tok, want_pol - want_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.policy, want_pol.sum(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.ref, want_ref.sum(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out.length, np.full((b, k), 3.0))
  g_pol, g_ref = jax.grad(lambda p, r: ops.token_logratio(p, r, tokens, mask).ratio_tok.sum(),
                          (0, 1))(pol, ref)
  assert np.abs(np.asarray(g_pol)).sum() > 0
  np.testing.assert_array_equal(g_ref, 0.0)
