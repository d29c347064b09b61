"""RoPE scaling of type "dynamic" (dynamic NTK) against transformers' Llama: the
frequencies, logits under and past the original length, the export round trip, and greedy
KV-cache sampling across the original length equal to transformers' generate."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxpref.models import ModelConfig, hf, sampler  # noqa: E402
from jaxpref.models.layers import rope_frequencies  # noqa: E402

V = 128
ORIGINAL = 16  # max_position_embeddings: dynamic NTK's original length
SCALING = {"rope_type": "dynamic", "factor": 2.0}


def hf_llama(seed=0, family="Llama", **extra):
  """A random float32 LlamaForCausalLM (or `family`ForCausalLM) with dynamic NTK RoPE
  (factor 2, original length 16)."""
  torch.manual_seed(seed)
  cfg = getattr(transformers, f"{family}Config")(
      vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
      max_position_embeddings=ORIGINAL, rope_parameters={**SCALING, "rope_theta": 10000.0},
      **extra)
  model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.5 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model


def tokens(t, n=2, seed=0):
  return np.random.default_rng(seed).integers(0, V, (n, t))


def hf_logits(model, toks):
  with torch.no_grad():
    return model(torch.tensor(toks)).logits.numpy()


def ours(model, toks):
  return np.asarray(model(jnp.asarray(toks, jnp.int32)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = tmp_path_factory.mktemp("dyn") / "hf"
  hf_llama().save_pretrained(path)
  return str(path)


def test_frequencies_equal_transformers():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  cfg = hf_llama().config
  scaling = (2.0, 1.0, 4.0, ORIGINAL, "dynamic")
  for seq_len in (5, 16, 17, 40, 1000):
    want, attention_factor = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=seq_len)
    got = np.asarray(rope_frequencies(16, 10000.0, scaling, jnp.int32(seq_len)))
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-6, atol=0)
    assert attention_factor == 1.0
  # No length (as transformers before any input): the plain frequencies.
  np.testing.assert_array_equal(np.asarray(rope_frequencies(16, 1e4, scaling)),
                                np.asarray(rope_frequencies(16, 1e4)))


def test_config_reads_dynamic(saved):
  cfg, _ = hf.load(saved)
  assert (cfg.rope_scaling_type, cfg.rope_scaling_factor, cfg.rope_original_max_len) == (
      "dynamic", 2.0, ORIGINAL)
  # The legacy top-level rope_scaling {"type": "dynamic"} reads the same.
  legacy = {**json.load(open(f"{saved}/config.json")), "rope_scaling": {"type": "dynamic",
                                                                        "factor": 2.0}}
  legacy.pop("rope_parameters")
  got = hf.config_from_hf(legacy)
  assert (got.rope_scaling_type, got.rope_scaling_factor, got.rope_original_max_len) == (
      "dynamic", 2.0, ORIGINAL)


def test_logits_match_transformers_under_and_past_the_original_length(saved):
  src = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
  cfg, model = hf.load(saved)
  plain = hf.model_from_tensors(dataclasses.replace(cfg, rope_scaling_factor=1.0),
                                hf.read_tensors(saved))
  # Under the original length: plain RoPE, exactly. (transformers' RoPE keeps state
  # between calls: short before long, as its growth/reset rule then equals the stateless one.)
  short = tokens(12)
  np.testing.assert_array_equal(ours(model, short), ours(plain, short))
  diff_short = float(np.abs(ours(model, short) - hf_logits(src, short)).max())
  # Past it (40 > 16): the base grows with the batch's length.
  long = tokens(40)
  got, want = ours(model, long), hf_logits(src, long)
  diff_long = float(np.abs(got - want).max())
  print(f"dynamic NTK: max |logit diff| T=12 {diff_short:.3g}, T=40 {diff_long:.3g} "
        f"(logit scale {np.abs(want).max():.3g})")
  assert diff_short <= 1e-4 and diff_long <= 1e-4
  assert np.abs(ours(plain, long) - want).max() > 1e-2  # the test can tell
  # Back under the original length, transformers resets to the plain frequencies too.
  np.testing.assert_allclose(ours(model, short), hf_logits(src, short), atol=1e-4, rtol=0)


def test_mistral_shares_the_path(tmp_path):
  """Mistral's RoPE is Llama's (transformers' same dynamic update), here with a window."""
  src = hf_llama(family="Mistral", sliding_window=8)
  src.save_pretrained(tmp_path / "hf")
  cfg, model = hf.load(str(tmp_path / "hf"))
  assert (hf.family_of(cfg).model_type, cfg.rope_scaling_type) == ("mistral", "dynamic")
  long = tokens(40)
  diff = float(np.abs(ours(model, long) - hf_logits(src, long)).max())
  print(f"dynamic NTK, Mistral window 8: max |logit diff| T=40 {diff:.3g}")
  assert diff <= 1e-4


def test_export_round_trip(saved, tmp_path):
  cfg, model = hf.load(saved)
  hf.save(model, cfg, str(tmp_path / "back"))
  written = json.load(open(tmp_path / "back" / "config.json"))
  assert written["rope_parameters"] == {**SCALING, "rope_theta": 10000.0}
  assert written["rope_scaling"] == SCALING and written["max_position_embeddings"] == ORIGINAL
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
  long = tokens(40)
  np.testing.assert_array_equal(
      hf_logits(back, long),
      hf_logits(transformers.AutoModelForCausalLM.from_pretrained(saved).eval(), long))
  # A native config whose max_len is not the original length: the export writes the
  # original length as max_position_embeddings, which is where transformers reads it.
  native = dataclasses.replace(cfg, max_len=64)
  hf.save(hf.model_from_tensors(native, hf.read_tensors(saved)), native,
          str(tmp_path / "native"))
  assert json.load(open(tmp_path / "native" / "config.json"))[
      "max_position_embeddings"] == ORIGINAL
  other = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
  np.testing.assert_allclose(hf_logits(other, long), ours(model, long), atol=1e-4, rtol=0)


def test_greedy_sampling_matches_transformers_generate(saved):
  """Prompts of 10, 20 new tokens: the decode steps cross the original length (16); each
  call's base comes from that call's length, cached keys keep theirs, as in generate."""
  src = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
  cfg, model = hf.load(saved)
  prompt = np.random.default_rng(1).integers(0, V, (2, 10))
  n = 20
  with torch.no_grad():
    want = src.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 10, dtype=torch.long),
                        max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        eos_token_id=None, pad_token_id=0).numpy()
  out = np.asarray(sampler.generate(model, prompt, max_new_tokens=n).tokens)
  assert want.shape == (2, 30)
  np.testing.assert_array_equal(out, want)
  assert len(set(want[:, 10:].ravel())) > 2  # more than one repeated token
  # The test can tell: plain RoPE departs once past the original length.
  plain = hf.model_from_tensors(dataclasses.replace(cfg, rope_scaling_factor=1.0),
                                hf.read_tensors(saved))
  assert (np.asarray(sampler.generate(plain, prompt, max_new_tokens=n).tokens) != want).any()


def test_gemma3_refuses_dynamic():
  cfg = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=16, d_ff=96, rope_scaling_type="dynamic", rope_scaling_factor=2.0)
  assert hf.family_of(cfg).model_type == "llama"
  gemma3 = dataclasses.replace(cfg, embed_scale=True, mlp_activation="gelu_tanh",
                               norm_offset=1.0, post_norms=True, qk_norm=True,
                               tie_embeddings=True, rope_local_theta=1e4)
  with pytest.raises(hf.UnsupportedCheckpoint, match="rope_scaling_type='dynamic'"):
    hf.family_of(gemma3)
