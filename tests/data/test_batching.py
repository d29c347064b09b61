"""--batching=pad|buckets|pack: the padding-efficiency metric, length buckets, packing that
leaves the loss's Logps unchanged, and per-host slices of a global batch."""

import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref import data as data_lib
from jaxpref import losses
from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.data.batching import Batcher, host_rows, padding_efficiency
from jaxpref.data.packing import PackedBatch
from jaxpref.parallel import distributed
from jaxpref.models.logps import LogpsOptions, token_logps
from jaxpref.train import step as step_lib
from jaxpref.train.reference import Reference
from jaxpref.train.roles import policy
from jaxpref.train.roles.policy import group_logps


def _tok():
  return data_lib.Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))


def _pairs(n=64, max_len=48):
  records, _ = data_lib.read_pairs(os.path.join(make_tiny.OUT, "train.jsonl"))
  return data_lib.PairDataset(records[:n], _tok(), max_len)


def _ranked(n=32):
  records, _ = data_lib.read_ranked(os.path.join(make_tiny.OUT, "ranked_train.jsonl"))
  # group_size 5 > some records' completions: invalid members must pack to nothing.
  return data_lib.RankedDataset(records[:n], _tok(), 48, group_size=5)


def _model():
  return nnx.split(models.Decoder(models.get_config("tiny"), rngs=nnx.Rngs(1)))


def test_padding_efficiency_counts_real_over_computed_tokens():
  ds = _pairs()
  batch = ds.batch(np.arange(8))
  real, computed = padding_efficiency(batch)
  assert computed == 8 * 2 * 48
  assert real == int((np.asarray(batch.segment_ids) > 0).sum()) == int(ds.segment_ids[:8].astype(bool).sum())
  # The start-up estimate (from lengths) equals the batches actually built, in every mode.
  for mode in ("pad", "buckets", "pack"):
    b = Batcher(ds, 8, seed=2, mode=mode, multiple=8, window=4, pack_groups=2)
    tot = np.sum([padding_efficiency(b.batch(s)) for s in range(6)], axis=0)
    assert b.estimate(6)[0] == pytest.approx(tot[0] / tot[1])


