"""jaxpref.models.hf against transformers' Llama, Mistral, Qwen2, Qwen3, Gemma and Gemma 2
causal LMs: same
logits on the same tokens, exact tensor round trips (single-file, sharded, bf16, the
jaxpref-convert CLI), and clear errors for checkpoints the Decoder cannot represent."""

import dataclasses
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxpref.models import convert, hf  # noqa: E402

pytestmark = pytest.mark.slow

V = 128
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
}


def hf_model(tie=False, kv_heads=2, theta=10000.0, scaling=None, seed=0, family="llama",
             layers=2, **extra):
  """A random float32 causal LM of `family`. Weights (norm scales and biases included) are
  drawn far from the default init so a wrong transpose, head split, RoPE half or norm
  offset shows in the logits."""
  torch.manual_seed(seed)
  rope = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
  config_cls, model_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[family])
  cfg = config_cls(
      vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, rms_norm_eps=1e-5,
      max_position_embeddings=256, tie_word_embeddings=tie, rope_parameters=rope, **extra)
  model = model_cls(cfg).eval()
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


def state_dict_equal(a, b):
  a, b = a.state_dict(), b.state_dict()
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


CASES = {
    "gqa_untied": dict(tie=False, kv_heads=2),
    "gqa_tied": dict(tie=True, kv_heads=2),
    "mha_untied_theta5e5": dict(tie=False, kv_heads=4, theta=500000.0),
    # Llama 3.1 scaling; with head_dim 16 and an original context of 64 the RoPE wavelengths
    # fall in all three bands (kept, interpolated, stretched by `factor`).
    "gqa_llama3_rope": dict(tie=True, kv_heads=2, theta=500000.0, scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    # Llama's attention_bias (q/k/v and o biases) and linear RoPE scaling (positions / 4).
    "llama_attention_bias": dict(tie=False, kv_heads=2, attention_bias=True),
    "llama_linear_rope": dict(tie=True, kv_heads=2, scaling=dict(rope_type="linear", factor=4.0)),
    # Every layer local, with a window (8) shorter than the 40 tokens.
    "mistral_sliding": dict(family="mistral", tie=False, kv_heads=2, sliding_window=8),
    "qwen2_tied": dict(family="qwen2", tie=True, kv_heads=2, theta=1e6),
    "qwen3_qk_norm": dict(family="qwen3", tie=True, kv_heads=2, theta=1e6),
    "qwen3_attention_bias": dict(family="qwen3", tie=False, kv_heads=1, attention_bias=True),
    "gemma": dict(family="gemma", tie=True, kv_heads=1),
    # Three layers: local, global, local. The window (8) is shorter than the 40 tokens and
    # the caps are small enough for tanh to bend most scores and logits; the query scalar
    # differs from head_dim (16) so the wrong attention scale would show.
    "gemma2_sliding_softcap": dict(
        family="gemma2", tie=True, kv_heads=2, layers=3, sliding_window=8,
        attn_logit_softcapping=3.0, final_logit_softcapping=4.0, query_pre_attn_scalar=24,
        attn_implementation="eager"),
}
# Each family once from a single file; sharded files only change the reading, so Llama and
# one other family cover them.
RUNS = [(c, False) for c in CASES] + [(c, True) for c in CASES if "family" not in CASES[c]]
RUNS.append(("gemma2_sliding_softcap", True))


@pytest.mark.parametrize("case,sharded", RUNS,
                         ids=[f"{c}-{'sharded' if s else 'single'}" for c, s in RUNS])
def test_logits_match_transformers_and_round_trip(case, sharded, tmp_path):
  src = hf_model(**CASES[case])
  kw = dict(max_shard_size="40KB") if sharded else {}
  src.save_pretrained(tmp_path / "hf", **kw)
  if sharded:
    assert os.path.isfile(tmp_path / "hf" / hf.INDEX_FILE)
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 1

  cfg, model = hf.load(str(tmp_path / "hf"))
  want_cfg = CASES[case]
  assert (cfg.tie_embeddings, cfg.n_kv_heads) == (want_cfg["tie"], want_cfg["kv_heads"])
  assert cfg.rope_theta == want_cfg.get("theta", 10000.0)
  assert cfg.rope_scaling_factor == (want_cfg.get("scaling") or {}).get("factor", 1.0)
  assert (cfg.attn_bias, cfg.qk_norm) == (want_cfg.get("attention_bias", False),
                                          want_cfg.get("family") == "qwen3")
  assert hf.family_of(cfg).model_type == want_cfg.get("family", "llama")
  if case == "mistral_sliding":  # the window is read and matters
    assert (cfg.sliding_window, cfg.sliding_window_pattern) == (8, 0)
    other = hf.model_from_tensors(dataclasses.replace(cfg, sliding_window=0),
                                  hf.read_tensors(str(tmp_path / "hf")))
    assert np.abs(np.asarray(other(jnp.asarray(tokens(), jnp.int32))) -
                  hf_logits(src, tokens())).max() > 1e-2
  if case.startswith("gemma2"):
    assert (cfg.sliding_window, cfg.attn_logit_softcap, cfg.final_logit_softcap,
            cfg.query_pre_attn_scalar) == (8, 3.0, 4.0, 24.0)
    assert [cfg.is_local(i) for i in range(3)] == [True, False, True]
    # The test can tell: without the window, or without either cap, the logits move.
    tensors = hf.read_tensors(str(tmp_path / "hf"))
    for change in (dict(sliding_window=0), dict(attn_logit_softcap=0.0),
                   dict(final_logit_softcap=0.0)):
      other = hf.model_from_tensors(dataclasses.replace(cfg, **change), tensors)
      assert np.abs(np.asarray(other(jnp.asarray(tokens(), jnp.int32))) -
                    hf_logits(src, tokens())).max() > 1e-2, change
  toks = tokens()
  got = np.asarray(model(jnp.asarray(toks, jnp.int32)))
  want = hf_logits(src, toks)
  diff = float(np.abs(got - want).max())
  print(f"{case} sharded={sharded}: max |logit diff| = {diff:.3g} "
        f"(logit scale {np.abs(want).max():.3g})")
  assert diff <= 1e-4

  hf.save(model, cfg, str(tmp_path / "back"))
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
  state_dict_equal(src, back)
  np.testing.assert_array_equal(hf_logits(back, toks), want)


def test_bfloat16_checkpoint_upcasts_exactly(tmp_path):
  src = hf_model().to(torch.bfloat16)
  src.save_pretrained(tmp_path / "hf")
  cfg, model = hf.load(str(tmp_path / "hf"))
  assert model.embed[...].dtype == jnp.float32
  q_proj = src.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(model.layers[1].attn.q[...]).reshape(64, -1).T, q_proj)
  hf.save(model, cfg, str(tmp_path / "back"), dtype=jnp.bfloat16)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
  state_dict_equal(src, back)


