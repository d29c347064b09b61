"""Train-step time and padding efficiency of --batching=pad, buckets and pack.

  python benchmarks/batching_modes.py [--preset=tiny] [--max_len=32] [--batch_size=32]

Every mode trains on its own first `--batches` batches of the shipped tiny data, in one
process; every row length is compiled first, then the modes take turns (`--rounds` times)
so that a busy machine slows them alike. Prints each mode's padding efficiency, median
ms per step and its ratio to `pad`.
"""

import argparse
import os
import time

import jax
import numpy as np
import optax
from flax import nnx

from jaxpref import data as data_lib
from jaxpref import losses, models
from jaxpref.data import make_tiny
from jaxpref.data.batching import Batcher, padding_efficiency
from jaxpref.train.reference import Reference
from jaxpref.train.roles import policy
from jaxpref.train.step import TrainState, make_steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--max_len", type=int, default=32)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--bucket_multiple", type=int, default=8)
  parser.add_argument("--pack_groups", type=int, default=4)
  args = parser.parse_args()

  tok = data_lib.Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))
  records, _ = data_lib.read_pairs(os.path.join(make_tiny.OUT, "train.jsonl"))
  ds = data_lib.PairDataset(records, tok, args.max_len)
  graphdef, params = nnx.split(models.Decoder(models.get_config(args.preset), rngs=nnx.Rngs(0)))
  optimizer = optax.adam(1e-4)
  step, _ = make_steps(policy.forward(graphdef), losses.bind("dpo", {}), optimizer)
  ref = Reference("model", params)  # the initial weights; the step donates only its state

  modes, states = {}, {}
  for mode in ("pad", "buckets", "pack"):
    b = Batcher(ds, args.batch_size, 0, mode, args.bucket_multiple, pack_groups=args.pack_groups)
    batches = [jax.device_put(b.batch(s)) for s in range(args.batches)]
    real, computed = np.sum([padding_efficiency(b.batch(s)) for s in range(args.batches)], 0)
    p = jax.tree.map(lambda x: x.copy(), params)
    state = TrainState(step=np.int32(0), params=p, opt_state=optimizer.init(p))
    for batch in batches:  # compiles every row length once
      state, metrics = step(state, ref, batch)
    jax.block_until_ready(metrics)
    modes[mode], states[mode] = (batches, real / computed, len(b.shapes_seen)), state

  times = {m: [] for m in modes}
  for _ in range(args.rounds):
    for mode, (batches, _, _) in modes.items():
      t0 = time.perf_counter()
      for batch in batches:
        states[mode], metrics = step(states[mode], ref, batch)
      jax.block_until_ready(metrics)
      times[mode].append((time.perf_counter() - t0) / len(batches))

  pad = np.median(times["pad"])
  print(f"{jax.devices()[0].platform}, preset {args.preset}, max_len {args.max_len}, batch "
        f"{args.batch_size}, {args.batches} batches x {args.rounds} rounds")
  for mode, (_, eff, shapes) in modes.items():
    ms = np.median(times[mode])
    print(f"{mode:8s} padding efficiency {eff:.3f}  {shapes} row shapes  {1e3 * ms:7.1f} ms/step  "
          f"x{pad / ms:.2f} vs pad")


if __name__ == "__main__":
  main()
