"""--attention: the splash and cuDNN paths compute what the einsum does, and lower for their
hardware from this CPU host.

No TPU or GPU here, so each kernel runs through a CPU stand-in: splash in Pallas interpret
mode (the kernel's own code, interpreted), and the cuDNN path's arguments (sequence lengths,
window, bias mask, scale) through `jax.nn.dot_product_attention(implementation="xla")`.
`jax.export` then runs the real Mosaic (TPU) and cuDNN custom-call (CUDA) lowerings.
"""

import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from jaxpref import models
from jaxpref.models import attention_kernels
from jaxpref.models.attention import Attention, attention_mask, masks, sliding_window_mask

# Two packed segments and padding, and an unpacked right-padded row. T = 11: odd, so
# cuDNN's bias path pads it (to 12) and splash's (to 128).
SEG = [[1] * 6 + [2] * 4 + [0], [1] * 11]
POS = [list(range(6)) + list(range(4)) + [0], list(range(11))]
UNPACKED = [[1] * 9 + [0] * 2, [1] * 11]
# A local/global layer mix with q/k norms (Gemma 3's switches), GQA (4 heads over 2).
GEMMA3 = dict(n_layers=2, sliding_window=3, post_norms=True, qk_norm=True, norm_offset=1.0,
              rope_local_theta=100.0)


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
  monkeypatch.setattr(attention_kernels, "CUDNN_IMPLEMENTATION", "xla")


def _tokens(n=2, t=11):
  return jnp.asarray(np.random.default_rng(0).integers(4, 512, (n, t)), jnp.int32)


def _pair(kernel, **overrides):
  """(einsum, kernel) decoders with the same weights (the same seed)."""
  cfg = models.get_config("tiny", **{**GEMMA3, **overrides})
  return (models.Decoder(cfg, rngs=nnx.Rngs(0)),
          models.Decoder(dataclasses.replace(cfg, attention=kernel), rngs=nnx.Rngs(0)))


def _close(actual, desired, rtol):
  """Leaf by leaf, to rtol of each leaf's largest entry (float32 sums in another order)."""
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()))


def _qkv(heads=4, kv_heads=2, dh=16, n=2, t=11):
  r = np.random.default_rng(1)
  return (jnp.asarray(r.normal(size=(n, t, h, dh)), jnp.float32)
          for h in (heads, kv_heads, kv_heads))


def _attend_grads(attn, mask, q, k, v, weight):
  """A loss over real tokens only (padding queries differ by design: see docs), and its
  gradients with respect to q, k and v."""
  f = lambda q, k, v: jnp.sum(jnp.sin(attn.attend(q, k, v, mask)) * weight[..., None])
  return jax.value_and_grad(f, (0, 1, 2))(q, k, v)


