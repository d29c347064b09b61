"""SparsePO and MaPO (docs/losses.md#sparse_po, docs/losses.md#mapo): float64 numpy references, gradients, the papers'
properties, the train step's full-vocabulary k_t and masks on a tiny model, and the mask
network's training and checkpointing through the loop."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from cli_util import ROOT
from jaxpref import losses, models
from jaxpref.data import passes
from jaxpref.losses.reward import finish_metrics
from jaxpref.losses.token_level import zn_rescale
from jaxpref.models import token_mask
from jaxpref.models.logps import token_level_logps, token_logps
from jaxpref.ops import vocab_kl
from jaxpref.train.roles import policy
from jaxpref.types import GroupBatch, Logps

# --- float64 numpy references, from the formulas ------------------------------------------


def neg_logsig(z):
  return np.logaddexp(0.0, -z)


def sparse_po_ref(pol, ref, mask, kl, masks, weight, beta=0.1, lambda_u=0.001, lambda_d=0.001,
                  independent=True):
  masks = masks * mask[..., None]
  m_u = masks[..., 0]
  m_d = masks[..., 1] if independent else m_u
  scale = 1.0 if independent else 0.5
  out = []
  for i in range(pol.shape[0]):
    part = lambda m, x, k: np.sum(m[i, k] * x[i, k] * mask[i, k])
    u = part(m_u, pol - ref, 0) - part(m_u, pol - ref, 1)
    d = part(m_d, kl, 0) - part(m_d, kl, 1)
    l1 = scale * (lambda_u * m_u[i].sum() + lambda_d * m_d[i].sum())
    out.append(neg_logsig(beta * (u - d)) + l1)
  return np.sum(np.array(out) * weight) / np.sum(weight)


def zn_rescale_ref(x, mask):
  """One sequence: z-normalise (torch's n-1 std) over the masked tokens, min-max to [0, 1]."""
  on = mask > 0
  out = np.zeros_like(x)
  vals = x[on]
  z = (vals - vals.mean()) / (vals.std(ddof=1 if len(vals) > 1 else 0) + 1e-12)
  span = z.max() - z.min()
  out[on] = 1.0 if span <= 1e-6 else (z - z.min()) / span
  return out


def mapo_ref(pol, ref, mask, kl, acts, weight, beta=0.1, layers=None):
  acts = acts if layers is None else acts[..., layers]
  out = []
  for i in range(pol.shape[0]):
    s = []
    for k in range(2):
      a = np.mean([zn_rescale_ref(acts[i, k, :, j], mask[i, k]) for j in range(acts.shape[-1])], 0)
      s.append((np.sum(a * (pol - ref)[i, k] * mask[i, k]), np.sum(a * kl[i, k] * mask[i, k])))
    out.append(neg_logsig(beta * (s[0][0] - s[1][0] - (s[0][1] - s[1][1]))))
  return np.sum(np.array(out) * weight) / np.sum(weight)


def inputs(seed, b=6, t=10, m=2, scale=3.0):
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, 2, t))
  for i in range(b):
    for k in range(2):
      start = rng.integers(1, 3)
      mask[i, k, start:start + rng.integers(2, t - 3)] = 1.0
  pol = -rng.uniform(0.1, scale, (b, 2, t)) * mask
  ref = -rng.uniform(0.1, scale, (b, 2, t)) * mask
  kl = -rng.uniform(0.0, 1.0, (b, 2, t)) * mask
  masks = rng.uniform(0.0, 2.0, (b, 2, t, m))
  return pol, ref, mask, kl, masks, rng.uniform(0.5, 2.0, b)


def make_lp(pol, ref, mask, kl, masks, weight, dtype=jnp.float32):
  a = lambda x: jnp.asarray(x, dtype)
  return Logps(policy=a(pol.sum(-1)), ref=a(ref.sum(-1)), length=a(mask.sum(-1)),
               valid=jnp.ones(pol.shape[:2], bool), weight=a(weight), policy_tok=a(pol),
               ref_tok=a(ref), mask=a(mask), kl_tok=a(kl), token_mask=a(masks))


# --- the losses on synthetic per-token arrays ---------------------------------------------


@pytest.mark.parametrize("hp", [{}, {"independent": False, "beta": 0.8},
                                {"lambda_u": 0.05, "lambda_d": 0.0}])
