"""The policy's (or reward model's) sharded train state and its jitted steps, from a config.

Split from `loop.py`, which drives them: this is the part tests and tools call on their own
(`init_state` then `build_steps` gives n steps exactly as the loop would run them).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpref import losses
from jaxpref import models
from jaxpref.models import convert, lora, token_mask
from jaxpref.parallel import sharding
from jaxpref.train import reward_step
from jaxpref.train.config import RunConfig
from jaxpref.train.policy_step import TrainState, make_steps


def init_state(cfg: RunConfig, mesh: Mesh, optimizer):
  """(graphdef, TrainState, reference params), each array built directly into its
  `parallel.sharding` layout (FSDP/tensor shards of params and optimizer state)."""
  if cfg.role == "reward":  # a decoder with a reward head; no reference model
    graphdef, params = reward_step.init_params(cfg, mesh)
    return graphdef, TrainState(step=jax.device_put(np.int32(0), NamedSharding(mesh, P())),
                                params=params,
                                opt_state=sharding.init_opt_state(optimizer, params, mesh)), None
  # A loss with learned token masks (sparse_po) trains a mask network held in the policy.
  needs = losses.needs_tokens(cfg.loss)
  make = lambda: token_mask.attach(models.Decoder(cfg.model, rngs=nnx.Rngs(cfg.seed)), needs,
                                   cfg.seed)
  if cfg.init_from:  # the checkpoint's weights, placed in the shardings init would give them
    graphdef, abstract = sharding.abstract_params(make, mesh)
    params = nnx.split(token_mask.attach(convert.load_pretrained(cfg.init_from, cfg.model),
                                         needs, cfg.seed))[1]
    params = jax.device_put(params, jax.tree.map(lambda s: s.sharding, abstract))
  else:
    graphdef, params = sharding.init_params(make, mesh)
  if cfg.lora is not None:
    return (graphdef, *_lora_state(cfg, mesh, optimizer, params))
  # The reference is the initial policy, sharded alike in buffers of its own: the step
  # donates the policy's, never the reference's.
  ref_params = sharding.copy(params)
  state = TrainState(step=jax.device_put(np.int32(0), NamedSharding(mesh, P())), params=params,
                     opt_state=sharding.init_opt_state(optimizer, params, mesh))
  return graphdef, state, ref_params


def _lora_state(cfg: RunConfig, mesh: Mesh, optimizer, base):
  """(TrainState of the adapters, `lora.Frozen`): the base is never donated nor saved, and
  is its own reference under --reference=lora_base (no second copy)."""
  adapters = sharding.init_tree(
      lambda: lora.init(base, cfg.lora, jax.random.fold_in(jax.random.key(cfg.seed), 1)), mesh)
  state = TrainState(step=jax.device_put(np.int32(0), NamedSharding(mesh, P())), params=adapters,
                     opt_state=sharding.init_opt_state(optimizer, adapters, mesh))
  return state, lora.Frozen(base, sharding.copy(base) if cfg.reference == "model" else None)


def check_lora(cfg: RunConfig) -> None:
  if cfg.lora is None:
    if cfg.reference == "lora_base":
      raise ValueError("--reference=lora_base is the base under LoRA adapters; it needs "
                       "--lora_rank > 0")
    return
  if cfg.ref_sync_every:
    raise ValueError("--ref_sync_every with --lora_rank is not supported (the reference would "
                     "need the adapters merged into a copy of the base)")
  lora.target_paths(nnx.state(nnx.eval_shape(lambda: models.Decoder(cfg.model,
                                                                   rngs=nnx.Rngs(0)))), cfg.lora)


def build_steps(cfg: RunConfig, graphdef, optimizer, state, mesh: Mesh):
  """The jitted train and eval steps, traced under `mesh`; the train step returns the state
  in `state`'s shardings, whatever XLA's propagation would pick."""
  if cfg.role == "reward":
    train_step, eval_step = reward_step.make_steps(
        graphdef, losses.bind(cfg.loss, cfg.loss_hparams), optimizer, grad_accum=cfg.grad_accum,
        with_tokens=losses.needs_tokens(cfg.loss))
  else:
    train_step, eval_step = make_steps(graphdef, losses.bind(cfg.loss, cfg.loss_hparams),
                                       optimizer, with_tokens=losses.needs_tokens(cfg.loss),
                                       opts=cfg.logps, grad_accum=cfg.grad_accum,
                                       lora_scale=cfg.lora.scale if cfg.lora else None,
                                       grad_shardings=jax.tree.map(lambda x: x.sharding,
                                                                   state.params))
  return (sharding.keep_state_shardings(train_step, state, mesh),
          jax.jit(sharding.in_mesh(eval_step, mesh)))
