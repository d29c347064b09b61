"""Shared-prompt packing gives the log-probs of computing each prompt + response apart."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxpref import data as data_lib
from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.data.shared_prompt import pack, packed_shape, tokens_computed
from jaxpref.models.logps import LogpsOptions, token_logps
from jaxpref.train.reference import Reference
from jaxpref.train.roles import policy
from jaxpref.train.step import make_steps


def _ranked_ds():
  tok = data_lib.Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))
  records, _ = data_lib.read_ranked(os.path.join(make_tiny.OUT, "ranked_train.jsonl"))
  return data_lib.RankedDataset(records[:40], tok, 48, group_size=4)


def _pairs_ds():
  tok = data_lib.Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))
  records, _ = data_lib.read_pairs(os.path.join(make_tiny.OUT, "train.jsonl"))
  return data_lib.PairDataset(records[:40], tok, 64)


def _model():
  return nnx.split(models.Decoder(models.get_config("tiny"), rngs=nnx.Rngs(1)))


def _response_logps(tok, mask):
  """[B, K, T] per-token log-probs -> [B, K, R] in response order (mask == 1 positions)."""
  b, k, _ = tok.shape
  r = int(mask.sum(-1).max())
  out = np.zeros((b, k, r), np.float32)
  for i in range(b):
    for j in range(k):
      vals = tok[i, j][mask[i, j] == 1]
      out[i, j, :len(vals)] = vals
  return out


@pytest.mark.parametrize("make_ds", [_pairs_ds, _ranked_ds], ids=["pairs", "ranked_k4"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_packed_logps_equal_separate_sequences(make_ds, fused):
  ds = make_ds()
  graphdef, params = _model()
  batch = ds.batch(np.arange(16))
  packed = pack(batch)
  opts = LogpsOptions(fused_lm_head=fused)
  sep = np.asarray(token_logps(graphdef, params, batch, opts))
  got = np.asarray(token_logps(graphdef, params, packed, opts))
  want = _response_logps(sep, np.asarray(batch.loss_mask))
  # Tolerance: float32; the packed row sums attention over more (masked-out) keys.
  np.testing.assert_allclose(got[..., :want.shape[-1]], want, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(got.sum(-1), sep.sum(-1), rtol=1e-5, atol=1e-4)
  assert tokens_computed(packed) < tokens_computed(batch)


def test_packed_train_step_matches_unpacked():
  ds = _pairs_ds()
  graphdef, params = _model()
  import optax
  from jaxpref import losses
  _, eval_step = make_steps(policy.forward(graphdef), losses.bind("dpo", {"beta": 1.0}),
                            optax.sgd(0.1))
  # A reference that differs from the policy.
  ref = Reference("model", jax.tree.map(lambda x: x * 0.9, params))
  batch = ds.batch(np.arange(16))
  m_sep, _ = eval_step(params, ref, batch)
  m_pack, _ = eval_step(params, ref, pack(batch))
  for key in ("loss", "rewards/margin", "logps/chosen", "logps/rejected"):
    np.testing.assert_allclose(m_pack[key], m_sep[key], rtol=1e-5, atol=1e-5)


def test_layout_positions_segments_and_fixed_shape():
  ds = _pairs_ds()
  batch = ds.batch(np.arange(4))
  length, resp = packed_shape(ds)
  p = pack(batch, length, resp)
  assert p.tokens.shape == (4, length) and p.targets.shape == (4, 2, resp)
  mask = np.asarray(batch.loss_mask[0])
  n_prompt = int(np.flatnonzero(mask[0])[0])
  n0, n1 = int(mask[0].sum()), int(mask[1].sum())
  seg = p.segment_ids[0]
  assert list(seg[:n_prompt]) == [1] * n_prompt
  assert list(seg[n_prompt:n_prompt + n0]) == [2] * n0
  assert list(seg[n_prompt + n0:n_prompt + n0 + n1]) == [3] * n1
  # Both responses restart their positions right after the prompt.
  assert p.positions[0, n_prompt] == p.positions[0, n_prompt + n0] == n_prompt
  assert p.pred_index[0, 0, 0] == p.pred_index[0, 1, 0] == n_prompt - 1
  with pytest.raises(ValueError, match="need L="):
    pack(batch, length=3)


def test_differing_prompts_are_an_error():
  ds = _pairs_ds()
  batch = ds.batch(np.arange(2))
  tokens = np.array(batch.tokens)
  first = int(np.flatnonzero(np.asarray(batch.loss_mask[0, 1]))[0])
  tokens[0, 1, first - 1] += 1  # member 1's prompt now differs from member 0's
  bad = batch.__class__(**{**batch.__dict__, "tokens": tokens})
  with pytest.raises(ValueError, match="group 0"):
    pack(bad)


def _run(workdir, shared, **kw):
  from jaxpref.train import loop
  from jaxpref.train.config import DataConfig, RunConfig
  tiny = make_tiny.OUT
  data = DataConfig(train_data=f"{tiny}/train.jsonl", eval_data=f"{tiny}/eval.jsonl",
                    tokenizer=f"{tiny}/tokenizer.model", shared_prompt=shared,
                    **kw.pop("data", {}))
  cfg = RunConfig(workdir=str(workdir), model=models.get_config("tiny"), steps=20, log_every=1,
                  eval_every=20, checkpoint_every=20, progress=False, plot=False, mesh="data:8",
                  data=data, **kw)
  final = loop.run(cfg)
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return final, [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{}, {"reference": "precomputed"}], ids=["model", "precomputed"])
def test_training_with_shared_prompt_matches_unpacked(tmp_path, kw):
  a, la = _run(tmp_path / "sep", False, **kw)
  b, lb = _run(tmp_path / "pack", True, **kw)
  # Tolerance: float32 differences compound over 20 Adam steps.
  np.testing.assert_allclose(lb, la, atol=1e-4, rtol=0)
  assert abs(a["rewards/accuracy"] - b["rewards/accuracy"]) < 0.01


def test_shared_prompt_refuses_unpaired_groups(tmp_path):
  from jaxpref.train import loop
  with pytest.raises(ValueError, match="--shared_prompt needs groups that share a prompt"):
    _run(tmp_path / "w", True, loss="kto", data={"format": "pairs_as_unpaired"})
