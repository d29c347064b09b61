"""Losses by name, so a flag file can select one and set its hyperparameters.

A loss is `fn(lp: Logps, *, hparam=default, ...) -> (loss, metrics)`. Its keyword-only
arguments, with their defaults, are its hyperparameters; `hparams(name)` reads them from
the signature, so registering a loss never means editing a table elsewhere.

A name may also be a weighted sum of registered losses, `"0.8*dpo+0.2*bco_pair+sft"`
(mixed preference optimisation): each term receives the overrides it accepts, the total
is the weighted sum, and each term's value is reported as `loss/<name>`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Optional

from jaxpref import named

LossFn = Callable[..., Any]

TOKEN_MASKS = ("learned", "activations")
# Which role's step a loss runs under: the offline policy (policy + reference log-probs),
# the reward model (a reward or embedding per response), or the online policy (rollouts
# with old-policy log-probs and advantages).
ROLES = ("policy", "reward", "online")


@dataclasses.dataclass(frozen=True)
class TokenNeeds:
  """What a loss asks the train step for beyond sequence log-probs; false when nothing, so
  `with_tokens=needs_tokens(name)` stays a plain flag for losses that only need tokens."""
  tokens: bool = False  # Logps.policy_tok, ref_tok, mask
  vocab_kl: bool = False  # Logps.kl_tok: a full-vocabulary pass over both models' logits
  # Logps.token_mask: "learned" = the policy's mask network (models/token_mask.py) on the
  # reference's per-layer hidden states; "activations" = their feature means (no params).
  token_mask: Optional[str] = None
  # Logps.prob_sq: per response, the masked sum over its tokens of log sum_v pi(v|t)^2
  # under the policy (WPO's weight alignment); a sequence-level [B, K] term, not a token one.
  prob_sq: bool = False
  # Logps.values / old_values / adv_tok / returns: a value head on the policy (PPO,
  # `--online.value=head`); the online step then computes GAE once per rollout.
  values: bool = False
  # Logps.prompt_policy / prompt_length: the prompt tokens' log-probs from the same policy
  # pass (no extra compute; pad and bucket layouts only, None under packing/shared prompt).
  prompt: bool = False

  def __bool__(self):
    return self.tokens

  def __or__(self, other: "TokenNeeds") -> "TokenNeeds":
    masks = {m for m in (self.token_mask, other.token_mask) if m}
    if len(masks) > 1:
      raise ValueError(f"losses asking for different token masks ({', '.join(sorted(masks))}) "
                       "cannot be summed")
    return TokenNeeds(self.tokens or other.tokens, self.vocab_kl or other.vocab_kl,
                      masks.pop() if masks else None, self.prob_sq or other.prob_sq,
                      self.values or other.values, self.prompt or other.prompt)


_LOSSES: dict[str, LossFn] = {}
_NEEDS: dict[str, TokenNeeds] = {}
_ROLES: dict[str, str] = {}
_RANGES: dict[str, dict[str, str]] = {}


def _in_range(value: Any, spec: str) -> bool:
  """`spec` is "> a", ">= a", "< a", "<= a" or an interval "[a, b)", "(a, b]", ..."""
  spec = spec.replace(" ", "")
  for op, test in ((">=", lambda v, a: v >= a), ("<=", lambda v, a: v <= a),
                   (">", lambda v, a: v > a), ("<", lambda v, a: v < a)):
    if spec.startswith(op):
      return test(value, float(spec[len(op):]))
  lo, hi = (float(x) for x in spec[1:-1].split(","))
  return ((value >= lo) if spec[0] == "[" else (value > lo)) and (
      (value <= hi) if spec[-1] == "]" else (value < hi))


def register(name: str, *, needs_tokens: bool = False, needs_vocab_kl: bool = False,
             token_mask: Optional[str] = None, needs_prob_sq: bool = False,
             needs_values: bool = False, needs_prompt: bool = False, role: str = "policy",
             ranges: Optional[dict[str, str]] = None) -> Callable[[LossFn], LossFn]:
  """Decorator adding `fn` to the registry under `name` (a user's file may use it too).

  `needs_tokens=True` asks the train step for the per-token log-probs
  (`Logps.policy_tok`, `ref_tok`, `mask`, each [B, K, T]); other losses never hold them.
  `needs_vocab_kl` asks for `Logps.kl_tok`, and `token_mask` (one of TOKEN_MASKS) for
  `Logps.token_mask`: a full-vocabulary pass and per-layer reference states, paid only by
  the losses that ask (either implies `needs_tokens`). `needs_prob_sq` asks for
  `Logps.prob_sq` [B, K], a policy-side full-vocabulary pass without per-token arrays.
  `needs_values` (role "online") asks for a value head's per-token values and the
  rollout's GAE advantages and returns (`Logps.values`, `old_values`, `adv_tok`, `returns`).
  `needs_prompt` asks for `Logps.prompt_policy` and `prompt_length` [B, K].
  `role` (one of ROLES) is the step the loss is written for; a run under another role is
  refused at start-up. `ranges` maps hyperparameters to the values the paper allows
  ("> 0", "[0, 0.5)"); `bind` refuses others at start-up, naming the flag.
  """
  if role not in ROLES:
    raise ValueError(f"loss {name!r}: role must be one of {ROLES}, got {role!r}")
  if token_mask is not None and token_mask not in TOKEN_MASKS:
    raise ValueError(f"loss {name!r}: token_mask must be one of {TOKEN_MASKS}, got {token_mask!r}")

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
    unknown = sorted(set(ranges or {}) - {p.name for p in params[1:]})
    if unknown:
      raise TypeError(f"loss {name!r}: ranges for unknown hyperparameters {unknown}")
    _LOSSES[name] = fn
    _ROLES[name] = role
    _RANGES[name] = dict(ranges or {})
    if any((needs_tokens, needs_vocab_kl, token_mask, needs_prob_sq, needs_values, needs_prompt)):
      _NEEDS[name] = TokenNeeds(bool(needs_tokens or needs_vocab_kl or token_mask or needs_values),
                                needs_vocab_kl, token_mask, needs_prob_sq, needs_values,
                                needs_prompt)
    return fn

  return add


def ranges(name: str) -> dict[str, str]:
  """The declared ranges of the hyperparameters of `name`'s terms."""
  return {hp: spec for _, loss in _terms(name) for hp, spec in _RANGES[loss].items()}


def _terms(name: str) -> list[tuple[float, str]]:
  """'0.8*dpo+sft' -> [(0.8, 'dpo'), (1.0, 'sft')]; a plain name is one term of weight 1."""
  out = named.weighted_terms(name, "loss")
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


def needs_tokens(name: str) -> TokenNeeds:
  """What the terms of `name` read beyond sequence log-probs; truthy iff any reads
  per-token log-probs (the train step's `with_tokens`)."""
  out = TokenNeeds()
  for _, loss in _terms(name):
    out = out | _NEEDS.get(loss, TokenNeeds())
  return out


def role(name: str) -> str:
  """The role the terms of `name` are written for (a sum mixing roles is an error)."""
  found = {_ROLES[loss] for _, loss in _terms(name)}
  if len(found) > 1:
    raise ValueError(f"loss {name!r} sums terms of different roles ({', '.join(sorted(found))})")
  return found.pop()


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
  for _, loss in _terms(name):
    for hp, spec in _RANGES[loss].items():
      value = overrides.get(hp, hparams(loss).get(hp))
      if isinstance(value, (int, float)) and not _in_range(float(value), spec):
        raise ValueError(f"--loss.{hp}={value!r} is out of range for loss {loss!r}: it must be "
                         f"{spec}")
  for weight, _ in _terms(name):
    if not (weight > 0 and math.isfinite(weight)):
      raise ValueError(f"loss {name!r}: a term's weight must be > 0 and finite, got {weight}")
  fn = get(name)
  # A single loss gets every hyperparameter; the terms of a sum pick theirs from overrides
  # and keep their own defaults otherwise.
  kwargs = {**valid, **overrides} if len(_terms(name)) == 1 else dict(overrides)

  def bound(lp):
    return fn(lp, **kwargs)

  bound.__name__ = f"{name}_bound"
  return bound
