"""--model.scan_layers: the stacked, lax.scan-ed decoder computes what the unrolled one does."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref import models
from jaxpref.models import convert, decoder


def _stack(pure, n_layers):
  """Unrolled pure params -> the scanned layout (layers/{i}/attn/q -> layers/attn/q [L, ...])."""
  layers = [pure["layers"][i] for i in range(n_layers)]
  return {**pure, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def _pair(remat="none", **overrides):
  """(unrolled, scanned) decoders holding the same weights, the scanned one's copied from the
  unrolled one's (seed 3; the scanned one is built from another seed so a copy is needed)."""
  cfg = models.get_config("tiny", n_layers=3, remat=remat, **overrides)
  unrolled = models.Decoder(cfg, rngs=nnx.Rngs(3))
  scanned = models.Decoder(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(7))
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, _stack(nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)),
                                         cfg.n_layers))
  nnx.update(scanned, state)
  return unrolled, scanned


def _tokens(n=2, t=12):
  return jnp.asarray(np.random.default_rng(0).integers(4, 512, (n, t)), jnp.int32)


# Every family switch that changes a block, and a local/global layer mix (Gemma 2).
FAMILIES = {
    "llama": {},
    "gemma2": dict(post_norms=True, sliding_window=4, attn_logit_softcap=50.0, norm_offset=1.0,
                   mlp_activation="gelu_tanh", embed_scale=True, final_logit_softcap=30.0),
    "qwen2": dict(qkv_bias=True, tie_embeddings=True),
    # Local layers' own RoPE theta, picked per layer from scanned data (Gemma 3).
    "gemma3": dict(post_norms=True, qk_norm=True, sliding_window=4, rope_local_theta=100.0,
                   rope_scaling_type="linear", rope_scaling_factor=4.0, norm_offset=1.0,
                   mlp_activation="gelu_tanh", embed_scale=True),
    # Mixtral's experts: [L, E, ...] stacks, a window on every layer.
    "mixtral": dict(n_experts=4, experts_per_token=2, sliding_window=4, sliding_window_pattern=0),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scanned_logits_equal_unrolled(family):
  unrolled, scanned = _pair(**FAMILIES[family])
  seg = jnp.asarray([[1] * 6 + [2] * 4 + [0] * 2, [1] * 12], jnp.int32)
  pos = jnp.asarray([list(range(6)) + list(range(4)) + [0, 0], list(range(12))], jnp.int32)
  np.testing.assert_allclose(scanned(_tokens()), unrolled(_tokens()), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scanned(_tokens(), seg, pos), unrolled(_tokens(), seg, pos),
                             rtol=1e-5, atol=1e-5)
  (h1, s1), (h0, s0) = (m.hidden(_tokens(), all_layers=True) for m in (scanned, unrolled))
  assert s1.shape == s0.shape == (3, 2, 12, 64)
  np.testing.assert_allclose(s1, s0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_gradients_equal_unrolled(remat):
  unrolled, scanned = _pair(remat, **FAMILIES["gemma2"])
  tokens = _tokens()

  def grads(model):
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(tokens))[..., 5])
    return jax.jit(jax.value_and_grad(loss))(params)

  (l1, g1), (l0, g0) = grads(scanned), grads(unrolled)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  g0 = _stack(nnx.to_pure_dict(g0), 3)
  g1 = nnx.to_pure_dict(g1)
  assert jax.tree.structure(g1) == jax.tree.structure(g0)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_same_seed_same_weights_and_stacked_shapes():
  cfg = models.get_config("tiny", n_layers=3, sliding_window=4)
  unrolled = models.Decoder(cfg, rngs=nnx.Rngs(0))
  scanned = models.Decoder(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0))
  pure = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  assert pure["layers"]["attn"]["q"].shape == (3, cfg.d_model, cfg.n_heads, cfg.head_dim)
  want = _stack(nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)), 3)
  for a, b in zip(jax.tree.leaves(pure), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert models.count_params(scanned) == models.param_count(cfg)


def test_conflicts_and_init_from_refusal(tmp_path):
  cfg = models.get_config("tiny", n_layers=2, scan_layers=True)
  assert decoder.scan_layers_conflicts(dataclasses.replace(cfg, scan_layers=False),
                                       lora_rank=8) == []
  errors = decoder.scan_layers_conflicts(cfg, lora_rank=8, export_hf="/out")
  assert len(errors) == 2 and "--lora_rank" in errors[0] and "--export_hf" in errors[1]
  # --init_from keeps the checkpoint's layout: a scan_layers override is refused at start-up.
  convert.save_jaxpref(models.Decoder(dataclasses.replace(cfg, scan_layers=False),
                                      rngs=nnx.Rngs(0)), str(tmp_path))
  with pytest.raises(ValueError, match="scan_layers=True"):
    convert.run_config(str(tmp_path), {"scan_layers": True})


def test_flag_exists():
  from jaxpref import flags  # noqa: F401  (defines --model.* from the ModelConfig fields)
  from absl import flags as absl_flags
  assert "model.scan_layers" in absl_flags.FLAGS


def test_sampler_decodes_a_scanned_stack_as_the_unrolled_one():
  from jaxpref.models import sampler
  unrolled, scanned = _pair(**FAMILIES["gemma2"])  # local and global layers
  prompt = np.asarray(_tokens(n=3, t=6))
  kw = dict(max_new_tokens=6, temperature=1.0, rng=jax.random.key(4), return_logits=True)
  a, b = (sampler.generate(m, prompt, np.array([6, 3, 5]), **kw) for m in (scanned, unrolled))
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), rtol=1e-5, atol=1e-5)


def test_a_scanned_stack_shards_its_inner_axes_and_keeps_the_layer_axis_whole():
  from jaxpref.parallel import mesh as mesh_lib, sharding
  cfg = models.get_config("tiny", n_layers=3, scan_layers=True)
  mesh = mesh_lib.make_mesh("data:2,fsdp:2,tensor:2")
  _, params = sharding.init_params(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0)), mesh)
  pure = nnx.to_pure_dict(params)
  spec = lambda x: tuple(x.sharding.spec)
  # [L, D, H, Dh]: the layer axis whole, D over fsdp, heads over tensor, as unrolled q's.
  assert spec(pure["layers"]["attn"]["q"]) == (None, "fsdp", "tensor")
  assert spec(pure["layers"]["mlp"]["down"]) == (None, "tensor", "fsdp")
  assert spec(pure["layers"]["attn_norm"]["scale"]) == (None, "fsdp")
  assert spec(pure["embed"]) == ("tensor", "fsdp")
