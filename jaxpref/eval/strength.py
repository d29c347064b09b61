"""`jaxpref-strength`: preference strength from an ensemble of reward models
(docs/reward_models.md#ensemble-preference-strength; Secrets of RLHF II, a reading).

  jaxpref-strength --flagfile=experiments/repro/label_noise/base.flags --loss=bt \
      --workdir=runs/strength --ensemble_size=5

Trains `--ensemble_size` reward models on `--train_data` through the ordinary loop (member
j in WORKDIR/member_j with `--seed` + j and `--data_seed` + j, so each has its own
initialisation and data order; a finished member is reused; `--ensemble_vectorize` trains
the unfinished ones together as one vmapped program, `ensemble.py`), scores every pair of
`--strength_data` (default: the train data) with each, and writes a copy of that file,
every original field kept, plus

  strength_mean, strength_std     mean and (population) std over members of
                                  d_j = r_j(chosen) - r_j(rejected)
  ensemble_chosen_reward,         members' mean reward of each response; their difference
  ensemble_rejected_reward        is strength_mean, so mapping them to the score fields
                                  (--data_fields=chosen_score:ensemble_chosen_reward,
                                  rejected_score:ensemble_rejected_reward) makes strength
                                  the `mu` that bt_flip, bt_adaptive_margin and bt_soft read
  strength_against                share of members with d_j < 0, capped at 0.5: a per-pair
                                  flip rate for --data_fields=label_smoothing:strength_against

to WORKDIR/strength.jsonl (or --strength_out), the histogram of strength_mean to
WORKDIR/strength_hist.png and a text summary (also printed) to WORKDIR/strength_summary.txt.
`--strength_drop_below=X` also writes WORKDIR/strength_kept.jsonl without the pairs whose
strength_mean < X (the count is printed). Records with a boolean `flipped` field (the
synthetic generator's ground truth) get the precision and recall of "strength_mean < 0
means flipped" in the summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
from absl import app, flags, logging

from jaxpref import flags as jflags
from jaxpref import data as data_lib
from jaxpref.data import sources
from jaxpref.eval import best_of_n, reward_eval
from jaxpref.eval import ensemble
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.train import loop, plots

flags.DEFINE_integer("ensemble_size", 5, "jaxpref-strength: reward models in the ensemble (M).")
flags.DEFINE_string("strength_data", "", "jaxpref-strength: the pairs to score (default "
                    "--train_data).")
flags.DEFINE_string("strength_out", "", "jaxpref-strength: output JSONL (default "
                    "WORKDIR/strength.jsonl).")
flags.DEFINE_bool("ensemble_vectorize", False, "jaxpref-strength: train the members not yet "
                  "finished as one jax.vmap-ped program (M times one member's memory; single "
                  "host, data-parallel mesh, --batching=pad, no --grad_accum). Only the final "
                  "checkpoints are saved: a run stopped midway restarts from step 0 (no mid-run "
                  "resume).")
flags.DEFINE_float("strength_drop_below", None, "jaxpref-strength: also write "
                   "WORKDIR/strength_kept.jsonl without pairs whose strength_mean is below this.")
FLAGS = flags.FLAGS

HIST_BINS = 20
MAX_AGAINST = 0.5  # records.MAX_LABEL_SMOOTHING: a flip rate above 1/2 is a wrong label


def ensemble_stats(rewards: np.ndarray) -> dict[str, np.ndarray]:
  """rewards [M, N, 2] (member, pair, chosen/rejected) -> the per-pair fields, each [N]."""
  rewards = np.asarray(rewards, np.float64)
  if rewards.ndim != 3 or rewards.shape[2] != 2:
    raise ValueError(f"rewards must be [members, pairs, 2], got {rewards.shape}")
  d = rewards[:, :, 0] - rewards[:, :, 1]  # [M, N]
  return {"strength_mean": d.mean(0), "strength_std": d.std(0),
          "ensemble_chosen_reward": rewards[:, :, 0].mean(0),
          "ensemble_rejected_reward": rewards[:, :, 1].mean(0),
          "strength_against": np.minimum((d < 0).mean(0), MAX_AGAINST)}


def annotate(objs: list[dict], stats: dict[str, np.ndarray]) -> list[dict]:
  """Each record with the ensemble's fields added (original fields kept, ours win)."""
  n = len(objs)
  sizes = {len(v) for v in stats.values()}
  if sizes != {n}:
    raise ValueError(f"{n} records but strengths for {sorted(sizes)} pairs")
  return [{**obj, **{k: float(v[i]) for k, v in stats.items()}} for i, obj in enumerate(objs)]


