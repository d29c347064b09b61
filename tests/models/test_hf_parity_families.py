"""jaxpref.models.hf against transformers' Gemma 3 (text), Phi-3 and Mixtral causal LMs:
logits on the same tokens, exact tensor round trips (Phi-3's fused qkv_proj / gate_up_proj
split on load and fused on save, Mixtral's per-expert tensors stacked and unstacked),
greedy sampling equal to `generate`, Mixtral's experts sharded over the tensor axis, and
one-line refusals of what the Decoder does not compute (longrope, partial RoPE, ...)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxpref import models  # noqa: E402
from jaxpref.models import hf, hf_config, hf_write, moe, sampler  # noqa: E402
from jaxpref.parallel import mesh as mesh_lib, sharding  # noqa: E402

pytestmark = pytest.mark.slow

V = 128
IDS = hf_write.token_ids(bos=1, eos=2, pad=0)  # Phi-3's defaults (32000) lie outside V


def hf_model(family, tie=True, kv_heads=2, layers=2, seed=0, **extra):
  """A random float32 Gemma3ForCausalLM, Phi3ForCausalLM or MixtralForCausalLM; weights
  (norm scales and biases too) far from the init, so a wrong split, norm offset, RoPE theta
  or expert order shows."""
  torch.manual_seed(seed)
  config_cls, model_cls = {"gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
                           "phi3": ("Phi3Config", "Phi3ForCausalLM"),
                           "mixtral": ("MixtralConfig", "MixtralForCausalLM")}[family]
  ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
  cfg = getattr(transformers, config_cls)(
      vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, rms_norm_eps=1e-5,
      max_position_embeddings=256, tie_word_embeddings=tie, **ids, **extra)
  model = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith("bias"):
        p.copy_(1 + 0.5 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model


def tokens(n=3, t=40, seed=0):
  return np.random.default_rng(seed).integers(0, V, (n, t))


def hf_logits(model, toks):
  with torch.no_grad():
    return model(torch.tensor(toks)).logits.numpy()


def ours(model, toks):
  return np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(toks, jnp.int32)))


CASES = {
    # Three layers: local, global, local (pattern 2). The window (8) is shorter than the 40
    # tokens; the global layers' RoPE is linearly scaled (factor 4, theta 1e5), the local
    # ones' theta is 100; the final cap bends most logits; the query scalar is not head_dim.
    "gemma3_local_global": dict(
        family="gemma3_text", layers=3, sliding_window=8, sliding_window_pattern=2,
        final_logit_softcapping=4.0, query_pre_attn_scalar=24, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    # attention_bias (q/k/v and o), one K/V head, untied, transformers' default RoPE thetas
    # (1e6 global, 1e4 local) and layer pattern (6: both layers local).
    "gemma3_bias_mqa": dict(family="gemma3_text", tie=False, kv_heads=1, attention_bias=True,
                            sliding_window=8),
    # Every layer windowed (8), as Phi-3-mini-4k's sliding_window applies to all layers.
    "phi3_sliding": dict(family="phi3", tie=False, sliding_window=8),
    "phi3_tied_mha": dict(family="phi3", tie=True, kv_heads=4, rope_parameters={
        "rope_type": "default", "rope_theta": 5e5}),
    # 4 experts, the top 2 per token, a window (8) on every layer.
    "mixtral_top2": dict(family="mixtral", tie=False, num_local_experts=4,
                         num_experts_per_tok=2, sliding_window=8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_and_round_trip(case, tmp_path):
  src = hf_model(**CASES[case])
  src.save_pretrained(tmp_path / "hf")
  cfg, model = hf.load(str(tmp_path / "hf"))
  family = CASES[case]["family"]
  assert hf.family_of(cfg).model_type == family
  assert cfg.fused_projections == (family == "phi3")
  assert cfg.sliding_window == (0 if case == "phi3_tied_mha" else 8)
  assert (cfg.n_experts, cfg.experts_per_token) == ((4, 2) if family == "mixtral" else (0, 2))
  toks = tokens()
  want = hf_logits(src, toks)
  diff = float(np.abs(ours(model, toks) - want).max())
  print(f"{case}: max |logit diff| = {diff:.3g} (logit scale {np.abs(want).max():.3g})")
  assert diff <= 1e-4

  # The test can tell: each family detail read from the config moves the logits.
  tensors = hf.read_tensors(str(tmp_path / "hf"))
  changes = {"gemma3_local_global": [dict(rope_local_theta=0.0), dict(rope_scaling_factor=1.0),
                                     dict(sliding_window=0), dict(final_logit_softcap=0.0),
                                     dict(query_pre_attn_scalar=0.0)],
             "gemma3_bias_mqa": [dict(rope_local_theta=1e6)],
             "phi3_sliding": [dict(sliding_window=0)],
             "phi3_tied_mha": [dict(rope_theta=1e4)],
             "mixtral_top2": [dict(experts_per_token=1), dict(sliding_window=0)]}[case]
  for change in changes:
    other = hf.model_from_tensors(dataclasses.replace(cfg, **change), tensors)
    assert np.abs(ours(other, toks) - want).max() > 1e-2, change

  hf.save(model, cfg, str(tmp_path / "back"), ids=IDS)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
  assert type(back) is type(src)
  a, b = src.state_dict(), back.state_dict()
  assert sorted(a) == sorted(b)
  for k in a:
    assert torch.equal(a[k], b[k]), k
  np.testing.assert_array_equal(hf_logits(back, toks), want)
  assert hf.config_from_hf(json.loads((tmp_path / "back" / "config.json").read_text())) == cfg


@pytest.mark.parametrize("case", ["gemma3_local_global", "mixtral_top2"])
def test_greedy_matches_transformers_generate(case, tmp_path):
  src = hf_model(**CASES[case])
  src.save_pretrained(tmp_path / "hf")
  _, model = hf.load(str(tmp_path / "hf"))
  prompt = np.random.default_rng(1).integers(0, V, (2, 10))
  n = 20  # 30 tokens in all: past the window of 8
  with torch.no_grad():
    want = src.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 10, dtype=torch.long),
                        max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        eos_token_id=None, pad_token_id=0).numpy()
  out = sampler.generate(model, prompt, max_new_tokens=n)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
  assert len(set(want[:, 10:].ravel())) > 2  # more than one repeated token


def test_gemma3_legacy_keys_read_as_transformers_builds_them():
  """A transformers-4 style config.json (google/gemma-3-1b's keys: rope_theta,
  rope_local_base_freq, rope_scaling, sliding_window_pattern, no layer_types) gives what
  the transformers-5 config built from it gives."""
  legacy = dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=V,
                hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                num_key_value_heads=1, head_dim=16, rope_theta=5e5, rope_local_base_freq=300.0,
                rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=16,
                sliding_window_pattern=3, query_pre_attn_scalar=16)
  cfg = hf.config_from_hf(legacy)
  assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling_factor) == (5e5, 300.0, 8.0)
  assert [cfg.is_local(i) for i in range(7)] == [True, True, False, True, True, False, True]
  built = transformers.AutoConfig.for_model(**{k: v for k, v in legacy.items()
                                              if k != "architectures"}).to_dict()
  assert hf.config_from_hf({**built, "architectures": legacy["architectures"]}) == cfg
  # Omitted: transformers' thetas (1e6 global, 1e4 local) and every 6th layer global.
  sparse = hf.config_from_hf({k: v for k, v in legacy.items() if k not in (
      "rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern")})
  assert (sparse.rope_theta, sparse.rope_local_theta, sparse.rope_scaling_factor) == (
      1e6, 1e4, 1.0)
  assert [sparse.is_local(i) for i in range(7)] == [True] * 5 + [False, True]


def _config(family, **keys):
  return json.loads(hf_model(family).config.to_json_string()) | {
      "architectures": [{"gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}[family]],
      **keys}


LONGROPE = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
            "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("family,keys,match", [
    ("phi3", dict(rope_parameters=LONGROPE),
     r"RoPE scaling rope_parameters.rope_type='longrope' \(implemented: default"),
    ("phi3", dict(rope_scaling={**{k: v for k, v in LONGROPE.items() if k != "rope_type"},
                                     "type": "su"}, rope_parameters=None),
     r"RoPE scaling rope_scaling.rope_type='su'"),
    ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                   "partial_rotary_factor": 0.5}),
     r"rope_parameters.partial_rotary_factor=0.5 \(partial RoPE is not implemented\)"),
    ("phi3", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    ("gemma3_text", dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
    ("gemma3_text", dict(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "rope_parameters.sliding_attention.rope_type='linear': local layers with scaled RoPE"),
    ("gemma3_text", dict(rope_parameters={
        "full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     "RoPE scaling rope_parameters.full_attention.rope_type='yarn'"),
    # The multimodal Gemma 3 (model_type gemma3) is not the text family.
    ("gemma3_text", dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]),
     r"model_type='gemma3'.*gemma3_text \(Gemma3ForCausalLM\), phi3 \(Phi3ForCausalLM\)"),
], ids=["phi3_longrope", "phi3_legacy_su", "phi3_partial_rotary", "phi3_gelu",
        "gemma3_bidirectional", "gemma3_exact_gelu", "gemma3_scaled_local_rope", "gemma3_yarn",
        "gemma3_multimodal"])
def test_refused_with_one_line(family, keys, match):
  with pytest.raises(hf.UnsupportedCheckpoint, match=match) as err:
    hf.config_from_hf(_config(family, **keys))
  assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_phi3_fused_tensors_checked(tmp_path):
  """A missing fused tensor is named as the checkpoint names it; a fused tensor of the
  wrong row count names both counts; the split and fused names are the family's."""
  src = hf_model("phi3")
  src.save_pretrained(tmp_path / "hf")
  tensors = hf.read_tensors(str(tmp_path / "hf"))
  cfg = hf.read_config(str(tmp_path / "hf"))
  assert sorted(k for k in tensors if ".layers.0." in k) == sorted(
      f"model.layers.0.{n}.weight" for n in ("self_attn.qkv_proj", "self_attn.o_proj",
                                            "mlp.gate_up_proj", "mlp.down_proj",
                                            "input_layernorm", "post_attention_layernorm"))
  missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.gate_up_proj.weight"}
  with pytest.raises(hf.UnsupportedCheckpoint,
                     match=r"missing: \['model.layers.1.mlp.gate_up_proj.weight'\]; "
                           r"unexpected: none"):
    hf.model_from_tensors(cfg, missing)
  short = dict(tensors, **{"model.layers.0.self_attn.qkv_proj.weight":
                           tensors["model.layers.0.self_attn.qkv_proj.weight"][:-16]})
  with pytest.raises(hf.UnsupportedCheckpoint, match=r"qkv_proj.weight has shape \(112, 64\), "
                     r"which does not give 128 rows"):
    hf.model_from_tensors(cfg, short)


