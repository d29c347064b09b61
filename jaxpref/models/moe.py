"""Mixture-of-experts MLP (Mixtral's sparse block): a linear router picks each token's top-k
experts, and their gated-MLP outputs are summed with the renormalised router weights.

Dispatch is dense: every expert runs on every token and the router's weights are zero
outside the top k. That is exact (what transformers computes, to rounding) and shards
plainly: the expert axis of every expert weight lies on a mesh axis
(`jaxpref.parallel.sharding`, logical axis `experts`), each device runs its own experts on
its tokens, and the weighted sum over experts is the one reduction across that axis. The
cost is n_experts / experts_per_token times a top-k dispatch's MLP FLOPs; a capacity-based
token dispatch is not built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref.models.layers import ACTIVATIONS, param


def route(logits: jax.Array, k: int) -> jax.Array:
  """float32[..., E] weights: softmax over the experts, the top k kept and renormalised to
  sum to one, every other expert 0 (Mixtral's router, softmax before top-k)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top, idx = jax.lax.top_k(probs, k)
  top = top / jnp.sum(top, axis=-1, keepdims=True)
  return jnp.sum(jax.nn.one_hot(idx, logits.shape[-1], dtype=jnp.float32) * top[..., None],
                 axis=-2)


class MoE(nnx.Module):
  """router [D, E]; expert_gate, expert_up [E, D, F]; expert_down [E, F, D]. Named apart
  from the dense MLP's gate/up/down, so sharding and LoRA tell the two kinds apart."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    s, e = cfg.init_std, cfg.n_experts
    self.activation = cfg.mlp_activation
    self.k = cfg.experts_per_token
    self.router = param(rngs, (cfg.d_model, e), s)
    self.expert_gate = param(rngs, (e, cfg.d_model, cfg.d_ff), s)
    self.expert_up = param(rngs, (e, cfg.d_model, cfg.d_ff), s)
    self.expert_down = param(rngs, (e, cfg.d_ff, cfg.d_model), s)

  def __call__(self, x):
    dt = x.dtype
    weights = route(jnp.einsum("ntd,de->nte", x, self.router[...].astype(dt),
                               preferred_element_type=jnp.float32), self.k)
    gate = jnp.einsum("ntd,edf->ntef", x, self.expert_gate[...].astype(dt))
    up = jnp.einsum("ntd,edf->ntef", x, self.expert_up[...].astype(dt))
    h = ACTIVATIONS[self.activation](gate) * up * weights[..., None].astype(dt)
    return jnp.einsum("ntef,efd->ntd", h, self.expert_down[...].astype(dt))
