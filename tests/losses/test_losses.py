"""Every registered loss against its float64 numpy reference (tests/loss_refs.py), plus
gradients, extreme inputs, jit/vmap, the sharded batch, and the papers' stated properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

import loss_refs as R
from jaxpref import losses
from jaxpref.types import Logps

PAIRWISE = [
    ("dpo", {}), ("dpo", {"label_smoothing": 0.2, "margin": 0.5}), ("robust_dpo", {}),
    ("ipo", {}), ("ipo", {"length_normalize": False, "beta": 0.5}), ("hinge", {}),
    ("sigmoid_norm", {"beta": 2.0}), ("rpo", {}), ("sft_dpo", {"alpha": 0.3}),
    ("exo_pair", {}), ("exo_pair", {"label_smoothing": 0.1}), ("nca_pair", {}),
    ("bco_pair", {}), ("sppo_hard", {}), ("aot", {}), ("aot_pair", {"label_smoothing": 0.1}),
    ("apo_zero", {}), ("apo_down", {}), ("discopop", {}), ("discopop", {"tau": 0.5}),
    ("gamma_dpo", {"gamma": 0.5}), ("flex_dpo", {"beta_rejected": 0.3}), ("simpo", {}),
    ("simpo", {"hinge": True, "sft_weight": 0.5}), ("simpo", {"length_normalize": False,
                                                             "label_smoothing": 0.1}),
    ("orpo", {}), ("cpo", {}), ("cpo", {"label_smoothing": 0.1, "alpha": 0.0}),
    ("f_dpo", {}), ("f_dpo", {"divergence": "js_divergence"}),
    ("f_dpo", {"divergence": "alpha_divergence", "alpha": 0.5, "label_smoothing": 0.1}),
    ("sft", {}), ("spo", {}),
    ("wpo", {"align": False}), ("wpo", {"beta": 0.5, "label_smoothing": 0.1, "align": False}),
    ("mcts_dpo", {}),
    ("mcts_dpo", {"length_normalize": True, "length_penalty": 1.25}),
    ("mcts_dpo", {"ipo": True, "beta": 0.5}), ("mcts_dpo", {"conservative": False}),
]
LISTWISE = [("listmle", {}), ("ranknet", {"beta": 0.5}), ("pro", {}), ("pro", {"sft_weight": 0.0}),
            ("ranklist", {}), ("ranklist", {"skip": 1}), ("hierarchical_pairwise", {}),
            ("hierarchical_pairwise", {"tau": 0.5, "margin": 0.3}), ("lipo", {}),
            ("lipo", {"beta": 0.5})]


SCORED = [("osp", {}, "osp"), ("osp", {"temperature": 0.3, "beta": 0.5}, "osp"),
          ("sppo", {}, "sppo"), ("sppo", {"beta": 0.5}, "sppo"),
          ("dpo", {"score_margin": 0.5, "margin": 0.1}, "dpo_scored"),
          ("spo", {}, "spo"), ("spo", {"degree_weight": 1.0, "num_degrees": 3, "beta": 0.5,
                                       "degree_margin": 2.0}, "spo"),
          ("mcts_dpo", {}, "mcts_dpo_scored"),
          ("mcts_dpo", {"length_normalize": True, "beta": 0.5}, "mcts_dpo_scored")]


def test_every_registered_loss_is_tested():
  unpaired = {"kto", "apo", "apo_zero_unpaired", "bco"}  # tests/losses/test_losses_unpaired.py
  token_level = {"ld_dpo"}  # tests/losses/test_losses_token_level.py
  token_masks = {"sparse_po", "mapo"}  # tests/losses/test_sparse_po.py
  reward = {"bt", "bt_adaptive_margin", "bt_flip", "bt_soft", "gpm"}  # tests/losses/test_reward_losses.py
  # tests/losses/test_contrastive.py, test_pal.py, test_attribute_bt.py, test_themis.py
  reward |= {"bt_contrastive", "pal", "attribute_bt", "themis"}
  extra = set(losses.extra_members.RECORD_FIELDS)  # tests/losses/test_losses_extra_members.py
  # tests/losses/test_losses_online.py
  online = {"grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo"}
  online |= {"ppo"}  # tests/losses/test_ppo_loss.py
  online |= {"nash_md", "xpo"}  # tests/losses/test_game_losses.py
  online |= {"egpo"}  # tests/losses/test_egpo_online_loss.py
  online |= {"grao"}  # tests/losses/test_grao.py
  tested = ({n for n, _ in PAIRWISE + LISTWISE} | {n for n, _, _ in SCORED} | unpaired | token_level
            | token_masks | reward | extra | online)
  assert set(losses.names()) <= tested | {"test_only_margin"}, set(losses.names()) - tested


def make_lp(policy, ref, length, weight, valid=None, scores=None, dtype=jnp.float32):
  policy = jnp.asarray(policy, dtype)
  return Logps(policy=policy, ref=jnp.asarray(ref, dtype), length=jnp.asarray(length, dtype),
               valid=jnp.ones(policy.shape, bool) if valid is None else jnp.asarray(valid),
               weight=jnp.asarray(weight, dtype),
               scores=None if scores is None else jnp.asarray(scores, dtype))


def pair_inputs(seed, b=16, spread=10.0, k=2):
  rng = np.random.default_rng(seed)
  length = rng.integers(1, 30, (b, k)).astype(np.float64)
  ref = -rng.uniform(0.5, 3.0, (b, k)) * length
  policy = np.minimum(ref + rng.normal(0, spread, (b, k)), -1e-3)
  weight = rng.uniform(0.5, 2.0, b)
  weight[:2] = 0.0  # padded groups
  return policy, ref, length, weight


@pytest.mark.parametrize("name,hp", PAIRWISE, ids=lambda x: str(x))
@pytest.mark.parametrize("spread", [3.0, 200.0])
def test_pairwise_matches_numpy(name, hp, spread):
  if name == "f_dpo" and hp.get("divergence") == "alpha_divergence" and spread > 100:
    spread = 60.0  # exp(alpha * 200) overflows float32 by design (TRL caps it); stay below
  policy, ref, length, weight = pair_inputs(1, spread=spread)
  fn = jax.jit(losses.bind(name, hp))
  loss, metrics = fn(make_lp(policy, ref, length, weight))
  want = getattr(R, name)(policy, ref, length, weight, **hp)
  assert np.isfinite(want)
  np.testing.assert_allclose(float(loss), want, rtol=2e-4, atol=2e-4)
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
              "logps/chosen", "logps/rejected"):
    assert np.isfinite(float(metrics[key])), key
  grads = jax.grad(lambda p: fn(make_lp(p, ref, length, weight))[0])(jnp.asarray(policy, jnp.float32))
  assert np.isfinite(np.asarray(grads)).all()
  if name not in ("aot", "aot_pair", "bco_pair"):  # batch-coupled: padding moves quantiles/means
    np.testing.assert_array_equal(np.asarray(grads)[:2], 0.0)


@pytest.mark.parametrize("name,hp,ref_name", SCORED, ids=lambda x: str(x))
def test_scored_pairs_match_numpy(name, hp, ref_name):
  policy, ref, length, weight = pair_inputs(9, spread=20.0)
  scores = np.random.default_rng(9).normal(0, 3, (len(weight), 2))
  fn = jax.jit(losses.bind(name, hp))
  loss, _ = fn(make_lp(policy, ref, length, weight, scores=scores))
  want = getattr(R, ref_name)(policy, ref, length, weight, scores, **hp)
  np.testing.assert_allclose(float(loss), want, rtol=2e-4, atol=2e-4)


def test_sppo_regresses_log_ratios_onto_centred_win_rates():
  """Zero loss and zero gradient exactly at rho = (p - 1/2) / beta; the gradient pushes rho
  toward it from either side; without scores it is half of sppo_hard."""
  beta, p = 0.5, np.array([[0.8, 0.3]])
  ref = np.array([[-4.0, -6.0]])
  lp = lambda rho: make_lp(ref + rho, ref, [[3.0, 3.0]], [1.0], scores=p, dtype=jnp.float64)
  with jax.enable_x64(True):
    target = (p - 0.5) / beta
    loss, _ = losses.get("sppo")(lp(target), beta=beta)
    assert float(loss) == pytest.approx(0.0, abs=1e-12)
    g = jax.grad(lambda x: losses.get("sppo")(make_lp(ref + x, ref, [[3.0, 3.0]], [1.0],
                                                      scores=p, dtype=jnp.float64),
                                              beta=beta)[0])
    np.testing.assert_allclose(g(jnp.asarray(target)), 0.0, atol=1e-12)
    assert np.all(np.asarray(g(jnp.asarray(target + 1.0))) > 0)  # above: pushed down
    assert np.all(np.asarray(g(jnp.asarray(target - 1.0))) < 0)
  policy, ref2, length, weight = pair_inputs(11)
  plain = make_lp(policy, ref2, length, weight)
  np.testing.assert_allclose(2 * losses.get("sppo")(plain, beta=0.2)[0],
                             losses.get("sppo_hard")(plain, beta=0.2)[0], rtol=1e-5)


def test_osp_without_scores_is_dpo_and_score_margin_needs_scores():
  policy, ref, length, weight = pair_inputs(10)
  lp = make_lp(policy, ref, length, weight)
  np.testing.assert_allclose(losses.get("osp")(lp)[0], losses.get("dpo")(lp)[0], rtol=1e-6)
  with pytest.raises(ValueError, match="chosen_score"):
    losses.get("dpo")(lp, score_margin=1.0)


def test_osp_is_minimised_at_the_preference_strength():
  # SPCE's optimum: sig(beta h) = p, i.e. beta h = s_w - s_l (temperature 1).
  hs = jnp.linspace(-20, 20, 4001)
  lp = lambda h: make_lp([[h, 0.0]], [[0.0, 0.0]], [[1.0, 1.0]], [1.0], scores=[[2.0, 0.5]])
  vals = jax.vmap(lambda h: losses.get("osp")(lp(h), beta=0.5)[0])(hs)
  np.testing.assert_allclose(0.5 * hs[jnp.argmin(vals)], 1.5, atol=0.01)


def list_inputs(seed, b=8, k=4):
  policy, ref, length, weight = pair_inputs(seed, b=b, spread=5.0, k=k)
  rng = np.random.default_rng(seed + 100)
  n_valid = rng.integers(2, k + 1, b)
  valid = np.arange(k)[None] < n_valid[:, None]
  scores = -np.sort(rng.normal(size=(b, k)), axis=1)  # best first
  return policy, ref, length, weight, valid, scores


@pytest.mark.parametrize("name,hp", LISTWISE, ids=lambda x: str(x))
@pytest.mark.parametrize("with_scores", [False, True])
def test_listwise_matches_numpy(name, hp, with_scores):
  policy, ref, length, weight, valid, scores = list_inputs(2)
  scores = scores if with_scores else None
  loss, metrics = jax.jit(losses.bind(name, hp))(make_lp(policy, ref, length, weight, valid, scores))
  want = getattr(R, name)(policy, ref, length, weight, valid, scores, **hp)
  np.testing.assert_allclose(float(loss), want, rtol=2e-4, atol=2e-4)
  assert 0.0 <= float(metrics["rewards/accuracy"]) <= 1.0


@pytest.mark.parametrize("name,hp", PAIRWISE + LISTWISE, ids=lambda x: str(x))
def test_gradients_match_finite_differences(name, hp):
  if name == "hinge":
    hp = {**hp, "beta": 0.01}  # stay off the kink
  if name == "wpo":
    pytest.skip("WPO's weight is stop-gradient by design: tests/losses/test_losses_more.py checks it")
  policy, ref, length, weight = pair_inputs(3, b=6, spread=2.0)
  with jax.enable_x64(True):
    lp = make_lp(policy, ref, length, weight, dtype=jnp.float64)
    fn = losses.bind(name, hp)
    check_grads(lambda p: fn(lp.__class__(**{**lp.__dict__, "policy": p}))[0],
                (lp.policy,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def _families():
  """PAIRWISE + LISTWISE grouped by the module that defines each loss."""
  out = {}
  for name, hp in PAIRWISE + LISTWISE:
    out.setdefault(losses.get(name).__module__.rsplit(".", 1)[-1], []).append((name, hp))
  return out


@pytest.mark.parametrize("family", sorted(_families()))
def test_vmap_and_sharded_batch_agree(family):
  """Every loss of a family in one program (one compile each for plain, sharded and vmap
  per family, not per loss): an 8-way sharded batch and a vmapped stack give the plain
  values."""
  policy, ref, length, weight = pair_inputs(4, b=16)
  weight = np.ones(16)  # batch-coupled losses see the same batch either way
  fns = [losses.bind(name, hp) for name, hp in _families()[family]]
  every = lambda lp: jnp.stack([fn(lp)[0] for fn in fns])
  lp = make_lp(policy, ref, length, weight)
  plain = np.asarray(jax.jit(every)(lp))
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(lp, NamedSharding(mesh, P("data")))
  np.testing.assert_allclose(np.asarray(jax.jit(every)(sharded)), plain, rtol=1e-5, atol=1e-6)
  stacked = jax.tree.map(lambda *x: jnp.stack(x), lp, make_lp(policy + 1.0, ref, length, weight))
  batched = jax.vmap(every)(stacked)
  np.testing.assert_allclose(batched[0], plain, rtol=1e-5, atol=1e-6)


# ---- Properties the papers state --------------------------------------------------------

def one_pair(h_policy, ref=(0.0, 0.0), length=(1.0, 1.0)):
  return make_lp([[h_policy, 0.0]], [ref], [length], [1.0])


def test_ipo_minimum_at_half_inverse_beta():
  beta = 0.25
  f = lambda h: losses.get("ipo")(one_pair(h), beta=beta, length_normalize=False)[0]
  assert abs(float(f(1 / (2 * beta)))) < 1e-10
  assert abs(float(jax.grad(f)(1 / (2 * beta)))) < 1e-6
  assert float(f(1.0)) > 0 and float(jax.grad(f)(1.0)) < 0 < float(jax.grad(f)(3.0))


def test_robust_dpo_is_unbiased_under_label_flips():
  # E over flips with rate eps of the robust loss equals the clean DPO loss.
  eps, beta = 0.2, 0.5
  for h in (-3.0, 0.4, 5.0):
    rob = lambda x: float(losses.get("robust_dpo")(one_pair(x), beta=beta, label_smoothing=eps)[0])
    expected = (1 - eps) * rob(h) + eps * rob(-h)
    np.testing.assert_allclose(expected, float(losses.get("dpo")(one_pair(h), beta=beta)[0]), rtol=1e-5)


@pytest.mark.parametrize("name", ["listmle", "ranknet", "ranklist", "hierarchical_pairwise"])
def test_k2_listwise_equals_dpo(name):
  policy, ref, length, weight = pair_inputs(5)
  lp = make_lp(policy, ref, length, weight)
  np.testing.assert_allclose(losses.get(name)(lp, beta=0.3)[0], losses.get("dpo")(lp, beta=0.3)[0],
                             rtol=1e-5)
  assert float(losses.get(name)(lp, beta=0.3)[1]["rewards/accuracy"]) == pytest.approx(
      float(losses.get("dpo")(lp, beta=0.3)[1]["rewards/accuracy"]))


def test_pro_with_unit_temperatures_is_plackett_luce_on_average_logps():
  policy, ref, length, weight, valid, _ = list_inputs(6)
  lp = make_lp(policy, ref, length, weight, valid)
  # ListMLE with beta=1 on a Logps whose log-ratio is A = S/L (ref 0, length 1).
  a = make_lp(policy / length, np.zeros_like(ref), np.ones_like(length), weight, valid)
  np.testing.assert_allclose(losses.get("pro")(lp, sft_weight=0.0)[0],
                             losses.get("listmle")(a, beta=1.0)[0], rtol=1e-5)


def test_reductions_to_dpo():
  policy, ref, length, weight = pair_inputs(7)
  lp = make_lp(policy, ref, length, weight)
  dpo = float(losses.get("dpo")(lp, beta=0.2)[0])
  assert float(losses.get("gamma_dpo")(lp, beta=0.2, gamma=1.0)[0]) == pytest.approx(dpo, rel=1e-5)
  assert float(losses.get("flex_dpo")(lp, beta_chosen=0.2, beta_rejected=0.2)[0]) == pytest.approx(dpo, rel=1e-5)
  assert float(losses.get("rpo")(lp, beta=0.2, alpha=0.0)[0]) == pytest.approx(dpo, rel=1e-5)
  # gamma = 0 drops the reference entirely.
  no_ref = make_lp(policy, ref + 50.0, length, weight)
  assert float(losses.get("gamma_dpo")(no_ref, gamma=0.0)[0]) == pytest.approx(
      float(losses.get("gamma_dpo")(lp, gamma=0.0)[0]), rel=1e-6)


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "sigmoid_norm", "simpo", "orpo", "cpo",
                                  "apo_zero", "nca_pair", "exo_pair", "discopop", "listmle"])
def test_gradient_raises_chosen_and_lowers_rejected(name):
  lp = make_lp([[-8.0, -9.0]], [[-8.5, -8.5]], [[4.0, 4.0]], [1.0])
  g = jax.grad(lambda p: losses.get(name)(Logps(**{**lp.__dict__, "policy": p}))[0])(lp.policy)
  assert g[0, 0] < 0, g
  if name != "orpo":  # ORPO's NLL term also pulls on the chosen only
    assert g[0, 1] > 0, g


def test_nca_chosen_reward_has_a_finite_optimum():
  # NCA's chosen term -logsig(r) - logsig(-r)/2 is minimised at r = log 2: it lifts a
  # low chosen reward but does not chase it to infinity as DPO's margin does.
  grad = lambda r: float(jax.grad(lambda p: losses.get("nca_pair")(one_pair(p), beta=1.0)[0])(r))
  assert abs(grad(np.log(2.0))) < 1e-6
  assert grad(-5.0) < 0 < grad(3.0)


def test_discopop_blends_logistic_and_exponential():
  z_neg, z_pos = -30.0, 30.0  # beta h; tau = 0.05 so the modulation saturates
  lo = float(losses.get("discopop")(one_pair(z_neg / 0.1))[0])
  hi = float(losses.get("discopop")(one_pair(z_pos / 0.1))[0])
  np.testing.assert_allclose(lo, -float(jax.nn.log_sigmoid(z_neg)), rtol=1e-5)
  np.testing.assert_allclose(hi, np.exp(-z_pos), rtol=1e-4)
  assert np.isfinite(float(losses.get("discopop")(one_pair(-2000.0))[0]))


def test_simpo_margin_and_orpo_near_zero_logp():
  # SimPO: at A_w - A_l = gamma/beta the logit is zero, loss log 2.
  lp = make_lp([[-2.0 + 0.25, -2.0]], [[0.0, 0.0]], [[1.0, 1.0]], [1.0])
  np.testing.assert_allclose(losses.get("simpo")(lp, beta=2.0, gamma_beta_ratio=0.25)[0],
                             np.log(2), rtol=1e-6)
  # ORPO's log-odds stay finite as the average log-prob approaches 0.
  lp = make_lp([[-1e-6, -5.0]], [[0.0, 0.0]], [[1.0, 1.0]], [1.0])
  loss, _ = losses.get("orpo")(lp)
  assert np.isfinite(float(loss))


def test_aot_ignores_padded_pairs():
  policy, ref, length, weight = pair_inputs(8)
  real = weight > 0
  a = losses.get("aot")(make_lp(policy, ref, length, weight))[0]
  b = losses.get("aot")(make_lp(policy[real], ref[real], length[real], weight[real]))[0]
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_robust_dpo_rejects_bad_smoothing():
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.get("robust_dpo")(one_pair(1.0), label_smoothing=0.5)


def test_docs_table_lists_every_loss_with_its_defaults():
  import os
  doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "losses.md")).read()
  rows = {line.split("|")[1].strip().strip("`"): line for line in doc.splitlines()
          if line.startswith("| `")}
  for name in set(losses.names()) - {"test_only_margin"}:
    assert name in rows, name
    defaults = ", ".join(f"{k}={v!r}" for k, v in losses.hparams(name).items())
    assert (f"`{defaults}`" if defaults else "(none)") in rows[name], (name, defaults)


def test_f_dpo_reverse_kl_is_dpo_and_js_stays_finite():
  policy, ref, length, weight = pair_inputs(11)
  lp = make_lp(policy, ref, length, weight)
  np.testing.assert_allclose(losses.get("f_dpo")(lp)[0], losses.get("dpo")(lp)[0], rtol=1e-6)
  extreme = make_lp(ref + 300.0, ref, length, weight)
  for div in ("js_divergence", "alpha_divergence"):
    assert np.isfinite(float(losses.get("f_dpo")(extreme, divergence=div)[0]))
  with pytest.raises(ValueError, match="divergence must be"):
    losses.get("f_dpo")(lp, divergence="tv")


def test_weighted_sum_of_losses():
  policy, ref, length, weight = pair_inputs(12)
  lp = make_lp(policy, ref, length, weight)
  fn = losses.bind("0.8*dpo+0.2*bco_pair+sft", {"beta": 0.3})
  loss, metrics = jax.jit(fn)(lp)
  want = (0.8 * R.dpo(policy, ref, length, weight, beta=0.3)
          + 0.2 * R.bco_pair(policy, ref, length, weight, beta=0.3)
          + R.sft(policy, ref, length, weight))
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["loss/sft"]), R.sft(policy, ref, length, weight), rtol=1e-5)
  assert float(metrics["rewards/margin"]) == pytest.approx(
      float(losses.get("dpo")(lp, beta=0.3)[1]["rewards/margin"]), rel=1e-5)
  assert losses.hparams("dpo+simpo")["beta"] == 0.1  # the first term's default
  with pytest.raises(ValueError, match="no hyperparameter 'tau'"):
    losses.bind("dpo+sft", {"tau": 1.0})
  with pytest.raises(ValueError, match="unknown loss 'dpoo'"):
    losses.bind("dpo+dpoo", {})
  with pytest.raises(ValueError, match="WEIGHT\\*NAME"):
    losses.bind("x*dpo", {})


def test_hierarchical_pairwise_without_margin_is_ranknet_and_margin_grows_with_distance():
  policy, ref, length, weight, valid, _ = list_inputs(13)
  lp = make_lp(policy, ref, length, weight, valid)
  np.testing.assert_allclose(losses.get("hierarchical_pairwise")(lp)[0],
                             losses.get("ranknet")(lp)[0], rtol=1e-6)
  # All scores equal: each pair pays -logsig(-margin * distance), larger for farther levels.
  flat = make_lp(np.zeros((1, 3)), np.zeros((1, 3)), np.ones((1, 3)), [1.0])
  got = float(losses.get("hierarchical_pairwise")(flat, margin=1.0)[0])
  want = np.mean([-R.logsig(-1.0), -R.logsig(-2.0), -R.logsig(-1.0)])
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_ranklist_skip_must_fit_the_list():
  policy, ref, length, weight, valid, _ = list_inputs(14)
  with pytest.raises(ValueError, match="skip"):
    losses.get("ranklist")(make_lp(policy, ref, length, weight, valid), skip=4)
