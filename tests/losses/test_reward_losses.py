"""Reward-model losses (`jaxpref/losses/reward.py`) against float64 numpy references
(tests/reward_refs.py), finite-difference gradients, and the papers' properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import reward_refs as R
from jaxpref import losses
from jaxpref.losses.reward import finish_metrics, gpm_score
from jaxpref.types import RewardOutputs

SCALAR = [("bt", {}), ("bt", {"margin": 0.5, "tau": 0.5}), ("bt", {"label_smoothing": 0.1}),
          ("bt", {"center_rewards": 0.01})]
SCORED = [("bt_adaptive_margin", {}), ("bt_adaptive_margin", {"margin_scale": 0.5, "margin_clip": 1.0}),
          ("bt_flip", {}), ("bt_flip", {"flip_below": 0.5, "tau": 2.0}),
          ("bt_soft", {}), ("bt_soft", {"tau": 0.5, "score_temperature": 2.0})]
EMBED = [("gpm", {}), ("gpm", {"tau": 1.0, "margin": 0.2}), ("gpm", {"normalize": True})]


def make_lp(r=None, w=None, scores=None, embed=None, eps=None, dtype=jnp.float32, gate=None):
  w = jnp.asarray(w, dtype)
  b = w.shape[0]
  zeros = jnp.zeros((b, 2), dtype)
  return RewardOutputs(reward=zeros if r is None else jnp.asarray(r, dtype),
                       length=jnp.ones((b, 2), dtype), valid=jnp.ones((b, 2), bool), weight=w,
                       scores=None if scores is None else jnp.asarray(scores, dtype),
                       label_smoothing=None if eps is None else jnp.asarray(eps, dtype),
                       embed=None if embed is None else jnp.asarray(embed, dtype),
                       gate=None if gate is None else jnp.asarray(gate, dtype))


def inputs(seed, b=16, spread=3.0, e=4):
  rng = np.random.default_rng(seed)
  r = rng.normal(0, spread, (b, 2))
  w = rng.uniform(0.5, 2.0, b)
  w[:2] = 0.0  # padded groups
  s = rng.normal(0, 1.5, (b, 2))
  v = rng.normal(0, 1.0, (b, 2, e))
  return r, w, s, v


@pytest.mark.parametrize("name,hp", SCALAR + SCORED + EMBED, ids=str)
@pytest.mark.parametrize("spread", [2.0, 150.0])
def test_matches_numpy(name, hp, spread):
  r, w, s, v = inputs(1, spread=spread)
  fn = jax.jit(losses.bind(name, hp))
  if name == "gpm":
    v = v * spread / 2.0
    loss, metrics = fn(make_lp(w=w, embed=v))
    want = R.gpm(v, w, **hp)
  elif name == "bt":
    loss, metrics = fn(make_lp(r, w))
    want = R.bt(r, w, **hp)
  else:
    loss, metrics = fn(make_lp(r, w, scores=s))
    want = getattr(R, name)(r, w, s, **hp)
  assert np.isfinite(want)
  np.testing.assert_allclose(float(loss), want, rtol=2e-4, atol=2e-4)
  for key in ("rewards/accuracy", "rewards/margin", "calib/gap_0"):
    assert np.isfinite(float(metrics[key])), key


def test_bt_per_pair_label_smoothing_from_the_records():
  r, w, _, _ = inputs(2)
  eps = np.random.default_rng(2).uniform(0, 0.5, len(w))
  got = losses.get("bt")(make_lp(r, w, eps=eps), label_smoothing=0.3)[0]
  np.testing.assert_allclose(float(got), R.bt(r, w, eps=eps), rtol=1e-5)


@pytest.mark.parametrize("name,hp", SCALAR + SCORED + EMBED, ids=str)
def test_gradients_match_finite_differences(name, hp):
  r, w, s, v = inputs(3, b=6, spread=1.0)
  with jax.enable_x64(True):
    fn = losses.bind(name, hp)
    if name == "gpm":
      f = lambda x: fn(make_lp(w=w, embed=x, dtype=jnp.float64))[0]
      x = jnp.asarray(v, jnp.float64)
    else:
      f = lambda x: fn(make_lp(x, w, scores=s, dtype=jnp.float64))[0]
      x = jnp.asarray(r, jnp.float64)
    check_grads(f, (x,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    assert np.all(np.asarray(jax.grad(f)(x))[:2] == 0.0)  # padded pairs get no gradient


def test_bt_properties():
  bt = losses.get("bt")
  one = lambda rw, rl, **hp: float(bt(make_lp([[rw, rl]], [1.0]), **hp)[0])
  np.testing.assert_allclose(one(0.7, 0.7), np.log(2), rtol=1e-6)  # a tie costs log 2
  assert one(9.0, -9.0) < 1e-7 and one(-9.0, 9.0) > 17.9  # the two limits
  np.testing.assert_allclose(one(1.5, 0.0, margin=0.5), one(1.0, 0.0), rtol=1e-6)
  np.testing.assert_allclose(one(1.5, 0.0, tau=0.5), one(3.0, 0.0), rtol=1e-6)
  g = jax.grad(lambda r: bt(make_lp(r, [1.0]))[0])(jnp.array([[0.3, 0.1]]))
  assert g[0, 0] < 0 < g[0, 1]  # raise the chosen reward, lower the rejected one
  # Label smoothing eps: minimised at dr = logit(1 - eps), not at infinity.
  ds = jnp.linspace(-10, 10, 4001)
  vals = jax.vmap(lambda d: bt(make_lp(jnp.stack([d, 0.0])[None], [1.0]), label_smoothing=0.1)[0])(ds)
  np.testing.assert_allclose(ds[jnp.argmin(vals)], np.log(0.9 / 0.1), atol=0.01)
  # The centring term moves r_w + r_l to 0 and leaves dr alone.
  gc = jax.grad(lambda r: bt(make_lp(r, [1.0]), center_rewards=1.0)[0])(jnp.array([[3.0, 1.0]]))
  gp = jax.grad(lambda r: bt(make_lp(r, [1.0]))[0])(jnp.array([[3.0, 1.0]]))
  np.testing.assert_allclose(gc - gp, [[8.0, 8.0]], rtol=1e-6)


def test_strength_losses_reduce_to_bt():
  r, w, s, _ = inputs(4)
  bt = float(losses.get("bt")(make_lp(r, w))[0])
  zero = np.zeros_like(s)
  assert float(losses.get("bt_adaptive_margin")(make_lp(r, w, scores=zero))[0]) == pytest.approx(bt, rel=1e-6)
  agree = np.stack([np.ones(len(w)), np.zeros(len(w))], 1)  # mu = 1 > 0: nothing flipped
  loss, m = losses.get("bt_flip")(make_lp(r, w, scores=agree))
  assert float(loss) == pytest.approx(bt, rel=1e-6) and float(m["rewards/flipped"]) == 0.0
  loss, m = losses.get("bt_flip")(make_lp(r, w, scores=-agree))  # all flipped
  assert float(loss) == pytest.approx(float(losses.get("bt")(make_lp(r[:, ::-1], w))[0]), rel=1e-6)
  assert float(m["rewards/flipped"]) == 1.0
  sure = agree * 60.0  # p = sig(60) = 1: soft labels become hard
  assert float(losses.get("bt_soft")(make_lp(r, w, scores=sure))[0]) == pytest.approx(bt, rel=1e-5)


def test_bt_soft_is_minimised_at_the_judge_log_odds():
  ds = jnp.linspace(-10, 10, 4001)
  lp = lambda d: make_lp(jnp.stack([d, 0.0])[None], [1.0], scores=[[1.2, 0.0]])
  vals = jax.vmap(lambda d: losses.get("bt_soft")(lp(d), tau=0.5, score_temperature=2.0)[0])(ds)
  np.testing.assert_allclose(ds[jnp.argmin(vals)], 0.5 * 1.2 / 2.0, atol=0.01)


def test_adaptive_margin_sign_follows_strength():
  g = lambda mu: jax.grad(lambda r: losses.get("bt_adaptive_margin")(
      make_lp(r, [1.0], scores=[[mu, 0.0]]))[0])(jnp.zeros((1, 2)))[0, 0]
  assert g(3.0) < g(0.0) < g(-3.0) < 0  # stronger pairs push harder at a tie


def test_gpm_score_is_skew_symmetric_and_contains_bt():
  _, w, _, v = inputs(5, e=6)
  s_ab = np.asarray(gpm_score(jnp.asarray(v[:, 0]), jnp.asarray(v[:, 1])))
  np.testing.assert_allclose(s_ab, R.gpm_score(v[:, 0], v[:, 1]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gpm_score(v[:, 1], v[:, 0]), -s_ab, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gpm_score(v[:, 0], v[:, 0]), 0.0, atol=1e-6)
  # k = 1 with v = (r, 1): s = r_w - r_l, so GPM at tau = 1 is BT (docs/reward_models.md#gpm).
  r = np.random.default_rng(5).normal(0, 2, (len(w), 2))
  emb = np.stack([r, np.ones_like(r)], -1)
  np.testing.assert_allclose(losses.get("gpm")(make_lp(w=w, embed=emb), tau=1.0)[0],
                             losses.get("bt")(make_lp(r, w))[0], rtol=1e-6)


def test_gpm_fits_a_rock_paper_scissors_cycle():
  # docs/reward_models.md#gpm: angles 0, -120, -240 degrees; each winner scores sin 120 over its loser.
  ang = np.deg2rad([0.0, -120.0, -240.0])  # rock, paper, scissors
  v = np.stack([np.cos(ang), np.sin(ang)], -1)
  wins = [(1, 0), (2, 1), (0, 2)]  # paper > rock, scissors > paper, rock > scissors
  emb = np.stack([np.stack([v[a], v[b]]) for a, b in wins])
  loss, m = losses.get("gpm")(make_lp(w=np.ones(3), embed=emb))
  np.testing.assert_allclose(gpm_score(emb[:, 0], emb[:, 1]), np.sin(np.deg2rad(120)), rtol=1e-6)
  assert float(m["rewards/accuracy"]) == 1.0
  np.testing.assert_allclose(float(loss), -R.logsig(np.sin(np.deg2rad(120)) / 0.1), rtol=1e-5)


def test_ece_and_std_are_exact_over_batches():
  r, w, _, _ = inputs(6, b=40, spread=2.0)
  fn = jax.jit(losses.bind("bt", {"tau": 2.0}))
  halves = [slice(0, 24), slice(24, 40)]
  totals, weight = {}, 0.0
  for sl in halves:  # what the loop's `evaluate` does: weight each batch's means by its weight
    _, m = fn(make_lp(r[sl], w[sl]))
    for k, val in m.items():
      totals[k] = totals.get(k, 0.0) + float(val) * w[sl].sum()
    weight += w[sl].sum()
  out = finish_metrics({k: val / weight for k, val in totals.items()})
  want_ece = R.ece(R.sig((r[:, 0] - r[:, 1]) / 2.0), w)
  np.testing.assert_allclose(out["rewards/ece"], want_ece, rtol=1e-4, atol=1e-6)
  ww = np.repeat(w, 2)
  mean = np.sum(r.reshape(-1) * ww) / ww.sum()
  std = np.sqrt(np.sum(ww * (r.reshape(-1) - mean) ** 2) / ww.sum())
  np.testing.assert_allclose(out["rewards/std"], std, rtol=1e-4)
  assert not any(k.startswith("calib/") for k in out) and "rewards/sq_mean" not in out


def test_ece_limits():
  w = np.ones(4)
  perfect = finish_metrics(losses.get("bt")(make_lp([[40.0, 0.0]] * 4, w))[1])
  assert perfect["rewards/ece"] < 1e-6  # sure and right
  wrong = finish_metrics(losses.get("bt")(make_lp([[0.0, 40.0]] * 4, w))[1])
  np.testing.assert_allclose(wrong["rewards/ece"], 1.0, atol=1e-6)  # sure and wrong
  tie = finish_metrics(losses.get("bt")(make_lp([[1.0, 1.0]] * 4, w))[1])
  assert tie["rewards/ece"] == 0.0 and tie["rewards/accuracy"] == 0.5


def test_errors_name_the_fix():
  r, w, s, v = inputs(7)
  with pytest.raises(ValueError, match="--reward_dim=2k"):
    losses.get("gpm")(make_lp(r, w))
  with pytest.raises(ValueError, match="--reward_dim=1"):
    losses.get("bt")(make_lp(r, w, embed=v))



def test_strength_losses_without_scores_are_bt():
  r, w, _, _ = inputs(8)
  bt = float(losses.get("bt")(make_lp(r, w))[0])
  for name in ("bt_flip", "bt_adaptive_margin", "bt_soft"):
    assert float(losses.get(name)(make_lp(r, w))[0]) == pytest.approx(bt, rel=1e-6), name
  assert float(losses.get("bt_flip")(make_lp(r, w), flip_below=5.0)[0]) == pytest.approx(bt, rel=1e-6)


# ---- GPM with prompt-gated eigenvalues (--reward_head=gpm_gated, docs/reward_models.md#gpm) ----

def gates(seed, b, k, scale=1.5):
  """k softmax(z): what the gated head emits, non-negative and summing to k."""
  z = np.random.default_rng(seed).normal(0, scale, (b, k))
  return k * np.exp(z) / np.exp(z).sum(-1, keepdims=True)


@pytest.mark.parametrize("name,hp", EMBED, ids=str)
@pytest.mark.parametrize("e", [2, 6])
def test_gated_gpm_matches_numpy(name, hp, e):
  _, w, _, v = inputs(11, e=e)
  lam = gates(11, len(w), e // 2)
  loss, metrics = jax.jit(losses.bind(name, hp))(make_lp(w=w, embed=v, gate=lam))
  np.testing.assert_allclose(float(loss), R.gpm(v, w, gate=lam, **hp), rtol=2e-5, atol=2e-5)
  want_max = R.wmean(lam.max(-1), w)
  np.testing.assert_allclose(float(metrics["gpm/gate_max"]), want_max, rtol=1e-5)
  if not hp.get("normalize"):  # the margin is the gated score of the raw embeddings
    s = R.gpm_score(v[:, 0], v[:, 1], lam)
    np.testing.assert_allclose(float(metrics["rewards/margin"]), R.wmean(s, w), rtol=1e-4,
                               atol=1e-5)


def test_gated_score_is_skew_symmetric_for_every_gate():
  _, w, _, v = inputs(12, e=8)
  rng = np.random.default_rng(12)
  for lam in (gates(12, len(w), 4), rng.uniform(0, 3, (len(w), 4)), np.zeros((len(w), 4))):
    a, b, g = jnp.asarray(v[:, 0]), jnp.asarray(v[:, 1]), jnp.asarray(lam)
    s_ab = np.asarray(gpm_score(a, b, g))
    np.testing.assert_allclose(s_ab, R.gpm_score(v[:, 0], v[:, 1], lam), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gpm_score(b, a, g)), -s_ab, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gpm_score(a, a, g)), 0.0, atol=1e-6)
  # A gate that switches a block off leaves the score to the other blocks.
  one_block = np.tile([[2.0, 0.0, 0.0, 0.0]], (len(w), 1))
  np.testing.assert_allclose(np.asarray(gpm_score(a, b, jnp.asarray(one_block))),
                             2.0 * R.gpm_score(v[:, 0, :2], v[:, 1, :2]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hp", [{}, {"normalize": True, "margin": 0.1}], ids=str)
def test_gates_all_one_are_plain_gpm_exactly(hp):
  _, w, _, v = inputs(13, e=6)
  fn = losses.bind("gpm", hp)
  gated_loss, gated = fn(make_lp(w=w, embed=v, gate=np.ones((len(w), 3))))
  plain_loss, plain = fn(make_lp(w=w, embed=v))
  assert float(gated_loss) == float(plain_loss)
  assert float(gated.pop("gpm/gate_max")) == 1.0
  assert gated.keys() == plain.keys()
  for k in plain:
    assert float(gated[k]) == float(plain[k]), k


def test_gated_gpm_gradients_match_finite_differences():
  _, w, _, v = inputs(14, b=6, e=4)
  lam = gates(14, 6, 2)
  with jax.enable_x64(True):
    fn = losses.bind("gpm", {"tau": 0.5})
    f = lambda x, g: fn(make_lp(w=w, embed=x, gate=g, dtype=jnp.float64))[0]
    x, g = jnp.asarray(v, jnp.float64), jnp.asarray(lam, jnp.float64)
    check_grads(f, (x, g), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    gx, gg = jax.grad(f, argnums=(0, 1))(x, g)
    assert np.all(np.asarray(gx)[:2] == 0.0) and np.all(np.asarray(gg)[:2] == 0.0)  # padded
    assert np.abs(np.asarray(gg)[2:]).min() > 0  # every block's gate is trained


def test_gated_gpm_rejects_a_gate_of_the_wrong_width():
  _, w, _, v = inputs(15, e=4)
  with pytest.raises(ValueError, match=r"one eigenvalue per rotation block \[B, k\]"):
    losses.get("gpm")(make_lp(w=w, embed=v, gate=np.ones((len(w), 4))))


@pytest.mark.slow
def test_gated_head_reads_the_prompt_and_trains(tmp_path):
  import dataclasses

  from flax import nnx

  from loop_util import train_steps
  from jaxpref import data as data_lib
  from jaxpref import models
  from jaxpref.data import make_tiny
  from jaxpref.models.heads import RewardModel, prompt_state
  from jaxpref.parallel import mesh as mesh_lib
  from jaxpref.train import loop
  from jaxpref.train.roles import reward
  from jaxpref.train.config import DataConfig, RunConfig

  tok = data_lib.Tokenizer.load(f"{make_tiny.OUT}/tokenizer.model")
  recs = [data_lib.PairRecord("which do you prefer?", "i pick apple.", "i pick red."),
          data_lib.PairRecord("name a colour.", "red.", "a cat.")]
  batch = data_lib.PairDataset(recs, tok, 24).batch(np.arange(2))
  graphdef, params = nnx.split(RewardModel(models.get_config("tiny"), 6, head="gpm_gated",
                                           rngs=nnx.Rngs(0)))
  lp = reward.model_logps(graphdef, params, batch)
  assert lp.embed.shape == (2, 2, 6) and lp.gate.shape == (2, 3)
  # lambda(x) = k softmax(W_p h_x / sqrt(D)), h_x the prompt's last token (float64 reference).
  model = nnx.merge(graphdef, params)
  h = model.decoder.hidden(batch.tokens[:, 0], segment_ids=batch.segment_ids[:, 0])
  h_x = np.asarray(prompt_state(h, batch.loss_mask[:, 0]), np.float64)
  want = R.gpm_gate(h_x, np.asarray(params["gate_proj"][...], np.float64))
  np.testing.assert_allclose(np.asarray(lp.gate), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lp.gate).sum(-1), 3.0, rtol=1e-6)
  # Causal attention: another response leaves the gate alone, not the embeddings.
  other = dataclasses.replace(batch, tokens=batch.tokens.copy())
  idx = int(np.argmax(batch.loss_mask[0, 0] > 0))
  other.tokens[:, :, idx + 1] = batch.tokens[1, 0, idx]
  lp2 = reward.model_logps(graphdef, params, other)
  np.testing.assert_allclose(np.asarray(lp2.gate), np.asarray(lp.gate), rtol=1e-6)
  assert not np.allclose(np.asarray(lp2.embed), np.asarray(lp.embed))

  # A short tiny-model run through the loop's own steps: the loss falls, the gates move.
  cfg = RunConfig(workdir=str(tmp_path), model=models.get_config("tiny"), steps=30,
                  mesh="data:8", progress=False, plot=False, role="reward", reward_dim=4,
                  reward_head="gpm_gated", loss="gpm", loss_hparams={"tau": 0.1},
                  data=DataConfig(train_data=f"{make_tiny.OUT}/train.jsonl", eval_data="",
                                  tokenizer=f"{make_tiny.OUT}/tokenizer.model"))
  mesh = mesh_lib.make_mesh("data:8")
  ds = loop.setup(cfg).train_ds
  run = train_steps(cfg, mesh, ds, 30)
  assert np.all(np.isfinite(run.losses))
  assert np.mean(run.losses[-5:]) < np.mean(run.losses[:5]) - 0.05, run.losses
  assert all("gpm/gate_max" in m for m in run.metrics)
  init = reward.init_params(cfg, mesh)[1]
  assert not np.allclose(np.asarray(run.state.params["gate_proj"][...]),
                         np.asarray(init["gate_proj"][...]))
  with pytest.raises(ValueError, match="only --loss=gpm reads"):
    reward.check(dataclasses.replace(cfg, loss="bt"))
