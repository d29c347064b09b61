"""Which groups make train batch `step`, at what length (`--batching=pad|buckets|pack`).

- `pad`: the seeded epoch order (`batch_indices`), every row padded to `--max_len`.
- `buckets`: each window of `--bucket_window` consecutive batches is re-cut by length
  (sorted, then the window's batches shuffled), and a batch is padded only to its longest
  group rounded up to `--bucket_multiple`. A window holds exactly the groups `pad` gives
  those steps, so each group is still used once per epoch (at an epoch boundary a group
  may move to a neighbouring step of the window).
- `pack`: the `pad` groups of the step, `--pack_groups` of them per block of K rows
  (`data.packing`), rows padded to a multiple of `--bucket_multiple`.

Every choice is a pure function of (seed, step), so a resumed run is exact. jit compiles
one step per distinct length: at most ceil(max_len / multiple) for `buckets` and
ceil(pack_groups * max_len / multiple) for `pack` (`shapes_seen` counts them).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxpref.data import curriculum, packing
from jaxpref.data.pairs import batch_indices
from jaxpref.data.shared_prompt import SharedPromptView

MODES = ("pad", "buckets", "pack")


def padding_efficiency(batch) -> tuple[int, int]:
  """(real tokens, computed tokens) of a host batch: the model runs on every position of
  `segment_ids` (unpacked, shared-prompt and packed layouts alike), padding included."""
  seg = np.asarray(batch.segment_ids)
  return int((seg > 0).sum()), int(seg.size)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def host_rows(n_rows: int, process_index: int, process_count: int) -> slice:
  """The contiguous block of a global batch's `n_rows` leading rows that one host builds."""
  if n_rows % process_count:
    raise ValueError(f"a batch of {n_rows} rows does not split over {process_count} hosts")
  per = n_rows // process_count
  return slice(process_index * per, (process_index + 1) * per)


def dataset_lengths(ds) -> tuple[int, np.ndarray, int]:
  """(padded length T, member lengths int[N, K], longest response) of a dataset, which is
  all a `Batcher` plans with. Prepared data (`data.grain_source.PreparedDataset`) has them
  stored (`stored_lengths`), so planning reads no record."""
  if hasattr(ds, "stored_lengths"):
    return ds.stored_lengths()
  return (int(ds.segment_ids.shape[-1]), packing.member_lengths(ds.segment_ids),
          max(1, int(np.asarray(ds.loss_mask).sum(-1).max())))


