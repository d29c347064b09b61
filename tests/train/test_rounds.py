"""--rounds: a fresh reference every round, policy_margin re-ranking between rounds, resume."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxpref import models
from jaxpref.data import grain_source, make_tiny
from jaxpref.models import lora
from jaxpref.models.logps import token_logps
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.train import checkpoint as ckpt_lib
from jaxpref.train import loop, rounds
from jaxpref.train.config import DataConfig, OptimConfig, RunConfig
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.state import init_state

TINY = make_tiny.OUT
N = 64  # train groups: 2 stages of 32, one batch each


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "train.jsonl"
  with open(f"{TINY}/train.jsonl") as f:
    path.write_text("".join(f.readlines()[:N]))
  return str(path)


def config(workdir, train_data, steps=6, **kw):
  data = dict(train_data=train_data, eval_data="", tokenizer=f"{TINY}/tokenizer.model",
              batch_size=32, eval_batch_size=64, curriculum="policy_margin", curriculum_stages=2)
  data.update(kw.pop("data", {}))
  kw = {"rounds": 2, **kw}
  return RunConfig(workdir=str(workdir), model=models.get_config("tiny"), steps=steps,
                   log_every=1, eval_every=100, checkpoint_every=1, keep_checkpoints=20,
                   progress=False, plot=False, mesh="data:8",
                   optim=OptimConfig(learning_rate=3e-3, warmup_steps=0),
                   data=DataConfig(**data), **kw)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def _checkpoint(cfg, workdir, step):
  """(policy params, reference params) of checkpoint `step` (a copy cut after it)."""
  cut = f"{workdir}_at{step}"
  shutil.copytree(os.path.join(workdir, "checkpoints"), cut)
  for d in os.listdir(cut):
    if d.isdigit() and int(d) > step:
      shutil.rmtree(os.path.join(cut, d))
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, state, ref = init_state(cfg, mesh, make_optimizer(cfg.optim, cfg.steps))
  ckpt = ckpt_lib.Checkpointer(cut, 1, 20)
  restored, _, got = ckpt.restore({"train": state, "ref": ref.params})
  ckpt.close()
  assert got == step
  return graphdef, jax.device_get(restored["train"].params), jax.device_get(restored["ref"])


def _numpy_margins(graphdef, params, ref, ds):
  """The implicit reward margins in float64 numpy from the model's log-probs."""
  fwd = jax.jit(lambda p, b: token_logps(graphdef, p, b).sum(-1))
  batch = ds.batch(np.arange(ds.n))
  pol = np.asarray(fwd(params, batch), np.float64)
  rf = np.asarray(fwd(ref, batch), np.float64)
  return (pol[:, 0] - rf[:, 0]) - (pol[:, 1] - rf[:, 1])


