"""jaxpref.models: the decoder against a float64 numpy forward, its masking
contracts (causal, padding, packing), RoPE/GQA references, the family switches (Qwen2,
Gemma, Gemma 2), presets and parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref import models
from jaxpref.models.decoder import Attention, rope

V = 64
CFG = models.get_config("tiny", vocab_size=V, max_len=32)  # GQA: 4 query heads, 2 K/V heads


def make(cfg=CFG, seed=0):
  return models.Decoder(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model():
  return make()


def tokens(n, t, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(1, V, (n, t)), jnp.int32)


def finite(x):
  return bool(np.isfinite(np.asarray(x)).all())


# ---------------------------------------------------------------------------------------------
# float64 numpy references, written from the formulas (HF Llama conventions)
# ---------------------------------------------------------------------------------------------


def np_rope(x, pos, theta):
  """Rotate-half RoPE: x [N, T, H, Dh], pos [N, T]."""
  half = x.shape[-1] // 2
  ang = np.asarray(pos, np.float64)[..., None] * theta ** (-np.arange(half) / half)
  cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_attention(x, w, cfg, pos, allowed):
  """x [N, T, D]; w = (q, k, v, o) weights; allowed bool[N, T, T] (query, key)."""
  wq, wk, wv, wo = w
  q = np_rope(np.einsum("ntd,dhk->nthk", x, wq), pos, cfg.rope_theta)
  k = np_rope(np.einsum("ntd,dhk->nthk", x, wk), pos, cfg.rope_theta)
  v = np.einsum("ntd,dhk->nthk", x, wv)
  groups = cfg.n_heads // cfg.n_kv_heads
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # head h reads K/V h // groups
  s = np.einsum("nqhk,nshk->nhqs", q, k) / np.sqrt(cfg.head_dim)
  s = np.where(allowed[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("nhqs,nshk,hkd->nqd", p, v, wo)


def np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def np_forward(m, toks, seg, pos):
  """Whole decoder in float64; rows of padding queries are meaningless and not compared."""
  cfg = m.config
  f64 = lambda p: np.asarray(p[...], np.float64)
  t = toks.shape[1]
  allowed = (np.tril(np.ones((t, t), bool)) & (seg[:, :, None] == seg[:, None, :])
             & (seg[:, :, None] > 0))
  allowed |= np.eye(t, dtype=bool)  # keep padding rows finite in the reference
  x = f64(m.embed)[np.asarray(toks)]
  for layer in m.layers:
    a = layer.attn
    h = np_rms(x, f64(layer.attn_norm.scale), cfg.norm_eps)
    x = x + np_attention(h, [f64(p) for p in (a.q, a.k, a.v, a.o)], cfg, pos, allowed)
    h = np_rms(x, f64(layer.mlp_norm.scale), cfg.norm_eps)
    g = h @ f64(layer.mlp.gate)
    x = x + (g / (1 + np.exp(-g)) * (h @ f64(layer.mlp.up))) @ f64(layer.mlp.down)
  head = f64(m.embed).T if cfg.tie_embeddings else f64(m.lm_head)
  return np_rms(x, f64(m.final_norm.scale), cfg.norm_eps) @ head


# ---------------------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------------------


def test_functional_jit_shape_and_dtype(model):
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  x = tokens(3, 10)
  out = f(state, x)
  assert out.shape == (3, 10, V) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_matches_float64_numpy_forward(tie):
  """Packed row (two segments, positions restarting) plus a padded row, against numpy."""
  m = make(models.get_config("tiny", vocab_size=V, tie_embeddings=tie), seed=1)
  toks = tokens(2, 10, seed=1)
  seg = np.array([[1] * 6 + [2] * 4, [1] * 7 + [0] * 3], np.int32)
  pos = np.array([list(range(6)) + list(range(4)), list(range(10))], np.int32)
  got = m(toks, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
  assert finite(got)
  real = seg > 0
  np.testing.assert_allclose(np.asarray(got)[real], np_forward(m, toks, seg, pos)[real],
                             rtol=1e-4, atol=1e-4)


def test_causal(model):
  a = tokens(2, 12, seed=1)
  b = a.at[:, 7:].set(5)
  np.testing.assert_allclose(model(a)[:, :7], model(b)[:, :7], atol=1e-6)
  assert not np.allclose(model(a)[:, 7:], model(b)[:, 7:])


def test_padding_does_not_leak(model):
  x = tokens(1, 6, seed=2)
  alone = model(x)
  padded = jnp.concatenate([x, jnp.full((1, 4), 3, jnp.int32)], axis=1)
  out = model(padded, segment_ids=jnp.array([[1] * 6 + [0] * 4], jnp.int32))
  assert finite(out)
  np.testing.assert_allclose(out[:, :6], alone, atol=1e-5)
  # Without segment ids, all-ones segments and explicit arange positions change nothing.
  np.testing.assert_allclose(model(x, segment_ids=jnp.ones((1, 6), jnp.int32),
                                   positions=jnp.arange(6)[None]), alone, atol=1e-6)


def test_packed_segments_equal_each_alone(model):
  x, y = tokens(1, 6, seed=2), tokens(1, 4, seed=3)
  seg = jnp.array([[1] * 6 + [2] * 4], jnp.int32)
  pos = jnp.array([list(range(6)) + list(range(4))], jnp.int32)
  out = model(jnp.concatenate([x, y], axis=1), segment_ids=seg, positions=pos)
  assert finite(out)
  np.testing.assert_allclose(out[:, :6], model(x), atol=1e-5)
  np.testing.assert_allclose(out[:, 6:], model(y), atol=1e-5)


def test_all_padding_row_gives_finite_values_and_gradients(model):
  graphdef, state = nnx.split(model)
  toks = tokens(2, 8, seed=4)
  seg = jnp.array([[1] * 5 + [0] * 3, [0] * 8], jnp.int32)

  def loss(s):
    logits = nnx.merge(graphdef, s)(toks, segment_ids=seg)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * (seg > 0))

  value, grads = jax.jit(jax.value_and_grad(loss))(state)
  assert finite(value) and all(finite(g) for g in jax.tree.leaves(grads))


def test_hidden_times_lm_head_weight_is_call():
  for tie in (True, False):
    m = make(models.get_config("tiny", vocab_size=V, tie_embeddings=tie))
    x = tokens(2, 5)
    h, w = m.hidden(x), m.lm_head_weight()
    assert h.shape == (2, 5, CFG.d_model) and h.dtype == jnp.float32
    assert w.shape == (CFG.d_model, V)
    np.testing.assert_allclose(m(x), h @ w, rtol=1e-6, atol=1e-6)
    assert hasattr(m, "lm_head") != tie
    if tie:
      np.testing.assert_array_equal(w, m.embed[...].T)


def test_bfloat16_compute_keeps_float32_params_and_logits(model):
  m = make(models.get_config("tiny", vocab_size=V, dtype="bfloat16"))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  x = tokens(2, 8)
  out = m(x, segment_ids=jnp.array([[1] * 8, [1] * 5 + [0] * 3], jnp.int32))
  assert out.dtype == jnp.float32 and finite(out)
  np.testing.assert_allclose(out[0], model(x)[0], atol=0.05)  # same seed, same weights


# ---------------------------------------------------------------------------------------------
# Attention pieces against references
# ---------------------------------------------------------------------------------------------


def test_gqa_attention_matches_numpy_reference():
  cfg = models.get_config("tiny", vocab_size=V, n_heads=4, n_kv_heads=2)
  attn = Attention(cfg, nnx.Rngs(1))
  rng = np.random.default_rng(1)
  n, t = 2, 7
  x = rng.normal(size=(n, t, cfg.d_model))
  pos = np.broadcast_to(np.arange(t), (n, t))
  causal = np.broadcast_to(np.tril(np.ones((t, t), bool)), (n, t, t))
  got = attn(jnp.asarray(x, jnp.float32), jnp.asarray(pos), jnp.asarray(causal[:, None]))
  w = [np.asarray(p[...], np.float64) for p in (attn.q, attn.k, attn.v, attn.o)]
  np.testing.assert_allclose(got, np_attention(x, w, cfg, pos, causal), rtol=1e-4, atol=1e-5)


def test_rope_matches_numpy_and_is_relative():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8))
  pos = rng.integers(0, 1000, (2, 5))
  got = rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos, jnp.int32), 1e4)
  np.testing.assert_allclose(got, np_rope(x, pos, 1e4), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(rope(jnp.asarray(x, jnp.float32), jnp.zeros((2, 5), jnp.int32), 1e4),
                             x, rtol=1e-6)  # position 0 is the identity
  # q.k after RoPE depends on the position difference only (RoFormer, eq. 16).
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))
  dot = lambda i, j: float(jnp.sum(rope(q, jnp.array([[i]]), 1e4) * rope(k, jnp.array([[j]]), 1e4)))
  assert abs(dot(3, 1) - dot(10, 8)) < 1e-4 and abs(dot(3, 1) - dot(3, 2)) > 1e-3


# ---------------------------------------------------------------------------------------------
# Parameters, presets, config
# ---------------------------------------------------------------------------------------------


def test_parameter_names_and_shapes():
  """The names a Hugging Face checkpoint converter maps onto (q_proj -> attn.q, ...)."""
  cfg = models.get_config("tiny", vocab_size=V, tie_embeddings=False, n_layers=1)
  flat = {tuple(map(str, k)): v[...].shape for k, v in nnx.to_flat_state(nnx.state(make(cfg)))}
  d, h, kv, dh, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  assert flat == {
      ("embed",): (V, d), ("final_norm", "scale"): (d,), ("lm_head",): (d, V),
      ("layers", "0", "attn", "q"): (d, h, dh), ("layers", "0", "attn", "k"): (d, kv, dh),
      ("layers", "0", "attn", "v"): (d, kv, dh), ("layers", "0", "attn", "o"): (h, dh, d),
      ("layers", "0", "attn_norm", "scale"): (d,), ("layers", "0", "mlp_norm", "scale"): (d,),
      ("layers", "0", "mlp", "gate"): (d, f), ("layers", "0", "mlp", "up"): (d, f),
      ("layers", "0", "mlp", "down"): (f, d)}


def test_param_counts():
  for tie in (True, False):
    cfg = models.get_config("tiny", tie_embeddings=tie)
    assert models.param_count(cfg) == models.count_params(make(cfg))
  # Published sizes, from the config alone (never instantiated).
  assert models.param_count(models.get_config("llama3_8b")) == 8_030_261_248
  assert models.param_count(models.get_config("llama2_7b")) == 6_738_415_616


def test_presets():
  c = models.get_config("llama3_8b")
  assert (c.rope_theta, c.n_kv_heads, c.tie_embeddings) == (500000.0, 8, False)
  assert models.get_config("tiny", vocab_size=1000).vocab_size == 1000
  assert set(models.PRESETS) >= {"tiny", "small", "llama2_7b", "llama3_8b"}
  with pytest.raises(ValueError, match="presets: tiny, small"):
    models.get_config("huge")
  with pytest.raises(ValueError, match="d_modle.*fields:.*d_model"):
    models.get_config("tiny", d_modle=32)


@pytest.mark.parametrize("overrides,field", [
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"), (dict(d_model=0), "d_model"),
    (dict(vocab_size=-1), "vocab_size"), (dict(n_layers=0), "n_layers"),
    (dict(head_dim=15), "head_dim"), (dict(dtype="int8"), "dtype"),
    (dict(rope_theta=0.0), "rope_theta"), (dict(norm_eps=-1e-6), "norm_eps"),
    (dict(init_std=0.0), "init_std"), (dict(mlp_activation="relu"), "mlp_activation"),
    (dict(sliding_window=-1), "sliding_window"), (dict(final_logit_softcap=-1.0),
                                                  "final_logit_softcap")])
def test_config_errors_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    models.get_config("tiny", **overrides)


# ---------------------------------------------------------------------------------------------
# Family switches (Qwen2, Gemma, Gemma 2); their parity with transformers: test_hf_parity.py
# ---------------------------------------------------------------------------------------------

GEMMA2_TINY = dict(vocab_size=V, embed_scale=True, mlp_activation="gelu_tanh", norm_offset=1.0,
                   post_norms=True, attn_logit_softcap=2.0, final_logit_softcap=3.0,
                   sliding_window=3, query_pre_attn_scalar=24.0, n_layers=3, qkv_bias=True)


def test_published_param_counts():
  """Counts from the released checkpoints' config.json shapes (Hugging Face: Qwen/Qwen2-0.5B,
  Qwen/Qwen2.5-7B, google/gemma-2b, -7b, google/gemma-2-2b, -9b, -27b); each equals the
  checkpoint's published parameter count (494M, 7.61B, 2.51B, 8.54B, 2.61B, 9.24B, 27.2B)."""
  published = {"qwen2_0_5b": 494_032_768, "qwen2_5_7b": 7_615_616_512,
               "gemma_2b": 2_506_172_416, "gemma_7b": 8_537_680_896,
               "gemma2_2b": 2_614_341_888, "gemma2_9b": 9_241_705_984,
               "gemma2_27b": 27_227_128_320}
  for name, count in published.items():
    assert models.param_count(models.get_config(name)) == count, name
  g = models.get_config("gemma2_2b")
  assert [g.is_local(i) for i in range(4)] == [True, False, True, False]


