"""KV-cache sampler tokens/s: jaxpref's `sampler.generate` vs transformers' `generate`.

  python benchmarks/sampler_speed.py [--presets=tiny,small] [--batch=8] [--prompt=16]
                                     [--new=128] [--reps=3]

For each preset, one random-weight Decoder is saved with `hf.save` and loaded by
transformers (torch, CPU), so both sides run the same weights. Both decode greedily,
`--new` tokens for each of `--batch` prompts of `--prompt` tokens, no stop token. Prints
new tokens/s (median of `--reps` timed calls after a warm-up), the ratio jaxpref /
transformers from the same run, jaxpref's compile time (first call minus a timed call,
reported apart) and the share of new tokens the two greedy outputs agree on.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from jaxpref import models
from jaxpref.models import hf, sampler


def timed(fn, reps):
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--presets", default="tiny,small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt", type=int, default=16)
  p.add_argument("--new", type=int, default=128)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args()
  import torch
  import transformers

  print(f"backend {jax.default_backend()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), batch {args.batch}, prompt {args.prompt}, "
        f"{args.new} new tokens, greedy")
  print("| preset | params | jaxpref tok/s | transformers tok/s | ratio | jaxpref compile s | "
        "same new tokens |")
  print("|---|---|---|---|---|---|---|")
  for preset in args.presets.split(","):
    cfg = models.get_config(preset)
    model = models.Decoder(cfg, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt))
    with tempfile.TemporaryDirectory() as d:
      hf.save(model, cfg, d)
      ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()

    run_jax = lambda: jax.block_until_ready(
        sampler.generate(model, prompt, max_new_tokens=args.new).tokens)
    t0 = time.perf_counter()
    run_jax()
    first = time.perf_counter() - t0
    t_jax, ours = timed(run_jax, args.reps)

    ids = torch.tensor(prompt)
    def run_hf():
      with torch.no_grad():
        return ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=args.new, min_new_tokens=args.new,
                            eos_token_id=None, pad_token_id=0).numpy()
    run_hf()  # warm-up
    t_hf, theirs = timed(run_hf, args.reps)

    n = args.batch * args.new
    same = float(np.mean(np.asarray(ours)[:, args.prompt:] == theirs[:, args.prompt:]))
    print(f"| {preset} | {models.count_params(model) / 1e6:.2f}M | {n / t_jax:.0f} | "
          f"{n / t_hf:.0f} | {t_hf / t_jax:.2f}x | {first - t_jax:.1f} | {same:.1%} |",
          flush=True)


if __name__ == "__main__":
  main()
