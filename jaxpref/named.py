"""Things found by name from a flag: a table with a decorator to fill it, and the
`0.8*a+0.2*b` weighted-sum specs that losses and rewards both accept."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Table(Generic[T]):
  """Names -> functions; `what` names the kind in errors ("reward source", ...)."""

  def __init__(self, what: str):
    self.what, self.items = what, {}

  def register(self, name: str) -> Callable[[T], T]:
    def add(fn: T) -> T:
      if name in self.items and self.items[name] is not fn:
        raise ValueError(f"a {self.what} named {name!r} is already registered")
      self.items[name] = fn
      return fn
    return add

  def get(self, name: str) -> T:
    if name not in self.items:
      raise ValueError(f"unknown {self.what} {name!r}; registered: {', '.join(self.names())}")
    return self.items[name]

  def names(self) -> list[str]:
    return sorted(self.items)

  def __contains__(self, name: str) -> bool:
    return name in self.items


def weighted_terms(spec: str, what: str) -> list[tuple[float, str]]:
  """'0.8*dpo+sft' -> [(0.8, 'dpo'), (1.0, 'sft')]: weight 1 when omitted; `what` names the
  spec in errors ("loss", "reward")."""
  out = []
  for term in spec.replace(" ", "").split("+"):
    weight, _, name = term.rpartition("*")
    try:
      out.append((float(weight) if weight else 1.0, name))
    except ValueError:
      raise ValueError(f"{what} {spec!r}: term {term!r} is not WEIGHT*NAME") from None
    if not name:
      raise ValueError(f"{what} {spec!r}: term {term!r} has no name")
  return out
