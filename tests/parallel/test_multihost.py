"""Two processes on localhost (4 fake CPU devices each) train like one process with 8; when
jaxpref starts a multi-host runtime by itself; meshes that follow the device topology."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--flagfile=experiments/quickstart.flags", "--steps=3", "--log_every=1",
        "--eval_every=3", "--checkpoint_every=3", "--noprogress", "--noplot"]


def _env(n_devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
  return env


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp:4,tensor:2"])  # parameters sharded across hosts
def test_two_processes_match_one(tmp_path, mesh):
  cmd = [sys.executable, "-m", "jaxpref.main", *ARGS, f"--mesh={mesh}"]
  one = tmp_path / "one"
  subprocess.run(cmd + [f"--workdir={one}"], env=_env(8), cwd=ROOT, check=True,
                 capture_output=True, timeout=600)
  two = tmp_path / "two"
  addr = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(cmd + [f"--workdir={two}", f"--coordinator_address={addr}",
                                   "--num_processes=2", f"--process_id={i}"],
                            env=_env(4), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "8 cpu device(s)" in outs[0][1] + outs[0][0]
  # Tolerance: float32; the two runs reduce over the same 8 devices.
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5, atol=1e-6)
  assert len(_losses(two)) == 3  # only process 0 wrote metrics
  assert os.path.exists(two / "final_metrics.json")
  assert os.path.isdir(two / "checkpoints")


# ---- when jaxpref calls jax.distributed.initialize() by itself (fake environments) ----

def _no_metadata(key):
  raise AssertionError(f"metadata server queried ({key}) off a TPU VM")


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, "slurm"),
    ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}, None),  # one task: one process
    ({"SLURM_NTASKS": "4"}, None),  # not inside an allocation
    ({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1"}, "tpu (TPU_WORKER_HOSTNAMES)"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.2:8471,10.0.0.3:8471"}, "tpu (TPU_PROCESS_ADDRESSES)"),
    ({"TPU_ACCELERATOR_TYPE": "v5p-64"}, "tpu (TPU_ACCELERATOR_TYPE=v5p-64)"),
    ({"TPU_ACCELERATOR_TYPE": "v5p-8"}, None),
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, None),
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-16"}, "tpu (TPU_ACCELERATOR_TYPE=v5litepod-16)"),
    ({"TPU_ACCELERATOR_TYPE": "v6e-256"}, "tpu (TPU_ACCELERATOR_TYPE=v6e-256)"),
    ({"MEGASCALE_NUM_SLICES": "2"}, "tpu (MEGASCALE_NUM_SLICES)"),
])
def test_cluster_from_environment_variables(env, want):
  from jaxpref.parallel import distributed
  assert distributed.cluster(env, on_tpu_vm=False, metadata=_no_metadata) == want


def test_cluster_on_a_gcloud_tpu_vm_reads_the_metadata_server():
  """gcloud TPU VMs set none of the variables in a user's shell: the metadata server's
  worker list (what JAX's GCE TPU cluster detection reads) decides."""
  from jaxpref.parallel import distributed
  asked = []

  def metadata(values):
    def get(key):
      asked.append(key)
      return values.get(key)
    return get

  two = {"worker-network-endpoints": "a:b:10.0.0.2,a:b:10.0.0.3"}
  assert distributed.cluster({}, True, metadata(two)) == "tpu (metadata worker-network-endpoints)"
  one = {"worker-network-endpoints": "a:b:10.0.0.2", "accelerator-type": "v5litepod-8"}
  assert distributed.cluster({}, True, metadata(one)) is None
  assert asked[-2:] == ["worker-network-endpoints", "accelerator-type"]
  only_type = {"accelerator-type": "v5p-64"}
  assert distributed.cluster({}, True, metadata(only_type)) == (
      "tpu (metadata accelerator-type=v5p-64)")
  assert distributed.cluster({}, True, metadata({})) is None  # metadata server unreachable


def test_initialize_decision(monkeypatch):
  from jaxpref.parallel import distributed
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(distributed.jax.config, "update", lambda *a: None)
  for name in ("SLURM_NTASKS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
               "TPU_ACCELERATOR_TYPE", "MEGASCALE_NUM_SLICES"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
  assert distributed.initialize() is False and calls == []
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-64")
  assert distributed.initialize() is True and calls == [((), {})]  # JAX's own detection
  assert distributed.initialize("h:1234", 2, 1) is True
  assert calls[-1] == (("h:1234",), {"num_processes": 2, "process_id": 1})
  with pytest.raises(ValueError, match="needs --coordinator_address"):
    distributed.initialize("", 2, 0)
  with pytest.raises(ValueError, match="must be in"):
    distributed.initialize("h:1", 2, 2)


def test_tpu_hosts_matches_the_launcher():
  from jaxpref.parallel import distributed
  import importlib.util
  spec = importlib.util.spec_from_file_location("tpu_launch", os.path.join(ROOT, "tpu",
                                                                           "launch.py"))
  launch = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launch)
  for acc in ("v2-8", "v3-32", "v4-8", "v4-64", "v5p-8", "v5p-64", "v5p-1024", "v5litepod-1",
              "v5litepod-8", "v5litepod-16", "v5litepod-256", "v6e-8", "v6e-16", "v6e-256"):
    assert distributed.tpu_hosts(acc) == launch.hosts(acc), acc
  assert distributed.tpu_hosts("") == 1 and distributed.tpu_hosts("gpu") == 1


# ---- the mesh follows the device topology ----

@dataclasses.dataclass(frozen=True)
class FakeTpu:
  id: int
  coords: tuple
  core_on_chip: int = 0
  platform: str = "tpu"
  device_kind: str = "TPU v4"
  process_index: int = 0
  slice_index: int = 0


def test_mesh_on_cpu_is_the_plain_reshape():
  import jax
  from jaxpref.parallel import mesh
  devices = jax.devices()
  assert len(devices) == 8
  for spec in ("data:-1", "fsdp:4,tensor:2", "data:2,fsdp:2,tensor:2", "tensor:8"):
    sizes = mesh.parse_mesh(spec, 8)
    m = mesh.make_mesh(spec)
    np.testing.assert_array_equal(m.devices, np.asarray(devices).reshape(
        [sizes[a] for a in mesh.AXES]))
    assert m.axis_names == mesh.AXES


def test_mesh_on_a_tpu_torus_follows_the_chip_coordinates():
  from jax.experimental import mesh_utils
  from jaxpref.parallel import mesh
  # A v4-16-like 2x2x2 cube of chips, listed in an order that is not the torus's.
  coords = [(x, y, z) for z in range(2) for y in range(2) for x in range(2)]
  devices = [FakeTpu(i, coords[j]) for i, j in enumerate([0, 3, 5, 6, 1, 2, 4, 7])]
  grid = mesh.device_grid([1, 2, 4], devices)
  np.testing.assert_array_equal(grid, mesh_utils.create_device_mesh([1, 2, 4], devices))
  assert not np.array_equal(grid, np.asarray(devices).reshape(1, 2, 4))
  # Each 4-chip row (the tensor axis) is one z-plane of the cube: neighbouring chips.
  for row in grid[0]:
    assert len({d.coords[2] for d in row}) == 1


def test_mesh_falls_back_to_the_device_order_for_several_slices(caplog):
  from jaxpref.parallel import mesh
  coords = [(x, y, 0) for y in range(2) for x in range(2)]
  devices = [FakeTpu(s * 4 + i, c, slice_index=s) for s in range(2) for i, c in enumerate(coords)]
  grid = mesh.device_grid([2, 4, 1], devices)
  np.testing.assert_array_equal(grid, np.asarray(devices).reshape(2, 4, 1))
  assert "several slices" in caplog.text
