"""Losses by name, so a flag file can select one and set its hyperparameters.

A loss is `fn(lp: Logps, *, hparam=default, ...) -> (loss, metrics)`. Its keyword-only
arguments, with their defaults, are its hyperparameters; `hparams(name)` reads them from
the signature, so registering a loss never means editing a table elsewhere.

A name may also be a weighted sum of registered losses, `"0.8*dpo+0.2*bco_pair+sft"`
(mixed preference optimisation): each term receives the overrides it accepts, the total
is the weighted sum, and each term's value is reported as `loss/<name>`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

LossFn = Callable[..., Any]

_LOSSES: dict[str, LossFn] = {}
_NEEDS_TOKENS: set[str] = set()


def register(name: str, *, needs_tokens: bool = False) -> Callable[[LossFn], LossFn]:
  """Decorator adding `fn` to the registry under `name` (a user's file may use it too).

  `needs_tokens=True` asks the train step for the per-token log-probs
  (`Logps.policy_tok`, `ref_tok`, `mask`, each [B, K, T]); other losses never hold them.
  """

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
    if needs_tokens:
      _NEEDS_TOKENS.add(name)
    return fn

  return add


def _terms(name: str) -> list[tuple[float, str]]:
  """'0.8*dpo+sft' -> [(0.8, 'dpo'), (1.0, 'sft')]; a plain name is one term of weight 1."""
  out = []
  for term in name.replace(" ", "").split("+"):
    weight, _, loss = term.rpartition("*")
    try:
      out.append((float(weight) if weight else 1.0, loss))
    except ValueError:
      raise ValueError(f"loss {name!r}: term {term!r} is not WEIGHT*NAME") from None
  for _, loss in out:
    if loss not in _LOSSES:
      raise ValueError(f"unknown loss {loss!r}; registered losses: {', '.join(names())}")
  return out


def get(name: str) -> LossFn:
  terms = _terms(name)
  if len(terms) == 1 and terms[0][0] == 1.0:
    return _LOSSES[terms[0][1]]
  return _weighted_sum(terms)


def _weighted_sum(terms: list[tuple[float, str]]) -> LossFn:
  accepts = {loss: set(hparams(loss)) for _, loss in terms}

  def total(lp, **overrides):
    value, metrics = 0.0, {}
    for i, (weight, loss) in enumerate(terms):
      part, part_metrics = _LOSSES[loss](lp, **{k: v for k, v in overrides.items()
                                                if k in accepts[loss]})
      value = value + weight * part
      if i == 0:
        metrics.update(part_metrics)  # the standard keys come from the first term
      metrics[f"loss/{loss}"] = part
    return value, metrics

  return total


def needs_tokens(name: str) -> bool:
  """Whether any term of `name` reads per-token log-probs."""
  return any(loss in _NEEDS_TOKENS for _, loss in _terms(name))


def names() -> list[str]:
  return sorted(_LOSSES)


def hparams(name: str) -> dict[str, Any]:
  """The loss's hyperparameters and their defaults, in signature order (for a weighted sum,
  the union over its terms, the first term's default winning)."""
  out = {}
  for _, loss in _terms(name):
    params = list(inspect.signature(_LOSSES[loss]).parameters.values())[1:]
    for p in params:
      out.setdefault(p.name, p.default)
  return out


def bind(name: str, overrides: dict[str, Any]) -> Callable[..., Any]:
  """`get(name)` with `overrides` applied; an unknown hyperparameter is an error listing the valid ones."""
  valid = hparams(name)
  unknown = sorted(set(overrides) - set(valid))
  if unknown:
    listing = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "(none)"
    raise ValueError(f"loss {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
                     f"valid ones (with defaults): {listing}")
  fn = get(name)
  # A single loss gets every hyperparameter; the terms of a sum pick theirs from overrides
  # and keep their own defaults otherwise.
  kwargs = {**valid, **overrides} if len(_terms(name)) == 1 else dict(overrides)

  def bound(lp):
    return fn(lp, **kwargs)

  bound.__name__ = f"{name}_bound"
  return bound
