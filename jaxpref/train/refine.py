"""Self-refinement pairs (`--online.pairs=refine`): EVOLVE's and SPHERE's self-correction.

A step, per prompt x (docs/online.md#self-refinement-evolve-and-sphere):
  1. K first answers y0 ~ pi(.|x), scored by the run's reward;
  2. the group's worst first answer y- (the first one when they tie) is put back to the
     policy in a refinement prompt x' = `--online.refine_template` (with `{prompt}` and
     `{response}`), and K refinements y1 ~ pi(.|x') are sampled and scored as answers to x;
  3. y+ = the best of all 2K answers (first answers before refinements when they tie);
     the pairs are (y+ over y-) under x (the direct pair) and, with
     `--online.refine_train=both`, the same two responses under x' (the refinement pair:
     given its own weak answer, the policy learns to write the better one, not to repeat
     it). A group whose y+ scores no higher than y- has no preference and gets weight 0.
Any pairwise loss trains on the pairs; `--rounds` refreshes the reference between rounds.

Readings (both papers' method sections were not reachable, only their abstracts): EVOLVE
"strengthens the model's direct question-answering ability while simultaneously unlocking
its self-refinement potential", read here as the direct plus the refinement pair; SPHERE's
self-correction ("identify and rectify errors") as the direct pair alone (`refine_train=
direct`): the corrected answer over the flawed one it corrects. Neither paper's MCTS,
process reward or prompt wording is built.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxpref.types import GroupBatch

TRAIN = ("both", "direct")


def check_template(template: str) -> None:
  for field in ("{prompt}", "{response}"):
    if field not in template:
      raise ValueError(f"--online.refine_template={template!r} has no {field}: the refinement "
                       "prompt shows the policy the question and its own answer")


def prompt_text(template: str, prompt: str, response: str) -> str:
  return template.replace("{prompt}", prompt).replace("{response}", response)


def choose(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """From first-answer scores [B, K] and refinement scores [B, K]: (the refined answer's
  index in the first answers, y+'s index in the 2K answers (first answers 0..K-1, then the
  refinements), whether the group has a preference)."""
  worst = np.argmin(first, axis=1)
  both = np.concatenate([first, second], axis=1)
  best = np.argmax(both, axis=1)
  rows = np.arange(len(first))
  return worst, best, both[rows, best] > first[rows, worst]


def _row(prompt: list, response: list, width: int, pad_id: int):
  tokens = np.full(width, pad_id, np.int32)
  mask = np.zeros(width, np.float32)
  segs = np.zeros(width, np.int32)
  row = (list(prompt) + list(response))[:width]
  tokens[:len(row)] = row
  mask[len(prompt):len(row)] = 1.0
  segs[:len(row)] = 1
  return tokens, mask, segs


def pairs(prompts: list, refine_prompts: list, chosen: list, rejected: list,
          scores: np.ndarray, weight: np.ndarray, train: str, pad_id: int,
          width_multiple: int = 16) -> GroupBatch:
  """Pairs [R, 2, W]: row b the direct pair (prompts[b]; chosen[b] over rejected[b]); with
  `train="both"` row B + b the refinement pair under refine_prompts[b]. Responses are token
  lists with their EOS when they ended; W is the longest row rounded up to
  `width_multiple` (a few widths, so a few compiles). scores: [B, 2] (y+'s, y-'s)."""
  heads = list(prompts) + (list(refine_prompts) if train == "both" else [])
  n = len(prompts)
  longest = max(len(h) + max(len(chosen[i % n]), len(rejected[i % n]))
                for i, h in enumerate(heads))
  width = -(-longest // width_multiple) * width_multiple
  cols = [[_row(h, (chosen if m == 0 else rejected)[i % n], width, pad_id) for m in (0, 1)]
          for i, h in enumerate(heads)]
  field = lambda j: np.stack([np.stack([c[j] for c in pair]) for pair in cols])
  reps = len(heads) // n
  return GroupBatch(tokens=field(0), loss_mask=field(1), segment_ids=field(2),
                    valid=np.ones((len(heads), 2), bool),
                    weight=np.tile(np.asarray(weight, np.float32), reps),
                    scores=np.tile(np.asarray(scores, np.float32), (reps, 1)))


def _responses(tokens, starts, ends) -> list:
  return [tokens[i, starts[i]:ends[i]].tolist() for i in range(len(tokens))]


def refined(rollouts, params, ds, idx, first_texts, first_scores, k: int, temperature: float,
            rng, reward=None):
  """Step 2 for groups idx, from the first answers' texts ([B] groups of K, as `score`
  decoded them) and scores [B, K]: (the refined answers' rows in the first answers [B], the
  refinement prompts' ids, the refinements' (tokens, starts, ends, finished), their scores
  [B, K] as answers to the original prompts, and the seconds spent scoring them)."""
  o, tok = rollouts.o, rollouts.tok
  low = np.argmin(first_scores, axis=1)
  worst = low + np.arange(len(idx)) * k
  refine_ids = [tok.frame(tok.encode(prompt_text(o.refine_template, ds.texts[i], group[j])), [],
                          eos=False)[0] for i, group, j in zip(idx, first_texts, low)]
  out = rollouts.sample_ids(params, refine_ids, k, temperature, rng)
  t0 = time.perf_counter()
  scores, _, _ = rollouts.score(ds, idx, *out, k, reward)
  return worst, refine_ids, out, scores, time.perf_counter() - t0


def rollout(rollouts, params, ds, step: int) -> GroupBatch:
  """One step's refine pairs (steps 1-3 of the module docstring)."""
  cfg, o = rollouts.cfg, rollouts.o
  b, k = cfg.data.batch_size, o.num_generations
  idx = rollouts.last_indices = ds.indices(step, b, cfg.data.seed)
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 0), step)
  t0 = time.perf_counter()
  tokens, starts, ends, finished = rollouts.sample(params, ds, idx, k, o.temperature, rng)
  t1 = time.perf_counter()
  scores, _, texts = rollouts.score(ds, idx, tokens, starts, ends, finished, k)
  t2 = time.perf_counter()
  worst, refine_ids, second, second_scores, scoring = refined(
      rollouts, params, ds, idx, texts, scores, k, o.temperature, jax.random.fold_in(rng, 1))
  sampling = (t1 - t0) + (time.perf_counter() - t2 - scoring)
  _, best, prefer = choose(scores, second_scores)
  answers = _responses(tokens, starts, ends)
  refinements = _responses(second[0], second[1], second[2])
  rows = np.arange(b)
  chosen = [answers[g * k + j] if j < k else refinements[g * k + j - k]
            for g, j in zip(rows, best)]
  rejected = [answers[r] for r in worst]
  both = np.concatenate([scores, second_scores], axis=1)
  pair_scores = np.stack([both[rows, best], scores[rows, worst - rows * k]], axis=1)
  out = pairs([ds.ids[i] for i in idx], refine_ids, chosen, rejected, pair_scores,
              prefer.astype(np.float32), o.refine_train, rollouts.tok.pad_id)
  lengths = ends - starts
  rollouts.stats = {"reward/mean": float(scores.mean()), "reward/std": float(scores.std()),
                    "refine/reward_mean": float(second_scores.mean()),
                    # how often a refinement beats the answer it refines
                    "refine/improved_fraction": float(
                        (second_scores.max(axis=1) > pair_scores[:, 1]).mean()),
                    "refine/chosen_is_refinement": float((best >= k).mean()),
                    "groups/zero_variance_fraction": float(1 - prefer.mean()),
                    "length/mean": float(lengths.mean()), "length/max": float(lengths.max()),
                    "length/truncated_fraction": float(np.mean(~finished)),
                    "rollout/tokens_per_sec": float((lengths.sum() + (second[2] - second[1]).sum())
                                                    / max(sampling, 1e-9)),
                    "time/sample": sampling, "time/score": (t2 - t1) + scoring}
  return out
