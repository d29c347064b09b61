"""The analytic memory plan behind `--estimate_only`: per-device bytes of a train step from
the config, the mesh's axis sizes and the batch's token shape, compiling nothing.

Why not the compiled step: XLA:CPU, the only compiler a laptop has, does not keep to the
remat policy as the TPU and GPU compilers do (at 8B it kept ~238 KiB per token per layer
where full remat keeps the 8 KiB block input: 70 GiB per chip where this count gives 24).

Every line is one term of the hand count in docs/cloud.md#memory-plan. Parameters,
optimizer state, reference, gradients and batch are exact (each leaf's shard under
`parallel.sharding.RULES`; tests check them against the sharded arrays). The activation
lines are a model of what the step holds for its backward pass: the block inputs the remat
policy keeps (or everything a block computes, without remat), one block's recompute working
set with its gathered FSDP weights and their gradients, and the LM head's (fused: one
vocabulary block of logits, the gathered head and its gradient; unfused: the [N, T, V]
logits). The total is the sum, an upper bound on a peak whose pieces XLA need not hold at
once; the reference's forward pass is not added, as it needs no more than the policy's.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from typing import Optional

import jax.numpy as jnp

from jaxpref.ops.fused_linear import DEFAULT_BLOCK_V
from jaxpref.parallel import sharding
from jaxpref.train import reference as reference_lib

MIB = 2 ** 20


@dataclasses.dataclass
class Line:
  name: str
  bytes: int
  how: str  # the arithmetic, as docs/cloud.md writes it


@dataclasses.dataclass
class Plan:
  lines: list[Line]

  @property
  def total(self) -> int:
    return sum(x.bytes for x in self.lines)

  def get(self, name: str) -> int:
    return sum(x.bytes for x in self.lines if x.name == name)


Leaf = tuple[str, tuple[int, ...], tuple[Optional[str], ...]]  # (slash path, shape, axes)


def decoder_leaves(c) -> list[Leaf]:
  """Every parameter of `models.Decoder(c)` with its logical axes, as `parallel.sharding`
  reads them from the path: written out from the config, not from a built model."""
  d, h, kv, dh, f = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
  block: list[Leaf] = [
      ("attn_norm/scale", (d,), ("embed",)), ("mlp_norm/scale", (d,), ("embed",)),
      ("attn/q", (d, h, dh), ("embed", "heads", "head_dim")),
      ("attn/k", (d, kv, dh), ("embed", "heads", "head_dim")),
      ("attn/v", (d, kv, dh), ("embed", "heads", "head_dim")),
      ("attn/o", (h, dh, d), ("heads", "head_dim", "embed")),
      ("mlp/gate", (d, f), ("embed", "mlp")), ("mlp/up", (d, f), ("embed", "mlp")),
      ("mlp/down", (f, d), ("mlp", "embed"))]
  if c.n_experts:  # Mixtral: n_experts gated MLPs and a router in place of the one MLP
    e = c.n_experts
    block = block[:-3] + [
        ("mlp/router", (d, e), ("embed", None)),
        ("mlp/expert_gate", (e, d, f), ("experts", "embed", "mlp")),
        ("mlp/expert_up", (e, d, f), ("experts", "embed", "mlp")),
        ("mlp/expert_down", (e, f, d), ("experts", "mlp", "embed"))]
  if c.qkv_bias or c.attn_bias:  # no rule names a bias: replicated
    block += [("attn/q_bias", (h, dh), (None, None)), ("attn/k_bias", (kv, dh), (None, None)),
              ("attn/v_bias", (kv, dh), (None, None))]
  if c.attn_bias:
    block.append(("attn/o_bias", (d,), (None,)))
  if c.qk_norm:  # a norm's `scale` is an `embed` axis to the rules, even over head_dim
    block += [("attn/q_norm/scale", (dh,), ("embed",)), ("attn/k_norm/scale", (dh,), ("embed",))]
  if c.post_norms:
    block += [("post_attn_norm/scale", (d,), ("embed",)), ("post_mlp_norm/scale", (d,), ("embed",))]
  if c.scan_layers:  # one stack [L, ...] per parameter; the layer axis is never sharded
    layers = [(f"layers/{p}", (c.n_layers, *s), ("layers", *a)) for p, s, a in block]
  else:
    layers = [(f"layers/{i}/{p}", s, a) for i in range(c.n_layers) for p, s, a in block]
  head = [] if c.tie_embeddings else [("lm_head", (d, c.vocab_size), ("embed", "vocab"))]
  return [("embed", (c.vocab_size, d), ("vocab", "embed")), *layers,
          ("final_norm/scale", (d,), ("embed",)), *head]


def shard_elems(shape, axes, sizes: dict[str, int]) -> int:
  """Elements of one device's shard of a [shape] leaf with logical `axes` under the rules."""
  spec = sharding.partition_spec(axes, shape, types.SimpleNamespace(shape=sizes))
  return math.prod(n // (sizes[a] if a else 1)
                   for n, a in zip(shape, tuple(spec) + (None,) * len(shape)))


