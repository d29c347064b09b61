"""eva's prompt prioritisation for online rollouts (`--online.prompt_pool`).

eva ("Evolving Alignment via Asymmetric Self-Play") trains the solver on the prompts where
its samples disagree most: a prompt's informativeness is the spread of the rewards of its
K samples. With `--online.prompt_pool=M` each step samples K responses for M >= B prompts,
scores all of them, and keeps the B groups with the largest spread
(`--online.prompt_priority`): `gap` = max - min of the group's scores (eva's reward gap),
`gap_mean` = max - mean. Ties keep the earlier prompt; kept groups stay in pool order.

What is not built: eva's creator also *evolves* the prompts (an LLM rewrites the most
informative ones into new prompts); here the pool is the data's own prompts.
"""

from __future__ import annotations

import numpy as np

RULES = ("gap", "gap_mean")


def spread(scores: np.ndarray, rule: str) -> np.ndarray:
  """float64[M]: each group's informativeness from its scores [M, K]."""
  s = np.asarray(scores, np.float64)
  if rule == "gap":
    return s.max(axis=1) - s.min(axis=1)
  if rule == "gap_mean":
    return s.max(axis=1) - s.mean(axis=1)
  raise ValueError(f"--online.prompt_priority must be one of {', '.join(RULES)}, got {rule!r}")


def keep(scores: np.ndarray, n: int, rule: str) -> np.ndarray:
  """int[n]: the pool rows of the `n` most informative groups, in pool order."""
  order = np.argsort(-spread(scores, rule), kind="stable")
  return np.sort(order[:n])


def rows_of(groups: np.ndarray, k: int) -> np.ndarray:
  """The sample rows [len(groups) * K] of kept groups (group g's samples are g*K .. g*K+K-1)."""
  return (np.asarray(groups)[:, None] * k + np.arange(k)[None, :]).reshape(-1)
