"""The Pallas log-prob path under a multi-device mesh: a Pallas call is opaque to XLA's
partitioner, so `token_logps(impl="pallas")` wraps it in a shard_map over the rows. Under
the 8 fake CPU devices of tests/conftest.py it must match the XLA twin (values and the
custom VJP's gradients), fall back to fewer axes (or none) when the mesh does not divide
the rows, and really trace a shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxpref.ops import logprobs

V = 300
KW = dict(block_n=8, block_v=128)  # small blocks: several vocab blocks, a ragged last one


def _mesh(shape=(2, 2, 2), axis_type=AxisType.Auto):
  assert jax.device_count() == 8, "conftest sets --xla_force_host_platform_device_count=8"
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3)


@pytest.fixture(scope="module")
def mesh():
  """The training mesh's kind (jaxpref.parallel.mesh builds `Mesh`es of Auto axes)."""
  return _mesh()


def _inputs(b, t, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  logits = 3.0 * jax.random.normal(k1, (b, t, V), jnp.float32)
  targets = jax.random.randint(k2, (b, t), 0, V)
  mask = (jax.random.uniform(k3, (b, t)) > 0.3).astype(jnp.float32)
  weights = jnp.arange(b * t, dtype=jnp.float32).reshape(b, t) / (b * t) - 0.5
  return logits, targets, mask, weights


def _fns(impl, use_mask):
  def values(logits, targets, mask):
    return logprobs.token_logps(logits, targets, mask if use_mask else None, impl=impl,
                                interpret=True, **KW)

  def grad(logits, targets, mask, weights):
    loss = lambda x: jnp.sum(values(x, targets, mask)[0] * weights)
    return jax.grad(loss)(logits)

  return values, grad


def _run(mesh, fn, *args, batch_spec):
  """fn jitted under `mesh` as the ambient (abstract) mesh, as training traces its steps,
  with the inputs' batch dimension sharded over `batch_spec`; also its jaxpr's text."""
  def traced(*a):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*a)
  args = [jax.device_put(a, NamedSharding(mesh, P(batch_spec))) for a in args]
  return jax.jit(traced)(*args), str(jax.make_jaxpr(traced)(*args))


@pytest.mark.parametrize("b,t,use_mask,n_shard_maps", [
    (8, 5, True, 1),    # 40 rows: data x fsdp x tensor = 8 divides them
    (4, 3, False, 1),   # 12 rows: data x fsdp = 4 divides them, x tensor does not
    (2, 3, True, 1),    # 6 rows: only data = 2
    (1, 7, True, 0),    # 7 rows: no axis divides them -> the kernel runs unwrapped
])
def test_pallas_matches_xla_per_shard(mesh, b, t, use_mask, n_shard_maps):
  logits, targets, mask, weights = _inputs(b, t)
  spec = ("data", "fsdp") if b % 4 == 0 else ("data",) if b % 2 == 0 else None
  pv, pg = _fns("pallas", use_mask)
  xv, xg = _fns("xla", use_mask)

  (logp, lse), text = _run(mesh, pv, logits, targets, mask, batch_spec=spec)
  (ref_logp, ref_lse), ref_text = _run(mesh, xv, logits, targets, mask, batch_spec=spec)
  assert text.count("shard_map[") == n_shard_maps
  assert "shard_map" not in ref_text  # the XLA twin is left to the partitioner
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
  if use_mask:
    assert np.all(np.asarray(logp)[np.asarray(mask) == 0] == 0)

  g, gtext = _run(mesh, pg, logits, targets, mask, weights, batch_spec=spec)
  ref_g, _ = _run(mesh, xg, logits, targets, mask, weights, batch_spec=spec)
  assert (gtext.count("shard_map[") > 0) == (n_shard_maps > 0)
  np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-6)


def test_row_axes_take_the_longest_dividing_prefix(mesh):
  am = mesh.abstract_mesh
  assert logprobs._row_axes(am, 40) == ("data", "fsdp", "tensor")
  assert logprobs._row_axes(am, 12) == ("data", "fsdp")
  assert logprobs._row_axes(am, 6) == ("data",)
  assert logprobs._row_axes(am, 7) == ()
  # Axes of size 1 are skipped, not a reason to stop.
  one = _mesh((1, 8, 1)).abstract_mesh
  assert logprobs._row_axes(one, 16) == ("fsdp",)


def test_no_mesh_calls_the_kernel_directly():
  logits, targets, mask, _ = _inputs(2, 3)
  f = lambda x: logprobs.token_logps(x, targets, mask, impl="pallas", interpret=True, **KW)
  assert "shard_map" not in str(jax.make_jaxpr(f)(logits))