LAYOUTS = {"none": (None, None), "unpacked": (UNPACKED, None), "packed": (SEG, POS),
           "shared_prompt": (SEG, POS)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cudnn_path_equals_einsum(cudnn_on_cpu, layout):
  """Global and local layers (window 3, Gemma 2's query scale) of every row layout: the
  masks `masks` hands the einsum and the cuDNN path, values and gradients."""
  cfg = models.get_config("tiny", sliding_window=3, query_pre_attn_scalar=8.0)
  attn = Attention(cfg, nnx.Rngs(0))
  seg, pos = (None if x is None else jnp.asarray(x, jnp.int32) for x in LAYOUTS[layout])
  shared = layout == "shared_prompt"
  weight = jnp.ones((2, 11)) if seg is None else (seg > 0).astype(jnp.float32)
  dense = masks(cfg, 2, 11, seg, pos, shared)
  kernel = masks(dataclasses.replace(cfg, attention="cudnn"), 2, 11, seg, pos, shared)
  for d, kmask in zip(dense, kernel):
    assert isinstance(kmask, attention_kernels.KernelMask)
    (l0, g0), (l1, g1) = (_attend_grads(attn, m, *_qkv(), weight) for m in (d, kmask))
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
    _close(g1, g0, 1e-4)


@pytest.mark.slow  # 5 to 21 s on 2 busy cores
def test_cudnn_decoder_equals_einsum(cudnn_on_cpu):
  """Through the scanned decoder, where each layer's window is picked by lax.cond over two
  kernel calls (`attention_kernels.select`), on unpacked and packed rows."""
  cfg = models.get_config("tiny", **GEMMA3, scan_layers=True)
  einsum, kernel = (models.Decoder(dataclasses.replace(cfg, attention=a), rngs=nnx.Rngs(0))
                    for a in ("xla", "cudnn"))
  seg, pos, unpacked = (jnp.asarray(x, jnp.int32) for x in (SEG, POS, UNPACKED))
  for args, real in (((unpacked,), unpacked > 0), ((seg, pos), seg > 0)):
    h0, h1 = (nnx.jit(lambda m: m.hidden(_tokens(), *args))(m) for m in (einsum, kernel))
    np.testing.assert_allclose(h1[real], h0[real], rtol=1e-5, atol=1e-5)


def test_traced_local_flag_picks_the_window_in_both_directions(cudnn_on_cpu):
  """A traced `local` (the scanned decoder's) takes the kernel's window through lax.cond,
  values and gradients as the einsum's local and global masks."""
  cfg = models.get_config("tiny", sliding_window=3)
  attn = Attention(cfg, nnx.Rngs(0))
  seg = jnp.asarray(UNPACKED, jnp.int32)
  full, local = masks(cfg, 2, 11, seg)
  weight = (seg > 0).astype(jnp.float32)
  for flag, dense in ((True, local), (False, full)):
    kmask = attention_kernels.KernelMask(seg, None, jnp.asarray(flag), "cudnn")
    (l0, g0), (l1, g1) = (_attend_grads(attn, m, *_qkv(), weight) for m in (dense, kmask))
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
    _close(g1, g0, 1e-4)


def test_cudnn_packed_rows_take_the_dense_mask_and_unpacked_rows_lengths(cudnn_on_cpu):
  cfg = models.get_config("tiny", sliding_window=3, attention="cudnn")
  seg, pos = jnp.asarray(SEG, jnp.int32), jnp.asarray(POS, jnp.int32)
  full, local = masks(cfg, 2, 11, seg, pos)
  assert full.kernel == local.kernel == "cudnn" and (full.local, local.local) == (False, True)
  expect = sliding_window_mask(attention_mask(2, 11, seg), pos, 3)
  np.testing.assert_array_equal(local.dense, expect)
  full, local = masks(cfg, 2, 11, seg)
  assert full.dense is None and local.dense is None and full.segment_ids is seg


def test_auto_is_the_einsum_on_cpu_and_splash_leaves_shared_prompts_to_it():
  cfg = models.get_config("tiny", attention="auto")
  full, _ = masks(cfg, 2, 11, jnp.asarray(SEG, jnp.int32))
  assert full.dtype == jnp.bool_ and full.shape == (2, 1, 11, 11)
  splash = models.get_config("tiny", attention="splash")
  assert attention_kernels.resolve(splash, shared_prompt=False) == "splash"
  assert attention_kernels.resolve(splash, shared_prompt=True) == "xla"


def test_cudnn_refuses_soft_cap_float32_and_odd_head_dims_in_one_line():
  with pytest.raises(ValueError, match=r"^--attention=cudnn: .*Gemma 2: "
                     r"--model.attn_logit_softcap=50.0.*; use --attention=xla"):
    models.get_config("tiny", attention="cudnn", dtype="bfloat16", attn_logit_softcap=50.0)
  with pytest.raises(ValueError, match=r"--model.dtype=float32"):
    models.get_config("tiny", attention="cudnn")
  with pytest.raises(ValueError, match=r"multiple of 8 and <= 256, got 12"):
    models.get_config("tiny", attention="cudnn", dtype="bfloat16", head_dim=12)
  with pytest.raises(ValueError, match=r"^--attention .* must be one of auto, xla, splash, "
                     r"cudnn, got 'flash'$"):
    models.get_config("tiny", attention="flash")
  models.get_config("tiny", attention="cudnn", dtype="bfloat16")  # Llama's switches: fine


def test_auto_on_gpu_falls_back_to_the_einsum_for_soft_cap(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  cap = models.get_config("tiny", attention="auto", dtype="bfloat16", attn_logit_softcap=50.0)
  assert attention_kernels.resolve(cap, False) == "xla"
  plain = models.get_config("tiny", attention="auto", dtype="bfloat16")
  assert attention_kernels.resolve(plain, False) == "cudnn"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention_kernels.resolve(cap, False) == "splash"


@pytest.mark.slow
def test_splash_interpreted_equals_einsum(monkeypatch):
  """The splash kernel itself (interpret mode): packed segments, a window measured within
  each segment, Gemma 2's scale and soft-cap, GQA; values and gradients at real tokens."""
  monkeypatch.setattr(attention_kernels, "SPLASH_INTERPRET", True)
  cfg = models.get_config("tiny", n_heads=2, n_kv_heads=1, sliding_window=3,
                          attn_logit_softcap=2.0, query_pre_attn_scalar=8.0)
  attn = Attention(cfg, nnx.Rngs(0))
  seg, pos = jnp.asarray(SEG, jnp.int32), jnp.asarray(POS, jnp.int32)
  dense = sliding_window_mask(attention_mask(2, 11, seg), pos, 3)
  kmask = attention_kernels.KernelMask(seg, None, True, "splash")
  weight = (seg > 0).astype(jnp.float32)
  qkv = list(_qkv(heads=2, kv_heads=1))
  (l0, g0) = _attend_grads(attn, dense, *qkv, weight)
  (l1, g1) = jax.jit(lambda *a: _attend_grads(attn, kmask, *a, weight))(*qkv)
  np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
  _close(g1, g0, 1e-4)


def _export_grad(model, platform, checks=(), t=200, packed=False):
  """jax.export of the model's loss and parameter gradients for `platform`: forward and
  backward through every attention layer. `packed`: with positions (packed rows)."""
  graphdef, params = nnx.split(model, nnx.Param)
  rows = jax.ShapeDtypeStruct((2, t), jnp.int32)

  def step(params, tokens, seg, *pos):
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, seg, *pos))
    return jax.value_and_grad(loss)(params)

  exported = export.export(jax.jit(step), platforms=[platform], disabled_checks=list(checks))
  return exported(params, rows, rows, *[rows] * packed).mlir_module()


