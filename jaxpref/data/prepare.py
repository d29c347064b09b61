"""`jaxpref-data prepare`: read and tokenize records once, into ArrayRecord shards.

A TFDS `GeneratorBasedBuilder` (no TensorFlow needed: TFDS serializes its features itself)
writes one example per group, laid out exactly as the in-memory datasets lay it out
(`PairDataset`, `RankedDataset`, `UnpairedDataset`: the same per-record code, so the same
truncation), into `OUT/jaxpref_prepared/1.0.0/*.array_record-*`. The dataset's stats (records
read, skipped by reason, truncated groups, a length histogram, the tokenizer's sha256) go
into the TFDS info (`metadata.json`) and into `OUT/prepared.json`, which is written last:
training takes `--train_data=OUT` as prepared data only when that file exists, so an
interrupted prepare is never mistaken for a finished one.

Arrays are stored cut to the group's longest real sequence (the padding is restored on
read from `pad_id`), with `loss_mask` and `segment_ids` as uint8 (both are 0/1).
Re-running into the same OUT deletes the previous prepared dataset and writes it anew.

Beside them, `OUT/groups.npz` holds small per-group arrays, so that training plans its
batches and curricula without reading the records: `lengths` (int32[N, K], each member's
real tokens: what `--batching=buckets|pack` cut and pack by) and `curriculum_FIELD`
(float64[N], `curriculum.field_values` of every record-derived `curriculum.FIELDS` entry
the records have; why a field is absent is in prepared.json's `curriculum_missing`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from jaxpref import paths
from jaxpref.data import curriculum, packing
from jaxpref.data import records as records_lib
from jaxpref.data.grain_source import (BUILDER_NAME, FORMATS, GROUPS_FILE, INFO_FILE, OPTIONAL,
                                       VERSION, file_sha256)
from jaxpref.data.pairs import PairDataset, Truncation
from jaxpref.data.ranked import RankedDataset
from jaxpref.data.sources import DataError
from jaxpref.data.tokenizer import Tokenizer
from jaxpref.data.unpaired import KL_LABEL, UnpairedDataset

CHUNK = 1024  # records tokenized together (one [CHUNK, K, T] block in memory at a time)
PROGRESS_EVERY = 10_000


def length_edges(max_len: int) -> list[int]:
  """Histogram bins [edges[i], edges[i+1]) of sequence lengths: powers of two, then max_len."""
  edges = [1] + [2 ** e for e in range(3, 32) if 2 ** e < max_len]
  return edges + [max_len + 1]


@dataclasses.dataclass
class Job:
  """One `prepare` run: its inputs, and the stats its example generator fills in."""

  path: str
  fmt: str
  tok: Tokenizer
  max_len: int
  split: str = "train"
  fields: str = ""
  skip_invalid: bool = False
  group_size: int = 4
  truncation: Truncation = Truncation()  # --truncation, --max_prompt_len, as training's
  say: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)
  report: records_lib.ReadReport | None = None
  stats: dict = dataclasses.field(default_factory=dict)
  arrays: dict = dataclasses.field(default_factory=dict)  # name -> per-chunk parts (GROUPS_FILE)
  missing: dict = dataclasses.field(default_factory=dict)  # curriculum field -> why not stored

  @property
  def k(self) -> int:
    return self.group_size if self.fmt == "ranked" else 2

  def first_example(self) -> dict:
    """The first valid record's example: the stored features (which optional per-group
    arrays, their shapes) must be fixed before writing, and are all-or-none in a file."""
    for _, _, record, _ in records_lib.scan(self.path, self.fmt, self.fields):
      if record is not None:  # laid out without dropping: only its features matter here
        ds = (_unpaired_chunk([record], range(1), 1, self.tok, self.max_len, Truncation())
              if self.fmt == "unpaired" else self._tokenize([record], Truncation()))
        return _example(ds, 0, 0, 1)
    return {}  # no valid record: `records()` raises the error that says why

  def records(self) -> Iterator:
    """Valid records in file order; bad ones raise or are counted as `records._read` does."""
    files, ignored = records_lib.sources.resolve(self.path)
    self.report = report = records_lib.ReadReport(self.path, files=files, ignored=ignored)
    first = None
    for file, line, record, problem in records_lib.scan(self.path, self.fmt, self.fields):
      if problem is None:
        first = first or (record, (file, line))
        error = records_lib.consistency_error(self.fmt, [first[0], record],
                                              [first[1], (file, line)], self.fields)
        if error:
          raise DataError(error)
        report.n_read += 1
        if report.n_read % PROGRESS_EVERY == 0:
          self.say(f"prepare: {report.n_read} records read, {report.n_skipped} skipped")
        yield record
        continue
      message = f"{file}:{line}: {problem[1]}"
      if not self.skip_invalid:
        raise DataError(message + " (pass --skip_invalid_records to skip and count such records)")
      report.n_skipped += 1
      report.reasons[problem[0]] += 1
      if len(report.first_errors) < records_lib.MAX_FIRST_ERRORS:
        report.first_errors.append(message)
    if not report.n_read:
      detail = f"; first: {report.first_errors[0]}" if report.first_errors else ""
      raise DataError(f"{self.path}: no valid records ({report.n_skipped} skipped{detail})")

  def _chunks(self) -> Iterator:
    """Tokenized datasets of CHUNK records each, built by the in-memory dataset classes."""
    if self.fmt == "unpaired":  # the KL completion is half the dataset away: read it all
      recs = list(self.records())
      n = len(recs)
      shift = max(n // 2, 1)  # as `UnpairedDataset`
      for a in range(0, n, CHUNK):
        yield _unpaired_chunk(recs, range(a, min(a + CHUNK, n)), shift, self.tok, self.max_len,
                              self.truncation)
      return
    chunk = []
    for record in self.records():
      chunk.append(record)
      if len(chunk) == CHUNK:
        yield self._tokenize(chunk)
        chunk = []
    if chunk:
      yield self._tokenize(chunk)

  def _tokenize(self, chunk, truncation: Truncation | None = None):
    """A chunk's dataset; `whole=False`: --truncation=drop may empty one chunk, and
    `examples` refuses only a prepare that keeps no group at all."""
    tr = truncation or self.truncation
    if self.fmt == "ranked":
      return RankedDataset(chunk, self.tok, self.max_len, self.group_size, truncation=tr,
                           whole=False)
    return PairDataset(chunk, self.tok, self.max_len, truncation=tr, whole=False)

  def examples(self) -> Iterator[tuple[int, dict]]:
    """(index, example) per group, filling `stats` once every record is written."""
    edges = length_edges(self.max_len)
    hist = np.zeros(len(edges) - 1, np.int64)
    index = truncated = n_tokens = n_unk = dropped = desirable = longest = response = 0
    over = 0  # groups --truncation=drop removed
    for ds in self._chunks():
      over += ds.n_dropped_groups
      if not ds.n:  # the whole chunk was dropped: nothing to measure or write
        continue
      lengths = ds.segment_ids.sum(-1)  # [n, K]; 0 for a missing member
      self._group_values(ds, index)
      response = max(response, int(ds.loss_mask.sum(-1).max()))
      hist += np.histogram(lengths[ds.members], edges)[0]
      longest = max(longest, int(lengths.max()))
      truncated, n_tokens, n_unk = truncated + ds.n_truncated, n_tokens + ds.n_tokens, n_unk + ds.n_unk
      dropped += getattr(ds, "n_dropped_responses", 0)
      desirable += int(ds.label[:, 0].sum()) if self.fmt == "unpaired" else 0
      for i in range(ds.n):
        yield index, _example(ds, i, index, max(1, int(lengths[i].max())))
        index += 1
    if not index:
      raise DataError(f"{self.path}: every one of the {over} groups is over "
                      f"{self.truncation.limits(self.max_len)} and --truncation=drop dropped "
                      "them all: raise the limit, or cut them with --truncation=keep_end or "
                      "keep_start")
    report = self.report
    self.stats.update(
        format=self.fmt, split=self.split, source=self.path, files=report.files,
        fields=self.fields, max_len=self.max_len, k=self.k, pad_id=self.tok.pad_id,
        tokenizer={"path": self.tok.path, "sha256": file_sha256(self.tok.path),
                   "vocab_size": self.tok.vocab_size},
        records_read=report.n_read, records_skipped=report.n_skipped,
        skipped_by_reason=dict(report.reasons), first_errors=report.first_errors,
        groups=index, truncated_groups=truncated, tokens=n_tokens, unk_tokens=n_unk,
        max_length=longest, length_histogram={"edges": edges, "counts": hist.tolist()},
        max_response_length=max(1, response),
        curriculum_fields=sorted(n[len("curriculum_"):] for n in self.arrays
                                 if n.startswith("curriculum_")),
        curriculum_missing=dict(self.missing))
    if not self.truncation.is_default:  # absent: keep_end, no prompt limit (older folders too)
      self.stats.update(truncation=self.truncation.mode,
                        max_prompt_len=self.truncation.max_prompt_len, dropped_groups=over)
    if self.fmt == "ranked":
      self.stats.update(group_size=self.group_size, dropped_responses=dropped)
    if self.fmt == "unpaired":
      self.stats.update(desirable=desirable)


  def _group_values(self, ds, first: int) -> None:
    """Appends chunk `ds`'s (groups `first`...) per-group arrays to `arrays`."""
    self.arrays.setdefault("lengths", []).append(
        packing.member_lengths(ds.segment_ids).astype(np.int32))
    model_fields = getattr(curriculum, "MODEL_FIELDS", ())  # scored by the model, not stored
    for field in curriculum.FIELDS:
      if field in model_fields or field in self.missing:
        continue
      try:
        values = curriculum.field_values(ds, field)
      except ValueError as e:  # e.g. no scores: score_gap cannot be a curriculum of this data
        self.missing[field] = str(e) + (f" (group numbers counted from {first})" if first else "")
        self.arrays.pop(f"curriculum_{field}", None)
        continue
      self.arrays.setdefault(f"curriculum_{field}", []).append(values)


