"""PPO's value function (docs/online.md#ppo): a value head on the policy trunk
(`--online.value=head`) or a separate value model (`--online.value=model`).

A scalar linear head V(h) = h w + b on a decoder's final-norm hidden state: the policy's
own, or that of a second decoder initialised from the policy's weights (`ValueModel`).
Either is held as a submodule of the policy (like SparsePO's mask network,
`models/token_mask.py`), so it trains, shards and checkpoints with the policy's
parameters, under the one optimizer (TRL wraps policy and value model the same way),
while the sampler, which only calls the decoder, never sees it. `V_t`, the value of the
state that samples token t, is read from position t-1 (the state that predicts token t),
so values share the index of the per-token log-probs and the loss mask.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref.models.logps import LogpsOptions, _head_logps
from jaxpref.types import GroupBatch

ATTR = "value_head"  # the policy Decoder's attribute holding the head
MODEL_ATTR = "value_model"  # ... or the separate value model
KINDS = ("head", "model")


class ValueHead(nnx.Module):
  """float32[N, T, D] hidden states -> float32[N, T] values.

  Zero-initialised: every value starts at 0, and until the head has moved the value loss
  sends no gradient into the trunk, so PPO's first updates train the policy it started
  from (TRL's head draws small random weights instead; either starts near 0)."""

  def __init__(self, d_model: int):
    # Names outside parallel.sharding.LOGICAL_AXES: these small leaves stay replicated.
    self.value_proj = nnx.Param(jnp.zeros((d_model, 1), jnp.float32))
    self.value_bias = nnx.Param(jnp.zeros((1,), jnp.float32))

  def __call__(self, h: jax.Array) -> jax.Array:
    return (h.astype(jnp.float32) @ self.value_proj[...])[..., 0] + self.value_bias[...][0]


class ValueModel(nnx.Module):
  """A decoder of its own under a value head; its paths end in the decoder's parameter
  names, so it shards as the policy does."""

  def __init__(self, decoder):
    self.decoder = decoder
    self.head = ValueHead(decoder.config.d_model)

  def values(self, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    return self.head(self.decoder.hidden(tokens, segment_ids=segment_ids))


def attach(model, needs, kind: str = "head"):
  """`model` with a value function attached when `needs` (a losses.TokenNeeds) asks for
  values: a head (`kind="head"`) or a value model starting from a copy of `model`'s
  weights (`"model"`); otherwise `model` unchanged."""
  if not getattr(needs, "values", False):
    return model
  if kind not in KINDS:
    raise ValueError(f"--online.value must be one of {', '.join(KINDS)}, got {kind!r}")
  if kind == "model":
    setattr(model, MODEL_ATTR, ValueModel(nnx.clone(model)))
  else:
    setattr(model, ATTR, ValueHead(model.config.d_model))
  return model


def token_logps_values(graphdef: nnx.GraphDef, params: Any, batch: GroupBatch,
                       opts: LogpsOptions = LogpsOptions()):
  """(log-probs, values), each float32[B, K, T] and 0 off the loss mask, from one forward
  pass: token t's log-prob and its state's value V_t both come from position t-1."""
  model = nnx.merge(graphdef, params)
  head, value_model = getattr(model, ATTR, None), getattr(model, MODEL_ATTR, None)
  if head is None and value_model is None:
    raise ValueError("this loss reads a value function, but the policy has none: build it "
                     "with jaxpref.models.value_head.attach(model, needs)")
  b, k, t = batch.tokens.shape
  tokens, mask, segment_ids = (x.reshape(b * k, t) for x in
                               (batch.tokens, batch.loss_mask, batch.segment_ids))
  h = model.hidden(tokens, segment_ids=segment_ids)
  logp = _head_logps(model, h, tokens, mask, opts)
  v = head(h) if value_model is None else value_model.values(tokens, segment_ids)
  values = jnp.pad(v[:, :-1], ((0, 0), (1, 0))) * mask
  return logp.reshape(b, k, t), values.reshape(b, k, t)
