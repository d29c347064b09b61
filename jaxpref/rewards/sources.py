"""Reward sources for online training: scores of sampled responses, by name.

A source is `fn(prompts: list[str], responses: list[list[str]], *, hparam=default, **ctx)
-> float [B, K]`: B prompts, K responses each. Keyword-only arguments with defaults are
hyperparameters, bound when the reward is built (`build(spec, params=...)`); everything
else arrives per call in `ctx`, which the online loop fills (docs/online.md):

  lengths  int[B, K]    response tokens sampled (EOS included when one was sampled)
  truncated bool[B, K]  the response hit the sampler's token cap without an EOS
  valid    bool[B, K]   False for padded responses
  max_new_tokens int    the sampler's token cap
  tok, lm, strong_lm, weak_lm: a tokenizer / `model_rewards.LM`s for the model sources.

`build("1.0*fn+0.5*overlong", reward_fn="FILE.py:name")` is the weighted sum of its terms;
`fn` names the `--reward_fn` function, `FILE.py:name` may also stand as a term, any other
term is a registered source. Every term's output is checked: an exception, a NaN/inf or a
wrong shape is a `RewardError`, one line naming the source and the offending prompt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from jaxpref import named
from jaxpref.rewards import model_rewards as mr

Source = Callable[..., Any]
_SOURCES: named.Table[Source] = named.Table("reward source")
USER = "fn"  # the term naming the --reward_fn function


class RewardError(ValueError):
  """A reward source failed or returned something unusable; the message is one line."""


def register(name: str) -> Callable[[Source], Source]:
  """Decorator adding a source under `name` (a user's file may use it too)."""
  if name == USER or ".py:" in name:
    raise ValueError(f"{name!r} cannot name a source: it is reserved for --reward_fn")
  return _SOURCES.register(name)


names = _SOURCES.names


def load_user_fn(spec: str, base: str = "") -> Source:
  """The function `name` of the Python file in "FILE.py:name" (FILE relative to `base`,
  else the working directory), imported by path so it needs no package."""
  path, _, attr = spec.rpartition(":")
  if not path.endswith(".py") or not attr:
    raise RewardError(f"--reward_fn={spec!r}: expected FILE.py:FUNCTION")
  full = os.path.abspath(os.path.join(base, path) if base and not os.path.isabs(path) else path)
  if not os.path.isfile(full):
    raise RewardError(f"--reward_fn={spec!r}: no such file {full}")
  module_name = "jaxpref_reward_" + hashlib.sha1(full.encode()).hexdigest()[:12]
  module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(module_name,
                                                                                  full))
  try:
    module.__spec__.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - a broken user file, reported with its path
    first = (str(e).splitlines() or [""])[0]
    raise RewardError(f"--reward_fn={spec!r}: importing {full} failed: "
                      f"{type(e).__name__}: {first}") from e
  fn = getattr(module, attr, None)
  if not callable(fn):
    found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
    raise RewardError(f"--reward_fn={spec!r}: {full} defines no function {attr!r} "
                      f"(it has: {', '.join(found) or 'none'})")
  return fn


def _short(text: str, n: int = 80) -> str:
  text = " ".join(str(text).split())
  return repr(text if len(text) <= n else text[:n - 3] + "...")


def _slice_ctx(ctx: Mapping[str, Any], b: int, batch: int) -> dict:
  """ctx for prompt b alone: [B, ...] arrays and length-B lists sliced to [1, ...]."""
  out = {}
  for k, v in ctx.items():
    if isinstance(v, (list, tuple)) and len(v) == batch:
      out[k] = v[b:b + 1]
    elif hasattr(v, "shape") and getattr(v, "ndim", 0) >= 1 and v.shape[0] == batch:
      out[k] = v[b:b + 1]
    else:
      out[k] = v
  return out


def _raising_prompt(fn: Source, prompts, responses, ctx) -> int:
  """The first prompt on which `fn` raises alone (0 when none does: a batch-level failure)."""
  for b in range(len(prompts)):
    try:
      fn(prompts[b:b + 1], responses[b:b + 1], **_slice_ctx(ctx, b, len(prompts)))
    except Exception:  # noqa: BLE001 - locating the failure, any exception will do
      return b
  return 0


