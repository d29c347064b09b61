"""Shared-prompt packing: a group's K responses after one copy of their prompt.

A group batch lays out each member as `BOS + prompt + response_k`, so the prompt is run
through the model K times. Packed, a row is

    [ BOS + prompt | response_1 | response_2 | ... | response_K | padding ]
      segment 1      segment 2    segment 3          segment K+1   0

with RoPE positions restarting at the prompt's length for every response, and attention
`causal & (same segment or key in segment 1)`: each response sees the prompt and itself,
never another response (`models.decoder.attention_mask(shared_prompt=True)`). Every hidden
state is then what the unpacked row computes, so the log-probs agree to float rounding.

Log-probs are read in response coordinates `[B, K, R]`: response k's token j is predicted
by the hidden state at `pred_index[b, k, j]`, the position before it in the packed row,
which for j = 0 is the prompt's last token (shared by all K responses).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxpref.types import GroupBatch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SharedPromptBatch:
  """A packed group batch; every other `GroupBatch` field is read from `group`."""

  tokens: Any  # int32[B, L]
  segment_ids: Any  # int32[B, L]
  positions: Any  # int32[B, L]
  pred_index: Any  # int32[B, K, R]: row position whose hidden state predicts the token
  targets: Any  # int32[B, K, R]: the response tokens
  loss_mask: Any  # float32[B, K, R]: 1 on real response tokens
  group: GroupBatch  # valid, weight, scores, ... (its [B, K, T] arrays are emptied)

  def __getattr__(self, name):  # only reached for fields this class does not have
    if name == "group" or name.startswith("__"):  # copy/pickle probe before `group` is set
      raise AttributeError(name)
    return getattr(self.group, name)


def _split(tokens: np.ndarray, loss_mask: np.ndarray, index: int):
  """(prompt ids, [response ids per member]) of one group [K, T]; prompts must agree."""
  prompts, responses = [], []
  for row, mask in zip(tokens, loss_mask):
    on = np.flatnonzero(mask)
    start = on[0] if len(on) else None
    responses.append(row[on] if len(on) else row[:0])
    prompts.append(row[:start] if start is not None else None)
  known = [p for p in prompts if p is not None]
  if any(len(p) != len(known[0]) or np.any(p != known[0]) for p in known[1:]):
    raise ValueError(f"group {index}: its members' prompts differ (truncation cut them "
                     "differently); shared-prompt packing needs one prompt per group: raise "
                     "--max_len, drop such groups (--truncation=drop) or pack without "
                     "--shared_prompt")
  return (known[0] if known else tokens[0, :1]), responses


def pack(batch: GroupBatch, length: int | None = None,
         response_length: int | None = None) -> SharedPromptBatch:
  """Packs a host (numpy) group batch. `length`/`response_length` fix L and R (else the
  batch's own maxima), so a training run can keep one compiled shape."""
  tokens, loss_mask = np.asarray(batch.tokens), np.asarray(batch.loss_mask)
  b, k, _ = tokens.shape
  groups = [_split(tokens[i], loss_mask[i], i) for i in range(b)]
  need_l = max(len(p) + sum(len(r) for r in rs) for p, rs in groups)
  need_r = max(max(len(r) for r in rs) for _, rs in groups)
  length, response_length = length or need_l, response_length or need_r
  if need_l > length or need_r > response_length:
    raise ValueError(f"packed rows need L={need_l}, R={need_r}; got L={length}, "
                     f"R={response_length}")
  out = dict(tokens=np.zeros((b, length), np.int32), segment_ids=np.zeros((b, length), np.int32),
             positions=np.zeros((b, length), np.int32),
             pred_index=np.zeros((b, k, response_length), np.int32),
             targets=np.zeros((b, k, response_length), np.int32),
             loss_mask=np.zeros((b, k, response_length), np.float32))
  for i, (prompt, responses) in enumerate(groups):
    n_p = len(prompt)
    out["tokens"][i, :n_p] = prompt
    out["segment_ids"][i, :n_p] = 1
    out["positions"][i, :n_p] = np.arange(n_p)
    at = n_p
    for j, resp in enumerate(responses):
      n_r = len(resp)
      out["tokens"][i, at:at + n_r] = resp
      out["segment_ids"][i, at:at + n_r] = j + 2
      out["positions"][i, at:at + n_r] = n_p + np.arange(n_r)
      out["targets"][i, j, :n_r] = resp
      out["loss_mask"][i, j, :n_r] = 1.0
      out["pred_index"][i, j, :n_r] = np.concatenate([[n_p - 1], at + np.arange(n_r - 1)])[:n_r]
      at += n_r
  empty = np.zeros((b, k, 0), np.int32)
  group = dataclasses.replace(batch, tokens=empty, segment_ids=empty,
                              loss_mask=empty.astype(np.float32))
  return SharedPromptBatch(group=group, **out)


def packed_shape(ds, batch_size: int = 256) -> tuple[int, int]:
  """(L, R) that fit every group of a dataset (`ds.n`, `ds.batch(indices)`)."""
  need_l = need_r = 1
  for start in range(0, ds.n, batch_size):
    p = pack(ds.batch(np.arange(start, min(ds.n, start + batch_size))))
    need_l, need_r = max(need_l, p.tokens.shape[1]), max(need_r, p.targets.shape[2])
  return need_l, need_r


def tokens_computed(batch) -> int:
  """Token positions the model runs on (padding included): B*K*T unpacked, B*L packed."""
  return int(np.prod(batch.tokens.shape))


class SharedPromptView:
  """A dataset whose `batch()` returns packed batches of one fixed shape (L, R).

  Everything else (`n`, `ref_logps`, ...) reads and writes through to the wrapped dataset,
  so batch order, evaluation and reference precomputation work on it unchanged.
  """

  def __init__(self, ds):
    object.__setattr__(self, "_ds", ds)
    object.__setattr__(self, "shape", packed_shape(ds))

  def batch(self, indices: np.ndarray, weight: np.ndarray | None = None) -> SharedPromptBatch:
    return pack(self._ds.batch(indices, weight), *self.shape)

  def __getattr__(self, name):
    return getattr(self._ds, name)

  def __setattr__(self, name, value):
    setattr(self._ds, name, value)
