"""`jaxpref-eval`: a trained reward model's accuracy per subset on RewardBench-layout pairs.

  jaxpref-eval --workdir=runs/bt_cyclic --data=bench.jsonl
  jaxpref-eval --workdir=runs/bt_cyclic --best_of_n=candidates.jsonl   # eval/best_of_n.py

Reads the run's `flags.txt` (model, head, tokenizer, max_len; later flags override it) and
its latest checkpoint, scores every `{prompt, chosen, rejected, subset}` record (the chosen
response wins when r_w > r_l, or the GPM score s(y_w, y_l) > 0; a tie counts half), prints
a table and writes WORKDIR/eval_results.json (or --results). PAL, attribute and gated GPM
heads are scored as `head_eval.py` says (per user, per attribute); for PAL and attribute
runs the `subset` field is optional (in every record or in none).

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

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref import flags as jflags
from jaxpref import data as data_lib
from jaxpref.data import passes
from jaxpref.cli_errors import entry_point
from jaxpref.eval import head_eval
from jaxpref.eval import best_of_n
from jaxpref.losses.reward import gpm_score
from jaxpref.losses.reward import FIRST_CHANNEL_REWARD
from jaxpref.parallel import sharding
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.train import checkpoint as ckpt_lib
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.roles import reward as reward_step
from jaxpref.train.step import TrainState

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
flags.DEFINE_enum("pal_unseen_user", "error", ["error", "uniform", "mean"],
                  "jaxpref-eval, --reward_head=pal: how to score a record whose `user` the model "
                  "was not trained on (>= --pal_users): error; uniform (mixture 1/K', a new "
                  "user before any of its pairs); mean (the trained users' mean mixture).")
flags.DEFINE_string("best_of_n", "", "jaxpref-eval: instead of --data, rerank a JSONL of "
                    "{prompt, candidates, [scores], [best]} records (eval/best_of_n.py).")
flags.DEFINE_string("best_of_n_out", "", "jaxpref-eval: the picks' JSONL (default "
                    "WORKDIR/best_of_n.jsonl).")
FLAGS = flags.FLAGS


def category_of(subset: str) -> str:
  return _CATEGORY_OF.get(subset, subset)


_MALFORMED = object()


def read_subsets(path: str, required: bool = True) -> tuple[list[str] | None, list[int]]:
  """(the `subset` field of every non-blank line, in order, and those lines' numbers).
  With `required=False` a file without any `subset` gives None; errors name file, line, field."""
  out, lines = [], []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      lines.append(lineno)
      try:
        obj = json.loads(raw)
      except ValueError:
        obj = _MALFORMED  # read_pairs reports malformed lines with their reason
      out.append(obj.get("subset") if isinstance(obj, dict) else obj)
  if not required and all(s is None or s is _MALFORMED for s in out):
    return None, lines
  for lineno, subset in zip(lines, out):
    if subset is not _MALFORMED and (not isinstance(subset, str) or not subset.strip()):
      raise ValueError(f"{path}:{lineno}: field 'subset' is missing or not a non-empty "
                       f"string (got {subset!r}); every record needs one")
  return out, lines


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


def format_results(res: dict) -> str:
  """The printed tables of `evaluate`'s results, for every head."""
  if res["reward_head"] == "attributes":
    return head_eval.format_attributes(res, format_table)
  parts = [format_table(res)] if "subsets" in res else []
  if res["reward_head"] == "pal":
    parts.append(head_eval.format_users(res))
  elif "subsets" not in res:
    parts.append(f"accuracy: {res['accuracy']:.4f} ({res['n_pairs']} pairs)")
  return "\n\n".join(parts)


def restore(cfg, mesh):
  """(graphdef, params, step) of the run's latest checkpoint, placed on `mesh`."""

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

  def margin(p, batch):
    out = reward_step.score(graphdef, p, batch)  # [B, 2, E]
    scalar = out.shape[-1] == 1 or first_channel
    return out[:, 0, 0] - out[:, 1, 0] if scalar else gpm_score(out[:, 0], out[:, 1])

  fn = jax.jit(margin)
  put = lambda b: jax.device_put(b, NamedSharding(mesh, P(mesh_lib.BATCH_AXES)))
  return passes.map_batches(lambda b: fn(params, b), ds, batch_size, put)


def evaluate(cfg, path: str, unseen_user: str = "error") -> dict:
  """Scores `path` with the run's latest checkpoint; returns the results dict. `unseen_user`:
  how a PAL run scores a user id it was not trained on (`head_eval.pal_users`)."""

  if cfg.role != "reward":
    raise ValueError(f"{cfg.workdir} was trained with --role={cfg.role}; jaxpref-eval scores "
                     "reward models (--role=reward)")
  head = cfg.reward_head
  subsets, lines = read_subsets(path, required=head not in ("pal", "attributes"))
  # PAL and attribute runs read `user`/`attribute_prefs` under the run's --data_fields names.
  fields = cfg.data.fields if head in ("pal", "attributes") else ""
  records, report = data_lib.read_pairs(path, fields=fields)
  if len(records) != len(lines):
    raise ValueError(f"{path}: {len(records)} pair records but {len(lines)} non-blank lines")
  tok = data_lib.Tokenizer.load(cfg.data.tokenizer)
  ds = data_lib.PairDataset(records, tok, cfg.data.max_len,
                           truncation=data_lib.Truncation.for_scoring(cfg.data))
  mesh = mesh_lib.make_mesh("data:-1")
  batch_size = -(-cfg.data.eval_batch_size // mesh.size) * mesh.size
  if head == "pal":  # before the restore: a bad user id fails fast
    users, known = head_eval.pal_users(cfg, ds, path, lines, unseen_user)
  prefs = ds.attribute_prefs
  if head == "attributes" and prefs is not None and prefs.shape[1] != cfg.reward_dim:
    raise ValueError(f"{path}:{lines[0]}: field 'attribute_prefs' has {prefs.shape[1]} entries, "
                     f"but the model scores --reward_dim={cfg.reward_dim} attributes")
  graphdef, params, step = restore(cfg, mesh)
  res = {}
  if head == "attributes":
    m = head_eval.attribute_margins(graphdef, params, ds, batch_size, mesh)
    res["attributes"] = head_eval.attribute_summary(m, prefs, subsets, summarize)
    cared = sum(e["n"] for e in res["attributes"])
    hits = sum(e["accuracy"] * e["n"] for e in res["attributes"] if e["n"])
    res["accuracy"] = hits / max(cared, 1)
    res.update(n_pairs=ds.n, attribute_prefs="records" if prefs is not None else
               "none: every attribute scored against the overall label")
  else:
    if head == "pal":
      m = head_eval.pal_margins(graphdef, params, ds, batch_size, mesh, cfg.loss_hparams,
                                unseen_user)
    elif head == "gpm_gated":
      m = head_eval.gated_gpm_margins(graphdef, params, ds, batch_size, mesh)
    else:
      m = margins(graphdef, params, ds, batch_size, mesh, cfg.loss in FIRST_CHANNEL_REWARD)
    correct = head_eval.outcome(m)
    if subsets is not None:
      res.update(summarize(subsets, correct))
    res.update(n_pairs=ds.n, accuracy=float(correct.mean()))
    if head == "pal":
      res.update(users=head_eval.per_user(users, known, correct),
                 n_unseen_user=int((~known).sum()), pal_unseen_user=unseen_user,
                 unseen_accuracy=float(correct[~known].mean()) if (~known).any() else None)
  res.update({"workdir": cfg.workdir, "data": path, "step": int(step), "loss": cfg.loss,
              "reward_head": head, "reward_dim": cfg.reward_dim,
              "n_truncated": int(ds.n_truncated), "n_unknown_tokens": int(ds.n_unk),
              "read": report.summary()})
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
      res = best_of_n.best_of_n(jflags.to_config(), FLAGS.best_of_n, restore,
                                FLAGS.best_of_n_out)
      print(best_of_n.format_summary(res) + f"\nwrote {res['output']}")
      return
    if not FLAGS.data:
      raise ValueError("--data=FILE.jsonl is required ({prompt, chosen, rejected, subset} records)")
    cfg = jflags.to_config()
    res = evaluate(cfg, FLAGS.data, FLAGS.pal_unseen_user)
  except (ValueError, OSError) as e:
    print(f"FATAL: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"{cfg.workdir} (step {res['step']}, --loss={cfg.loss}) on {FLAGS.data}: "
        f"{res['n_truncated']} of {res['n_pairs']} pairs truncated to --max_len={cfg.data.max_len}")
  print(format_results(res))
  path = FLAGS.results or os.path.join(cfg.workdir, "eval_results.json")
  with open(path, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {path}")


def run() -> None:
  entry_point(app.run)(main, flags_parser=parse)


if __name__ == "__main__":
  run()