def _unpaired_chunk(recs, idx: range, shift: int, tok: Tokenizer, max_len: int,
                    truncation: Truncation):
  """Groups `idx` of an `UnpairedDataset` of all of `recs`, tokenizing only what they use."""
  n = len(recs)
  ds = UnpairedDataset.__new__(UnpairedDataset)
  ds._fill(tok, max_len, ((tok.encode(recs[i].prompt), (tok.encode(recs[i].completion),
                                                         tok.encode(recs[(i + shift) % n].completion)))
                          for i in idx), len(idx), counted=(0,), truncation=truncation)
  ds.weight = np.array([recs[i].weight for i in idx], np.float32)
  ds.scores = None
  ds.label = np.stack([np.array([int(recs[i].label) for i in idx], np.int32),
                       np.full(len(idx), KL_LABEL, np.int32)], axis=1)
  ds._finish(whole=False)
  return ds


def _example(ds, i: int, index: int, length: int) -> dict:
  ex = {"index": np.int64(index), "tokens": ds.tokens[i, :, :length],
        "loss_mask": ds.loss_mask[i, :, :length].astype(np.uint8),
        "segment_ids": ds.segment_ids[i, :, :length].astype(np.uint8),
        "members": ds.members[i], "weight": np.float32(ds.weight[i])}
  for name in OPTIONAL:  # per-group record arrays that `batch` would carry
    values = getattr(ds, name, None)
    if values is not None:
      ex[name] = values[i]
  return ex