def test_switch_param_counts_and_names():
  cfg = models.get_config("tiny", **GEMMA2_TINY)
  m = make(cfg)
  assert models.param_count(cfg) == models.count_params(m)
  assert m.layers[0].attn.q_bias[...].shape == (cfg.n_heads, cfg.head_dim)
  # Gemma stores scale - 1: a fresh (1 + scale) norm starts as the identity scale.
  np.testing.assert_array_equal(m.layers[0].post_mlp_norm.scale[...], 0.0)
  assert [layer.local for layer in m.layers] == [True, False, True]


def test_sliding_window_sees_only_recent_positions():
  """A local layer's query at position p sees keys at p-W+1..p of its own segment."""
  from jaxpref.models.decoder import attention_mask, sliding_window_mask
  seg = jnp.array([[1] * 6 + [2] * 4], jnp.int32)
  pos = jnp.array([list(range(6)) + list(range(4))], jnp.int32)
  m = np.asarray(sliding_window_mask(attention_mask(1, 10, seg), pos, 3))[0, 0]
  assert m[5].nonzero()[0].tolist() == [3, 4, 5]
  assert m[8].nonzero()[0].tolist() == [6, 7, 8]  # segment 2, position 2: not segment 1


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_switches_keep_packing_exact():
  """Packed segments equal each sequence alone with every switch on (windows by position)."""
  m = make(models.get_config("tiny", **GEMMA2_TINY), seed=3)
  x, y = tokens(1, 6, seed=2), tokens(1, 5, seed=3)
  seg = jnp.array([[1] * 6 + [2] * 5], jnp.int32)
  pos = jnp.array([list(range(6)) + list(range(5))], jnp.int32)
  out = m(jnp.concatenate([x, y], axis=1), segment_ids=seg, positions=pos)
  np.testing.assert_allclose(out[:, :6], m(x), atol=1e-5)
  np.testing.assert_allclose(out[:, 6:], m(y), atol=1e-5)
  assert float(jnp.abs(out).max()) <= 3.0  # the final soft-cap bounds the logits


