"""Orbax checkpoints of the train state together with the data position.

The data order is a pure function of (data seed, step) (`jaxpref.data.batch_indices`), so
the data position saved beside the model is the seed and step; a resumed run checks the
seed and continues with exactly the batches it would have seen. Prepared data
(`data.grain_source`) reads through a grain iterator instead: set `data_iterator` and its
state is saved in every checkpoint (a `data_iter` item, one JSON file per process) and
restored in place.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:

  data_iterator = None  # a grain iterator (`grain_source.GrainBatcher`'s) saved with the state

  def __init__(self, directory: str, every: int, keep: int):
    self.every = max(every, 1)
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max(keep, 1), enable_async_checkpointing=True, create=True))

  @property
  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_position: dict, force: bool = False) -> bool:
    """Saves (asynchronously) every `every` steps, or now with `force`."""
    if not force and step % self.every:
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position),
        **self._iterator_args("CheckpointSave")), force=True)

  def restore(self, like: Any) -> tuple[Any, dict, int]:
    """Restores the latest checkpoint into the structure (and shardings) of `like`."""
    step = self._manager.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        **self._iterator_args("CheckpointRestore")))
    logging.info("restored checkpoint at step %d", step)
    return out.state, dict(out.data), step

  def _iterator_args(self, kind: str) -> dict:
    if self.data_iterator is None:
      return {}
    import grain  # only prepared-data runs need it
    return {"data_iter": getattr(grain.checkpoint, kind)(self.data_iterator)}

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
