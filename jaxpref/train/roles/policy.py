"""The offline policy role: a group batch -> policy and reference log-probs -> `Logps`.

The reference model shares the policy's graphdef and differs only in its (frozen) state;
`reference.Reference` says where the reference log-probs come from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref import models
from jaxpref.data import passes
from jaxpref.data.packing import PackedBatch
from jaxpref.data.shared_prompt import SharedPromptBatch
from jaxpref.models import lora, streaming, token_mask, value_head
from jaxpref.models.logps import LogpsOptions, token_level_logps, token_logps
from jaxpref.parallel import sharding
from jaxpref.train.reference import Reference, frozen_copy
from jaxpref.train.step import TrainState
from jaxpref.types import GroupBatch, Logps


def group_logps(policy_tok: jax.Array, ref_tok: jax.Array | None, batch: GroupBatch,
                with_tokens: Any = False, kl_tok: jax.Array | None = None,
                token_mask: jax.Array | None = None, prob_sq: jax.Array | None = None,
                prompt: tuple[jax.Array, jax.Array] | None = None) -> Logps:
  """`ref_tok` None: the reference's sequence log-probs come precomputed in the batch.

  `with_tokens` a losses.TokenNeeds: `kl_tok`, `token_mask` and `prob_sq` must be given when
  it asks for them (a missing one raises: zeros would train silently on a wrong loss;
  `probe_logps` is the one place stand-ins are wanted).
  """
  if isinstance(batch, PackedBatch):
    batch = batch.groups()
  extra = dict(policy_tok=policy_tok, ref_tok=ref_tok, mask=batch.loss_mask) if with_tokens else {}
  for name, value, wanted in (("kl_tok", kl_tok, getattr(with_tokens, "vocab_kl", False)),
                              ("prob_sq", prob_sq, getattr(with_tokens, "prob_sq", False)),
                              ("token_mask", token_mask, getattr(with_tokens, "token_mask", None))):
    if wanted and value is None:
      raise ValueError(f"the loss reads Logps.{name}, which was not computed")
    if wanted:
      extra[name] = value
  if prompt is not None:
    extra["prompt_policy"], extra["prompt_length"] = prompt
  ref = batch.ref_logps if ref_tok is None else ref_tok.sum(-1)
  return Logps(policy=policy_tok.sum(-1), ref=ref, length=batch.loss_mask.sum(-1),
               valid=batch.valid, weight=batch.weight, scores=batch.scores, label=batch.label,
               label_smoothing=batch.label_smoothing, source_logps=batch.source_logps, **extra)


def probe_logps(batch: GroupBatch, with_tokens: Any = False) -> Logps:
  """Zeros of every shape `with_tokens` asks for (M = 2 learned masks, or 1 activation
  layer): for tracing a loss on the data's shapes (the loop's start-up probe), never for
  training."""
  zeros = np.zeros(batch.loss_mask.shape, np.float32)
  kind = getattr(with_tokens, "token_mask", None)
  return group_logps(
      zeros, zeros, batch, with_tokens,
      kl_tok=zeros if getattr(with_tokens, "vocab_kl", False) else None,
      prob_sq=zeros.sum(-1) if getattr(with_tokens, "prob_sq", False) else None,
      token_mask=np.zeros((*zeros.shape, 2 if kind == "learned" else 1), np.float32) if kind else None,
      prompt=(zeros.sum(-1), zeros.sum(-1)) if getattr(with_tokens, "prompt", False) else None)


def prompt_mask(batch: GroupBatch) -> jax.Array:
  """1 on each sequence's prompt tokens after BOS: attended, off the loss mask, t >= 1."""
  mask = jnp.asarray(batch.loss_mask)
  attended = (jnp.asarray(batch.segment_ids) > 0).astype(mask.dtype)
  return (attended * (1.0 - mask)).at[..., 0].set(0.0)


def policy_with_prompt(graphdef, params, batch: GroupBatch, opts: LogpsOptions):
  """(response token log-probs, (prompt sums, prompt lengths)) from one policy pass over
  prompt and response: the response's as `token_logps` gives them, the prompt's apart."""
  pm = prompt_mask(batch)
  both = token_logps(graphdef, params, dataclasses.replace(batch, loss_mask=batch.loss_mask + pm),
                     opts)
  return both * batch.loss_mask, ((both * pm).sum(-1), pm.sum(-1))


def step_logps(graphdef: nnx.GraphDef, params: Any, ref_params: Any,
               batch: GroupBatch | SharedPromptBatch | PackedBatch, with_tokens: Any = False,
               opts: LogpsOptions = LogpsOptions()) -> Logps:
  """The `Logps` the train step hands its loss: policy and reference passes (none for the
  reference when the batch carries precomputed `ref_logps`), plus whatever `with_tokens`
  (a losses.TokenNeeds) asks for."""
  if getattr(with_tokens, "vocab_kl", False) or getattr(with_tokens, "token_mask", None):
    if batch.ref_logps is not None:
      raise ValueError("Logps.kl_tok and token_mask need the reference model: --reference=model")
    policy_tok, ref_tok, more = token_level_logps(graphdef, params, ref_params, batch,
                                                  with_tokens, opts)
    return group_logps(policy_tok, ref_tok, batch, with_tokens, **more)
  if batch.ref_logps is None:
    ref_tok = jax.lax.stop_gradient(token_logps(graphdef, ref_params, batch, opts))
  else:  # --reference=precomputed: no reference forward pass at all
    ref_tok = None
  if getattr(with_tokens, "prob_sq", False):  # WPO's alignment: one policy pass serves both
    policy_tok, prob_sq = token_logps(graphdef, params, batch, opts, prob_sq=True)
    return group_logps(policy_tok, ref_tok, batch, with_tokens, prob_sq=prob_sq)
  if getattr(with_tokens, "prompt", False) and type(batch) is GroupBatch:
    policy_tok, prompt = policy_with_prompt(graphdef, params, batch, opts)
    return group_logps(policy_tok, ref_tok, batch, with_tokens, prompt=prompt)
  return group_logps(token_logps(graphdef, params, batch, opts), ref_tok, batch, with_tokens)


