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
      r"(parameters|optimizer state|reference|gradients|batch|activations) ([\d.]+) MiB", text)}
  assert len(parts) == 6, parts
  total = float(re.search(r"total ([\d.]+) MiB", text).group(1))
  assert abs(sum(parts.values()) - total) <= 2.0, (parts, total)
  capacity = float(re.search(r"of (\d+) GB", text).group(1))
  assert total * 2**20 < capacity * 1e9


# The hand count of docs/cloud.md#memory-plan, big terms only, from Llama 3 8B's published
# config (models/presets.py) and each file's mesh and batch. Not the estimator's code: its
# small terms (norms, q/k/v and RoPE copies, batch, lse) are left out, so agreeing within
# 10% checks that `--estimate_only` adds up the terms the document shows.
V, D, L, H, KV, DH, F = 128256, 4096, 32, 32, 8, 128, 14336
LAYER = D * DH * (2 * H + 2 * KV) + 3 * D * F  # q, k, v, o, gate, up, down
P = 2 * V * D + L * LAYER  # embedding, untied head, layers: 8.03e9 (norms left out)
BLOCK_V = 8192  # the fused head's vocabulary block (ops/fused_linear.py)


def hand_count(fsdp, tensor, pairs, seq, accum):
  shards = fsdp * tensor
  state = P * 4 / shards * (1 + 2 + 1 + (accum > 1))  # params, Adam mu+nu, grads (+accum), f32
  ref = (P - V * D) * 2 / shards + V * D * 4 / shards  # bfloat16, but the head's float32
  rows = pairs * 2 // accum // fsdp  # chosen and rejected per pair, per device
  tokens = rows * seq
  saved = L * tokens * D * 2  # remat=full: each block's bfloat16 input
  attention = rows * (H // tensor) * seq * seq * (4 + 4 + 2 + 4)  # scores, softmax, probs, grad
  mlp = 4 * tokens * (F // tensor) * 2
  gathered = LAYER / tensor * ((4 + 4) * (fsdp > 1) + 2)  # f32 gather + its gradient, bf16 cast
  head = D * V * 4 * (1 + (shards > 1)) + 3 * tokens * BLOCK_V * 4  # dw (+ gathered w), blocks
  embed_grad = V * D * 4 / tensor * (fsdp > 1)
  return state + ref + saved + attention + mlp + gathered + head + embed_grad


SCALE = os.path.join(ROOT, "experiments", "scale")
HAND = {  # flag file: (devices, hand count in bytes per device)
    "llama3_8b_dpo.flags": (1, hand_count(fsdp=1, tensor=1, pairs=32, seq=2048, accum=1)),
    "h100x8.flags": (8, hand_count(fsdp=8, tensor=1, pairs=64, seq=2048, accum=8)),
    "v5p64.flags": (32, hand_count(fsdp=32, tensor=1, pairs=64, seq=2048, accum=1)),
    "v5e256.flags": (256, hand_count(fsdp=64, tensor=4, pairs=64, seq=1024, accum=1)),
}


def test_hand_counts_cover_every_flag_file():
  assert set(HAND) == {os.path.basename(f) for f in glob.glob(os.path.join(SCALE, "*.flags"))}


@pytest.mark.parametrize("name", [n if n == "v5p64.flags" else pytest.param(
    n, marks=pytest.mark.slow) for n in sorted(HAND)])  # ~5 s each: one in the fast tier
def test_estimate_is_within_10_percent_of_the_hand_count(name, tmp_path):
  devices, hand = HAND[name]
  proc = subprocess.run(
      train_cmd(str(tmp_path), "--estimate_only", f"--estimate_devices={devices}",
                flagfile=os.path.join(SCALE, name)),
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  total = float(re.search(r"total\s+([\d.]+) MiB", proc.stdout).group(1)) * 2**20
  assert abs(total - hand) <= 0.1 * hand, (name, total / 2**30, hand / 2**30)
  quoted = re.search(r"total ([\d.]+) MiB", open(os.path.join(SCALE, name)).read())
  if quoted:  # the file's own header quotes this very estimate
    assert abs(float(quoted.group(1)) * 2**20 - total) <= 2**20, (quoted.group(1), total / 2**20)


@pytest.mark.slow
def test_h100_file_compiles_its_step_on_8_fake_devices(tmp_path):
  # The real 8B compile takes minutes; one layer and a short context check the file's mesh,
  # batch and accumulation settings through the same --estimate_only path.
  path = os.path.join(ROOT, "experiments", "scale", "h100x8.flags")
  proc = subprocess.run(
      train_cmd(str(tmp_path), "--estimate_only", "--estimate_compile", "--estimate_devices=8",
                "--model.n_layers=1", "--model.vocab_size=4096", "--max_len=128", flagfile=path),
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "(8 devices)" in proc.stdout and "'fsdp': 8" in proc.stdout
  assert "compiled by XLA:CPU" in proc.stdout
