"""Per-token log-prob ops against the naive baseline: peak memory and time, same run.

  python benchmarks/logps_ops.py ratio [--sizes=4096x32768,4096x131072,...] [--dtype=float32]
  python benchmarks/logps_ops.py token [--sizes=4096x32768,4096x131072,...] [--dtype=float32]
  python benchmarks/logps_ops.py fused [--n=1024] [--d=2048] [--v=131072]

`ratio`: `ops.token_logratio` on policy and reference logits [N, V] (forward, and the
backward into the policy logits only), each implementation vs `impl="naive"`
(log_softmax + gather under autodiff), plus the achieved bytes/s against a plain device
copy of the same logits (the memory-bound limit). `token`: the same for one model's
per-token log-probs (`ops.token_logps`).
`fused`: `fused_linear_logps(hidden, W)` vs materialising `hidden @ W` and the naive op.

Peak memory is read two ways: from the compiled program (`memory_analysis()`: arguments +
outputs + temporaries, for every size, without running it) and, for the sizes that fit
this machine, from the process's resident set (each case runs in a fresh subprocess, and
the figure is the peak RSS minus the RSS with the inputs already allocated). Times are the
median of `--reps` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GiB = 2.0 ** 30


def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field):
        return int(line.split()[1])
  return 0


def _case_fn(kind, impl, n, v, d, dtype, block_v):
  """(jitted fwd+bwd function, its input ShapeDtypeStructs)."""
  import jax
  import jax.numpy as jnp
  from jaxpref import ops
  dt = jnp.dtype(dtype)
  if kind == "ratio":
    def loss(x, r, t):
      one = lambda a: a[None, None]  # [B=1, K=1, T=N, ...]
      out = ops.token_logratio(one(x), one(r), one(t), jnp.ones((1, 1, n), jnp.float32),
                               impl=impl, block_v=block_v)
      return out.ratio_tok.sum()
    fn = jax.jit(jax.value_and_grad(loss))  # the value keeps the reference's pass alive
    shapes = (jax.ShapeDtypeStruct((n, v), dt), jax.ShapeDtypeStruct((n, v), dt),
              jax.ShapeDtypeStruct((n,), jnp.int32))
  elif kind == "token":
    def loss(x, t):
      return ops.token_logps(x, t, impl=impl, block_v=block_v)[0].sum()
    fn = jax.jit(jax.grad(loss))
    shapes = (jax.ShapeDtypeStruct((n, v), dt), jax.ShapeDtypeStruct((n,), jnp.int32))
  elif kind == "copy":
    fn = jax.jit(lambda x, t: x * jnp.asarray(1, x.dtype))
    shapes = (jax.ShapeDtypeStruct((n, v), dt), jax.ShapeDtypeStruct((n,), jnp.int32))
  else:
    if impl == "fused":
      loss = lambda h, w, t: ops.fused_linear_logps(h, w, t, block_v=block_v)[0].sum()
    else:
      loss = lambda h, w, t: ops.token_logps(
          jnp.dot(h, w, preferred_element_type=jnp.float32), t, impl="naive")[0].sum()
    fn = jax.jit(jax.grad(loss, (0, 1)))
    shapes = (jax.ShapeDtypeStruct((n, d), dt), jax.ShapeDtypeStruct((d, v), dt),
              jax.ShapeDtypeStruct((n,), jnp.int32))
  return fn, shapes


def compiled_bytes(kind, impl, n, v, d, dtype, block_v) -> int:
  fn, shapes = _case_fn(kind, impl, n, v, d, dtype, block_v)
  m = fn.lower(*shapes).compile().memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def run_case(kind, impl, n, v, d, dtype, block_v, reps) -> dict:
  """Runs in a child process: time and RSS growth of one case."""
  import jax
  import numpy as np
  fn, shapes = _case_fn(kind, impl, n, v, d, dtype, block_v)
  rng = np.random.default_rng(0)
  args = []
  for s in shapes:
    if s.dtype == np.int32:
      args.append(jax.device_put(rng.integers(0, v, s.shape).astype(np.int32)))
    else:
      args.append(jax.device_put(rng.normal(size=s.shape).astype(np.float32)).astype(s.dtype))
  jax.block_until_ready(args)
  compiled = fn.lower(*shapes).compile()
  before = _rss_kib("VmRSS")
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return dict(seconds=float(np.median(times)), rss_gib=(_rss_kib("VmHWM") - before) / 2**20)


def _in_child(case: dict) -> dict:
  out = subprocess.run([sys.executable, __file__, "_child", json.dumps(case)],
                       capture_output=True, text=True)
  if out.returncode:
    return dict(error=out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(x, unit=""):
  return "-" if x is None else f"{x:.3g}{unit}"


def bench_token(args):
  import jax
  kind = args.which
  impls = ["xla"] + (["pallas"] if jax.default_backend() in ("gpu", "tpu") else [])
  itemsize = 2 if args.dtype == "bfloat16" else 4
  # Bytes the op must move: token reads the logits twice (fwd, bwd) and writes their
  # gradient; ratio also reads the reference's logits once.
  passes = 4 if kind == "ratio" else 3
  what = "policy - reference log-ratios" if kind == "ratio" else "per-token log-probs"
  print(f"backend {jax.default_backend()}, logits {args.dtype}, fwd+bwd of {what}; "
        f"ratio = naive / impl (higher is better)")
  print("| N | V | impl | compiled peak GiB (naive / impl, ratio) | RSS GiB (naive / impl) "
        "| time s (naive / impl, ratio) | GB/s (impl / copy) |")
  print("|---|---|---|---|---|---|---|")
  for size in args.sizes.split(","):
    n, v = (int(s) for s in size.split("x"))
    naive_c = compiled_bytes(kind, "naive", n, v, 0, args.dtype, args.block_v) / GiB
    runnable = naive_c < args.max_run_gib
    common = dict(kind=kind, n=n, v=v, d=0, dtype=args.dtype, block_v=args.block_v,
                  reps=args.reps)
    naive_r = _in_child(dict(common, impl="naive")) if runnable else {}
    copy_r = _in_child(dict(common, kind="copy", impl="copy")) if runnable else {}
    for impl in impls:
      c = compiled_bytes(kind, impl, n, v, 0, args.dtype, args.block_v) / GiB
      r = _in_child(dict(common, impl=impl)) if runnable else {}
      t, tn = r.get("seconds"), naive_r.get("seconds")
      gbs = passes * n * v * itemsize / t / 1e9 if t else None
      copy_gbs = 2 * n * v * itemsize / copy_r["seconds"] / 1e9 if copy_r.get("seconds") else None
      print(f"| {n} | {v} | {impl} | {naive_c:.2f} / {c:.2f} = {naive_c / c:.2f}x "
            f"| {_fmt(naive_r.get('rss_gib'))} / {_fmt(r.get('rss_gib'))} "
            f"| {_fmt(tn)} / {_fmt(t)} = {_fmt(tn / t if t and tn else None, 'x')} "
            f"| {_fmt(gbs)} / {_fmt(copy_gbs)} |", flush=True)


def bench_fused(args):
  import jax
  n, d, v = args.n, args.d, args.v
  print(f"backend {jax.default_backend()}, {args.dtype}, N={n} D={d} V={v}, fwd+bwd; "
        "materialised = hidden @ W then naive log-probs")
  common = dict(kind="fused", n=n, v=v, d=d, dtype=args.dtype, block_v=args.block_v,
                reps=args.reps)
  rows = {}
  for impl in ("materialised", "fused"):
    c = compiled_bytes("fused", impl, n, v, d, args.dtype, args.block_v) / GiB
    rows[impl] = dict(compiled_gib=c, **_in_child(dict(common, impl=impl)))
    print(f"{impl:>13}: compiled peak {c:.2f} GiB, RSS +{_fmt(rows[impl].get('rss_gib'))} GiB, "
          f"{_fmt(rows[impl].get('seconds'))} s", flush=True)
  m, f = rows["materialised"], rows["fused"]
  print(f"ratio materialised / fused: compiled peak {m['compiled_gib'] / f['compiled_gib']:.2f}x, "
        f"RSS {_fmt(m.get('rss_gib', 0) / f['rss_gib'] if f.get('rss_gib') else None, 'x')}, "
        f"time {_fmt(f['seconds'] / m['seconds'] if m.get('seconds') else None, 'x')} "
        "(fused / materialised)")
  # Larger N, compiled only: the logits grow with N, the weights and their gradient do not.
  print("| N | compiled peak GiB materialised | fused | ratio | temporaries GiB materialised | fused |")
  print("|---|---|---|---|---|---|")
  for big_n in (int(x) for x in args.static_ns.split(",")):
    peak, temp = [], []
    for impl in ("materialised", "fused"):
      fn, shapes = _case_fn("fused", impl, big_n, v, d, args.dtype, args.block_v)
      ma = fn.lower(*shapes).compile().memory_analysis()
      temp.append(ma.temp_size_in_bytes / GiB)
      peak.append((ma.argument_size_in_bytes + ma.output_size_in_bytes) / GiB + temp[-1])
    print(f"| {big_n} | {peak[0]:.2f} | {peak[1]:.2f} | {peak[0] / peak[1]:.2f}x | "
          f"{temp[0]:.2f} | {temp[1]:.3f} |", flush=True)


def main():
  if len(sys.argv) > 2 and sys.argv[1] == "_child":
    case = json.loads(sys.argv[2])
    print(json.dumps(run_case(**case)))
    return
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("which", choices=["ratio", "token", "fused"])
  p.add_argument("--sizes", default="4096x32768,4096x131072,16384x32768,16384x131072")
  p.add_argument("--n", type=int, default=1024)
  p.add_argument("--d", type=int, default=2048)
  p.add_argument("--v", type=int, default=131072)
  p.add_argument("--static_ns", default="4096,16384",
                 help="fused: further N whose compiled memory is reported without running")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--block_v", type=int, default=None)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--max_run_gib", type=float, default=12.0,
                 help="run (time, RSS) only cases whose naive compiled peak is below this")
  args = p.parse_args()
  if args.block_v is None:
    args.block_v = 8192 if args.which == "fused" else 2048
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  (bench_fused if args.which == "fused" else bench_token)(args)


if __name__ == "__main__":
  main()