def flip_detection(mu: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
  """Precision and recall of "mu < 0 means the label was flipped" against the truth."""
  pred, flipped = np.asarray(mu) < 0, np.asarray(flipped, bool)
  tp = float(np.sum(pred & flipped))
  return {"n_flipped": int(flipped.sum()), "n_negative": int(pred.sum()),
          "precision": tp / pred.sum() if pred.any() else float("nan"),
          "recall": tp / flipped.sum() if flipped.any() else float("nan")}


def summary_text(stats: dict[str, np.ndarray], detection: dict | None = None) -> str:
  """A text histogram of strength_mean and its headline numbers."""
  mu, sd = stats["strength_mean"], stats["strength_std"]
  counts, edges = np.histogram(mu, bins=HIST_BINS)
  scale = 50 / max(counts.max(), 1)
  lines = [f"strength_mean over {len(mu)} pairs: mean {mu.mean():.3f}, median "
           f"{np.median(mu):.3f}, min {mu.min():.3f}, max {mu.max():.3f}; mean strength_std "
           f"{sd.mean():.3f}",
           f"negative (likely mislabelled): {int(np.sum(mu < 0))} "
           f"({np.mean(mu < 0):.1%}); |mu| < mean std (ambiguous): "
           f"{int(np.sum(np.abs(mu) < sd.mean()))}", ""]
  for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
    lines.append(f"[{lo:8.3f}, {hi:8.3f})  {c:6d}  {'#' * int(round(c * scale))}")
  if detection:
    lines += ["", f"ground truth 'flipped': {detection['n_flipped']} flipped; strength < 0 "
              f"finds them with precision {detection['precision']:.3f}, recall "
              f"{detection['recall']:.3f}"]
  return "\n".join(lines)


def plot_histogram(mu: np.ndarray, path: str, flipped: np.ndarray | None = None) -> None:
  plt = plots.plt  # matplotlib with the Agg backend, as every jaxpref plot
  fig, ax = plt.subplots(figsize=(6, 3.5))
  bins = np.histogram_bin_edges(mu, bins=HIST_BINS * 2)
  if flipped is None:
    ax.hist(mu, bins=bins)
  else:  # the two populations the strength is meant to separate
    ax.hist([mu[~flipped], mu[flipped]], bins=bins, stacked=True,
            label=["label kept", "label flipped (truth)"])
    ax.legend()
  ax.axvline(0.0, color="k", lw=0.8)
  ax.set_xlabel("strength_mean = mean_j [r_j(chosen) - r_j(rejected)]")
  ax.set_ylabel("pairs")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def member_config(cfg, j: int):
  """Member j: its own folder, initialisation seed and data order."""
  return dataclasses.replace(cfg, workdir=os.path.join(cfg.workdir, f"member_{j}"),
                             seed=cfg.seed + j, data=dataclasses.replace(cfg.data,
                                                                        seed=cfg.data.seed + j))


def read_records(path: str, fields: str) -> tuple[list[dict], list]:
  """The file's raw objects (to copy every field) and the parsed pairs, in the same order;
  any bad record is an error naming its file and line (nothing is skipped here)."""

  records, _ = data_lib.read_pairs(path, fields=fields)
  objs = [obj for _, _, obj, _ in sources.rows(path)]
  if len(objs) != len(records):
    raise ValueError(f"{path}: {len(objs)} rows but {len(records)} pair records")
  bad = next((i for i, o in enumerate(objs) if not isinstance(o, dict)), None)
  if bad is not None:
    raise ValueError(f"{path}: record {bad + 1} is not a JSON object")
  return objs, records


def run_ensemble(cfg, records: list, data_path: str, m: int, say=print,
                 vectorize: bool = False) -> np.ndarray:
  """Trains (or reuses) the M members and scores `records` (read from `data_path`):
  rewards [M, N, 2]. `vectorize`: the unfinished members train together
  (`ensemble.train`), else one after another."""

  tok = data_lib.Tokenizer.load(cfg.data.tokenizer)
  ds = data_lib.PairDataset(records, tok, cfg.data.max_len,
                           truncation=data_lib.Truncation.for_scoring(cfg.data))
  mesh = mesh_lib.make_mesh("data:-1")
  batch_size = -(-cfg.data.eval_batch_size // mesh.size) * mesh.size
  members = [member_config(cfg, j) for j in range(m)]
  trained = {}
  if vectorize:
    trained = ensemble.train(cfg, members, say)
    reused = [str(j) for j in range(m) if j not in trained]
    if reused:
      say(f"strength: members {', '.join(reused)} already finished; reused")
  out = []
  for j, member in enumerate(members):
    if vectorize:
      final = trained.get(j, {})
    else:
      say(f"strength: training member {j + 1}/{m} (seed {member.seed}, data_seed "
          f"{member.data.seed}) in {member.workdir}")
      final = loop.run(member)
    if "rewards/accuracy" in final:
      say(f"strength: member {j + 1}/{m} done, final {final.get('split', '')} accuracy "
          f"{final['rewards/accuracy']:.3f}")
    graphdef, params, _ = reward_eval.restore(member, mesh)
    out.append(best_of_n.score_groups(graphdef, params, ds, batch_size, mesh))
    say(f"strength: member {j + 1}/{m} scored {ds.n} pairs of {data_path}")
  return np.stack(out)


def write_jsonl(path: str, objs: list[dict]) -> None:
  with open(path, "w") as f:
    for obj in objs:
      f.write(json.dumps(obj, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x))
              + "\n")


def strength(cfg, m: int, data_path: str = "", out: str = "", drop_below: float | None = None,
             say=print, vectorize: bool = False) -> dict:
  """The whole command: ensemble, annotated file, histogram, summary; returns the paths,
  the summary numbers and (with ground truth) the flip detection."""
  if cfg.role != "reward" or cfg.reward_dim != 1:
    raise ValueError("jaxpref-strength trains scalar reward models: pass --role=reward "
                     f"--reward_dim=1 (got --role={cfg.role} --reward_dim={cfg.reward_dim})")
  if m < 1:
    raise ValueError(f"--ensemble_size must be >= 1, got {m}")
  if vectorize:
    ensemble.check(cfg)  # before reading anything
  data_path = data_path or cfg.data.train_data
  objs, records = read_records(data_path, cfg.data.fields)
  stats = ensemble_stats(run_ensemble(cfg, records, data_path, m, say, vectorize))
  flipped = None
  if all(isinstance(o.get("flipped"), bool) for o in objs):
    flipped = np.array([o["flipped"] for o in objs])
  detection = flip_detection(stats["strength_mean"], flipped) if flipped is not None else None
  paths = {"strength": out or os.path.join(cfg.workdir, "strength.jsonl"),
           "histogram": os.path.join(cfg.workdir, "strength_hist.png"),
           "summary": os.path.join(cfg.workdir, "strength_summary.txt")}
  annotated = annotate(objs, stats)
  write_jsonl(paths["strength"], annotated)
  text = summary_text(stats, detection)
  if drop_below is not None:
    keep = [o for o in annotated if o["strength_mean"] >= drop_below]
    paths["kept"] = os.path.join(cfg.workdir, "strength_kept.jsonl")
    write_jsonl(paths["kept"], keep)
    text += (f"\n--strength_drop_below={drop_below}: kept {len(keep)} of {len(annotated)} pairs, "
             f"dropped {len(annotated) - len(keep)} -> {paths['kept']}")
  with open(paths["summary"], "w") as f:
    f.write(text + "\n")
  plot_histogram(stats["strength_mean"], paths["histogram"], flipped)
  say(text)
  say("wrote " + ", ".join(paths.values()))
  mu = stats["strength_mean"]
  return {"paths": paths, "n": len(mu), "negative_share": float(np.mean(mu < 0)),
          "mean_std": float(stats["strength_std"].mean()), "detection": detection}


def main(argv: list[str]) -> None:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    cfg = jflags.to_config()
    os.makedirs(cfg.workdir, exist_ok=True)
    with open(os.path.join(cfg.workdir, "flags.txt"), "w") as f:
      f.write(jflags.resolved_flags(cfg))
    strength(cfg, FLAGS.ensemble_size, FLAGS.strength_data, FLAGS.strength_out,
             FLAGS.strength_drop_below, vectorize=FLAGS.ensemble_vectorize)
  except (ValueError, OSError) as e:
    print(f"FATAL: {e}", file=sys.stderr)
    sys.exit(1)


def run() -> None:
  app.run(main, flags_parser=jflags.parse)  # the train CLI's flags and hints


if __name__ == "__main__":
  run()