def test_sparse_po_matches_numpy_and_grads(hp):
  args = inputs(0)
  loss, metrics = jax.jit(losses.bind("sparse_po", hp))(make_lp(*args))
  np.testing.assert_allclose(float(loss), sparse_po_ref(*args, **hp), rtol=1e-5)
  assert 0 < float(metrics["mask/reward_mean"]) and float(metrics["token/d"]) != 0
  with jax.enable_x64(True):
    lp = make_lp(*args, dtype=jnp.float64)
    fn = losses.bind("sparse_po", hp)
    for field in ("policy_tok", "kl_tok", "token_mask"):
      check_grads(lambda x: fn(dataclasses.replace(lp, **{field: x}))[0], (getattr(lp, field),),
                  order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hp,layers", [({}, None), ({"beta": 0.8, "layers": "last"}, [2]),
                                       ({"layers": "first_half"}, [0])])
def test_mapo_matches_numpy_and_grads(hp, layers):
  args = inputs(1, m=3)
  loss, _ = jax.jit(losses.bind("mapo", hp))(make_lp(*args))
  want = mapo_ref(*args, beta=hp.get("beta", 0.1), layers=layers)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  with jax.enable_x64(True):
    lp = make_lp(*args, dtype=jnp.float64)
    fn = losses.bind("mapo", hp)
    for field in ("policy_tok", "kl_tok"):
      check_grads(lambda x: fn(dataclasses.replace(lp, **{field: x}))[0], (getattr(lp, field),),
                  order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sparse_po", "mapo"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_log_ratios_stay_finite(name, sign):
  pol, ref, mask, kl, masks, weight = inputs(2)
  pol = ref + sign * 200.0 * mask * np.where(np.arange(2)[None, :, None] == 0, 1.0, -1.0)
  args = (pol, ref, mask, kl, masks, weight)
  loss, metrics = jax.jit(losses.get(name))(make_lp(*args))
  grad = jax.grad(lambda p: losses.get(name)(dataclasses.replace(make_lp(*args), policy_tok=p))[0])(
      jnp.asarray(pol, jnp.float32))
  assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
  assert np.isfinite(np.asarray(grad)).all()
  ref_fn = sparse_po_ref if name == "sparse_po" else mapo_ref
  np.testing.assert_allclose(float(loss), ref_fn(*args), rtol=1e-5, atol=1e-6)


def test_sparse_po_with_unit_masks_and_no_kl_is_dpo():
  pol, ref, mask, kl, masks, weight = inputs(3)
  lp = make_lp(pol, ref, mask, 0 * kl, np.ones_like(masks), weight)
  dpo = losses.get("dpo")(lp, beta=0.3)[0]
  for independent in (True, False):
    got = losses.get("sparse_po")(lp, beta=0.3, lambda_u=0.0, lambda_d=0.0,
                                  independent=independent)[0]
    np.testing.assert_allclose(got, dpo, rtol=1e-6)


def test_mask_l1_pushes_masks_down():
  pol, ref, mask, kl, masks, weight = inputs(4)
  # No signal (Delta = k = 0): only the L1 penalty acts, +lambda per response token.
  lp = make_lp(ref, ref, mask, 0 * kl, masks, np.ones_like(weight))
  b = len(weight)
  for independent, want_u, want_d in ((True, 0.01, 0.03), (False, 0.02, 0.0)):
    g = jax.grad(lambda m: losses.get("sparse_po")(dataclasses.replace(lp, token_mask=m),
                                                   lambda_u=0.01, lambda_d=0.03,
                                                   independent=independent)[0])(lp.token_mask)
    np.testing.assert_allclose(g[..., 0], want_u * mask / b, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(g[..., 1], want_d * mask / b, rtol=1e-5, atol=1e-9)


def test_zn_rescale_is_in_unit_interval():
  rng = np.random.default_rng(5)
  x = rng.normal(0, 50, (4, 2, 9))
  mask = (rng.uniform(size=x.shape) > 0.3).astype(np.float64)
  mask[0, 0] = 0
  mask[0, 0, 3] = 1  # a single token: no spread, the unmasked objective
  x[1, 1] = 7.0  # constant activations, likewise
  got = np.asarray(zn_rescale(jnp.asarray(x, jnp.float32), jnp.asarray(mask, jnp.float32)))
  assert (got >= 0).all() and (got <= 1).all() and (got[mask == 0] == 0).all()
  for i in range(4):
    for k in range(2):
      np.testing.assert_allclose(got[i, k], zn_rescale_ref(x[i, k], mask[i, k]), atol=1e-5)
  assert got[0, 0, 3] == 1.0 and (got[1, 1][mask[1, 1] > 0] == 1.0).all()
  assert got[2, 0].max() == 1.0 and got[2, 0][mask[2, 0] > 0].min() == 0.0


def test_registry_asks_the_step_for_what_each_loss_reads():
  sp, mp, dpo = (losses.needs_tokens(n) for n in ("sparse_po", "mapo", "dpo"))
  assert sp and sp.vocab_kl and sp.token_mask == "learned"
  assert mp and mp.vocab_kl and mp.token_mask == "activations"
  assert not dpo and not dpo.vocab_kl and dpo.token_mask is None
  assert not losses.needs_tokens("ld_dpo").vocab_kl
  assert losses.needs_tokens("dpo+mapo").token_mask == "activations"
  with pytest.raises(ValueError, match="different token masks"):
    losses.needs_tokens("sparse_po+mapo")
  with pytest.raises(ValueError, match="layers must be one of"):
    losses.get("mapo")(make_lp(*inputs(0)), layers="middle")


# --- the train step on a tiny model -------------------------------------------------------

CFG = models.ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                         head_dim=8, d_ff=32)


def tiny_batch(b=2, t=9, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (b, 2, t)).astype(np.int32)
  loss_mask = np.zeros((b, 2, t), np.float32)
  loss_mask[..., 3:] = 1.0
  loss_mask[0, 1, 7:] = 0.0  # a shorter response
  return GroupBatch(tokens=tokens, loss_mask=loss_mask, segment_ids=np.ones_like(tokens),
                    valid=np.ones((b, 2), bool), weight=np.ones(b, np.float32))


def two_models(name, softcap=0.0):
  cfg = dataclasses.replace(CFG, final_logit_softcap=softcap)
  needs = losses.needs_tokens(name)
  graphdef, ref = nnx.split(token_mask.attach(models.Decoder(cfg, rngs=nnx.Rngs(0)), needs))
  # A different policy, so that k_t is not 0.
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), ref)
  return graphdef, params, ref, needs


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_step_kl_tok_matches_numpy_from_full_logits(softcap):
  graphdef, params, ref, needs = two_models("mapo", softcap)
  batch = tiny_batch()
  pol_tok, ref_tok, extras = jax.jit(token_level_logps, static_argnums=(0, 4))(
      graphdef, params, ref, batch, needs)
  flat = batch.tokens.reshape(-1, batch.tokens.shape[-1])
  lp_pol = log_softmax(np.asarray(nnx.merge(graphdef, params)(flat), np.float64))
  lp_ref = log_softmax(np.asarray(nnx.merge(graphdef, ref)(flat), np.float64))
  k = np.sum(np.exp(lp_ref) * (lp_pol - lp_ref), -1)  # position t-1 predicts token t
  mask = batch.loss_mask.reshape(len(flat), -1)
  want = np.pad(k[:, :-1], ((0, 0), (1, 0))) * mask
  got = np.asarray(extras["kl_tok"]).reshape(want.shape)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-4)
  assert (got <= 0).all() and (got[mask > 0] < 0).all()
  # The same pass's log-probs are the ordinary step's.
  np.testing.assert_allclose(pol_tok, token_logps(graphdef, params, batch), atol=1e-5)
  np.testing.assert_allclose(ref_tok, token_logps(graphdef, ref, batch), atol=1e-5)
  # MaPO's features: each layer's residual stream averaged over the features.
  _, states = nnx.merge(graphdef, ref).hidden(flat, segment_ids=np.ones_like(flat), all_layers=True)
  feats = np.pad(np.moveaxis(np.asarray(states).mean(-1), 0, -1)[:, :-1], ((0, 0), (1, 0), (0, 0)))
  np.testing.assert_allclose(np.asarray(extras["token_mask"]).reshape(feats.shape),
                             feats * mask[..., None], atol=1e-5)


