"""The online policy role: a rollout (K sampled responses per prompt, scored) -> `Logps`
with per-token policy, old-policy and reference log-probs and one advantage per response.

Two kinds of loss run under it. A policy-gradient loss (`role="online"`: grpo, dapo, gspo,
...) reads the whole group. A pairwise loss of the offline registry (`dpo`, `ipo`, `simpo`,
...) runs on-policy through the pair rule: each group's best and worst responses become a
(chosen, rejected) pair, so its forward pass is the offline policy role's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref.models.logps import LogpsOptions, token_logps
from jaxpref.train import game_rollouts, ppo, refine
from jaxpref.train.reference import Reference
from jaxpref.train.roles import policy
from jaxpref.types import GroupBatch, Logps


def pairwise(cfg) -> bool:
  """The loss is an offline pairwise one, trained on each group's best-vs-worst pair."""
  return cfg.loss_spec.role == "policy"


def needs_reference(cfg) -> bool:
  """A pairwise loss always reads the reference; a policy-gradient loss only for its KL."""
  if pairwise(cfg) or ppo.uses_values(cfg):  # PPO: the KL to the reference is in its reward
    return True
  if game_rollouts.opponent(cfg):  # Nash-MD's mixture and XPO's samples come from it
    return True
  return float(cfg.loss_spec.value("beta", 0.0)) > 0


def forward(graphdef: nnx.GraphDef, needs: Any = False, opts: LogpsOptions = LogpsOptions(),
            lora_scale: float | None = None):
  """`fn(params, ref, batch) -> Logps` for a policy-gradient loss: the policy's per-token
  log-probs, the reference's (when the run keeps one) and the rollout's old log-probs and
  advantages, all [B, K, T] / [B, K]."""
  del needs  # a policy-gradient loss always reads the per-token log-probs

  def fn(params, ref: Reference, batch: GroupBatch) -> Logps:
    pol = token_logps(graphdef, ref.policy(params, lora_scale), batch, opts)
    ref_tok = (None if ref.model is None else
               jax.lax.stop_gradient(token_logps(graphdef, ref.model, batch, opts)))
    zeros = jnp.zeros(pol.shape[:2], jnp.float32)
    return Logps(policy=pol.sum(-1), ref=zeros if ref_tok is None else ref_tok.sum(-1),
                 length=batch.loss_mask.sum(-1), valid=batch.valid, weight=batch.weight,
                 scores=batch.scores, policy_tok=pol, ref_tok=ref_tok, mask=batch.loss_mask,
                 old_tok=batch.old_tok, advantages=batch.advantages)

  return fn


def init(cfg, mesh, optimizer):
  """The offline policy's state and reference; no reference model when nothing reads it."""
  graphdef, state, ref = policy.init(cfg, mesh, optimizer)
  if not needs_reference(cfg):
    ref = Reference("none", None, base=ref.base)
  if ppo.uses_values(cfg):  # the KL controller's coefficient, checkpointed with the state
    state = ppo.with_controller(state, cfg, mesh)
    if cfg.online.value_init:
      state = ppo.value_from_reward_model(state, cfg)
  return graphdef, state, ref


