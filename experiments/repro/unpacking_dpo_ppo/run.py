"""Data x algorithm x reward-model size on the toy task ("Unpacking DPO and PPO").

  python experiments/repro/unpacking_dpo_ppo/run.py --out=runs/unpacking_dpo_ppo --seeds=0

Per seed and per data set (the tiny pairs as shipped, "clean", and the same pairs with a
seeded --flip fraction of chosen/rejected swapped, "noisy", written into the run folder):
offline DPO from the SFT policy on the pairs (dpo.flags), two BT reward models trained from
scratch on them (rm.flags, the tiny preset; rm_small.flags, about a fifth of it), and PPO
and GRPO from the SFT policy against each (ppo.flags, grpo.flags). Every final policy is scored
on the 8 held-out prompts by the verifier, greedily and at temperature 1 (64 samples).
Writes DIR/table.md, DIR/results.json, DIR/unpacking.png and every run under
DIR/seed<S>/<data>/ (what exists there is not run again). Needs the SFT policy of
experiments/online/sft.flags (--sft).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
TINY = os.path.join(ROOT, "jaxpref", "data", "tiny")
BIN = os.path.dirname(sys.executable)  # the console scripts of this environment
DATA = ("clean", "noisy")
RMS = ("tiny", "small")  # rm.flags, rm_small.flags
ONLINE_ALGOS = ("ppo", "grpo")
CELLS = [("dpo", None)] + [(a, rm) for a in ONLINE_ALGOS for rm in RMS]
LABEL = {"dpo": "DPO (offline)", "ppo": "PPO", "grpo": "GRPO"}


def _verifier():
  spec = importlib.util.spec_from_file_location(
      "tiny_verifier", os.path.join(ROOT, "examples", "rewards", "tiny_verifier.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.reward


def _sh(log: str, *args: str) -> None:
  """Runs a jaxpref console script from the repository root; its output goes to `log`."""
  with open(log, "w") as f:
    done = subprocess.run([os.path.join(BIN, args[0]), *args[1:]], cwd=ROOT, stdout=f,
                          stderr=subprocess.STDOUT)
  if done.returncode:
    raise SystemExit(f"{args[0]} failed (exit {done.returncode}); see {log}")


def _read(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def flip_labels(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[int]]:
  """Swaps chosen and rejected in exactly round(fraction * n) records, picked by a seeded
  permutation (not a coin per record: the stated fraction is then the realised one). Each
  record gets `flipped`; returns the records and the flipped indices, sorted."""
  n = len(records)
  idx = sorted(np.random.default_rng(seed).permutation(n)[:int(round(fraction * n))].tolist())
  chosen = set(idx)
  out = []
  for i, r in enumerate(records):
    r = dict(r, flipped=i in chosen)
    if r["flipped"]:
      r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    out.append(r)
  return out, idx


def write_data(d: str, data: str, flip: float, seed: int, source: str | None = None) -> str:
  """The cell's preference pairs: the shipped file for clean, a flipped copy in `d` for noisy
  (flip seed = the run seed, so each seed sees other flips)."""
  source = source or os.path.join(TINY, "train.jsonl")
  if data == "clean":
    return source
  path = os.path.join(d, "train_noisy.jsonl")
  if not os.path.isfile(path):
    recs, _ = flip_labels(_read(source), flip, seed)
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in recs)
  return path


def scores(samples: list[dict]) -> np.ndarray:
  return np.asarray(_verifier()([s["prompt"] for s in samples],
                                [s["responses"] for s in samples]), np.float64)


def generate(stem: str, k: int, temperature: float, seed: int, model_args) -> list[dict]:
  """jaxpref-generate on the held-out prompts into STEM.jsonl (kept: an existing file is read
  back), with the online toy's 12-token cap, as online_vs_offline/run.py does."""
  out = stem + ".jsonl"
  if not os.path.isfile(out):
    _sh(stem + ".log", "jaxpref-generate", *model_args,
        f"--prompts={os.path.join(TINY, 'prompts_eval.jsonl')}", f"--samples_out={out}",
        f"--online.num_generations={k}", f"--online.temperature={temperature}",
        "--online.max_new_tokens=12", f"--seed={seed}", "--generate_batch=512")
  return _read(out)


