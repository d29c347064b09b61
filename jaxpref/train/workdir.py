"""Workdir integrity: one run at a time per workdir, and a record of what the run is.

`WorkdirLock` holds an exclusive `fcntl.flock` on WORKDIR/.lock for the whole run; the file
names the holder (pid, host), so a second run is refused with who holds it. The kernel
drops the lock when its process dies (also on SIGKILL), so a lock left behind by a dead run
is simply taken, and said so (its file still names the dead holder). flock works across
hosts on local disks and NFS (Linux emulates it with POSIX locks there), not on every
network filesystem; there the lock is advisory at best.

A `gs://` workdir cannot be locked (an object store has no flock, and a preempted run never
releases anything). There `.lock` is a marker: the run writes its holder (pid, host, start,
a random run id) and empties it at a clean end. A marker still naming a holder is taken
over and said so, as above, since a preempted run is the usual cause; a second live run on
the same gs:// workdir is not refused, so give each run its own workdir. Only process 0
writes the workdir's files (lock, run.json, flags.txt, metrics); every process writes its
checkpoint shards through orbax.

`run.json` records the settings that change a run's result (`settings_of`): a resume
compares them (`check_resume`) and refuses a mismatch listing each differing setting, or,
allowed (`--allow_flag_changes`), appends a segment to the run's `history`. It is written
atomically (temp file + rename), so a killed run leaves the old record or the new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
import uuid
from typing import Any, Optional

from jaxpref import paths
from jaxpref.cli_errors import WorkdirError
from jaxpref.data import hub

LOCK_FILE = ".lock"
RUN_FILE = "run.json"
_FIRST_MB = 1 << 20
_FULL_HASH_BELOW = 64 << 20  # files up to this size are hashed whole (cheap next to training)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  return True


class WorkdirLock:
  """An exclusive lock on a workdir: `with WorkdirLock(workdir) as lock: ...`, or
  `acquire()` / `release()`. `note` says when a dead run's lock was taken over."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = paths.join(workdir, LOCK_FILE)
    self.note: Optional[str] = None
    self.run_id: Optional[str] = None  # a gs:// workdir's marker names the run by it
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    if paths.is_remote(self.workdir):
      return self._mark()
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd)
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise WorkdirError(f"{self.path}: cannot lock the workdir ({e.strerror})") from e
      raise WorkdirError(
          f"{self.workdir} is in use by another run (pid {holder.get('pid', '?')} on host "
          f"{holder.get('host', '?')}, since {holder.get('started', '?')}); wait for it to "
          "finish or stop it, or use another --workdir") from None
    previous = _read_holder(fd)
    if previous.get("pid") is not None:  # a holder that ended without releasing: it died
      host = previous.get("host", "?")
      state = ("not running" if host == socket.gethostname()
               and not _alive(int(previous["pid"])) else "its lock was free")
      self.note = (f"{self.workdir}: took over the lock of pid {previous['pid']} on host {host} "
                   f"(since {previous.get('started', '?')}; {state}): that run ended without "
                   "releasing it")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": _now()}).encode() + b"\n", 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def _mark(self) -> "WorkdirLock":
    """A gs:// workdir's `.lock`: a marker naming this run, not a lock (module doc)."""
    previous = {}
    if paths.exists(self.path):
      with paths.open(self.path) as f:
        with contextlib.suppress(ValueError):  # an empty or garbled marker names no one
          previous = json.loads(f.read() or "{}")
    if previous.get("pid") is not None:
      self.note = (f"{self.workdir}: took over the run marker of pid {previous['pid']} on host "
                   f"{previous.get('host', '?')} (since {previous.get('started', '?')}): that "
                   "run ended without clearing it (a gs:// workdir cannot be locked; if it "
                   "still runs, stop one of the two)")
    self.run_id = uuid.uuid4().hex[:12]
    with paths.open(self.path, "w") as f:
      f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                          "started": _now(), "run_id": self.run_id}) + "\n")
    self._fd = -1  # held: nothing to unlock, the marker to clear
    return self

  def release(self) -> None:
    """Empties the file (a clean end) and unlocks; the file stays, so that a run waiting on
    the same inode and a new one never lock two different files."""
    if self._fd is None:
      return
    if self._fd == -1:  # a gs:// marker: cleared, unless the storage fails at the very end
      with contextlib.suppress(OSError):
        with paths.open(self.path, "w") as f:
          f.write("")
      self._fd = None
      return
    with contextlib.suppress(OSError):  # a full or read-only disk must not stop the release
      os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire() if self._fd is None else self

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    return json.loads(text) if text else {}
  except (OSError, ValueError):
    return {}


