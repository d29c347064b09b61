"""PPO in the online role (docs/online.md#ppo): what a loss that reads values (`ppo`) adds
around the rollout's updates.

Once per rollout, inside the jitted update call and before the first update: the
sampling policy's per-token log-probs and the value head's V_t (one pass), the
reference's log-probs, the KL-penalised per-token reward (`-kl_coef (lp - lp_ref)` on
every response token, the score added on the last), GAE(gamma, lam) advantages and
returns, and advantage whitening. Then `--online.updates_per_rollout` optimizer steps
with all of those held fixed, and the KL controller's next coefficient from the
rollout's mean per-sequence KL. The coefficient lives in the train state (`PPOState`),
so it is checkpointed with the policy and its value head and a resumed run continues
with exactly the coefficient it had.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref.cli_errors import FlagError
from jaxpref.data.tokenizer import Tokenizer
from jaxpref.losses import ppo as ppo_math
from jaxpref.models.logps import token_logps
from jaxpref.models import value_head
from jaxpref.models.value_head import token_logps_values
from jaxpref.rewards import loaded
from jaxpref.train.step import TrainState
from jaxpref.types import GroupBatch, Logps

sg = jax.lax.stop_gradient
WHITEN = {"batch": None, "row": -1}  # --online.whiten -> the axis `whiten` reduces over


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PPOState(TrainState):
  """The train state plus the KL controller's current coefficient."""
  kl_coef: jax.Array = None  # float32[], replicated


def uses_values(cfg) -> bool:
  """The run's loss reads a value function (`ppo`)."""
  return bool(getattr(cfg.loss_spec.needs, "values", False))


def check(cfg) -> None:
  """Start-up errors of the PPO flags (only when the loss reads values)."""
  o = cfg.online
  if o.value not in value_head.KINDS:
    raise ValueError(f"--online.value must be one of {', '.join(value_head.KINDS)}, got "
                     f"{o.value!r}")
  if not uses_values(cfg):
    return
  if o.value_init and o.value != "model":
    raise ValueError(f"--online.value_init={o.value_init} starts a separate value model; it "
                     f"needs --online.value=model, got --online.value={o.value}")
  if cfg.lora is not None:
    raise ValueError(f"--loss={cfg.loss} trains a value function held in the policy, which "
                     "--lora_rank would leave frozen in the LoRA base; train without LoRA")
  if cfg.reference != "model":
    raise ValueError(f"--loss={cfg.loss} puts the KL to the reference into the reward: it "
                     f"needs --reference=model, got --reference={cfg.reference}")
  for name, lo, hi in (("gamma", 0.0, 1.0), ("lam", 0.0, 1.0)):
    if not lo <= getattr(o, name) <= hi:
      raise ValueError(f"--online.{name} must be in [0, 1], got {getattr(o, name)}")
  if o.kl_coef < 0 or o.kl_target < 0 or o.kl_horizon <= 0:
    raise ValueError(f"--online.kl_coef and kl_target must be >= 0 and kl_horizon > 0, got "
                     f"{o.kl_coef}, {o.kl_target}, {o.kl_horizon}")
  if o.whiten not in (*WHITEN, "none"):
    raise ValueError(f"--online.whiten must be batch, row or none, got {o.whiten!r}")


def with_controller(state: TrainState, cfg, mesh) -> PPOState:
  """`state` with the KL controller's initial coefficient `--online.kl_coef`."""
  coef = jax.device_put(np.float32(cfg.online.kl_coef), NamedSharding(mesh, P()))
  return PPOState(step=state.step, params=state.params, opt_state=state.opt_state,
                  kl_coef=coef)


def value_from_reward_model(state: PPOState, cfg) -> PPOState:
  """`--online.value_init=PATH`: the value model's decoder and head replaced by those of
  a scalar reward model (a reward run folder or an HF sequence-classification folder) of
  the policy's architecture and tokenizer (it reads the policy's token ids); the head's
  bias starts at 0. As open-instruct and TRL initialise their value models."""
  flag = f"--online.value_init={cfg.online.value_init}"
  rm = loaded.load_reward_model(cfg.online.value_init, "--online.value_init")
  if rm.kind != "scalar":
    raise FlagError(f"{flag}: a {rm.kind} model; the value model starts from a scalar reward "
                    "model (--reward_dim=1, a linear head)")
  policy_tok = Tokenizer.load(cfg.data.tokenizer)
  if rm.tok.vocab_size != policy_tok.vocab_size:
    raise FlagError(f"{flag}: its tokenizer has {rm.tok.vocab_size} ids, the policy's "
                    f"{policy_tok.vocab_size}; the value model reads the policy's tokens")
  pure, ours = nnx.to_pure_dict(rm.params), nnx.to_pure_dict(state.params)["value_model"]
  bias = np.zeros_like(ours["head"]["value_bias"])
  new = {"decoder": pure["decoder"], "head": {"value_proj": pure["head"], "value_bias": bias}}
  want = jax.tree_util.tree_flatten_with_path(ours)[0]
  got = jax.tree_util.tree_flatten_with_path(new)[0]
  if [k for k, _ in want] != [k for k, _ in got] or any(
      np.shape(a) != np.shape(b) for (_, a), (_, b) in zip(want, got)):
    diff = next((jax.tree_util.keystr(k) for (k, a), (j, b) in zip(want, got)
                 if k != j or np.shape(a) != np.shape(b)), "(the parameter lists differ)")
    raise FlagError(f"{flag}: its parameters do not fit the policy's architecture (first "
                    f"difference at {diff}); the value model has the policy's shapes")
  placed = jax.tree.map(lambda x, like: jax.device_put(np.asarray(x, like.dtype), like.sharding),
                        new, ours)
  nnx.replace_by_pure_dict(state.params, {"value_model": placed})
  return state


