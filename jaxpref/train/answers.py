"""GRAO's reference answers in the rollout (`--loss=grao`): each record's `chosen` answer
joins its group of K samples as member K, scored by the run's reward like the samples, so
the group advantages are computed over (o_1..o_K, y) as the paper's eq. 4 asks
(docs/online.md#grao). The answer is laid out as a sample would be: the framed prompt, the
answer and EOS, cut to `--online.max_new_tokens` (then without EOS; counted), so the
shared-prompt layout and the loss see one more response of the same shape.
"""

from __future__ import annotations

import numpy as np


def append(tokens, starts, ends, finished, prompts: list, answers: list, k: int, n: int,
           eos_id: int, pad_id: int):
  """Rollout rows [B*K, W] (group b's samples in rows b*K .. b*K+K-1) -> rows [B*(K+1), W]
  with prompts[b] + answers[b] + EOS after group b's samples; also the number cut."""
  b, width = len(prompts), tokens.shape[1]
  rows = np.full((b, width), pad_id, tokens.dtype)
  y_starts, y_ends, y_finished, cut = [], [], [], 0
  for i, (p, a) in enumerate(zip(prompts, answers)):
    body = list(a) + [eos_id]
    if len(body) > n:
      body, cut = body[:n], cut + 1
    row = list(p) + body
    rows[i, :len(row)] = row
    y_starts.append(len(p))
    y_ends.append(len(row))
    y_finished.append(body[-1] == eos_id)
  group = lambda x, y: np.concatenate([np.asarray(x).reshape(b, k, *np.shape(x)[1:]),
                                       np.asarray(y, np.asarray(x).dtype)[:, None]],
                                      axis=1).reshape(b * (k + 1), *np.shape(x)[1:])
  return (group(tokens, rows), group(starts, y_starts), group(ends, y_ends),
          group(finished, y_finished), cut)
