"""Training from a prepared folder: seeded epochs, exact resume, a real run (the other
batchings, hosts and curricula: tests/data/test_grain_packing.py)."""

import json
import os

import numpy as np
import pytest

from loop_util import resume_copy, train_rows

from jaxpref.data import Tokenizer, batching, grain_source, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "jaxpref", "data", "tiny")
TOK = os.path.join(TINY, "tokenizer.model")
N_SMALL = 50


def _prepare(src, out, max_len=32):
  prepare.prepare(prepare.Job(src, "pairs", Tokenizer.load(TOK), max_len), out)
  return grain_source.PreparedDataset(out)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """The first 50 tiny pairs, prepared."""
  tmp = tmp_path_factory.mktemp("small")
  src = tmp / "small.jsonl"
  src.write_text("\n".join(open(f"{TINY}/train.jsonl").read().splitlines()[:N_SMALL]) + "\n")
  return _prepare(str(src), str(tmp / "prepared"))


def _indices(batcher, steps, start=0):
  out = []
  for step in range(start, start + steps):
    batcher.batch(step, batching.host_rows(batcher.rows, batcher.process_index,
                                           batcher.process_count))
    out.append(batcher.last_indices.copy())
  return np.stack(out)


def test_seeded_order(small):
  a, b = (_indices(grain_source.GrainBatcher(small, 10, seed=0), 10) for _ in range(2))
  c = _indices(grain_source.GrainBatcher(small, 10, seed=1), 10)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert sorted(a[:5].ravel()) == list(range(N_SMALL))  # one process: the whole epoch


def test_batches_are_the_stored_groups(small):
  b = grain_source.GrainBatcher(small, 8, seed=0)
  got = b.batch(0)
  want = small.batch(b.last_indices)
  for name in ("tokens", "loss_mask", "segment_ids", "valid", "weight"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
  assert got.tokens.shape == (8, 2, 32) and got.tokens.dtype == np.int32


def test_iterator_state_resumes_exactly(small):
  """State after 3 batches, restored into a fresh loader: batches 3..8 as uninterrupted."""
  full = _indices(grain_source.GrainBatcher(small, 8, seed=5), 9)
  first = grain_source.GrainBatcher(small, 8, seed=5)
  _indices(first, 3)
  state = first.iterator.get_state()
  fresh = grain_source.GrainBatcher(small, 8, seed=5)
  fresh.iterator.set_state(state)
  np.testing.assert_array_equal(_indices(fresh, 6, start=3), full[3:])


@pytest.mark.slow
def test_training_from_prepared_data_resumes_exactly(tmp_path):
  from jaxpref import models
  from jaxpref.train import loop
  from jaxpref.train.config import DataConfig, OptimConfig, RunConfig

  prepared = str(tmp_path / "prepared")
  _prepare(f"{TINY}/train.jsonl", prepared)
  cfg = RunConfig(
      workdir=str(tmp_path / "run"), model=models.get_config("tiny"),
      data=DataConfig(train_data=prepared, eval_data="", tokenizer=TOK, batch_size=16),
      loss="sft",  # the chosen responses' NLL: falls within a few steps, unlike DPO's
      optim=OptimConfig(learning_rate=3e-3, warmup_steps=0), steps=20, log_every=1,
      eval_every=20, checkpoint_every=5, keep_checkpoints=3, progress=False, plot=False,
      log_records=True)
  final = loop.run(cfg)
  want = train_rows(cfg.workdir)
  losses = np.array([want[s]["loss"] for s in range(1, 21)])
  assert np.isfinite(losses).all() and np.isfinite(final["loss"])
  assert losses[-5:].mean() < losses[:5].mean() - 0.5  # it learns
  state = json.load(open(f"{cfg.workdir}/checkpoints/10/data_iter/process_0-of-1.json"))
  assert state == {"next_index": 10}  # 10 batches consumed

  # Resume from step 10 in a fresh loop: the checkpoints after it are gone.
  resumed = str(tmp_path / "resumed")
  got = resume_copy(cfg, 10, resumed)
  assert sorted(got) == list(range(1, 21))
  np.testing.assert_allclose([got[s]["loss"] for s in range(11, 21)], losses[10:], atol=1e-6,
                             rtol=0)
  # Steps 11-20 were read again after the resume: the same groups, in the same rows.
  read = lambda w: [json.loads(line) for line in open(f"{w}/records/process_0.jsonl")]
  assert read(resumed) == read(cfg.workdir)
  assert [r["step"] for r in read(resumed)] == list(range(1, 21))
  assert sorted(g for r in read(resumed)[:3] for g in r["groups"]) != list(range(48))  # shuffled


def test_unsupported_options_are_clear_errors(small, tmp_path):
  from jaxpref import models
  from jaxpref.train import loop
  from jaxpref.train.config import DataConfig, RunConfig

  base = dict(train_data=small.path, eval_data="", tokenizer=TOK)
  for data, message in ((dict(shared_prompt=True), "--shared_prompt .*: not supported"),
                        (dict(max_len=64), "prepared with --max_len=32"),
                        (dict(format="unpaired"), "prepared with --format=pairs")):
    cfg = RunConfig(workdir=str(tmp_path / "w"), model=models.get_config("tiny"),
                    data=DataConfig(**base, **data), progress=False, plot=False)
    with pytest.raises(ValueError, match=message):
      loop.setup(cfg)