def file_fingerprint(path: str) -> dict:
  """size and sha256 of a file up to 64 MiB; above, size, mtime and the sha256 of its first
  MiB (a change past it is then caught by size or mtime only). A small file's mtime is left
  out: a copy or a checkout of the same bytes is the same data."""
  size = paths.size(path)
  h = hashlib.sha256()
  with paths.open(path, "rb") as f:
    if size <= _FULL_HASH_BELOW:
      while block := f.read(1 << 24):
        h.update(block)
      return {"size": size, "sha256": h.hexdigest()}
    h.update(f.read(_FIRST_MB))
  return {"size": size, "mtime": int(paths.mtime(path)), "sha256_first_mib": h.hexdigest()}


def path_fingerprint(path: str) -> Any:
  """{name: fingerprint} of every file a path names (a file, a folder, walked, or a glob);
  None for "" (no such input)."""
  if not path:
    return None
  if paths.isdir(path):
    return {name: file_fingerprint(paths.join(path, name)) for name in paths.walk_files(path)}
  files = [path] if paths.isfile(path) else sorted(paths.glob(path))
  base = paths.dirname(path)
  return {os.path.relpath(f, base): file_fingerprint(f) for f in files if paths.isfile(f)}


# Settings that do not change the numbers a run produces: how often it logs, where it
# writes, how it shows progress. Everything else in a RunConfig is compared on resume.
IGNORED = frozenset({"workdir", "progress", "plot", "log_every", "eval_every",
                     "checkpoint_every", "keep_checkpoints", "log_records", "export_hf",
                     "reference_cache", "mesh", "data.eval_batch_size", "logps.impl"})


def _flatten(prefix: str, value: Any, out: dict) -> None:
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
  if isinstance(value, dict):
    for k in sorted(value):
      _flatten(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    return
  if isinstance(value, tuple):
    value = list(value)
  if not isinstance(value, (str, int, float, bool, list, type(None))):
    value = repr(value)
  out[prefix] = value


# RunConfig fields whose flag (jaxpref/flags.py) has another name; keys become flag names.
_FLAG_NAMES = {"model_preset": "model", "data.seed": "data_seed",
               "data.skip_invalid": "skip_invalid_records", "data.format": "data_format",
               "data.fields": "data_fields", "optim.b1": "adam_b1", "optim.b2": "adam_b2",
               "logps.fused_lm_head": "fused_lm_head", "lora.rank": "lora_rank",
               "lora.alpha": "lora_alpha", "lora.targets": "lora_targets"}


def _flag_name(key: str) -> str:
  if key in _FLAG_NAMES:
    return _FLAG_NAMES[key]
  head, _, rest = key.partition(".")
  if head == "loss_hparams":
    return f"loss.{rest}"
  return rest if head in ("data", "optim", "logps") and rest else key


def settings_of(cfg, fingerprints: bool = True) -> dict:
  """The result-changing settings of a RunConfig as a flat {flag name: value} dict (
  "loss.beta", "model.rope_theta", "max_len"): model, loss and its hparams, optimizer, data
  layout and batch size, seeds, steps, and (with `fingerprints`, as "train_data files"...)
  the size and sha256 of the data, tokenizer and --init_from files."""
  flat: dict = {}
  _flatten("", cfg, flat)
  out = {_flag_name(k): v for k, v in flat.items()
         if k not in IGNORED and k.split(".")[0] not in IGNORED}
  if fingerprints:
    for key, path in (("train_data", cfg.data.train_data), ("eval_data", cfg.data.eval_data),
                      ("tokenizer", cfg.data.tokenizer), ("init_from", cfg.init_from)):
      out[f"{key} files"] = path_fingerprint(path)
      if hub.origin(path or ""):  # the Hub id and commit the snapshot folder holds
        out[f"{key} hub"] = hub.origin(path)
  return out


def differences(old: dict, new: dict) -> dict:
  """{setting: [recorded, now]} for every setting whose value differs (or is new/gone)."""
  return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)}


