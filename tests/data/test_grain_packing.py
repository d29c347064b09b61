"""Prepared folders with --batching=buckets|pack and --curriculum: the grain batches equal the
in-memory `Batcher`'s, hosts read disjoint rows that make the epoch, packing keeps the
Logps, the iterator state resumes exactly, and curricula come from the stored values."""

import json
import os

import jax
import numpy as np
import pytest

from loop_util import resume_copy, train_rows

from jaxpref.data import (PairDataset, Tokenizer, batching, curriculum, grain_source, prepare,
                          read_pairs)
from jaxpref.data.packing import PackedBatch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "jaxpref", "data", "tiny")
TOK = os.path.join(TINY, "tokenizer.model")
N = 50
# Batches of 10 groups: 5 per epoch of 50; a buckets window is one epoch; 2 packed blocks.
OPTS = {"pad": {}, "buckets": dict(multiple=8, window=5), "pack": dict(multiple=8, pack_groups=5)}


def _prepare(src, out):
  prepare.prepare(prepare.Job(src, "pairs", Tokenizer.load(TOK), 32, say=lambda m: None), out)
  return grain_source.PreparedDataset(out)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  """(prepared, in-memory) of the first 50 tiny pairs, max_len 32."""
  tmp = tmp_path_factory.mktemp("pairs")
  src = tmp / "small.jsonl"
  src.write_text("\n".join(open(f"{TINY}/train.jsonl").read().splitlines()[:N]) + "\n")
  records, _ = read_pairs(str(src))
  return _prepare(str(src), str(tmp / "prepared")), PairDataset(records, Tokenizer.load(TOK), 32)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
  """(prepared, in-memory) of 60 tiny pairs with scores whose gaps take 11 values."""
  tmp = tmp_path_factory.mktemp("scored")
  src = tmp / "scored.jsonl"
  with open(src, "w") as f:
    for i, line in enumerate(open(f"{TINY}/train.jsonl").read().splitlines()[:60]):
      f.write(json.dumps({**json.loads(line), "chosen_score": i * 7 % 11, "rejected_score": 0})
              + "\n")
  records, _ = read_pairs(str(src))
  return _prepare(str(src), str(tmp / "prepared")), PairDataset(records, Tokenizer.load(TOK), 32)


def _fields(batch) -> dict:
  if isinstance(batch, PackedBatch):
    names = ("tokens", "segment_ids", "positions", "pred_index", "targets", "loss_mask")
    return {**{n: getattr(batch, n) for n in names},
            "valid": batch.group.valid, "weight": batch.group.weight}
  return {n: getattr(batch, n) for n in ("tokens", "loss_mask", "segment_ids", "valid", "weight")}


def _assert_same(got, want, what):
  assert type(got) is type(want), what
  a, b = _fields(got), _fields(want)
  for name in a:
    assert np.shape(a[name]) == np.shape(b[name]), (what, name)
    np.testing.assert_array_equal(a[name], b[name], err_msg=f"{what}: {name}")


@pytest.mark.parametrize("mode", ["pad", "buckets", "pack"])
def test_batches_equal_the_in_memory_batcher(pairs, mode):
  prepared, ds = pairs
  grain = grain_source.GrainBatcher(prepared, 10, seed=4, mode=mode, **OPTS[mode])
  memory = batching.Batcher(ds, 10, seed=4, mode=mode, **OPTS[mode])
  for step in range(12):  # 5 batches per epoch: three epochs
    got = grain.batch(step)
    _assert_same(got, memory.batch(step), f"{mode} step {step}")
    np.testing.assert_array_equal(np.sort(grain.last_indices), np.sort(memory.plan(step)[0]))
  assert grain.estimate(12) == memory.estimate(12)
  shapes = grain.shapes_seen
  if mode == "pack":  # rows a multiple of 8, at most 5 groups' length
    assert all(s[0] == 2 and s[1] % 8 == 0 and s[1] <= 5 * 32 for s in shapes)
  elif mode == "buckets":
    assert all(s[1] % 8 == 0 and s[1] <= 32 for s in shapes) and len(shapes) > 1
  else:
    assert shapes == {(2, 32)}
  if mode != "pad":  # cutting and packing compute fewer tokens than padding to max_len
    pad = grain_source.GrainBatcher(prepared, 10, seed=4)
    assert grain.estimate(12)[0] > pad.estimate(12)[0] + 0.1


