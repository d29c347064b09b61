"""--estimate_only: per-device memory from sharded shapes and the compiled step, no training."""

import os
import re
import subprocess

import jax
import numpy as np
import pytest

from cli_util import ROOT, env, train_cmd
from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.train import loop, memory
from jaxpref.train.config import DataConfig, RunConfig
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.state import init_state

TINY = make_tiny.OUT


def setup(tmp_path, preset, mesh, **kw):
  cfg = RunConfig(workdir=str(tmp_path), model=models.get_config(preset), model_preset=preset,
                  mesh=mesh, progress=False, plot=False,
                  data=DataConfig(train_data=f"{TINY}/train.jsonl", eval_data="",
                                  tokenizer=f"{TINY}/tokenizer.model"), **kw)
  return loop.setup(cfg)


def printed_total(text: str) -> float:
  return float(re.search(r"total\s+([\d.]+) MiB", text).group(1)) * memory.MIB


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("mesh", ["data:8", "fsdp:4,tensor:2"])
def test_printed_total_matches_the_compiled_step(preset, mesh, tmp_path):
  s = setup(tmp_path, preset, mesh)
  est = memory.estimate(s)
  want = memory.compiled_bytes(est.compiled)
  got = printed_total(memory.report(est, s.mesh))
  assert abs(got - want) <= 0.1 * want, (preset, mesh, got, want)


def test_shape_parts_match_the_arrays_a_run_allocates(tmp_path):
  """Parameters, optimizer state and reference as estimated = the bytes on device 0."""
  s = setup(tmp_path, "tiny", "fsdp:4,tensor:2")
  est = memory.estimate(s)
  optimizer = make_optimizer(s.cfg.optim, s.cfg.steps)
  _, state, ref = init_state(s.cfg, s.mesh, optimizer)
  on_device0 = lambda tree: sum(sh.data.nbytes for x in jax.tree.leaves(tree)
                                for sh in x.addressable_shards if sh.device == jax.devices()[0])
  assert est.parts["parameters"] == on_device0(state.params)
  assert est.parts["optimizer state"] == on_device0((state.opt_state, state.step))
  assert est.parts["reference"] == on_device0(ref.params)
  # Sharding is what makes it small: a quarter to an eighth of the replicated bytes.
  assert est.parts["parameters"] * 4 <= sum(x.nbytes for x in jax.tree.leaves(state.params))


def test_precomputed_reference_holds_no_reference(tmp_path):
  est = memory.estimate(setup(tmp_path, "tiny", "data:8", reference="precomputed"))
  assert est.parts["reference"] == 0 and est.parts["parameters"] > 0


def test_cli_prints_the_estimate_and_trains_nothing(tmp_path):
  workdir = str(tmp_path / "est")
  e = env()
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  proc = subprocess.run(train_cmd(workdir, "--estimate_only", "--mesh=fsdp:4,tensor:2"),
                        cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for part in ("parameters", "optimizer state", "reference", "batch", "activations", "total"):
    assert re.search(rf"{part}\s+[\d.]+ MiB", proc.stdout), (part, proc.stdout)
  assert "'fsdp': 4, 'tensor': 2" in proc.stdout
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  assert np.isfinite(printed_total(proc.stdout))


def printed_part(text: str, part: str) -> float:
  return float(re.search(rf"{part}\s+([\d.]+) MiB", text).group(1))


@pytest.mark.slow
def test_estimate_devices_plans_a_larger_mesh_and_follows_remat(tmp_path):
  # 16 fake devices from a process that would otherwise see 8: the estimate plans a slice
  # this machine does not have. With XLA:CPU's memory-minimising scheduler, full remat
  # must hold fewer activations than none (the concurrency scheduler reported the reverse).
  out = {}
  for remat in ("none", "full"):
    proc = subprocess.run(
        train_cmd(str(tmp_path / remat), "--estimate_only", "--estimate_devices=16",
                  "--mesh=fsdp:16", "--model=small", f"--model.remat={remat}", "--max_len=128",
                  "--batch_size=16"),
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(16 devices)" in proc.stdout
    out[remat] = printed_part(proc.stdout, "activations")
  assert out["full"] < 0.8 * out["none"], out
