"""jaxpref.paths on gs:// (against the local emulator) and on local paths, side by side:
each function must answer the same for a bucket as for a folder holding the same files."""

import os

import pytest

from jaxpref import paths


def _fill(root):
  paths.makedirs(paths.join(root, "data", "sub"))
  for name, text in (("data/a.jsonl", "1\n"), ("data/b.parquet", "22"),
                     ("data/sub/c.jsonl", "333"), ("data/README.md", "x")):
    with paths.open(paths.join(root, name), "w") as f:
      f.write(text)


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path)
  emulator = request.getfixturevalue("gcs")
  return f"gs://{emulator.bucket}/run"


def test_file_functions_agree_on_local_and_gs(root):
  _fill(root)
  data = paths.join(root, "data")
  assert paths.isdir(data) and not paths.isfile(data)
  assert paths.isfile(paths.join(data, "a.jsonl")) and not paths.isdir(paths.join(data, "a.jsonl"))
  assert not paths.exists(paths.join(root, "nothing"))
  assert sorted(paths.listdir(data)) == ["README.md", "a.jsonl", "b.parquet", "sub"]
  assert paths.walk_files(data) == ["README.md", "a.jsonl", "b.parquet", "sub/c.jsonl"]
  rel = lambda fs: sorted(f[len(data) + 1:] for f in fs)
  assert rel(paths.glob(paths.join(data, "*.jsonl"))) == ["a.jsonl"]
  assert rel(paths.glob(paths.join(data, "**", "*.jsonl"))) == ["a.jsonl", "sub/c.jsonl"]
  assert paths.size(paths.join(data, "sub", "c.jsonl")) == 3
  paths.replace(paths.join(data, "a.jsonl"), paths.join(data, "a2.jsonl"))
  assert not paths.exists(paths.join(data, "a.jsonl"))
  with paths.open(paths.join(data, "a2.jsonl")) as f:
    assert f.read() == "1\n"
  paths.move(paths.join(data, "sub"), paths.join(root, "moved"))
  assert paths.walk_files(paths.join(root, "moved")) == ["c.jsonl"]
  assert not paths.exists(paths.join(data, "sub"))
  paths.rmtree(data)
  assert not paths.exists(data)


def test_local_copy_fetches_a_folder_once_and_again_when_it_changes(gcs, tmp_path):
  root = f"gs://{gcs.bucket}/model"
  _fill(root)
  local = paths.local_copy(root)
  assert local.startswith(os.environ["JAXPREF_CACHE"])
  assert open(os.path.join(local, "data", "sub", "c.jsonl")).read() == "333"
  with open(os.path.join(local, "data", "a.jsonl"), "w") as f:  # same size and time: kept
    f.write("9\n")
  os.utime(os.path.join(local, "data", "a.jsonl"),
           (paths.mtime(f"{root}/data/a.jsonl"),) * 2)
  assert paths.local_copy(root) == local
  assert open(os.path.join(local, "data", "a.jsonl")).read() == "9\n"
  with paths.open(f"{root}/data/a.jsonl", "w") as f:  # changed in the bucket: fetched again
    f.write("10\n")
  assert open(os.path.join(paths.local_copy(root), "data", "a.jsonl")).read() == "10\n"
  _fill(f"gs://{gcs.bucket}/other")
  only = paths.local_copy(f"gs://{gcs.bucket}/other/data", ["*.jsonl", "sub/*"])
  assert paths.walk_files(only) == ["a.jsonl", "sub/c.jsonl"]  # no README.md
  assert only == os.path.join(os.environ["JAXPREF_CACHE"], "gs", gcs.bucket, "other", "data")
  assert paths.local_copy(str(tmp_path)) == str(tmp_path)  # a local path is used in place


def test_url_helpers_keep_the_scheme():
  assert paths.join("gs://b/run/", "checkpoints", "1") == "gs://b/run/checkpoints/1"
  assert paths.dirname("gs://b/run/metrics.jsonl") == "gs://b/run"
  assert paths.abspath("gs://b/run") == "gs://b/run"
  assert paths.abspath("run") == os.path.join(os.getcwd(), "run")
  assert paths.has_magic("gs://b/train-*.parquet") and not paths.has_magic("gs://b/t.jsonl")


def test_flag_files_in_a_bucket_include_relative_ones(gcs):
  from absl import flags
  from jaxpref.flag_files import expand_flagfiles
  run = f"gs://{gcs.bucket}/run"
  with paths.open(paths.join(run, "flags.txt"), "w") as f:
    f.write("# a run's flags\n--flagfile=base.flags\n--steps=4\n")
  with paths.open(paths.join(run, "base.flags"), "w") as f:
    f.write("--loss=dpo\n")
  assert expand_flagfiles([f"--flagfile={run}/flags.txt", "--seed=1"]) == [
      "--loss=dpo", "--steps=4", "--seed=1"]
  with pytest.raises(flags.Error, match=f"no such file '{run}/nothing.flags'"):
    expand_flagfiles([f"--flagfile={run}/nothing.flags"])