def test_vocab_kl_chunks_and_tail_agree_with_one_pass():
  rng = np.random.default_rng(6)
  h, h_ref = (jnp.asarray(rng.normal(0, 1, (7, 16)), jnp.float32) for _ in range(2))
  w, w_ref = (jnp.asarray(rng.normal(0, 3, (16, 50)), jnp.float32) for _ in range(2))
  one = vocab_kl(h, w, h_ref, w_ref, chunk=50)
  lp, lr = log_softmax(np.asarray(h @ w, np.float64)), log_softmax(np.asarray(h_ref @ w_ref, np.float64))
  np.testing.assert_allclose(one, np.sum(np.exp(lr) * (lp - lr), -1), rtol=1e-4, atol=1e-5)
  for chunk in (7, 16):  # 7 full chunks + 1 tail; 3 + 2
    np.testing.assert_allclose(vocab_kl(h, w, h_ref, w_ref, chunk=chunk), one,
                               rtol=1e-5, atol=1e-5)
    g = lambda c: jax.grad(lambda x: vocab_kl(x, w, h_ref, w_ref, chunk=c).sum())(h)
    np.testing.assert_allclose(g(chunk), g(50), rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(vocab_kl(h, w, h, w, chunk=7)) == 0)


def test_mask_network_gets_gradients_from_sparse_po():
  graphdef, params, ref, needs = two_models("sparse_po")
  fn = losses.bind("sparse_po", {})

  def loss(p):
    pol_tok, ref_tok, extras = token_level_logps(graphdef, p, ref, tiny_batch(), needs)
    return fn(policy.group_logps(pol_tok, ref_tok, tiny_batch(), needs, **extras))[0]

  grads = jax.jit(jax.grad(loss))(params)
  net = getattr(grads, token_mask.ATTR)
  for path, g in jax.tree_util.tree_leaves_with_path(net):
    assert np.abs(np.asarray(g)).max() > 0, path


