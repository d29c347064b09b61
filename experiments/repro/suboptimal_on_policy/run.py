"""Suboptimal on-policy data on a 100-response bandit: GRPO, online DPO, offline DPO, SFT.

  python experiments/repro/suboptimal_on_policy/run.py --out=runs/suboptimal_on_policy

writes DIR/curves.npz (expected reward and mass on the reward's argmax after every step,
per method, learning rate and seed), DIR/table.md and DIR/curves.png. The world is the
didactic bandit of Tajwar et al. 2024 (its official `bandit_experiment/` code): 100
responses, a reference that puts 0.2% of its mass on the reward's peak. Every method
trains the same tabular policy (softmax over 100 logits, starting at the reference) with
the registered jaxpref losses (`grpo`, `dpo`, `sft`) on `Logps` built from its log-probs.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpref import losses
from jaxpref.losses import advantages
from jaxpref.types import Logps

SFT_ALL, SFT_PAIRS = "SFT on best samples", "SFT on DPO's chosen"
METHODS = ("GRPO", "online DPO", "offline DPO", SFT_ALL, SFT_PAIRS)
# Which policy each method samples its groups from.
ON_POLICY = {"GRPO": True, "online DPO": True, "offline DPO": False, SFT_ALL: True,
             SFT_PAIRS: True}


def reference_logp(n=100, loc=-0.7, scale=0.4) -> np.ndarray:
  """log pi_ref [n]: the law of tanh(Cauchy(loc, scale)) binned into n equal bins of [-1, 1]
  (the paper's reference, computed from the CDF instead of a 10,000-draw histogram, so no
  bin is empty)."""
  edges = np.linspace(-1.0, 1.0, n + 1)
  with np.errstate(divide="ignore"):  # arctanh(+-1) = +-inf: the outer bins take the tails
    cdf = 0.5 + np.arctan((np.arctanh(edges) - loc) / scale) / np.pi
  return np.log(np.diff(cdf))


def reward(n=100, peak=70, width=10.0) -> np.ndarray:
  """r(a) = exp(-((a - peak) / width)^2) on the bin index: the paper's "misaligned" reward."""
  return np.exp(-((np.arange(n) - peak) / width) ** 2)


def _pairs(y, r, min_gap):
  """Each group's best and worst sample as (chosen, rejected) [B, 2], and weight [B]: 1 when
  their rewards differ by at least min_gap (the paper keeps pairs with a gap >= 0.2)."""
  best = jnp.take_along_axis(y, jnp.argmax(r[y], 1)[:, None], 1)[:, 0]
  worst = jnp.take_along_axis(y, jnp.argmin(r[y], 1)[:, None], 1)[:, 0]
  return jnp.stack([best, worst], 1), (r[best] - r[worst] >= min_gap).astype(jnp.float32)


def make_loss(method, logref, r, min_gap=0.2, dpo_beta=0.1):
  """loss(theta, y [B, K]) -> scalar: the registered loss on the samples' log-probs. A
  response is one token, so sequence and token log-probs are the same number."""
  get = losses.get

  def seq(theta, y):
    """Logps for groups y: policy and reference log-probs, length 1, all valid."""
    lp = jax.nn.log_softmax(theta)
    ones = jnp.ones(y.shape, jnp.float32)
    return Logps(policy=lp[y], ref=logref[y], length=ones, valid=ones > 0,
                 weight=jnp.ones(y.shape[:1], jnp.float32))

  if method == "GRPO":
    def grpo(theta, y):
      base = seq(theta, y)
      adv = advantages.compute("grpo", r[y], base.valid)
      lp = Logps(policy=base.policy, ref=base.ref, length=base.length, valid=base.valid,
                 weight=base.weight, policy_tok=base.policy[..., None],
                 ref_tok=base.ref[..., None], mask=base.length[..., None], advantages=adv)
      return get("grpo")(lp)[0]  # its defaults: clip 0.2, beta 0.04 with k3
    return grpo

  def pairwise(theta, y):
    yy, w = _pairs(y, r, min_gap)
    lp = seq(theta, yy)
    lp = Logps(policy=lp.policy, ref=lp.ref, length=lp.length, valid=lp.valid, weight=w)
    if method == SFT_ALL:  # the paper's best-of-N SFT: every group's best sample
      lp = Logps(policy=lp.policy, ref=lp.ref, length=lp.length, valid=lp.valid,
                 weight=jnp.ones_like(w))
    if method in (SFT_ALL, SFT_PAIRS):  # SFT_PAIRS: the chosen halves of online DPO's pairs
      return get("sft")(lp)[0]
    return get("dpo")(lp, beta=dpo_beta)[0]
  return pairwise


