"""`jaxpref-eval`: a trained reward model's accuracy per subset on RewardBench-layout pairs.

  jaxpref-eval --workdir=runs/bt_cyclic --data=bench.jsonl
  jaxpref-eval --workdir=runs/bt_cyclic --best_of_n=candidates.jsonl   # eval/best_of_n.py

Reads the run's `flags.txt` (model, head, tokenizer, max_len; later flags override it) and
its latest checkpoint, scores every `{prompt, chosen, rejected, subset}` record (the chosen
response wins when r_w > r_l, or the GPM score s(y_w, y_l) > 0; a tie counts half), prints
a table and writes WORKDIR/eval_results.json (or --results).

Categories (RewardBench v1 sections): a category's accuracy pools its subsets, each
weighted by its number of pairs in the file, except that `math-prm` weighs as much as all
`hep-*` subsets present together (RewardBench's rule: math and code count equally in
Reasoning). A subset not in `CATEGORIES` is a category of its own. The reported average
is the unweighted mean over the categories present, RewardBench's headline score.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging

from jaxpref import flags as jflags

CATEGORIES = {
    "chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy",
             "mt-bench-med"),
    "chat_hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor",
                  "llmbar-adver-GPTInst", "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse",
               "xstest-should-respond", "donotanswer"),
    "reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python",
                  "hep-rust"),
}
_CATEGORY_OF = {s: c for c, subsets in CATEGORIES.items() for s in subsets}

flags.DEFINE_string("data", None, "jaxpref-eval: RewardBench-layout JSONL of {prompt, chosen, "
                    "rejected, subset} records.")
flags.DEFINE_string("results", "", "jaxpref-eval: where to write the results JSON "
                    "(default WORKDIR/eval_results.json).")
flags.DEFINE_string("best_of_n", "", "jaxpref-eval: instead of --data, rerank a JSONL of "
                    "{prompt, candidates, [scores], [best]} records (eval/best_of_n.py).")
flags.DEFINE_string("best_of_n_out", "", "jaxpref-eval: the picks' JSONL (default "
                    "WORKDIR/best_of_n.jsonl).")
FLAGS = flags.FLAGS


def category_of(subset: str) -> str:
  return _CATEGORY_OF.get(subset, subset)


def read_subsets(path: str) -> list[str]:
  """The `subset` field of every non-blank line, in order; errors name file, line, field."""
  out = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw)
      except ValueError:
        continue  # read_pairs reports malformed lines with their reason
      subset = obj.get("subset") if isinstance(obj, dict) else None
      if not isinstance(subset, str) or not subset.strip():
        raise ValueError(f"{path}:{lineno}: field 'subset' is missing or not a non-empty "
                         f"string (got {subset!r}); every record needs one")
      out.append(subset)
  return out


def summarize(subsets: list[str], correct: np.ndarray) -> dict:
  """Per-subset and per-category accuracy and their average; `correct` [N] in {0, 0.5, 1}."""
  subsets_arr = np.asarray(subsets)
  per_subset = {}
  for s in sorted(set(subsets)):
    sel = subsets_arr == s
    per_subset[s] = {"category": category_of(s), "n": int(sel.sum()),
                     "accuracy": float(np.mean(correct[sel]))}
  n_code = sum(v["n"] for s, v in per_subset.items() if s.startswith("hep-"))
  per_category = {}
  for c in sorted({v["category"] for v in per_subset.values()}):
    members = {s: v for s, v in per_subset.items() if v["category"] == c}
    weight = {s: (n_code if s == "math-prm" and n_code else v["n"]) for s, v in members.items()}
    acc = sum(members[s]["accuracy"] * w for s, w in weight.items()) / sum(weight.values())
    per_category[c] = {"accuracy": float(acc), "n": sum(v["n"] for v in members.values()),
                       "subsets": sorted(members)}
  return {"subsets": per_subset, "categories": per_category,
          "average": float(np.mean([v["accuracy"] for v in per_category.values()])),
          "n_pairs": int(len(correct))}


def format_table(res: dict) -> str:
  width = max([len("subset")] + [len(s) for s in res["subsets"]])
  cw = max([len("category")] + [len(c) for c in res["categories"]])
  lines = [f"{'subset':<{width}}  {'category':<{cw}}  {'pairs':>6}  accuracy"]
  for s, v in res["subsets"].items():
    lines.append(f"{s:<{width}}  {v['category']:<{cw}}  {v['n']:>6}  {v['accuracy']:.4f}")
  lines += ["", f"{'category':<{cw}}  {'pairs':>6}  accuracy"]
  for c, v in res["categories"].items():
    lines.append(f"{c:<{cw}}  {v['n']:>6}  {v['accuracy']:.4f}")
  lines += ["", f"average over {len(res['categories'])} categories: {res['average']:.4f} "
            f"({res['n_pairs']} pairs)"]
  return "\n".join(lines)


def restore(cfg, mesh):
  """(graphdef, params, step) of the run's latest checkpoint, placed on `mesh`."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from jaxpref.parallel import sharding
  from jaxpref.train import checkpoint as ckpt_lib
  from jaxpref.train import reward_step
  from jaxpref.train.optimizer import make_optimizer
  from jaxpref.train.policy_step import TrainState

  directory = os.path.join(cfg.workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"{directory}: no checkpoints (train the reward model first)")
  graphdef, params = sharding.abstract_params(lambda: reward_step.make_model(cfg), mesh)
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  like = TrainState(step=jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(mesh, P())),
                    params=params, opt_state=sharding.abstract_opt_state(optimizer, params, mesh))
  ckpt = ckpt_lib.Checkpointer(directory, every=1, keep=1)
  try:
    if ckpt.latest_step is None:
      raise ValueError(f"{directory}: no finished checkpoint")
    state, _, step = ckpt.restore(like)
  finally:
    ckpt.close()
  return graphdef, state.params, step


