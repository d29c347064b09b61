"""Shared-prompt packing vs separate sequences: tokens computed and train-step time.

  python benchmarks/shared_prompt.py [--preset=small] [--prompt=1024] [--response=256]
                                     [--ks=2,4] [--batch=1] [--steps=3]

For each K, one batch of groups (random token ids; each group's K responses share its
prompt) runs through the same jitted train step (policy forward+backward, reference forward;
DPO for K = 2, ListMLE for K > 2) laid out both ways, in the same process; prints token positions computed, the
median step time of `--steps` after a warm-up, and the ratios separate / packed.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from flax import nnx

from jaxpref import losses, models
from jaxpref.data.shared_prompt import pack, tokens_computed
from jaxpref.train.reference import Reference
from jaxpref.train.roles import policy
from jaxpref.train.step import TrainState, make_steps
from jaxpref.types import GroupBatch


def group_batch(b, k, prompt, response, vocab, seed=0) -> GroupBatch:
  """BOS + prompt + response_k for every member; loss on the response tokens."""
  rng = np.random.default_rng(seed)
  t = 1 + prompt + response
  tokens = np.zeros((b, k, t), np.int32)
  tokens[:, :, 0] = 2
  tokens[:, :, 1:1 + prompt] = rng.integers(4, vocab, (b, 1, prompt))
  tokens[:, :, 1 + prompt:] = rng.integers(4, vocab, (b, k, response))
  loss_mask = np.zeros((b, k, t), np.float32)
  loss_mask[:, :, 1 + prompt:] = 1
  return GroupBatch(tokens=tokens, loss_mask=loss_mask, segment_ids=np.ones((b, k, t), np.int32),
                    valid=np.ones((b, k), bool), weight=np.ones((b,), np.float32))


def time_step(train_step, state, ref, batch, steps):
  state, m = train_step(state, ref, batch)  # compile + warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = train_step(state, ref, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), float(m["loss"])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--prompt", type=int, default=1024)
  p.add_argument("--response", type=int, default=256)
  p.add_argument("--ks", default="2,4")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=3)
  args = p.parse_args()
  cfg = models.get_config(args.preset, max_len=max(4096, 1 + args.prompt + args.response))
  print(f"backend {jax.default_backend()}, preset {args.preset}, prompt {args.prompt}, "
        f"response {args.response}, batch {args.batch} group(s), train step (policy fwd+bwd, "
        "reference fwd)")
  print("| K | tokens separate | tokens packed | ratio | step s separate | step s packed | "
        "ratio | loss separate / packed |")
  print("|---|---|---|---|---|---|---|---|")
  for k in (int(x) for x in args.ks.split(",")):
    graphdef, params = nnx.split(models.Decoder(cfg, rngs=nnx.Rngs(0)))
    opt = optax.adamw(1e-4)
    loss = "dpo" if k == 2 else "listmle"  # the loss does not touch the layout
    train_step, _ = make_steps(policy.forward(graphdef), losses.bind(loss, {}), opt)
    ref = Reference("model", jax.tree.map(lambda x: x.copy(), params))
    sep = group_batch(args.batch, k, args.prompt, args.response, cfg.vocab_size)
    packed = pack(sep)
    row = []
    for batch in (sep, packed):
      state = TrainState(step=np.int32(0), params=jax.tree.map(lambda x: x.copy(), params),
                         opt_state=opt.init(params))
      row.append(time_step(train_step, state, ref, batch, args.steps))
    (ts, ls), (tp, lp) = row
    ns, np_ = tokens_computed(sep), tokens_computed(packed)
    print(f"| {k} | {ns} | {np_} | {ns / np_:.2f}x | {ts:.3f} | {tp:.3f} | {ts / tp:.2f}x | "
          f"{ls:.4f} / {lp:.4f} |", flush=True)


if __name__ == "__main__":
  main()
