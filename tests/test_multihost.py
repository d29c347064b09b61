"""Two processes on localhost (4 fake CPU devices each) train like one process with 8."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
