"""A loss flag resolved once: `resolve(name, overrides) -> LossSpec`.

Everything the rest of a run asks of its loss (the bound function, what the step must
compute for it, the role it is written for, the record fields and group members it reads)
comes from this one object, built at the edge (`RunConfig.loss_spec`) and handed down.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxpref.losses import extra_members, registry


@dataclasses.dataclass(frozen=True)
class LossSpec:
  name: str  # as the flag gave it: a registered name or a weighted sum of them
  hparams: dict  # the overrides, validated against the loss's signature
  fn: Callable[[Any], tuple]  # lp -> (loss, metrics), the hyperparameters bound
  needs: registry.TokenNeeds  # what the step computes beyond sequence log-probs
  role: str  # registry.ROLES: the step the loss is written for
  record_fields: tuple[str, ...]  # extra record fields the data layer must keep
  member_fields: tuple[str, ...]  # those of them that add a group member

  def value(self, hparam: str, default: Any = None) -> Any:
    """The run's value of `hparam`: its override, else the loss's default."""
    return self.hparams.get(hparam, registry.hparams(self.name).get(hparam, default))

  def describe(self) -> str:
    given = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
    return f"{self.name}({given})" if given else self.name


def resolve(name: str, overrides: dict | None = None) -> LossSpec:
  """The loss `name` (a registered loss or `0.8*dpo+0.2*sft`) with `overrides` applied; an
  unknown loss or hyperparameter, or terms of different roles, raise a ValueError."""
  overrides = dict(overrides or {})
  return LossSpec(name=name, hparams=overrides, fn=registry.bind(name, overrides),
                  needs=registry.needs_tokens(name), role=registry.role(name),
                  record_fields=extra_members.record_fields(name),
                  member_fields=extra_members.member_fields(name))
