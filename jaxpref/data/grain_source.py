"""Training from a `jaxpref-data prepare` folder: `tfds` random access + a grain pipeline.

`--train_data=DIR` (or `--eval_data=DIR`) reads a prepared folder (`is_prepared`)
instead of tokenizing records. Which groups make global batch `step`, and at what length,
is decided exactly as for in-memory data: by a `batching.Batcher` (`--batching=pad|
buckets|pack`, `--curriculum`), which plans from the per-group lengths and curriculum
values `prepare` stored in `groups.npz`, so no record is read to plan. The records are
read by a grain pipeline (`grain.MapDataset` over steps, `to_iter_dataset` prefetching in
threads) in which host `jax.process_index()` of `process_count()` reads only the groups
of its own rows of each batch (`batching.host_rows`); over an epoch the hosts' groups are
the whole dataset, each once. The batches therefore equal the in-memory `Batcher`'s for
the same flags and seed, group for group.

The grain iterator's state (the next step) is saved in every checkpoint
(`train.checkpoint`, one JSON per process) and restored on resume, so a resumed run sees
exactly the batches it would have seen. `--shared_prompt` is not built for prepared data
(`check_config` says so).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import jax
import numpy as np

from jaxpref import paths
from jaxpref.data import batching
from jaxpref.data import curriculum
from jaxpref.data.pairs import Truncation
from jaxpref.types import GroupBatch

# The folder `prepare` writes: OUT/prepared.json (stats, written last) beside TFDS's
# OUT/jaxpref_prepared/1.0.0/. Kept here so that training imports neither TFDS nor grain
# (grain is imported when a prepared folder is read; TFDS when it is opened).
BUILDER_NAME = "jaxpref_prepared"
VERSION = "1.0.0"
INFO_FILE = "prepared.json"
GROUPS_FILE = "groups.npz"  # per-group lengths and curriculum values (`prepare`)
FORMATS = ("pairs", "ranked", "unpaired")
# Per-group arrays stored when the records have them, passed to `GroupBatch` as they are.
OPTIONAL = ("scores", "label", "label_smoothing", "user", "attribute_prefs", "source_logps")
READ_THREADS = 4  # host batches read in parallel; decoding is cheap, reads may not be
PREFETCH = 8  # host batches read ahead of the training loop


def is_prepared(path: str) -> bool:
  return paths.isdir(path) and paths.isfile(paths.join(path, INFO_FILE))


def read_info(path: str) -> dict:
  with paths.open(paths.join(path, INFO_FILE)) as f:
    return json.load(f)


def dataset_dir(path: str) -> str:
  return os.path.join(path, BUILDER_NAME, VERSION)


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with paths.open(path, "rb") as f:
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
    # ArrayRecord files are read through local file descriptors only: a gs:// folder is
    # copied to the local cache once (`paths.local_copy`), then read as a local one.
    self.local = paths.local_copy(path)
    builder = tfds.builder_from_directory(dataset_dir(self.local))
    self.source = builder.as_data_source(split=self.info["split"])
    self.n, self.max_len, self.k = len(self.source), self.info["max_len"], self.info["k"]
    self.n_truncated = self.info["truncated_groups"]
    tr = Truncation(self.info.get("truncation", "keep_end"), self.info.get("max_prompt_len", 0))
    self.drop_note = (f"; dropped {self.info['dropped_groups']} groups over "
                      f"{tr.limits(self.max_len)} (--truncation=drop)" if tr.mode == "drop" else "")
    self.stored = set(builder.info.features.keys())
    self._arrays: dict[str, np.ndarray] = {}
    if self.n != self.info["groups"]:
      raise ValueError(f"{path}: holds {self.n} groups, its {INFO_FILE} says "
                       f"{self.info['groups']}; prepare it again")

  def group_array(self, name: str) -> np.ndarray:
    """A per-group array of `GROUPS_FILE` (read once; small: one row per group)."""
    if name not in self._arrays:
      file = os.path.join(self.local, GROUPS_FILE)
      if "groups_sha256" not in self.info or not os.path.isfile(file):
        raise ValueError(f"{self.path} has no {GROUPS_FILE} (per-group lengths and curriculum "
                         "values, which training plans batches with): it was prepared by an "
                         "older jaxpref; run jaxpref-data prepare again")
      with np.load(file) as arrays:
        if name not in arrays:
          raise KeyError(name)
        values = arrays[name]
      if len(values) != self.n:
        raise ValueError(f"{file}: {name!r} has {len(values)} rows for {self.n} groups; "
                         "prepare the folder again")
      self._arrays[name] = values
    return self._arrays[name]

  def stored_lengths(self) -> tuple[int, np.ndarray, int]:
    """(max_len, member lengths int[N, K], longest response): what `batching.Batcher`
    plans with (`batching.dataset_lengths`)."""
    return self.max_len, self.group_array("lengths"), self.info["max_response_length"]

  def curriculum(self, spec: str, n_stages: int, seed: int):
    """The `curriculum.Curriculum` of `spec` from the stored values (no record is read)."""
    field, descending = curriculum.parse(spec)
    stored = self.info.get("curriculum_fields", [])
    missing = self.info.get("curriculum_missing", {})
    if field not in stored:
      why = (f": {missing[field]}" if field in missing else
             f"; it stores {', '.join(stored) or 'none'} (a record field of your own or a "
             "model-scored field is not stored: train from the record files)")
      raise ValueError(f"--curriculum={spec}: {self.path} holds no {field!r} values{why}")
    return curriculum.Curriculum(self.group_array(f"curriculum_{field}"), n_stages, descending,
                                 seed, f"{field}:{'desc' if descending else 'asc'}")

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
    # One batched read (ArrayRecord reads the records of a call in parallel).
    rows = [self.decode(ex) for ex in self.source.__getitems__([int(i) for i in indices])]
    pad = np.ones(len(rows), np.float32) if weight is None else np.asarray(weight, np.float32)
    return to_group_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]}, pad)


def to_group_batch(arrays: dict, pad: np.ndarray | None = None) -> GroupBatch:
  """Stacked decoded examples -> `GroupBatch`; `pad` 0 marks padding groups."""
  pad = np.ones(len(arrays["weight"]), np.float32) if pad is None else pad
  return GroupBatch(tokens=arrays["tokens"], loss_mask=arrays["loss_mask"],
                    segment_ids=arrays["segment_ids"], valid=(pad > 0)[:, None] & arrays["valid"],
                    weight=pad * arrays["weight"], **{k: arrays.get(k) for k in OPTIONAL})


class GrainBatcher:
  """`batching.Batcher`'s interface over a grain pipeline that reads only this host's rows.

  `planner` (a `batching.Batcher` over the prepared dataset) decides every batch's groups
  and length; the pipeline is `grain.MapDataset.range(steps).map(this host's batch of a step)`,
  read ahead by `to_iter_dataset`'s threads. `iterator` is what `train.checkpoint` saves
  and restores (its state is the next step); `batch(step)` must be called for consecutive
  steps from there, as the training loop does.
  """

  def __init__(self, ds: PreparedDataset, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, planner: batching.Batcher | None = None,
               **options):
    """`options` are `batching.Batcher`'s (mode, multiple, window, pack_groups, curriculum)
    when no `planner` is given."""
    if planner is None:
      planner = batching.Batcher(ds, batch_size, seed, **options)
    self.planner = planner
    if batch_size % process_count:
      raise ValueError(f"--batch_size={batch_size} does not split over {process_count} hosts")
    self.ds, self.batch_size, self.seed = ds, batch_size, seed
    self.mode, self.curriculum, self.max_len = planner.mode, planner.curriculum, ds.max_len
    self.rows = self.planner.rows  # leading rows of a global batch: groups, or packed blocks
    self.process_index, self.process_count = process_index, process_count
    self.mine = batching.host_rows(self.rows, process_index, process_count)
    self.shapes_seen: set[tuple[int, ...]] = set()
    import grain  # 2 s to import: only prepared runs pay for it
    steps = grain.MapDataset.range(0, sys.maxsize).map(self._host_batch)
    self.iterator = iter(steps.to_iter_dataset(
        grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH)))

  def host_groups(self, step: int) -> np.ndarray:
    """The stored groups this host reads for batch `step`, in row order."""
    idx, _ = self.planner.plan(step)
    if self.mode == "pack":  # rows are blocks of m consecutive planned groups
      return idx.reshape(-1, self.planner.m)[self.mine].reshape(-1)
    return idx[self.mine]

  def _host_batch(self, step: int):
    """(this host's rows of batch `step`, their groups): runs in grain's reader threads."""
    return self.planner.batch(step, self.mine), self.host_groups(step)

  def batch(self, step: int, rows: slice = slice(None)):
    """The next host batch (this host's rows of global batch `step`)."""
    if rows != self.mine and not (self.process_count == 1 and rows == slice(None)):
      raise ValueError(f"{self.ds.path}: with prepared data each host reads only its shard, "
                       f"so it must build rows {self.mine} of each batch, not {rows} (the mesh's "
                       "devices of a host must hold one contiguous block of the batch)")
    at = self.iterator.get_state()["next_index"]
    if at != step:
      raise ValueError(f"{self.ds.path}: the data iterator is at batch {at}, the training "
                       f"loop at step {step}; restore the iterator with the step's checkpoint")
    out, self.last_indices = next(self.iterator)  # last_indices: for logs and tests
    self.shapes_seen.add(np.shape(out.tokens)[1:])
    return out

  def estimate(self, steps: int) -> tuple[float, int]:
    """(padding efficiency, steps) over the first `steps` batches, from the stored lengths."""
    return self.planner.estimate(steps)

  def describe(self) -> str:
    """Stored with checkpoints: a resume must read the same data over the same hosts."""
    return (f"{self.planner.describe()},prepared={self.ds.info['fingerprint'][:16]},"
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
  # Absent from prepared.json: the default policy (prepare stores only another one).
  for flag, default in (("truncation", "keep_end"), ("max_prompt_len", 0)):
    if getattr(d, flag) != info.get(flag, default):
      raise ValueError(f"{ds.path} was prepared with --{flag}={info.get(flag, default)}; this "
                       f"run has --{flag}={getattr(d, flag)} (prepare again, or match it)")
  if info["format"] == "ranked" and d.group_size != info["group_size"]:
    raise ValueError(f"{ds.path} was prepared with --group_size={info['group_size']}; this run "
                     f"has --group_size={d.group_size}")
  sha = file_sha256(d.tokenizer)
  if sha != info["tokenizer"]["sha256"]:
    raise ValueError(f"{ds.path} was tokenized with {info['tokenizer']['path']} (sha256 "
                     f"{info['tokenizer']['sha256'][:12]}), not --tokenizer={d.tokenizer} "
                     f"(sha256 {sha[:12]})")
  spec = cfg.loss_spec
  if "source_logps" in spec.record_fields and "source_logps" not in ds.stored:
    raise ValueError(f"--loss={cfg.loss} reads the records' 'source_logps', which {ds.path} "
                     "does not hold; prepare records that have it")
  # --shared_prompt: the train loop wraps the dataset in `SharedPromptView`, which scans
  # every group for its packed shape and reads the in-memory arrays.
  unsupported = [(bool(spec.member_fields), f"--loss={cfg.loss} (extra members)"),
                 (d.shared_prompt, "--shared_prompt (use --batching=pack)"),
                 (cfg.reference == "precomputed", "--reference=precomputed")]
  names = [name for bad, name in unsupported if bad]
  if names:
    raise ValueError(f"{', '.join(names)}: not supported with prepared data ({ds.path}) yet; "
                     "train from the record files instead")


def load(cfg, path: str):
  """(dataset, report, extra) as `train.setup` reads them, for a prepared folder."""
  ds = PreparedDataset(path)
  check_config(cfg, ds)
  extra = f"; {ds.info['desirable']} desirable" if "desirable" in ds.info else ""
  return ds, _Report(path, ds.info), extra


def batcher(cfg, ds: PreparedDataset, row_multiple: int) -> GrainBatcher:
  """The run's `GrainBatcher`: --batching and --curriculum as for in-memory data; batches
  are cut in multiples of `row_multiple` rows (grad_accum x the mesh's batch shards)."""
  d = cfg.data
  order = ds.curriculum(d.curriculum, d.curriculum_stages, d.seed) if d.curriculum else None
  planner = batching.from_config(d, ds, row_multiple, order)
  return GrainBatcher(ds, d.batch_size, d.seed, jax.process_index(), jax.process_count(),
                      planner)
