"""Issue 19, corrupt checkpoints: resume takes the newest checkpoint that restores; a bad one
is named and moved to checkpoints/bad/<step> (not deleted); none restoring is one line."""

import errno
import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.cli_errors import WorkdirError, WriterError
from jaxpref.train.checkpoint import CheckpointError, Checkpointer

TREE = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}


def _written(directory, steps=(1, 2, 3)):
  c = Checkpointer(str(directory), 1, 5)
  for s in steps:
    c.save(s, jax.tree.map(lambda x: x * s, TREE), {"seed": 0, "step": s}, force=True)
  c.wait()
  c.close()
  return str(directory)


def _data_files(step_dir):
  return [f for f in glob.glob(f"{step_dir}/state/**/d/*", recursive=True) if os.path.isfile(f)]


def _remove_metadata(d):
  os.remove(f"{d}/state/_METADATA")


def _remove_data_files(d):
  for f in _data_files(d):
    os.remove(f)


def _garble_data_files(d):
  for f in _data_files(d):
    with open(f, "wb") as fh:
      fh.write(b"garbage" * 10)


def _remove_data_metadata(d):
  os.remove(f"{d}/data/metadata")


def _empty_step_folder(d):
  shutil.rmtree(d)
  os.makedirs(d)


CORRUPTIONS = {"missing _METADATA": _remove_metadata, "missing data file": _remove_data_files,
               "garbage data file": _garble_data_files,
               "missing data/metadata": _remove_data_metadata,
               "empty step folder": _empty_step_folder}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_and_moves_it_aside(tmp_path, case):
  d = _written(tmp_path / "ckpt")
  CORRUPTIONS[case](f"{d}/3")
  c = Checkpointer(d, 1, 5)
  state, data, step = c.restore(TREE)
  assert step == 2 and data == {"seed": 0, "step": 2}
  np.testing.assert_array_equal(state["w"], TREE["w"] * 2)
  assert os.path.isdir(f"{d}/bad/3") and not os.path.exists(f"{d}/3")  # kept, out of the way
  assert len(c.notes) == 1 and "step 3" in c.notes[0] and f"{d}/bad/3" in c.notes[0]
  assert c.latest_step == 2
  # Training goes on: the next save of step 3 is a fresh checkpoint beside the bad one.
  c.save(3, jax.tree.map(lambda x: x * 3, TREE), {"seed": 0, "step": 3}, force=True)
  c.wait()
  c.close()
  c = Checkpointer(d, 1, 5)
  assert c.restore(TREE)[2] == 3 and not c.notes


def test_two_bad_checkpoints_are_both_moved(tmp_path):
  d = _written(tmp_path / "ckpt")
  _remove_data_metadata(f"{d}/3")
  _empty_step_folder(f"{d}/2")
  c = Checkpointer(d, 1, 5)
  assert c.restore(TREE)[2] == 1
  assert sorted(os.listdir(f"{d}/bad")) == ["2", "3"] and len(c.notes) == 2


def test_none_restores_is_one_line_and_moves_nothing(tmp_path):
  d = _written(tmp_path / "ckpt", steps=(1, 2))
  for s in (1, 2):
    _remove_data_metadata(f"{d}/{s}")
  c = Checkpointer(d, 1, 5)
  with pytest.raises(CheckpointError) as e:
    c.restore(TREE)
  msg = str(e.value)
  assert "\n" not in msg and "step 2: missing data/metadata" in msg and "step 1:" in msg
  assert isinstance(e.value, WorkdirError)  # bad input: exit 2, one FATAL line
  assert sorted(os.listdir(d)) == ["1", "2"]  # nothing moved


def test_another_model_moves_nothing(tmp_path):
  """A tree of other shapes fails on every checkpoint: a config change, not corruption."""
  d = _written(tmp_path / "ckpt", steps=(1, 2))
  other = {"w": jnp.zeros((4, 4)), "b": jnp.ones(3)}
  with pytest.raises(CheckpointError, match="no checkpoint restores"):
    Checkpointer(d, 1, 5).restore(other)
  assert sorted(os.listdir(d)) == ["1", "2"]


def test_full_disk_while_saving_is_a_writer_error(tmp_path, monkeypatch):
  d = _written(tmp_path / "ckpt", steps=(1,))
  c = Checkpointer(d, 1, 5)

  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(c._manager, "save", full)
  with pytest.raises(WriterError, match="No space left on device.*step 1 is intact"):
    c.save(2, TREE, {"seed": 0, "step": 2}, force=True)
  c.close()
  assert Checkpointer(d, 1, 5).restore(TREE)[2] == 1
