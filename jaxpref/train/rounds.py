"""Iterative rounds (`--rounds=R`): a fresh reference per round, and with
`--curriculum=policy_margin` train groups re-ranked by the model between rounds.

`--steps` is split into R equal rounds. At the first step of every round after the first:

1. with `--curriculum=policy_margin`, every train group is scored by the model as it stands
   (the end of the previous round) against the previous round's reference: the implicit DPO
   reward margin (log pi(first) - log ref(first)) - (log pi(last) - log ref(last)), first
   and last valid members (chosen and rejected for pairs). The scores are written to
   WORKDIR/rounds/round_R.npy and the round's stages are rebuilt from them (large margin,
   the easy groups, first unless `policy_margin:asc`); the round's batch stream starts
   again from stage 1 of its epoch 0;
2. the reference becomes the current policy: the TR-DPO sync of `loop.py` with alpha 1.

Round 1's policy is its reference, so every margin is 0: its stages are file order. Other
curricula keep their batch stream across rounds; only the reference is refreshed.

A resumed run loads the scores of the round it resumes in (never re-scores), so it sees the
batches it would have; `describe` puts the scheme in the order string checkpoints compare.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from jaxpref import paths
from jaxpref.data import batching, curriculum, grain_source
from jaxpref.data import passes
from jaxpref.parallel import sharding
from jaxpref.train.roles.policy import step_logps


def check(cfg, train_ds) -> None:
  """Start-up errors for --rounds and --curriculum=policy_margin."""
  model_field = bool(cfg.data.curriculum) and (
      curriculum.parse(cfg.data.curriculum)[0] in curriculum.MODEL_FIELDS)
  if cfg.rounds < 1:
    raise ValueError(f"--rounds must be >= 1, got {cfg.rounds}")
  if cfg.rounds == 1:
    if model_field:
      raise ValueError(f"--curriculum={cfg.data.curriculum} re-ranks the groups between "
                       "--rounds; with --rounds=1 every margin is 0 (policy == reference)")
    return
  why = ("--role=reward has no reference model" if cfg.role == "reward" else
         "--reference=precomputed stores one reference's log-probs, and each round has its own"
         if cfg.reference == "precomputed" else
         "--lora_rank: the reference is the frozen base" if cfg.lora is not None else
         "prepared (grain) data cannot be re-ranked yet; use the JSONL/Parquet files"
         if isinstance(train_ds, grain_source.PreparedDataset) else
         f"--steps={cfg.steps} is not a multiple of it (rounds are equal)"
         if cfg.steps % cfg.rounds else "")
  if why:
    raise ValueError(f"--rounds={cfg.rounds} replaces the reference every round: {why}")


def wrap(cfg, batcher):
  """The run's batcher: `batcher` itself unless --rounds > 1."""
  return batcher if cfg.rounds == 1 else RoundBatcher(batcher, cfg.rounds, cfg.steps)