def evaluate(d: str, name: str, seed: int, model_args, samples: int = 64) -> dict:
  greedy = generate(os.path.join(d, f"{name}_greedy"), 1, 0.0, seed, model_args)
  out = {"greedy": float(scores(greedy).mean())}
  if samples:
    sampled = generate(os.path.join(d, f"{name}_t1"), samples, 1.0, seed, model_args)
    out["sampled"] = float(scores(sampled).mean())
  return out


def _train(d: str, name: str, flags: str, args: list[str]) -> tuple[str, float]:
  """One jaxpref-train run into d/name unless it finished before; its wall time (0 if kept)."""
  run = os.path.join(d, name)
  if os.path.isfile(os.path.join(run, "final_metrics.json")):
    return run, 0.0
  t = time.time()
  _sh(os.path.join(d, name + ".log"), "jaxpref-train", f"--flagfile={os.path.join(HERE, flags)}",
      f"--workdir={run}", *args)
  return run, time.time() - t


def run_rm(d: str, size: str, pairs: str, seed: int, extra=()) -> dict:
  run, wall = _train(d, f"rm_{size}", "rm.flags" if size == "tiny" else "rm_small.flags",
                     [f"--train_data={pairs}", f"--seed={seed}", *extra])
  with open(os.path.join(run, "final_metrics.json")) as f:
    return {"run": run, "accuracy": json.load(f)["rewards/accuracy"], "wall_s": wall}


def run_cell(d: str, algo: str, rm: dict | None, pairs: str, seed: int, sft: str, extra=(),
             samples: int = 64, name: str = "") -> dict:
  """One policy cell: offline DPO on `pairs`, or PPO/GRPO against the reward model run `rm`;
  then its held-out scores. Online cells' greedy score is their own last eval reward/mean
  (the same greedy verifier score the offline cell gets from jaxpref-generate)."""
  init = [f"--init_from={sft}"]
  if algo == "dpo":
    name = name or "dpo"
    # DPO starts from the SFT weights and samples nothing, so --seed alone would leave the
    # seeds' runs identical: the data order is what varies (the RMs' --seed varies their init)
    run, wall = _train(d, name, "dpo.flags", [*init, f"--train_data={pairs}", f"--seed={seed}",
                                              f"--data_seed={seed}", *extra])
    res = evaluate(d, name, seed, [f"--run={run}"], samples)
  else:
    name = name or f"{algo}_{os.path.basename(rm['run'])[3:]}"
    run, wall = _train(d, name, f"{algo}.flags", [*init, f"--online.reward_model={rm['run']}",
                                                  f"--seed={seed}", *extra])
    ev = [r for r in _read(os.path.join(run, "metrics.jsonl")) if r["split"] == "eval"]
    tr = [r for r in _read(os.path.join(run, "metrics.jsonl")) if r["split"] == "train"]
    res = evaluate(d, name, seed, [f"--run={run}"], samples)
    res.update(greedy_generate=res["greedy"], greedy=ev[-1]["reward/mean"],
               eval_curve=[(r["step"], r["reward/mean"]) for r in ev],
               train_rm_reward=[tr[0]["reward/mean"], tr[-1]["reward/mean"]],
               length=ev[-1].get("length/mean"))
  return {**res, "wall_s": wall}


