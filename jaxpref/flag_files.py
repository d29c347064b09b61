"""Flag files that include other flag files, with paths relative to the file that names
them: a relative --flagfile, --loss_module=FILE.py or --online.reward_fn=FILE.py:name
inside a flag file is found from that file's folder. A flag file may be a `gs://` URL
(`jaxpref.paths`): a run's flags.txt in a bucket re-runs it."""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from jaxpref import paths


def _relative_to(base: str, line: str) -> str:
  """A --loss_module=FILE.py or --online.reward_fn=FILE.py:name written in a flag file is
  found from that file's folder."""
  for flag, suffix in (("--loss_module=", ""), ("--online.reward_fn=", ":")):
    if not line.startswith(flag):
      continue
    value = line[len(flag):]
    target, sep, name = value.rpartition(":") if suffix else (value, "", "")
    if target.endswith(".py") and not os.path.isabs(target) and os.path.exists(
        os.path.join(base, target)):
      return flag + os.path.normpath(os.path.join(base, target)) + sep + name
  return line


def expand_flagfiles(argv: Sequence[str], base: str = "", _seen: tuple = ()) -> list[str]:
  """Inlines --flagfile=F (recursively); inside a file, relative paths are from its folder."""
  out = []
  for arg in argv:
    if not arg.startswith(("--flagfile=", "-flagfile=")):
      out.append(arg)
      continue
    path = os.path.expanduser(arg.split("=", 1)[1])
    if (base and not os.path.isabs(path) and not paths.is_remote(path)
        and paths.exists(paths.join(base, path))):
      path = paths.join(base, path)
    if not paths.exists(path):
      raise flags.Error(f"--flagfile: no such file {path!r}" + (f" (included from {base})" if base else ""))
    if paths.abspath(path) in _seen:
      raise flags.Error(f"--flagfile: {path} includes itself")
    with paths.open(path) as f:
      lines = [ln.strip() for ln in f]
    lines = [_relative_to(paths.dirname(path), ln) for ln in lines if ln and not ln.startswith(("#", "//"))]
    out.extend(expand_flagfiles(lines, paths.dirname(path), _seen + (paths.abspath(path),)))
  return out
