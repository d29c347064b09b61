"""An LLM judge as a pairwise reward source (`--online.reward=judge`): any decoder jaxpref
loads (`loaded.load_decoder`), shown a template filled with the prompt and two responses,
and read at the answer position (no sampling).

For one ordered pair (a, b) the judge's verdict is the probability of its first label
among the two labels' next-token probabilities after the filled template,
`p(a, b) = sigmoid(l_A - l_B)` (l the logits of the labels' tokens there). The pair is
shown in both orders and the verdicts averaged, so the position bias cancels:

  P(a beats b) = (p(a, b) + 1 - p(b, a)) / 2,   P(a beats b) + P(b beats a) = 1.

Within a group of K responses that is K (K - 1) judge rows per prompt, one batched jitted
forward; each response's reward is its win rate against the other K - 1
(`sources.win_rates`, Pref-GRPO).
"""

from __future__ import annotations

import string
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref.cli_errors import FlagError
from jaxpref.rewards import sources
from jaxpref.rewards.loaded import ROW_MULTIPLE
from jaxpref.rewards.model_rewards import LM

DEFAULT_TEMPLATE = ("Which response answers the prompt better?\n\nPrompt: {prompt}\n\n"
                    "Response A: {a}\n\nResponse B: {b}\n\nThe better response is")
PLACEHOLDERS = ("prompt", "a", "b")


def read_template(path: str, flag: str = "--online.judge_template") -> str:
  """The template in file `path` ("" -> `DEFAULT_TEMPLATE`), checked: it must use each of
  {prompt}, {a} and {b} and no other placeholder."""
  if not path:
    return DEFAULT_TEMPLATE
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise FlagError(f"{flag}={path}: cannot read the template ({e.strerror or e})") from None
  try:
    fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
  except ValueError as e:  # an unmatched brace
    raise FlagError(f"{flag}={path}: not a template ({e}; write a literal brace as "
                    "{{ or }})") from None
  missing = [n for n in PLACEHOLDERS if n not in fields]
  extra = sorted(fields - set(PLACEHOLDERS))
  if missing or extra:
    raise FlagError(f"{flag}={path}: the template "
                    + (f"lacks placeholder {', '.join('{' + n + '}' for n in missing)}"
                       if missing else "")
                    + ("; " if missing and extra else "")
                    + (f"has unknown placeholder {', '.join('{' + n + '}' for n in extra)}"
                       if extra else "")
                    + " (it needs {prompt}, {a} and {b})")
  return text


class Judge:
  """`lm` judging pairs with `template`; `labels` are the answers naming the first and the
  second response, each one token of the judge's tokenizer."""

  def __init__(self, lm: LM, template: str = DEFAULT_TEMPLATE, labels: Sequence[str] = ("A", "B"),
               path: str = "", batch_size: int = 32,
               labels_flag: str = "--online.judge_labels"):
    self.lm, self.template, self.path, self.batch_size = lm, template, path, batch_size
    if len(labels) != 2 or labels[0] == labels[1]:
      raise FlagError(f"{labels_flag}={','.join(labels)}: need two different labels")
    self.labels = tuple(labels)
    ids = []
    unk = getattr(lm.tok, "unk_id", None)
    for label in self.labels:
      enc = lm.tok.encode(label)
      if len(enc) != 1 or enc[0] == unk:
        pieces = [lm.tok.token(i) if hasattr(lm.tok, "token") else i for i in enc]
        raise FlagError(f"{labels_flag}={','.join(labels)}: label {label!r} is not one known "
                        f"token of the judge's tokenizer {getattr(lm.tok, 'path', '')} "
                        f"(it encodes to {pieces}); pick labels that are")
      ids.append(enc[0])
    self.label_ids = np.asarray(ids, np.int32)

    def fn(params, tokens, seg, last):
      model = nnx.merge(lm.graphdef, params)
      h = model.hidden(tokens, segment_ids=seg)  # the LM head on the answer position only
      return model.logits(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
                          )[:, self.label_ids]  # [N, 2]

    self._fn = jax.jit(fn)

  def rows(self, prompts, firsts, seconds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment ids [N, W], index of the last token [N]): BOS + the filled
    template, its last `lm.max_len` tokens kept (the answer cue is at the end)."""
    tok = self.lm.tok
    ids = [([tok.bos_id] + tok.encode(self.template.format(prompt=x, a=a, b=b)))[-self.lm.max_len:]
           for x, a, b in zip(prompts, firsts, seconds)]
    width = min(self.lm.max_len, -(-max(map(len, ids)) // ROW_MULTIPLE) * ROW_MULTIPLE)
    tokens = np.full((len(ids), width), tok.pad_id, np.int32)
    seg = np.zeros_like(tokens)
    for i, row in enumerate(ids):
      tokens[i, :len(row)], seg[i, :len(row)] = row, 1
    return tokens, seg, np.asarray([len(r) - 1 for r in ids], np.int32)

  def label_logits(self, prompts, firsts, seconds) -> np.ndarray:
    """float32 [N, 2]: the judge's logits of the two labels after each filled template."""
    out = []
    for s in range(0, len(prompts), self.batch_size):
      xs, a, b = (list(v[s:s + self.batch_size]) for v in (prompts, firsts, seconds))
      n, pad = len(xs), self.batch_size - len(xs)  # one batch shape per row width
      tokens, seg, last = self.rows(xs + xs[:1] * pad, a + a[:1] * pad, b + b[:1] * pad)
      out.append(np.asarray(self._fn(self.lm.params, tokens, seg, last))[:n])
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)

  def first_wins(self, prompts, firsts, seconds) -> np.ndarray:
    """float64 [N]: p(a, b), the judge's probability of the first label (one order)."""
    lg = np.asarray(self.label_logits(prompts, firsts, seconds), np.float64)
    return 1.0 / (1.0 + np.exp(lg[:, 1] - lg[:, 0]))

  def preferences(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]
                  ) -> np.ndarray:
    """P [B, K, K]: P[b, i, j] = (p(y_i, y_j) + 1 - p(y_j, y_i)) / 2 (diagonal 1/2), from
    one batch of every ordered pair i != j."""
    k = len(responses[0]) if responses else 0
    pairs = [(b, i, j) for b in range(len(prompts)) for i in range(k) for j in range(k)
             if i != j]
    p = self.first_wins([prompts[b] for b, _, _ in pairs],
                        [responses[b][i] for b, i, _ in pairs],
                        [responses[b][j] for b, _, j in pairs])
    one = np.full((len(prompts), k, k), np.nan)
    for (b, i, j), v in zip(pairs, p):
      one[b, i, j] = v
    out = (one + 1.0 - np.swapaxes(one, 1, 2)) / 2.0
    out[:, np.arange(k), np.arange(k)] = 0.5
    return out

  def describe(self) -> str:
    return (f"judge {self.path} (labels {self.labels[0]!r}/{self.labels[1]!r}, both orders "
            f"averaged, rows of at most {self.lm.max_len} tokens)")


@sources.register("judge")
def judge(prompts, responses, **ctx) -> np.ndarray:
  """Each response's win rate against the rest of its group under ctx judge (a `Judge`),
  both orders of every pair judged and averaged."""
  j = ctx.get("judge")
  if j is None:
    raise ValueError("judge needs --online.judge_model=PATH (ctx 'judge')")
  return sources.win_rates(j.preferences(prompts, responses), ctx.get("valid"))
