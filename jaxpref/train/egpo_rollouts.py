"""EGPO's extragradient step inside the online loop (`--loss=egpo`; the loss is
jaxpref/losses/game.py's, docs/game_methods.md#egpo-online).

`Rollouts.__call__` hands its step here. The loop's update is the step's last part; this
file does the first two, on the host between jitted calls:
(a) K responses per prompt from pi_t (GRPO's key stream, so the pairs are GRPO's samples)
    and K opponent samples from pi_t (stream 2); the targets w_t[y] = mean over the
    opponents y'' of P(y beats y''); the loss's gradient g at theta_t on that batch, and
    theta_half = theta_t - lr g: plain SGD at the optimizer's current learning rate (or
    `--online.extrapolation_lr`), on a copy (no optimizer state is read or written but the
    schedule's step count);
(b) K fresh opponent samples from pi_{theta_half} (stream 3; under LoRA the merged
    weights, as every sampler call), and the targets w_half of the SAME policy responses.
The batch with w_half is the loop's: (c) its train step takes the gradient at theta_t and
applies the run's optimizer to theta_t; theta_half is dropped. Every key derives from
(--seed, step) and theta_half from the state, so a resumed run repeats the step exactly.

P(y beats y'') is Nash-MD's (game_rollouts.preference): sigmoid(r(y) - r(y'')) for scalar
rewards (each response scored once), a pairwise source's probability asked on each
(y, y'') pair alone (B K^2 questions per target set).
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax

from jaxpref.train import game_rollouts as game
from jaxpref.types import GroupBatch


class Extrapolation:
  """What step (a) needs beyond a rollout: the state, the loss's gradient, the schedule.

  state_fn() -> the `TrainState` at theta_t; ref_fn() -> the run's `Reference`;
  sampling_params(params, ref) -> the weights the sampler reads; put(host batch) -> the
  batch on the mesh."""

  def __init__(self, cfg, forward, schedule, state_fn, ref_fn, sampling_params, put):
    loss_fn = cfg.loss_spec.fn
    self.grad = jax.jit(jax.grad(lambda p, ref, b: loss_fn(forward(p, ref, b))[0]))
    self.sgd = jax.jit(lambda p, g, lr: jax.tree.map(lambda x, y: (x - lr * y).astype(x.dtype),
                                                     p, g))
    self.schedule, self.state_fn, self.ref_fn = schedule, state_fn, ref_fn
    self.sampling_params, self.put = sampling_params, put
    self.fixed_lr = cfg.online.extrapolation_lr  # > 0: step (a)'s own learning rate
    self.first_batch = None  # step (a)'s batch (targets w_t), kept for inspection

  def learning_rate(self, state) -> float:
    """The schedule at the optimizer's own count (a skipped update does not advance it)."""
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)
    counts = [s.count for s in jax.tree.leaves(state.opt_state, is_leaf=is_sched)
              if is_sched(s)]
    count = counts[0] if counts else state.step
    return float(self.schedule(np.max(jax.device_get(count))))

  def half(self, batch: GroupBatch):
    """(theta_half's sampling weights, lr): one SGD step from theta_t on `batch`."""
    state, ref = self.state_fn(), self.ref_fn()
    grads = self.grad(state.params, ref, self.put(batch))
    lr = self.fixed_lr or self.learning_rate(state)
    return self.sampling_params(self.sgd(state.params, grads, lr), ref), lr


