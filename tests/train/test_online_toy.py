"""The online toy from its flag files, as docs/online.md runs it, and the qualitative results
of the two reproductions built on it, all from one SFT policy (its 1500 steps are the
expensive part, so one test trains it once):
- SFT on the half-right mix, then GRPO lifts held-out verifier accuracy from about 0.5 to
  at least 0.9;
- online DPO beats offline DPO on as many labels (experiments/repro/online_vs_offline,
  seed 0 of its README's table);
- clean pairs beat 35%-flipped ones for DPO (experiments/repro/unpacking_dpo_ppo, its
  first-ranked aspect, DPO at learning rate 1e-4, seed 0)."""

import importlib.util
import json
import os

import pytest

from cli_util import ROOT, metrics, train

ONLINE = os.path.join(ROOT, "experiments", "online")


def _repro(name):
  spec = importlib.util.spec_from_file_location(
      f"{name}_run", os.path.join(ROOT, "experiments", "repro", name, "run.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.slow  # SFT, GRPO, online and offline DPO, clean and noisy DPO: ~10 min on 2 cores
def test_grpo_and_the_toy_reproductions_from_one_sft_policy(tmp_path, monkeypatch):
  # The repro scripts start jaxpref-train/-generate themselves: one CPU device, as measured.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  sft_hf = tmp_path / "sft_hf"
  train(tmp_path / "sft", f"--export_hf={sft_hf}", "--plot=false",
        flagfile=os.path.join(ONLINE, "sft.flags"))

  workdir = tmp_path / "grpo"
  train(workdir, f"--init_from={sft_hf}", flagfile=os.path.join(ONLINE, "grpo.flags"))
  evals = metrics(workdir, "eval")
  assert 0.25 <= evals[0]["reward/mean"] <= 0.75, evals[0]  # the SFT policy: about half
  assert evals[-1]["step"] == 100 and evals[-1]["reward/mean"] >= 0.9, evals[-1]
  final = json.load(open(workdir / "final_metrics.json"))
  assert final["reward/mean"] == evals[-1]["reward/mean"]
  assert os.path.getsize(workdir / "metrics.png") > 0  # reward against step

  res = _repro("online_vs_offline").run_seed(str(tmp_path / "online_vs_offline"), 0,
                                             str(sft_hf))
  on, off = res["online_dpo"], res["offline_dpo"]
  assert res["online_groups"] == res["offline_groups"] == 1600, res  # as many labels
  assert on["sampled"] > off["sampled"] and on["greedy"] >= off["greedy"], (on, off)

  unpacking = _repro("unpacking_dpo_ppo")
  acc = {}
  for data in ("clean", "noisy"):
    d = tmp_path / "unpacking" / data
    d.mkdir(parents=True)
    pairs = unpacking.write_data(str(d), data, 0.35, 0)
    acc[data] = unpacking.run_cell(str(d), "dpo", None, pairs, 0, str(sft_hf),
                                   extra=["--learning_rate=1e-4"], name="dpo_lr1e-4")
  assert acc["clean"]["sampled"] > acc["noisy"]["sampled"], acc
  assert acc["clean"]["greedy"] >= acc["noisy"]["greedy"], acc
