"""The pytrees that cross jaxpref's layer boundaries: `GroupBatch` and `Logps`.

Every preference method sees, per prompt, a group of K responses (docs/design.md). The
data layer produces a `GroupBatch`; a role's forward pass turns it into what its losses
read (`Logps` for the policy roles, `RewardOutputs` for reward and preference models); a
loss is a pure function of that. Optional fields are `None` (an empty pytree node), so one
structure serves pairs, ranked lists and unpaired data.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupBatch:
  """A batch of B groups of K tokenized sequences (prompt + response) of length T.

  Position conventions: `tokens[..., 0]` is BOS; `loss_mask[..., t] = 1` means token t is
  a response token (or the EOS ending the response) whose log-probability counts, i.e.
  the model's prediction of token t from tokens < t. `loss_mask[..., 0]` is always 0.
  """

  tokens: Array  # int32[B, K, T]
  loss_mask: Array  # float32[B, K, T]
  segment_ids: Array  # int32[B, K, T]; 1 on real tokens, 0 on padding (packing: 1, 2, ...)
  valid: Array  # bool[B, K]; False for a padded group member
  weight: Array  # float32[B]; per-group weight (1 by default, 0 for a padded group)
  scores: Optional[Array] = None  # float32[B, K]; higher is better
  label: Optional[Array] = None  # int32[B, K]; desirability for unpaired data
  ref_logps: Optional[Array] = None  # float32[B, K]; precomputed reference sequence log-probs
  label_smoothing: Optional[Array] = None  # float32[B]; per-pair flip rate from the records
  source_logps: Optional[Array] = None  # float32[B, S, 2]; per source model (chosen, rejected)
  user: Optional[Array] = None  # int32[B]; the records' `user` id (PAL's per-user mixture)
  attribute_prefs: Optional[Array] = None  # float32[B, A]; +1 chosen / -1 rejected / 0 don't care
  # Online rollouts: one advantage per response, and the sampling policy's per-token
  # log-probs when a rollout is reused for several updates (None: on-policy, ratio 1).
  advantages: Optional[Array] = None  # float32[B, K]
  old_tok: Optional[Array] = None  # float32[B, K, T]
  # PPO (a loss that reads values): per-token whitened GAE advantages, the value head's V_t
  # at rollout time and GAE's returns A_t + V_t, computed once per rollout, no gradient.
  adv_tok: Optional[Array] = None  # float32[B, K, T]
  old_values: Optional[Array] = None  # float32[B, K, T]
  returns: Optional[Array] = None  # float32[B, K, T]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Logps:
  """What a policy loss may see (docs/design.md): log-probs and the group's metadata.

  `policy` and `ref` are sums over the loss mask of per-token log-probs. For pairs (K=2)
  index 0 is the chosen response and index 1 the rejected one.
  """

  policy: Array  # float32[B, K]
  ref: Array  # float32[B, K]
  length: Array  # float32[B, K]; number of masked tokens
  valid: Array  # bool[B, K]
  weight: Array  # float32[B]
  scores: Optional[Array] = None  # float32[B, K]
  label: Optional[Array] = None  # int32[B, K]
  policy_tok: Optional[Array] = None  # float32[B, K, T]
  ref_tok: Optional[Array] = None  # float32[B, K, T]
  mask: Optional[Array] = None  # float32[B, K, T]
  # Full-vocabulary term k_t = sum_v p_ref(v|t) (log p_pol(v|t) - log p_ref(v|t)) <= 0 per
  # token (minus the KL of the reference from the policy), 0 off the mask (SparsePO, MaPO).
  kl_tok: Optional[Array] = None  # float32[B, K, T]
  # Per-token mask inputs M: the learned mask network's M masks (SparsePO), or one
  # feature-mean activation per reference layer (MaPO); registry's `token_mask` says which.
  token_mask: Optional[Array] = None  # float32[B, K, T, M]
  label_smoothing: Optional[Array] = None  # float32[B]; per-pair flip rate, overrides the hparam
  source_logps: Optional[Array] = None  # float32[B, S, 2]; summed, per source model (infifpo)
  # Per response, sum over its tokens of log sum_v pi(v|t)^2 under the policy, no gradient
  # (WPO's weight alignment: log of the probability that two samples of pi agree at t).
  prob_sq: Optional[Array] = None  # float32[B, K]
  # The online role (rollouts in the loop): the sampling policy's per-token log-probs, held
  # fixed over the rollout's updates (PPO-style ratios), and one advantage per response.
  old_tok: Optional[Array] = None  # float32[B, K, T]
  advantages: Optional[Array] = None  # float32[B, K]
  # PPO (docs/online.md#ppo): the value head's current V_t (with gradient), and the
  # rollout's `adv_tok`, `old_values`, `returns` (GroupBatch's), all 0 off `mask`.
  values: Optional[Array] = None  # float32[B, K, T]
  old_values: Optional[Array] = None  # float32[B, K, T]
  adv_tok: Optional[Array] = None  # float32[B, K, T]
  returns: Optional[Array] = None  # float32[B, K, T]
  # Summed log-probs and count of each sequence's prompt tokens after BOS (the tokens off
  # the loss mask): TRL's ORPO NLL runs over prompt and response (`orpo`, nll="sequence").
  prompt_policy: Optional[Array] = None  # float32[B, K]
  prompt_length: Optional[Array] = None  # float32[B, K]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RewardOutputs:
  """What a reward or preference-model loss sees (the reward role): the head's outputs per
  response and the group's metadata. For pairs index 0 is the chosen response."""

  reward: Array  # float32[B, K]; a scalar head's reward (zeros for embedding heads)
  length: Array  # float32[B, K]; number of masked tokens
  valid: Array  # bool[B, K]
  weight: Array  # float32[B]
  scores: Optional[Array] = None  # float32[B, K]
  label: Optional[Array] = None  # int32[B, K]
  label_smoothing: Optional[Array] = None  # float32[B]
  # A preference embedding per response (GPM, attribute and PAL heads).
  embed: Optional[Array] = None  # float32[B, K, E]
  user: Optional[Array] = None  # int32[B], from the batch
  attribute_prefs: Optional[Array] = None  # float32[B, A], from the batch
  # A PAL head (--reward_head=pal) adds the prompt's K' prototype points g_k(x) and the
  # user's softmax mixture weights over them; `embed` then holds the item points f(y).
  prototypes: Optional[Array] = None  # float32[B, K', E]
  mixture: Optional[Array] = None  # float32[B, K']
  # A gated GPM head (--reward_head=gpm_gated) adds one eigenvalue lambda_b(x) >= 0 per
  # rotation block of `embed`, read from the prompt (docs/reward_models.md); None: all 1.
  gate: Optional[Array] = None  # float32[B, k]
  # The decoder's LM log-probs of every response, for losses that read them (Themis).
  policy_tok: Optional[Array] = None  # float32[B, K, T]
  mask: Optional[Array] = None  # float32[B, K, T]
