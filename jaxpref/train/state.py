"""A run's sharded train state and its jitted steps, from a config, for any role.

Split from `loop.py`, which drives them: this is the part tests and tools call on their own
(`init_state` then `build_steps` gives n steps exactly as the loop would run them).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from jaxpref.parallel import sharding
from jaxpref.train import roles, step
from jaxpref.train.config import RunConfig


def init_state(cfg: RunConfig, mesh: Mesh, optimizer):
  """(graphdef, TrainState, Reference) of the run's role, each array built directly into
  its `parallel.sharding` layout (FSDP/tensor shards of params and optimizer state)."""
  return roles.get(cfg.role).init(cfg, mesh, optimizer)


def make_steps(cfg: RunConfig, graphdef, optimizer, grad_shardings=None):
  """The role's jitted (train_step, eval_step), from the one step builder."""
  return step.make_steps(roles.forward(cfg, graphdef), cfg.loss_spec.fn, optimizer,
                         grad_accum=cfg.grad_accum, grad_shardings=grad_shardings)


def build_steps(cfg: RunConfig, graphdef, optimizer, state, mesh: Mesh):
  """The jitted train and eval steps, traced under `mesh`; the train step returns the state
  in `state`'s shardings, whatever XLA's propagation would pick."""
  train_step, eval_step = make_steps(cfg, graphdef, optimizer,
                                     jax.tree.map(lambda x: x.sharding, state.params))
  return (sharding.keep_state_shardings(train_step, state, mesh),
          jax.jit(sharding.in_mesh(eval_step, mesh)))