def run_method(method, lrs, seeds, steps=600, groups=16, k=8, n=100, peak=70):
  """{"reward", "peak"}: float arrays [len(lrs), len(seeds), steps + 1], the policy's exact
  expected reward and its mass on `peak` before every step and after the last. One step:
  `groups` groups of k samples (from the policy, or from the reference for offline DPO,
  fresh every step, so every method sees the same number of labels), one Adam step."""
  logref = jnp.asarray(reference_logp(n), jnp.float32)
  r = jnp.asarray(reward(n, peak), jnp.float32)
  loss = make_loss(method, logref, r)
  adam = optax.scale_by_adam()
  on_policy = ON_POLICY[method]

  def one(seed, lr):
    def body(carry, key):
      theta, state = carry
      pi = jax.nn.softmax(theta)
      y = jax.random.categorical(key, theta if on_policy else logref, shape=(groups, k))
      upd, state = adam.update(jax.grad(loss)(theta, y), state)
      return (theta - lr * upd, state), (jnp.sum(pi * r), pi[peak])

    keys = jax.random.split(jax.random.key(seed), steps)
    (last, _), (er, pk) = jax.lax.scan(body, (logref, adam.init(logref)), keys)
    pi = jax.nn.softmax(last)
    return (jnp.append(er, jnp.sum(pi * r)), jnp.append(pk, pi[peak]))

  fn = jax.jit(jax.vmap(jax.vmap(one, (0, None)), (None, 0)))
  er, pk = fn(jnp.asarray(seeds), jnp.asarray(lrs, jnp.float32))
  return {"reward": np.asarray(er), "peak": np.asarray(pk)}


def first_at(curve: np.ndarray, level: float) -> int:
  """The first step at which the curve is >= level (-1: never)."""
  hit = np.nonzero(curve >= level)[0]
  return int(hit[0]) if hit.size else -1


def summary(res, level=0.9):
  """Per seed: final expected reward, final mass on the peak, first step >= level."""
  er, pk = res["reward"], res["peak"]
  return er[..., -1], pk[..., -1], np.apply_along_axis(first_at, -1, er, level)


def _steps_cell(hits: np.ndarray) -> str:
  ok = hits[hits >= 0]
  if ok.size == 0:
    return f"never (0/{hits.size})"
  return f"{np.median(ok):.0f} ({ok.min()}-{ok.max()}, {ok.size}/{hits.size})"


def table(results, lrs, level=0.9) -> str:
  """Markdown rows per (learning rate, method): mean +- std over seeds of the final expected
  reward and mass on the peak, the median (min-max, seeds reaching) first step at level."""
  rows = ["| lr | method | expected reward, final | mass on the peak, final | "
          f"first step with expected reward >= {level:g} |", "|---|---|---|---|---|"]
  for i, lr in enumerate(lrs):
    for m, res in results.items():
      fin, pk, hits = (x[i] for x in summary(res, level))
      rows.append(f"| {lr:g} | {m} | {fin.mean():.3f} +- {fin.std():.3f} | "
                  f"{pk.mean():.3f} +- {pk.std():.3f} | {_steps_cell(hits)} |")
  return "\n".join(rows)


def plot(results, lrs, path: str, lr_index: int, ref_er: float, ref_peak: float) -> None:
  """Expected reward and mass on the peak against step at lrs[lr_index], mean over seeds
  with the min-max band."""
  import matplotlib  # plotting only: the run itself needs no display
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=72)
  for ax, key, ref, label in ((axes[0], "reward", ref_er, "expected reward"),
                              (axes[1], "peak", ref_peak, "mass on the reward's argmax")):
    for m, res in results.items():
      c = res[key][lr_index]
      x = np.arange(c.shape[-1])
      line, = ax.plot(x, c.mean(0), label=m)
      ax.fill_between(x, c.min(0), c.max(0), color=line.get_color(), alpha=0.2)
    ax.axhline(ref, color="gray", ls=":", lw=1, label="reference")
    ax.set_xlabel("step (16 groups x 8 samples)")
    ax.set_ylabel(label)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Adam lr = {lrs[lr_index]:g}, {next(iter(results.values()))[key].shape[1]} "
                 "seeds", fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--seeds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--lrs", default="0.01,0.03,0.1", help="Adam learning rates, each for all")
  ap.add_argument("--plot_lr", type=float, default=0.03)
  a = ap.parse_args()
  os.makedirs(a.out, exist_ok=True)
  lrs = [float(x) for x in a.lrs.split(",")]
  t0 = time.perf_counter()
  results = {m: run_method(m, lrs, list(range(a.seeds)), a.steps) for m in METHODS}
  sec = time.perf_counter() - t0
  ref = np.exp(reference_logp())
  ref_er, ref_peak = float(ref @ reward()), float(ref[70])
  head = (f"reference: expected reward {ref_er:.3f}, mass on the peak {ref_peak:.4f}; "
          f"{a.seeds} seeds, {a.steps} steps; {sec:.1f} s with compiles\n\n")
  md = head + table(results, lrs) + "\n"
  with open(os.path.join(a.out, "table.md"), "w") as f:
    f.write(md)
  np.savez(os.path.join(a.out, "curves.npz"),
           **{f"{m}/{k}": v for m, res in results.items() for k, v in res.items()},
           lrs=np.asarray(lrs))
  plot(results, lrs, os.path.join(a.out, "curves.png"), lrs.index(a.plot_lr), ref_er, ref_peak)
  print(md)


if __name__ == "__main__":
  main()
