"""LoRA (jaxpref/models/lora.py): adapters as a transform of the params tree, the frozen base
as the reference (--reference=lora_base), adapter-only checkpoints, merge and HF export,
multiple named adapters, and the sharding of the adapters."""

import dataclasses
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cli_util import ROOT, env
from loop_util import train_steps
from jaxpref import losses, models
from jaxpref.data import make_tiny
from jaxpref.models import hf, lora
from jaxpref.models.logps import token_logps
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.parallel import sharding
from jaxpref.train import loop, memory, step
from jaxpref.train.config import DataConfig, OptimConfig, RunConfig
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.reference import Reference
from jaxpref.train.roles import policy
from jaxpref.train.state import init_state

TINY = make_tiny.OUT
LORA = lora.LoraConfig(rank=4, alpha=8.0)
# Every sharded dimension divides 2 (as in test_sharding), untied so lm_head exists.
MODEL = models.get_config("tiny", n_heads=8, n_kv_heads=4, head_dim=8, d_ff=256,
                          tie_embeddings=False)


def config(workdir, mesh="data:8", **kw):
  # A constant learning rate, so that 2 steps then 2 more equal 4 in one go.
  kw = {"lora": LORA, "reference": "lora_base", "model": models.get_config("tiny"),
        "optim": OptimConfig(learning_rate=1e-2, warmup_steps=0, min_lr_ratio=1.0), **kw}
  return RunConfig(workdir=str(workdir), steps=4, mesh=mesh, log_every=1, eval_every=100,
                   checkpoint_every=2, progress=False, plot=False,
                   data=DataConfig(train_data=f"{TINY}/train.jsonl", eval_data="",
                                   tokenizer=f"{TINY}/tokenizer.model"), **kw)


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory):
  return loop.setup(config(tmp_path_factory.mktemp("setup"))).train_ds


def base_params(model_cfg, seed=0):
  return nnx.split(models.Decoder(model_cfg, rngs=nnx.Rngs(seed)))


def random_b(adapters, seed=1, std=0.1):
  """Adapters with nonzero B, so that A @ B (and dL/dA) is not zero."""
  keys = iter(jax.random.split(jax.random.key(seed), len(adapters)))
  return {p: {"lora_a": ad["lora_a"],
              "lora_b": std * jax.random.normal(next(keys), ad["lora_b"].shape)}
          for p, ad in adapters.items()}


def leaf(tree, path):
  """The array at slash path `path` of a params State."""
  for k in path.split("/"):
    tree = tree[int(k) if k.isdigit() else k]
  return np.asarray(tree[...])


def nbytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_adapter_shapes_follow_the_weights_and_start_at_zero():
  graphdef, params = base_params(models.get_config("tiny"))
  adapters = lora.init(params, LORA, jax.random.key(0))
  assert len(adapters) == 2 * 7  # q k v o gate up down in each of 2 layers
  shapes = {p: (ad["lora_a"].shape, ad["lora_b"].shape) for p, ad in adapters.items()}
  assert shapes["layers/0/attn/q"] == ((64, 4), (4, 4, 16))  # q [D, H, Dh]
  assert shapes["layers/0/attn/k"] == ((64, 4), (4, 2, 16))
  assert shapes["layers/1/attn/o"] == ((4, 16, 4), (4, 64))  # o [H, Dh, D]: in = H*Dh
  assert shapes["layers/1/mlp/down"] == ((192, 4), (4, 64))
  a = np.asarray(adapters["layers/1/mlp/down"]["lora_a"])
  assert 0.5 < a.std() * np.sqrt(192) < 1.5  # N(0, 1/fan_in)
  merged = lora.merge(params, adapters, LORA.scale)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)  # B = 0: the adapted model is the base, exactly


def test_targets_by_name_or_path_and_their_errors():
  _, params = base_params(models.get_config("tiny"))
  pick = lambda *t: sorted(lora.target_paths(params, lora.LoraConfig(2, targets=t)))
  assert pick("q", "v") == ["layers/0/attn/q", "layers/0/attn/v", "layers/1/attn/q",
                            "layers/1/attn/v"]
  assert pick("layers/0/mlp/.*") == ["layers/0/mlp/down", "layers/0/mlp/gate",
                                     "layers/0/mlp/up"]
  assert pick("embed") == ["embed"]
  with pytest.raises(ValueError, match="matches no parameter.*gate"):
    pick("wq")
  with pytest.raises(ValueError, match="norm scales"):
    pick("scale")
  with pytest.raises(ValueError, match="--lora_rank must be >= 1"):
    lora.LoraConfig(0)


