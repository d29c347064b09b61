"""attribute_bt (docs/reward_models.md#attribute_bt, `jaxpref/losses/attributes.py`) against a float64 numpy
reference written from the formula, gradients, its reduction to `bt`, the don't-care mask,
the `attribute_prefs` record field and the shipped tiny attribute data."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import reward_refs as R
from cli_util import ROOT
from jaxpref import data as data_lib
from jaxpref import losses
from jaxpref.types import RewardOutputs

TINY = os.path.join(ROOT, "jaxpref", "data", "tiny")


def ref_attribute_bt(s, t, w, tau=1.0):
  """s [B, 2, A] scores, t [B, A] prefs in {1, -1, 0}, w [B]."""
  num = den = 0.0
  for b in range(len(w)):
    for a in range(s.shape[2]):
      if t[b, a] == 0:
        continue
      num += w[b] * -R.logsig(np.array(t[b, a] * (s[b, 0, a] - s[b, 1, a]) / tau))
      den += w[b]
  return num / den


def inputs(seed, b=10, a=3):
  rng = np.random.default_rng(seed)
  s = rng.normal(0, 2.0, (b, 2, a))
  t = rng.choice([1, -1, 0], (b, a)).astype(float)
  w = rng.uniform(0.5, 2.0, b)
  w[0] = 0.0  # a padded group
  return s, t, w


def make_lp(s, t, w, dtype=jnp.float32, reward=None):
  b = len(w)
  zeros = jnp.zeros((b, 2), dtype)
  return RewardOutputs(reward=zeros if reward is None else jnp.asarray(reward, dtype),
                       length=zeros + 1, valid=jnp.ones((b, 2), bool),
                       weight=jnp.asarray(w, dtype),
                       embed=None if s is None else jnp.asarray(s, dtype),
                       attribute_prefs=None if t is None else jnp.asarray(t, dtype))


@pytest.mark.parametrize("tau", [1.0, 0.25])
def test_matches_numpy(tau):
  s, t, w = inputs(0)
  loss, metrics = jax.jit(losses.bind("attribute_bt", {"tau": tau}))(make_lp(s, t, w))
  np.testing.assert_allclose(float(loss), ref_attribute_bt(s, t, w, tau), rtol=1e-5)
  # Accuracy over the cared-for entries, per attribute too.
  agree = (t * (s[:, 0] - s[:, 1]) > 0) & (t != 0)
  for a in range(3):
    m = (t[:, a] != 0) * w
    np.testing.assert_allclose(float(metrics[f"rewards/accuracy_attr{a}"]),
                               np.sum(agree[:, a] * m) / np.sum(m), rtol=1e-5)


def test_gradients_match_finite_differences():
  s, t, w = inputs(1, b=5)
  with jax.enable_x64(True):
    fn = losses.bind("attribute_bt", {"tau": 0.5})
    check_grads(lambda x: fn(make_lp(x, t, w, jnp.float64))[0], [jnp.asarray(s, jnp.float64)],
                order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_one_attribute_all_ones_is_bt():
  rng = np.random.default_rng(2)
  r = rng.normal(0, 3.0, (8, 2))
  w = rng.uniform(0.5, 2.0, 8)
  for tau in (1.0, 0.5):
    want = float(losses.get("bt")(make_lp(None, None, w, reward=r), tau=tau)[0])
    got_head = float(losses.get("attribute_bt")(make_lp(r[..., None], np.ones((8, 1)), w), tau=tau)[0])
    got_scalar = float(losses.get("attribute_bt")(make_lp(None, None, w, reward=r), tau=tau)[0])
    np.testing.assert_allclose([got_head, got_scalar], [want, want], rtol=1e-6)
    np.testing.assert_allclose(want, R.bt(r, w, tau=tau), rtol=1e-5)


def test_dont_care_attributes_have_no_gradient_and_minus_one_flips():
  s, t, w = inputs(3)
  t[:, 1] = 0
  g = jax.grad(lambda x: losses.get("attribute_bt")(make_lp(x, t, w))[0])(jnp.asarray(s, jnp.float32))
  assert np.all(np.asarray(g)[:, :, 1] == 0)
  assert np.any(np.asarray(g)[1:, :, 0] != 0)
  # -1 on every entry is the same loss as +1 with chosen and rejected swapped.
  ones = np.ones_like(t)
  a = losses.get("attribute_bt")(make_lp(s, -ones, w))[0]
  b = losses.get("attribute_bt")(make_lp(s[:, ::-1], ones, w))[0]
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_prefs_width_must_match_the_head():
  s, t, w = inputs(4)
  with pytest.raises(ValueError, match="attribute_prefs have 2 entries but the head scores 3"):
    losses.get("attribute_bt")(make_lp(s, t[:, :2], w))


# ---- the record field ----

def write(tmp_path, rows):
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


BASE = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("bad", [[], [1, 2], [True], "1,0", [0.5]])
def test_bad_prefs_are_an_error_naming_line_and_field(tmp_path, bad):
  with pytest.raises(data_lib.DataError, match=r"d.jsonl:2: field 'attribute_prefs'"):
    data_lib.read_pairs(write(tmp_path, [dict(BASE, attribute_prefs=[1]),
                                         dict(BASE, attribute_prefs=bad)]))


def test_prefs_in_every_record_with_one_length(tmp_path):
  with pytest.raises(data_lib.DataError, match=r"d.jsonl:2: field 'attribute_prefs' is missing"):
    data_lib.read_pairs(write(tmp_path, [dict(BASE, attribute_prefs=[1]), BASE]))
  with pytest.raises(data_lib.DataError, match=r"d.jsonl:2: field 'attribute_prefs' has 1 entries"):
    data_lib.read_pairs(write(tmp_path, [dict(BASE, attribute_prefs=[1, 0]),
                                         dict(BASE, attribute_prefs=[1])]))
  records, _ = data_lib.read_pairs(write(tmp_path, [dict(BASE, prefs=[1, -1, 0])]),
                                   fields="attribute_prefs:prefs")
  tok = data_lib.Tokenizer.load(os.path.join(TINY, "tokenizer.model"))
  batch = data_lib.PairDataset(records, tok, 16).batch(np.arange(1))
  np.testing.assert_array_equal(batch.attribute_prefs, [[1, -1, 0]])


def attribute_record(rec: dict) -> dict:
  """The rule behind jaxpref/data/tiny/attribute_pairs.jsonl (the first 500 records of
  train.jsonl; docs/reward_models.md):
  attribute 0 = the record's label, attribute 1 = the shorter response (0 on a tie)."""
  shorter = int(np.sign(len(rec["rejected"]) - len(rec["chosen"])))
  return dict(rec, attribute_prefs=[1, shorter])


def test_shipped_tiny_attribute_data_follows_its_rule():
  src = [json.loads(line) for line in open(os.path.join(TINY, "train.jsonl")) if line.strip()][:500]
  got = [json.loads(line) for line in open(os.path.join(TINY, "attribute_pairs.jsonl"))]
  assert got == [attribute_record(r) for r in src]
  prefs = np.array([r["attribute_prefs"] for r in got])
  assert set(prefs[:, 1]) == {-1, 0, 1}  # both directions and don't-care entries occur
