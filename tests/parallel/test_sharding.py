"""FSDP and tensor-parallel sharding on 8 fake CPU devices: same numbers as one device, and
each device holds only its share of every parameter and optimizer moment."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from loop_util import train_steps
from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.parallel import sharding
from jaxpref.train import checkpoint as ckpt_lib
from jaxpref.train import loop
from jaxpref.train.config import DataConfig, RunConfig
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.state import init_state

TINY = make_tiny.OUT
MESHES = ["data:8", "fsdp:8", "data:2,fsdp:2,tensor:2", "fsdp:4,tensor:2"]
STEPS = 5
# Every sharded dimension divides 8 (vocab 512, d_model 64, 8 query / 4 K/V heads, d_ff 256),
# so the fractions below are exact; untied, so the LM head is covered too.
MODEL = models.get_config("tiny", n_heads=8, n_kv_heads=4, head_dim=8, d_ff=256,
                          tie_embeddings=False)
# float32, 5 AdamW steps: reductions split over devices reorder sums. Measured worst case
# over the four meshes: 6e-8 on losses, 2.2e-7 on parameters.
ATOL = 1e-6


def config(workdir, mesh="data:8", **kw):
  return RunConfig(workdir=str(workdir), model=MODEL, steps=STEPS, mesh=mesh, progress=False,
                   plot=False, data=DataConfig(train_data=f"{TINY}/train.jsonl", eval_data="",
                                               tokenizer=f"{TINY}/tokenizer.model"), **kw)


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory):
  return loop.setup(config(tmp_path_factory.mktemp("setup"))).train_ds


def run_steps(cfg, mesh, ds, n=STEPS):
  run = train_steps(cfg, mesh, ds, n)
  return run.losses, run.state, run.ref.params


@pytest.fixture(scope="module")
def one_device(train_ds, tmp_path_factory):
  mesh = mesh_lib.make_mesh("data:1", jax.devices()[:1])
  return run_steps(config(tmp_path_factory.mktemp("one")), mesh, train_ds)


def name_of(path) -> str:
  return [k for k in sharding._names(path) if k != "value"][-1]


def expected_fraction(name: str, mesh) -> float:
  """Matrices split over fsdp (model dim) x tensor (heads, mlp, vocab); norms over fsdp."""
  fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
  return 1 / fsdp if name == "scale" else 1 / (fsdp * tensor)


def fractions(tree) -> dict:
  """keystr -> set of per-device fractions, measured from the addressable shards."""
  return {jax.tree_util.keystr(p): {s.data.size / x.size for s in x.addressable_shards}
          for p, x in jax.tree_util.tree_leaves_with_path(tree) if x.ndim}


def test_rules_give_the_documented_specs():
  mesh = mesh_lib.make_mesh("data:1,fsdp:4,tensor:2")
  _, params = sharding.abstract_params(_decoder(MODEL), mesh)
  specs = {name_of(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(params)}
  assert specs == {"embed": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor"),
                   "q": P("fsdp", "tensor"), "k": P("fsdp", "tensor"), "v": P("fsdp", "tensor"),
                   "o": P("tensor", None, "fsdp"), "gate": P("fsdp", "tensor"),
                   "up": P("fsdp", "tensor"), "down": P("tensor", "fsdp"), "scale": P("fsdp")}


def test_dims_that_do_not_divide_fall_back_to_replicated():
  # The tiny preset has 2 K/V heads: tensor:4 cannot split them, but splits the 4 query heads.
  mesh = mesh_lib.make_mesh("fsdp:2,tensor:4")
  _, params = sharding.abstract_params(_decoder(models.get_config("tiny")), mesh)
  attn = params["layers"][0]["attn"]
  assert attn["k"].sharding.spec == P("fsdp")
  assert attn["q"].sharding.spec == P("fsdp", "tensor")
  assert sharding.partition_spec(("embed", "mlp"), (7, 10), mesh) == P()  # 7 % 2, 10 % 4
  assert sharding.partition_spec(("embed", "mlp"), (8, 10), mesh) == P("fsdp")


def test_adam_count_is_replicated_and_moments_follow_their_parameter():
  mesh = mesh_lib.make_mesh("fsdp:8")
  optimizer = make_optimizer(config("unused").optim, STEPS)
  _, params = sharding.abstract_params(_decoder(MODEL), mesh)
  opt = sharding.abstract_opt_state(optimizer, params, mesh)
  leaves = jax.tree_util.tree_leaves_with_path(opt)
  assert all(x.sharding.spec == P() for _, x in leaves if x.ndim == 0)
  moments = [x for p, x in leaves if x.ndim and name_of(p) == "gate"]
  assert len(moments) == 2 * MODEL.n_layers  # mu and nu of every layer's gate
  assert all(x.sharding.spec == P("fsdp") for x in moments)


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_sharded_steps_match_one_device(spec, train_ds, one_device, tmp_path):
  want_losses, want, _ = one_device
  mesh = mesh_lib.make_mesh(spec)
  got_losses, state, ref = run_steps(config(tmp_path, spec), mesh, train_ds)
  np.testing.assert_allclose(got_losses, want_losses, atol=ATOL, rtol=0)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=0)
  # Each device holds its fraction of every parameter and Adam moment, after 5 updates.
  for tree in (state.params, state.opt_state, ref):
    for key, got in fractions(tree).items():
      name = key.split("'")[-2]
      assert got == {expected_fraction(name, mesh)}, (spec, key, got)
  # The reference is sharded like the policy, and was not donated.
  assert jax.tree.map(lambda x: x.sharding, ref) == jax.tree.map(lambda x: x.sharding,
                                                                  state.params)
  assert not any(x.is_deleted() for x in jax.tree.leaves(ref))


def test_checkpoint_restores_into_another_meshs_layout(train_ds, tmp_path):
  cfg = config(tmp_path)
  _, saved, _ = run_steps(cfg, mesh_lib.make_mesh("fsdp:8"), train_ds, n=2)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), 1, 1)
  ckpt.save(2, saved, {"seed": 0, "step": 2}, force=True)
  ckpt.wait()
  target = mesh_lib.make_mesh("data:2,fsdp:2,tensor:2")
  _, like, _ = init_state(cfg, target, make_optimizer(cfg.optim, cfg.steps))
  restored, position, step = ckpt.restore(like)
  ckpt.close()
  assert step == 2 and position == {"seed": 0, "step": 2}
  assert (jax.tree.map(lambda x: x.sharding, restored)
          == jax.tree.map(lambda x: x.sharding, like))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_train_loop_resumes_on_another_mesh(tmp_path):
  """loop.run on fsdp:4,tensor:2; its step-2 checkpoint resumed on data:2,fsdp:2,tensor:2
  logs the same losses for steps 3 and 4."""
  first = config(tmp_path / "run", "fsdp:4,tensor:2", checkpoint_every=2, log_every=1,
                 eval_every=100)
  first = dataclasses.replace(first, steps=4)
  loop.run(first)
  want = _losses(first.workdir)
  shutil.rmtree(os.path.join(first.workdir, "checkpoints", "4"))
  # (`replace`, not RunConfig(**__dict__): the run cached its resolved `loss_spec` there.)
  loop.run(dataclasses.replace(first, mesh="data:2,fsdp:2,tensor:2"))
  got = _losses(first.workdir)
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in (3, 4)], [want[s] for s in (3, 4)],
                             atol=ATOL, rtol=0)


def _losses(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def _decoder(cfg):
  return lambda: models.Decoder(cfg, rngs=nnx.Rngs(0))