@pytest.mark.parametrize("scan", [False, True])
def test_splash_lowers_for_tpu(scan):
  """T = 200 (padded to 256), Gemma 2's soft-cap, a local and a global layer (scanned: both
  branches of the lax.cond); Mosaic lowering, as tests/ops/test_kernel_lowering.py does."""
  _, model = _pair("splash", attn_logit_softcap=50.0, scan_layers=scan)
  text = _export_grad(model, "tpu")
  kernels = collections.Counter(re.findall(r'kernel_name\W+(\w+)', text))
  # Per layer (or branch): the forward, saving its residuals, and the fused dq/dkv backward.
  assert kernels == {"splash_mha_fwd_segmented_residuals": 2,
                     "splash_mha_dkv_segmented_no_residuals": 2}, kernels


@pytest.mark.parametrize("t, packed", [(200, False), (199, True)])
def test_cudnn_lowers_for_cuda(monkeypatch, t, packed):
  """Unpacked rows (sequence lengths, window) and packed rows of odd length (the mask as a
  bias, padded to even). jax asks the installed cuDNN for its version while tracing
  (`check_cudnn_version`), which raises "cuDNN is not detected" on a host without the CUDA
  plugin; a stand-in version lets the CUDA lowering run. cuDNN's own plan checks need the
  GPU."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  monkeypatch.setattr(fa, "cuda_versions", type("V", (), {"cudnn_get_version": lambda: 91000}))
  _, model = _pair("cudnn", dtype="bfloat16")
  fmha = "__cudnn$fmhaScaleBiasSoftmax" if packed else "__cudnn$fmhaSoftmax"
  checks = [export.DisabledSafetyCheck.custom_call(fmha + s) for s in ("", "Backward")]
  text = _export_grad(model, "cuda", checks, t, packed)
  calls = set(re.findall(r"custom_call @(__cudnn\$fmha\w+)", text))
  assert calls == {fmha, fmha + "Backward"}, calls


@pytest.mark.slow  # a CLI start-up: 11 s on 2 busy cores
def test_attention_flag_reaches_the_model_config(tmp_path):
  """--attention is --model.attention: a refusal at start-up, in one line."""
  from cli_util import train
  proc = train(str(tmp_path / "w"), "--attention=cudnn", check=False)
  needle = ("--attention=cudnn: cuDNN flash attention takes bfloat16 or float16 only "
            "(--model.dtype=float32); use --attention=xla")
  assert proc.returncode != 0 and needle in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_attention_and_model_attention_must_agree():
  from absl.testing import flagsaver
  from jaxpref import flags as jflags
  with flagsaver.as_parsed(attention="splash"):
    assert jflags._model_overrides()["attention"] == "splash"
  with flagsaver.as_parsed(attention="splash", **{"model.attention": "splash"}):
    assert jflags._model_overrides()["attention"] == "splash"
  with flagsaver.as_parsed(attention="splash", **{"model.attention": "xla"}):
    with pytest.raises(ValueError, match=r"^--attention=splash and --model.attention=xla "
                       r"disagree; give one$"):
      jflags._model_overrides()


def test_splash_runs_per_shard_under_the_training_mesh():
  """Under the mesh a training step traces in (`in_mesh`), the Pallas call sees each
  device's rows and heads (a shard_map), not gathered operands."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from jaxpref.parallel.sharding import in_mesh
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  model = models.Decoder(models.get_config("tiny", n_layers=1, attention="splash"),
                         rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def step(params, tokens, seg):
    return jax.value_and_grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, seg)))(params)

  rows = jax.ShapeDtypeStruct((8, 200), jnp.int32,
                              sharding=NamedSharding(mesh, P(("data", "fsdp"))))
  text = export.export(jax.jit(in_mesh(step, mesh)), platforms=["tpu"])(
      params, rows, rows).mlir_module()
  assert text.count("manual_computation") == 2  # the forward and the backward
  # 8 rows over data x fsdp = 4 -> 2 per device; 4 query heads over tensor = 2 -> 2 each.
  assert "tensor<2x2x256x16xf32>" in text


def test_a_saved_model_folder_does_not_carry_the_kernel(tmp_path):
  """--attention is how a run computes: a folder saved from a splash run loads as xla, and
  --init_from takes the loading run's --model.attention."""
  from jaxpref.models import convert
  cfg = models.get_config("tiny", n_layers=1, attention="splash")
  convert.save_jaxpref(models.Decoder(cfg, rngs=nnx.Rngs(0)), str(tmp_path / "m"))
  assert convert.read_model_config(str(tmp_path / "m")).attention == "xla"
  assert convert.run_config(str(tmp_path / "m"), {"attention": "auto"}).attention == "auto"