def check_call(label: str, fn: Source, prompts: Sequence[str],
               responses: Sequence[Sequence[str]], **ctx) -> np.ndarray:
  """`fn(prompts, responses, **ctx)` as float64 [B, K], or a one-line `RewardError`."""
  batch = len(prompts)
  shape = (batch, len(responses[0]) if batch else 0)
  try:
    out = fn(prompts, responses, **ctx)
  except Exception as e:  # noqa: BLE001 - any failure of user code becomes a RewardError
    b = _raising_prompt(fn, prompts, responses, ctx) if batch else 0
    first = (str(e).splitlines() or [""])[0]
    raise RewardError(f"reward {label!r} raised {type(e).__name__}: {first} "
                      f"(prompt {b}: {_short(prompts[b]) if batch else 'none'})") from e
  try:
    arr = np.asarray(out, np.float64)
  except (TypeError, ValueError):
    raise RewardError(f"reward {label!r} returned {type(out).__name__}, not numbers "
                      f"(first prompt: {_short(prompts[0])})") from None
  if arr.shape != shape:
    raise RewardError(f"reward {label!r} returned shape {arr.shape}, expected [B, K] = {shape} "
                      f"(first prompt: {_short(prompts[0])})")
  bad = np.argwhere(~np.isfinite(arr))
  if len(bad):
    b, k = bad[0]
    raise RewardError(f"reward {label!r} returned {arr[b, k]} for prompt {b}: "
                      f"{_short(prompts[b])}, response {k}: {_short(responses[b][k], 40)}")
  return arr


def _hparams(fn: Source) -> dict[str, Any]:
  return {p.name: p.default for p in inspect.signature(fn).parameters.values()
          if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}


def _accepts_all(fn: Source) -> bool:
  return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def parse(spec: str) -> list[tuple[float, str]]:
  """'1.0*fn+0.5*overlong' -> [(1.0, 'fn'), (0.5, 'overlong')]; weight 1 when omitted."""
  return named.weighted_terms(spec, "reward")


class Reward:
  """A built reward: the weighted sum of checked sources. `reward(prompts, responses, **ctx)`
  is the total float64 [B, K]; `reward.parts(...)` also returns each term's values. `ctx`
  holds what every call gets besides its own ctx (loaded models, the policy's tokenizer)."""

  def __init__(self, terms: list[tuple[float, str, Source, dict]],
               ctx: Optional[Mapping[str, Any]] = None):
    self.terms, self.ctx = terms, dict(ctx or {})

  def parts(self, prompts, responses, **ctx) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if len({len(r) for r in responses}) > 1 or len(responses) != len(prompts):
      raise ValueError(f"reward: need {len(prompts)} lists of K responses each, got lengths "
                       f"{[len(r) for r in responses]}")
    total, values, ctx = 0.0, {}, {**self.ctx, **ctx}
    for weight, label, fn, bound in self.terms:
      kw = dict(ctx) if _accepts_all(fn) else {
          k: v for k, v in ctx.items() if k in inspect.signature(fn).parameters}
      values[label] = check_call(label, fn, prompts, responses, **{**kw, **bound})
      total = total + weight * values[label]
    return np.asarray(total, np.float64), values

  def __call__(self, prompts, responses, **ctx) -> np.ndarray:
    return self.parts(prompts, responses, **ctx)[0]


def build(spec: str = "", *, reward_fn: str = "", params: Optional[Mapping[str, Mapping]] = None,
          base: str = "", ctx: Optional[Mapping[str, Any]] = None) -> Reward:
  """The reward named by `spec` (default "fn" when `reward_fn` is given). `params` maps a
  term's name to its hyperparameters; one it does not have is an error listing the valid
  ones. `base` is where relative FILE.py paths are looked up (the flag file's folder);
  `ctx` is passed to every call (`Reward.ctx`)."""
  params = dict(params or {})
  spec = spec or (USER if reward_fn else "")
  if not spec:
    raise ValueError("no reward: give --reward_fn=FILE.py:name and/or a reward spec")
  terms = []
  for weight, name in parse(spec):
    if name == USER:
      if not reward_fn:
        raise ValueError(f"reward {spec!r} uses {USER!r} but no --reward_fn was given")
      fn, label = load_user_fn(reward_fn, base), os.path.basename(reward_fn)
    elif ".py:" in name:
      fn, label = load_user_fn(name, base), os.path.basename(name)
    elif name in _SOURCES:
      fn, label = _SOURCES.get(name), name
    else:
      raise ValueError(f"unknown reward source {name!r}; registered: {', '.join(names())}, "
                       f"or {USER} (--reward_fn), or FILE.py:name")
    bound = dict(params.pop(name, {}))
    unknown = sorted(set(bound) - set(_hparams(fn)))
    if unknown:
      valid = ", ".join(f"{k}={v!r}" for k, v in _hparams(fn).items()) or "(none)"
      raise ValueError(f"reward source {name!r} has no hyperparameter {', '.join(unknown)}; "
                       f"valid ones (with defaults): {valid}")
    bound = {k: _typed(name, k, v, _hparams(fn)[k]) for k, v in bound.items()}
    terms.append((weight, label, fn, bound))
  if params:
    raise ValueError(f"hyperparameters for reward sources not in {spec!r}: {sorted(params)}")
  return Reward(terms, ctx)