@pytest.mark.parametrize("mode", ["pad", "buckets", "pack"])
def test_two_hosts_read_disjoint_rows_that_make_each_epoch(pairs, mode):
  prepared, _ = pairs
  whole = grain_source.GrainBatcher(prepared, 10, seed=3, mode=mode, **OPTS[mode])
  hosts = [grain_source.GrainBatcher(prepared, 10, seed=3, process_index=i, process_count=2,
                                     mode=mode, **OPTS[mode]) for i in range(2)]
  read = [[], []]
  for step in range(10):  # two epochs of 5 batches (a buckets window is one epoch)
    want = whole.batch(step)
    parts = []
    for i, host in enumerate(hosts):
      parts.append(host.batch(step, batching.host_rows(host.rows, i, 2)))
      read[i].append(host.last_indices)
      assert len(set(host.last_indices)) == len(host.last_indices)
    for name, value in _fields(want).items():  # the hosts' rows make the global batch
      # The batch length is the global batch's, so every host's rows have the same shape.
      np.testing.assert_array_equal(np.concatenate([_fields(p)[name] for p in parts]), value,
                                    err_msg=name)
  for epoch in range(2):
    mine = [set(np.concatenate(r[epoch * 5:(epoch + 1) * 5])) for r in read]
    assert not mine[0] & mine[1] and mine[0] | mine[1] == set(range(N))
    assert sum(len(np.concatenate(r[epoch * 5:(epoch + 1) * 5])) for r in read) == N
  with pytest.raises(ValueError, match="each host reads only its shard"):
    hosts[1].batch(10, slice(0, hosts[1].rows // 2))


def test_packed_logps_equal_pad(pairs):
  from flax import nnx
  from jaxpref import models
  from jaxpref.models.logps import LogpsOptions, token_logps
  from jaxpref.train.roles.policy import group_logps

  prepared, _ = pairs
  graphdef, params = nnx.split(models.Decoder(models.get_config("tiny"), rngs=nnx.Rngs(1)))
  b = grain_source.GrainBatcher(prepared, 8, 1, mode="pack", multiple=8, pack_groups=4)
  packed = b.batch(0)
  plain = prepared.batch(b.last_indices)  # --batching=pad's layout of the same groups
  logps = jax.jit(lambda batch: token_logps(graphdef, params, batch, LogpsOptions()))
  got = group_logps(logps(packed), logps(packed), packed, with_tokens=True)
  want = group_logps(logps(plain), logps(plain), plain, with_tokens=True)
  # Tolerance: float32; a packed row's attention sums over more (masked-out) keys.
  np.testing.assert_allclose(got.policy, want.policy, rtol=1e-5, atol=1e-5)
  for field in ("length", "valid", "weight"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
  assert abs(float(np.asarray(want.policy).sum())) > 1.0  # real log-probs, not zeros
  assert packed.tokens.shape[:2] == (2, 2)  # 8 groups in 2 blocks of 4


@pytest.mark.parametrize("mode", ["buckets", "pack"])
def test_iterator_state_resumes_exactly(pairs, mode):
  prepared, _ = pairs
  make = lambda: grain_source.GrainBatcher(prepared, 10, seed=5, mode=mode, **OPTS[mode])
  full = make()
  want = [full.batch(s) for s in range(9)]
  first = make()
  for s in range(3):
    first.batch(s)
  state = json.loads(json.dumps(first.iterator.get_state()))  # as the checkpoint stores it
  assert state == {"next_index": 3}
  fresh = make()
  fresh.iterator.set_state(state)
  for s in range(3, 9):
    _assert_same(fresh.batch(s), want[s], f"step {s}")
  with pytest.raises(ValueError, match="iterator is at batch 9, the training loop at step 4"):
    fresh.batch(4)


def test_curriculum_stage_order_from_stored_values(scored):
  prepared, ds = scored
  info = prepared.info
  assert info["curriculum_fields"] == ["length", "score_gap", "weight"]
  assert "label_smoothing" in info["curriculum_missing"]
  for field in info["curriculum_fields"]:  # stored values are the in-memory dataset's
    np.testing.assert_array_equal(prepared.group_array(f"curriculum_{field}"),
                                  curriculum.field_values(ds, field))
  order = prepared.curriculum("score_gap", 3, seed=2)
  want = curriculum.from_spec(ds, "score_gap", 3, 2)
  assert order.spec == "score_gap:desc" and order.describe() == want.describe()
  b = grain_source.GrainBatcher(prepared, 10, seed=2, mode="pack", multiple=8, pack_groups=2,
                                curriculum=order)
  memory = batching.Batcher(ds, 10, seed=2, mode="pack", multiple=8, pack_groups=2,
                            curriculum=want)
  gap = curriculum.field_values(ds, "score_gap")
  stage_of = np.empty(ds.n, int)
  for s, groups in enumerate(want.stages):
    stage_of[groups] = s
  seen = []
  for step in range(12):  # 60 groups = one epoch of 6 batches: stages of 20, 2 batches each
    _assert_same(b.batch(step), memory.batch(step), f"step {step}")
    stages = set(stage_of[b.last_indices])
    assert len(stages) == 1, step
    seen.append(stages.pop())
  assert seen == [0, 0, 1, 1, 2, 2] * 2  # every epoch repeats the curriculum
  assert gap[want.stages[0]].min() > gap[want.stages[2]].max()  # easy (large gap) first
  assert "curriculum=score_gap:desc:3" in b.describe()


def test_prepared_curriculum_and_option_errors(pairs, tmp_path):
  from jaxpref import models
  from jaxpref.train import loop
  from jaxpref.train.config import DataConfig, RunConfig

  prepared, _ = pairs
  base = dict(train_data=prepared.path, eval_data="", tokenizer=TOK, max_len=32, batch_size=16)
  cases = ((dict(curriculum="score_gap"), "holds no 'score_gap' values: --curriculum=score_gap "
                                          "needs scores"),
           (dict(curriculum="difficulty"), "it stores length, weight"),
           (dict(curriculum="length", curriculum_stages=60), "--curriculum_stages must be in"),
           (dict(shared_prompt=True), "--shared_prompt .*not supported with prepared data"),
           (dict(batching="pack", pack_groups=3), "must be --pack_groups=3 times a multiple of 8"))
  for data, message in cases:
    cfg = RunConfig(workdir=str(tmp_path / "w"), model=models.get_config("tiny"),
                    data=DataConfig(**base, **data), progress=False, plot=False)
    with pytest.raises(ValueError, match=message):
      loop.setup(cfg)
  cfg = RunConfig(workdir=str(tmp_path / "w"), model=models.get_config("tiny"),
                  data=DataConfig(**base, batching="pack", curriculum="length:desc",
                                  curriculum_stages=2), progress=False, plot=False)
  b = loop.setup(cfg).batcher
  assert b.describe().startswith("batching=pack,multiple=16,pack_groups=2,curriculum=length:desc:2")
  # A folder prepared before groups.npz existed: a clear error, not a wrong plan.
  old = tmp_path / "old"
  os.makedirs(old)
  for name in (grain_source.INFO_FILE, grain_source.BUILDER_NAME):
    os.symlink(os.path.join(prepared.path, name), old / name)
  with pytest.raises(ValueError, match="has no groups.npz .*run jaxpref-data prepare again"):
    grain_source.GrainBatcher(grain_source.PreparedDataset(str(old)), 10, 0)


@pytest.mark.slow
def test_packed_curriculum_training_resumes_exactly(tmp_path):
  from jaxpref import models
  from jaxpref.train import loop
  from jaxpref.train.config import DataConfig, OptimConfig, RunConfig

  prepared = str(tmp_path / "prepared")
  _prepare(f"{TINY}/train.jsonl", prepared)
  cfg = RunConfig(
      workdir=str(tmp_path / "run"), model=models.get_config("tiny"),
      data=DataConfig(train_data=prepared, eval_data="", tokenizer=TOK, max_len=32,
                      batch_size=32, batching="pack", pack_groups=2, curriculum="length",
                      curriculum_stages=4),
      loss="sft", optim=OptimConfig(learning_rate=3e-3, warmup_steps=0), steps=16, log_every=1,
      eval_every=16, checkpoint_every=4, keep_checkpoints=4, progress=False, plot=False)
  s = loop.setup(cfg)
  loop.train(s)
  want = train_rows(cfg.workdir)
  losses = np.array([want[t]["loss"] for t in range(1, 17)])
  assert np.isfinite(losses).all() and losses[-4:].mean() < losses[:4].mean() - 0.3  # it learns
  # The logged per-batch padding efficiency is that of the packed batches the plan gives.
  fresh = grain_source.GrainBatcher(s.train_ds, 32, cfg.data.seed, planner=s.batcher.planner)
  eff = [batching.padding_efficiency(fresh.batch(t)) for t in range(16)]
  np.testing.assert_allclose([want[t]["data/padding_efficiency"] for t in range(1, 17)],
                             [r / c for r, c in eff], rtol=1e-6)
  assert min(r / c for r, c in eff) > 0.7  # pad at max_len 32: 0.58 on this data
  state = json.load(open(f"{cfg.workdir}/checkpoints/8/data_iter/process_0-of-1.json"))
  assert state == {"next_index": 8}

  got = resume_copy(cfg, 8, str(tmp_path / "resumed"))
  np.testing.assert_allclose([got[t]["loss"] for t in range(9, 17)], losses[8:], atol=1e-6, rtol=0)
