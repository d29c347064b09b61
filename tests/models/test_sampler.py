"""The KV-cache sampler: cached logits equal a full forward pass for every family, greedy
output equals transformers' greedy generate, top-k/top-p sample only allowed tokens, stop
tokens and ragged prompts behave, and a sharded run equals one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref.models import Decoder, ModelConfig, sampler
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.parallel import sharding

V = 128
BASE = dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
            d_ff=96, max_len=256)
FAMILIES = {
    "llama": dict(rope_theta=500000.0, rope_scaling_factor=8.0, rope_original_max_len=16),
    "qwen2": dict(qkv_bias=True, rope_theta=1e6, tie_embeddings=True),
    "gemma": dict(tie_embeddings=True, embed_scale=True, mlp_activation="gelu_tanh",
                  norm_offset=1.0, n_kv_heads=1),
    # Window 4 is shorter than the 6-token prompts plus 8 new tokens; three layers: local,
    # global, local.
    "gemma2": dict(tie_embeddings=True, embed_scale=True, mlp_activation="gelu_tanh",
                   norm_offset=1.0, post_norms=True, attn_logit_softcap=3.0,
                   final_logit_softcap=4.0, sliding_window=4, query_pre_attn_scalar=24.0,
                   n_layers=3),
}


def make(family="llama", seed=0, **overrides) -> Decoder:
  """Random weights far from the init (biases and norm scales too), so logits are peaked
  and a wrong bias, norm or window shows."""
  cfg = ModelConfig(**{**BASE, **FAMILIES[family], **overrides})
  model = Decoder(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.15 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def prompts(b=3, p=6, seed=0):
  return np.random.default_rng(seed).integers(0, V, (b, p)).astype(np.int32)


def full_logits(model, tokens):
  """The plain forward pass over whole sequences [B, T] (right padding cannot reach back)."""
  return np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32)))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_logits_equal_full_forward(family):
  model = make(family)
  lens = np.array([6, 2, 4])
  out = sampler.generate(model, prompts(), lens, max_new_tokens=8, temperature=1.0,
                         rng=jax.random.key(3), return_logits=True)
  assert out.tokens.shape == (3, 14) and out.logits.shape == (3, 8, V)
  np.testing.assert_array_equal(out.lengths, lens + 8)
  full = full_logits(model, out.tokens)
  for b in range(3):
    np.testing.assert_array_equal(out.tokens[b, :lens[b]], prompts()[b, :lens[b]])
    want = full[b, lens[b] - 1:lens[b] + 7]  # the logits each new token came from
    np.testing.assert_allclose(np.asarray(out.logits[b]), want, atol=1e-4, rtol=0)
    assert np.all(np.asarray(out.tokens[b, int(out.lengths[b]):]) == 0)
  if family == "gemma2":  # the test can tell: without the window the logits move
    unwindowed = nnx.merge(*nnx.split(model))
    unwindowed.config = dataclasses.replace(model.config, sliding_window=0)
    assert np.abs(full_logits(unwindowed, out.tokens) - full).max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gqa_untied", "gqa_llama3_rope", "qwen2_tied", "gemma",
                                  "gemma2_sliding_softcap"])
def test_greedy_matches_transformers_generate(case, tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from test_hf_parity import CASES, hf_model
  from jaxpref.models import hf
  src = hf_model(**CASES[case])
  src.save_pretrained(tmp_path / "hf")
  _, model = hf.load(str(tmp_path / "hf"))
  prompt = np.random.default_rng(1).integers(0, 128, (2, 10))
  n = 20  # 30 tokens in all: past gemma2's window of 8
  with torch.no_grad():
    want = src.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 10, dtype=torch.long),
                        max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        eos_token_id=None, pad_token_id=0).numpy()
  out = sampler.generate(model, prompt, max_new_tokens=n)
  assert want.shape == (2, 30)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
  assert len(set(want[:, 10:].ravel())) > 2  # more than one repeated token


@pytest.fixture(scope="module")
def llama():
  return make("llama", seed=4)


def test_top_k_1_equals_greedy(llama):
  greedy = sampler.generate(llama, prompts(), max_new_tokens=6)
  top1 = sampler.generate(llama, prompts(), max_new_tokens=6, temperature=0.7, top_k=1,
                          rng=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))


def np_allowed(logits, temperature, top_k, top_p):
  """float64 reference: the set of token ids top-k then top-p (HF's rules) allows."""
  z = logits.astype(np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  keep = order[:top_k] if top_k else order
  p = np.exp(z[keep] - z[keep].max())
  p /= p.sum()
  before = np.cumsum(p) - p
  return set(keep[before < top_p].tolist())


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (5, 0.8)])
def test_samples_only_allowed_tokens(llama, top_k, top_p):
  out = sampler.generate(llama, prompts(b=4), max_new_tokens=10, temperature=1.5,
                         top_k=top_k, top_p=top_p, rng=jax.random.key(7), return_logits=True)
  new = np.asarray(out.tokens[:, 6:])
  sizes = []
  for b in range(4):
    for s in range(10):
      allowed = np_allowed(np.asarray(out.logits[b, s]), 1.5, top_k, top_p)
      assert new[b, s] in allowed, (b, s)
      sizes.append(len(allowed))
  assert max(sizes) > 1  # sampling had a choice to get wrong
  # filter_logits itself against the reference on arbitrary logits.
  z = np.random.default_rng(0).normal(0, 3, (5, V)).astype(np.float32)
  got = np.asarray(sampler.filter_logits(jnp.asarray(z), 1.5, top_k, top_p))
  for row, g in zip(z, got):
    assert set(np.flatnonzero(np.isfinite(g)).tolist()) == np_allowed(row, 1.5, top_k, top_p)


