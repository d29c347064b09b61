"""Local paths and cloud URLs (`gs://bucket/run`) behind one small set of file functions.

A path without a scheme goes straight to `os`, `glob` and `open`, exactly as before: the
same speed, errors and guarantees (O_APPEND, flock, atomic `os.replace`). A URL goes
through `etils.epath`, the path library orbax itself uses; for `gs://` it reads and writes
with fsspec's gcsfs (TensorFlow's gfile instead, when TensorFlow is installed), so the
credentials are the usual Google ones (a TPU VM's service account, `gcloud auth
application-default login`) and `STORAGE_EMULATOR_HOST` points it at an emulator.

What an object store lacks, callers handle where they need it (the module docs of
`train.workdir` and `train.metrics` say how): no appends, no locks, and `replace` is a copy
and a delete, atomic per object but not across a crash between the two.
"""

from __future__ import annotations

import builtins
import fnmatch
import glob as glob_lib
import os
import shutil
import tempfile
from typing import Iterable


def is_remote(path: str) -> bool:
  """True for a URL with a scheme (`gs://...`), the paths this module sends to epath."""
  return "://" in str(path)


def _epath(path: str):
  from etils import epath  # only runs with a cloud path pay for the import (and gcsfs)
  return epath.Path(path)


def _fresh(path: str):
  """`_epath(path)` with gcsfs's listing cache dropped first: another process (a resumed
  run, orbax's tensorstore, another host) may have written since this one last listed."""
  from etils.epath import backend  # only runs with a cloud path pay for the import
  p = _epath(path)
  if p._backend is backend.fsspec_backend:  # noqa: SLF001 (TensorFlow's gfile keeps none)
    backend.fsspec_backend.fs(path).invalidate_cache()
  return p


def join(path: str, *parts: str) -> str:
  return "/".join([path.rstrip("/"), *parts]) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str) -> str:
  if is_remote(path):
    head = path.rstrip("/").rsplit("/", 1)[0]
    return head if "://" in head and not head.endswith(":/") else path
  return os.path.dirname(path)


def abspath(path: str) -> str:
  """A local path made absolute; a URL as it is (orbax must get `gs://...` unchanged)."""
  return path if is_remote(path) else os.path.abspath(path)


def open(path: str, mode: str = "r", **kwargs):  # noqa: A001 (the builtin's drop-in)
  if not is_remote(path):
    return builtins.open(path, mode, **kwargs)
  return _epath(path).open(mode, **kwargs)


def exists(path: str) -> bool:
  return _fresh(path).exists() if is_remote(path) else os.path.exists(path)


