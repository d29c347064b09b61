"""Rollouts for the online losses that sample a second set of responses (Nash-MD, XPO;
jaxpref/losses/game.py, docs/game_methods.md#nash-md-and-xpo-online).

`Rollouts.__call__` hands its step here when the loss is one of `OPPONENT`. Per prompt:
K responses from the policy (the same key as every online rollout, so the policy's samples
are GRPO's), then the opponent's from their own key stream:
* `nash_md`: K responses from the geometric mixture pi^(1-m) pi_ref^m (m =
  `--online.mixture_coef`; the sampler runs both models each step), response i paired with
  the policy's i-th; the batch is the policy's K responses [B, K, T] with
  `scores` = P(y_i beats y'_i).
* `xpo`: one response from the reference; the pair rule picks the best and worst of the
  K + 1, and the batch is [chosen, rejected, reference sample] [B, 3, T].

P(y beats y') follows TRL: sigmoid(r(y) - r(y')) for scalar rewards (a reward function or
model), the source's own probability for a pairwise source (`judge`, `pref_rm`, or a
`sources.pairwise_source`), asked on the pair alone.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxpref.models import sampler
from jaxpref.types import GroupBatch

OPPONENT = {"nash_md": "mixture", "xpo": "reference", "egpo": "extrapolated"}  # egpo:
# egpo_rollouts.py (opponents from pi_t, then from the extrapolated pi_{theta_half})
PAIRWISE_SOURCES = ("judge", "pref_rm")


def opponent(cfg) -> str | None:
  """"mixture" / "reference" when the run's loss samples a second set, else None."""
  return OPPONENT.get(cfg.loss)


def group_size(cfg) -> int:
  """K of the batch the loss sees."""
  return 3 if opponent(cfg) == "reference" else cfg.online.num_generations


def check(cfg) -> None:
  if opponent(cfg) is None:
    if any(name in cfg.loss for name in OPPONENT):
      raise ValueError(f"--loss={cfg.loss}: nash_md, xpo and egpo sample their own "
                       "rollouts and combine with no other loss")
    return
  o = cfg.online
  if not 0.0 <= o.mixture_coef <= 1.0:
    raise ValueError(f"--online.mixture_coef must be in [0, 1], got {o.mixture_coef}")
  if o.updates_per_rollout != 1:
    raise ValueError(f"--loss={cfg.loss} is an on-policy update (no importance ratio): "
                     f"--online.updates_per_rollout must be 1, got {o.updates_per_rollout}")
  # Flags that reshape the plain rollout, which this one does not pass through.
  if getattr(o, "prompt_pool", 0):
    raise ValueError(f"--loss={cfg.loss} samples its own pairs: --online.prompt_pool does not "
                     "apply")
  if getattr(o, "pairs", "best_worst") != "best_worst":
    raise ValueError(f"--loss={cfg.loss} forms its own pairs: --online.pairs={o.pairs} does "
                     "not apply")


def _generate(r, params, ds, idx, k: int, rng, mix=None):
  """`Rollouts.sample` for another model or the mixture: (tokens, starts, ends, finished)."""
  prompt, lengths = ds.padded(idx, r.buckets, r.tok.pad_id)
  o = r.o
  out = sampler.generate((r.graphdef, params), prompt, lengths,
                         max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                         top_k=o.top_k, top_p=o.top_p, stop_tokens=(r.tok.eos_id,),
                         pad_id=r.tok.pad_id, rng=rng, mesh=r.mesh,
                         vocab_size=r.tok.vocab_size, num_samples=k, mix=mix)
  tokens, ends, finished = jax.device_get((out.tokens, out.lengths, out.finished))
  return np.asarray(tokens), np.repeat(lengths, k), np.asarray(ends), np.asarray(finished)


def _pairwise(reward) -> bool:
  """All terms pairwise (True), all scalar (False); a mix has no one preference."""
  kinds = {label in PAIRWISE_SOURCES or bool(getattr(fn, "pairwise", False))
           for _, label, fn, _ in reward.terms}
  if len(kinds) > 1:
    raise ValueError("nash_md, xpo and egpo read one preference P(y beats y'): the reward mixes "
                     "pairwise and scalar sources (" +
                     " + ".join(label for _, label, _, _ in reward.terms) + ")")
  return kinds.pop()


def preference(scores: np.ndarray, pairwise: bool, total_weight: float) -> np.ndarray:
  """P(first beats second) from scores [N, 2] of each pair scored alone: a pairwise source's
  (weighted) probability, or sigmoid of the scalar rewards' difference (TRL)."""
  if pairwise:
    return np.clip(scores[:, 0] / total_weight, 0.0, 1.0)
  return 1.0 / (1.0 + np.exp(-(scores[:, 0] - scores[:, 1])))


def _rows(tokens, starts, ends):
  pos = np.arange(tokens.shape[1])[None, :]
  mask = ((pos >= starts[:, None]) & (pos < ends[:, None])).astype(np.float32)
  return tokens.astype(np.int32), mask, (pos < ends[:, None]).astype(np.int32)