def _win_rates(r, prompts, pol_texts, pol_scores, opp, b: int, k: int, pairwise: bool):
  """(w [B, K], the opponents' scores or None): w[j, i] = mean over opponent samples of
  P(response i beats it)."""
  opp_texts = r.decode(*opp[:3])
  if pairwise:
    groups = [[pol_texts[j * k + i], opp_texts[j * k + m]]
              for j in range(b) for i in range(k) for m in range(k)]
    lengths = np.stack([np.repeat(pol_scores[1], k), np.tile((opp[2] - opp[1]).reshape(b, k),
                                                             (1, k)).reshape(-1)], 1)
    truncated = ~np.stack([np.repeat(pol_scores[2], k), np.tile(opp[3].reshape(b, k),
                                                                (1, k)).reshape(-1)], 1)
    scores, _ = game._score(r, [prompts[n // (k * k)] for n in range(b * k * k)], groups,
                            lengths, truncated)
    total_weight = sum(w for w, _, _, _ in r.reward.terms)
    p = game.preference(scores, True, total_weight)
    return p.reshape(b, k, k).mean(-1), None
  opp_scores, _ = game._score(r, prompts, [opp_texts[j * k:(j + 1) * k] for j in range(b)],
                              (opp[2] - opp[1]).reshape(b, k), ~opp[3].reshape(b, k))
  pairs = np.stack(np.broadcast_arrays(pol_scores[0][:, :, None], opp_scores[:, None, :]), -1)
  p = game.preference(pairs.reshape(-1, 2), False, 1.0)  # [B K (policy) K (opponents)]
  return p.reshape(b, k, k).mean(-1), opp_scores


def rollout(r, params, ds, step: int) -> GroupBatch:
  """One EGPO step's batch: the policy's K responses [B, K, T] with `scores` = w_half."""
  cfg, o, ext = r.cfg, r.o, r.egpo
  b, k = cfg.data.batch_size, o.num_generations
  idx = r.last_indices = ds.indices(step, b, cfg.data.seed)
  if getattr(r, "self_judge", None) is not None:  # a self-judging run: the sampling weights
    r.self_judge.lm.params = params
  key = lambda stream: jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), stream),
                                          step)
  t0 = time.perf_counter()
  pol = game._generate(r, params, ds, idx, k, key(0))
  opp = game._generate(r, params, ds, idx, k, key(2))
  t1 = time.perf_counter()
  prompts = [ds.texts[i] for i in idx]
  texts = r.decode(*pol[:3])
  n_pol = pol[2] - pol[1]
  pairwise = game._pairwise(r.reward)
  if pairwise:  # no score of its own: lengths and truncation, for the pairs' scoring
    own = (None, n_pol, pol[3])
  else:
    total, parts = game._score(r, prompts, [texts[j * k:(j + 1) * k] for j in range(b)],
                               n_pol.reshape(b, k), ~pol[3].reshape(b, k))
    own = (total, n_pol, pol[3])
  w_t, _ = _win_rates(r, prompts, texts, own, opp, b, k, pairwise)
  t2 = time.perf_counter()
  tokens, mask, segs = game._rows(*pol[:3])
  valid = np.ones((b, k), bool)
  if o.truncated == "mask":
    valid &= pol[3].reshape(b, k)
    mask = mask * valid.reshape(-1, 1)
  shape = lambda x: x.reshape(b, k, -1)
  batch = lambda w: GroupBatch(tokens=shape(tokens), loss_mask=shape(mask),
                               segment_ids=shape(segs), valid=valid,
                               weight=np.ones(b, np.float32), scores=w.astype(np.float32))
  ext.first_batch = batch(w_t)
  half_params, lr = ext.half(ext.first_batch)
  t3 = time.perf_counter()
  opp_half = game._generate(r, half_params, ds, idx, k, key(3))
  del half_params
  t4 = time.perf_counter()
  w_half, opp_scores = _win_rates(r, prompts, texts, own, opp_half, b, k, pairwise)
  t5 = time.perf_counter()
  n_opp = opp_half[2] - opp_half[1]
  r.stats = {"egpo/target_shift": float(np.mean(np.abs(w_half - w_t)[valid])) if valid.any()
             else 0.0,
             "egpo/extrapolation_lr": lr, "egpo/win_rate_t": float(w_t.mean()),
             "egpo/win_rate_half": float(w_half.mean()), "time/extrapolate": t3 - t2,
             "length/mean": float(n_pol.mean()), "length/max": float(n_pol.max()),
             "length/truncated_fraction": float(np.mean(~pol[3])),
             "rollout/tokens_per_sec": float(n_pol.sum() + n_opp.sum() + (opp[2] - opp[1]).sum())
             / max(t1 - t0 + t4 - t3, 1e-9),
             "time/sample": t1 - t0 + t4 - t3, "time/score": t2 - t1 + t5 - t4}
  if pairwise:
    r.stats["reward/mean"] = float(w_half.mean())
  else:
    r.stats.update({"reward/mean": float(own[0].mean()), "reward/std": float(own[0].std()),
                    "reward/opponent_mean": float(opp_scores.mean()),
                    **{f"reward/{name}": float(np.mean(v)) for name, v in parts.items()
                       if len(parts) > 1}})
  return batch(w_half)
