"""experiments/scale/: the 8B DPO flag files for real hardware parse, fit their device
count and batch rules, quote a memory total that adds up, and (slow) compile on fake
devices of the stated count."""

import glob
import os
import re
import subprocess

import pytest

from cli_util import ROOT, env, train_cmd
from jaxpref import flags as jflags
from jaxpref.parallel.mesh import parse_mesh

FILES = [f for f in sorted(glob.glob(os.path.join(ROOT, "experiments", "scale", "*.flags")))
         if "# Devices:" in open(f).read()]


def header(path, name):
  return re.search(rf"^# {name}:\s*(\d+)", open(path).read(), re.M).group(1)


def settings(path):
  out = {}
  for arg in jflags.expand_flagfiles([f"--flagfile={path}"]):
    key, _, value = arg.lstrip("-").partition("=")
    out[key] = value
  return out


def test_there_is_a_file_per_target():
  assert {os.path.basename(f) for f in FILES} == {"h100x8.flags", "v5p64.flags", "v5e256.flags"}


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_flags_exist_and_fit_the_mesh(path):
  s = settings(path)
  unknown = [k for k in s if k not in jflags.FLAGS and k.removeprefix("no") not in jflags.FLAGS]
  assert not unknown, unknown
  devices = int(header(path, "Devices"))
  axes = parse_mesh(s["mesh"], devices)
  shards = axes.get("data", 1) * axes.get("fsdp", 1)
  accum = int(s.get("grad_accum", 1))
  assert int(s["batch_size"]) % (shards * accum) == 0
  assert int(s["eval_batch_size"]) % shards == 0


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_quoted_memory_adds_up_and_fits(path):
  text = open(path).read()
  parts = {k: float(v) for k, v in re.findall(
      r"(parameters|optimizer state|reference|batch|activations) ([\d.]+) MiB", text)}
  assert len(parts) == 5, parts
  total = float(re.search(r"total ([\d.]+) MiB", text).group(1))
  assert abs(sum(parts.values()) - total) <= 2.0, (parts, total)
  capacity = float(re.search(r"of (\d+) GB", text).group(1))
  assert total * 2**20 < capacity * 1e9


@pytest.mark.slow
def test_h100_file_compiles_its_step_on_8_fake_devices(tmp_path):
  # The real 8B compile takes minutes; one layer and a short context check the file's mesh,
  # batch and accumulation settings through the same --estimate_only path.
  path = os.path.join(ROOT, "experiments", "scale", "h100x8.flags")
  proc = subprocess.run(
      train_cmd(str(tmp_path), "--estimate_only", "--estimate_devices=8", "--model.n_layers=1",
                "--model.vocab_size=4096", "--max_len=128", flagfile=path),
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "(8 devices)" in proc.stdout and "'fsdp': 8" in proc.stdout