def test_cli_round_trip(tmp_path):
  src = hf_model(tie=True)
  src.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
  env = {**os.environ, "PYTHONPATH": REPO}
  for cmd in (["to-jaxpref", tmp_path / "hf", tmp_path / "jp"],
              ["to-hf", tmp_path / "jp", tmp_path / "back"]):
    proc = subprocess.run([sys.executable, "-m", "jaxpref.models.convert", *map(str, cmd)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
  assert os.path.isfile(tmp_path / "jp" / convert.CONFIG_FILE)
  cfg, model = convert.load_jaxpref(str(tmp_path / "jp"))
  toks = tokens(seed=1)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks, jnp.int32))),
                             hf_logits(src, toks), atol=1e-4, rtol=0)
  state_dict_equal(src, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back"))


def test_cli_error_is_one_line(tmp_path, capsys):
  assert convert.main(["to-jaxpref", str(tmp_path), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert "no config.json" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------


def saved(tmp_path, edit_config=None, edit_tensors=None, tie=False):
  """A saved tiny HF model, its config.json and tensors optionally edited."""
  path = tmp_path / "hf"
  hf_model(tie=tie).save_pretrained(path)
  if edit_config:
    file = path / "config.json"
    file.write_text(json.dumps(edit_config(json.loads(file.read_text()))))
  if edit_tensors:
    tensors = hf.read_tensors(str(path))
    edit_tensors(tensors)
    from safetensors.numpy import save_file
    save_file(tensors, str(path / hf.SINGLE_FILE), metadata={"format": "pt"})
  return str(path)


def test_unsupported_architecture(tmp_path):
  gpt2 = lambda c: {**c, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
  with pytest.raises(hf.UnsupportedCheckpoint,
                     match="model_type='gpt2'.*supported: llama \\(LlamaForCausalLM\\), mistral "
                           "\\(MistralForCausalLM\\), mixtral \\(MixtralForCausalLM\\), qwen2 "
                           "\\(Qwen2ForCausalLM\\), qwen3 "
                           "\\(Qwen3ForCausalLM\\), gemma \\(GemmaForCausalLM\\), gemma2"):
    hf.load(saved(tmp_path, gpt2))
  # A family's model_type with another head (sequence classification) is refused too.
  cls = lambda c: {**c, "architectures": ["LlamaForSequenceClassification"]}
  with pytest.raises(hf.UnsupportedCheckpoint, match="LlamaForSequenceClassification"):
    hf.load(saved(tmp_path / "cls", cls))


@pytest.mark.parametrize("edit,match", [
    (lambda c: {**c, "mlp_bias": True}, "mlp_bias=True"),
    (lambda c: {**c, "hidden_act": "gelu"}, "hidden_act='gelu'"),
    (lambda c: {**c, "rope_parameters": {"rope_type": "yarn", "factor": 2.0,
                                         "rope_theta": 1e4}}, "RoPE scaling.*yarn"),
    # (legacy {"type": "dynamic"} is read: tests/models/test_rope_dynamic.py)
    (lambda c: {**c, "rope_scaling": {"type": "longrope", "factor": 2.0}},
     "rope_scaling.rope_type='longrope'"),
], ids=["mlp_bias", "gelu", "yarn_rope", "legacy_longrope_rope"])
def test_unsupported_llama_features(tmp_path, edit, match):
  with pytest.raises(hf.UnsupportedCheckpoint, match=match):
    hf.load(saved(tmp_path, edit))


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
  def edit(t):
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  with pytest.raises(hf.UnsupportedCheckpoint,
                     match=r"missing: \['model.layers.1.mlp.up_proj.weight'\]; "
                           r"unexpected: \['model.layers.0.self_attn.q_proj.bias'\]"):
    hf.load(saved(tmp_path, edit_tensors=edit))


def test_tied_checkpoint_storing_lm_head(tmp_path):
  """Accepted when the stored head is the embedding; refused when it is not."""
  def same(t):
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
  cfg, _ = hf.load(saved(tmp_path / "a", edit_tensors=same, tie=True))
  assert cfg.tie_embeddings

  def other(t):
    t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1
  with pytest.raises(hf.UnsupportedCheckpoint, match="lm_head.weight differs"):
    hf.load(saved(tmp_path / "b", edit_tensors=other, tie=True))


def test_wrong_shape_is_named(tmp_path):
  def edit(t):
    t["model.norm.weight"] = np.ones(32, np.float32)
  with pytest.raises(hf.UnsupportedCheckpoint, match="model.norm.weight has shape"):
    hf.load(saved(tmp_path, edit_tensors=edit))


def test_no_safetensors(tmp_path):
  path = saved(tmp_path)
  os.remove(os.path.join(path, hf.SINGLE_FILE))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.load(path)


def test_config_mapping_old_and_new_rope_keys():
  """transformers-4 configs (top-level rope_theta, rope_scaling) and transformers-5 ones
  (rope_parameters) give the same ModelConfig, and config_to_hf maps back."""
  base = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=V,
              hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=128)
  old = hf.config_from_hf({**base, "rope_theta": 5e5,
                           "rope_scaling": {**scaling, "rope_type": "llama3"}})
  new = hf.config_from_hf({**base, "rope_parameters": {**scaling, "rope_type": "llama3",
                                                       "rope_theta": 5e5}})
  assert old == new
  assert (new.rope_theta, new.rope_scaling_factor, new.rope_original_max_len) == (5e5, 8.0, 128)
  assert new.head_dim == 16 and new.max_len == 512 and not new.tie_embeddings
  assert hf.config_from_hf(hf.config_to_hf(new)) == new


def _as(family, **keys):
  """A config.json edit: the saved Llama's shapes under another family's name."""
  arch = hf.FAMILIES[family].architecture
  return lambda c: {**c, "model_type": family, "architectures": [arch], **keys}


@pytest.mark.parametrize("edit,match", [
    (_as("qwen2", use_sliding_window=True), "use_sliding_window=True"),
    (_as("gemma", hidden_act="relu"), "hidden_act='relu'"),
    (_as("gemma2", attention_bias=True), "attention_bias=True"),
    (_as("gemma2", hidden_activation="gelu"), "hidden_activation='gelu'"),
    (_as("gemma2", sliding_window=4, layer_types=["full_attention", "sliding_attention"]),
     "layer_types.*not one"),
    (_as("gemma2", sliding_window=None), "sliding_window=None"),
    (_as("llama", sliding_window=4, layer_types=["sliding_attention"] * 2),
     r"sliding_window=4 \(llama: 0\)"),
    (_as("gemma", hidden_act="gelu", rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
     r"rope_scaling_factor=8.0 \(gemma: 1.0\)"),
], ids=["qwen2_sliding", "gemma_relu", "gemma2_bias", "gemma2_exact_gelu",
        "gemma2_odd_layer_types", "gemma2_no_window", "llama_sliding", "gemma_llama3_rope"])
def test_unsupported_family_features(tmp_path, edit, match):
  with pytest.raises(hf.UnsupportedCheckpoint, match=match):
    hf.config_from_hf(edit(json.loads(open(os.path.join(saved(tmp_path), "config.json")).read())))


def test_family_tensors_missing_are_listed(tmp_path):
  """A Llama's tensors under a Qwen2 config: the q/k/v biases are named as missing."""
  path = saved(tmp_path, _as("qwen2"))
  with pytest.raises(hf.UnsupportedCheckpoint, match=r"Qwen2ForCausalLM.*missing: \['model."
                     r"layers.0.self_attn.k_proj.bias', 'model.layers.0.self_attn.q_proj.bias'"):
    hf.load(path)


@pytest.mark.parametrize("preset", ["llama3_8b", "qwen2_0_5b", "qwen2_5_7b", "gemma_2b",
                                    "gemma_7b", "gemma2_2b", "gemma2_9b", "gemma2_27b"])
def test_preset_configs_round_trip_through_config_json(preset):
  from jaxpref import models
  cfg = models.get_config(preset)
  hf_cfg = hf.config_to_hf(cfg)
  assert hf_cfg["model_type"] == preset.split("_")[0].replace("llama3", "llama")
  assert hf.config_from_hf(hf_cfg) == cfg
  # transformers builds the same family from it (config only, no weights).
  built = transformers.AutoConfig.for_model(**{k: v for k, v in hf_cfg.items()
                                              if k not in ("architectures", "torch_dtype")})
  assert type(built).__name__.lower().startswith(hf_cfg["model_type"])


def test_save_refuses_a_config_of_no_family():
  from jaxpref import models
  cfg = models.get_config("tiny", post_norms=True)  # Gemma 2 norms on a Llama
  with pytest.raises(hf.UnsupportedCheckpoint, match=r"not llama: post_norms=True.*not gemma2: "
                     r"embed_scale=False"):
    hf.config_to_hf(cfg)
