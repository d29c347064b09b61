"""themis (docs/reward_models.md#themis, `jaxpref/losses/themis.py`): a float64 numpy reference written
from the formula, gradients, and the reward step's per-token LM log-probs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import reward_refs as R
from cli_util import ROOT
from jaxpref import data as data_lib
from jaxpref import losses, models
from jaxpref.models.heads import RewardModel
from jaxpref.types import RewardOutputs


def ref_themis(r, tok, mask, w, bt_weight=0.5, tau=1.0, lm_on="chosen"):
  m = 1 if lm_on == "chosen" else 2
  tw = mask[:, :m] * w[:, None, None]
  nll = np.sum(-tok[:, :m] * tw) / max(np.sum(tw), 1.0)
  return nll + bt_weight * R.wmean(-R.logsig((r[:, 0] - r[:, 1]) / tau), w)


def inputs(seed, b=6, t=7):
  rng = np.random.default_rng(seed)
  r = rng.normal(0, 2.0, (b, 2))
  tok = -rng.uniform(0.1, 4.0, (b, 2, t))
  mask = (rng.uniform(size=(b, 2, t)) < 0.6).astype(float)
  w = rng.uniform(0.5, 2.0, b)
  w[0] = 0.0
  return r, tok, mask, w


def make_lp(r, tok, mask, w, dtype=jnp.float32):
  return RewardOutputs(reward=jnp.asarray(r, dtype), length=jnp.asarray(mask.sum(-1), dtype),
                       valid=jnp.ones(r.shape, bool), weight=jnp.asarray(w, dtype),
                       policy_tok=jnp.asarray(tok * mask, dtype), mask=jnp.asarray(mask, dtype))


@pytest.mark.parametrize("hp", [{}, {"bt_weight": 1.0, "tau": 0.5}, {"lm_on": "both"}], ids=str)
def test_matches_numpy(hp):
  r, tok, mask, w = inputs(0)
  loss, metrics = jax.jit(losses.bind("themis", hp))(make_lp(r, tok, mask, w))
  np.testing.assert_allclose(float(loss), ref_themis(r, tok * mask, mask, w, **hp), rtol=1e-5)
  assert float(metrics["loss/nll"]) > 0


def test_gradients_match_finite_differences():
  r, tok, mask, w = inputs(1, b=4, t=5)
  with jax.enable_x64(True):
    fn = losses.bind("themis", {"lm_on": "both"})
    check_grads(lambda a, b: fn(make_lp(a, b, mask, w, jnp.float64))[0],
                [jnp.asarray(r, jnp.float64), jnp.asarray(tok, jnp.float64)], order=1,
                modes=["rev"], atol=1e-6, rtol=1e-6)


def test_bt_weight_zero_is_the_nll_and_the_rest_is_bt():
  r, tok, mask, w = inputs(2)
  lp = make_lp(r, tok, mask, w)
  nll = float(losses.get("themis")(lp, bt_weight=0.0)[0])
  full = float(losses.get("themis")(lp, bt_weight=0.5)[0])
  np.testing.assert_allclose(full - nll, 0.5 * R.bt(r, w), rtol=1e-4)


def test_needs_token_logps():
  r, _, _, w = inputs(3)
  lp = RewardOutputs(reward=jnp.asarray(r), length=jnp.ones(r.shape),
                     valid=jnp.ones(r.shape, bool), weight=jnp.asarray(w))
  with pytest.raises(ValueError, match="per-token LM log-probs"):
    losses.get("themis")(lp)
  assert losses.needs_tokens("themis")


@pytest.mark.slow
def test_reward_step_fills_the_decoders_token_logps():
  from jaxpref.train.roles import reward
  tok = data_lib.Tokenizer.load(os.path.join(ROOT, "jaxpref", "data", "tiny", "tokenizer.model"))
  records, _ = data_lib.read_pairs(os.path.join(ROOT, "jaxpref", "data", "tiny", "train.jsonl"))
  batch = data_lib.PairDataset(records[:2], tok, 24).batch(np.arange(2))
  model = RewardModel(models.get_config("tiny"), 1, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  lp = reward.model_logps(graphdef, params, batch, with_tokens=True)
  # The same log-probs as the decoder's own LM head, on the response tokens only.
  logits = np.asarray(model.decoder(jnp.asarray(batch.tokens[0, 0])[None],
                                    jnp.asarray(batch.segment_ids[0, 0])[None]))[0]
  t = int(np.flatnonzero(batch.loss_mask[0, 0])[0])
  want = jax.nn.log_softmax(logits[t - 1])[batch.tokens[0, 0, t]]
  np.testing.assert_allclose(float(lp.policy_tok[0, 0, t]), float(want), rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(lp.policy_tok)[batch.loss_mask == 0] == 0)
  np.testing.assert_allclose(np.asarray(lp.reward),
                             np.asarray(reward.score(graphdef, params, batch))[..., 0], rtol=1e-5)