def forward(graphdef: nnx.GraphDef, needs: Any = False, opts: LogpsOptions = LogpsOptions(),
            lora_scale: float | None = None):
  """The role's `forward(params, ref, batch) -> Logps` for the step builder; `needs` (a
  losses.TokenNeeds) says what the loss reads beyond sequence log-probs."""

  def fn(params, ref: Reference, batch):
    return step_logps(graphdef, ref.policy(params, lora_scale), ref.model, batch, needs, opts)

  return fn


def init(cfg, mesh, optimizer):
  """(graphdef, TrainState, Reference), each array built directly into its
  `parallel.sharding` layout (FSDP/tensor shards of params and optimizer state)."""
  # A loss with learned token masks (sparse_po) trains a mask network held in the policy.
  needs = cfg.loss_spec.needs
  # PPO's value head (a loss reading values) sits on the policy trunk, trained with it.
  value = getattr(getattr(cfg, "online", None), "value", "head")
  attach = lambda m: value_head.attach(token_mask.attach(m, needs, cfg.seed), needs, value)
  make = lambda: attach(models.Decoder(cfg.model, rngs=nnx.Rngs(cfg.seed)))
  graphdef, params = sharding.init_params(make, mesh)
  if cfg.init_from:  # the checkpoint's tensors replace the decoder's, shard by shard
    params = streaming.load_into(cfg.init_from, cfg.model, params)
  if cfg.lora is not None:  # the base is never donated nor saved
    adapters = sharding.init_tree(
        lambda: lora.init(params, cfg.lora, jax.random.fold_in(jax.random.key(cfg.seed), 1)),
        mesh)
    ref = Reference(cfg.reference,
                    frozen_copy(params, cfg) if cfg.reference == "model" else None, base=params)
    return graphdef, new_state(adapters, optimizer, mesh), ref
  # The reference is the initial policy, sharded alike in buffers of its own: the step
  # donates the policy's, never the reference's (a precomputed one is dropped once used).
  ref = Reference(cfg.reference, frozen_copy(params, cfg))
  return graphdef, new_state(params, optimizer, mesh), ref


def new_state(params, optimizer, mesh) -> TrainState:
  return TrainState(step=jax.device_put(np.int32(0), NamedSharding(mesh, P())), params=params,
                    opt_state=sharding.init_opt_state(optimizer, params, mesh))


def check(cfg, *datasets) -> None:
  """Start-up errors of the policy role's flag combinations."""
  del datasets
  spec = cfg.loss_spec
  if cfg.lora is None:
    if cfg.reference == "lora_base":
      raise ValueError("--reference=lora_base is the base under LoRA adapters; it needs "
                       "--lora_rank > 0")
  else:
    if cfg.ref_sync_every:
      raise ValueError("--ref_sync_every with --lora_rank is not supported (the reference "
                       "would need the adapters merged into a copy of the base)")
    if spec.needs.token_mask == "learned":
      raise ValueError("a loss with a learned token mask (sparse_po) is not supported with "
                       "--lora_rank: the mask network would sit frozen in the LoRA base")
    lora.target_paths(nnx.state(nnx.eval_shape(lambda: models.Decoder(
        cfg.model, rngs=nnx.Rngs(0)))), cfg.lora)
  if cfg.ref_sync_every and cfg.reference != "model":
    raise ValueError("--ref_sync_every updates the reference model's weights; it needs "
                     "--reference=model")
  if not 0 < cfg.ref_sync_alpha <= 1:
    raise ValueError(f"--ref_sync_alpha must be in (0, 1], got {cfg.ref_sync_alpha}")
  if cfg.reference_cache and cfg.reference != "precomputed":
    raise ValueError("--reference_cache stores precomputed reference log-probs; it needs "
                     "--reference=precomputed")
  if cfg.reference == "precomputed" and spec.needs:
    raise ValueError(f"--reference=precomputed stores sequence log-probs, but --loss={cfg.loss} "
                     "reads per-token reference log-probs; use --reference=model")
  if getattr(cfg, "reward_pool", "last") != "last":
    raise ValueError(f"--reward_pool={cfg.reward_pool} sets the reward head's readout; it "
                     "needs --role=reward")


def probe(batch: GroupBatch, cfg) -> Logps:
  needs = cfg.loss_spec.needs
  if getattr(needs, "prompt", False) and (cfg.data.shared_prompt or cfg.data.batching == "pack"):
    needs = dataclasses.replace(needs, prompt=False)  # those layouts give no prompt log-probs
  return probe_logps(batch, needs)


def precompute_reference(graphdef: nnx.GraphDef, ref_params: Any, ds, batch_size: int,
                         put: Callable, opts: LogpsOptions = LogpsOptions()) -> np.ndarray:
  """The reference's sequence log-probs of every group of `ds`, float32[N, K], in batches."""
  forward_ref = jax.jit(lambda p, b: token_logps(graphdef, p, b, opts).sum(-1))
  return passes.map_batches(lambda b: forward_ref(ref_params, b), ds, batch_size, put)
