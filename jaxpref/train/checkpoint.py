"""Orbax checkpoints of the train state together with the data position.

The data order is a pure function of (data seed, step) (`jaxpref.data.batch_indices`), so
the data position saved beside the model is the seed and step; a resumed run checks the
seed and continues with exactly the batches it would have seen. Prepared data
(`data.grain_source`) reads through a grain iterator instead: set `data_iterator` and its
state is saved in every checkpoint (a `data_iter` item, one JSON file per process) and
restored in place.

Resume takes the newest checkpoint that restores. One that does not (a file missing or
garbled by a crash, a full disk or a hand edit) is named, moved aside to
`checkpoints/bad/<step>` (never deleted) and the one before it is used, but only once an
older one has restored: when none does, the likelier cause is a run with another model or
state layout, so nothing is moved and a one-line `CheckpointError` lists each step's
failure. `notes` holds what was moved, for the loop to say.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxpref import paths
from jaxpref.cli_errors import WorkdirError, WriterError, one_line

BAD_DIR = "bad"


def holds_reference(cfg) -> bool:
  """Whether a run's checkpoints hold {"train": state, "ref": reference params} rather than
  the state alone: with reference syncing or --rounds the reference is training state too."""
  return cfg.ref_sync_every > 0 or cfg.rounds > 1


def saved_layout(cfg, state, ref_params):
  """What the run's checkpoints hold (`holds_reference`), for restoring into."""
  return {"train": state, "ref": ref_params} if holds_reference(cfg) else state


class CheckpointError(WorkdirError):
  """No checkpoint of a workdir restores; the message lists each one's failure."""


def _os_error(e: BaseException) -> Optional[OSError]:
  """The OSError behind an (orbax-wrapped) exception, if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError) and e.errno is not None:
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


class Checkpointer:

  data_iterator = None  # a grain iterator (`grain_source.GrainBatcher`'s) saved with the state

  def __init__(self, directory: str, every: int, keep: int):
    self.every = max(every, 1)
    # A gs:// URL goes to orbax as it is: every host writes its shards to the bucket.
    self.directory = paths.abspath(directory)
    self.notes: list[str] = []  # checkpoints moved aside by `restore`
    self._pending: Optional[int] = None  # the step of an async save not yet waited for
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max(keep, 1), enable_async_checkpointing=True, create=True))

  @property
  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_position: dict, force: bool = False) -> bool:
    """Saves (asynchronously) every `every` steps, or now with `force`. A failed write
    (a full disk) raises WriterError; the checkpoints already written stay intact."""
    if not force and step % self.every:
      return False
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position),
          **self._iterator_args("CheckpointSave")), force=True)
    except Exception as e:  # noqa: BLE001 (orbax wraps the OSError in its own types)
      raise self._write_error(step, e) or e
    self._pending = step if saved else self._pending
    return saved

  def _write_error(self, step: Optional[int], e: BaseException) -> Optional[WriterError]:
    cause = _os_error(e)
    if cause is None:
      return None
    kept = [s for s in self._manager.all_steps() if s != step]
    return WriterError(
        f"{self.directory}/{step if step is not None else ''}: cannot write the checkpoint "
        f"({cause.strerror or cause}); "
        + (f"the one at step {max(kept)} is intact" if kept else "no earlier checkpoint"))

  def restore(self, like: Any) -> tuple[Any, dict, int]:
    """Restores the newest checkpoint that restores into the structure (and shardings) of
    `like`; newer ones that fail are moved aside (see the module doc)."""
    failed = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      problem = self._missing_files(step)
      if problem is None:
        try:
          out = self._restore(step, like)
        except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many kinds)
          problem = f"{type(e).__name__}: {one_line(e)[:300]}"
      if problem is not None:
        failed.append((step, problem))
        logging.warning("checkpoint %d does not restore: %s", step, problem)
        continue
      if failed:
        self._move_aside(failed, step)
      logging.info("restored checkpoint at step %d", step)
      return out
    listing = "; ".join(f"step {s}: {p}" for s, p in failed) or "none found"
    raise CheckpointError(
        f"{self.directory}: no checkpoint restores ({listing}). Nothing was moved: a run "
        "with another --model or state layout fails on every one; to start afresh, move "
        "the checkpoints folder aside")

  def _restore(self, step: int, like: Any) -> tuple[Any, dict, int]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        **self._iterator_args("CheckpointRestore")))
    return out.state, dict(out.data), step

  def _missing_files(self, step: int) -> Optional[str]:
    """What a complete checkpoint has and this one lacks (orbax writes them all; some
    restore without complaint when lost, but such a checkpoint is not trusted)."""
    folder = paths.join(self.directory, str(step))
    if not paths.isdir(folder) or not paths.listdir(folder):
      return "empty step folder"
    for name in ("state/_METADATA", "data/metadata"):
      if not paths.isfile(paths.join(folder, name)):
        return f"missing {name}"
    try:
      with paths.open(paths.join(folder, "data", "metadata")) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      return f"data/metadata unreadable ({one_line(e)})"
    return None

  def _move_aside(self, failed: list, used: int) -> None:
    bad = paths.join(self.directory, BAD_DIR)
    paths.makedirs(bad)
    for step, problem in failed:
      dest, n = paths.join(bad, str(step)), 1
      while paths.exists(dest):  # the same step may go bad twice
        dest, n = paths.join(bad, f"{step}.{n}"), n + 1
      paths.move(paths.join(self.directory, str(step)), dest)
      self.notes.append(f"checkpoint at step {step} does not restore ({problem}); moved to "
                        f"{dest}, resuming from step {used}")
      logging.warning(self.notes[-1])
    self._manager.reload()  # forget the moved steps

  def _iterator_args(self, kind: str) -> dict:
    if self.data_iterator is None:
      return {}
    import grain  # only prepared-data runs need it
    return {"data_iter": getattr(grain.checkpoint, kind)(self.data_iterator)}

  def wait(self) -> None:
    """Waits for the pending asynchronous save; a failed write raises WriterError."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._write_error(self._pending, e) or e
    self._pending = None

  def close(self) -> None:
    self._manager.close()
