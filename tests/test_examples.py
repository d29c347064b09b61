"""docs/writing_a_loss.md's worked example, run exactly as the doc tells a user to."""

import os

import numpy as np
import pytest

from cli_util import ROOT, metrics, train


@pytest.mark.slow
def test_user_loss_file_trains_from_its_flag_file(tmp_path):
  workdir = str(tmp_path / "dpop")
  train(workdir, flagfile=os.path.join(ROOT, "examples", "dpop.flags"))
  flags_txt = open(os.path.join(workdir, "flags.txt")).read()
  assert "--loss=dpop" in flags_txt and "--loss.dpop_lambda=50.0" in flags_txt
  assert "--loss_module=" in flags_txt and "examples/dpop.py" in flags_txt
  final = metrics(workdir, "eval")[-1]
  assert final["step"] == 300 and final["rewards/accuracy"] > 0.85
  assert final["rewards/chosen"] > 0  # DPOP keeps the chosen log-ratio above the reference
  assert "loss/penalty" in final
  # flags.txt re-runs it (the user module is imported again from the recorded path).
  rerun = str(tmp_path / "rerun")
  train(rerun, "--steps=20", flagfile=os.path.join(workdir, "flags.txt"))
  rows = metrics(rerun, "train")
  assert [r["step"] for r in rows] == [10, 20] and np.isfinite([r["loss"] for r in rows]).all()
