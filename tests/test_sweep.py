import os
import subprocess
import sys

import pytest

from cli_util import QUICKSTART, ROOT, env
from jaxpref import sweep


def test_rows_exclude_included_files():
  rows = [os.path.basename(f) for f in sweep.rows_of(os.path.join(ROOT, "experiments", "dpo_beta"))]
  assert rows == ["beta_0.05.flags", "beta_0.1.flags", "beta_0.5.flags"]


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_sweep_runs_rows_and_writes_table_and_plot(tmp_path):
  folder = tmp_path / "ablation"
  folder.mkdir()
  (folder / "base.flags").write_text(f"--flagfile={QUICKSTART}\n--steps=4\n--eval_every=2\n")
  for beta in ("0.1", "1.0"):
    (folder / f"beta_{beta}.flags").write_text(f"--flagfile=base.flags\n--loss.beta={beta}\n")
  root = tmp_path / "runs"
  proc = subprocess.run([sys.executable, "-m", "jaxpref.sweep", str(folder),
                         f"--workdir_root={root}", "--", "--log_every=2"],
                        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = (root / "results.md").read_text()
  assert "| beta_0.1 | 4 |" in table and "| beta_1.0 | 4 |" in table
  assert (root / "comparison.png").stat().st_size > 0
  # beta scales the implicit rewards: the flag reached each row's loss.
  flags_01 = (root / "beta_0.1" / "flags.txt").read_text()
  assert "--loss.beta=0.1" in flags_01
  assert "--loss.beta=1.0" in (root / "beta_1.0" / "flags.txt").read_text()


def test_markdown_table_marks_failed_rows():
  table = sweep.markdown_table({"ok": {"step": 3, "loss": 0.5}, "bad": {}})
  assert "| ok | 3 | 0.5000 |" in table and "| bad | failed |" in table
