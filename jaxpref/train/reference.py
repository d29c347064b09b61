"""The reference: one strategy, resolved once from `--reference`, that a step holds fixed.

- `model`: a frozen copy of the initial policy, sharded like it (its own buffers: the step
  donates the policy's, never the reference's); under LoRA, a copy of the base.
- `precomputed`: no reference model in the step; the batches carry the reference's
  sequence log-probs (computed once before training, or read from the records).
- `lora_base`: the frozen base under the LoRA adapters is the reference (no second copy).
- `none`: the role has no reference (the reward model).

With LoRA the trained params are adapters, and `base` is the frozen base they sit on, kept
here so that it is neither donated nor saved.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxpref.models import lora

KINDS = ("model", "precomputed", "lora_base", "none")


@dataclasses.dataclass(frozen=True)
class Reference:
  kind: str
  params: Any = None  # the reference model's params (kind "model"); None otherwise
  base: Any = None  # LoRA's frozen base; None without LoRA

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"--reference must be one of {', '.join(KINDS[:3])}, got {self.kind!r}")

  def policy(self, params: Any, lora_scale: float | None) -> Any:
    """The policy's full params: `params`, or the base with the adapters `params` merged."""
    return params if lora_scale is None else lora.merge(self.base, params, lora_scale)

  @property
  def model(self) -> Any:
    """The params of the reference forward pass (None: there is none)."""
    if self.kind == "model":
      return self.params
    return self.base if self.kind == "lora_base" else None

  def replace(self, **kw) -> "Reference":
    return dataclasses.replace(self, **kw)


jax.tree_util.register_dataclass(Reference, data_fields=["params", "base"], meta_fields=["kind"])


# Parameters the decoder casts to its compute dtype before any use (`models.decoder`: the
# projections and their biases, Mixtral's router and experts, and the embedding after its
# gather when the head does not share it). A frozen copy may store these so and compute exactly what a float32 copy
# would; norm scales are applied in float32 and the head runs in float32, so they stay.
_CAST_IN_FORWARD = ("q", "k", "v", "o", "gate", "up", "down", "q_bias", "k_bias", "v_bias",
                    "o_bias", "router", "expert_gate", "expert_up", "expert_down")


def in_compute_dtype(names, model_cfg) -> bool:
  """Whether a reference copy stores the parameter at path `names` in the compute dtype."""
  names = [n for n in names if n != "value"]  # an nnx.Variable's own path key
  if names and names[-1] == "embed":
    return not model_cfg.tie_embeddings
  return bool(names) and names[-1] in _CAST_IN_FORWARD


def frozen_dtype(cfg) -> str:
  """What a `--reference=model` copy stores its cast weights in: the compute dtype (half the
  bytes of float32 under bfloat16), unless the reference is updated in place (TR-DPO's
  `--ref_sync_every`, `--rounds`), where it mixes and is checkpointed in float32."""
  return "float32" if cfg.ref_sync_every or cfg.rounds > 1 else cfg.model.dtype


def frozen_copy(params: Any, cfg) -> Any:
  """The reference's own buffers (the step donates the policy's), in `frozen_dtype`: its
  log-probs are bit-identical to those of a float32 copy."""
  dtype = jnp.dtype(frozen_dtype(cfg))
  def one(path, x):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if dtype != x.dtype and in_compute_dtype([n for n in names if isinstance(n, str)], cfg.model):
      return x.astype(dtype)
    return jnp.copy(x)
  return jax.tree_util.tree_map_with_path(one, params)


def sync(policy_params: Any, ref: Reference, alpha) -> Reference:
  """TR-DPO's soft update ref <- alpha * policy + (1 - alpha) * ref (alpha 1: a copy)."""
  return ref.replace(params=_mix(policy_params, ref.params, alpha))


@jax.jit
def _mix(p, r, alpha):
  return jax.tree.map(lambda a, b: (alpha * a + (1 - alpha) * b).astype(b.dtype), p, r)