def _typed(source: str, key: str, value: Any, default: Any) -> Any:
  """A hyperparameter given as text (from a flag) in the type of its default."""
  if not isinstance(value, str) or isinstance(default, str) or default is None:
    return value
  try:
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
      return value.lower() in ("true", "1")
    return type(default)(value)
  except ValueError:
    raise ValueError(f"reward source {source!r}: hyperparameter {key}={value!r} is not a "
                     f"{type(default).__name__} (default {default!r})") from None


def parse_params(text: str, flag: str = "--online.reward_params") -> dict[str, dict[str, str]]:
  """'overlong.buffer=4;flr.positive=thanks|great' -> {"overlong": {"buffer": "4"}, ...};
  entries are separated by ';' (values may hold commas), typed by `build`."""
  out: dict[str, dict[str, str]] = {}
  for entry in filter(None, (e.strip() for e in text.split(";"))):
    key, eq, value = entry.partition("=")
    source, dot, name = key.strip().partition(".")
    if not eq or not dot or not source or not name:
      raise ValueError(f"{flag}={text!r}: entry {entry!r} is not SOURCE.HYPERPARAMETER=VALUE")
    out.setdefault(source, {})[name.strip()] = value
  return out


def _need(ctx: Mapping[str, Any], key: str, who: str, what: str):
  if ctx.get(key) is None:
    raise ValueError(f"{who} needs ctx {key!r} ({what}) from the online loop")
  return ctx[key]


@register("overlong")
def overlong(prompts, responses, *, max_tokens: int = 0, buffer: int = 0, **ctx) -> np.ndarray:
  """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), L = ctx lengths,
  L_max = max_tokens (0: ctx max_new_tokens), L_cache = buffer (0: L_max // 5, DAPO's
  4096 of 20480): 0 while L <= L_max - L_cache, then (L_max - L_cache - L) / L_cache down
  to -1 at L_max, and -1 beyond it or for a truncated response (ctx truncated)."""
  lengths = np.asarray(_need(ctx, "lengths", "overlong", "int [B, K]"), np.float64)
  l_max = max_tokens or int(_need(ctx, "max_new_tokens", "overlong (max_tokens=0)", "int"))
  cache = buffer or l_max // 5
  if not 0 < cache <= l_max:
    raise ValueError(f"overlong: need 0 < buffer <= max_tokens, got {cache} and {l_max}")
  out = np.clip((l_max - cache - lengths) / cache, -1.0, 0.0)
  if ctx.get("truncated") is not None:
    out = np.where(np.asarray(ctx["truncated"], bool), -1.0, out)
  return out


def _flat(fn: Callable[[list, list], np.ndarray], prompts, responses) -> np.ndarray:
  """A (prompt, response)-pair reward [N] applied to B x K responses, reshaped [B, K]."""
  k = len(responses[0]) if responses else 0
  xs = [x for x, ys in zip(prompts, responses) for _ in ys]
  return np.asarray(fn(xs, [y for ys in responses for y in ys]), np.float64).reshape(-1, k)


@register("length")
def length(prompts, responses, *, max_tokens: int = 64, **ctx) -> np.ndarray:
  """R^3's length penalty (model_rewards.length_penalty): -max(0, n - max_tokens) /
  max_tokens, n the response's tokens under ctx tok."""
  tok = _need(ctx, "tok", "length", "a tokenizer")
  return _flat(mr.length_penalty(tok, max_tokens), prompts, responses)


