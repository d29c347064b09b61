"""DRIFT's pairs (`--online.pairs=drift`): an on-policy positive against a real negative.

DRIFT learns from real user dissatisfaction: the rejected response of each pair is one a
user signalled dissatisfaction with (the record's `rejected` field), the chosen one is
sampled on the fly from the current policy. Here the chosen response is the group's best
valid sample under the run's reward (the first one when they tie), and the rejected row is
the prompt followed by the record's rejected response and EOS, cut to the rollout's width
(then without EOS; counted). Any pairwise loss trains on the pairs; `--rounds` refreshes
the reference. The pair's scores are (the best sample's, the group's lowest): a loss that
reads scores sees the negative as no better than the worst sample (a reading: the paper
gives negatives no score).
"""

from __future__ import annotations

import numpy as np

from jaxpref.types import GroupBatch


def pairs(batch: GroupBatch, prompts: list, negatives: list, eos_id: int,
          pad_id: int) -> tuple[GroupBatch, int]:
  """(pairs [B, 2, T], number of negatives cut to fit). `prompts[b]`: group b's framed
  prompt ids (BOS + prompt); `negatives[b]`: its record's rejected response ids."""
  b, k, t = batch.tokens.shape
  s = np.where(batch.valid, batch.scores, np.nan)
  has = np.isfinite(s).any(axis=1)
  best = np.where(has, np.nanargmax(np.where(has[:, None], s, 0.0), axis=1), 0)
  rows = np.arange(b)
  neg_tokens = np.full((b, t), pad_id, np.int32)
  neg_mask = np.zeros((b, t), np.float32)
  neg_segs = np.zeros((b, t), np.int32)
  cut = 0
  for i, (p, r) in enumerate(zip(prompts, negatives)):
    room = t - len(p)
    body = list(r) + [eos_id]
    if len(body) > room:
      body, cut = body[:room], cut + 1
    row = list(p) + body
    neg_tokens[i, :len(row)] = row
    neg_mask[i, len(p):len(row)] = 1.0
    neg_segs[i, :len(row)] = 1
  low = np.where(has, np.nanmin(np.where(has[:, None], s, 0.0), axis=1), 0.0)
  two = lambda chosen, rejected: np.stack([chosen, rejected], axis=1)
  out = GroupBatch(tokens=two(batch.tokens[rows, best], neg_tokens),
                   loss_mask=two(batch.loss_mask[rows, best], neg_mask),
                   segment_ids=two(batch.segment_ids[rows, best], neg_segs),
                   valid=two(has, np.ones(b, bool)),
                   weight=(np.asarray(batch.weight) * has).astype(np.float32),
                   scores=two(batch.scores[rows, best], low.astype(np.float32)))
  return out, cut