def forward(graphdef, opts, lora_scale=None):
  """`fn(params, ref, batch) -> Logps` for `ppo`: the policy's per-token log-probs and the
  value head's V_t from one pass (no reference pass: the KL is in the rollout's reward),
  and the rollout's targets from the batch."""

  def fn(params, ref, batch: GroupBatch) -> Logps:
    pol, values = token_logps_values(graphdef, ref.policy(params, lora_scale), batch, opts)
    zeros = jnp.zeros(pol.shape[:2], jnp.float32)
    return Logps(policy=pol.sum(-1), ref=zeros, length=batch.loss_mask.sum(-1),
                 valid=batch.valid, weight=batch.weight, scores=batch.scores, policy_tok=pol,
                 mask=batch.loss_mask, old_tok=batch.old_tok, advantages=batch.advantages,
                 values=values, old_values=batch.old_values, adv_tok=batch.adv_tok,
                 returns=batch.returns)

  return fn


def targets(scores, old_tok, ref_tok, old_values, on, kl_coef, gamma: float, lam: float,
            whiten: str):
  """(per-token rewards, raw GAE advantages, whitened advantages, returns), [B, K, T]:
  r_t = -kl_coef (old_t - ref_t) on the response tokens `on`, the score [B, K] added at
  the last; GAE(gamma, lam) with bootstrap 0 after the last token; `whiten` over the
  batch's response tokens ("batch"), each response's ("row") or not at all ("none")."""
  rewards = ppo_math.kl_penalised_rewards(scores, old_tok, ref_tok, on, kl_coef)
  raw, returns = ppo_math.gae(rewards, old_values, on, gamma, lam)
  adv = raw if whiten == "none" else ppo_math.whiten(raw, on, axis=WHITEN[whiten])
  return rewards, raw, adv, returns


def rollout_targets(graphdef, params, ref_params, batch: GroupBatch, o, opts, kl_coef):
  """The rollout's fixed PPO targets in `batch` (old_tok, old_values, adv_tok, returns)
  and their statistics: the mean per-sequence KL (the controller's input) and others."""
  if not isinstance(batch, GroupBatch):
    raise ValueError("PPO's rollout targets need the plain [B, K, T] layout, got "
                     f"{type(batch).__name__}")
  old_tok, old_v = sg(token_logps_values(graphdef, params, batch, opts))
  ref_tok = sg(token_logps(graphdef, ref_params, batch, opts))
  seq_w = batch.weight[:, None] * batch.valid.astype(jnp.float32)  # [B, K]
  mask = batch.loss_mask * seq_w[..., None]
  on = (mask > 0).astype(jnp.float32)
  rewards, raw, adv, returns = targets(batch.scores, old_tok, ref_tok, old_v, on, kl_coef,
                                       o.gamma, o.lam, o.whiten)
  n = jnp.maximum(jnp.sum(seq_w), 1e-8)
  tok = lambda x: jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1e-8)
  kl_seq = jnp.sum((old_tok - ref_tok) * on, -1)  # [B, K]: sum_t k1, the sequence's KL
  stats = {"kl/sequence_mean": jnp.sum(kl_seq * seq_w) / n,
           "ppo/kl_coef": jnp.asarray(kl_coef, jnp.float32),
           "ppo/reward_total": jnp.sum(jnp.sum(rewards, -1) * seq_w) / n,
           "ppo/returns_mean": tok(returns), "ppo/old_values_mean": tok(old_v),
           "ppo/advantages_raw_mean": tok(raw), "ppo/advantages_raw_std":
               jnp.sqrt(jnp.maximum(tok(raw ** 2) - tok(raw) ** 2, 0.0))}
  batch = dataclasses.replace(batch, old_tok=old_tok, old_values=old_v, adv_tok=adv,
                              returns=returns)
  return batch, stats, jnp.sum(seq_w > 0)


def next_kl_coef(o, kl_coef, kl, n_seqs):
  """The controller: fixed (`--online.kl_target=0`) or Ziegler et al.'s adaptive one."""
  if o.kl_target > 0:
    return ppo_math.adaptive_kl_coef(kl_coef, kl, target=o.kl_target, horizon=o.kl_horizon,
                                     n_steps=n_seqs).astype(jnp.float32)
  return ppo_math.fixed_kl_coef(kl_coef)


def updates(cfg, graphdef, inner_train_step, lora_scale):
  """One rollout's PPO: its targets computed once, `updates_per_rollout` optimizer steps
  on them (the metrics of the last), then the KL controller's step."""
  o, mu, opts = cfg.online, cfg.online.updates_per_rollout, cfg.logps

  def train_step(state: PPOState, ref, batch: GroupBatch):
    batch, stats, n_seqs = rollout_targets(graphdef, ref.policy(state.params, lora_scale),
                                           ref.model, batch, o, opts, state.kl_coef)
    inner = TrainState(step=state.step, params=state.params, opt_state=state.opt_state)
    if mu == 1:
      inner, metrics = inner_train_step(inner, ref, batch)
    else:
      inner, metrics = jax.lax.scan(lambda st, _: inner_train_step(st, ref, batch), inner,
                                    None, length=mu)
      metrics = jax.tree.map(lambda m: m[-1], metrics)
    coef = next_kl_coef(o, state.kl_coef, stats["kl/sequence_mean"], n_seqs)
    return PPOState(step=inner.step, params=inner.params, opt_state=inner.opt_state,
                    kl_coef=coef), {**metrics, **stats}

  return train_step