def test_unsupported_combinations_raise_clear_errors():
  from jaxpref.models import lora
  from jaxpref.train.config import RunConfig
  graphdef, params, ref, needs = two_models("sparse_po")
  plain_graphdef, plain = nnx.split(models.Decoder(CFG, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="has none"):
    token_level_logps(plain_graphdef, plain, plain, tiny_batch(), needs)
  # The policy role's start-up check (the step builder no longer sees LoRA flags).
  cfg = RunConfig(workdir="unused", model=CFG, loss="sparse_po", reference="lora_base",
                  lora=lora.LoraConfig(rank=2, alpha=4.0))
  with pytest.raises(ValueError, match="learned token mask .*--lora_rank"):
    policy.check(cfg)
  from jaxpref.data.shared_prompt import SharedPromptBatch
  fake = SharedPromptBatch.__new__(SharedPromptBatch)
  with pytest.raises(ValueError, match="not supported with --shared_prompt"):
    token_level_logps(graphdef, params, ref, fake, needs)


# --- through the training loop: the mask network trains and is checkpointed ---------------


@pytest.mark.slow
def test_mask_network_trains_and_is_checkpointed(tmp_path):
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxpref.parallel import mesh as mesh_lib
  from jaxpref.train import checkpoint as ckpt_lib
  from jaxpref.train import loop
  from jaxpref.train.config import DataConfig, OptimConfig, RunConfig
  from jaxpref.train.optimizer import make_optimizer
  from jaxpref.train.state import build_steps, init_state
  tiny = os.path.join(ROOT, "jaxpref", "data", "tiny")
  cfg = RunConfig(
      workdir=str(tmp_path), model=models.get_config("tiny"), loss="sparse_po",
      loss_hparams={"lambda_u": 0.01}, steps=3, log_every=1, eval_every=3,
      checkpoint_every=3, progress=False, plot=False, optim=OptimConfig(warmup_steps=0),
      data=DataConfig(train_data=os.path.join(tiny, "train.jsonl"),
                      eval_data=os.path.join(tiny, "eval.jsonl"),
                      tokenizer=os.path.join(tiny, "tokenizer.model"), batch_size=8,
                      eval_batch_size=64))
  s = loop.setup(cfg)
  final = loop.train(s)
  assert np.isfinite(final["loss"]) and "mask/kl_mean" in final
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  graphdef, init, ref = init_state(cfg, s.mesh, optimizer)
  ckpt = ckpt_lib.Checkpointer(os.path.join(cfg.workdir, "checkpoints"), 3, 2)
  restored, _, step = ckpt.restore(init)
  ckpt.close()
  assert step == 3
  before, after = (getattr(x.params, token_mask.ATTR) for x in (init, restored))
  # Adam moves every leaf with a non-zero gradient (no weight decay here): all trained.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
    assert not np.allclose(np.asarray(a), np.asarray(b)), path
  # The restored mask network is the trained one: it reproduces the run's final eval.
  _, eval_step = build_steps(cfg, graphdef, optimizer, restored, s.mesh)
  put = lambda b: jax.device_put(b, NamedSharding(s.mesh, P(mesh_lib.BATCH_AXES)))
  again = finish_metrics(passes.weighted_means(lambda b: eval_step(restored.params, ref, b),
                                               s.eval_ds, cfg.data.eval_batch_size, put))
  np.testing.assert_allclose(again["loss"], final["loss"], rtol=1e-5)
  np.testing.assert_allclose(again["mask/kl_mean"], final["mask/kl_mean"], rtol=1e-5)


@pytest.mark.parametrize("name", ["sparse_po", "mapo", "wpo"])
def test_a_needed_token_input_that_was_not_computed_is_an_error(name):
  # Zeros standing in for kl_tok / token_mask / prob_sq would train on a wrong loss.
  needs = losses.needs_tokens(name)
  batch = tiny_batch()
  tok = np.zeros(batch.loss_mask.shape, np.float32)
  with pytest.raises(ValueError, match="was not computed"):
    policy.group_logps(tok, tok, batch, needs)
  probe = policy.probe_logps(batch, needs)  # the start-up probe's stand-ins
  jax.eval_shape(losses.bind(name, {}), probe)
