"""PAL (docs/reward_models.md#pal, `jaxpref/losses/pal.py`) against a float64 numpy reference written
from the formula, finite-difference gradients, its reduction to BT, the PAL head and the
records' `user` field."""

import dataclasses
import json
import math
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
from jaxpref.data import synthetic
from jaxpref.models.heads import RewardModel, prompt_end_index
from jaxpref.types import RewardOutputs


# ---- float64 reference (from docs/reward_models.md#pal, no jaxpref code) ----

def ref_pal(f, g, w_mix, w, user=None, scorer="dist", tau=1.0, logit_scale=math.log(1 / 0.07),
            proto_bound=4.0, proto_penalty=1.0, per_user_weighting=False):
  """f [B, 2, E] item points, g [B, K, E] prototypes, w_mix [B, K] mixtures, w [B] weights."""
  out, pen = [], []
  for b in range(len(w)):
    a = sum(w_mix[b, k] * g[b, k] for k in range(g.shape[1]))
    if scorer == "dist":
      r = [-math.sqrt(np.sum((f[b, i] - a) ** 2) + 1e-12) for i in (0, 1)]
    else:
      na = math.sqrt(np.sum(a * a) + 1e-12)
      r = [min(math.exp(logit_scale), 100.0) * np.dot(f[b, i], a)
           / (math.sqrt(np.sum(f[b, i] ** 2) + 1e-12) * na) for i in (0, 1)]
    out.append(-R.logsig(np.array((r[0] - r[1]) / tau)))
    pen.append(sum(max(0.0, math.sqrt(np.sum(g[b, k] ** 2) + 1e-12) - proto_bound)
                   for k in range(g.shape[1])))
  out, pen = np.array(out), np.array(pen)
  pair_w = w
  if per_user_weighting:
    n_u = np.array([sum(w[j] for j in range(len(w)) if user[j] == user[b]) for b in range(len(w))])
    pair_w = w / np.maximum(n_u, 1e-8)
  return R.wmean(out, pair_w) + proto_penalty * R.wmean(pen, w)


def inputs(seed, b=12, k=3, e=4, scale=1.0):
  rng = np.random.default_rng(seed)
  f = rng.normal(0, scale, (b, 2, e))
  g = rng.normal(0, 2.5 * scale, (b, k, e))  # some norms above B = 4: the penalty is active
  logits = rng.normal(0, 1, (b, k))
  mix = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  w = rng.uniform(0.5, 2.0, b)
  w[:2] = 0.0  # padded groups
  user = rng.integers(0, 3, b)
  return f, g, logits, mix, w, user


def make_lp(f, g, mix, w, user=None, dtype=jnp.float32):
  b = len(w)
  zeros = jnp.zeros((b, 2), dtype)
  return RewardOutputs(reward=zeros, length=jnp.ones((b, 2), dtype),
                       valid=jnp.ones((b, 2), bool), weight=jnp.asarray(w, dtype),
                       embed=jnp.asarray(f, dtype), prototypes=jnp.asarray(g, dtype),
                       mixture=jnp.asarray(mix, dtype),
                       user=None if user is None else jnp.asarray(user, jnp.int32))


CASES = [{}, {"tau": 0.5, "proto_bound": 1.0}, {"scorer": "angle"},
         {"scorer": "angle", "logit_scale": 6.0}, {"per_user_weighting": True},
         {"proto_penalty": 0.0}]


@pytest.mark.parametrize("hp", CASES, ids=str)
def test_matches_numpy(hp):
  f, g, _, mix, w, user = inputs(0)
  loss, metrics = jax.jit(losses.bind("pal", hp))(make_lp(f, g, mix, w, user))
  want = ref_pal(f, g, mix, w, user, **hp)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=2e-5)
  assert float(metrics["loss/proto_penalty"]) > 0  # some prototypes are past the bound
  assert 0.0 <= float(metrics["rewards/accuracy"]) <= 1.0


@pytest.mark.parametrize("hp", [{}, {"scorer": "angle", "logit_scale": 1.0},
                                {"per_user_weighting": True}], ids=str)
def test_gradients_match_finite_differences(hp):
  f, g, logits, _, w, user = inputs(1, b=5, k=2, e=3)
  with jax.enable_x64(True):
    fn = losses.bind("pal", {**hp, "proto_bound": 2.0})

    def loss(f, g, logits):  # the mixture as the head makes it: a softmax of the user's row
      return fn(make_lp(f, g, jax.nn.softmax(logits, -1), w, user, jnp.float64))[0]

    check_grads(loss, [jnp.asarray(x, jnp.float64) for x in (f, g, logits)], order=1,
                modes=["rev"], atol=1e-5, rtol=1e-5)


def test_one_user_one_prototype_is_bt_on_negative_distance():
  # With K' = 1 the mixture is 1 and a_u(x) = g(x): pal is bt (same tau) on the rewards
  # r(y) = -||f(y) - g(x)||, plus the penalty (off here).
  f, g, _, _, w, _ = inputs(2, k=1)
  mix = np.ones((len(w), 1))
  r = -np.sqrt(((f - g[:, :1]) ** 2).sum(-1) + 1e-12)
  zeros = jnp.zeros_like(jnp.asarray(r, jnp.float32))
  bt_lp = RewardOutputs(reward=jnp.asarray(r, jnp.float32), length=zeros + 1,
                        valid=jnp.ones(r.shape, bool), weight=jnp.asarray(w, jnp.float32))
  for tau in (1.0, 0.3):
    got = losses.get("pal")(make_lp(f, g, mix, w), tau=tau, proto_penalty=0.0)[0]
    want = losses.get("bt")(bt_lp, tau=tau)[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(got), R.bt(r, w, tau=tau), rtol=1e-5)


