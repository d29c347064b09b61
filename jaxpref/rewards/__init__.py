"""Model-based rewards as functions of (prompt, response) strings: CDR (docs/reward_models.md#cdr),
FLR and R^3 mixtures (docs/reward_models.md#flr, docs/reward_models.md#mixture), and a command that labels candidate responses into preference
pairs by one of them (`python -m jaxpref.rewards.label`)."""

from jaxpref.rewards.model_rewards import (LM, cdr, embed, flr, length_penalty, mixture,
                                           relevance, repetition_penalty, sequence_logps)

# Registered as reward sources on import: rm, pref_rm (rm_source.py), judge (judge.py).
from jaxpref.rewards import judge, rm_source  # noqa: E402,F401

__all__ = ["LM", "cdr", "embed", "flr", "length_penalty", "mixture", "relevance",
           "repetition_penalty", "sequence_logps"]
