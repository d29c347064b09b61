"""Pairs -> `GroupBatch` (K=2, chosen first), and a resumable batch order.

A sequence is `BOS + prompt + response + EOS`, padded to `max_len`. Prompt and response are
tokenized separately so no token straddles the boundary, and `loss_mask` is 1 exactly on
the response tokens and the EOS (the position convention of `jaxpref.types.GroupBatch`:
token t counts as the prediction of t from tokens < t, so BOS is never masked in).

A sequence over `max_len` is cut as `Truncation` says (`--truncation`, `--max_prompt_len`):
the response always keeps its start; the prompt keeps its end (`keep_end`, the default) or
its start (`keep_start`); `drop` removes the whole group instead, counted in `n_dropped_groups`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import numpy as np

from jaxpref.data import curriculum, extra_members
from jaxpref.data.records import PairRecord
from jaxpref.data.sources import DataError
from jaxpref.data.tokenizer import Tokenizer
from jaxpref.types import GroupBatch


TRUNCATION_MODES = ("keep_end", "keep_start", "drop")


@dataclasses.dataclass(frozen=True)
class Truncation:
  """How a sequence over `max_len` is made to fit (`--truncation`, `--max_prompt_len`).

  `mode`: keep_end keeps the end of the prompt (its end carries the question), keep_start
  its start (TRL's truncation_mode="keep_start"); drop lays the row out as keep_end but the
  datasets remove every group it cut. `max_prompt_len` > 0 first cuts the prompt to that
  many tokens by the same rule (TRL's max_prompt_length); that cut counts as truncation.
  """

  mode: str = "keep_end"
  max_prompt_len: int = 0  # 0: no limit of its own

  def __post_init__(self):
    if self.mode not in TRUNCATION_MODES:
      raise ValueError(f"--truncation={self.mode!r} is not one of {', '.join(TRUNCATION_MODES)}")
    if self.max_prompt_len < 0:
      raise ValueError(f"--max_prompt_len must be >= 0 (0: no limit), got {self.max_prompt_len}")

  @classmethod
  def of(cls, data_cfg) -> "Truncation":
    """The policy of a `DataConfig` (or anything with its two fields)."""
    return cls(data_cfg.truncation, data_cfg.max_prompt_len)

  @classmethod
  def for_scoring(cls, data_cfg) -> "Truncation":
    """The run's policy for tools that score every record (eval, strength, best-of-N):
    `drop` becomes keep_end, so each record still gets its score."""
    mode = getattr(data_cfg, "truncation", "keep_end")
    return cls("keep_end" if mode == "drop" else mode, getattr(data_cfg, "max_prompt_len", 0))

  @property
  def is_default(self) -> bool:
    return self == Truncation()

  def limits(self, max_len: int) -> str:
    """What a dropped group was over, for reports."""
    return f"--max_len={max_len}" + (f" or --max_prompt_len={self.max_prompt_len}"
                                     if self.max_prompt_len else "")

  def cut(self, ids: list[int], n: int) -> list[int]:
    """`n` tokens of the prompt `ids`: its last (keep_end, drop) or first (keep_start)."""
    if n <= 0:
      return []
    return ids[:n] if self.mode == "keep_start" else ids[max(len(ids) - n, 0):]


def encode_pair(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
  """(prompt ids, response ids) as `Tokenizer.encode_pair` splits the whole text (what
  `apply_chat_template` gives); a tokenizer without it encodes each on its own."""
  pair = getattr(tok, "encode_pair", None)
  return pair(prompt, response) if pair else (tok.encode(prompt), tok.encode(response))


def _layout(tok: Tokenizer, p: list[int], r: list[int], max_len: int,
            truncation: Truncation | None = None):
  """Places BOS + p + r + EOS in a padded row, BOS and EOS as the tokenizer's `add_bos` and
  `add_eos` say (off where its chat template writes none); see `tokenize_sequence` for
  truncation."""
  tr = truncation or Truncation()
  bos = [tok.bos_id] if getattr(tok, "add_bos", True) else []
  eos = [tok.eos_id] if getattr(tok, "add_eos", True) else []
  frame = len(bos) + len(eos)
  prompt_cut = 0 < tr.max_prompt_len < len(p)
  if prompt_cut:
    p = tr.cut(p, tr.max_prompt_len)
  truncated = frame + len(p) + len(r) > max_len
  if truncated:
    if frame + len(r) <= max_len:
      p = tr.cut(p, max_len - frame - len(r))
    else:
      p = tr.cut(p, max_len // 2)
      r, eos = r[:max_len - len(bos) - len(p)], []
  seq = bos + p + r + eos
  n = len(seq)
  tokens = np.full(max_len, tok.pad_id, np.int32)
  tokens[:n] = seq
  loss_mask = np.zeros(max_len, np.float32)
  loss_mask[max(len(bos) + len(p), 1):n] = 1.0  # position 0 is never predicted
  segment_ids = np.zeros(max_len, np.int32)
  segment_ids[:n] = 1
  return tokens, loss_mask, segment_ids, truncated or prompt_cut


def tokenize_sequence(tok: Tokenizer, prompt: str, response: str, max_len: int,
                      truncation: Truncation | None = None):
  """(tokens int32[max_len], loss_mask f32[max_len], segment_ids int32[max_len], truncated).

  Too long: cut the prompt first (keep_end drops its start: its end carries the question;
  keep_start drops its end). If the response alone does not fit, the prompt keeps
  max_len//2 tokens (a response scored without its question says nothing about the
  preference) and the response is cut at the end, without EOS (it did not end there).
  With `--truncation=drop` the row is laid out as keep_end and `truncated` tells the
  caller to drop it.
  """
  if max_len < 3:
    raise ValueError(f"--max_len must be >= 3 (BOS, a token, EOS), got {max_len}")
  return _layout(tok, *encode_pair(tok, prompt, response), max_len, truncation)


def tokenize_pair(tok: Tokenizer, rec: PairRecord, max_len: int,
                  truncation: Truncation | None = None):
  """(tokens int32[2, T], loss_mask f32[2, T], segment_ids int32[2, T], truncated), T=max_len.

  Row 0 is the chosen response, row 1 the rejected one, each laid out as in
  `tokenize_sequence`; `truncated` is True if either row was cut.
  """
  if max_len < 3:
    raise ValueError(f"--max_len must be >= 3 (BOS, a token, EOS), got {max_len}")
  rows = [_layout(tok, *encode_pair(tok, rec.prompt, r), max_len, truncation)
          for r in (rec.chosen, rec.rejected)]
  tokens, loss_mask, segment_ids = (np.stack([row[i] for row in rows]) for i in range(3))
  return tokens, loss_mask, segment_ids, rows[0][3] or rows[1][3]


class PairDataset:
  """Tokenized pairs as arrays `[N, 2, T]` (index 0 chosen, 1 rejected).

  `n_truncated` counts pairs with a row cut to `max_len`; `n_dropped_groups` the groups
  `--truncation=drop` removed instead (absent from the arrays, `drop_note` reports them);
  `n_unk` counts unknown-piece tokens among the `n_tokens` real ones (text the tokenizer
  never saw, e.g. capitals with the lowercase tiny tokenizer), all worth a line in the
  run's log.
  """

  # Per-pair flip rates [N] from the records; a class default so that the ranked and
  # unpaired datasets, which never read the field, batch without it.
  label_smoothing: np.ndarray | None = None
  user: np.ndarray | None = None  # int32[N], the records' `user` ids
  attribute_prefs: np.ndarray | None = None  # float32[N, A], the records' `attribute_prefs`
  source_logps: np.ndarray | None = None  # float32[N, S, 2], the records' `source_logps`
  record_ref_logps: np.ndarray | None = None  # float32[N, 2]: ref_chosen/rejected_logps
  curriculum_values: np.ndarray | None = None  # float64[N], the kept --curriculum field
  truncation = Truncation()
  n_dropped_groups = 0
  # Per-record arrays the constructors set after `_fill`; `_finish` removes dropped groups.
  PER_GROUP = ("weight", "scores", "label_smoothing", "user", "attribute_prefs",
               "source_logps", "curriculum_values", "label", "record_ref_logps")

  def __init__(self, records: Sequence[PairRecord], tok: Tokenizer, max_len: int,
               extra: Sequence[str] = (), *, truncation: Truncation | None = None,
               whole: bool = True):
    """`extra`: extra-member fields (`extra_members.MEMBER_FIELDS`, what the loss needs)
    whose sequences follow the pair, so K = 2 + len(extra). `whole` False: `records` are
    one chunk of a larger set (prepare), which may lose all its groups to --truncation=drop."""
    k = 2 + len(extra)
    # Each response as (its prompt ids, its ids): the whole text split at the seam.
    groups = ((None, (encode_pair(tok, r.prompt, r.chosen), encode_pair(tok, r.prompt, r.rejected),
                      *extra_members.member_ids(tok, r, i, extra)))
              for i, r in enumerate(records))
    self._fill(tok, max_len, groups, len(records), counted=tuple(range(k)), k=k,
               truncation=truncation)
    self.weight = np.array([r.weight for r in records], np.float32)  # [N]
    self.curriculum_values = curriculum.kept_values(records)
    has_scores = bool(records) and records[0].scores is not None  # all or none (read_pairs)
    self.scores = np.array([r.scores for r in records], np.float32) if has_scores else None
    if records and records[0].label_smoothing is not None:  # all or none (read_pairs)
      self.label_smoothing = np.array([r.label_smoothing for r in records], np.float32)
    if records and records[0].user is not None:  # all or none (read_pairs)
      self.user = np.array([r.user for r in records], np.int32)
    if records and records[0].attribute_prefs is not None:  # all or none, one length
      self.attribute_prefs = np.array([r.attribute_prefs for r in records], np.float32)
    if records and records[0].source_logps is not None:  # all or none, one S (read_pairs)
      self.source_logps = np.array([r.source_logps for r in records], np.float32)
    if records and records[0].ref_logps is not None:  # all or none (read_pairs)
      self.record_ref_logps = np.array([r.ref_logps for r in records], np.float32)  # [N, 2]
    self._finish(whole)

  def _fill(self, tok: Tokenizer, max_len: int, groups, n: int, counted: tuple[int, ...],
            k: int = 2, truncation: Truncation | None = None):
    """Lays out `groups` of (prompt ids, (response ids, ...)) into `[N, K, T]` arrays (a
    group with fewer than K responses leaves the rest as invalid members); a group counts
    as truncated if one of its `counted` members was cut, and with --truncation=drop is
    removed from the arrays instead (the per-record arrays follow in `_finish`)."""
    if max_len < 3:
      raise ValueError(f"--max_len must be >= 3 (BOS, a token, EOS), got {max_len}")
    self.max_len = max_len
    self.truncation = tr = truncation or Truncation()
    self.ref_logps = None  # float32[N, K], set by a --reference=precomputed run
    self.tokens = np.zeros((n, k, max_len), np.int32)
    self.loss_mask = np.zeros((n, k, max_len), np.float32)
    self.segment_ids = np.zeros((n, k, max_len), np.int32)
    self.members = np.zeros((n, k), bool)  # which group members exist
    self.n_truncated = 0
    self._kept = np.ones(n, bool)
    for i, (prompt, responses) in enumerate(groups):
      cut_any = False
      for j, response in enumerate(responses):
        # An extra member (extra_members.py) comes as (its own prompt ids, response ids).
        p, r = response if isinstance(response, tuple) else (prompt, response)
        t, m, seg, cut = _layout(tok, p, r, max_len, tr)
        self.tokens[i, j], self.loss_mask[i, j], self.segment_ids[i, j] = t, m, seg
        self.members[i, j] = True
        cut_any |= cut and j in counted
      if cut_any and tr.mode == "drop":
        self._kept[i] = False
      else:
        self.n_truncated += cut_any
    self.n_dropped_groups = int(n - self._kept.sum())
    if self.n_dropped_groups:
      for name in ("tokens", "loss_mask", "segment_ids", "members"):
        setattr(self, name, getattr(self, name)[self._kept])
    real = self.segment_ids > 0
    self.n_tokens = int(real.sum())
    self.n_unk = int((real & (self.tokens == tok.unk_id)).sum())

  def _finish(self, whole: bool = True) -> None:
    """Removes the dropped groups from the per-record arrays (`PER_GROUP`); a whole
    dataset that --truncation=drop emptied is an error, never an empty run."""
    if not self.n_dropped_groups:
      return
    for name in self.PER_GROUP:
      values = getattr(self, name, None)
      if values is not None:
        setattr(self, name, values[self._kept])
    if whole and self.n == 0:
      raise DataError(
          f"every one of the {self.n_dropped_groups} groups is over "
          f"{self.truncation.limits(self.max_len)} and --truncation=drop dropped them all: "
          "raise the limit, or cut them with --truncation=keep_end or keep_start")

  @property
  def drop_note(self) -> str:
    """The data report's words on dropped groups ("" unless --truncation=drop)."""
    if self.truncation.mode != "drop":
      return ""
    return (f"; dropped {self.n_dropped_groups} groups over "
            f"{self.truncation.limits(self.max_len)} (--truncation=drop)")

  @property
  def n(self) -> int:
    return len(self.tokens)

  def batch(self, indices: np.ndarray, weight: np.ndarray | None = None) -> GroupBatch:
    """The groups at `indices` (numpy arrays). `weight` marks batch padding (0); a group's
    weight is that times its record's `weight`; padding groups are marked invalid."""
    indices = np.asarray(indices)
    b = len(indices)
    pad = np.ones(b, np.float32) if weight is None else np.asarray(weight, np.float32)
    return GroupBatch(tokens=self.tokens[indices], loss_mask=self.loss_mask[indices],
                      segment_ids=self.segment_ids[indices],
                      valid=(pad > 0)[:, None] & self.members[indices],
                      weight=pad * self.weight[indices],
                      scores=None if self.scores is None else self.scores[indices],
                      label_smoothing=(None if self.label_smoothing is None
                                       else self.label_smoothing[indices]),
                      user=None if self.user is None else self.user[indices],
                      source_logps=(None if self.source_logps is None
                                    else self.source_logps[indices]),
                      attribute_prefs=(None if self.attribute_prefs is None
                                       else self.attribute_prefs[indices]),
                      ref_logps=None if self.ref_logps is None else self.ref_logps[indices])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  perm.flags.writeable = False  # shared by every caller through the cache
  return perm


def batch_indices(n: int, batch_size: int, step: int, seed: int,
                  epoch_order: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
  """Indices of batch `step` in an endless stream of seeded epoch permutations of range(n).

  Batch `step` is positions [step*batch_size, (step+1)*batch_size) of the concatenation
  of `default_rng([seed, epoch]).permutation(n)` over epochs 0, 1, ... A pure function of
  (n, batch_size, step, seed): a resumed run draws exactly the batches it would have, and
  every record is used once per epoch (a batch may span two epochs; nothing is dropped).
  `epoch_order(epoch)` replaces the permutation (a curriculum's order, `data.curriculum`);
  it must itself be a pure function of the epoch.
  """
  if n <= 0 or batch_size <= 0 or step < 0:
    raise ValueError(f"batch_indices needs n > 0, batch_size > 0, step >= 0; "
                     f"got n={n}, batch_size={batch_size}, step={step}")
  start = step * batch_size
  positions = np.arange(start, start + batch_size)
  epochs = positions // n
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    order = (_epoch_permutation(n, seed, int(epoch)) if epoch_order is None
             else epoch_order(int(epoch)))
    out[sel] = order[positions[sel] % n]
  return out


def eval_batches(ds: PairDataset, batch_size: int) -> Iterator[GroupBatch]:
  """Every record exactly once, in order; the last batch is padded with weight-0 groups.

  Padding repeats record 0 with weight 0 and valid False, so every batch has the same
  shape (one compilation) and the padding adds nothing to weighted means.
  """
  if batch_size <= 0:
    raise ValueError(f"eval batch size must be > 0, got {batch_size}")
  for start in range(0, ds.n, batch_size):
    idx = np.arange(start, min(start + batch_size, ds.n))
    pad = batch_size - len(idx)
    weight = np.concatenate([np.ones(len(idx)), np.zeros(pad)])
    yield ds.batch(np.concatenate([idx, np.zeros(pad, idx.dtype)]), weight)