def _score(r, prompts, groups, lengths, truncated):
  total, parts = r.reward.parts(prompts, groups, lengths=lengths, truncated=truncated,
                                valid=np.ones(lengths.shape, bool),
                                max_new_tokens=r.o.max_new_tokens)
  total = np.asarray(total, np.float64).copy()
  if r.o.truncated == "penalize":  # TRL's missing_eos_penalty, as jaxpref's online rule
    total[truncated] = r.o.truncated_score
  return total, parts


def rollout(r, params, ref_params, ds, step: int, pair_rule) -> GroupBatch:
  """One step's rollout for `r.cfg.loss` in OPPONENT (r: the run's `Rollouts`)."""
  cfg, o = r.cfg, r.o
  b, k = cfg.data.batch_size, o.num_generations
  idx = r.last_indices = ds.indices(step, b, cfg.data.seed)
  t0 = time.perf_counter()
  if getattr(r, "self_judge", None) is not None:  # a self-judging run: the sampling weights
    r.self_judge.lm.params = params
  key = lambda stream: jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), stream),
                                          step)
  pol = _generate(r, params, ds, idx, k, key(0))
  if opponent(cfg) == "mixture":
    opp = _generate(r, params, ds, idx, k, key(2), mix=(ref_params, o.mixture_coef))
  else:
    opp = _generate(r, ref_params, ds, idx, 1, key(2))
  t1 = time.perf_counter()
  texts, opp_texts = r.decode(*pol[:3]), r.decode(*opp[:3])
  n_pol, n_opp = pol[2] - pol[1], opp[2] - opp[1]
  prompts = [ds.texts[i] for i in idx]
  if opponent(cfg) == "mixture":
    groups = [[a, c] for a, c in zip(texts, opp_texts)]  # row j = prompt j // K
    scores, parts = _score(r, [prompts[j // k] for j in range(b * k)], groups,
                           np.stack([n_pol, n_opp], 1), ~np.stack([pol[3], opp[3]], 1))
    total_weight = sum(w for w, _, _, _ in r.reward.terms)
    p = preference(scores, _pairwise(r.reward), total_weight)
    tokens, mask, segs = _rows(*pol[:3])
    valid = np.ones((b, k), bool)
    if o.truncated == "mask":
      valid &= pol[3].reshape(b, k)
      mask = mask * valid.reshape(-1, 1)
    shape = lambda x: x.reshape(b, k, -1)
    batch = GroupBatch(tokens=shape(tokens), loss_mask=shape(mask), segment_ids=shape(segs),
                       valid=valid, weight=np.ones(b, np.float32),
                       scores=p.reshape(b, k).astype(np.float32))
    own, other = scores[:, 0], scores[:, 1]
    extra = {"preference/mean": float(p.mean())}
  else:
    groups = [texts[j * k:(j + 1) * k] + [opp_texts[j]] for j in range(b)]
    lengths = np.concatenate([n_pol.reshape(b, k), n_opp.reshape(b, 1)], 1)
    truncated = ~np.concatenate([pol[3].reshape(b, k), opp[3].reshape(b, 1)], 1)
    scores, parts = _score(r, prompts, groups, lengths, truncated)
    rows = [_rows(*x[:3]) for x in (pol, opp)]
    cat = lambda i: np.concatenate([rows[0][i].reshape(b, k, -1), rows[1][i].reshape(b, 1, -1)],
                                   1)
    tokens, mask, segs = cat(0), cat(1), cat(2)
    valid = ~truncated if o.truncated == "mask" else np.ones((b, k + 1), bool)
    mask = mask * valid[..., None]
    # A group with no valid response: the pair rule still picks one (the loss drops it).
    none = ~valid.any(1)
    union = GroupBatch(tokens=tokens, loss_mask=mask, segment_ids=segs,
                       valid=valid | none[:, None], weight=np.ones(b, np.float32),
                       scores=scores.astype(np.float32))
    pair = pair_rule(union)
    cols = lambda x, last: np.concatenate([x, last[:, None]], 1)
    batch = GroupBatch(tokens=cols(pair.tokens, tokens[:, k]),
                       loss_mask=cols(pair.loss_mask, mask[:, k]),
                       segment_ids=cols(pair.segment_ids, segs[:, k]),
                       valid=cols(pair.valid & ~none[:, None], valid[:, k]),
                       weight=np.ones(b, np.float32), scores=cols(pair.scores, union.scores[:, k]))
    own, other = scores[:, :k], scores[:, k]
    chosen_ref = np.all(pair.tokens[:, 0] == tokens[:, k], axis=-1)
    extra = {"pairs/chosen_is_reference": float(chosen_ref.mean())}
  t2 = time.perf_counter()
  r.stats = {"reward/mean": float(np.mean(own)), "reward/std": float(np.std(own)),
             "reward/opponent_mean": float(np.mean(other)),
             **{f"reward/{name}": float(np.mean(v)) for name, v in parts.items()
                if len(parts) > 1},
             "length/mean": float(n_pol.mean()), "length/max": float(n_pol.max()),
             "length/truncated_fraction": float(np.mean(~pol[3])),
             "rollout/tokens_per_sec": float(n_pol.sum() + n_opp.sum()) / max(t1 - t0, 1e-9),
             "time/sample": t1 - t0, "time/score": t2 - t1, **extra}
  return batch