def run_seed(out: str, seed: int, sft: str, flip: float) -> dict:
  res = {"seed": seed}
  for data in DATA:
    d = os.path.join(out, f"seed{seed}", data)
    os.makedirs(d, exist_ok=True)
    pairs = write_data(d, data, flip, seed)
    rms = {size: run_rm(d, size, pairs, seed) for size in RMS}
    cells = {"dpo": run_cell(d, "dpo", None, pairs, seed, sft)}
    for algo in ONLINE_ALGOS:
      for size in RMS:
        cells[f"{algo}_{size}"] = run_cell(d, algo, rms[size], pairs, seed, sft)
    # Outside the grid: DPO at a tenth of the learning rate, as the paper tunes DPO's apart
    # from PPO's (is DPO's result its own or the shared learning rate's?).
    cells["dpo_lr1e-4"] = run_cell(d, "dpo", None, pairs, seed, sft,
                                   extra=["--learning_rate=1e-4"], name="dpo_lr1e-4")
    res[data] = {"rm": rms, "cells": cells}
  # Outside the grid: PPO with the verifier itself as the reward, a perfect reward model
  # (what the BT models stand in for); no preference data.
  d = os.path.join(out, f"seed{seed}", "gold")
  os.makedirs(d, exist_ok=True)
  res["gold"] = run_cell(d, "ppo", {"run": "rm_verifier"}, "", seed, sft,
                         extra=["--online.reward=fn", "--online.reward_model="])
  return res


def aspects(acc: dict) -> list[dict]:
  """The gain of each of the paper's better choices, from acc[data][cell] = accuracy (cell:
  dpo, ppo_tiny, ...), averaged over the other axes; ranked by that signed gain, so a choice
  that hurt on the toy ranks below one that did nothing. Paper order: data > algorithm > RM."""
  cells = [c for c in acc["clean"]]
  online = [c for c in cells if c != "dpo"]
  ppo = [c for c in online if c.startswith("ppo")]
  gains = {
      "data (clean vs noisy pairs)": np.mean([acc["clean"][c] - acc["noisy"][c] for c in cells]),
      "algorithm (PPO vs DPO)": np.mean([np.mean([acc[d][c] for c in ppo]) - acc[d]["dpo"]
                                         for d in DATA]),
      "reward model (tiny vs small)": np.mean(
          [acc[d][c] - acc[d][c.replace("tiny", "small")] for d in DATA for c in online
           if c.endswith("tiny")]),
  }
  paper = {k: i + 1 for i, k in enumerate(gains)}
  order = sorted(gains, key=lambda k: -gains[k])
  return [{"aspect": k, "gain": float(gains[k]), "rank": order.index(k) + 1,
           "paper_rank": paper[k]} for k in gains]


def mean_acc(results: list[dict], key: str, dpo: str = "dpo") -> dict:
  """acc[data][cell], the mean over seeds of `key` (greedy or sampled); `dpo` names the run
  that stands in the DPO cell (dpo, or dpo_lr1e-4 outside the grid)."""
  return {d: {f"{a}_{rm}" if rm else a: float(np.mean([
      r[d]["cells"][f"{a}_{rm}" if rm else dpo][key] for r in results])) for a, rm in CELLS}
          for d in DATA}


def _fmt(vals: list[float]) -> str:
  """The mean, and with several seeds each seed's value after it."""
  return f"{np.mean(vals):.3f}" + (f" ({' / '.join(f'{v:.3f}' for v in vals)})"
                                   if len(vals) > 1 else "")