def isfile(path: str) -> bool:
  return _fresh(path).is_file() if is_remote(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
  return _fresh(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  if not is_remote(path):
    return os.listdir(path)
  return [p.name for p in _fresh(path).iterdir()]


def makedirs(path: str) -> None:
  """`os.makedirs(path, exist_ok=True)`; on an object store folders need no creating."""
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  """Removes a folder and all it holds; a missing folder is no error."""
  if is_remote(path):
    _epath(path).rmtree(missing_ok=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def replace(src: str, dst: str) -> None:
  """`os.replace`; between URLs a copy then a delete (each object is written whole)."""
  if is_remote(src) or is_remote(dst):
    # Not epath's rename: gcsfs tries GCS's move API first, which only some buckets have.
    copy(src, dst)
    remove(src)
  else:
    os.replace(src, dst)


def move(src: str, dst: str) -> None:
  """A file or folder moved (`shutil.move`); between URLs each object copied, then deleted."""
  if not (is_remote(src) or is_remote(dst)):
    shutil.move(src, dst)
    return
  if isdir(src):
    for name in walk_files(src):
      copy(join(src, name), join(dst, name))
    rmtree(src)
  else:
    replace(src, dst)


def copy(src: str, dst: str) -> None:
  """One file copied, either side local or a URL."""
  if not (is_remote(src) or is_remote(dst)):
    shutil.copyfile(src, dst)
    return
  if is_remote(src) and is_remote(dst):  # copied inside the store, never through this host
    _epath(src).copy(dst, overwrite=True)
    return
  with open(src, "rb") as fin, open(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout, 1 << 24)


def size(path: str) -> int:
  return _fresh(path).stat().length if is_remote(path) else os.path.getsize(path)


def mtime(path: str) -> float:
  return _fresh(path).stat().mtime if is_remote(path) else os.stat(path).st_mtime


def has_magic(path: str) -> bool:
  return glob_lib.has_magic(path.split("://", 1)[-1])


def glob(pattern: str) -> list[str]:
  """`glob.glob(pattern, recursive=True)` for both kinds; URLs keep their scheme."""
  if not is_remote(pattern):
    return glob_lib.glob(pattern, recursive=True)
  scheme, rest = pattern.split("://", 1)
  parts = rest.split("/")
  fixed = next(i for i, p in enumerate(parts) if glob_lib.has_magic(p))
  base, pat = f"{scheme}://" + "/".join(parts[:fixed]), parts[fixed:]
  if "**" not in pat:
    return [str(p) for p in _fresh(base).glob("/".join(pat))]
  # epath refuses `**` on GCS (one listing per folder); one walk of the base matches it here.
  return [join(base, f) for f in walk_files(base) if _match(f.split("/"), pat)]


def _match(names: list[str], pat: list[str]) -> bool:
  """glob's rule for path components: `**` stands for any number of them (none too)."""
  if not pat:
    return not names
  if pat[0] == "**":
    return any(_match(names[i:], pat[1:]) for i in range(len(names) + 1))
  return bool(names) and fnmatch.fnmatchcase(names[0], pat[0]) and _match(names[1:], pat[1:])


def walk_files(path: str) -> list[str]:
  """Every file under a folder, as sorted paths relative to it."""
  if not is_remote(path):
    return sorted(os.path.relpath(os.path.join(root, n), path)
                  for root, _, names in os.walk(path) for n in names)
  bare = lambda p: str(p).split("://", 1)[-1].rstrip("/")  # walk's roots may lack the scheme
  top, out = bare(path), []
  for root, _, names in _fresh(path).walk():
    out += [os.path.relpath(f"{bare(root)}/{n}", top) for n in names]
  return sorted(out)


def local_copy(path: str, patterns: Iterable[str] | None = None) -> str:
  """A local path holding what a URL holds: `path` itself when it is local, else a copy under
  `$JAXPREF_CACHE` (default `~/.cache/jaxpref/remote`) at the URL's own path
  (`gs/bucket/models/llama`), made once and fetched again where a file's size or
  modification time changed. For what needs a local file: memory-mapped safetensors,
  sentencepiece and tokenizers, which open paths themselves. `patterns` (glob rules, `**` for
  any depth) limit a folder's copy to the files they match."""
  if not is_remote(path):
    return path
  root = os.environ.get("JAXPREF_CACHE", os.path.expanduser("~/.cache/jaxpref/remote"))
  scheme, rest = path.rstrip("/").split("://", 1)
  dest = os.path.join(root, scheme, *[p for p in rest.split("/") if p not in ("", ".", "..")])
  if not isdir(path):
    if not exists(path):
      raise FileNotFoundError(f"{path}: no such file or folder")
    _fetch(path, dest)
    return dest
  wanted = [p.split("/") for p in patterns] if patterns is not None else [["**"]]
  for name in walk_files(path):
    if any(_match(name.split("/"), w) for w in wanted):
      _fetch(join(path, name), os.path.join(dest, name))
  return dest


def _fetch(src: str, dest: str) -> None:
  stat = _fresh(src).stat()
  if (os.path.isfile(dest) and os.path.getsize(dest) == stat.length
      and int(os.path.getmtime(dest)) == int(stat.mtime)):
    return
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".part.")
  os.close(fd)
  try:
    copy(src, tmp)
    os.utime(tmp, (stat.mtime, stat.mtime))  # what the next call compares
    os.replace(tmp, dest)  # whole or absent: a killed copy is fetched again
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