def leaves_bytes(leaves, sizes, itemsize) -> int:
  return sum(shard_elems(s, a, sizes) for _, s, a in leaves) * itemsize


def plan(cfg, sizes: dict[str, int], tokens_shape: tuple[int, ...], batch_bytes: int,
         lora_leaves: Optional[list] = None, scalars: int = 3, leaves: Optional[list] = None,
         reference: bool = True, lm_head: bool = True) -> Plan:
  """The plan of `cfg` (a RunConfig) on a mesh of axis `sizes`, for host batches of
  `tokens_shape` ([..., T]) taking `batch_bytes` per device. `lora_leaves`: the adapters'
  leaves (from their shapes) when the run trains LoRA. `scalars`: int32 counters in the
  optimizer state plus the step. `leaves`: the model's parameters when not the plain
  decoder's (a reward head); `reference`: whether the step holds a reference model;
  `lm_head`: whether the loss reads the LM head (not a reward model's). Under LoRA the
  `parameters` line is the trained adapters and `base (frozen)` the decoder."""
  c = cfg.model
  cb = jnp.dtype(c.dtype).itemsize  # compute dtype
  counted = "" if leaves is None else " (from the model's shapes)"
  leaves = decoder_leaves(c) if leaves is None else leaves
  n_params = sum(math.prod(s) for _, s, _ in leaves)
  p_bytes = leaves_bytes(leaves, sizes, 4)
  lines = []
  def add(name, nbytes, how):
    lines.append(Line(name, int(nbytes), how))

  shard_note = f"{n_params:,} x 4 B (float32), sharded over {_shards(sizes)}{counted}"
  if cfg.lora is None:
    t_bytes = p_bytes
    add("parameters", p_bytes, shard_note)
  else:
    t_bytes = leaves_bytes(lora_leaves, sizes, 4)
    n_lora = sum(math.prod(s) for _, s, _ in lora_leaves)
    add("parameters", t_bytes, f"the LoRA adapters: {n_lora:,} x 4 B (float32), sharded")
    add("base (frozen)", p_bytes, shard_note)
    targets = {p.rsplit("/", 1)[0] for p, _, _ in lora_leaves}
    add("LoRA merged weights", leaves_bytes([x for x in leaves if x[0] in targets], sizes, 4),
        "W + scale A @ B of each adapted weight, float32, sharded as W")
  add("optimizer state", 2 * t_bytes + 4 * scalars,
      f"Adam mu + nu: 2 x {'parameters' if cfg.lora is None else 'adapters'} + {scalars} int32")
  if reference:
    rd = reference_lib.frozen_dtype(cfg)
    cast = [reference_lib.in_compute_dtype(p.split('/'), c) for p, _, _ in leaves]
    low = leaves_bytes([x for x, k in zip(leaves, cast) if k], sizes, jnp.dtype(rd).itemsize)
    high = leaves_bytes([x for x, k in zip(leaves, cast) if not k], sizes, 4)
    add("reference", low + high, f"matmul weights in {rd}, norms and head float32")
  else:  # printed all the same: a plan that holds no reference model says so
    add("reference", 0, "none: the step holds no reference model")
  add("gradients", t_bytes, "float32, sharded as the trained params")
  if cfg.grad_accum > 1:
    add("grad accumulator", t_bytes, f"--grad_accum={cfg.grad_accum}: a second gradient tree")
  add("batch", batch_bytes, f"host batch {tuple(tokens_shape)} / {_batch_shards(sizes)}")

  # Activations: a = tokens per device in one micro-batch.
  t_len = tokens_shape[-1]
  rows = math.prod(tokens_shape[:-1]) // (cfg.grad_accum * _batch_shards(sizes))
  a = max(rows, 1) * t_len
  tp = sizes.get("tensor", 1)
  split = lambda n: n // tp if tp > 1 and n % tp == 0 else n  # what RULES shards over tensor
  hq, hkv, ff = split(c.n_heads), split(c.n_kv_heads), split(c.d_ff)
  if c.n_experts:  # every expert runs densely on every token: [tokens, E, F] intermediates
    e_loc = split(c.n_experts)
    ff = e_loc * (c.d_ff if e_loc != c.n_experts else split(c.d_ff))
  d, dh, L = c.d_model, c.head_dim, c.n_layers
  scores = max(rows, 1) * hq * t_len * t_len  # one layer's attention matrix, materialised
  work = (a * d * (4 + cb) * 2            # two RMSNorms: float32 copy and output
          + a * (hq + 2 * hkv) * dh * cb  # q, k, v
          + a * (hq + hkv) * dh * (4 + cb)  # RoPE's float32 q, k and their casts
          + scores * (4 + 4 + cb + 4)     # scores, softmax (f32), probs, their gradient (f32)
          + a * hq * dh * cb + 2 * a * d * cb  # attention output, o-projection, residual
          + 4 * a * ff * cb + a * d * cb)  # gate, activation, up, product; down projection
  saved = {"full": a * d * cb,
           "dots": a * (2 * d + (hq + 2 * hkv) * dh + 2 * ff + d) * cb,
           "none": work}[c.remat]
  what = {"full": "block input", "dots": "input and matmul outputs", "none": "everything"}
  add("saved activations", L * saved,
      f"--model.remat={c.remat}: {L} layers x {what[c.remat]} ({a} tokens/device)")
  layer = re.compile(r"(^|/)layers/" if c.scan_layers else r"(^|/)layers/0/")
  gathered_sizes = {**sizes, "fsdp": 1, "data": 1}  # a block's weights once FSDP gathers them
  layer_w = sum(shard_elems(s, ax, gathered_sizes) for p, s, ax in leaves if layer.search(p))
  layer_w //= L if c.scan_layers else 1
  fsdp = sizes.get("fsdp", 1) > 1
  # With FSDP: the float32 gather and the float32 weight gradient before its reduce-scatter;
  # in a lower compute dtype, the cast copy the matmuls read.
  gathered = layer_w * ((4 + 4) * fsdp + (cb if cb < 4 else 0))
  held = (["gathered float32 weights and their float32 gradient"] if fsdp else []) + (
      [f"their {c.dtype} cast"] if cb < 4 else [])
  add("layer working set", (0 if c.remat == "none" else work) + gathered,
      ("one block's recompute" if c.remat != "none" else "(recompute: none)")
      + "".join(f", {x}" for x in held))
  v = c.vocab_size
  h_io = 2 * a * d * 4  # final hidden (float32) and its gradient
  if lm_head and cfg.logps.fused_lm_head:
    # The vocabulary loop slices the head, so a sharded head is gathered whole; its
    # gradient is a whole [D, V] float32 carry until the reduce-scatter.
    head_w = d * v * 4 * (2 if fsdp or tp > 1 else 1)
    bv = min(DEFAULT_BLOCK_V, v)
    add("LM head (fused)", h_io + head_w + 3 * a * bv * 4,
        f"head{' gathered' if fsdp or tp > 1 else ''} + its gradient [D, V] float32, "
        f"3 x [tokens, {bv}] float32 blocks")
  elif lm_head:
    head_w = d * split(v) * 4 * (2 if fsdp else 1)
    add("LM head (logits)", h_io + head_w + 3 * a * split(v) * 4,
        "logits, log-softmax and their gradient: 3 x [tokens, V] float32")
  if fsdp and cfg.lora is None:  # LoRA never differentiates the embedding
    add("embedding gradient", split(v) * d * 4, "scatter-add into [V, D] float32 before "
        "the reduce-scatter")
  return Plan(lines)


def _batch_shards(sizes) -> int:
  return math.prod(sizes.get(a, 1) for a in ("data", "fsdp"))


def _shards(sizes) -> str:
  return "x".join(f"{k}:{v}" for k, v in sizes.items() if v > 1) or "none"


def table(p: Plan, header: str) -> str:
  lines = [header]
  for x in p.lines:
    lines.append(f"  {x.name:<20} {x.bytes / MIB:11.2f} MiB   {x.how}")
  lines.append(f"  {'total':<20} {p.total / MIB:11.2f} MiB   ({p.total / 2**30:.2f} GiB)")
  return "\n".join(lines)