def _features(example: dict, k: int):
  f, raw = tfds.features, tfds.features.Encoding.BYTES
  feats = {}
  for name, value in example.items():
    value = np.asarray(value)
    if name in ("tokens", "loss_mask", "segment_ids"):  # stored cut to the group's length
      feats[name] = f.Tensor(shape=(k, None), dtype=value.dtype, encoding=raw)
    elif value.ndim == 0:
      feats[name] = f.Scalar(value.dtype)
    else:
      feats[name] = f.Tensor(shape=value.shape, dtype=value.dtype)
  return f.FeaturesDict(feats)


class JaxprefPrepared(tfds.core.GeneratorBasedBuilder):
  """Tokenized preference groups; the features depend on the format (see `_info`)."""

  name = BUILDER_NAME
  VERSION = tfds.core.Version(VERSION)

  # No code path: TFDS would look for a checksums file beside this module (its lookup needs
  # `importlib_resources`, which it does not install); this builder downloads nothing.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(self, job: Job, **kwargs):
    self._job = job
    self._first = job.first_example()
    super().__init__(**kwargs)

  def _info(self):
    # Stored in group order, so index i is record i (tests compare with the in-memory set).
    return tfds.core.DatasetInfo(builder=self, features=_features(self._first, self._job.k),
                                 metadata=tfds.core.MetadataDict(), disable_shuffling=True,
                                 description="jaxpref-data prepare: tokenized preference groups")

  def _split_generators(self, dl_manager):
    return {self._job.split: self._generate_examples()}

  def _generate_examples(self):
    yield from self._job.examples()
    self.info.metadata["stats"] = self._job.stats