def test_merge_of_named_adapters_matches_a_hand_computation():
  _, params = base_params(models.get_config("tiny"))
  ad_a = random_b(lora.init(params, lora.LoraConfig(2, targets=("q", "o")), jax.random.key(1)))
  ad_b = random_b(lora.init(params, lora.LoraConfig(3, targets=("q", "up")), jax.random.key(2)),
                  seed=3)
  merged = lora.merge(params, {"a": ad_a, "b": ad_b}, scales={"a": 1.0, "b": 0.5})
  np_ = lambda ad, p, f: np.asarray(ad[p][f])
  q, o, up = "layers/1/attn/q", "layers/0/attn/o", "layers/0/mlp/up"
  want_q = (leaf(params, q) + np.einsum("dr,rhk->dhk", np_(ad_a, q, "lora_a"), np_(ad_a, q, "lora_b"))
            + 0.5 * np.einsum("dr,rhk->dhk", np_(ad_b, q, "lora_a"), np_(ad_b, q, "lora_b")))
  want_o = leaf(params, o) + np.einsum("hkr,rd->hkd", np_(ad_a, o, "lora_a"), np_(ad_a, o, "lora_b"))
  want_up = leaf(params, up) + 0.5 * np_(ad_b, up, "lora_a") @ np_(ad_b, up, "lora_b")
  for path, want in ((q, want_q), (o, want_o), (up, want_up)):
    np.testing.assert_allclose(leaf(merged, path), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(leaf(merged, "layers/0/attn/k"), leaf(params, "layers/0/attn/k"))
  with pytest.raises(ValueError, match="scales for"):
    lora.merge(params, {"a": ad_a, "b": ad_b}, scales={"a": 1.0})
  with pytest.raises(ValueError, match="lack"):
    lora.merge(params, {"layers/9/attn/q": ad_a[q]})


def test_adapter_gradients_are_the_chain_rule_through_the_weight(train_ds):
  graphdef, params = base_params(models.get_config("tiny"))
  adapters = random_b(lora.init(params, LORA, jax.random.key(0)))
  batch = train_ds.batch(np.arange(4))
  f = lambda p: token_logps(graphdef, p, batch).sum()
  g_ad = jax.jit(jax.grad(lambda ad: f(lora.merge(params, ad, LORA.scale))))(adapters)
  g_w = jax.jit(jax.grad(f))(lora.merge(params, adapters, LORA.scale))
  s = LORA.scale
  for p, spec in (("layers/0/attn/q", "dhk"), ("layers/1/attn/o", "hkd"),
                  ("layers/0/mlp/gate", "df")):
    ins, outs = (spec[:2], spec[2:]) if p.endswith("/o") else (spec[:1], spec[1:])
    a, b, gw = (np.asarray(adapters[p]["lora_a"]), np.asarray(adapters[p]["lora_b"]),
                leaf(g_w, p))
    want_a = s * np.einsum(f"{spec},r{outs}->{ins}r", gw, b)  # dL/dA = s dL/dW B^T
    want_b = s * np.einsum(f"{ins}r,{spec}->r{outs}", a, gw)  # dL/dB = s A^T dL/dW
    # float32 rounding: one of 256 entries was 1.4e-6 off on the pre-refactor tree too.
    np.testing.assert_allclose(g_ad[p]["lora_a"], want_a, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(g_ad[p]["lora_b"], want_b, rtol=1e-4, atol=2e-6)
    assert np.abs(want_a).max() > 0 and np.abs(want_b).max() > 0


def run_steps(cfg, mesh, ds, n):
  run = train_steps(cfg, mesh, ds, n)
  return run.metrics, run.state, run.ref, run.graphdef, run.eval_step, run.put


@pytest.mark.slow
def test_lora_base_reference_is_the_base_and_step_0_is_log_2(train_ds, tmp_path):
  cfg = config(tmp_path, mesh="data:1")
  mesh = mesh_lib.make_mesh("data:1", jax.devices()[:1])
  metrics, state, frozen, graphdef, eval_step, put = run_steps(cfg, mesh, train_ds, 4)
  assert np.float32(metrics[0]["loss"]) == np.float32(np.log(2))  # policy == reference
  assert metrics[0]["rewards/margin"] == 0.0
  assert abs(metrics[-1]["loss"] - np.log(2)) > 1e-5  # the adapters moved the policy
  # Only the adapters train: they alone are the state's params and Adam's moments.
  assert set(state.params) == set(lora.target_paths(frozen.base, LORA))
  assert nbytes(state.opt_state) < 3 * nbytes(state.params)
  assert frozen.kind == "lora_base" and frozen.params is None  # no second copy
  # The base was neither donated nor changed: it equals a fresh init of the same seed.
  _, _, again = init_state(cfg, mesh, make_optimizer(cfg.optim, cfg.steps))
  for x, y in zip(jax.tree.leaves(frozen.base), jax.tree.leaves(again.base)):
    assert not x.is_deleted()
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Reference log-probs seen by the step (policy - reward/beta) are the base model's.
  batch = train_ds.batch(np.arange(32))
  got, _ = jax.device_get(eval_step(state.params, frozen, put(batch)))
  base_tok = np.asarray(jax.jit(token_logps, static_argnums=0)(
      graphdef, base_params(cfg.model)[1], batch))
  chosen = base_tok[:, 0].sum(-1).mean()
  beta = losses.hparams("dpo")["beta"]
  np.testing.assert_allclose(got["logps/chosen"] - got["rewards/chosen"] / beta, chosen,
                             rtol=1e-4)
  assert abs(got["logps/chosen"] - chosen) > 1e-3  # while the policy moved away from it


@pytest.mark.slow
def test_lora_base_holds_no_second_copy_of_the_weights(tmp_path, train_ds):
  mesh = mesh_lib.make_mesh("data:8")
  held = {}
  for ref in ("model", "lora_base"):
    cfg = config(tmp_path / ref, reference=ref)
    _, state, frozen = init_state(cfg, mesh, make_optimizer(cfg.optim, cfg.steps))
    held[ref] = nbytes(state) + nbytes(frozen)
  base = nbytes(base_params(config(tmp_path).model)[1])
  assert held["model"] - held["lora_base"] == base
  # --estimate_only says the same, per device (everything replicated over data:8).
  s = loop.setup(config(tmp_path / "est"))
  parts = memory.estimate(s).parts
  assert parts["reference"] == 0 and parts["base (frozen)"] == base
  assert parts["parameters"] == nbytes(lora.init(base_params(s.cfg.model)[1], LORA,
                                                 jax.random.key(0)))


def test_setup_checks(tmp_path):
  with pytest.raises(ValueError, match="lora_base.*needs --lora_rank"):
    loop.setup(config(tmp_path, lora=None))
  with pytest.raises(ValueError, match="--ref_sync_every with --lora_rank"):
    loop.setup(config(tmp_path, reference="model", ref_sync_every=2))
  with pytest.raises(ValueError, match="matches no parameter"):
    loop.setup(config(tmp_path, lora=lora.LoraConfig(2, targets=("wq",))))


@pytest.mark.slow
def test_adapters_follow_their_weights_sharding_and_match_one_device(train_ds, tmp_path):
  spec = "data:2,fsdp:2,tensor:2"
  mesh = mesh_lib.make_mesh(spec)
  # Adam's first steps are sign-like, lr * g / (|g| + eps): with the default eps, a gradient
  # entry near zero turns reduction-order noise into lr-sized differences. A larger eps keeps
  # the update linear in g, so the comparison measures the sharding, not that amplification.
  optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, min_lr_ratio=1.0, adam_eps=1e-3)
  want, want_state, *_ = run_steps(config(tmp_path / "one", mesh="data:1", model=MODEL,
                                          optim=optim),
                                   mesh_lib.make_mesh("data:1", jax.devices()[:1]), train_ds, 3)
  got, state, frozen, *_ = run_steps(config(tmp_path / "eight", mesh=spec, model=MODEL,
                                            optim=optim), mesh, train_ds, 3)
  specs = {(p, f): state.params[p][f].sharding.spec for p in ("layers/0/attn/q",
           "layers/0/attn/o", "layers/0/mlp/down") for f in lora.FACTORS}
  assert specs == {("layers/0/attn/q", "lora_a"): P("fsdp"),
                   ("layers/0/attn/q", "lora_b"): P(None, "tensor"),
                   ("layers/0/attn/o", "lora_a"): P("tensor"),
                   ("layers/0/attn/o", "lora_b"): P(None, "fsdp"),
                   ("layers/0/mlp/down", "lora_a"): P("tensor"),
                   ("layers/0/mlp/down", "lora_b"): P(None, "fsdp")}
  moments = [x for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
             if "'layers/0/attn/q']['lora_b']" in jax.tree_util.keystr(p)]
  assert len(moments) == 2 and all(x.sharding.spec == P(None, "tensor") for x in moments)
  assert frozen.base["layers"][0]["attn"]["q"][...].sharding.spec == P("fsdp", "tensor")
  np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in want], atol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_merged_export_has_the_adapted_models_logits(train_ds, tmp_path):
  cfg = config(tmp_path, model=MODEL)
  graphdef, base = base_params(MODEL)
  adapters = random_b(lora.init(base, LORA, jax.random.key(0)))
  batch = train_ds.batch(np.arange(8))
  loss = losses.bind("dpo", {})
  _, lora_eval = step.make_steps(policy.forward(graphdef, lora_scale=LORA.scale), loss,
                                 make_optimizer(cfg.optim, 4))
  adapted, _ = lora_eval(adapters, Reference("lora_base", None, base=base), batch)
  # The documented export: merge once, then save as a plain Hugging Face checkpoint.
  hf.save(lora.merge(base, adapters, LORA.scale), MODEL, str(tmp_path / "hf"))
  _, loaded = hf.load(str(tmp_path / "hf"))
  loaded_graphdef, loaded_params = nnx.split(loaded)
  _, plain_eval = step.make_steps(policy.forward(loaded_graphdef), loss,
                                  make_optimizer(cfg.optim, 4))
  exported, _ = plain_eval(loaded_params, Reference("model", loaded_params), batch)
  for key in ("logps/chosen", "logps/rejected"):
    np.testing.assert_allclose(exported[key], adapted[key], rtol=1e-6)
  tokens = batch.tokens[:, 0]
  logits = jax.jit(lambda gd, p, t: nnx.merge(gd, p)(t), static_argnums=0)
  np.testing.assert_allclose(logits(loaded_graphdef, loaded_params, tokens), logits(
      graphdef, lora.merge(base, adapters, LORA.scale), tokens), atol=1e-5)
  base_logps, _ = plain_eval(base, Reference("model", base), batch)
  assert abs(adapted["logps/chosen"] - base_logps["logps/chosen"]) > 1e-3  # B != 0 matters


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_checkpoint_holds_only_adapters_and_resume_matches(tmp_path):
  cfg2 = dataclasses.replace(config(tmp_path / "a"), steps=2)
  loop.run(cfg2)
  loop.run(dataclasses.replace(cfg2, steps=4))  # resumes at 2: base from the seed
  loop.run(config(tmp_path / "straight"))
  np.testing.assert_allclose(_losses(tmp_path / "a"), _losses(tmp_path / "straight"), rtol=1e-6)
  assert len(_losses(tmp_path / "a")) == 4
  # Every array the checkpoint holds is an adapter factor (or its Adam moments) or the
  # step count: no base weight. (File sizes would not show it on a model this small:
  # orbax's metadata outweighs the arrays.)
  with open(os.path.join(tmp_path, "a", "checkpoints", "4", "state", "_METADATA")) as f:
    saved = list(json.load(f)["tree_metadata"])
  params = [k for k in saved if "'params'" in k]
  assert params and all(("lora_a" in k) or ("lora_b" in k) for k in params), params
  weights = [k for k in saved if "attn" in k or "mlp" in k or "embed" in k or "norm" in k]
  assert len(weights) == 3 * len(params), saved  # each factor, its two Adam moments
  assert all(("lora_a" in k) or ("lora_b" in k) for k in weights), saved
  # --reference=precomputed under LoRA: the base's log-probs once, the same training.
  loop.run(config(tmp_path / "pre", reference="precomputed"))
  np.testing.assert_allclose(_losses(tmp_path / "pre"), _losses(tmp_path / "straight"),
                             atol=1e-5)


@pytest.mark.slow
def test_experiment_flagfile_trains_from_log_2(tmp_path):
  workdir = str(tmp_path / "lora")
  proc = subprocess.run(
      ["python", "-m", "jaxpref.main", "--flagfile=experiments/lora_dpo.flags",
       f"--workdir={workdir}", "--noprogress", "--noplot", "--steps=4", "--eval_every=4"],
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "LoRA: those are rank-8 adapters on 14 weights" in proc.stdout
  assert "--lora_rank=8" in open(os.path.join(workdir, "flags.txt")).read()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
  assert abs(evals[0]["loss"] - np.log(2)) < 1e-6 and evals[-1]["loss"] != evals[0]["loss"]
