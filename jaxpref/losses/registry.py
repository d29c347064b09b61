"""Losses by name, so a flag file can select one and set its hyperparameters.

A loss is `fn(lp: Logps, *, hparam=default, ...) -> (loss, metrics)`. Its keyword-only
arguments, with their defaults, are its hyperparameters; `hparams(name)` reads them from
the signature, so registering a loss never means editing a table elsewhere.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

LossFn = Callable[..., Any]

_LOSSES: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
  """Decorator adding `fn` to the registry under `name` (a user's file may use it too)."""

  def add(fn: LossFn) -> LossFn:
    if name in _LOSSES and _LOSSES[name] is not fn:
      raise ValueError(f"a loss named {name!r} is already registered ({_LOSSES[name].__module__})")
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY,
                                            params[0].POSITIONAL_OR_KEYWORD):
      raise TypeError(f"loss {name!r}: the first argument must be the Logps")
    for p in params[1:]:
      if p.kind is not p.KEYWORD_ONLY or p.default is p.empty:
        raise TypeError(f"loss {name!r}: hyperparameter {p.name!r} must be keyword-only "
                        "with a default (the paper's)")
    _LOSSES[name] = fn
    return fn

  return add


def get(name: str) -> LossFn:
  try:
    return _LOSSES[name]
  except KeyError:
    raise ValueError(f"unknown loss {name!r}; registered losses: {', '.join(names())}") from None


def names() -> list[str]:
  return sorted(_LOSSES)


def hparams(name: str) -> dict[str, Any]:
  """The loss's hyperparameters and their defaults, in signature order."""
  params = list(inspect.signature(get(name)).parameters.values())[1:]
  return {p.name: p.default for p in params}


def bind(name: str, overrides: dict[str, Any]) -> Callable[..., Any]:
  """`get(name)` with `overrides` applied; an unknown hyperparameter is an error listing the valid ones."""
  valid = hparams(name)
  unknown = sorted(set(overrides) - set(valid))
  if unknown:
    listing = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "(none)"
    raise ValueError(f"loss {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
                     f"valid ones (with defaults): {listing}")
  fn = get(name)
  kwargs = {**valid, **overrides}

  def bound(lp):
    return fn(lp, **kwargs)

  bound.__name__ = f"{name}_bound"
  return bound
