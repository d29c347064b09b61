"""One error path for every command-line entry point: jaxpref's own errors are one line.

Exit codes (every `jaxpref-*` command):

  0  done
  1  crashed: an unexpected exception (its traceback, then one `FATAL:` summary line), or a
     `RunError`: the run could not go on for a reason outside its input (a full disk, a
     writer that failed); one `FATAL:` line, no traceback
  2  bad input: a `UserError` (a flag, a data file, a record, a workdir in use or written
     with other settings); one `FATAL:` line naming the flag, file or record
  3  preempted (`PREEMPTED_EXIT`): SIGTERM was honoured, the last checkpoint is saved and
     `final_metrics.json` is not written; re-run the same command to continue

Some commands keep exit codes of their own for a verdict that is not an error
(`jaxpref-data validate` exits 1 when training would stop on the data); see their --help.

This module imports only the standard library, so an entry point can use it before
anything heavy (jax, orbax) is loaded.
"""

from __future__ import annotations

import errno
import functools
import sys
import traceback
from typing import Callable

DONE_EXIT = 0
CRASHED_EXIT = 1
BAD_INPUT_EXIT = 2
PREEMPTED_EXIT = 3


class UserError(ValueError):
  """Bad input: the message names the flag, file, line or field, and says what to do.

  A ValueError, so code that catches ValueError around input handling keeps working."""


class DataError(UserError):
  """A problem with a data file; the message starts with `FILE:LINE:` (or `FILE:`)."""


class FlagError(UserError):
  """A flag value or combination that cannot work; the message names the flag."""


class WorkdirError(UserError):
  """A workdir that cannot be used as asked: held by another run, written with other
  settings, or without a checkpoint that restores."""


class RunError(Exception):
  """The run cannot go on for a reason outside its input (a full disk, a writer that died):
  one line, exit 1, no traceback (it would only show where the write happened)."""


class WriterError(RunError):
  """A metrics, TensorBoard, plot or checkpoint writer failed; the message names the path."""


class Preempted(Exception):
  """Raised by the loop after it saved a checkpoint on SIGTERM: exit `PREEMPTED_EXIT`."""


# An OSError on one of these is a path the user gave that cannot be used: bad input.
_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                errno.EISDIR, errno.ENAMETOOLONG}


def _is_user_error(e: BaseException) -> bool:
  if isinstance(e, UserError):
    return True
  # jaxpref.data.sources.DataError predates this module and subclasses ValueError only;
  # looked up (never imported) so that this module stays light.
  sources = sys.modules.get("jaxpref.data.sources")
  return sources is not None and isinstance(e, getattr(sources, "DataError", ()))


def one_line(e: BaseException) -> str:
  """The exception's message on one line (a FATAL line must stay one line)."""
  return " ".join(str(e).split()) or type(e).__name__


def classify(e: BaseException) -> tuple[int, str]:
  """(exit code, the FATAL line's text) for an exception that ends a command."""
  if isinstance(e, Preempted):
    return PREEMPTED_EXIT, f"PREEMPTED: {one_line(e)}"
  if _is_user_error(e):
    return BAD_INPUT_EXIT, f"FATAL: {one_line(e)}"
  if isinstance(e, RunError):
    return CRASHED_EXIT, f"FATAL: {one_line(e)}"
  if isinstance(e, FileNotFoundError) and e.errno is None:
    return BAD_INPUT_EXIT, f"FATAL: {one_line(e)}"  # raised with a message naming the flag
  if isinstance(e, OSError) and e.errno is not None:
    # A path that cannot be used needs no traceback; neither does a full disk (exit 1).
    where = f"{e.filename}: " if e.filename else ""
    code = BAD_INPUT_EXIT if e.errno in _PATH_ERRNOS else CRASHED_EXIT
    return code, f"FATAL: {where}{e.strerror or one_line(e)}"
  return CRASHED_EXIT, (f"FATAL: crashed with {type(e).__name__}: {one_line(e)} (a bug: "
                        "please report it with the traceback above)")


def entry_point(fn: Callable) -> Callable:
  """Wraps a console-script function: its return value (an int or None) is the exit code;
  jaxpref's errors become one FATAL line and their exit code; anything else keeps its
  traceback, then gets a one-line summary and exit 1. SystemExit passes through."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      code = fn(*args, **kwargs)
    except (SystemExit, KeyboardInterrupt):
      raise
    except Exception as e:  # noqa: BLE001 (every exception leaves through one door)
      code, line = classify(e)
      if code == CRASHED_EXIT and line.startswith("FATAL: crashed"):
        traceback.print_exc()
      sys.stderr.flush()
      print(line, file=sys.stderr, flush=True)
      sys.exit(code)
    sys.exit(code or DONE_EXIT)

  return wrapped
