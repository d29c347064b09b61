"""Rewards computed by language models: functions from a batch of (prompt, response)
strings to float64[N] rewards (higher is better).

* `cdr`: Customizable Density Ratio (docs/reward_models.md#cdr), r = log pi_strong(y|x) -
  log pi_weak(y|x); `system` (task criteria, exemplars) is put in front of the prompt that
  both models see, the paper's customisation.
* `flr`: follow-up likelihood as reward (docs/reward_models.md#flr, a reading of the abstract),
  r = mean_f+ log p(f+ | x, y) - mean_f- log p(f- | x, y): how likely the user's next turn
  is a satisfied one rather than a complaint.
* `mixture` with `relevance`, `length_penalty`, `repetition_penalty`: R^3-style weighted
  mixtures (docs/reward_models.md#mixture, a reading): a relevance score plus regularisers against its shortcuts.

Log-probs are those of the training path (`models.logps.token_logps`: BOS + prompt +
response + EOS laid out as in `data.pairs.tokenize_sequence`, the response's tokens and
its EOS counted), so a reward here is the number a DPO run on the same model would see.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref.data import Tokenizer
from jaxpref.data.pairs import tokenize_sequence
from jaxpref.models import convert
from jaxpref.models.logps import token_logps
from jaxpref.types import GroupBatch

RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


@dataclasses.dataclass
class LM:
  """A decoder (graphdef + params) with its tokenizer and row length."""

  graphdef: Any
  params: Any
  tok: Any  # jaxpref.data.Tokenizer
  max_len: int = 256
  batch_size: int = 32

  @classmethod
  def load(cls, path: str, tokenizer: str = "", max_len: int = 256) -> "LM":
    """A jaxpref-convert or Hugging Face folder; the tokenizer defaults to the folder's."""

    decoder = convert.load_pretrained(path, convert.run_config(path, {}))
    graphdef, params = nnx.split(decoder)
    return cls(graphdef, params, Tokenizer.load(tokenizer or path), max_len)


def _check(prompts: Sequence[str], responses: Sequence[str]) -> None:
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


def sequence_logps(lm: LM, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  """float64[N]: log p(response | prompt) summed over the response's tokens and EOS."""

  _check(prompts, responses)
  fn = jax.jit(lambda p, b: token_logps(lm.graphdef, p, b).sum(-1)[:, 0])
  out = np.zeros(len(prompts), np.float64)
  for start in range(0, len(prompts), lm.batch_size):
    rows = [tokenize_sequence(lm.tok, x, y, lm.max_len)
            for x, y in zip(prompts[start:start + lm.batch_size],
                            responses[start:start + lm.batch_size])]
    n = len(rows)
    rows += [rows[0]] * (lm.batch_size - n)  # one shape, one compilation
    tokens, mask, seg = (np.stack([r[i] for r in rows])[:, None] for i in range(3))
    batch = GroupBatch(tokens=tokens, loss_mask=mask, segment_ids=seg,
                       valid=np.ones((len(rows), 1), bool), weight=np.ones(len(rows), np.float32))
    out[start:start + n] = np.asarray(fn(lm.params, batch), np.float64)[:n]
  return out


def cdr(strong: LM, weak: LM, prompts: Sequence[str], responses: Sequence[str],
        system: str = "") -> np.ndarray:
  """log pi_strong(y | system + x) - log pi_weak(y | system + x) (docs/reward_models.md#cdr)."""
  shown = [system + x for x in prompts]
  return sequence_logps(strong, shown, responses) - sequence_logps(weak, shown, responses)


def flr(lm: LM, prompts: Sequence[str], responses: Sequence[str], positive: Sequence[str],
        negative: Sequence[str] = (), template: str = "{prompt} {response} ") -> np.ndarray:
  """mean over f+ of log p(f+ | x, y) - mean over f- of log p(f- | x, y) (docs/reward_models.md#flr, a reading).

  The context is `template` filled with the prompt and response; each follow-up is scored
  as the continuation of that context. No negatives: the positive term alone.
  """
  _check(prompts, responses)
  if not positive:
    raise ValueError("flr needs at least one positive follow-up")
  contexts = [template.format(prompt=x, response=y) for x, y in zip(prompts, responses)]

  def mean_logp(follow_ups):
    n = len(contexts)
    lp = sequence_logps(lm, [c for f in follow_ups for c in contexts],
                        [f for f in follow_ups for _ in range(n)])
    return lp.reshape(len(follow_ups), n).mean(0)

  return mean_logp(positive) - (mean_logp(negative) if negative else 0.0)


def embed(lm: LM, texts: Sequence[str]) -> np.ndarray:
  """float64[N, D]: the decoder's final hidden states averaged over each text's tokens."""

  @jax.jit
  def fn(params, tokens, seg):
    h = nnx.merge(lm.graphdef, params).hidden(tokens, segment_ids=seg)  # [N, T, D]
    m = (seg > 0).astype(h.dtype)[..., None]
    return (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

  out = []
  for start in range(0, len(texts), lm.batch_size):
    chunk = list(texts[start:start + lm.batch_size])
    n = len(chunk)
    tokens = np.full((lm.batch_size, lm.max_len), lm.tok.pad_id, np.int32)
    seg = np.zeros_like(tokens)
    for i, t in enumerate(chunk + [chunk[0]] * (lm.batch_size - n)):
      ids = ([lm.tok.bos_id] + lm.tok.encode(t) + [lm.tok.eos_id])[:lm.max_len]
      tokens[i, :len(ids)], seg[i, :len(ids)] = ids, 1
    out.append(np.asarray(fn(lm.params, tokens, seg), np.float64)[:n])
  return np.concatenate(out)


def relevance(lm: LM) -> RewardFn:
  """cos(embed(prompt), embed(response)): R^3's relevance, with `lm` as the retriever."""
  def fn(prompts, responses):
    _check(prompts, responses)
    a, b = embed(lm, prompts), embed(lm, responses)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1),
                                        1e-12)
  return fn


def length_penalty(tok, max_tokens: int) -> RewardFn:
  """-max(0, tokens(y) - max_tokens) / max_tokens: 0 up to the budget, then linear."""
  if max_tokens < 1:
    raise ValueError(f"length_penalty: max_tokens must be >= 1, got {max_tokens}")
  def fn(prompts, responses):
    _check(prompts, responses)
    n = np.array([len(tok.encode(y)) for y in responses], np.float64)
    return -np.maximum(0.0, n - max_tokens) / max_tokens
  return fn


def repetition_penalty(tok, n: int = 2) -> RewardFn:
  """-(share of the response's token n-grams that repeat an earlier one), in [-1, 0]."""
  def fn(prompts, responses):
    _check(prompts, responses)
    out = np.zeros(len(responses), np.float64)
    for i, y in enumerate(responses):
      ids = tok.encode(y)
      grams = [tuple(ids[j:j + n]) for j in range(len(ids) - n + 1)]
      if grams:
        out[i] = -(1.0 - len(set(grams)) / len(grams))
    return out
  return fn


def mixture(components: Mapping[str, RewardFn], weights: Mapping[str, float]) -> RewardFn:
  """sum_k weights[k] * components[k](x, y): an R^3-style weighted mixture (docs/reward_models.md#mixture)."""
  unknown = sorted(set(weights) - set(components))
  if unknown:
    raise ValueError(f"weights for unknown reward(s) {unknown}; have {sorted(components)}")
  def fn(prompts, responses):
    _check(prompts, responses)
    total = np.zeros(len(prompts), np.float64)
    for name, w in weights.items():
      if w:
        total += w * np.asarray(components[name](prompts, responses), np.float64)
    return total
  return fn
