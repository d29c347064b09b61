"""Online DPO against offline DPO on the toy task, on the same number of preference labels.

  python experiments/repro/online_vs_offline/run.py --out=runs/online_vs_offline --seeds=0,1,2

Per seed: (1) online DPO, `experiments/online/online_dpo.flags` (100 steps of 16 prompts x
8 samples from the current policy, each group's best-vs-worst pair); (2) the same 1600
prompt draws (the 40 train prompts 40 times each) sampled once from the SFT policy, 8
samples each, scored by the same verifier, turned into pairs by the same rule, and (3)
offline DPO on them (`offline_dpo.flags`: same model, optimizer, batch 16, 100 steps, beta).
Each final policy, and the SFT policy, is then sampled on the 8 held-out prompts, greedily
and at temperature 1 (64 samples each), and scored by the verifier. Writes DIR/table.md,
DIR/results.json, DIR/online_vs_offline.png, and each run under DIR/seed<S>/ (what exists
there is not run again). Needs the SFT policy of `experiments/online/sft.flags` (--sft;
made first when missing, about 4 min).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
TINY = os.path.join(ROOT, "jaxpref", "data", "tiny")
ONLINE = os.path.join(ROOT, "experiments", "online")
BIN = os.path.dirname(sys.executable)  # the console scripts of this environment


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


def scores(samples: list[dict]) -> np.ndarray:
  """The verifier's score of every sample, [prompts, K]."""
  return np.asarray(_verifier()([s["prompt"] for s in samples],
                                [s["responses"] for s in samples]), np.float64)


def write_pairs(samples: list[dict], out: str) -> int:
  """Each group's best and worst sample as a {prompt, chosen, rejected} record (the online
  pair rule: first argmax and first argmin); groups whose samples all score the same give
  none (online, such a group gets weight 0). Returns the number of pairs."""
  s = scores(samples)
  n = 0
  with open(out, "w") as f:
    for rec, row in zip(samples, s):
      if row.max() > row.min():
        f.write(json.dumps({"prompt": rec["prompt"], "chosen": rec["responses"][row.argmax()],
                            "rejected": rec["responses"][row.argmin()]}) + "\n")
        n += 1
  return n


def generate(stem, prompts, k, temperature, seed, model_args) -> list[dict]:
  """jaxpref-generate into STEM.jsonl (kept: an existing file is read back), log STEM.log."""
  out = stem + ".jsonl"
  if not os.path.isfile(out):
    _sh(stem + ".log", "jaxpref-generate", *model_args, f"--prompts={prompts}",
        f"--samples_out={out}", f"--online.num_generations={k}",
        f"--online.temperature={temperature}", "--online.max_new_tokens=12", f"--seed={seed}",
        "--generate_batch=200")
  return _read(out)


def evaluate(d: str, name: str, seed: int, model_args, samples=64) -> dict:
  """Held-out verifier accuracy, greedy (one per prompt) and at temperature 1, and the share
  of the temperature-1 samples that ended on EOS within the 12 new tokens."""
  ev = os.path.join(TINY, "prompts_eval.jsonl")
  greedy = generate(os.path.join(d, f"{name}_greedy"), ev, 1, 0.0, seed, model_args)
  sampled = generate(os.path.join(d, f"{name}_t1"), ev, samples, 1.0, seed, model_args)
  return {"greedy": float(scores(greedy).mean()), "sampled": float(scores(sampled).mean()),
          "finished": float(np.mean([f for s in sampled for f in s["finished"]]))}


