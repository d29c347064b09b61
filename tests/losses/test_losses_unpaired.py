"""Unpaired (KTO-style) losses against float64 numpy references, and their properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

import loss_refs as R
from jaxpref import losses
from jaxpref.types import Logps

UNPAIRED = [("kto", {}), ("kto", {"desirable_weight": 1.33, "beta": 0.5}), ("apo", {}),
            ("apo", {"kl_min": -0.5, "kl_max": 0.5}), ("apo_zero_unpaired", {}), ("bco", {})]


def inputs(seed, b=16, spread=5.0):
  rng = np.random.default_rng(seed)
  ref = -rng.uniform(5, 50, (b, 2))
  policy = ref + rng.normal(0, spread, (b, 2))
  label = np.stack([rng.integers(0, 2, b), np.full(b, -1)], 1)
  weight = rng.uniform(0.5, 2.0, b)
  weight[:2] = 0.0
  return policy, ref, label, weight


def make_lp(policy, ref, label, weight, dtype=jnp.float32):
  policy = jnp.asarray(policy, dtype)
  return Logps(policy=policy, ref=jnp.asarray(ref, dtype), length=jnp.ones_like(policy),
               valid=jnp.ones(policy.shape, bool), weight=jnp.asarray(weight, dtype),
               label=jnp.asarray(label, jnp.int32))


@pytest.mark.parametrize("name,hp", UNPAIRED, ids=str)
@pytest.mark.parametrize("spread", [5.0, 200.0])
def test_matches_numpy(name, hp, spread):
  policy, ref, label, weight = inputs(0, spread=spread)
  loss, metrics = jax.jit(losses.bind(name, hp))(make_lp(policy, ref, label, weight))
  want = getattr(R, name)(policy, ref, None, weight, label[:, 0], **hp)
  np.testing.assert_allclose(float(loss), want, rtol=2e-4, atol=2e-5)
  assert all(np.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("name,hp", UNPAIRED, ids=str)
def test_gradients_sharding_and_vmap(name, hp):
  policy, ref, label, weight = inputs(1, spread=1.0)
  fn = losses.bind(name, hp)
  if name != "bco":  # bco's delta is a stop-gradient batch mean of the very rewards it shifts
    with jax.enable_x64(True):
      lp = make_lp(policy, ref, label, weight, jnp.float64)
      # Perturb the labelled members only: z0 (from member 1) is stop-gradient by design.
      with_member0 = lambda p0: fn(Logps(**{**lp.__dict__, "policy": lp.policy.at[:, 0].set(p0)}))[0]
      check_grads(with_member0, (lp.policy[:, 0],), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)
  lp = make_lp(policy, ref, label, weight)
  plain = float(jax.jit(fn)(lp)[0])
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  sharded = float(jax.jit(fn)(jax.device_put(lp, NamedSharding(mesh, P("data"))))[0])
  np.testing.assert_allclose(sharded, plain, rtol=1e-5)  # z0 is the global batch mean
  stacked = jax.tree.map(lambda *x: jnp.stack(x), lp, lp)
  np.testing.assert_allclose(jax.vmap(lambda l: fn(l)[0])(stacked), [plain, plain], rtol=1e-5)


def test_kto_gradients_raise_desirable_lower_undesirable_and_skip_kl_member():
  policy, ref, label, weight = inputs(2)
  g = jax.grad(lambda p: losses.get("kto")(make_lp(p, ref, label, weight))[0])(
      jnp.asarray(policy, jnp.float32))
  real = weight > 0
  assert (g[real & (label[:, 0] == 1), 0] < 0).all()
  assert (g[real & (label[:, 0] == 0), 0] > 0).all()
  np.testing.assert_array_equal(g[:, 1], 0.0)  # the reference point is stop-gradient


def test_kto_reference_point_is_clamped_at_zero():
  policy, ref, label, weight = inputs(3)
  below = make_lp(policy, ref.copy(), label, weight)
  # Mismatched completions far below the reference: z0 = 0 (not negative).
  pol = policy.copy()
  pol[:, 1] = ref[:, 1] - 100.0
  _, m = losses.get("kto")(make_lp(pol, ref, label, weight))
  assert float(m["kl"]) == 0.0
  _, m = losses.get("apo")(make_lp(pol, ref, label, weight), kl_min=-5.0)
  np.testing.assert_allclose(float(m["kl"]), -5.0 * 0.1)  # clipped at kl_min, times beta
  del below


def test_bco_gradient_closed_form():
  policy, ref, label, weight = inputs(5, spread=1.0)
  beta = 0.1
  g = jax.grad(lambda p: losses.get("bco")(make_lp(p, ref, label, weight), beta=beta)[0])(
      jnp.asarray(policy, jnp.float32))
  r = beta * (policy - ref)[:, 0]
  delta = np.sum(r * weight) / np.sum(weight)
  sign = np.where(label[:, 0] == 1, 1.0, -1.0)
  want = -sign * (1 - R.sig(sign * (r - delta))) * beta * weight / np.sum(weight)
  np.testing.assert_allclose(g[:, 0], want, rtol=1e-4, atol=1e-7)


def test_unpaired_loss_on_pair_data_says_how_to_fix_it():
  policy, ref, label, weight = inputs(4)
  lp = Logps(**{**make_lp(policy, ref, label, weight).__dict__, "label": None})
  with pytest.raises(ValueError, match="--data_format=unpaired"):
    losses.get("kto")(lp)
