"""Every Pallas kernel lowers for the hardware it is written for, checked on the CPU.

`jax.export` with `platforms=[...]` runs the real TPU (Mosaic) and GPU (Triton) lowering
without the device, so a kernel that stops lowering (a Mosaic GPU default, a block shape
Mosaic rejects, a missing compiler param) fails in CI rather than on the first slice.
Compiling the lowered kernels still needs the hardware; the values and gradients are
checked in interpret mode in tests/ops/test_ops.py.
"""

import json
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jaxpref import ops
from jaxpref.ops import pallas_logps

TRITON = "__gpu$xla.gpu.triton"
# Triton kernels carry no stability guarantee across jax versions; exporting them is fine
# for a lowering check (the artifact is never deserialized elsewhere).
GPU_CHECKS = [export.DisabledSafetyCheck.custom_call(TRITON)]

# (platform, layout): the TPU runs the grid layout, the GPU the loop one.
TARGETS = [("tpu", "grid"), ("cuda", "loop")]
# Shapes that divide no block, a bf16 and a float32 input, a leading batch shape.
CASES = [((3, 37, 5003), jnp.bfloat16), ((300, 50000), jnp.float32)]


def _fns(layout, block_n=None, block_v=None):
  kw = dict(impl="pallas", layout=layout, interpret=False, block_n=block_n, block_v=block_v)

  def forward(logits, targets, mask):
    return ops.token_logps(logits, targets, mask, **kw)

  def grad(logits, targets, mask):
    return jax.grad(lambda x: jnp.sum(ops.token_logps(x, targets, mask, **kw)[0]))(logits)

  return {"forward": forward, "backward": grad}


def _args(shape, dtype):
  return (jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct(shape[:-1], jnp.int32),
          jax.ShapeDtypeStruct(shape[:-1], jnp.float32))


def _export(fn, platform, args):
  checks = GPU_CHECKS if platform == "cuda" else []
  return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)


def _pallas_params(fn, args):
  """compiler_params of every pallas_call in fn's jaxpr (nested ones too), in order."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append(eqn.params["compiler_params"])
      for v in eqn.params.values():
        for sub in v if isinstance(v, (tuple, list)) else (v,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("platform, layout", TARGETS)
@pytest.mark.parametrize("shape, dtype", CASES)
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_kernels_lower_for_their_hardware(platform, layout, shape, dtype, which):
  text = _export(_fns(layout)[which], platform, _args(shape, dtype)).mlir_module()
  if platform == "tpu":
    assert "tpu_custom_call" in text and TRITON not in text
  else:  # Triton, never Mosaic GPU (whose lowering of these kernels overflows shared memory)
    assert TRITON in text and "mosaic_gpu" not in text


def test_tpu_kernels_set_vmem_limit_and_parallel_rows():
  args = _args((3, 37, 5003), jnp.bfloat16)
  fwd, bwd = _fns("grid")["forward"], _fns("grid")["backward"]
  (p_fwd,) = _pallas_params(fwd, args)
  assert tuple(p_fwd.dimension_semantics) == ("parallel", "arbitrary")  # vocab carries sums
  p_bwd = _pallas_params(bwd, args)[-1]
  assert tuple(p_bwd.dimension_semantics) == ("parallel", "parallel")
  limit = pallas_logps.vmem_limit(256, 2048, 2)
  assert p_fwd.vmem_limit_bytes == p_bwd.vmem_limit_bytes == limit == 21 << 20
  # The limit reaches the custom call (as its scoped VMEM size).
  text = _export(bwd, "tpu", args).mlir_module()
  configs = [json.loads(c.replace("\\22", '"'))
             for c in re.findall(r'backend_config = "([^"]*)"', text) if "custom_call_config" in c]
  assert len(configs) == 2  # the forward (recomputed for its lse) and the backward
  for config in configs:
    assert config["scoped_memory_configs"][0]["size"] == limit


def test_gpu_kernels_name_triton_and_its_params():
  args = _args((300, 50000), jnp.float32)
  for which, fn in _fns("loop").items():
    for params in _pallas_params(fn, args):
      assert type(params).__module__.startswith("jax._src.pallas.triton"), which
      assert (params.num_warps, params.num_stages) == (4, 2)


def test_vmem_limit_grows_with_the_blocks():
  assert pallas_logps.vmem_limit(8, 128, 4) == 16 << 20  # never below the default
  assert pallas_logps.vmem_limit(512, 4096, 2) > pallas_logps.vmem_limit(256, 2048, 2)
  assert pallas_logps.vmem_limit(512, 4096, 2) % (1 << 20) == 0
