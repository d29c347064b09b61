"""Train-step speed: frozen reference model vs precomputed reference log-probs.

  python benchmarks/reference_modes.py [--preset=tiny] [--batch_size=32] [--steps=50]

Both steps run on the same batches of the shipped tiny data in one process (after one
warm-up step each); prints each mode's steps/s, the ratio precomputed/model, and the bytes
of reference parameters the precomputed mode does not hold.
"""

import argparse
import os
import time

import jax
import numpy as np
from flax import nnx

from jaxpref import data as data_lib
from jaxpref import losses, models
from jaxpref.data import make_tiny
from jaxpref.train.config import OptimConfig
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.reference import Reference
from jaxpref.train.roles import policy
from jaxpref.train.roles.policy import precompute_reference
from jaxpref.train.step import TrainState, make_steps

TINY = make_tiny.OUT


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--max_len", type=int, default=32)
  parser.add_argument("--steps", type=int, default=50)
  args = parser.parse_args()

  tok = data_lib.Tokenizer.load(os.path.join(TINY, "tokenizer.model"))
  records, _ = data_lib.read_pairs(os.path.join(TINY, "train.jsonl"))
  ds = data_lib.PairDataset(records, tok, args.max_len)
  model = models.Decoder(models.get_config(args.preset, vocab_size=max(512, tok.vocab_size)),
                         rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  ref = jax.tree.map(lambda x: x.copy(), params)
  optimizer = make_optimizer(OptimConfig(), args.steps)
  train_step, _ = make_steps(policy.forward(graphdef), losses.get("dpo"), optimizer)
  batches = [ds.batch(data_lib.batch_indices(ds.n, args.batch_size, s, 0)) for s in range(args.steps)]
  ds.ref_logps = precompute_reference(graphdef, ref, ds, 256, lambda b: b)
  pre_batches = [ds.batch(data_lib.batch_indices(ds.n, args.batch_size, s, 0)) for s in range(args.steps)]

  results = {}
  for mode, bs, reference in (("model", batches, Reference("model", ref)),
                              ("precomputed", pre_batches, Reference("precomputed"))):
    state = TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params))
    state, m = train_step(jax.tree.map(lambda x: x.copy(), state), reference, bs[0])  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for b in bs:
      state, m = train_step(state, reference, b)
    jax.block_until_ready(m)
    rate = args.steps / (time.perf_counter() - t0)
    results[mode] = rate
    print(f"{mode:12s} {rate:8.1f} steps/s")
  ref_bytes = sum(x.nbytes for x in jax.tree.leaves(ref))
  print(f"precomputed/model: speed x{results['precomputed'] / results['model']:.2f}; reference "
        f"parameters not held: {ref_bytes / 2**20:.1f} MiB  "
        f"(preset {args.preset}, batch {args.batch_size} pairs, {args.max_len} tokens, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s))")


if __name__ == "__main__":
  main()