def check(cfg, *datasets) -> None:
  del datasets
  o = cfg.online
  if cfg.loss_spec.role not in ("online", "policy"):
    raise ValueError(f"--role=online trains a policy: --loss={cfg.loss} is a "
                     f"{cfg.loss_spec.role}-role loss")
  if pairwise(cfg) and cfg.loss_spec.member_fields:
    raise ValueError(f"--loss={cfg.loss} reads extra record fields "
                     f"({', '.join(cfg.loss_spec.member_fields)}), which rollouts do not have")
  if cfg.reference == "precomputed":
    raise ValueError("--reference=precomputed: an online run's responses are new every step; "
                     "use --reference=model")
  if cfg.ref_sync_every and cfg.rounds > 1:
    raise ValueError("--ref_sync_every and --rounds both refresh the reference; pick one")
  if cfg.rounds > 1 and cfg.steps % cfg.rounds:
    raise ValueError(f"--rounds={cfg.rounds} must divide --steps={cfg.steps}")
  if o.prompt_pool and o.prompt_pool < cfg.data.batch_size:
    raise ValueError(f"--online.prompt_pool={o.prompt_pool} must be 0 (off) or >= --batch_size="
                     f"{cfg.data.batch_size}: the batch is chosen from the pool")
  if o.prompt_priority not in ("gap", "gap_mean"):
    raise ValueError(f"--online.prompt_priority must be gap or gap_mean, got "
                     f"{o.prompt_priority!r}")
  if o.pairs not in ("best_worst", "ranked", "drift", "refine"):
    raise ValueError(f"--online.pairs must be best_worst, ranked, drift or refine, got "
                     f"{o.pairs!r}")
  if o.pairs in ("drift", "refine") and not pairwise(cfg):
    raise ValueError(f"--online.pairs={o.pairs} makes preference pairs for a pairwise loss; "
                     f"--loss={cfg.loss} is not one")
  if o.pairs == "refine":
    refine.check_template(o.refine_template)
    if o.refine_train not in refine.TRAIN:
      raise ValueError(f"--online.refine_train must be both or direct, got {o.refine_train!r}")
    if o.prompt_pool or game_rollouts.opponent(cfg):
      raise ValueError("--online.pairs=refine samples its own second set (refinements): it "
                       "does not combine with --online.prompt_pool or an opponent loss")
  if o.pairs == "ranked" and (not pairwise(cfg) or o.num_generations % 2):
    raise ValueError(f"--online.pairs=ranked pairs response i with i + K/2 for a pairwise loss: "
                     f"needs an even --online.num_generations (got {o.num_generations}) and a "
                     f"pairwise --loss (got {cfg.loss})")
  if pairwise(cfg) and o.num_generations < 2:
    raise ValueError(f"--loss={cfg.loss} trains on each group's best and worst response: "
                     f"--online.num_generations must be >= 2, got {o.num_generations}")
  if o.extrapolation_lr < 0 or (o.extrapolation_lr and
                                game_rollouts.opponent(cfg) != "extrapolated"):
    raise ValueError(f"--online.extrapolation_lr={o.extrapolation_lr} is EGPO's step (a) "
                     f"learning rate: >= 0, and only with --loss=egpo (got --loss={cfg.loss})")
  if o.num_generations < 1 or o.updates_per_rollout < 1 or o.eval_samples < 1:
    raise ValueError("--online.num_generations, updates_per_rollout and eval_samples must be "
                     ">= 1")
  if o.truncated not in ("keep", "mask", "penalize"):
    raise ValueError(f"--online.truncated must be keep, mask or penalize, got {o.truncated!r}")
  if not (o.reward or o.reward_fn):
    raise ValueError("--role=online needs a reward: --online.reward_fn=FILE.py:name and/or "
                     "--online.reward=SPEC (docs/online.md)")
  if cfg.data.shared_prompt or cfg.data.batching != "pad":
    raise ValueError("--role=online lays out its own rollouts: --shared_prompt and "
                     "--batching=buckets|pack do not apply")
  game_rollouts.check(cfg)
  ppo.check(cfg)
  policy.check(cfg)


def probe_batch(cfg, pairs: bool) -> GroupBatch:
  """A zero rollout batch of the run's shapes (2 prompts), for tracing the loss."""
  k = 2 if pairs else game_rollouts.group_size(cfg)
  t = cfg.data.max_len + cfg.online.max_new_tokens
  z = np.zeros((2, k, t), np.float32)
  return GroupBatch(tokens=z.astype(np.int32), loss_mask=z, segment_ids=z.astype(np.int32),
                    valid=np.ones((2, k), bool), weight=np.ones(2, np.float32),
                    scores=np.zeros((2, k), np.float32),
                    advantages=None if pairs else np.zeros((2, k), np.float32))


def probe(batch, cfg) -> Logps:
  del batch  # the prompts' dataset has no group batch: the rollout's shapes stand in
  b = probe_batch(cfg, pairwise(cfg))
  if pairwise(cfg):
    return policy.probe_logps(b, cfg.loss_spec.needs)
  zeros = np.zeros(b.loss_mask.shape, np.float32)
  values = ppo.uses_values(cfg)
  ppo_fields = dict(values=zeros, old_values=zeros, adv_tok=zeros, returns=zeros) if values else {}
  return Logps(policy=zeros.sum(-1), ref=zeros.sum(-1), length=zeros.sum(-1), valid=b.valid,
               weight=b.weight, scores=b.scores, policy_tok=zeros,
               ref_tok=zeros if needs_reference(cfg) and not values else None, mask=zeros,
               old_tok=zeros, advantages=b.advantages, **ppo_fields)
