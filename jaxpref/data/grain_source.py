"""Training from a `jaxpref-data prepare` folder: `tfds` random access + a grain `DataLoader`.

`--train_data=DIR` (or `--eval_data=DIR`) reads a prepared folder (`is_prepared`)
instead of tokenizing records. Train batches come from a grain `DataLoader` over
`tfds`'s ArrayRecord data source: an `IndexSampler` shuffles each epoch with a seed from
`--data_seed` and gives each host (`jax.process_index()` of `process_count()`) only its
own contiguous shard of records (`ShardOptions`), which it reads, shuffles and batches
into its own rows of the global batch. The loader's state is saved in every checkpoint
(`train.checkpoint`, one JSON per process) and restored on resume, so a resumed run sees
exactly the batches it would have seen.

Only `--batching=pad` is built; the order differs from the in-memory `Batcher`'s (grain
shuffles, per host shard), so the same seed on both paths gives different batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np

from jaxpref import losses
from jaxpref.data import batching
from jaxpref.types import GroupBatch

# The folder `prepare` writes: OUT/prepared.json (stats, written last) beside TFDS's
# OUT/jaxpref_prepared/1.0.0/. Kept here so that training imports neither TFDS nor grain
# (grain is imported when a prepared folder is read; TFDS when it is opened).
BUILDER_NAME = "jaxpref_prepared"
VERSION = "1.0.0"
INFO_FILE = "prepared.json"
FORMATS = ("pairs", "ranked", "unpaired")
# Per-group arrays stored when the records have them, passed to `GroupBatch` as they are.
OPTIONAL = ("scores", "label", "label_smoothing", "user", "attribute_prefs", "source_logps")
READ_THREADS = 4  # records read in parallel per host; decoding is cheap, reads may not be


def is_prepared(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, INFO_FILE))


def read_info(path: str) -> dict:
  with open(os.path.join(path, INFO_FILE)) as f:
    return json.load(f)


def dataset_dir(path: str) -> str:
  return os.path.join(path, BUILDER_NAME, VERSION)


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


@dataclasses.dataclass
class _Report:
  """The data report line of a prepared folder (`records.ReadReport.summary`'s stand-in)."""
  path: str
  info: dict

  def summary(self) -> str:
    i = self.info
    s = (f"{self.path}: prepared {i['split']} split of {i['groups']} groups from {i['source']} "
         f"(read {i['records_read']} records, skipped {i['records_skipped']}")
    reasons = ", ".join(f"{n}x {r}" for r, n in i["skipped_by_reason"].items())
    return s + (f": {reasons})" if reasons else ")")


class PreparedDataset:
  """A prepared split with the in-memory datasets' `n`, `batch(indices, weight)` (random
  access, for eval and the start-up loss probe) and `n_truncated`."""

  ref_logps = None

  def __init__(self, path: str):
    import tensorflow_datasets as tfds  # only prepared runs import TFDS
    self.path, self.info = path, read_info(path)
    builder = tfds.builder_from_directory(dataset_dir(path))
    self.source = builder.as_data_source(split=self.info["split"])
    self.n, self.max_len, self.k = len(self.source), self.info["max_len"], self.info["k"]
    self.n_truncated = self.info["truncated_groups"]
    self.stored = set(builder.info.features.keys())
    if self.n != self.info["groups"]:
      raise ValueError(f"{path}: holds {self.n} groups, its {INFO_FILE} says "
                       f"{self.info['groups']}; prepare it again")

  def decode(self, ex: dict) -> dict:
    """A stored example -> arrays padded to max_len, as `PairDataset` holds them."""
    t, members = np.asarray(ex["tokens"]), np.asarray(ex["members"], bool)
    pad = self.max_len - t.shape[-1]
    tokens = np.pad(t, ((0, 0), (0, pad)), constant_values=self.info["pad_id"])
    tokens[~members] = 0  # a missing member is all zeros (`PairDataset._fill`)
    out = {"tokens": tokens,
           "loss_mask": np.pad(np.asarray(ex["loss_mask"], np.float32), ((0, 0), (0, pad))),
           "segment_ids": np.pad(np.asarray(ex["segment_ids"], np.int32), ((0, 0), (0, pad))),
           "valid": members, "weight": np.float32(ex["weight"]), "index": np.int64(ex["index"])}
    for key in OPTIONAL:
      if key in ex:
        out[key] = np.asarray(ex[key])
    return out

  def batch(self, indices, weight=None) -> GroupBatch:
    """The groups at `indices`; `weight` 0 marks padding groups, as `PairDataset.batch`."""
    rows = [self.decode(self.source[int(i)]) for i in np.asarray(indices)]
    pad = np.ones(len(rows), np.float32) if weight is None else np.asarray(weight, np.float32)
    return to_group_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]}, pad)


def to_group_batch(arrays: dict, pad: np.ndarray | None = None) -> GroupBatch:
  """Stacked decoded examples -> `GroupBatch`; `pad` 0 marks padding groups."""
  pad = np.ones(len(arrays["weight"]), np.float32) if pad is None else pad
  return GroupBatch(tokens=arrays["tokens"], loss_mask=arrays["loss_mask"],
                    segment_ids=arrays["segment_ids"], valid=(pad > 0)[:, None] & arrays["valid"],
                    weight=pad * arrays["weight"], **{k: arrays.get(k) for k in OPTIONAL})


