"""Label candidate responses into preference pairs by a model-based reward (how CDR, FLR
and R^3 feed DPO): for each `{prompt, responses: [y1, y2, ...]}` record the highest-reward
response is `chosen`, the lowest `rejected`, their rewards `chosen_score`/`rejected_score`.

  python -m jaxpref.rewards.label cdr --in cands.jsonl --out pairs.jsonl \
      --model runs/strong_hf --weak runs/weak_hf [--system "be concise. "]
  python -m jaxpref.rewards.label flr --in cands.jsonl --out pairs.jsonl --model DIR \
      --positive "thanks, that helps." --negative "that is wrong."
  python -m jaxpref.rewards.label r3 --in cands.jsonl --out pairs.jsonl --model DIR \
      --weights relevance=1,length=0.5,repetition=0.5 --max_tokens 64

`--model`/`--weak` are jaxpref-convert or Hugging Face folders (`--tokenizer` when the
folder has none). A record whose responses all get the same reward has no preference: it
is not written, and the count is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from jaxpref.data import sources
from jaxpref.rewards import model_rewards as mr


def read_candidates(path: str) -> list[dict]:
  out = []
  for file, line, obj, problem in sources.rows(path):
    if problem is not None:
      raise ValueError(f"{file}:{line}: {problem[1]}")
    ok = isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"].strip()
    if not ok:
      raise ValueError(f"{file}:{line}: field 'prompt' is missing or not a non-empty string")
    ys = obj.get("responses")
    if not (isinstance(ys, list) and len(ys) >= 2
            and all(isinstance(y, str) and y.strip() for y in ys)):
      raise ValueError(f"{file}:{line}: field 'responses' must be a list of >= 2 non-empty "
                       "strings")
    out.append(obj)
  if not out:
    raise ValueError(f"{path}: no records")
  return out


def label(records: list[dict], reward: mr.RewardFn) -> tuple[list[dict], int]:
  """(pairs, number of records skipped because every response tied)."""
  prompts = [r["prompt"] for r in records for _ in r["responses"]]
  responses = [y for r in records for y in r["responses"]]
  scores = np.asarray(reward(prompts, responses), np.float64)
  pairs, ties, at = [], 0, 0
  for r in records:
    s = scores[at:at + len(r["responses"])]
    at += len(s)
    hi, lo = int(np.argmax(s)), int(np.argmin(s))
    if s[hi] == s[lo]:
      ties += 1
      continue
    pairs.append({"prompt": r["prompt"], "chosen": r["responses"][hi],
                  "rejected": r["responses"][lo], "chosen_score": float(s[hi]),
                  "rejected_score": float(s[lo])})
  return pairs, ties


def parse_weights(spec: str) -> dict[str, float]:
  out = {}
  for item in filter(None, (x.strip() for x in spec.split(","))):
    name, sep, value = item.partition("=")
    try:
      out[name.strip()] = float(value)
    except ValueError:
      sep = ""
    if not sep:
      raise ValueError(f"--weights: {item!r} is not NAME=NUMBER (e.g. relevance=1)")
  return out


def make_reward(args) -> mr.RewardFn:
  lm = mr.LM.load(args.model, args.tokenizer, args.max_len)
  if args.reward == "cdr":
    if not args.weak:
      raise ValueError("cdr needs --weak (the less-aligned model)")
    weak = mr.LM.load(args.weak, args.tokenizer, args.max_len)
    return lambda x, y: mr.cdr(lm, weak, x, y, system=args.system)
  if args.reward == "flr":
    return lambda x, y: mr.flr(lm, x, y, args.positive or (), args.negative or ())
  components = {"relevance": mr.relevance(lm),
                "length": mr.length_penalty(lm.tok, args.max_tokens),
                "repetition": mr.repetition_penalty(lm.tok)}
  return mr.mixture(components, parse_weights(args.weights))


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m jaxpref.rewards.label", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("reward", choices=("cdr", "flr", "r3"))
  p.add_argument("--in", dest="inp", required=True, help="{prompt, responses} JSONL.")
  p.add_argument("--out", required=True, help="Preference pairs JSONL.")
  p.add_argument("--model", required=True, help="cdr: the strong model; flr/r3: the model.")
  p.add_argument("--weak", default="", help="cdr: the weak model.")
  p.add_argument("--tokenizer", default="", help="Default: the model folder's.")
  p.add_argument("--max_len", type=int, default=256)
  p.add_argument("--system", default="", help="cdr: text put before every prompt.")
  p.add_argument("--positive", action="append", help="flr: a positive follow-up (repeatable).")
  p.add_argument("--negative", action="append", help="flr: a negative follow-up (repeatable).")
  p.add_argument("--weights", default="relevance=1,length=1,repetition=1",
                 help="r3: NAME=W for relevance, length, repetition.")
  p.add_argument("--max_tokens", type=int, default=128, help="r3: length budget.")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  try:
    records = read_candidates(args.inp)
    pairs, ties = label(records, make_reward(args))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  with open(args.out, "w") as f:
    for pair in pairs:
      f.write(json.dumps(pair) + "\n")
  print(f"{args.reward}: {len(pairs)} pairs from {len(records)} records -> {args.out}; "
        f"{ties} records skipped (every response got the same reward)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