@register("repetition")
def repetition(prompts, responses, *, n: int = 2, **ctx) -> np.ndarray:
  """R^3's repetition penalty (model_rewards.repetition_penalty) under ctx tok, in [-1, 0]."""
  tok = _need(ctx, "tok", "repetition", "a tokenizer")
  return _flat(mr.repetition_penalty(tok, n), prompts, responses)


@register("relevance")
def relevance(prompts, responses, **ctx) -> np.ndarray:
  """R^3's relevance (model_rewards.relevance): cosine of ctx lm's mean hidden states."""
  lm = _need(ctx, "lm", "relevance", "a model_rewards.LM")
  return _flat(mr.relevance(lm), prompts, responses)


@register("cdr")
def cdr(prompts, responses, *, system: str = "", **ctx) -> np.ndarray:
  """CDR (model_rewards.cdr): log pi_strong(y | system + x) - log pi_weak(y | system + x),
  the two models from ctx strong_lm and weak_lm."""
  strong = _need(ctx, "strong_lm", "cdr", "a model_rewards.LM")
  weak = _need(ctx, "weak_lm", "cdr", "a model_rewards.LM")
  return _flat(lambda xs, ys: mr.cdr(strong, weak, xs, ys, system), prompts, responses)


@register("flr")
def flr(prompts, responses, *, positive: str = "", negative: str = "", **ctx) -> np.ndarray:
  """FLR (model_rewards.flr) under ctx lm; `positive` / `negative` follow-ups are
  '|'-separated (flags hold strings)."""
  lm = _need(ctx, "lm", "flr", "a model_rewards.LM")
  pos = [f for f in positive.split("|") if f]
  neg = [f for f in negative.split("|") if f]
  return _flat(lambda xs, ys: mr.flr(lm, xs, ys, pos, neg), prompts, responses)


# Pref-GRPO (CodeGoat24/Pref-GRPO): rewards from a pairwise judge, as within-group win rates.

def preference_matrix(prefer: Callable[[str, str, str], float], prompts: Sequence[str],
                      responses: Sequence[Sequence[str]]) -> np.ndarray:
  """P [B, K, K] with P[b, i, j] = prefer(x_b, y_i, y_j), the probability that y_i beats y_j
  (1 / 0 / 0.5 for a win / loss / tie), asked once per unordered pair (i < j) as Pref-GRPO
  does; P[b, j, i] = 1 - P[b, i, j] and the diagonal is 1/2."""
  k = len(responses[0]) if responses else 0
  out = np.full((len(prompts), k, k), 0.5)
  for b, (x, ys) in enumerate(zip(prompts, responses)):
    for i in range(k):
      for j in range(i + 1, k):
        p = float(prefer(x, ys[i], ys[j]))
        if not 0.0 <= p <= 1.0:  # also rejects NaN
          raise ValueError(f"preference {p} for responses {i}, {j} is not a probability in [0, 1]")
        out[b, i, j], out[b, j, i] = p, 1.0 - p
  return out


def win_rates(prefs, valid=None) -> np.ndarray:
  """Pref-GRPO's reward: r_i = mean over the group's other valid j of P[i, j] (wins count 1,
  ties 1/2), float64 [B, K] from P [B, K, K]; 0 for invalid responses and for responses
  with no valid opponent. Pref-GRPO's code also rounds to 3 decimals; this does not."""
  p = np.asarray(prefs, np.float64)
  if p.ndim != 3 or p.shape[1] != p.shape[2]:
    raise ValueError(f"win_rates: preferences must be [B, K, K], got {p.shape}")
  v = np.ones(p.shape[:2], bool) if valid is None else np.asarray(valid, bool)
  pair = v[:, :, None] & v[:, None, :] & ~np.eye(p.shape[1], dtype=bool)
  n = pair.sum(-1)
  return np.where(n > 0, (p * pair).sum(-1) / np.maximum(n, 1), 0.0)


def pairwise_source(prefer: Callable[[str, str, str], float]) -> Source:
  """A source from a judge `prefer(prompt, a, b) -> P(a beats b)`: each response's win rate
  against the rest of its group (ctx valid drops padded responses). Register it, or
  return it from a --reward_fn file: `reward = pairwise_source(my_judge)`."""
  def source(prompts, responses, **ctx):
    return win_rates(preference_matrix(prefer, prompts, responses), ctx.get("valid"))
  source.__name__ = getattr(prefer, "__name__", "pairwise")
  source.pairwise = True  # Nash-MD reads its probability as is (train/game_rollouts.py)
  return source
