"""Issue 19, one error path: jaxpref's errors are one FATAL line and exit 2 (bad input), a
run that cannot go on is one line and exit 1, preemption exits 3, and anything unexpected
keeps its traceback plus a one-line summary (exit 1); jaxpref-sweep reports preempted rows."""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxpref import cli_errors, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(body: str):
  """Runs `body` (defining `fail()`) wrapped by `entry_point` in a fresh interpreter."""
  code = textwrap.dedent(f"""
      import errno, sys
      from jaxpref import cli_errors
      {textwrap.indent(textwrap.dedent(body), '      ').strip()}
      cli_errors.entry_point(fail)()
  """)
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)


CASES = {  # body -> (exit code, text on the last stderr line, traceback expected)
    "user error": ("def fail(): raise cli_errors.FlagError('--batch_size=3: not divisible')",
                   2, "FATAL: --batch_size=3: not divisible", False),
    "data error": ("def fail(): raise cli_errors.DataError('a.jsonl:3: field weight')",
                   2, "FATAL: a.jsonl:3: field weight", False),
    "workdir in use": ("def fail(): raise cli_errors.WorkdirError('w is in use by pid 7')",
                       2, "FATAL: w is in use by pid 7", False),
    "full disk": ("def fail(): raise cli_errors.WriterError('m.jsonl: cannot append')",
                  1, "FATAL: m.jsonl: cannot append", False),
    "read-only path": ("def fail(): raise PermissionError(errno.EACCES, 'Permission denied', "
                       "'/ro/run')", 2, "FATAL: /ro/run: Permission denied", False),
    "preempted": ("def fail(): raise cli_errors.Preempted('SIGTERM at step 7: checkpoint saved')",
                  3, "PREEMPTED: SIGTERM at step 7: checkpoint saved", False),
    "bug": ("def fail(): return 1 / 0", 1, "FATAL: crashed with ZeroDivisionError", True),
    "done": ("def fail(): return None", 0, "", False),
    "exit code kept": ("def fail(): return 5", 5, "", False),
    "sys.exit kept": ("def fail(): sys.exit(4)", 4, "", False),
    "under absl app.run": ("from absl import app\n"
                           "def main(argv): raise cli_errors.FlagError('--steps=0')\n"
                           "def fail(): app.run(main)", 2, "FATAL: --steps=0", False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_entry_point_exit_codes_and_lines(case):
  body, code, line, traceback = CASES[case]
  proc = _run_cli(body)
  assert proc.returncode == code, proc.stderr
  lines = proc.stderr.strip().splitlines()
  if line:
    assert lines[-1].startswith(line), proc.stderr
  assert ("Traceback" in proc.stderr) == traceback, proc.stderr
  if not traceback and line:
    assert len(lines) == 1, proc.stderr  # one line, nothing else


def test_the_data_packages_own_data_error_is_bad_input():
  from jaxpref.data import DataError
  assert cli_errors.classify(DataError("x.jsonl:1: bad"))[0] == cli_errors.BAD_INPUT_EXIT


def test_classify_without_the_data_package_loaded():
  proc = subprocess.run([sys.executable, "-c", (
      "import sys; from jaxpref import cli_errors as c\n"
      "assert c.classify(ValueError('x'))[0] == 1\n"
      "assert c.classify(OSError(28, 'No space left on device'))[0] == 1\n"
      "assert 'jax' not in sys.modules and 'numpy' not in sys.modules\n")],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr


def test_fatal_line_is_one_line():
  _, line = cli_errors.classify(cli_errors.UserError("a\nb\n  c"))
  assert line == "FATAL: a b c"


def test_constants_are_documented():
  assert cli_errors.PREEMPTED_EXIT == 3 and cli_errors.BAD_INPUT_EXIT == 2
  assert "3  preempted" in cli_errors.__doc__ and "2  bad input" in cli_errors.__doc__


def test_sweep_reports_preempted_rows(tmp_path, monkeypatch):
  folder = tmp_path / "ablation"
  folder.mkdir()
  (folder / "base.flags").write_text("--steps=4\n")
  for name in ("a", "b"):
    (folder / f"{name}.flags").write_text("--flagfile=base.flags\n")
  codes = iter([cli_errors.PREEMPTED_EXIT, cli_errors.PREEMPTED_EXIT])
  monkeypatch.setattr(sweep.subprocess, "call", lambda cmd: next(codes))
  root = tmp_path / "runs"
  assert sweep.main([str(folder), f"--workdir_root={root}"]) == cli_errors.PREEMPTED_EXIT
  table = (root / "results.md").read_text()
  assert "| a | preempted |" in table and "| b | preempted |" in table
  assert "failed" not in table


def test_sweep_table_tells_preempted_from_failed():
  table = sweep.markdown_table({"p": {"status": "preempted"}, "f": {}, "ok": {"step": 2}})
  assert "| p | preempted |" in table and "| f | failed |" in table and "| ok | 2 |" in table


def test_sweep_without_flag_files_is_one_fatal_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jaxpref.sweep", str(tmp_path)],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("FATAL: jaxpref-sweep: no *.flags")


def test_convert_and_eval_entry_points_are_wrapped():
  import inspect
  from jaxpref.eval import reward_eval
  from jaxpref.models import convert
  for module in (convert, reward_eval):
    assert "entry_point" in inspect.getsource(module.run), module.__name__
  from jaxpref.data import cli
  assert cli.run.__wrapped__  # functools.wraps of cli_errors.entry_point
