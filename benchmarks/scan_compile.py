"""Compile time of a train-like step (forward + backward of the mean token log-prob) for the
decoder unrolled vs --model.scan_layers, at 8 and 32 layers, all measured in this one run.

  python benchmarks/scan_compile.py [--preset=tiny] [--layers=8,32] [--remat=full] \
      [--batch=4] [--seq=256] [--repeats=3]

Parameters stay abstract (ShapeDtypeStructs), so only tracing, lowering and XLA compilation
are timed, never a step. Every measurement jits a fresh function, so no cache serves it;
one warm-up compile comes first, and the repeats go round-robin over the configurations,
so load from other processes lands on all of them alike. Printed per configuration: the
size of the lowered StableHLO text (deterministic), the fastest and the median time, then
the scanned/unrolled ratios at each depth and each mode's growth with depth (fastest times).
"""

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref import models


def step_fn(graphdef):
  def loss(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))
  return jax.value_and_grad(loss)


def compile_seconds(cfg, batch: int, seq: int) -> tuple[float, int]:
  """(trace + lower + compile seconds, StableHLO characters) of one fresh jit of the step."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  t0 = time.perf_counter()
  lowered = jax.jit(step_fn(graphdef)).lower(params, tokens)
  lowered.compile()
  return time.perf_counter() - t0, len(lowered.as_text())


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--layers", default="8,32")
  p.add_argument("--remat", default="full")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  depths = [int(x) for x in args.layers.split(",")]
  configs = {(n, scan): dataclasses.replace(
      models.get_config(args.preset, n_layers=n, remat=args.remat), scan_layers=scan)
             for n in depths for scan in (False, True)}
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; preset {args.preset}, "
        f"remat {args.remat}, batch {args.batch} x {args.seq}, {args.repeats} repeats")
  compile_seconds(configs[depths[0], False], args.batch, args.seq)  # warm-up, not counted
  times = {k: [] for k in configs}
  size = {}
  for _ in range(args.repeats):
    for key, cfg in configs.items():
      seconds, size[key] = compile_seconds(cfg, args.batch, args.seq)
      times[key].append(seconds)
  best = {k: min(v) for k, v in times.items()}
  for (n, scan), t in times.items():
    print(f"  layers {n:3d} {'scanned' if scan else 'unrolled':8s}: StableHLO "
          f"{size[n, scan] / 1e3:7.0f} kB, compile fastest {min(t):6.2f} s, "
          f"median {statistics.median(t):6.2f} s")
  for n in depths:
    print(f"layers {n}: scanned/unrolled compile time = {best[n, True] / best[n, False]:.2f}")
  lo, hi = min(depths), max(depths)
  for scan in (False, True):
    print(f"{'scanned' if scan else 'unrolled'}: {hi}/{lo} layers compile time = "
          f"{best[hi, scan] / best[lo, scan]:.2f}")


if __name__ == "__main__":
  main()
