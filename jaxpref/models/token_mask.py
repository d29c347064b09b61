"""SparsePO's learned token masks: the `simple_all` mask network (huawei-noah/HEBO SparsePO,
docs/losses.md#sparse_po), held as a submodule of the policy so it trains, shards and checkpoints
with the policy's parameters.

Per mask: LayerNorm (one, shared by the layers, as in HEBO's code) of each layer's
reference residual stream -> Linear(D -> 1) -> ReLU, then a mixer Linear(L -> 1, no bias)
-> ReLU. Masks are >= 0 and unbounded above. HEBO's dropout (p=0.01..0.1) is omitted: the
train step is deterministic (no dropout RNG anywhere in jaxpref).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

ATTR = "mask_net"  # the policy Decoder's attribute holding the network


class TokenMaskNet(nnx.Module):
  """float32[L, N, T, D] per-layer states -> float32[N, T, M] masks, M independent networks.

  Initialised so every mask starts near 1 (projection bias 1, mixer 1/L), i.e. training
  starts from unmasked DPO plus the KL term; HEBO keeps torch's default init, under which
  a ReLU mixer with negative weights can start (and stay) at an all-zero mask.
  """

  def __init__(self, n_layers: int, d_model: int, n_masks: int = 2, *, eps: float = 1e-5,
               init_std: float = 0.02, rngs: nnx.Rngs):
    m, l, d = n_masks, n_layers, d_model
    # Names outside parallel.sharding.LOGICAL_AXES: these small leaves stay replicated.
    self.ln_scale = nnx.Param(jnp.ones((m, d), jnp.float32))
    self.ln_bias = nnx.Param(jnp.zeros((m, d), jnp.float32))
    self.proj = nnx.Param(init_std * jax.random.normal(rngs.params(), (m, l, d), jnp.float32))
    self.proj_bias = nnx.Param(jnp.ones((m, l), jnp.float32))
    self.mixer = nnx.Param(jnp.full((m, l), 1.0 / l, jnp.float32))
    self.eps = eps

  def __call__(self, states: jax.Array) -> jax.Array:
    x = states.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    xhat = (x - mean) * jax.lax.rsqrt(var + self.eps)  # shared by the masks: normalise once
    # (xhat * scale_m + bias_m) . proj_ml, with the affine folded into the projection so
    # no [M, L, N, T, D] tensor is formed.
    w = self.ln_scale[...][:, None, :] * self.proj[...]  # [M, L, D]
    offset = jnp.einsum("md,mld->ml", self.ln_bias[...], self.proj[...]) + self.proj_bias[...]
    per_layer = jax.nn.relu(jnp.einsum("lntd,mld->ntml", xhat, w) + offset)  # [N, T, M, L]
    return jax.nn.relu(jnp.einsum("ntml,ml->ntm", per_layer, self.mixer[...]))


def attach(model, needs, seed: int = 0):
  """`model` with a mask network attached when `needs` (losses.needs_tokens(name)) asks for
  learned masks; otherwise `model` unchanged. Two masks are always built (reward, KL): a
  shared-mask loss reads the first, and the second then only sees weight decay."""
  if getattr(needs, "token_mask", None) != "learned":
    return model
  cfg = model.config
  setattr(model, ATTR, TokenMaskNet(cfg.n_layers, cfg.d_model, 2,
                                    rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(seed), 7))))
  return model
