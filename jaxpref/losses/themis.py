"""Themis: a tool-augmented reward model trained with an LM loss beside BT (docs/reward_models.md#themis).

In the reward role (`--role=reward`, a scalar head) `RewardOutputs.policy` [B, 2] holds the rewards
of (chosen, rejected) and, because `themis` is registered with `needs_tokens`, the reward
step also puts the decoder's LM log-probs of every response token in `policy_tok` [B, 2, T]
with the response mask in `mask` (`jaxpref/train/roles/reward.py`): the prompt (Themis's
question) is never in the mask. Masking the tool observations inside a trajectory is not
supported (it would need the `<start_observation>` spans); the whole response counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.losses.registry import register
from jaxpref.losses.reward import _bt_result, _rewards

LM_ON = ("chosen", "both")


@register("themis", needs_tokens=True, role="reward", ranges={"tau": "> 0"})
def themis(lp, *, bt_weight: float = 0.5, tau: float = 1.0, lm_on: str = "chosen"):
  """Tool-augmented reward modeling (Themis, docs/reward_models.md#themis).

  l = NLL + bt_weight * mean_b[-logsig((r_w - r_l)/tau)], NLL the token-mean negative
  log-likelihood of the responses' tokens (the chosen trajectory, or both with
  lm_on="both") over the batch, each group weighted by its weight.
  """
  if lp.policy_tok is None or lp.mask is None:
    raise ValueError("themis reads per-token LM log-probs: run it with --role=reward, whose "
                     "step fills them for losses registered with needs_tokens")
  if lm_on not in LM_ON:
    raise ValueError(f"themis: lm_on must be one of {', '.join(LM_ON)}, got {lm_on!r}")
  r = _rewards(lp, "themis")
  members = 1 if lm_on == "chosen" else 2
  tok_w = lp.mask[:, :members] * lp.weight[:, None, None]  # [B, m, T]
  nll = jnp.sum(-lp.policy_tok[:, :members] * tok_w) / jnp.maximum(jnp.sum(tok_w), 1.0)
  per = -jax.nn.log_sigmoid((r[:, 0] - r[:, 1]) / tau)
  bt_loss, metrics = _bt_result(lp, per, r, tau, nll=nll)
  metrics["loss/bt"] = bt_loss
  return nll + bt_weight * bt_loss, metrics

