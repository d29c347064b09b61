"""KV-cache sampler tokens/s: jaxpref's `sampler.generate` vs transformers' `generate`.

  python benchmarks/sampler_speed.py [--presets=tiny,small] [--batches=1,8,32]
      [--prompt=16] [--new=64] [--reps=3] [--threads=N] [--torch_variants=eager,static,compile]

For each preset, one random-weight Decoder is saved with `hf.save` and loaded by
transformers (torch, CPU), so both sides run the same weights. Fairness:
- threads: torch gets `--threads` (default: the cores XLA:CPU uses, os.cpu_count()), so
  neither side runs on more cores than the other;
- compile: jaxpref's first call (trace + XLA compile) and torch.compile's first call are
  reported apart from the steady rate (median of `--reps` timed calls after them);
- cases: greedy without a stop token (every row decodes `--new` tokens) and greedy with a
  stop token that ends rows at different steps (the token row 0 emits halfway), each for
  every batch size; tokens/s counts the tokens each side actually returned;
- torch variants: `eager` (transformers' dynamic cache), `static`
  (`cache_implementation="static"`), `compile` (the static cache under torch.compile;
  reported as failed, with the reason, where it does not build on this machine).
Also printed: the share of new tokens the two greedy outputs agree on.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from jaxpref import models
from jaxpref.models import hf, sampler


def timed(fn, reps: int):
  """(first call s, median of `reps` later calls s, last output)."""
  t0 = time.perf_counter()
  out = fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times)), out


def new_tokens(tokens: np.ndarray, prompt_len: int, stop: int | None, pad: int) -> int:
  """New tokens a side returned: up to and including the stop token, else all of them."""
  total = 0
  for row in np.asarray(tokens)[:, prompt_len:]:
    hits = np.flatnonzero(row == stop) if stop is not None else []
    total += int(hits[0]) + 1 if len(hits) else int((row != pad).sum() if stop is not None
                                                     else len(row))
  return total


def torch_runner(ref, prompt: np.ndarray, new: int, stop: int | None, variant: str):
  """A no-grad `generate` call of one torch variant (see the module doc)."""
  import copy
  import torch
  ids = torch.tensor(prompt)
  kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
            pad_token_id=0, eos_token_id=stop, disable_compile=True)
  if stop is None:
    kw["min_new_tokens"] = new
  if variant in ("static", "compile"):
    kw["cache_implementation"] = "static"
  model = ref
  if variant == "compile":  # transformers auto-compiles on accelerators only: compile here
    model = copy.deepcopy(ref)
    model.forward = torch.compile(model.forward, dynamic=False)

  def run():
    with torch.no_grad():
      return model.generate(ids, **kw).numpy()
  return run


def cases(args):
  for b in args.batches:
    for stop in (False, True):
      yield b, stop


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--presets", default="tiny,small")
  p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x],
                 default=[1, 8, 32])
  p.add_argument("--prompt", type=int, default=16)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count(),
                 help="torch threads (default: the cores XLA:CPU uses)")
  p.add_argument("--torch_variants", default="eager,static,compile")
  args = p.parse_args(argv)
  import torch
  import transformers

  torch.set_num_threads(args.threads)
  variants = [v for v in args.torch_variants.split(",") if v]
  print(f"backend {jax.default_backend()} ({os.cpu_count()} cores), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"prompt {args.prompt}, up to {args.new} new tokens, greedy; load "
        f"{os.getloadavg()[0]:.2f}")
  print("| preset | batch | stop | jaxpref tok/s | compile s | " +
        " | ".join(f"torch {v} tok/s | x" for v in variants) + " | torch first-call extra s"
        " (" + "/".join(variants) + ") | same tokens |")
  print("|---|---|---|---|---|" + "---|---|" * len(variants) + "---|---|")
  rows = []
  for preset in args.presets.split(","):
    cfg = models.get_config(preset)
    model = models.Decoder(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as d:
      hf.save(model, cfg, d)
      ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    for b, with_stop in cases(args):
      prompt = np.random.default_rng(b).integers(3, cfg.vocab_size, (b, args.prompt))
      stop = None
      if with_stop:  # the token row 0 emits halfway: rows stop at different steps
        greedy = sampler.generate(model, prompt, max_new_tokens=args.new).tokens
        stop = int(np.asarray(greedy)[0, args.prompt + args.new // 2])
      run_jax = lambda: np.asarray(jax.block_until_ready(sampler.generate(
          model, prompt, max_new_tokens=args.new, stop_tokens=() if stop is None else (stop,),
          pad_id=0).tokens))
      first, t_jax, ours = timed(run_jax, args.reps)
      row = {"preset": preset, "batch": b, "stop": with_stop,
             "jaxpref_tok_s": new_tokens(ours, args.prompt, stop, 0) / t_jax,
             "jaxpref_compile_s": first - t_jax}
      theirs = None
      for v in variants:
        try:
          first_t, t_t, out = timed(torch_runner(ref, prompt, args.new, stop, v), args.reps)
        except Exception as e:  # noqa: BLE001 - a variant this machine cannot build is reported
          row[f"torch_{v}"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
          continue
        row[f"torch_{v}_tok_s"] = new_tokens(out, args.prompt, stop, 0) / t_t
        row[f"torch_{v}_compile_s"] = first_t - t_t
        theirs = out if theirs is None else theirs
      n = min(ours.shape[1], theirs.shape[1]) if theirs is not None else 0
      row["same"] = (float(np.mean(ours[:, args.prompt:n] == theirs[:, args.prompt:n]))
                     if theirs is not None else float("nan"))
      rows.append(row)
      cells = []
      for v in variants:
        if f"torch_{v}_tok_s" in row:
          cells.append(f"{row[f'torch_{v}_tok_s']:,.0f} | x{row['jaxpref_tok_s'] / row[f'torch_{v}_tok_s']:.2f}")
        else:
          cells.append(f"{row[f'torch_{v}']} | -")
      print(f"| {preset} | {b} | {'yes' if with_stop else 'no'} | {row['jaxpref_tok_s']:,.0f} | "
            f"{row['jaxpref_compile_s']:.1f} | " + " | ".join(cells) + " | "
            + " / ".join(f"{row.get(f'torch_{v}_compile_s', float('nan')):.1f}" for v in variants)
            + f" | {row['same']:.1%} |",
            flush=True)
  return rows


if __name__ == "__main__":
  main()
