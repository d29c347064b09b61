"""TR-DPO reference updates: ref <- alpha*policy + (1-alpha)*ref every N steps, checkpointed."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.train import checkpoint as ckpt_lib
from jaxpref.train import loop
from jaxpref.train.config import DataConfig, OptimConfig, RunConfig
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.state import init_state

TINY = make_tiny.OUT


def config(workdir, steps, **kw):
  return RunConfig(workdir=str(workdir), model=models.get_config("tiny"), steps=steps,
                   log_every=1, eval_every=100, checkpoint_every=2, progress=False, plot=False,
                   mesh="data:8", ref_sync_every=2, ref_sync_alpha=0.5,
                   # A constant learning rate: the schedule must not depend on --steps, so
                   # that 2 steps then 2 more can be compared with 4 in one go.
                   optim=OptimConfig(warmup_steps=0, min_lr_ratio=1.0),
                   data=DataConfig(train_data=f"{TINY}/train.jsonl", eval_data="",
                                   tokenizer=f"{TINY}/tokenizer.model"), **kw)


def _restore(cfg):
  """(policy params, reference params) of the latest checkpoint, and the initial params."""
  mesh = mesh_lib.make_mesh(cfg.mesh)
  _, state, ref = init_state(cfg, mesh, make_optimizer(cfg.optim, cfg.steps))
  init = jax.device_get(state.params)
  ckpt = ckpt_lib.Checkpointer(os.path.join(cfg.workdir, "checkpoints"), 2, 2)
  restored, _, step = ckpt.restore({"train": state, "ref": ref.params})
  ckpt.close()
  return jax.device_get(restored["train"].params), jax.device_get(restored["ref"]), init, step


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_soft_sync_values_and_resume(tmp_path):
  cfg2 = config(tmp_path / "a", 2)
  loop.run(cfg2)
  p2, r2, p0, step = _restore(cfg2)
  assert step == 2
  _close(r2, jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, p2, p0))
  cfg4 = dataclasses.replace(cfg2, steps=4)
  loop.run(cfg4)  # resumes from step 2, with the synced reference restored
  p4, r4, _, _ = _restore(cfg4)
  _close(r4, jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, p4, r2))
  loop.run(config(tmp_path / "straight", 4))
  np.testing.assert_allclose(_losses(tmp_path / "a"), _losses(tmp_path / "straight"),
                             rtol=1e-6)
  # Step 3 trains against the synced reference: its loss is not the frozen-reference one.
  frozen = dataclasses.replace(config(tmp_path / "frozen", 4), ref_sync_every=0)
  loop.run(frozen)
  assert abs(_losses(tmp_path / "frozen")[2] - _losses(tmp_path / "a")[2]) > 1e-6


def test_sync_flags_are_checked(tmp_path):
  with pytest.raises(ValueError, match="needs --reference=model"):
    loop.setup(config(tmp_path / "w", 2, reference="precomputed"))
  with pytest.raises(ValueError, match="ref_sync_alpha"):
    loop.setup(dataclasses.replace(config(tmp_path / "w", 2), ref_sync_alpha=1.5))