def test_config_defaults_cover_the_new_families():
  """The defaults test (test_hf_config_defaults.py) runs over every FAMILIES entry; these
  are the values a sparse config.json of each new family gets from transformers."""
  g3 = hf_config.config_from_hf({"model_type": "gemma3_text",
                                 "architectures": ["Gemma3ForCausalLM"]})
  assert (g3.vocab_size, g3.head_dim, g3.sliding_window, g3.query_pre_attn_scalar) == (
      262208, 256, 4096, 256.0)
  assert (g3.final_logit_softcap, g3.attn_logit_softcap, g3.rope_local_theta) == (0.0, 0.0, 1e4)
  phi3 = hf_config.config_from_hf({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]})
  assert (phi3.vocab_size, phi3.n_kv_heads, phi3.max_len, phi3.sliding_window) == (
      32064, 32, 4096, 0)
  mixtral = hf_config.config_from_hf({"model_type": "mixtral",
                                      "architectures": ["MixtralForCausalLM"]})
  assert (mixtral.n_experts, mixtral.experts_per_token, mixtral.rope_theta) == (8, 2, 1e6)


def test_route_matches_float64_reference():
  """Mixtral's router: softmax over experts, the top k renormalised, the rest 0."""
  logits = np.random.default_rng(0).normal(0, 2, (5, 7, 6))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.zeros_like(p)
  for idx in np.ndindex(p.shape[:-1]):
    top = np.argsort(-p[idx])[:3]
    want[idx][top] = p[idx][top] / p[idx][top].sum()
  got = np.asarray(moe.route(jnp.asarray(logits, jnp.float32), 3))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert ((got > 0).sum(-1) == 3).all()


