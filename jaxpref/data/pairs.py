"""Pairs -> `GroupBatch` (K=2, chosen first), and a resumable batch order.

A sequence is `BOS + prompt + response + EOS`, padded to `max_len`. Prompt and response are
tokenized separately so no token straddles the boundary, and `loss_mask` is 1 exactly on
the response tokens and the EOS (the position convention of `jaxpref.types.GroupBatch`).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from jaxpref.data.records import PairRecord
from jaxpref.data.tokenizer import Tokenizer
from jaxpref.types import GroupBatch


def tokenize_sequence(tok: Tokenizer, prompt: str, response: str, max_len: int):
  """(tokens int32[max_len], loss_mask f32[max_len], segment_ids int32[max_len], truncated).

  Too long: drop the start of the prompt first (its end carries the question). If the
  response alone does not fit, the prompt keeps its last max_len//2 tokens and the
  response is cut at the end, without EOS (it did not end there).
  """
  p, r = tok.encode(prompt), tok.encode(response)
  eos = [tok.eos_id]
  truncated = 2 + len(p) + len(r) > max_len
  if truncated:
    if 2 + len(r) <= max_len:
      p = p[len(p) - (max_len - 2 - len(r)):] if max_len - 2 - len(r) > 0 else []
    else:
      p = p[-(max_len // 2):] if max_len // 2 > 0 else []
      r, eos = r[:max_len - 1 - len(p)], []
  seq = [tok.bos_id] + p + r + eos
  n = len(seq)
  tokens = np.full(max_len, tok.pad_id, np.int32)
  tokens[:n] = seq
  loss_mask = np.zeros(max_len, np.float32)
  loss_mask[1 + len(p):n] = 1.0
  segment_ids = np.zeros(max_len, np.int32)
  segment_ids[:n] = 1
  return tokens, loss_mask, segment_ids, truncated


class PairDataset:
  """Tokenized pairs as arrays `[N, 2, T]` (index 0 chosen, 1 rejected)."""

  def __init__(self, records: Sequence[PairRecord], tok: Tokenizer, max_len: int):
    if max_len < 3:
      raise ValueError(f"--max_len must be >= 3 (BOS, a token, EOS), got {max_len}")
    n = len(records)
    self.tokens = np.zeros((n, 2, max_len), np.int32)
    self.loss_mask = np.zeros((n, 2, max_len), np.float32)
    self.segment_ids = np.zeros((n, 2, max_len), np.int32)
    self.n_truncated = 0
    for i, rec in enumerate(records):
      cut = False
      for k, response in enumerate((rec.chosen, rec.rejected)):
        t, m, s, c = tokenize_sequence(tok, rec.prompt, response, max_len)
        self.tokens[i, k], self.loss_mask[i, k], self.segment_ids[i, k] = t, m, s
        cut |= c
      self.n_truncated += cut

  @property
  def n(self) -> int:
    return len(self.tokens)

  def batch(self, indices: np.ndarray, weight: np.ndarray | None = None) -> GroupBatch:
    b = len(indices)
    weight = np.ones(b, np.float32) if weight is None else weight.astype(np.float32)
    return GroupBatch(tokens=self.tokens[indices], loss_mask=self.loss_mask[indices],
                      segment_ids=self.segment_ids[indices],
                      valid=np.broadcast_to((weight > 0)[:, None], (b, 2)).copy(), weight=weight)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of batch `step` in an endless stream of seeded epoch permutations of range(n).

  A pure function of (seed, step): a resumed run draws exactly the batches it would have,
  and every record is used once per epoch (a batch may span two epochs; none is dropped).
  """
  start = step * batch_size
  positions = np.arange(start, start + batch_size)
  epochs = positions // n
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
    sel = epochs == epoch
    out[sel] = perm[positions[sel] % n]
  return out


def eval_batches(ds: PairDataset, batch_size: int) -> Iterator[GroupBatch]:
  """Every record exactly once, in order; the last batch is padded with weight-0 groups."""
  for start in range(0, ds.n, batch_size):
    idx = np.arange(start, min(start + batch_size, ds.n))
    pad = batch_size - len(idx)
    weight = np.concatenate([np.ones(len(idx)), np.zeros(pad)])
    yield ds.batch(np.concatenate([idx, np.zeros(pad, idx.dtype)]), weight)
