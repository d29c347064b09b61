"""Data in a bucket (`gs://`, the local GCS emulator of tests/gcs_util.py): Parquet shards,
a folder and a prepared folder read from gs:// give the records and batches the same files
give from a local folder."""

import os

import numpy as np

from jaxpref import paths
from jaxpref.data import (PairDataset, Tokenizer, cli, grain_source, make_tiny, packing,
                          read_pairs)

TINY = make_tiny.OUT
TOK = os.path.join(TINY, "tokenizer.model")


def _shards(folder: str, n: int = 2) -> None:
  """tiny/train.jsonl as `n` Parquet shards plus a README (a file a folder read ignores)."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  records, _ = read_pairs(f"{TINY}/train.jsonl")
  rows = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in records]
  paths.makedirs(folder)
  for i in range(n):
    with paths.open(paths.join(folder, f"train-{i:05d}-of-{n:05d}.parquet"), "wb") as f:
      pq.write_table(pa.Table.from_pylist(rows[i::n]), f)
  with paths.open(paths.join(folder, "README.md"), "w") as f:
    f.write("shards\n")


def test_parquet_shards_and_folders_read_from_gs_equal_local(gcs, tmp_path):
  local, remote = str(tmp_path / "data"), f"gs://{gcs.bucket}/data"
  _shards(local)
  _shards(remote)
  for pattern in ("train-*.parquet", ""):  # a glob of shards, then the folder itself
    want, want_report = read_pairs(os.path.join(local, pattern) if pattern else local)
    got, report = read_pairs(paths.join(remote, pattern) if pattern else remote)
    assert len(got) == len(want) == 2000
    assert [(r.prompt, r.chosen, r.rejected) for r in got] == \
        [(r.prompt, r.chosen, r.rejected) for r in want]
    assert report.n_read == want_report.n_read
  assert "README.md" in report.summary() and remote in report.summary()


def test_prepared_folder_written_to_and_read_from_gs(gcs):
  out = f"gs://{gcs.bucket}/prepared"
  assert cli.main(["prepare", f"{TINY}/train.jsonl", f"--tokenizer={TOK}", f"--out={out}",
                   "--max_len=16"]) == 0
  assert grain_source.is_prepared(out)
  prepared = grain_source.PreparedDataset(out)
  assert prepared.local.startswith(os.environ["JAXPREF_CACHE"])  # ArrayRecord reads it there
  records, _ = read_pairs(f"{TINY}/train.jsonl")
  ds = PairDataset(records, Tokenizer.load(TOK), 16)
  assert prepared.n == ds.n == 2000
  got, want = prepared.batch(np.arange(ds.n)), ds.batch(np.arange(ds.n))
  for name in ("tokens", "loss_mask", "segment_ids", "valid"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
  # groups.npz, read from the copy too: the lengths training plans batches with
  np.testing.assert_array_equal(prepared.group_array("lengths"),
                                packing.member_lengths(ds.segment_ids))