def test_experts_shard_over_the_tensor_axis():
  """Each tensor device holds whole experts (their d_ff axis unsplit, D over fsdp as for
  every weight); the sharded forward pass equals the one-device one."""
  cfg = models.get_config("tiny", vocab_size=V, n_layers=1, n_experts=4, experts_per_token=2)
  make = lambda: models.Decoder(cfg, rngs=nnx.Rngs(0))
  mesh = mesh_lib.make_mesh("data:2,fsdp:2,tensor:2")
  graphdef, params = sharding.init_params(make, mesh)
  layer = nnx.to_pure_dict(params)["layers"][0]["mlp"]
  assert tuple(layer["expert_gate"].sharding.spec) == ("tensor", "fsdp")  # [E, D, F]
  assert tuple(layer["expert_down"].sharding.spec) == ("tensor", None, "fsdp")  # [E, F, D]
  assert tuple(layer["router"].sharding.spec) == ("fsdp",)  # [D, E]
  toks = jnp.asarray(tokens(n=4, t=16), jnp.int32)
  forward = lambda p, t: nnx.merge(graphdef, p)(t)
  got = jax.jit(sharding.in_mesh(forward, mesh))(params, toks)
  want = jax.jit(lambda t: make()(t))(toks)  # one device (eager op by op is slow)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_lora_refuses_the_experts():
  from jaxpref.models import lora
  cfg = models.get_config("tiny", vocab_size=V, n_layers=1, n_experts=4)
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: models.Decoder(
      cfg, rngs=nnx.Rngs(0)))))
  assert sorted(lora.target_paths(shapes, lora.LoraConfig(2, 4.0))) == [
      f"layers/0/attn/{n}" for n in "koqv"]  # the defaults: attention only
  with pytest.raises(ValueError,
                     match="layers/0/mlp/expert_.*: LoRA on a Mixtral's router and experts"):
    lora.target_paths(shapes, lora.LoraConfig(2, 4.0, ("q", "expert_.*")))


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "mixtral"])
def test_sequence_classification_folder_reads(family, tmp_path):
  """A `*ForSequenceClassification` folder of each new family (Gemma 3's is
  Gemma3TextForSequenceClassification) reads as decoder + score head: the last token's
  reward equals transformers' logit."""
  from jaxpref.models import hf_reward
  causal = hf_model(family, num_local_experts=4) if family == "mixtral" else hf_model(family)
  cls = getattr(transformers, hf.seq_cls_architecture(hf_config.FAMILIES[family]))
  src = cls(causal.config.__class__(**{**causal.config.to_dict(), "num_labels": 1})).eval()
  with torch.no_grad():
    for p in src.parameters():
      p.normal_(0.0, 0.15)
  src.save_pretrained(tmp_path / "cls")
  cfg = hf.read_config(str(tmp_path / "cls"))
  decoder, head = hf_reward.load(str(tmp_path / "cls"), cfg)
  toks = np.random.default_rng(0).integers(3, V, (2, 12))  # no pad (0): the last token scores
  with torch.no_grad():
    want = src(torch.tensor(toks)).logits.numpy()
  h = nnx.jit(lambda m, t: m.hidden(t))(decoder, jnp.asarray(toks, jnp.int32))
  np.testing.assert_allclose(np.asarray(h)[:, -1] @ head, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["gemma3_local_global", "phi3_sliding", "mixtral_top2"])
def test_sharded_bfloat16_round_trip(case, tmp_path):
  """bf16 weights in 40 KB shards load exactly (upcast to float32) and are written back as
  bf16 shards with an index that transformers reads to the same state_dict."""
  src = hf_model(**CASES[case]).to(torch.bfloat16)
  src.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
  assert (tmp_path / "hf" / hf.INDEX_FILE).is_file()
  cfg, model = hf.load(str(tmp_path / "hf"))
  files = hf.save(model, cfg, str(tmp_path / "back"), dtype=jnp.bfloat16, max_shard_size="40KB",
                  ids=IDS)
  assert len(files) > 1
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back",
                                                           dtype=torch.bfloat16)
  a, b = src.state_dict(), back.state_dict()
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k