class RoundBatcher:
  """A `batching.Batcher` per round: round r's batch `step` is its own batcher's batch
  `step - r * length` when the groups are re-ranked, the first batcher's `step` otherwise."""

  def __init__(self, base: batching.Batcher, rounds: int, steps: int):
    self.base, self.rounds, self.length = base, rounds, steps // rounds
    self.curriculum, self.shapes_seen = base.curriculum, base.shapes_seen
    spec = base.curriculum.spec if base.curriculum is not None else ""
    self.rescore = spec.partition(":")[0] in curriculum.MODEL_FIELDS
    self.batchers = {0: base}

  @property
  def rows(self) -> int:
    return self.base.rows

  def round_of(self, step: int) -> int:
    return min(step // self.length, self.rounds - 1)

  def set_scores(self, r: int, scores: np.ndarray) -> curriculum.Curriculum:
    """Round r's stages from its groups' scores (in the base curriculum's direction)."""
    b, c = self.base, self.base.curriculum
    order = curriculum.Curriculum(scores, len(c.stages), c.spec.endswith(":desc"), c.seed, c.spec)
    self.batchers[r] = batching.Batcher(b.ds, b.batch_size, b.seed, b.mode, b.multiple,
                                        b.window, b.m, order)
    self.batchers[r].shapes_seen = self.shapes_seen
    return order

  def batch(self, step: int, rows: slice = slice(None)):
    if not self.rescore:
      out = self.base.batch(step, rows)
      self.last_indices = self.base.last_indices
      return out
    r = self.round_of(step)
    if r not in self.batchers:
      raise RuntimeError(f"round {r + 1}'s scores are not set (Rounds.begin runs first)")
    out = self.batchers[r].batch(step - r * self.length, rows)
    self.last_indices = self.batchers[r].last_indices
    return out

  def estimate(self, steps: int) -> tuple[float, int]:
    return self.base.estimate(steps)

  def describe(self) -> str:
    return f"{self.base.describe()},rounds={self.rounds}x{self.length}"


def margins(logratio: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """float64[N]: log-ratio (policy - reference) of the first minus the last valid member."""
  lr = np.asarray(logratio, np.float64)
  last = np.maximum(np.asarray(valid).sum(1) - 1, 0)
  return lr[:, 0] - lr[np.arange(len(lr)), last]


def score(graphdef, params, ref_params, ds, batch_size: int, put: Callable, mesh,
          opts) -> np.ndarray:
  """The implicit reward margins of every group of `ds` (float64[N]), in eval-sized
  batches sharded like evaluation, from the train step's own log-probs (`step_logps`)."""
  def fn(p, r, batch):
    lp = step_logps(graphdef, p, r, batch, False, opts)
    return lp.policy - lp.ref, lp.valid
  forward = jax.jit(sharding.in_mesh(fn, mesh))
  logratio, valid = passes.map_batches(lambda b: forward(params, ref_params, b), ds,
                                       batch_size, put)
  return margins(logratio, valid)


class Rounds:
  """Drives the rounds of one run; `begin(step, ...)` is called before every train step."""

  def __init__(self, cfg, batcher, graphdef, ds, put: Callable, mesh, say: Callable,
               start: int):
    self.cfg, self.batcher, self.graphdef, self.ds = cfg, batcher, graphdef, ds
    self.put, self.mesh, self.say, self.start = put, mesh, say, start
    self.folder = paths.join(cfg.workdir, "rounds")

  def path(self, r: int) -> str:
    return paths.join(self.folder, f"round_{r + 1}.npy")

  def begin(self, step: int, params, ref_params, sync: Callable):
    """The reference for train step `step`: at a round's first step, the policy (and the
    groups re-ranked first); resuming inside a round, the round's stored scores are loaded."""
    if not isinstance(self.batcher, RoundBatcher):
      return ref_params
    r, local = divmod(step, self.batcher.length)
    boundary = 0 < r < self.batcher.rounds and local == 0
    if self.batcher.rescore and r > 0 and r not in self.batcher.batchers and (
        boundary or step == self.start):
      self._rerank(r, params, ref_params, may_compute=boundary)
    if boundary:
      ref_params = sync(params, ref_params, 1.0)
      self.say(f"round {r + 1}/{self.batcher.rounds} from step {step}: reference <- policy")
    return ref_params

  def _rerank(self, r: int, params, ref_params, may_compute: bool) -> None:
    path = self.path(r)
    if paths.exists(path):
      with paths.open(path, "rb") as f:
        scores, how = np.load(f), f"loaded from {path}"
      if scores.shape != (self.ds.n,):
        raise ValueError(f"{path} holds {scores.shape} scores; the train data has {self.ds.n} "
                         "groups (the data changed since the run started?)")
    elif may_compute:
      scores = score(self.graphdef, params, ref_params, self.ds, self.cfg.data.eval_batch_size,
                     self.put, self.mesh, self.cfg.logps)
      how = "scored"
      if jax.process_index() == 0:
        paths.makedirs(self.folder)
        with paths.open(path + ".tmp.npy", "wb") as f:
          np.save(f, scores)
        paths.replace(path + ".tmp.npy", path)  # a kill mid-write leaves no half file
    else:
      raise ValueError(f"{self.cfg.workdir}: resuming inside round {r + 1}, but {path} (its "
                       "scores) is missing; the batches cannot be rebuilt")
    order = self.batcher.set_scores(r, scores)
    q = np.quantile(scores, [0.1, 0.5, 0.9])
    self.say(f"round {r + 1}/{self.batcher.rounds}: policy_margin of {self.ds.n} train groups "
             f"{how}: mean {scores.mean():.4f}, q10 {q[0]:.4f}, median {q[1]:.4f}, q90 "
             f"{q[2]:.4f}; {order.describe()}")