def run_seed(out: str, seed: int, sft: str) -> dict:
  """One seed's runs and evaluations. A step whose output exists is not run again (a run
  folder with final_metrics.json, a samples file), so a re-run only redoes what is missing."""
  d = os.path.join(out, f"seed{seed}")
  os.makedirs(d, exist_ok=True)
  res = {"seed": seed}
  # (1) online DPO; --log_every=1 so that every step's share of zero-variance groups (no
  # pair) is in metrics.jsonl and the pairs it trained on can be counted.
  online = os.path.join(d, "online_dpo")
  if not os.path.isfile(os.path.join(online, "final_metrics.json")):
    _sh(os.path.join(d, "online_dpo.log"), "jaxpref-train",
        f"--flagfile={os.path.join(ONLINE, 'online_dpo.flags')}", f"--workdir={online}",
        f"--init_from={sft}", f"--seed={seed}", "--log_every=1", "--plot=false")
  rows = [r for r in _read(os.path.join(online, "metrics.jsonl")) if r["split"] == "train"]
  res["online_groups"] = 16 * len(rows)
  res["online_pairs"] = int(round(sum(16 * (1 - r["groups/zero_variance_fraction"])
                                      for r in rows)))
  res["online_train_reward"] = [rows[0]["reward/mean"], rows[-1]["reward/mean"]]
  # (2) the same prompt draws, sampled once from the SFT policy
  prompts = os.path.join(d, "prompts_x40.jsonl")
  with open(prompts, "w") as f:
    for _ in range(len(rows) * 16 // 40):
      for r in _read(os.path.join(TINY, "prompts_train.jsonl")):
        f.write(json.dumps({"prompt": r["prompt"]}) + "\n")
  ref = generate(os.path.join(d, "ref_samples"), prompts, 8, 1.0, seed,
                 # the flag file first: its own --init_from must not override --sft
                 [f"--flagfile={os.path.join(ONLINE, 'base.flags')}", f"--init_from={sft}"])
  res["offline_groups"] = len(ref)
  res["offline_sample_reward"] = float(scores(ref).mean())
  pairs = os.path.join(d, "offline_pairs.jsonl")
  res["offline_pairs"] = write_pairs(ref, pairs)
  # (3) offline DPO
  offline = os.path.join(d, "offline_dpo")
  if not os.path.isfile(os.path.join(offline, "final_metrics.json")):
    _sh(os.path.join(d, "offline_dpo.log"), "jaxpref-train",
        f"--flagfile={os.path.join(HERE, 'offline_dpo.flags')}", f"--workdir={offline}",
        f"--init_from={sft}", f"--train_data={pairs}", f"--seed={seed}", "--plot=false")
  for name in ("online_dpo", "offline_dpo"):
    res[name] = evaluate(d, name, seed, [f"--run={os.path.join(d, name)}"])
  return res


def table(sft_eval: dict, results: list[dict]) -> str:
  """Markdown: per policy and seed, the labels it used and its held-out scores."""
  rows = ["| policy | seed | groups scored | pairs trained on | held-out greedy accuracy | "
          "held-out accuracy at T=1 (64 samples) | T=1 samples ending on EOS |",
          "|---|---|---|---|---|---|---|",
          f"| SFT (start) | - | - | - | {sft_eval['greedy']:.3f} | {sft_eval['sampled']:.3f} | "
          f"{sft_eval['finished']:.3f} |"]
  for r in results:
    for name, label in (("online_dpo", "online DPO"), ("offline_dpo", "offline DPO")):
      key = name.split("_")[0]
      rows.append(f"| {label} | {r['seed']} | {r[key + '_groups']} | {r[key + '_pairs']} | "
                  f"{r[name]['greedy']:.3f} | {r[name]['sampled']:.3f} | "
                  f"{r[name]['finished']:.3f} |")
  for name, label in (("online_dpo", "online DPO"), ("offline_dpo", "offline DPO")):
    g = [r[name]["greedy"] for r in results]
    s = [r[name]["sampled"] for r in results]
    e = [r[name]["finished"] for r in results]
    rows.append(f"| {label}, mean of {len(results)} seeds | | | | {np.mean(g):.3f} | "
                f"{np.mean(s):.3f} | {np.mean(e):.3f} |")
  return "\n".join(rows)


def plot(out: str, sft_eval: dict, results: list[dict], path: str) -> None:
  """Left: held-out greedy accuracy against step, online DPO's own evals per seed and the
  offline runs' final policies; right: held-out accuracy at temperature 1 per seed."""
  import matplotlib  # plotting only: the runs themselves need no display
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=72)
  for i, r in enumerate(results):
    ev = [x for x in _read(os.path.join(out, f"seed{r['seed']}", "online_dpo", "metrics.jsonl"))
          if x["split"] == "eval"]
    a0.plot([x["step"] for x in ev], [x["reward/mean"] for x in ev], "o-", color=f"C{i}",
            label=f"online DPO, seed {r['seed']}")
    a0.plot([100], [r["offline_dpo"]["greedy"]], "x", ms=10, mew=2, color=f"C{i}",
            label=f"offline DPO, seed {r['seed']} (final)")
  a0.set_xlabel("step (16 prompts x 8 samples)")
  a0.set_ylabel("held-out greedy accuracy (8 prompts)")
  a0.set_ylim(0, 1.05)
  a0.legend(fontsize=7)
  x = np.arange(len(results))
  a1.bar(x - 0.2, [r["online_dpo"]["sampled"] for r in results], 0.4, label="online DPO")
  a1.bar(x + 0.2, [r["offline_dpo"]["sampled"] for r in results], 0.4, label="offline DPO")
  a1.axhline(sft_eval["sampled"], color="gray", ls=":", label="SFT (start)")
  a1.set_xticks(x, [f"seed {r['seed']}" for r in results])
  a1.set_ylabel("held-out accuracy at T=1 (64 samples x 8 prompts)")
  a1.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--sft", default="runs/online/sft_hf",
                  help="the SFT policy (experiments/online/sft.flags' export)")
  a = ap.parse_args()
  out = os.path.abspath(a.out)
  os.makedirs(out, exist_ok=True)
  sft = os.path.join(ROOT, a.sft) if not os.path.isabs(a.sft) else a.sft
  if not os.path.isdir(sft):
    _sh(os.path.join(out, "sft.log"), "jaxpref-train",
        f"--flagfile={os.path.join(ONLINE, 'sft.flags')}", f"--workdir={out}/sft",
        f"--export_hf={sft}", "--plot=false")
  sft_eval = evaluate(out, "sft", 0, [f"--init_from={sft}",
                                      f"--flagfile={os.path.join(ONLINE, 'base.flags')}"])
  results = [run_seed(out, int(s), sft) for s in a.seeds.split(",")]
  md = table(sft_eval, results) + "\n"
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"sft": sft_eval, "seeds": results}, f, indent=1)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(md)
  plot(out, sft_eval, results, os.path.join(out, "online_vs_offline.png"))
  print(md)


if __name__ == "__main__":
  main()