def table(sft_eval: dict, results: list[dict], flip: float) -> str:
  n = len(results)
  rows = ["| data | algorithm | reward model | RM held-out pair accuracy | held-out greedy "
          "accuracy | held-out accuracy at T=1 (64 samples) |", "|---|---|---|---|---|---|",
          f"| - | SFT (start) | - | - | {sft_eval['greedy']:.3f} | {sft_eval['sampled']:.3f} |"]
  names = {"clean": "clean", "noisy": f"noisy ({flip:.0%} flipped)"}
  for d, name in names.items():
    for a, rm in CELLS:
      c = [r[d]["cells"][f"{a}_{rm}" if rm else a] for r in results]
      rma = _fmt([r[d]["rm"][rm]["accuracy"] for r in results]) if rm else "-"
      rows.append(f"| {name} | {LABEL[a]} | {rm or '-'} | {rma} | "
                  f"{_fmt([x['greedy'] for x in c])} | {_fmt([x['sampled'] for x in c])} |")
  rows += ["", "Outside the grid (not in the aspects below):", "", rows[0], rows[1]]
  for d in DATA:
    c = [r[d]["cells"]["dpo_lr1e-4"] for r in results]
    rows.append(f"| {names[d]} | DPO (offline), learning rate 1e-4 | - | - | "
                f"{_fmt([x['greedy'] for x in c])} | {_fmt([x['sampled'] for x in c])} |")
  c = [r["gold"] for r in results]
  rows.append(f"| none | PPO | the verifier (a perfect RM) | - | "
              f"{_fmt([x['greedy'] for x in c])} | {_fmt([x['sampled'] for x in c])} |")
  for dpo, how in (("dpo", "the grid's DPO (learning rate 1e-3)"),
                   ("dpo_lr1e-4", "DPO at learning rate 1e-4 in place of the grid's")):
    rows += ["", f"Aspects, {how} (mean over {n} seed{'s' * (n > 1)} and the other axes; "
             "gain of the paper's better choice, in held-out accuracy):", "",
             "| aspect | gain, greedy | rank here (greedy) | gain, T=1 | rank here (T=1) | "
             "paper's rank |", "|---|---|---|---|---|---|"]
    for ag, as_ in zip(aspects(mean_acc(results, "greedy", dpo)),
                       aspects(mean_acc(results, "sampled", dpo))):
      rows.append(f"| {ag['aspect']} | {ag['gain']:+.3f} | {ag['rank']} | {as_['gain']:+.3f} | "
                  f"{as_['rank']} | {ag['paper_rank']} |")
  return "\n".join(rows)


def plot(sft_eval: dict, results: list[dict], path: str) -> None:
  """Per cell, clean and noisy bars side by side: greedy (left) and T=1 (right) accuracy."""
  import matplotlib  # plotting only: the runs themselves need no display
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=72)
  names = [f"{LABEL[a]}\n{'RM ' + rm if rm else 'no RM'}" for a, rm in CELLS]
  x = np.arange(len(CELLS))
  for ax, key, title in zip(axes, ("greedy", "sampled"),
                            ("held-out greedy accuracy (8 prompts)",
                             "held-out accuracy at T=1 (64 x 8 samples)")):
    acc = mean_acc(results, key)
    for i, d in enumerate(DATA):
      ax.bar(x + (i - 0.5) * 0.4, [acc[d][f"{a}_{rm}" if rm else a] for a, rm in CELLS], 0.4,
             label=f"{d} pairs")
    ax.axhline(sft_eval[key], color="gray", ls=":", label="SFT (start)")
    ax.axhline(np.mean([r["gold"][key] for r in results]), color="green", ls="--",
               label="PPO, verifier as reward")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylim(0, 1.3)  # head room for the legend above the verifier-reward line
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper center")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--flip", type=float, default=0.35, help="share of noisy labels swapped")
  ap.add_argument("--sft", default="runs/online/sft_hf",
                  help="the SFT policy (experiments/online/sft.flags' export)")
  a = ap.parse_args()
  out = os.path.abspath(a.out)
  os.makedirs(out, exist_ok=True)
  sft = a.sft if os.path.isabs(a.sft) else os.path.join(ROOT, a.sft)
  if not os.path.isdir(sft):
    raise SystemExit(f"no SFT policy at {sft}: run experiments/online/sft.flags first")
  t = time.time()
  sft_eval = evaluate(out, "sft", 0, [f"--init_from={sft}", "--flagfile=experiments/online/"
                                      "base.flags"])
  results = [run_seed(out, int(s), sft, a.flip) for s in a.seeds.split(",")]
  md = table(sft_eval, results, a.flip) + "\n"
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"sft": sft_eval, "flip": a.flip, "seeds": results,
               **{f"aspects_{k}_{dpo}": aspects(mean_acc(results, k, dpo))
                  for k in ("greedy", "sampled") for dpo in ("dpo", "dpo_lr1e-4")}},
              f, indent=1)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(md)
  plot(sft_eval, results, os.path.join(out, "unpacking.png"))
  print(md)
  print(f"wall time of this call: {time.time() - t:.0f} s")


if __name__ == "__main__":
  main()
