"""The Llama-style decoder against float64 numpy references and its masking contracts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref import models
from jaxpref.models.decoder import Attention, rope

CFG = models.get_config("tiny", vocab_size=64, max_len=32)


def make(cfg=CFG, seed=0):
  return models.Decoder(cfg, rngs=nnx.Rngs(seed))


def tokens(n, t, seed=0, vocab=64):
  return jnp.asarray(np.random.default_rng(seed).integers(4, vocab, (n, t)), jnp.int32)


def test_shapes_and_functional_jit():
  model = make()
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  out = f(state, tokens(3, 10))
  assert out.shape == (3, 10, 64) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, model(tokens(3, 10)), rtol=1e-5, atol=1e-5)


def test_causal():
  model = make()
  a = tokens(2, 12, seed=1)
  b = a.at[:, 7:].set(5)
  np.testing.assert_allclose(model(a)[:, :7], model(b)[:, :7], atol=1e-6)
  assert not np.allclose(model(a)[:, 7:], model(b)[:, 7:])


def test_padding_and_packing_do_not_leak():
  model = make()
  x = tokens(1, 6, seed=2)
  alone = model(x, segment_ids=jnp.ones((1, 6), jnp.int32))
  padded = jnp.concatenate([x, jnp.zeros((1, 4), jnp.int32)], axis=1)
  seg = jnp.array([[1] * 6 + [0] * 4], jnp.int32)
  out = model(padded, segment_ids=seg)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out[:, :6], alone, atol=1e-5)
  # Two segments packed in one row, positions restarting: each equals the segment alone.
  y = tokens(1, 4, seed=3)
  packed = jnp.concatenate([x, y], axis=1)
  seg = jnp.array([[1] * 6 + [2] * 4], jnp.int32)
  pos = jnp.array([list(range(6)) + list(range(4))], jnp.int32)
  out = model(packed, segment_ids=seg, positions=pos)
  np.testing.assert_allclose(out[:, :6], alone, atol=1e-5)
  np.testing.assert_allclose(out[:, 6:], model(y), atol=1e-5)


def np_rope(x, pos, theta):
  half = x.shape[-1] // 2
  inv = theta ** (-np.arange(half) / half)
  ang = pos[..., None] * inv  # [N, T, half]
  cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def test_rope_matches_numpy_and_is_relative():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 5, 2, 8))
  pos = np.arange(5)[None].astype(np.float64)
  np.testing.assert_allclose(rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos, jnp.int32), 1e4),
                             np_rope(x, pos, 1e4), rtol=1e-5, atol=1e-5)
  q, k = rng.normal(size=(1, 1, 1, 8)), rng.normal(size=(1, 1, 1, 8))
  dot = lambda i, j: float(np.sum(np_rope(q, np.array([[i]]), 1e4) * np_rope(k, np.array([[j]]), 1e4)))
  assert abs(dot(3, 1) - dot(10, 8)) < 1e-9 and abs(dot(3, 1) - dot(3, 2)) > 1e-6


def test_gqa_attention_matches_numpy_reference():
  cfg = models.get_config("tiny", vocab_size=64, n_heads=4, n_kv_heads=2)
  attn = Attention(cfg, nnx.Rngs(1))
  rng = np.random.default_rng(1)
  n, t, d = 2, 7, cfg.d_model
  x = rng.normal(size=(n, t, d))
  pos = np.broadcast_to(np.arange(t), (n, t))
  mask = np.broadcast_to(np.tril(np.ones((t, t), bool)), (n, 1, t, t))
  got = attn(jnp.asarray(x, jnp.float32), jnp.asarray(pos), jnp.asarray(mask))
  wq, wk, wv, wo = (np.asarray(p[...], np.float64) for p in (attn.q, attn.k, attn.v, attn.o))
  q = np_rope(np.einsum("ntd,dhk->nthk", x, wq), pos, cfg.rope_theta)
  k = np_rope(np.einsum("ntd,dhk->nthk", x, wk), pos, cfg.rope_theta)
  v = np.einsum("ntd,dhk->nthk", x, wv)
  groups = cfg.n_heads // cfg.n_kv_heads
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # head h uses kv h//groups
  s = np.einsum("nqhk,nshk->nhqs", q, k) / np.sqrt(cfg.head_dim)
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("nhqs,nshk,hkd->nqd", p, v, wo)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_param_counts():
  for tie in (True, False):
    cfg = models.get_config("tiny", tie_embeddings=tie)
    assert models.param_count(cfg) == models.count_params(make(cfg))
  # Published sizes, from the config alone.
  assert models.param_count(models.get_config("llama3_8b")) == 8_030_261_248
  assert models.param_count(models.get_config("llama2_7b")) == 6_738_415_616


def test_tied_embeddings_share_weights():
  model = make()
  assert not hasattr(model, "lm_head")
  np.testing.assert_array_equal(model.lm_head_weight(), model.embed[...].T)


def test_bfloat16_compute_is_finite_and_close():
  x = tokens(2, 8)
  f32 = make()(x)
  bf16 = make(models.get_config("tiny", vocab_size=64, dtype="bfloat16"))(x)
  assert bf16.dtype == jnp.float32 and np.isfinite(np.asarray(bf16)).all()
  np.testing.assert_allclose(bf16, f32, atol=0.05)


@pytest.mark.parametrize("overrides,field", [
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"), (dict(d_model=0), "d_model"),
    (dict(head_dim=15), "head_dim"), (dict(dtype="int8"), "dtype")])
def test_config_errors_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    models.get_config("tiny", **overrides)
  with pytest.raises(ValueError, match="presets: tiny"):
    models.get_config("huge")