def _clear(out: str) -> None:
  """Removes a previous prepared dataset from `out`; refuses to touch anything else."""
  if not paths.exists(out):
    return
  if not paths.isdir(out):
    raise ValueError(f"--out={out!r} is a file, not a folder")
  ours = {INFO_FILE, BUILDER_NAME, GROUPS_FILE}
  others = sorted(set(paths.listdir(out)) - ours)
  if others:
    raise ValueError(f"--out={out!r} holds files that are not a prepared dataset "
                     f"({', '.join(others[:5])}); give an empty or new folder")
  if paths.exists(paths.join(out, INFO_FILE)):
    paths.remove(paths.join(out, INFO_FILE))  # first: a half-cleared folder is not "prepared"
  paths.rmtree(paths.join(out, BUILDER_NAME))
  if paths.exists(paths.join(out, GROUPS_FILE)):
    paths.remove(paths.join(out, GROUPS_FILE))


def prepare(job: Job, out: str) -> dict:
  """Writes `job`'s groups into `out` (replacing an earlier prepare there); returns the stats."""
  if job.fmt not in FORMATS:
    raise ValueError(f"--format={job.fmt!r} is not one of {', '.join(FORMATS)}")
  if job.max_len < 3:
    raise ValueError(f"--max_len must be >= 3 (BOS, a token, EOS), got {job.max_len}")
  if job.fmt == "ranked" and job.group_size < 2:
    raise ValueError(f"--group_size must be >= 2, got {job.group_size}")
  if not job.split.isidentifier():
    raise ValueError(f"--split={job.split!r} must be a name such as train or eval")
  if paths.is_remote(out):  # ArrayRecord writes local files: prepared here, then uploaded
    _clear(out)
    local = tempfile.mkdtemp(prefix="jaxpref-prepare-out-")
    try:
      stats = prepare(job, local)
      names = paths.walk_files(local)
      for name in sorted(names, key=lambda n: n == INFO_FILE):  # INFO_FILE last: "prepared"
        paths.copy(os.path.join(local, name), paths.join(out, name))
    finally:
      shutil.rmtree(local, ignore_errors=True)
    return stats
  _clear(out)
  builder = JaxprefPrepared(job, data_dir=out, file_format="array_record")
  downloads = tempfile.mkdtemp(prefix="jaxpref-prepare-")  # TFDS wants one; nothing is downloaded
  try:
    builder.download_and_prepare(download_dir=downloads)
  finally:
    shutil.rmtree(downloads, ignore_errors=True)
  groups = os.path.join(out, GROUPS_FILE)
  np.savez(groups, **{name: np.concatenate(parts) for name, parts in job.arrays.items()})
  stats = dict(job.stats, groups_sha256=file_sha256(groups))
  stats["fingerprint"] = hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()
  with open(os.path.join(out, INFO_FILE), "w") as f:
    json.dump(stats, f, indent=1)
  return stats


def summary(stats: dict, out: str) -> str:
  s = stats
  lines = [f"{out}: {s['groups']} {s['format']} groups ({s['split']} split) from {s['source']}",
           f"  records read {s['records_read']}, skipped {s['records_skipped']}"
           + "".join(f"; {n}x {r}" for r, n in s["skipped_by_reason"].items()),
           f"  truncated to --max_len={s['max_len']}: {s['truncated_groups']} groups; longest "
           f"sequence {s['max_length']} tokens; {s['tokens']} tokens ({s['unk_tokens']} unknown)"]
  if "truncation" in s:
    limit = f" or --max_prompt_len={s['max_prompt_len']}" if s["max_prompt_len"] else ""
    policy = f"--truncation={s['truncation']}" + limit.replace(" or", ",")
    lines[-1] = lines[-1].replace(": ", f" ({policy}): ", 1)
    if s["truncation"] == "drop":
      lines.append(f"  dropped {s['dropped_groups']} groups over --max_len={s['max_len']}"
                   f"{limit} (--truncation=drop)")
  edges, counts = s["length_histogram"]["edges"], s["length_histogram"]["counts"]
  lines.append("  lengths: " + ", ".join(f"[{a}, {b}): {c}" for a, b, c in
                                         zip(edges, edges[1:], counts) if c))
  lines.append(f"  curriculum values stored ({GROUPS_FILE}): "
               + (", ".join(s["curriculum_fields"]) or "none")
               + (f"; not {', '.join(s['curriculum_missing'])} (why: prepared.json, "
                  "curriculum_missing)" if s["curriculum_missing"] else ""))
  return "\n".join(lines)
