"""tpu/slurm.py in --dry-run: the sbatch script it writes and submits."""

import os

import pytest

from launch_util import REPO, error, slurm


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
  monkeypatch.chdir(REPO)


def test_slurm_sbatch_script(capsys):
  rc = slurm.main(["--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--time=02:00:00",
                   "--flagfile=experiments/quickstart.flags", "--workdir=runs/q",
                   "--setup=source .venv/bin/activate", "--dry-run", "--", "--steps=100"])
  out = capsys.readouterr().out
  assert rc == 0
  assert out == "\n".join([
      "# jaxpref.sbatch",
      "#!/bin/bash",
      "#SBATCH --job-name=jaxpref",
      "#SBATCH --nodes=2",
      "#SBATCH --ntasks-per-node=1",
      "#SBATCH --gpus-per-node=4",
      "#SBATCH --cpus-per-task=16",
      "#SBATCH --time=02:00:00",
      "#SBATCH --output=slurm-%x-%j.out",
      "#SBATCH --partition=gpu",
      "",
      "set -eo pipefail",
      f"cd {REPO}",
      "source .venv/bin/activate",
      "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
      "srun jaxpref-train --flagfile=experiments/quickstart.flags --workdir=runs/q --steps=100",
      "",
      "sbatch jaxpref.sbatch",
      ""])
  assert not os.path.exists(os.path.join(REPO, "jaxpref.sbatch"))


def test_slurm_writes_and_submits(tmp_path, monkeypatch, capsys):
  (tmp_path / "bin").mkdir()
  fake = tmp_path / "bin" / "sbatch"
  fake.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/calls\"\n")
  fake.chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
  script = tmp_path / "job.sbatch"
  assert slurm.main(["--flagfile=experiments/quickstart.flags", "--workdir=runs/q",
                     f"--script={script}"]) == 0
  assert "srun jaxpref-train --flagfile=experiments/quickstart.flags" in script.read_text()
  assert "#SBATCH --partition" not in script.read_text()
  assert (tmp_path / "bin" / "calls").read_text().strip() == str(script)


def test_slurm_errors(capsys):
  assert "no such file" in error(capsys, "--flagfile=nope", "--workdir=w", module=slurm)
  assert "--time" in error(capsys, "--flagfile=experiments/quickstart.flags", "--workdir=w",
                           "--time=2h", module=slurm)
  assert ">= 1" in error(capsys, "--flagfile=experiments/quickstart.flags", "--workdir=w",
                         "--nodes=0", module=slurm)
  assert "--workdir" in error(capsys, "--flagfile=experiments/quickstart.flags", module=slurm)


def test_every_gpu_launch_sets_the_memory_fraction():
  """JAX preallocates 75% of a GPU by default; each documented GPU launch of jaxpref-train
  (the single-node recipe in docs/cloud.md, the h100x8 flag file's Run line) raises it, as
  the sbatch script above does."""
  doc = open(os.path.join(REPO, "docs", "cloud.md")).read()
  section = doc[doc.index("## 8xH100"):]
  section = section[:section.index("\n## ", 1)]
  flags = open(os.path.join(REPO, "experiments", "scale", "h100x8.flags")).read()
  launches = [line for text in (section, flags) for line in text.splitlines()
              if "jaxpref-train" in line and not line.lstrip("# ").startswith("(")]
  assert len(launches) >= 2, launches
  for line in launches:
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in line, line