def test_closer_to_the_users_ideal_point_wins():
  # Two users with opposite prototypes: the same pair is right for one and wrong for the other.
  g = np.array([[[2.0, 0.0], [-2.0, 0.0]]] * 2)
  f = np.array([[[1.5, 0.0], [-1.5, 0.0]]] * 2)
  mix = np.array([[1.0, 0.0], [0.0, 1.0]])
  _, m = losses.get("pal")(make_lp(f, g, mix, np.array([1.0, 0.0])))
  assert float(m["rewards/accuracy"]) == 1.0
  _, m = losses.get("pal")(make_lp(f, g, mix, np.array([0.0, 1.0])))
  assert float(m["rewards/accuracy"]) == 0.0


def test_needs_a_pal_head():
  zeros = jnp.zeros((2, 2))
  lp = RewardOutputs(reward=zeros, length=zeros, valid=zeros > 0, weight=jnp.ones(2))
  with pytest.raises(ValueError, match="--reward_head=pal"):
    losses.get("pal")(lp)


# ---- the PAL head ----

TOKENIZER = os.path.join(ROOT, "jaxpref", "data", "tiny", "tokenizer.model")


def tiny_batch(user):
  tok = data_lib.Tokenizer.load(TOKENIZER)
  recs = [data_lib.PairRecord("which do you prefer?", "i pick apple.", "i pick red.", user=u)
          for u in user]
  return data_lib.PairDataset(recs, tok, 24).batch(np.arange(len(recs)))


@pytest.mark.slow
def test_head_outputs_and_prompt_only_prototypes():
  from jaxpref.train.roles import reward
  model = RewardModel(models.get_config("tiny"), 4, head="pal", prototypes=3, users=2,
                      rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  batch = tiny_batch([0, 1])
  lp = reward.model_logps(graphdef, params, batch)
  assert lp.embed.shape == (2, 2, 4) and lp.prototypes.shape == (2, 3, 4)
  want = jax.nn.softmax(params["user_logits"][...], -1)
  np.testing.assert_allclose(np.asarray(lp.mixture), np.asarray(want), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(lp.user), [0, 1])
  # The prototypes read the prompt's last token: a different response leaves them as they are.
  other = dataclasses.replace(batch, tokens=batch.tokens.copy())
  idx = int(np.argmax(batch.loss_mask[0, 0] > 0))
  assert int(prompt_end_index(jnp.asarray(batch.loss_mask[:, 0]))[0]) == idx - 1
  other.tokens[:, :, idx + 2] = batch.tokens[0, 0, idx + 3]
  lp2 = reward.model_logps(graphdef, params, other)
  np.testing.assert_allclose(np.asarray(lp2.prototypes), np.asarray(lp.prototypes), rtol=1e-6)
  assert not np.allclose(np.asarray(lp2.embed), np.asarray(lp.embed))


# ---- the `user` record field ----

def write(tmp_path, rows):
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


BASE = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_user_is_an_error_naming_line_and_field(tmp_path, bad):
  path = write(tmp_path, [dict(BASE, user=0), dict(BASE, user=bad)])
  with pytest.raises(data_lib.DataError, match=r"d.jsonl:2: field 'user'"):
    data_lib.read_pairs(path)


def test_user_in_every_record_or_none_and_remappable(tmp_path):
  with pytest.raises(data_lib.DataError, match=r"d.jsonl:2: field 'user' is missing"):
    data_lib.read_pairs(write(tmp_path, [dict(BASE, user=0), BASE]))
  records, _ = data_lib.read_pairs(write(tmp_path, [dict(BASE, annotator=2), dict(BASE, annotator=0)]),
                                   fields="user:annotator")
  assert [r.user for r in records] == [2, 0]


def test_check_rejects_users_past_pal_users(tmp_path):
  from jaxpref.train.roles import reward
  from jaxpref.train.config import RunConfig
  ds = tiny_batch_ds([0, 3])
  cfg = RunConfig(workdir=str(tmp_path), model=models.get_config("tiny"), role="reward",
                  loss="pal", reward_head="pal", reward_dim=4, pal_users=3)
  with pytest.raises(ValueError, match="'user' = 3, but --pal_users=3"):
    reward.check(cfg, ds)
  reward.check(cfg, tiny_batch_ds([0, 2]))


def tiny_batch_ds(user):
  tok = data_lib.Tokenizer.load(TOKENIZER)
  recs = [data_lib.PairRecord("p", "a", "b", user=u) for u in user]
  return data_lib.PairDataset(recs, tok, 16)


def test_synthetic_groups_records_carry_the_group_as_user(tmp_path):
  assert synthetic.main(["groups", "--hide_group", f"--out_dir={tmp_path}", "--n_train=60",
                         "--n_eval=0"]) == 0
  records, _ = data_lib.read_pairs(str(tmp_path / "train.jsonl"))
  rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
  assert [r.user for r in records] == ["abc".index(row["group"]) for row in rows]
  assert set(r.user for r in records) == {0, 1, 2}
