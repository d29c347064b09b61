"""The online toy from its flag files, as docs/online.md runs it: SFT on the half-right mix,
then GRPO lifts held-out verifier accuracy from about 0.5 to at least 0.9."""

import json
import os

import pytest

from cli_util import ROOT, metrics, train

ONLINE = os.path.join(ROOT, "experiments", "online")


@pytest.mark.slow  # SFT (1500 steps) and 100 GRPO steps: about 5 minutes on 2 cores
def test_grpo_lifts_the_sft_policy_to_090(tmp_path):
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