class Batcher:
  """Train batches of a tokenized dataset (`ds.batch`, `ds.segment_ids`, `ds.loss_mask`)."""

  def __init__(self, ds, batch_size: int, seed: int, mode: str = "pad", multiple: int = 16,
               window: int = 32, pack_groups: int = 2, curriculum=None):
    if mode not in MODES:
      raise ValueError(f"--batching={mode!r} is not one of {', '.join(MODES)}")
    if multiple < 1 or window < 1 or pack_groups < 1:
      raise ValueError(f"--bucket_multiple ({multiple}), --bucket_window ({window}) and "
                       f"--pack_groups ({pack_groups}) must be >= 1")
    if mode == "pack" and batch_size % pack_groups:
      raise ValueError(f"--batch_size={batch_size} must be a multiple of --pack_groups="
                       f"{pack_groups} (the groups that share a packed block)")
    self.ds, self.batch_size, self.seed, self.mode = ds, batch_size, seed, mode
    self.multiple, self.window, self.m = multiple, window, pack_groups
    self.curriculum = curriculum
    self.max_len, self.lengths, self.response_len = dataset_lengths(ds)
    self.shapes_seen: set[tuple[int, ...]] = set()

  @property
  def rows(self) -> int:
    """Leading size of a batch: groups, or packed blocks."""
    return self.batch_size // self.m if self.mode == "pack" else self.batch_size

  def _base(self, step: int) -> np.ndarray:
    order = self.curriculum.epoch_order if self.curriculum is not None else None
    return batch_indices(self.ds.n, self.batch_size, step, self.seed, order)

  @functools.lru_cache(maxsize=2)
  def _window(self, w: int) -> np.ndarray:
    """int[window, B]: the window's groups sorted by length, cut into batches, shuffled."""
    idx = np.concatenate([self._base(s) for s in range(w * self.window, (w + 1) * self.window)])
    idx = idx[np.argsort(self.lengths[idx].max(1), kind="stable")]
    batches = idx.reshape(self.window, self.batch_size)
    # Shuffled so that one run does not go from short to long every window.
    return batches[np.random.default_rng([self.seed, w, 1]).permutation(self.window)]

  @functools.lru_cache(maxsize=4)
  def plan(self, step: int) -> tuple[np.ndarray, int]:
    """(group indices int[B] in batch order, padded length) of batch `step`."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    if self.mode == "buckets":
      idx = self._window(step // self.window)[step % self.window]
      return idx, min(round_up(int(self.lengths[idx].max()), self.multiple), self.max_len)
    idx = self._base(step)
    if self.mode == "pad":
      return idx, self.max_len
    idx = idx[packing.plan(self.lengths[idx], self.m)]
    return idx, round_up(packing.packed_length(self.lengths[idx], self.m), self.multiple)

  def batch(self, step: int, rows: slice = slice(None)):
    """The host batch of `step` (or its leading `rows`: groups, or blocks when packing)."""
    idx, length = self.plan(step)
    if self.mode == "pack":
      groups = idx.reshape(-1, self.m)[rows].reshape(-1)
      out = packing.pack(self.ds.batch(groups), self.m, length, self.response_len)
    else:
      groups = idx[rows]
      out = self.ds.batch(groups)
      if length < self.max_len:
        out = _cut(out, length)
    self.last_indices = groups  # the groups read, in row order: --log_records, tests
    self.shapes_seen.add(np.shape(out.tokens)[1:])
    return out

  def estimate(self, steps: int) -> tuple[float, int]:
    """(padding efficiency, batches) over the first `steps` batches, from the groups'
    lengths (shared-prompt rows, whose prompt counts once, are built: 50 batches at most)."""
    real = computed = 0
    k = self.lengths.shape[1]
    if isinstance(self.ds, SharedPromptView):  # the prompt is real once: count built rows
      steps = min(steps, 50)
    for step in range(steps):
      idx, length = self.plan(step)
      if isinstance(self.ds, SharedPromptView):
        r, c = padding_efficiency(self.ds.batch(idx))
        real, computed = real + r, computed + c
      else:
        real += int(self.lengths[idx].sum())
        computed += self.rows * k * length
    return real / computed, steps

  def describe(self) -> str:
    """What decides the order and shapes; stored with checkpoints, checked on resume."""
    parts = [f"batching={self.mode}"]
    if self.mode != "pad":
      parts.append(f"multiple={self.multiple}")
    if self.mode == "buckets":
      parts.append(f"window={self.window}")
    if self.mode == "pack":
      parts.append(f"pack_groups={self.m}")
    if self.curriculum is not None:
      parts.append(f"curriculum={self.curriculum.spec}:{len(self.curriculum.stages)}")
    return ",".join(parts)


def from_config(data, ds, row_multiple: int,
                order: curriculum.Curriculum | None = None) -> Batcher:
  """The `Batcher` of a `DataConfig`; `row_multiple` (grad_accum x batch shards) must
  divide a batch's leading rows. Combinations that cannot work raise. `order` is the
  curriculum when the caller built it (prepared data: from its stored values)."""
  if data.batching != "pad" and data.shared_prompt:
    raise ValueError(f"--batching={data.batching} with --shared_prompt: shared-prompt rows "
                     "have one packed shape already; use one or the other")
  if data.batching == "pack" and (data.pack_groups < 1 or data.batch_size % data.pack_groups
                                  or (data.batch_size // data.pack_groups) % row_multiple):
    raise ValueError(f"--batching=pack: --batch_size={data.batch_size} must be --pack_groups="
                     f"{data.pack_groups} times a multiple of {row_multiple} (--grad_accum times "
                     "the mesh's data*fsdp size): packed blocks are what is sharded")
  if order is None:
    order = curriculum.from_spec(ds, data.curriculum, data.curriculum_stages, data.seed)
  return Batcher(ds, data.batch_size, data.seed, data.batching, data.bucket_multiple,
                 data.bucket_window, data.pack_groups, order)


def _cut(batch, length: int):
  """A group batch with its [B, K, T] arrays cut to the first `length` positions (all
  padding beyond: the batch's longest row fits)."""
  cut = lambda x: np.asarray(x)[..., :length]
  return dataclasses.replace(batch, tokens=cut(batch.tokens), loss_mask=cut(batch.loss_mask),
                             segment_ids=cut(batch.segment_ids))
