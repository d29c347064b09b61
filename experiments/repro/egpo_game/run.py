"""EGPO's tabular game: duality gap per iteration of EGPO, online IPO and Nash-MD.

  python experiments/repro/egpo_game/run.py --out=runs/egpo_game

writes DIR/gaps.npz (the gap per config and method, [iters + 1, games]), DIR/table.md
(per config: the median over games after 10 / 100 / 1000 iterations, the iteration from
which every game's gap stays below 1e-6, wall time) and DIR/gap.png. The game is the
construction of the paper's `simulations/` code (docs/game_methods.md#the-tabular-game),
drawn from numpy's generator with --seed, so not the paper's own numbers.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.losses import egpo

METHODS = ("EGPO", "Online IPO 1 (OMD)", "Online IPO 2", "Nash-MD")


def random_game(seed: int, games: int, n: int):
  """(P [games, n, n], theta_ref [games, n]): P's strictly lower triangle i.i.d. U(0, 1),
  the upper triangle 1 - P^T, the diagonal 1/2; reference logits N(0, 1)."""
  rng = np.random.default_rng(seed)
  low = np.tril(rng.uniform(size=(games, n, n)), -1)
  P = low + np.swapaxes(1.0 - low, -1, -2) * np.triu(np.ones((n, n)), 1) + 0.5 * np.eye(n)
  theta_ref = rng.standard_normal((games, n))
  return P, theta_ref


def run_all(seed=2018011309, games=10, n=10, beta=0.1, lr=0.1, iters=1000, methods=METHODS):
  """{method: (gaps float64 [iters + 1, games], seconds)}; the policy starts at pi_ref."""
  P, theta_ref = random_game(seed, games, n)
  out = {}
  with jax.enable_x64(True):
    P, theta_ref = jnp.asarray(P), jnp.asarray(theta_ref)
    for m in methods:
      fn = jax.jit(lambda t, p, m=m: egpo.run(m, t, t, p, beta, lr, iters))
      fn.lower(theta_ref, P).compile()  # time the iterations, not the compile
      t0 = time.perf_counter()
      gaps = np.asarray(jax.block_until_ready(fn(theta_ref, P)))
      out[m] = (gaps, time.perf_counter() - t0)
  return out


def first_below(gaps: np.ndarray, tol: float) -> int:
  """The first iteration from which every game's gap stays below tol (-1: never)."""
  worst = np.max(gaps, axis=1)  # [iters + 1]
  above = np.nonzero(worst >= tol)[0]
  if above.size == 0:
    return 0
  return -1 if above[-1] == worst.shape[0] - 1 else int(above[-1] + 1)


def table(results, tol=1e-6, at=(10, 100, 1000)) -> str:
  """Markdown rows: the median gap over games after `at` iterations, the first iteration
  from which every game's gap is below tol, the wall time."""
  at = [a for a in at if a < next(iter(results.values()))[0].shape[0]]
  head = ("| method | " + " | ".join(f"gap after {a}" for a in at)
          + f" | every game < {tol:g} from | wall time |")
  rows = [head, "|" + "---|" * (len(at) + 3)]
  for m, (g, sec) in results.items():
    med = np.median(g, axis=1)
    k = first_below(g, tol)
    rows.append(f"| {m} | " + " | ".join(f"{med[a]:.2e}" for a in at)
                + f" | {k if k >= 0 else 'never'} | {sec:.2f} s |")
  return "\n".join(rows)


def plot(panels, path: str) -> None:
  """One log-scale panel of median gap against iteration per (title, results)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), dpi=72)
  for ax, (title, results) in zip(np.atleast_1d(axes), panels):
    for m, (g, _) in results.items():
      # Gaps that reached 0 (or -1e-17 by rounding) are drawn at 1e-16.
      ax.plot(np.arange(g.shape[0]), np.maximum(np.median(g, axis=1), 1e-16), label=m)
    ax.set_yscale("log")
    ax.set_xlabel("iteration t")
    ax.set_ylabel("duality gap (median of games)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--seed", type=int, default=2018011309)
  ap.add_argument("--games", type=int, default=10)
  ap.add_argument("--n", type=int, default=10)
  ap.add_argument("--configs", default="0.1:0.1,0.01:0.02",
                  help="beta:lr pairs (the paper's exact tabular schedules)")
  ap.add_argument("--iters", type=int, default=1000)
  a = ap.parse_args()
  os.makedirs(a.out, exist_ok=True)
  panels, text, arrays = [], [], {}
  for cfg in a.configs.split(","):
    beta, lr = (float(x) for x in cfg.split(":"))
    res = run_all(a.seed, a.games, a.n, beta, lr, a.iters)
    title = f"beta={beta:g}, lr={lr:g}: N={a.n}, {a.games} games, seed {a.seed}"
    panels.append((title, res))
    text.append(f"{title}\n\n{table(res)}\n")
    arrays.update({f"beta{beta:g}/{m}": g for m, (g, _) in res.items()})
  np.savez(os.path.join(a.out, "gaps.npz"), **arrays)
  md = "\n".join(text)
  with open(os.path.join(a.out, "table.md"), "w") as f:
    f.write(md)
  plot(panels, os.path.join(a.out, "gap.png"))
  print(md)


if __name__ == "__main__":
  main()