def margins(graphdef, params, ds, batch_size: int, mesh, first_channel: bool = False
            ) -> np.ndarray:
  """float32[N]: r_w - r_l per pair (scalar head, or channel 0 with `first_channel`) or the
  GPM score s(y_w, y_l) (embeddings)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from jaxpref import data as data_lib
  from jaxpref.losses.reward import gpm_score
  from jaxpref.parallel import mesh as mesh_lib
  from jaxpref.train import reward_step

  def margin(p, batch):
    out = reward_step.score(graphdef, p, batch)  # [B, 2, E]
    scalar = out.shape[-1] == 1 or first_channel
    return out[:, 0, 0] - out[:, 1, 0] if scalar else gpm_score(out[:, 0], out[:, 1])

  fn = jax.jit(margin)
  put = lambda b: jax.device_put(b, NamedSharding(mesh, P(mesh_lib.BATCH_AXES)))
  out = np.zeros(ds.n, np.float32)
  for start, batch in zip(range(0, ds.n, batch_size), data_lib.eval_batches(ds, batch_size)):
    n = min(batch_size, ds.n - start)
    out[start:start + n] = np.asarray(jax.device_get(fn(params, put(batch))))[:n]
  return out


def evaluate(cfg, path: str) -> dict:
  """Scores `path` with the run's latest checkpoint; returns the results dict."""
  from jaxpref import data as data_lib
  from jaxpref.parallel import mesh as mesh_lib

  if cfg.role != "reward":
    raise ValueError(f"{cfg.workdir} was trained with --role={cfg.role}; jaxpref-eval scores "
                     "reward models (--role=reward)")
  subsets = read_subsets(path)
  records, report = data_lib.read_pairs(path)
  if len(records) != len(subsets):
    raise ValueError(f"{path}: {len(records)} pair records but {len(subsets)} subsets")
  tok = data_lib.Tokenizer.load(cfg.data.tokenizer)
  ds = data_lib.PairDataset(records, tok, cfg.data.max_len)
  mesh = mesh_lib.make_mesh("data:-1")
  batch_size = -(-cfg.data.eval_batch_size // mesh.size) * mesh.size
  graphdef, params, step = restore(cfg, mesh)
  from jaxpref.losses.reward import FIRST_CHANNEL_REWARD
  m = margins(graphdef, params, ds, batch_size, mesh, cfg.loss in FIRST_CHANNEL_REWARD)
  correct = np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0))
  res = summarize(subsets, correct)
  res.update({"workdir": cfg.workdir, "data": path, "step": int(step), "loss": cfg.loss,
              "reward_dim": cfg.reward_dim, "n_truncated": int(ds.n_truncated),
              "n_unknown_tokens": int(ds.n_unk), "read": report.summary()})
  return res


def parse(argv: list[str]) -> list[str]:
  """The run's flags.txt first, then the command line's flags (which override it)."""
  args = []
  try:
    args = jflags.expand_flagfiles(argv[1:])
    workdir = next((a.split("=", 1)[1] for a in args if a.startswith("--workdir=")), None)
    if workdir is None:
      raise flags.Error("--workdir=RUN_DIR is required (a --role=reward run's folder)")
    saved = os.path.join(workdir, "flags.txt")
    if not os.path.isfile(saved):
      raise flags.Error(f"{saved}: no such file (is --workdir a jaxpref-train run folder?)")
    args = jflags.expand_flagfiles([f"--flagfile={saved}"]) + args
    jflags.import_loss_modules(args)
    return FLAGS(argv[:1] + args)
  except flags.Error as e:
    print(f"FATAL flags parsing error: {e}\nPass --helpfull to see all flags.", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str]) -> None:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    if FLAGS.best_of_n:
      from jaxpref.eval import best_of_n
      res = best_of_n.best_of_n(jflags.to_config(), FLAGS.best_of_n, restore,
                                FLAGS.best_of_n_out)
      print(best_of_n.format_summary(res) + f"\nwrote {res['output']}")
      return
    if not FLAGS.data:
      raise ValueError("--data=FILE.jsonl is required ({prompt, chosen, rejected, subset} records)")
    cfg = jflags.to_config()
    res = evaluate(cfg, FLAGS.data)
  except (ValueError, OSError) as e:
    print(f"FATAL: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"{cfg.workdir} (step {res['step']}, --loss={cfg.loss}) on {FLAGS.data}: "
        f"{res['n_truncated']} of {res['n_pairs']} pairs truncated to --max_len={cfg.data.max_len}")
  print(format_table(res))
  path = FLAGS.results or os.path.join(cfg.workdir, "eval_results.json")
  with open(path, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {path}")


def run() -> None:
  app.run(main, flags_parser=parse)


if __name__ == "__main__":
  run()
