"""The online role's `Program`: each loop step samples a rollout from the current policy,
scores it, and takes `--online.updates_per_rollout` optimizer steps on it.

Step s: prompts `batch_indices(s)`; K samples each from the sharded KV-cache sampler with
the key `fold_in(key(seed), s)` (so a resumed run samples the same tokens); the reward
sources score the decoded responses; an advantage estimator (or, for a pairwise loss, the
pair rule) turns scores into what the loss reads; then one jitted call runs the updates,
the rollout's old log-probs computed first and held fixed. Held-out evaluation samples the
eval prompts and reports their mean reward (a verifier's accuracy).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref import cli_errors
from jaxpref.data import shared_prompt
from jaxpref.losses import advantages as adv_lib
from jaxpref.models import sampler
from jaxpref.models.logps import token_logps
from jaxpref.parallel import distributed, mesh as mesh_lib, sharding
from jaxpref.rewards import rm_source, sources
from jaxpref.train import answers, drift, egpo_rollouts, game_rollouts, plots, ppo
from jaxpref.train import prompt_priority, refine
from jaxpref.train import step as step_lib
from jaxpref.train.optimizer import learning_rate_schedule, make_optimizer
from jaxpref.train.program import Program
from jaxpref.train.roles import online as role
from jaxpref.train.roles import forward as role_forward
from jaxpref.train.setup import say
from jaxpref.train.state import init_state
from jaxpref.types import GroupBatch



class Rollouts:
  """Samples, decodes and scores groups of K responses to a batch of prompts."""

  def __init__(self, cfg, s, graphdef, mesh):
    self.cfg, self.o, self.tok, self.mesh = cfg, cfg.online, s.tokenizer, mesh
    self.graphdef = graphdef
    o = cfg.online  # jaxpref-generate samples without a reward
    self.reward = (rm_source.for_online(o, s.tokenizer, say, policy_graphdef=graphdef,
                                        policy_max_len=cfg.model.max_len)
                   if o.reward or o.reward_fn else None)
    # OSP's self-judging: the judge reads the weights that sampled the rollout.
    self.self_judge = (self.reward.ctx["judge"] if self.reward is not None and
                       o.judge_model == rm_source.SELF else None)
    # Held-out samples may be scored by another reward (a verifier, while a judge trains).
    self.eval_reward = (sources.build(o.eval_reward, reward_fn=o.reward_fn, ctx=self.reward.ctx)
                        if o.eval_reward and self.reward is not None else self.reward)
    self.buckets = tuple(sorted(int(b) for b in cfg.online.prompt_buckets.split(",") if b))
    self.packs = packs(cfg, mesh)
    self.stats: dict = {}
    self.egpo = None  # EGPO's extrapolation (egpo_rollouts.Extrapolation), set by `program`

  def sample(self, params, ds, idx, k: int, temperature: float, rng):
    """(tokens int32[B*K, P+N], prompt lengths [B*K], lengths [B*K], finished [B*K])."""
    if self.self_judge is not None:
      self.self_judge.lm.params = params
    prompt, lengths = ds.padded(idx, self.buckets, self.tok.pad_id)
    return self._generate(params, prompt, lengths, k, temperature, rng)

  def sample_ids(self, params, ids: list, k: int, temperature: float, rng):
    """`sample` for prompts given as token lists (BOS + prompt): refinement prompts."""
    lengths = np.array([len(x) for x in ids], np.int32)
    p = next((b for b in self.buckets if b >= lengths.max()), int(lengths.max()))
    prompt = np.full((len(ids), p), self.tok.pad_id, np.int32)
    for row, x in enumerate(ids):
      prompt[row, :len(x)] = x
    return self._generate(params, prompt, lengths, k, temperature, rng)

  def _generate(self, params, prompt, lengths, k: int, temperature: float, rng):
    o = self.o
    out = sampler.generate((self.graphdef, params), prompt, lengths,
                           max_new_tokens=o.max_new_tokens, temperature=temperature,
                           top_k=o.top_k, top_p=o.top_p, stop_tokens=(self.tok.eos_id,),
                           pad_id=self.tok.pad_id, rng=rng, mesh=self.mesh,
                           vocab_size=self.tok.vocab_size, num_samples=k)
    tokens, ends, finished = jax.device_get((out.tokens, out.lengths, out.finished))
    return np.asarray(tokens), np.repeat(lengths, k), np.asarray(ends), np.asarray(finished)

  def decode(self, tokens, starts, ends) -> list[str]:
    """The sampled responses as text, EOS dropped."""
    return [self.tok.decode([t for t in tokens[i, starts[i]:ends[i]].tolist()
                             if t != self.tok.eos_id]) for i in range(len(tokens))]

  def score(self, ds, idx, tokens, starts, ends, finished, k: int, reward=None):
    """float64[B, K] rewards of the decoded responses (EOS dropped) and their texts, under
    `reward` (default: the training reward)."""
    texts = self.decode(tokens, starts, ends)
    b = len(idx)
    responses = [texts[j * k:(j + 1) * k] for j in range(b)]
    lengths = (ends - starts).reshape(b, k)
    total, parts = (reward or self.reward).parts(
        [ds.texts[i] for i in idx], responses, lengths=lengths,
        truncated=~finished.reshape(b, k), valid=np.ones((b, k), bool),
        max_new_tokens=self.o.max_new_tokens)
    return np.asarray(total, np.float64), parts, responses

  def __call__(self, params, ds, step: int) -> GroupBatch:
    cfg, o = self.cfg, self.o
    if self.egpo is not None:  # EGPO: targets against pi_t, then against pi_{theta_half}
      return egpo_rollouts.rollout(self, params, ds, step)
    if o.pairs == "refine":  # EVOLVE / SPHERE: the policy refines its worst answer
      return refine.rollout(self, params, ds, step)
    if game_rollouts.opponent(cfg):  # Nash-MD / XPO: a second set of samples
      return game_rollouts.rollout(self, params, self.reference().model, ds, step, pair_rule)
    b, k = cfg.data.batch_size, o.num_generations
    idx = self.last_indices = ds.indices(step, o.prompt_pool or b, cfg.data.seed)
    t0 = time.perf_counter()
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 0), step)
    tokens, starts, ends, finished = self.sample(params, ds, idx, k, o.temperature, rng)
    t1 = time.perf_counter()
    new_tokens = int((ends - starts).sum())
    extra = {}
    if ds.answers is not None:  # GRAO: the record's answer joins its group as member K
      tokens, starts, ends, finished, cut = answers.append(
          tokens, starts, ends, finished, [ds.ids[i] for i in idx], [ds.answers[i] for i in idx],
          k, o.max_new_tokens, self.tok.eos_id, self.tok.pad_id)
      k += 1
      extra["answers/cut"] = float(cut)
    scores, parts, _ = self.score(ds, idx, tokens, starts, ends, finished, k)
    t2 = time.perf_counter()
    pool = {}
    if o.prompt_pool:  # eva: train on the B prompts whose samples disagree most
      gaps = prompt_priority.spread(scores, o.prompt_priority)
      kept = prompt_priority.keep(scores, b, o.prompt_priority)
      pool = {"prompts/pool_spread": float(gaps.mean()), "prompts/kept_spread":
              float(gaps[kept].mean())}
      rows = prompt_priority.rows_of(kept, k)
      tokens, starts, ends, finished = tokens[rows], starts[rows], ends[rows], finished[rows]
      scores, idx = scores[kept], idx[kept]
      parts = {name: np.asarray(v)[kept] for name, v in parts.items()}
      self.last_indices = idx
    sampled = scores if ds.answers is None else scores[:, :-1]
    if ds.answers is not None:
      extra["answers/reward_mean"] = float(scores[:, -1].mean())
    self.stats = {"reward/mean": float(sampled.mean()), "reward/std": float(sampled.std()),
                  **{f"reward/{name}": float(np.mean(v)) for name, v in parts.items()
                     if len(parts) > 1}, **extra,
                  "length/mean": float((ends - starts).mean()),
                  "length/max": float((ends - starts).max()),
                  "length/truncated_fraction": float(np.mean(~finished)),
                  "rollout/tokens_per_sec": new_tokens / max(t1 - t0, 1e-9),
                  "time/sample": t1 - t0, "time/score": t2 - t1, **pool}
    if o.pairs == "drift":  # the kept prompts' own rejected responses
      self.drift_prompts = [ds.ids[i] for i in idx]
      self.drift_negatives = [ds.negatives[i] for i in idx]
    return self.layout(tokens, starts, ends, finished, scores, b, k)  # adds group stats

  def layout(self, tokens, starts, ends, finished, scores, b: int, k: int) -> GroupBatch:
    """The rollout as a `GroupBatch` [B, K, T]: the loss mask on each response's tokens
    (its EOS included), scores, and advantages (or the pair rule's best-vs-worst pairs)."""
    o, t = self.o, tokens.shape[1]
    pos = np.arange(t)[None, :]
    mask = ((pos >= starts[:, None]) & (pos < ends[:, None])).astype(np.float32)
    segs = (pos < ends[:, None]).astype(np.int32)
    valid = np.ones((b, k), bool)
    scores = scores.astype(np.float32).copy()
    truncated = ~finished.reshape(b, k)
    if o.truncated == "mask":  # no gradient through a response cut off mid-way
      valid &= ~truncated
      mask = mask * valid.reshape(-1, 1)
    elif o.truncated == "penalize":
      scores[truncated] = o.truncated_score
    weight = np.ones(b, np.float32)
    zero_var = np.asarray(adv_lib.zero_variance_groups(scores, valid))
    self.stats["groups/zero_variance_fraction"] = float(zero_var.mean())
    # No spread: no preference, no signal (DRIFT's negative comes from the data instead).
    if o.dynamic_sampling or (role.pairwise(self.cfg) and o.pairs != "drift"):
      weight = np.where(zero_var, 0.0, 1.0).astype(np.float32)
    shape = lambda x: x.reshape(b, k, t)
    batch = GroupBatch(tokens=shape(tokens.astype(np.int32)), loss_mask=shape(mask),
                       segment_ids=shape(segs), valid=valid, weight=weight, scores=scores)
    if role.pairwise(self.cfg) and o.pairs == "drift":
      out, cut = drift.pairs(batch, self.drift_prompts, self.drift_negatives, self.tok.eos_id,
                             self.tok.pad_id)
      self.stats["drift/negatives_cut"] = float(cut)
      return out
    if role.pairwise(self.cfg):
      return pair_rule(batch, o.pairs)
    kw = {"scale": o.advantage_scale} if o.advantage == "grpo" else {}
    a = np.asarray(adv_lib.compute(o.advantage, scores, valid & (weight > 0)[:, None], **kw))
    self.stats.update({"advantages/mean": float(a.mean()), "advantages/std": float(a.std())})
    batch = dataclasses.replace(batch, advantages=a.astype(np.float32))
    if not self.packs:
      return batch
    # One fixed shape (so one compile): the widest prompt bucket row holds the prompt
    # once, then K responses of at most max_new_tokens each.
    n = o.max_new_tokens
    return shared_prompt.pack(batch, length=t + (k - 1) * n, response_length=n)


PAIR_TEXT = {"best_worst": "each group's best-vs-worst pair",
             "ranked": "ranked pairs (i with i + K/2)",
             "drift": "the best sample against the record's rejected response",
             "refine": "the best answer or refinement against the refined answer"}


def pair_rule(batch: GroupBatch, rule: str = "best_worst") -> GroupBatch:
  """(chosen, rejected) pairs, K=2, from each group's valid responses.

  best_worst: the best and the worst response, one pair per group; a group whose scores
  all agree has no preference and gets weight 0. ranked (OSP's ranked pairs): the group
  sorted by score, response i paired with response i + K/2, K/2 pairs per group (row
  b * K/2 + i); a pair whose scores tie, or with an invalid member, gets weight 0."""
  s = np.where(batch.valid, batch.scores, np.nan)
  if rule == "best_worst":
    rows, first, second = np.arange(len(s)), np.nanargmax(s, axis=1), np.nanargmin(s, axis=1)
    weight = batch.weight
  elif rule == "ranked":
    b, k = s.shape
    order = np.argsort(np.where(np.isnan(s), np.inf, -s), axis=1, kind="stable")  # invalid last
    half = k // 2
    rows = np.repeat(np.arange(b), half)
    first, second = order[:, :half].reshape(-1), order[:, half:2 * half].reshape(-1)
    top, low = s[rows, first], s[rows, second]
    weight = (np.repeat(batch.weight, half) * (np.isfinite(top) & np.isfinite(low) & (top > low))
              ).astype(np.float32)
  else:
    raise ValueError(f"--online.pairs must be best_worst or ranked, got {rule!r}")
  pick = lambda x: np.stack([x[rows, first], x[rows, second]], axis=1)
  return GroupBatch(tokens=pick(batch.tokens), loss_mask=pick(batch.loss_mask),
                    segment_ids=pick(batch.segment_ids), valid=pick(batch.valid),
                    weight=weight, scores=pick(batch.scores))


def packs(cfg, mesh) -> bool:
  """Rollouts train in the shared-prompt layout (each prompt run once per group, the LM
  head on response tokens only) when `--online.shared_prompt` asks and the prompts divide
  over the mesh's batch axes (and `--grad_accum`'s micro-batches); a pairwise loss's
  best-vs-worst pairs keep the plain layout."""
  micro = cfg.data.batch_size // max(cfg.grad_accum, 1)
  return (cfg.online.shared_prompt and not role.pairwise(cfg) and not ppo.uses_values(cfg) and
          micro % mesh_lib.batch_axis_size(mesh) == 0)


def _with_old(batch, old):
  if isinstance(batch, shared_prompt.SharedPromptBatch):
    return dataclasses.replace(batch, group=dataclasses.replace(batch.group, old_tok=old))
  return dataclasses.replace(batch, old_tok=old)


def updates(cfg, graphdef, inner_train_step, lora_scale):
  """One rollout's `updates_per_rollout` optimizer steps as one function: the old
  log-probs are the policy's before the first update (on-policy with one update)."""
  if ppo.uses_values(cfg):  # PPO: GAE targets and the KL controller around the updates
    return ppo.updates(cfg, graphdef, inner_train_step, lora_scale)
  mu = cfg.online.updates_per_rollout

  def train_step(state, ref, batch):
    if mu > 1 and not role.pairwise(cfg):
      old = token_logps(graphdef, ref.policy(state.params, lora_scale), batch, cfg.logps)
      batch = _with_old(batch, jax.lax.stop_gradient(old))
    if mu == 1:
      return inner_train_step(state, ref, batch)
    state, metrics = jax.lax.scan(lambda st, _: inner_train_step(st, ref, batch), state,
                                  None, length=mu)
    return state, jax.tree.map(lambda m: m[-1], metrics)

  return train_step


def program(s) -> Program:
  cfg, mesh = s.cfg, s.mesh
  o = cfg.online
  # The schedule counts optimizer steps: updates_per_rollout per loop step.
  optimizer = make_optimizer(cfg.optim, cfg.steps * o.updates_per_rollout)
  graphdef, state, ref = init_state(cfg, mesh, optimizer)
  lora_scale = cfg.lora.scale if cfg.lora is not None else None
  inner, eval_step = step_lib.make_steps(role_forward(cfg, graphdef), cfg.loss_spec.fn,
                                         optimizer, grad_accum=cfg.grad_accum,
                                         grad_shardings=jax.tree.map(lambda x: x.sharding,
                                                                     state.params))
  train_step = sharding.keep_state_shardings(updates(cfg, graphdef, inner, lora_scale),
                                             state, mesh)
  rows = cfg.data.batch_size * (o.num_generations // 2 if o.pairs == "ranked" else
                                2 if o.pairs == "refine" and o.refine_train == "both" else 1)
  if role.pairwise(cfg) and rows % (mesh_lib.batch_axis_size(mesh) * max(cfg.grad_accum, 1)):
    raise ValueError(f"--online.pairs={o.pairs}: {rows} pairs per step do not divide over the "
                     f"mesh's batch axes ({mesh_lib.batch_axis_size(mesh)}) x --grad_accum="
                     f"{cfg.grad_accum}; change --batch_size")
  rollouts = Rollouts(cfg, s, graphdef, mesh)
  rollouts.reference = lambda: prog.ref  # Nash-MD's mixture and XPO sample from it
  batch_sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  # The weights the sampler reads: the adapters merged into the base under LoRA (one
  # jitted merge a step), else the trained params as they are.
  merge = jax.jit(lambda p, r: r.policy(p, lora_scale))
  policy_params = merge if lora_scale is not None else (lambda p, r: p)
  if game_rollouts.opponent(cfg) == "extrapolated":  # EGPO's step (a) needs the state
    rollouts.egpo = egpo_rollouts.Extrapolation(
        cfg, role_forward(cfg, graphdef),
        learning_rate_schedule(cfg.optim, cfg.steps * o.updates_per_rollout),
        lambda: prog.state, lambda: prog.ref, policy_params,
        lambda b: distributed.put_global(b, batch_sharding))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  say(f"model: preset {cfg.model_preset}, {n_params:,} parameters; mesh {dict(mesh.shape)}; "
      f"loss {cfg.loss_spec.describe()}"
      + (f" on {PAIR_TEXT[o.pairs]}" if role.pairwise(cfg) else
         f" against {game_rollouts.opponent(cfg)} samples" if game_rollouts.opponent(cfg) else
         f", advantages {o.advantage}") + f"; reference {ref.kind}; reward "
      + " + ".join(f"{w:g}*{label}" for w, label, _, _ in rollouts.reward.terms))
  timing = {"last": None}

  def batch(step):
    params = policy_params(prog.state.params, prog.ref)
    try:
      host = rollouts(params, s.train_ds, step)
    except sources.RewardError as e:
      raise cli_errors.RunError(f"step {step}: {e}") from e
    order.last_indices = rollouts.last_indices  # --log_records: the step's prompts
    return host, distributed.put_global(host, batch_sharding)

  def extra() -> dict:
    now, stats = time.perf_counter(), dict(rollouts.stats)
    if timing["last"] is not None:  # shares of the last logged step's wall time
      total = max(now - timing["last"], 1e-9) / max(cfg.log_every, 1)
      for part in ("sample", "score"):
        stats[f"time/{part}_share"] = stats.pop(f"time/{part}") / total
      stats["time/update_share"] = max(0.0, 1 - stats["time/sample_share"] -
                                       stats["time/score_share"])
    else:
      stats.pop("time/sample"), stats.pop("time/score")
    timing["last"] = now
    return stats

  def evaluate() -> list[dict]:
    ds = s.eval_ds
    params = policy_params(prog.state.params, prog.ref)
    rng = jax.random.fold_in(jax.random.key(cfg.seed), 1)  # its own stream, the same each eval
    idx = np.arange(ds.n)
    tokens, starts, ends, finished = rollouts.sample(params, ds, idx, o.eval_samples,
                                                     o.eval_temperature, rng)
    scores, parts, texts = rollouts.score(ds, idx, tokens, starts, ends, finished,
                                          o.eval_samples, rollouts.eval_reward)
    refined = {}
    if o.pairs == "refine":  # self-refinement at inference: one refinement of the worst answer
      again = refine.refined(rollouts, params, ds, idx, texts, scores, o.eval_samples,
                             o.eval_temperature, jax.random.fold_in(rng, 1),
                             rollouts.eval_reward)[3]
      refined = {"reward/refined": float(np.mean(again))}
    return [{"reward/mean": float(scores.mean()), "reward/std": float(scores.std()),
             **{f"reward/{name}": float(np.mean(v)) for name, v in parts.items()
                if len(parts) > 1}, **refined,
             "length/mean": float((ends - starts).mean()),
             "length/truncated_fraction": float(np.mean(~finished))}]

  order = _Order(cfg)
  prog = Program(cfg, mesh, graphdef, state, ref, train_step, eval_step, [order], batch,
                 lambda b: distributed.put_global(b, batch_sharding), [cfg.workdir],
                 evaluate=evaluate if s.eval_ds is not None else None, extra=extra,
                 panels=plots.ONLINE_PANELS)
  return prog


class _Order:
  """The rollouts' prompt order, as a batcher describes it (checked on resume)."""

  def __init__(self, cfg):
    self.text = (f"online prompts batch={cfg.data.batch_size} seed={cfg.data.seed} "
                 f"k={cfg.online.num_generations}")
    self.last_indices = None  # the prompts of the last rollout

  def describe(self) -> str:
    return self.text
