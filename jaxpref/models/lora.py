"""LoRA as a transform of the params tree: `W_eff = W + scale * A @ B` on chosen weights.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models". The decoder is
untouched: the step merges the adapters into the (frozen) base params before `nnx.merge`,
so only the adapters are differentiated, updated and checkpointed.

Adapters are a flat dict `{"layers/0/attn/q": {"lora_a": A, "lora_b": B}, ...}` keyed by the
weight's slash path. A weight `W [*in, *out]` (the decoder contracts its leading `in` dims
with the activations) gets `A [*in, r]` and `B [r, *out]`, so `A @ B` (a tensordot over r)
has W's shape: q/k/v `[D, H, Dh]` get `A [D, r]`, `B [r, H, Dh]`; o `[H, Dh, D]` gets
`A [H, Dh, r]`, `B [r, D]` (LoRA on the flattened H*Dh -> D projection, as on HF's o_proj).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Leading dims the decoder contracts with its input, where not 1: o is [H, Dh, D].
INPUT_DIMS = {"o": 2}
NOT_ADAPTED = ("router", "expert_gate", "expert_up", "expert_down")  # jaxpref.models.moe
FACTORS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """`--lora_rank`, `--lora_alpha`, `--lora_targets`.

  A target is a regular expression matched in full against a weight's name (`q`, `gate`)
  or its slash path (`layers/0/attn/q`), so `q,v` adapts every layer's q and v and
  `layers/[01]/mlp/.*` the first two MLPs.
  """
  rank: int
  alpha: float = 16.0
  targets: tuple[str, ...] = TARGETS

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"--lora_rank must be >= 1, got {self.rank}")
    if not self.targets:
      raise ValueError("--lora_targets is empty")
    for t in self.targets:
      try:
        re.compile(t)
      except re.error as e:
        raise ValueError(f"--lora_targets: {t!r} is not a regular expression ({e})") from None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Frozen:
  """What a LoRA step holds fixed, in the place of the reference params.

  `ref` is a separate reference copy (`--reference=model`); None when the base itself is the
  reference (`--reference=lora_base`) or the reference log-probs are precomputed.
  """
  base: Any
  ref: Any = None

  @property
  def reference(self) -> Any:
    return self.base if self.ref is None else self.ref


def param_path(path) -> str:
  """`layers/0/attn/q` for a jax key path into a params State (its `.value` dropped) or a
  pure dict."""
  keys = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      keys.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      keys.append(str(k.idx))
  return "/".join(keys)


def target_paths(params: Any, cfg: LoraConfig) -> dict[str, tuple[int, ...]]:
  """{path: shape} of the weights `cfg.targets` selects (arrays or shape structs)."""
  patterns = [re.compile(t) for t in cfg.targets]
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    p = param_path(path)
    name = p.rsplit("/", 1)[-1]
    if any(r.fullmatch(name) or r.fullmatch(p) for r in patterns):
      if name in NOT_ADAPTED:
        raise ValueError(f"--lora_targets selects {p}: LoRA on a Mixtral's router and experts "
                         "is not built (an [E, ...] stack is not one matrix)")
      if len(x.shape) < 2:
        raise ValueError(f"--lora_targets selects {p} of shape {tuple(x.shape)}; LoRA adapts "
                         "matrices (norm scales are not one)")
      out[p] = tuple(x.shape)
  if not out:
    raise ValueError(f"--lora_targets={','.join(cfg.targets)} matches no parameter; names: "
                     + ", ".join(sorted({param_path(p).rsplit('/', 1)[-1] for p, _ in
                                         jax.tree_util.tree_leaves_with_path(params)})))
  return out


def init(params: Any, cfg: LoraConfig, key: jax.Array) -> dict:
  """Adapters for the targets of `params` (only shapes are read): A ~ N(0, 1/fan_in) so
  that x @ A keeps x's scale, B = 0 so that the adapted model starts as the base."""
  out = {}
  for i, (p, shape) in enumerate(sorted(target_paths(params, cfg).items())):
    n_in = INPUT_DIMS.get(p.rsplit("/", 1)[-1], 1)
    fan_in = math.prod(shape[:n_in])
    a = jax.random.normal(jax.random.fold_in(key, i), (*shape[:n_in], cfg.rank), jnp.float32)
    out[p] = {"lora_a": a / math.sqrt(fan_in),
              "lora_b": jnp.zeros((cfg.rank, *shape[n_in:]), jnp.float32)}
  return out


def delta(adapter: Mapping[str, jax.Array]) -> jax.Array:
  """A @ B over the rank: the update to the weight, in the weight's shape."""
  return jnp.tensordot(adapter["lora_a"], adapter["lora_b"], axes=1)


def merge(params: Any, adapters: Mapping, scale: float = 1.0, *,
          scales: Optional[Mapping[str, float]] = None) -> Any:
  """Plain params of the same structure as `params`: W + scale * A @ B per adapted weight.

  With `scales`, `adapters` is a dict of named adapter sets combined as
  W + sum_n scales[n] * A_n @ B_n (a trained set's own alpha/r is part of its scale).
  """
  if scales is None:
    named, factors = {"": adapters}, {"": scale}
  else:
    if set(scales) != set(adapters):
      raise ValueError(f"lora.merge: scales for {sorted(scales)}, adapters {sorted(adapters)}")
    named, factors = adapters, scales
  seen = set()

  def one(path, w):
    p = param_path(path)
    for name, ads in named.items():
      if p in ads:
        seen.add((name, p))
        w = w + (factors[name] * delta(ads[p])).astype(w.dtype)
    return w

  out = jax.tree_util.tree_map_with_path(one, params)
  missing = sorted(p for name, ads in named.items() for p in ads if (name, p) not in seen)
  if missing:
    raise ValueError(f"lora.merge: adapters for weights these params lack: {missing}")
  return out
