"""Fused attention kernels behind `--attention` (`ModelConfig.attention`): Pallas splash
attention on TPU and cuDNN flash attention (`jax.nn.dot_product_attention`) on GPU, in
place of `Attention.attend`'s float32 einsum over a materialised [N, H, T, T] score tensor.

The decoder hands a kernel a `KernelMask` (segment ids, whether the layer is local, and for
cuDNN's packed rows the dense mask) in place of the dense mask: splash builds a static
causal or local mask and takes segment ids; cuDNN takes `is_causal`, `local_window_size` and
sequence lengths (unpacked rows) or the dense mask as a bias (packed and shared-prompt
rows). What each supports and what was verified where: docs/kernels.md, "Attention kernels".
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from jaxpref.parallel.mesh import BATCH_AXES

KERNELS = ("auto", "xla", "splash", "cudnn")
# Tests point these at CPU stand-ins: splash in Pallas interpret mode, and the cuDNN path's
# arguments through jax's "xla" implementation (cuDNN itself needs a GPU).
SPLASH_INTERPRET = False
CUDNN_IMPLEMENTATION = "cudnn"
SPLASH_BLOCK = 128  # splash tiles are multiples of 128 lanes; T is padded up to one


def config_errors(cfg) -> list[str]:
  """Start-up errors of `cfg.attention` with the rest of the config, one line each."""
  if cfg.attention not in KERNELS:
    return [f"--attention (ModelConfig.attention) must be one of {', '.join(KERNELS)}, got "
            f"{cfg.attention!r}"]
  if cfg.attention == "cudnn":
    why = cudnn_refusal(cfg)
    if why:
      return [f"--attention=cudnn: {why}; use --attention=xla (or splash on TPU)"]
  return []


def with_flag(overrides: dict, attention: str | None) -> dict:
  """The --model.FIELD overrides with --attention (when given) as --model.attention."""
  if attention is not None and overrides.setdefault("attention", attention) != attention:
    raise ValueError(f"--attention={attention} and --model.attention={overrides['attention']} "
                     "disagree; give one")
  return overrides


def cudnn_refusal(cfg) -> str:
  """Why cuDNN flash attention cannot run this config ('' when it can)."""
  if cfg.attn_logit_softcap:
    return (f"cuDNN has no attention-logit soft-cap, which this family needs (Gemma 2: "
            f"--model.attn_logit_softcap={cfg.attn_logit_softcap})")
  if cfg.dtype == "float32" and CUDNN_IMPLEMENTATION == "cudnn":
    return "cuDNN flash attention takes bfloat16 or float16 only (--model.dtype=float32)"
  if cfg.head_dim % 8 or cfg.head_dim > 256:
    return f"cuDNN needs a head dim that is a multiple of 8 and <= 256, got {cfg.head_dim}"
  return ""


@functools.cache
def _note(msg: str) -> None:
  logging.warning("%s", msg)  # once per message and process: traced once per layer


def resolve(cfg, shared_prompt: bool) -> str:
  """The kernel that runs: `auto` picks by backend (splash on TPU, cuDNN on GPU, xla
  elsewhere); a kernel that cannot express this config falls back to xla with a note."""
  kernel = cfg.attention
  if kernel == "auto":
    backend = jax.default_backend()
    kernel = {"tpu": "splash", "gpu": "cudnn"}.get(backend, "xla")
    if kernel == "cudnn" and (why := cudnn_refusal(cfg)):
      _note(f"--attention=auto: xla attention, not cuDNN: {why}")
      return "xla"
  if kernel == "splash" and shared_prompt:
    _note(f"--attention={cfg.attention}: xla attention for --shared_prompt rows: splash "
          "segment ids cannot let a response see its group's prompt segment")
    return "xla"
  return kernel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelMask:
  """What a kernel needs in place of the dense mask. segment_ids int32[N, T] or None (no
  padding); dense bool[N, 1, T, T] (the einsum's own mask) for cuDNN's packed and
  shared-prompt rows, else None; local: a bool, traced in the scanned decoder."""
  segment_ids: jax.Array | None
  dense: jax.Array | None
  local: jax.Array | bool
  kernel: str = dataclasses.field(metadata=dict(static=True), default="xla")


def select(local_layer, local, full):
  """`local` where `local_layer` (maybe traced) else `full`, for dense masks and
  `KernelMask`s alike."""
  return jax.tree.map(lambda a, b: jnp.where(local_layer, a, b), local, full)


def attend(cfg, q, k, v, mask: KernelMask) -> jax.Array:
  """q [N, T, H, Dh], k and v [N, T, Hkv, Dh] -> [N, T, H, Dh] through `mask.kernel`."""
  run = {"splash": _splash, "cudnn": _cudnn}[mask.kernel]
  if isinstance(mask.local, bool):
    return run(cfg, q, k, v, mask, cfg.sliding_window if mask.local else 0)
  # Scanned layers: which ones are local is data, and each kernel's window is static.
  return jax.lax.cond(mask.local, lambda: run(cfg, q, k, v, mask, cfg.sliding_window),
                      lambda: run(cfg, q, k, v, mask, 0))


def _scale(cfg) -> float:
  return (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5


def _cudnn(cfg, q, k, v, mask: KernelMask, window: int) -> jax.Array:
  kw = dict(scale=_scale(cfg), is_causal=True, implementation=CUDNN_IMPLEMENTATION)
  if mask.dense is not None:  # packed or shared-prompt rows: the exact mask, as a bias
    t = q.shape[1]
    if t % 2 == 0:
      return jax.nn.dot_product_attention(q, k, v, mask=mask.dense, **kw)
    # cuDNN trains with a bias over even lengths only: one more key no query sees, and one
    # more query whose output is dropped.
    q, k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
    dense = jnp.pad(mask.dense, ((0, 0), (0, 0), (0, 1), (0, 1)))
    return jax.nn.dot_product_attention(q, k, v, mask=dense, **kw)[:, :t]
  if mask.segment_ids is not None:  # right-padded rows: 1 on real tokens, 0 after
    lengths = jnp.sum(mask.segment_ids > 0, axis=1, dtype=jnp.int32)
    kw.update(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
  if window:  # keys fewer than `window` back: (window - 1) to the left, none to the right
    kw.update(local_window_size=(window - 1, 0))
  return jax.nn.dot_product_attention(q, k, v, **kw)


def _blocks(t: int) -> int:
  return next(b for b in (512, 256, SPLASH_BLOCK) if t % b == 0)


def _splash_kernel(heads: int, t: int, window: int, cap: float, interpret: bool):
  # Heavy and TPU-only: imported when a model first traces with --attention=splash.
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
      splash_attention_kernel as sk, splash_attention_mask as sm)
  # Built per trace, never cached: the kernel holds its mask tables as arrays, and one
  # made under another trace broke jax.export of the scanned decoder.
  b = _blocks(t)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_q_dkv=b, block_kv_dkv=b,
                        use_fused_bwd_kernel=True)
  one = sm.LocalMask((t, t), (window - 1, 0), 0) if window else sm.CausalMask((t, t))
  return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                            q_seq_shards=1, attn_logits_soft_cap=cap or None,
                            interpret=interpret), sk.SegmentIds


def _splash(cfg, q, k, v, mask: KernelMask, window: int) -> jax.Array:
  t, h = q.shape[1], q.shape[2]
  pad = -t % SPLASH_BLOCK  # padded queries and keys come last: causal hides them
  q = q * jnp.asarray(_scale(cfg), q.dtype)  # splash has no scale; caps q.k as Gemma 2
  q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
             for x in (q, k, v))  # [N, H, T, Dh], as splash takes them per row
  seg = mask.segment_ids
  if seg is not None:
    seg = jnp.pad(seg, ((0, 0), (0, pad)))  # padding segment 0: sees only padding

  def rows(q, k, v, seg):  # per shard: built for the heads this device holds
    kernel, segment_ids = _splash_kernel(q.shape[1], t + pad, window,
                                         float(cfg.attn_logit_softcap), SPLASH_INTERPRET)
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=None if s is None
                                    else segment_ids(s, s))
    return jax.vmap(one)(q, k, v, seg)

  out = _per_shard(rows, q, k, v, seg, h, k.shape[1])
  return out.transpose(0, 2, 1, 3)[:, :t]


def _per_shard(fn, q, k, v, seg, heads: int, kv_heads: int):
  """fn on each device's rows (and heads, when `tensor` divides them) under the ambient
  training mesh: a Pallas call is opaque to XLA's partitioner, which would otherwise
  gather every operand onto each device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return fn(q, k, v, seg)
  tp = mesh.shape.get("tensor", 1)
  head = "tensor" if tp > 1 and heads % tp == 0 and kv_heads % tp == 0 else None
  spec = P(BATCH_AXES, head)
  specs = (spec, spec, spec, None if seg is None else P(BATCH_AXES))
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(
      q, k, v, seg)