@pytest.mark.slow
def test_rounds_refresh_the_reference_rerank_and_resume_exactly(tmp_path, train_file):
  cfg = config(tmp_path / "full", train_file)  # 2 rounds of 3 steps
  loop.run(cfg)
  full = _losses(cfg.workdir)
  assert sorted(full) == list(range(1, 7))
  # Round 2 starts at step 3: its reference is the policy after step 3 (checkpoint 3),
  # and round 1's reference (the initial model) is what checkpoint 3 still holds.
  graphdef, p3, r3 = _checkpoint(cfg, cfg.workdir, 3)
  _, _, r4 = _checkpoint(cfg, cfg.workdir, 4)
  for a, b in zip(jax.tree.leaves(r4), jax.tree.leaves(p3)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(r3), jax.tree.leaves(p3)))
  # Round 2's scores: the margins of (p3 against r3), as float64 numpy computes them.
  s = loop.setup(cfg)
  want = _numpy_margins(graphdef, p3, r3, s.train_ds)
  saved = np.load(os.path.join(cfg.workdir, "rounds", "round_2.npy"))
  assert saved.dtype == np.float64 and saved.std() > 1e-3  # the policy moved: not all zero
  np.testing.assert_allclose(saved, want, atol=2e-4, rtol=1e-4)
  # Its stages: large margin (easy) first; the round's first batch is stage 1, the next one
  # stage 2 (round 1's stages are file order: every margin was 0).
  order = s.batcher.set_scores(1, saved)
  top = np.argsort(-want, kind="stable")
  assert order.spec == "policy_margin:desc"
  first, second = (s.batcher.batchers[1].plan(i)[0] for i in (0, 1))
  assert want[first].min() >= want[second].max() - 1e-4
  assert len(set(first) ^ set(top[:32])) <= 2  # only near-ties at the cut may swap
  np.testing.assert_array_equal(np.sort(s.batcher.batchers[0].plan(0)[0]), np.arange(32))
  # A run killed after step 4 (inside round 2) resumes with the stored scores and the
  # synced reference: the same losses as the run that was not interrupted.
  killed = tmp_path / "killed"
  shutil.copytree(cfg.workdir, killed)
  for d in os.listdir(killed / "checkpoints"):
    if d.isdigit() and int(d) > 4:
      shutil.rmtree(killed / "checkpoints" / d)
  stamp = os.stat(killed / "rounds" / "round_2.npy").st_mtime_ns
  loop.run(dataclasses.replace(cfg, workdir=str(killed)))
  got = _losses(killed)
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[k] for k in (5, 6)], [full[k] for k in (5, 6)], rtol=1e-6)
  assert os.stat(killed / "rounds" / "round_2.npy").st_mtime_ns == stamp  # loaded, not redone
  # Without its scores the round cannot be rebuilt: an error, not other batches.
  lost = tmp_path / "lost"
  shutil.copytree(killed, lost)
  for d in os.listdir(lost / "checkpoints"):
    if d.isdigit() and int(d) > 4:
      shutil.rmtree(lost / "checkpoints" / d)
  os.remove(lost / "rounds" / "round_2.npy")
  with pytest.raises(ValueError, match="inside round 2.*round_2.npy.*missing"):
    loop.run(dataclasses.replace(cfg, workdir=str(lost)))
  # Other --rounds: other batches and references, refused.
  with pytest.raises(ValueError, match="rounds=2x3.*rounds=3x2"):
    loop.run(dataclasses.replace(cfg, workdir=str(killed), rounds=3))


def test_margins_are_first_minus_last_valid_member():
  lr = np.array([[1.0, 0.5, -2.0], [0.25, -1.0, 9.0]])
  valid = np.array([[True, True, True], [True, True, False]])
  np.testing.assert_allclose(rounds.margins(lr, valid), [3.0, 1.25])


def test_round_errors(tmp_path, train_file):
  w = tmp_path / "w"
  for kw, needle in ((dict(reference="precomputed"), "--reference=precomputed stores one"),
                     (dict(steps=7), "--steps=7 is not a multiple"),
                     (dict(lora=lora.LoraConfig(2, 4.0, ("q",)), reference="lora_base"),
                      "every round: --lora_rank"),
                     (dict(rounds=0), "--rounds must be >= 1")):
    with pytest.raises(ValueError, match=needle):
      loop.setup(config(w, train_file, **kw))
  with pytest.raises(ValueError, match="with --rounds=1 every margin is 0"):
    loop.setup(config(w, train_file, rounds=1))
  reward = dataclasses.replace(config(w, train_file), role="reward")
  with pytest.raises(ValueError, match="--role=reward has no reference"):
    rounds.check(reward, None)
  prepared = object.__new__(grain_source.PreparedDataset)
  with pytest.raises(ValueError, match="prepared \\(grain\\) data"):
    rounds.check(config(w, train_file), prepared)
  # Without policy_margin, rounds only refresh the reference: the batch stream is kept.
  s = loop.setup(config(w, train_file, data=dict(curriculum="")))
  assert not s.batcher.rescore and s.batcher.describe().endswith(",rounds=2x3")
  np.testing.assert_array_equal(s.batcher.batch(4).tokens, s.batcher.base.batch(4).tokens)