def _write_json(path: str, obj: dict) -> None:
  if paths.is_remote(path):  # an object is written whole or not at all
    with paths.open(path, "w") as f:
      f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    return
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_record(workdir: str) -> Optional[dict]:
  path = paths.join(workdir, RUN_FILE)
  if not paths.exists(path):
    return None
  try:
    with paths.open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise WorkdirError(f"{path}: not a readable run record ({e}); move it aside to start "
                       "the record afresh") from None


def record(workdir: str, settings: dict) -> None:
  """Writes WORKDIR/run.json for a run that starts at step 0: its settings, one segment."""
  paths.makedirs(workdir)
  _write_json(paths.join(workdir, RUN_FILE), {
      "settings": settings,
      "history": [{"segment": 0, "started": _now(), "host": socket.gethostname(),
                   "pid": os.getpid(), "changed": {}}]})


def _show(value: Any) -> str:
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= 60 else text[:57] + "..."


def check_resume(workdir: str, settings: dict, allow_changes: bool = False,
                 step: Optional[int] = None) -> list[str]:
  """Compares a resumed run's settings with WORKDIR/run.json. Equal: returns []. Different:
  raises WorkdirError listing each differing setting, or with `allow_changes` records a new
  segment (its changes, the step it starts at) and returns the differences as lines. A
  workdir without a record (written before run.json existed) is recorded now and said."""
  rec = read_record(workdir)
  if rec is None:
    record(workdir, settings)
    return [f"{workdir}: no {RUN_FILE} (an older run); recorded this run's settings"]
  diff = differences(rec.get("settings", {}), settings)
  if not diff:
    return []
  lines = [f"--{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in diff.items()]
  if not allow_changes:
    raise WorkdirError(
        f"{workdir}: resuming with settings other than the run's ({RUN_FILE}): "
        + "; ".join(lines) + ". Use the run's flags (its flags.txt), another --workdir, or "
        "--allow_flag_changes to continue with these and record the change")
  history = rec.setdefault("history", [])
  history.append({"segment": len(history), "started": _now(), "host": socket.gethostname(),
                  "pid": os.getpid(), "step": step, "changed": diff})
  rec["settings"] = settings
  _write_json(paths.join(workdir, RUN_FILE), rec)
  return lines


def begin(cfg, resuming: bool, allow_changes: bool = False,
          step: Optional[int] = None) -> list[str]:
  """The run record for a run about to train: a fresh run (no checkpoint) writes run.json;
  a resumed one is checked against it (`check_resume`). Returns the lines to say."""
  settings = settings_of(cfg)
  if resuming:
    return check_resume(cfg.workdir, settings, allow_changes, step)
  record(cfg.workdir, settings)
  return []


def latest_checkpoint(workdir: str) -> Optional[int]:
  """The newest WORKDIR/checkpoints/<step> folder's step (None: a fresh run). Which one
  restores is the Checkpointer's question; this only says whether the run resumes."""
  folder = paths.join(workdir, "checkpoints")
  steps = [int(d) for d in paths.listdir(folder) if d.isdigit()] if paths.isdir(folder) else []
  return max(steps) if steps else None