@pytest.mark.slow
def test_fused_lm_head_honours_final_softcap():
  """The policy step's fused LM head equals the materialised soft-capped logits, values and
  gradients (the cap is fused into the vocabulary-blocked log-softmax)."""
  from jaxpref.models.logps import LogpsOptions, token_logps
  from jaxpref.types import GroupBatch
  m = make(models.get_config("tiny", **GEMMA2_TINY), seed=4)
  graphdef, params = nnx.split(m)
  toks = tokens(2, 9, seed=5).reshape(1, 2, 9)
  mask = jnp.ones((1, 2, 9), jnp.float32).at[:, :, :3].set(0)
  batch = GroupBatch(tokens=toks, loss_mask=mask, segment_ids=jnp.ones_like(toks),
                     valid=jnp.ones((1, 2), bool), weight=jnp.ones((1,), jnp.float32),
                     scores=jnp.zeros((1, 2), jnp.float32))
  f = lambda p, fused: token_logps(graphdef, p, batch, LogpsOptions(impl="xla",
                                                                   fused_lm_head=fused)).sum()
  fused, unfused = (jax.value_and_grad(f)(params, b) for b in (True, False))
  np.testing.assert_allclose(fused[0], unfused[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(fused[1]), jax.tree.leaves(unfused[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  capped = jax.nn.log_softmax(m(toks[0]))  # the model's own logits, capped
  want = jnp.take_along_axis(capped[:, :-1], toks[0, :, 1:, None], -1)[..., 0] * mask[0, :, 1:]
  np.testing.assert_allclose(fused[0], want.sum(), rtol=1e-5)
