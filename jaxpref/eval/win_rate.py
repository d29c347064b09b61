"""`jaxpref-winrate`: the win rate of one sample file over another (two `jaxpref-generate`
outputs for the same prompts) under a reward or a pairwise judge, with a bootstrap
confidence interval and a plot.

  jaxpref-winrate --samples_a=grpo.jsonl --samples_b=sft.jsonl \\
      --reward_fn=examples/rewards/tiny_verifier.py:reward --winrate_out=runs/winrate

Response j of A meets response j of B for the same prompt. Under a reward (`--reward_fn`
and/or `--reward`, the online role's reward sources), A wins when its reward is higher, a
tie counts half. Under a pairwise judge (`--judge=FILE.py:name`, a function
`(prompt, a, b) -> P(a beats b)` in [0, 1]) each pair is judged in both orders and the
two verdicts averaged, `(judge(p, a, b) + 1 - judge(p, b, a)) / 2`, so a judge that
prefers the first position gains nothing from it. The interval resamples prompts with
replacement (`--bootstrap` times, seed 0). Writes OUT/win_rate.json and OUT/win_rate.png.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from jaxpref import cli_errors
from jaxpref.rewards import sources
from jaxpref.train import plots

flags.DEFINE_string("samples_a", None, "jaxpref-winrate: samples of model A (JSONL).")
flags.DEFINE_string("samples_b", None, "jaxpref-winrate: samples of model B, same prompts.")
flags.DEFINE_string("reward_fn", "", "jaxpref-winrate: FILE.py:name, a reward function.")
flags.DEFINE_string("reward", "", "jaxpref-winrate: a reward spec (rewards/sources.py).")
flags.DEFINE_string("judge", "", "jaxpref-winrate: FILE.py:name, prefer(prompt, a, b) -> P.")
flags.DEFINE_integer("bootstrap", 1000, "jaxpref-winrate: bootstrap resamples.")
flags.DEFINE_string("winrate_out", None, "jaxpref-winrate: output folder.")

FLAGS = flags.FLAGS


def read_samples(path: str) -> list[dict]:
  rows = []
  with open(path) as f:
    for line, text in enumerate(f, 1):
      if not text.strip():
        continue
      obj = json.loads(text)
      if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("responses"), list):
        raise cli_errors.DataError(f"{path}:{line}: expected {{prompt, responses: [...]}} "
                                   "(a jaxpref-generate file)")
      rows.append(obj)
  return rows


def outcomes(a: list[dict], b: list[dict], reward=None, judge=None) -> np.ndarray:
  """float64[N]: per prompt, A's mean score over its paired responses (1 win, 0.5 tie)."""
  if len(a) != len(b) or any(x["prompt"] != y["prompt"] for x, y in zip(a, b)):
    raise cli_errors.DataError("the two sample files must hold the same prompts in the same "
                               "order (jaxpref-generate on one prompts file)")
  k = min(min(len(x["responses"]) for x in a), min(len(y["responses"]) for y in b))
  prompts = [x["prompt"] for x in a]
  ra = [x["responses"][:k] for x in a]
  rb = [y["responses"][:k] for y in b]
  if judge is not None:
    win = np.array([[(judge(p, s, t) + 1.0 - judge(p, t, s)) / 2 for s, t in zip(xs, ys)]
                    for p, xs, ys in zip(prompts, ra, rb)], np.float64)
  else:
    sa, sb = np.asarray(reward(prompts, ra)), np.asarray(reward(prompts, rb))
    win = np.where(sa > sb, 1.0, np.where(sa == sb, 0.5, 0.0))
  return win.mean(axis=1)


def bootstrap(per_prompt: np.ndarray, n: int, seed: int = 0) -> tuple[float, float]:
  """The 2.5th and 97.5th percentiles of the mean over prompts resampled with replacement."""
  rng = np.random.default_rng(seed)
  means = per_prompt[rng.integers(0, len(per_prompt), (n, len(per_prompt)))].mean(axis=1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  return float(lo), float(hi)


def plot(result: dict, path: str) -> None:
  fig, ax = plots.plt.subplots(figsize=(5, 1.8))
  rate, (lo, hi) = result["win_rate"], result["ci95"]
  ax.barh([0], [rate], xerr=[[rate - lo], [hi - rate]], color="tab:blue", capsize=6)
  ax.axvline(0.5, color="k", lw=0.8, ls="--")
  ax.set_xlim(0, 1)
  ax.set_yticks([0], [f"{os.path.basename(result['a'])}\nvs {os.path.basename(result['b'])}"])
  ax.set_xlabel(f"win rate of A (95% CI, {result['prompts']} prompts)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plots.plt.close(fig)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("samples_a", "samples_b", "winrate_out"):
    if not FLAGS[name].value:
      raise cli_errors.FlagError(f"jaxpref-winrate: --{name} is required")
  if bool(FLAGS.judge) == bool(FLAGS.reward_fn or FLAGS.reward):
    raise cli_errors.FlagError("jaxpref-winrate: give a reward (--reward_fn/--reward) or a "
                               "pairwise --judge, one of the two")
  judge = sources.load_user_fn(FLAGS.judge) if FLAGS.judge else None
  reward = None if judge else sources.build(FLAGS.reward, reward_fn=FLAGS.reward_fn)
  per_prompt = outcomes(read_samples(FLAGS.samples_a), read_samples(FLAGS.samples_b),
                        reward, judge)
  result = {"a": FLAGS.samples_a, "b": FLAGS.samples_b, "prompts": len(per_prompt),
            "win_rate": float(per_prompt.mean()),
            "ci95": bootstrap(per_prompt, FLAGS.bootstrap),
            "judge": FLAGS.judge or "reward " + (FLAGS.reward or "fn") + (
                f" ({FLAGS.reward_fn})" if FLAGS.reward_fn else "")}
  os.makedirs(FLAGS.winrate_out, exist_ok=True)
  with open(os.path.join(FLAGS.winrate_out, "win_rate.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(FLAGS.winrate_out, "win_rate.png"))
  lo, hi = result["ci95"]
  print(f"win rate of A over B: {result['win_rate']:.3f} (95% CI {lo:.3f} to {hi:.3f}, "
        f"{result['prompts']} prompts); wrote {FLAGS.winrate_out}/win_rate.json and win_rate.png")


def run() -> None:
  cli_errors.entry_point(app.run)(main)


if __name__ == "__main__":
  run()