def test_buckets_cover_the_pad_groups_of_each_window_and_cut_only_padding():
  ds = _pairs(n=64)
  pad = Batcher(ds, 8, seed=5, mode="pad")
  bk = Batcher(ds, 8, seed=5, mode="buckets", multiple=8, window=4)
  for w in range(4):  # windows span epochs: 64 groups = 8 batches = 2 windows
    steps = range(4 * w, 4 * w + 4)
    np.testing.assert_array_equal(np.sort(np.concatenate([bk.plan(s)[0] for s in steps])),
                                  np.sort(np.concatenate([pad.plan(s)[0] for s in steps])))
  for epoch in range(2):  # every group once per epoch (n is a multiple of the window here)
    seen = np.concatenate([bk.plan(s)[0] for s in range(8 * epoch, 8 * epoch + 8)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(64))
  lengths = []
  for s in range(16):
    idx, length = bk.plan(s)
    longest = int(ds.segment_ids[idx].astype(bool).sum(-1).max())
    assert length % 8 == 0 and longest <= length < longest + 8 or length == 48
    got, full = bk.batch(s), ds.batch(idx)
    assert got.tokens.shape == (8, 2, length)
    np.testing.assert_array_equal(got.tokens, np.asarray(full.tokens)[..., :length])
    assert not np.asarray(full.segment_ids)[..., length:].any()  # only padding was cut
    lengths.append(length)
  assert len(set(lengths)) > 1 and bk.shapes_seen <= {(2, t) for t in (8, 16, 24, 32, 40, 48)}
  assert bk.estimate(8)[0] > pad.estimate(8)[0]


def test_batch_order_is_a_pure_function_of_seed_and_step():
  ds = _pairs()
  for mode in ("buckets", "pack"):
    a = [Batcher(ds, 8, 3, mode, multiple=8, window=4, pack_groups=4).plan(s) for s in range(10)]
    fresh = Batcher(ds, 8, 3, mode, multiple=8, window=4, pack_groups=4)
    for s in (9, 2, 7):  # a resumed run asks for steps in any order
      np.testing.assert_array_equal(fresh.plan(s)[0], a[s][0])
      assert fresh.plan(s)[1] == a[s][1]
    other = Batcher(ds, 8, 4, mode, multiple=8, window=4, pack_groups=4)
    assert any(not np.array_equal(other.plan(s)[0], a[s][0]) for s in range(10))


def test_pack_layout_segments_positions_and_blocks():
  ds = _pairs()
  b = Batcher(ds, 8, 0, "pack", multiple=8, pack_groups=4)
  idx, length = b.plan(0)
  packed = b.batch(0)
  assert isinstance(packed, PackedBatch)
  assert packed.tokens.shape == (2, 2, length) and packed.weight.shape == (2, 4)
  member_len = ds.segment_ids[idx].astype(bool).sum(-1).reshape(2, 4, 2)  # [P, m, K]
  for p in range(2):
    for k in range(2):
      seg, pos = packed.segment_ids[p, k], packed.positions[p, k]
      want = np.concatenate([np.full(n, s + 1) for s, n in enumerate(member_len[p, :, k])])
      np.testing.assert_array_equal(seg[:len(want)], want)
      assert not seg[len(want):].any()
      starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
      assert (pos[starts[seg[starts] > 0]] == 0).all()  # RoPE restarts in every segment
  with pytest.raises(ValueError, match="multiple of --pack_groups"):
    Batcher(ds, 6, 0, "pack", pack_groups=4)


@pytest.mark.parametrize("make_ds", [_pairs, _ranked], ids=["pairs", "ranked_k5"])
@pytest.mark.parametrize("fused", [True, False])
def test_packed_logps_equal_unpacked(make_ds, fused):
  ds = make_ds()
  graphdef, params = _model()
  opts = LogpsOptions(fused_lm_head=fused)
  b = Batcher(ds, 8, 1, "pack", multiple=8, pack_groups=4)
  idx, _ = b.plan(0)
  packed, plain = b.batch(0), ds.batch(idx)
  logps = jax.jit(lambda batch: token_logps(graphdef, params, batch, opts))
  got = group_logps(logps(packed), logps(packed), packed, with_tokens=True)
  want = group_logps(logps(plain), logps(plain), plain, with_tokens=True)
  # Tolerance: float32; a packed row's attention sums over more (masked-out) keys.
  np.testing.assert_allclose(got.policy, want.policy, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.ref, want.ref, rtol=1e-5, atol=1e-5)
  for field in ("length", "valid", "weight", "scores"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
  assert abs(float(np.asarray(want.policy).sum())) > 1.0  # real log-probs, not zeros
  # Token-level: the same tokens in response coordinates.
  want_tok = np.asarray(want.policy_tok)[np.asarray(plain.loss_mask) > 0]
  np.testing.assert_allclose(np.asarray(got.policy_tok)[np.asarray(got.mask) > 0], want_tok,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # two compiled train steps, ~30 s on 2 busy CPU cores
def test_packed_train_step_matches_unpacked_with_grad_accum():
  ds = _pairs()
  graphdef, params = _model()
  b = Batcher(ds, 16, 0, "pack", multiple=8, pack_groups=4)
  idx, _ = b.plan(0)
  out = []
  for batch in (b.batch(0), ds.batch(idx)):
    forward = policy.forward(graphdef, opts=LogpsOptions(fused_lm_head=False))  # faster on CPU
    step, _ = step_lib.make_steps(forward, losses.bind("dpo", {}), optax.sgd(1.0), grad_accum=2)
    state = _state(params)
    _, metrics = step(state, Reference("model", params), batch)
    out.append(jax.device_get(metrics))
  for key in ("loss", "grad_norm", "rewards/accuracy"):
    # Tolerance: float32 sums in a different order (packed micro-batches hold other groups).
    np.testing.assert_allclose(out[0][key], out[1][key], rtol=1e-5, atol=1e-6)


def _state(params):
  from jaxpref.train.step import TrainState
  p = jax.tree.map(lambda x: x.copy(), params)
  return TrainState(step=np.int32(0), params=p, opt_state=optax.sgd(1.0).init(p))


@pytest.mark.parametrize("mode", ["pad", "buckets", "pack"])
@pytest.mark.parametrize("hosts", [2, 4])
def test_host_slices_partition_the_global_batch(mode, hosts):
  ds = _pairs()
  b = Batcher(ds, 16, 7, mode, multiple=8, window=2, pack_groups=2)
  slices = [host_rows(b.rows, i, hosts) for i in range(hosts)]
  covered = np.concatenate([np.arange(b.rows)[s] for s in slices])
  np.testing.assert_array_equal(covered, np.arange(b.rows))  # union = all rows, no overlap
  for step in (0, 5):
    whole = b.batch(step)
    parts = [b.batch(step, s) for s in slices]
    for name in ("tokens", "segment_ids", "weight", "valid"):
      np.testing.assert_array_equal(np.concatenate([getattr(p, name) for p in parts]),
                                    getattr(whole, name))
  with pytest.raises(ValueError, match="does not split"):
    host_rows(10, 0, 4)


def test_local_rows_of_a_single_process_mesh_and_put():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
  sharding = NamedSharding(mesh, P("data"))
  assert distributed.local_rows(sharding, 16) == slice(0, 16)  # one process holds all rows
  x = np.arange(32).reshape(16, 2)
  np.testing.assert_array_equal(distributed.put_host_rows(x, sharding, 16), x)


@pytest.mark.slow  # two short CLI runs
def test_cli_logs_padding_efficiency_and_refuses_to_resume_in_another_order(tmp_path):
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
  from cli_util import metrics, train
  flags = ("--log_every=1", "--eval_every=4", "--checkpoint_every=4", "--noplot",
           "--bucket_multiple=8", "--bucket_window=4")
  workdir = str(tmp_path / "run")
  proc = train(workdir, *flags, "--steps=4", "--batching=buckets")
  assert "padding efficiency" in proc.stdout
  rows = metrics(workdir, "train")
  assert all(0 < r["data/padding_efficiency"] <= 1 for r in rows)
  assert len({r["data/padding_efficiency"] for r in rows}) > 1  # per batch, not a constant
  # The batches after step 4 would differ from the run's own: a clear error, not a mix.
  # The run record refuses the changed flag first; allowed, the checkpoint's order does.
  bad = train(workdir, *flags, "--steps=6", "--batching=pad", check=False)
  assert bad.returncode != 0 and "--batching" in bad.stderr, bad.stderr[-2000:]
  bad = train(workdir, *flags, "--steps=6", "--batching=pad", "--allow_flag_changes",
              check=False)
  assert bad.returncode != 0 and "batching=buckets" in bad.stdout + bad.stderr


def test_config_errors_name_the_flags():
  import dataclasses
  from jaxpref.data.batching import from_config
  from jaxpref.train.config import DataConfig
  ds = _pairs()
  base = DataConfig(batch_size=16)
  with pytest.raises(ValueError, match="--batching=buckets with --shared_prompt"):
    from_config(dataclasses.replace(base, batching="buckets", shared_prompt=True), ds, 1)
  with pytest.raises(ValueError, match="--batch_size=16 must be --pack_groups=4 times a multiple of 8"):
    from_config(dataclasses.replace(base, batching="pack", pack_groups=4), ds, 8)
  with pytest.raises(ValueError, match="--batching='bins' is not one of"):
    from_config(dataclasses.replace(base, batching="bins"), ds, 1)
  b = from_config(dataclasses.replace(base, batching="pack", pack_groups=4, curriculum="length",
                                      curriculum_stages=2), ds, 2)
  assert b.rows == 4 and b.describe() == "batching=pack,multiple=16,pack_groups=4,curriculum=length:asc:2"
