"""Roles: what a run trains and what its loss reads. Each is a module with the same four
functions, so the one step builder and the one loop serve them all:

- `init(cfg, mesh, optimizer) -> (graphdef, TrainState, Reference)`,
- `forward(graphdef, ...) -> fn(params, ref, batch)`, the pytree the role's losses read,
- `check(cfg, ...)`: start-up errors of its flag combinations,
- `probe(batch, cfg)`: that pytree in shapes only, to trace the loss at start-up.
"""

from __future__ import annotations

from types import ModuleType

from jaxpref.train import ppo
from jaxpref.train.roles import online, policy, reward

ROLES: dict[str, ModuleType] = {"policy": policy, "reward": reward, "online": online}


def get(name: str) -> ModuleType:
  if name not in ROLES:
    raise ValueError(f"--role must be one of {', '.join(ROLES)}, got {name!r}")
  return ROLES[name]


def forward(cfg, graphdef):
  """The run's forward pass for the step builder, from its config."""
  if cfg.role == "reward":
    return reward.forward(graphdef, cfg.loss_spec.needs)
  if cfg.role == "online" and ppo.uses_values(cfg):
    return ppo.forward(graphdef, cfg.logps, cfg.lora.scale if cfg.lora is not None else None)
  if cfg.role == "online" and not online.pairwise(cfg):
    return online.forward(graphdef, cfg.loss_spec.needs, cfg.logps,
                          cfg.lora.scale if cfg.lora is not None else None)
  return policy.forward(graphdef, cfg.loss_spec.needs, cfg.logps,
                        cfg.lora.scale if cfg.lora is not None else None)