class GrainBatcher:
  """`batching.Batcher`'s interface over a grain `DataLoader` (`--batching=pad` only).

  `iterator` is what `train.checkpoint` saves and restores; `batch(step)` must be called
  for consecutive steps, as the training loop does.
  """

  mode, curriculum = "pad", None

  def __init__(self, ds: PreparedDataset, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f"--batch_size={batch_size} does not split over {process_count} hosts")
    if ds.n < process_count:
      raise ValueError(f"{ds.path}: {ds.n} groups cannot be sharded over {process_count} hosts")
    self.ds, self.batch_size, self.seed = ds, batch_size, seed
    self.rows = batch_size  # leading rows of a global batch, as `Batcher.rows`
    self.process_index, self.process_count = process_index, process_count
    self.max_len = ds.max_len
    self.shapes_seen: set[tuple[int, ...]] = set()
    # drop_remainder=False: shards differ by at most one record, and no record is left out.
    import grain  # 2 s to import: only prepared runs pay for it

    class Decode(grain.transforms.Map):
      def map(self, element):
        return ds.decode(element)

    self.shard = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=False)
    sampler = grain.samplers.IndexSampler(ds.n, shard_options=self.shard, shuffle=True,
                                          num_epochs=None, seed=seed)
    self.loader = grain.DataLoader(
        data_source=ds.source, sampler=sampler, worker_count=0,
        operations=[Decode(), grain.transforms.Batch(batch_size // process_count)],
        read_options=grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=64))
    self.iterator = iter(self.loader)

  def batch(self, step: int, rows: slice = slice(None)) -> GroupBatch:
    """The next host batch (this host's rows of global batch `step`)."""
    del step  # the iterator's position; a resumed run restores it from the checkpoint
    mine = batching.host_rows(self.rows, self.process_index, self.process_count)
    if rows != mine and not (self.process_count == 1 and rows == slice(None)):
      raise ValueError(f"{self.ds.path}: with prepared data each host reads only its shard, "
                       f"so it must build rows {mine} of each batch, not {rows} (the mesh's "
                       "devices of a host must hold one contiguous block of the batch)")
    arrays = next(self.iterator)
    self.last_indices = arrays["index"]  # which stored groups: for logs and tests
    out = to_group_batch(arrays)
    self.shapes_seen.add(np.shape(out.tokens)[1:])
    return out

  def estimate(self, steps: int) -> tuple[float, int]:
    """(padding efficiency, steps) from the prepared stats: the whole dataset's real tokens
    over what pad batches compute (every member row padded to max_len)."""
    info = self.ds.info
    return info["tokens"] / (info["groups"] * info["k"] * info["max_len"]), steps

  def describe(self) -> str:
    """Stored with checkpoints: a resume must read the same data over the same hosts."""
    return (f"batching=pad,prepared={self.ds.info['fingerprint'][:16]},"
            f"hosts={self.process_count}")


def check_config(cfg, ds: PreparedDataset) -> None:
  """A run's data flags must match what the folder was prepared with."""
  info, d = ds.info, cfg.data
  if d.format != info["format"]:
    raise ValueError(f"{ds.path} was prepared with --format={info['format']}; this run has "
                     f"--data_format={d.format} (prepare supports {', '.join(FORMATS)})")
  if d.max_len != info["max_len"]:
    raise ValueError(f"{ds.path} was prepared with --max_len={info['max_len']}; this run has "
                     f"--max_len={d.max_len}")
  if info["format"] == "ranked" and d.group_size != info["group_size"]:
    raise ValueError(f"{ds.path} was prepared with --group_size={info['group_size']}; this run "
                     f"has --group_size={d.group_size}")
  sha = file_sha256(d.tokenizer)
  if sha != info["tokenizer"]["sha256"]:
    raise ValueError(f"{ds.path} was tokenized with {info['tokenizer']['path']} (sha256 "
                     f"{info['tokenizer']['sha256'][:12]}), not --tokenizer={d.tokenizer} "
                     f"(sha256 {sha[:12]})")
  if "source_logps" in losses.record_fields(cfg.loss) and "source_logps" not in ds.stored:
    raise ValueError(f"--loss={cfg.loss} reads the records' 'source_logps', which {ds.path} "
                     "does not hold; prepare records that have it")
  unsupported = [(d.batching != "pad", f"--batching={d.batching}"),
                 (bool(losses.member_fields(cfg.loss)), f"--loss={cfg.loss} (extra members)"),
                 (bool(d.curriculum), "--curriculum"), (d.shared_prompt, "--shared_prompt"),
                 (cfg.reference == "precomputed", "--reference=precomputed")]
  names = [name for bad, name in unsupported if bad]
  if names:
    raise ValueError(f"{', '.join(names)}: not supported with prepared data ({ds.path}) yet; "
                     "train from the record files instead")


def load(cfg, path: str):
  """(dataset, report, extra) as `train.loop._read` returns them, for a prepared folder."""
  ds = PreparedDataset(path)
  check_config(cfg, ds)
  extra = f"; {ds.info['desirable']} desirable" if "desirable" in ds.info else ""
  return ds, _Report(path, ds.info), extra


def batcher(cfg, ds: PreparedDataset) -> GrainBatcher:
  return GrainBatcher(ds, cfg.data.batch_size, cfg.data.seed, jax.process_index(),
                      jax.process_count())
