"""Runs whose workdir, data and model live in a bucket (`gs://`, served by the local GCS
emulator of tests/gcs_util.py): what a run writes lands in the bucket, orbax's checkpoint
included (through tensorstore's own gcs driver), a resume reads it back, and the numbers are
those of the same run on local paths."""

import json
import os
import subprocess

import numpy as np
import pytest

from cli_util import ROOT, env, train, train_cmd
from jaxpref import paths
from jaxpref.data import make_tiny

# No eval data and no plot: each run starts a CLI process (~25 s on 2 busy cores), so the
# three runs here do only what the bucket changes; the local and the gs:// run go together.
FLAGS = ("--steps=4", "--checkpoint_every=2", "--log_every=1", "--eval_data=", "--noplot")
TIMING = ("steps_per_sec", "perf/")  # wall-clock columns differ between any two runs


def _rows(workdir: str) -> list[dict]:
  with paths.open(paths.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
  assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in sorted(a) if k not in ("step", "split")],
                               [b[k] for k in sorted(b) if k not in ("step", "split")],
                               rtol=1e-6, err_msg=f"step {a['step']} {a['split']}")


@pytest.mark.slow
def test_gs_workdir_and_data_train_checkpoint_and_resume_like_local(gcs, tmp_path):
  local = str(tmp_path / "local")
  data = f"gs://{gcs.bucket}/data/train.jsonl"
  paths.copy(f"{make_tiny.OUT}/train.jsonl", data)
  run = f"gs://{gcs.bucket}/run"
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for cmd in (train_cmd(local, *FLAGS), train_cmd(run, f"--train_data={data}", *FLAGS))]
  for p in procs:
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, out[-5000:]
  want = _rows(local)
  _assert_same_rows(_rows(run), want)
  assert not os.path.exists(os.path.join(ROOT, "gs:"))  # no local folder named after the URL
  ckpt = paths.join(run, "checkpoints")
  assert sorted(paths.listdir(ckpt)) == ["2", "4"]
  assert any(f.startswith("state/ocdbt.process_0/d/") for f in paths.walk_files(f"{ckpt}/2"))
  record = json.load(paths.open(paths.join(run, "run.json")))
  with open(os.path.join(local, "run.json")) as f:
    assert record["settings"]["train_data files"] == json.load(f)["settings"]["train_data files"]
  with paths.open(paths.join(run, ".lock")) as f:
    assert f.read() == ""  # the run marker, cleared at the clean end

  paths.rmtree(f"{ckpt}/4")  # as if preempted after the checkpoint at step 2
  proc = train(run, f"--train_data={data}", *FLAGS)
  assert f"resuming from step 2 ({ckpt})" in proc.stdout
  _assert_same_rows(_rows(run), want)  # steps 3 and 4 again, from the bucket's checkpoint
  events = paths.listdir(paths.join(run, "tensorboard"))
  assert len(events) == 2 and all(e.startswith("events.out.tfevents.") for e in events)


def test_metric_writer_uploads_at_sync_and_resume_keeps_rows_up_to_the_checkpoint(gcs):
  from jaxpref.train.metrics import MetricWriter, RecordLog, read_metrics
  run = f"gs://{gcs.bucket}/run"
  w = MetricWriter(run, tensorboard=False)  # TensorBoard's upload: the run test above
  for step in (1, 2, 3):
    w.write(step, "train", {"loss": 1.0 / step})
  assert not paths.exists(paths.join(run, "metrics.jsonl"))  # not yet: uploaded at sync
  w.sync()  # a checkpoint: the rows so far are in the bucket
  assert [r["step"] for r in read_metrics(paths.join(run, "metrics.jsonl"))] == [1, 2, 3]
  w.write(4, "train", {"loss": 0.25})
  w.close()
  assert [r["step"] for r in read_metrics(paths.join(run, "metrics.jsonl"))] == [1, 2, 3, 4]
  w = MetricWriter(run, resume_step=2, tensorboard=False)  # resumed from the checkpoint at step 2
  w.write(3, "train", {"loss": 0.5})
  w.close()
  rows = read_metrics(paths.join(run, "metrics.jsonl"))
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.5)]
  log = RecordLog(run, process_index=1)
  log.write(1, np.array([[3, 1]]))
  log.close()
  with paths.open(paths.join(run, "records", "process_1.jsonl")) as f:
    assert json.loads(f.read()) == {"step": 1, "groups": [3, 1]}


def test_reference_cache_in_a_bucket(gcs):
  from jaxpref.train import ref_cache
  cache, parts = f"gs://{gcs.bucket}/ref_cache", {"key": 1}
  want = np.arange(6, dtype=np.float32).reshape(3, 2)
  path = ref_cache.save(cache, parts, want)
  assert path.startswith(f"{cache}/ref_logps_")
  np.testing.assert_array_equal(ref_cache.load(cache, parts, (3, 2)), want)
  assert ref_cache.load(cache, {"key": 2}, (3, 2)) is None
  with paths.open(path, "wb") as f:
    f.write(b"not a zip file")
  notes = []
  assert ref_cache.load(cache, parts, (3, 2), notes) is None and "recomputing" in notes[0]
  # The same data file in a bucket has the local file's key: a cache entry serves both.
  url = f"gs://{gcs.bucket}/data/train.jsonl"
  paths.copy(f"{make_tiny.OUT}/train.jsonl", url)
  assert ref_cache.data_digest(url) == ref_cache.data_digest(f"{make_tiny.OUT}/train.jsonl")