def test_sampling_is_reproducible_and_varies_with_rng(llama):
  run = lambda seed: np.asarray(sampler.generate(
      llama, prompts(), max_new_tokens=8, temperature=1.0, rng=jax.random.key(seed)).tokens)
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.array_equal(run(1), run(2))


def test_stop_tokens_end_a_sequence(llama):
  base = np.asarray(sampler.generate(llama, prompts(), max_new_tokens=8).tokens)
  stop = int(base[1, 6 + 2])  # row 1's third new token
  out = sampler.generate(llama, prompts(), max_new_tokens=8, stop_tokens=[stop], pad_id=V - 1)
  tokens, lengths, finished = map(np.asarray, out[:3])
  for b in range(3):
    hits = np.flatnonzero(base[b, 6:] == stop)
    if hits.size:  # ends on its first stop token, kept; the rest is padding
      end = 6 + hits[0] + 1
      assert finished[b] and lengths[b] == end
      np.testing.assert_array_equal(tokens[b, :end], base[b, :end])
      assert np.all(tokens[b, end:] == V - 1)
    else:
      assert not finished[b] and lengths[b] == 14
      np.testing.assert_array_equal(tokens[b], base[b])
  assert finished[1] and lengths[1] <= 9


@pytest.mark.slow
def test_ragged_and_left_padded_prompts_equal_each_alone(llama):
  prompt, lens = prompts(b=3, p=7, seed=2), np.array([7, 2, 5])
  out = sampler.generate(llama, prompt, lens, max_new_tokens=5)
  for b in range(3):
    # Alone: the row by itself (one shape for all three, so one compile).
    alone = sampler.generate(llama, prompt[b:b + 1], lens[b:b + 1], max_new_tokens=5)
    np.testing.assert_array_equal(np.asarray(out.tokens[b, :lens[b] + 5]),
                                  np.asarray(alone.tokens[0, :lens[b] + 5]))
  left = np.zeros_like(prompt)
  for b in range(3):
    left[b, 7 - lens[b]:] = prompt[b, :lens[b]]
  out_left = sampler.generate(llama, left, lens, max_new_tokens=5, left_padded=True)
  np.testing.assert_array_equal(np.asarray(out_left.tokens), np.asarray(out.tokens))


@pytest.mark.slow
def test_sharded_run_equals_one_device():
  assert jax.device_count() == 8, "conftest sets --xla_force_host_platform_device_count=8"
  make_module = lambda: make("gemma2", seed=5)
  one = make_module()
  mesh = mesh_lib.make_mesh("data:2,fsdp:2,tensor:2")
  graphdef, params = sharding.init_params(make_module, mesh)
  assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(params))
  kw = dict(prompt_lengths=np.array([6, 3, 5, 1, 6, 2, 4, 6]), max_new_tokens=6,
            temperature=1.0, top_k=20, rng=jax.random.key(9), return_logits=True)
  want = sampler.generate(one, prompts(b=8), **kw)
  got = sampler.generate((graphdef, params), prompts(b=8), mesh=mesh, **kw)
  assert got.tokens.sharding.spec[0] == mesh_lib.BATCH_AXES
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-4)


def test_num_samples_equals_repeated_prompts(llama):
  """Filling each prompt's cache once and copying it samples what repeating the prompts
  does: same rows, same order (prompt i's j-th sample at row i * k + j), same logits."""
  prompt, lens = prompts(b=3, p=6, seed=3), np.array([6, 2, 4])
  kw = dict(max_new_tokens=6, temperature=1.0, rng=jax.random.key(5), return_logits=True)
  want = sampler.generate(llama, np.repeat(prompt, 4, axis=0), np.repeat(lens, 4), **kw)
  got = sampler.generate(llama, prompt, lens, num_samples=4, **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-5)
  assert len({tuple(r) for r in np.asarray(got.tokens)[:4, 6:]}) > 1  # the copies differ
  with pytest.raises(ValueError, match="num_samples must be >= 1"):
    sampler.generate(llama, prompt, lens, num_samples=0)


@pytest.mark.slow
def test_num_samples_under_a_mesh():
  """8 prompts fill their caches sharded and copy them in place; 3 prompts do not divide
  over data:8, so they are repeated first: both equal one device."""
  model = make("llama", seed=4)
  mesh = mesh_lib.make_mesh("data:8")
  graphdef, params = nnx.split(model)
  kw = dict(max_new_tokens=5, temperature=1.0, rng=jax.random.key(2))
  for b, k in ((8, 2), (3, 8)):
    prompt = prompts(b=b, p=6, seed=b)
    want = sampler.generate(model, prompt, num_samples=k, **kw)
    got = sampler.generate((graphdef, params), prompt, num_samples=k, mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))


def test_errors_name_the_argument(llama):
  with pytest.raises(ValueError, match="prompt_lengths must be \\[3\\] values in 1..6"):
    sampler.generate(llama, prompts(), [6, 0, 2])
  with pytest.raises(ValueError, match="pass rng"):
    sampler.generate(llama, prompts(), temperature=1.0)
  with pytest.raises(ValueError, match="top_p must be in"):
    sampler.generate(llama, prompts(), top_p=0.0)
  with pytest.raises(ValueError, match="batch 3 is not divisible"):
    sampler.generate(llama, prompts(), mesh=mesh_lib.make_mesh("data:8"))
