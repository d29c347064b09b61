"""Derives the tiny extra-field pair files (jaxpref/data/tiny/) from the tiny pairs.

Each file takes the first N_TRAIN pairs of train.jsonl and the first N_EVAL of eval.jsonl
and adds one field (docs/data.md, extra group members):

  rationale_{pairs,eval}.jsonl   `rationale`: "pear is a fruit and golf is not."
  condition_{pairs,eval}.jsonl   `rejected_prompt`: the prompt asking for the rejected
                                  item's category instead ("name a sport."), which the
                                  chosen response does not satisfy
  source_{pairs,eval}.jsonl      `source_logps`: two synthetic source models, an "expert"
                                  that prefers the chosen response per character and a
                                  "noisy" one that does not know (made-up numbers, seeded)

  python -m jaxpref.data.make_tiny_extra            # rewrites the six files
  python -m jaxpref.data.make_tiny_extra --out=DIR  # the same bytes elsewhere

A pure function of the tiny pairs, SEED and make_tiny's category table.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

from jaxpref.data.make_tiny import CATEGORIES, OUT

N_TRAIN, N_EVAL, SEED = 240, 60, 0
ITEM_CATEGORY = {item: cat for cat, items in CATEGORIES.items() for item in items.split()}


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _item(response: str) -> str:
  return next(w for w in re.findall(r"[a-z]+", response) if w in ITEM_CATEGORY)


def _category(prompt: str) -> str:
  return next(c for c in CATEGORIES if re.search(rf"\b{c}\b", prompt))


def with_rationale(pair: dict) -> dict:
  cat, good, bad = _category(pair["prompt"]), _item(pair["chosen"]), _item(pair["rejected"])
  return {**pair, "rationale": f"{good} is {_article(cat)} {cat} and {bad} is not."}


def with_rejected_prompt(pair: dict) -> dict:
  cat, other = _category(pair["prompt"]), ITEM_CATEGORY[_item(pair["rejected"])]
  prompt = re.sub(rf"\b(a|an) {cat}\b", f"{_article(other)} {other}", pair["prompt"])
  return {**pair, "rejected_prompt": re.sub(rf"\b{cat}\b", other, prompt)}


def with_source_logps(pair: dict, rng: np.random.Generator) -> dict:
  n_w, n_l = len(pair["chosen"]), len(pair["rejected"])
  expert = [-n_w * rng.uniform(0.1, 0.3), -n_l * rng.uniform(0.5, 0.9)]
  noisy = [-n_w * rng.uniform(0.2, 0.8), -n_l * rng.uniform(0.2, 0.8)]
  return {**pair, "source_logps": [[round(v, 3) for v in expert], [round(v, 3) for v in noisy]]}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=OUT, help="output directory (default: the shipped one)")
  out = parser.parse_args(argv).out
  splits = {}
  for split, name, n in (("pairs", "train", N_TRAIN), ("eval", "eval", N_EVAL)):
    with open(os.path.join(OUT, f"{name}.jsonl")) as f:
      splits[split] = [json.loads(line) for line in f][:n]
  rng = np.random.default_rng(SEED)
  os.makedirs(out, exist_ok=True)
  for kind, add in (("rationale", with_rationale), ("condition", with_rejected_prompt),
                    ("source", lambda p: with_source_logps(p, rng))):
    for split, pairs in splits.items():
      with open(os.path.join(out, f"{kind}_{split}.jsonl"), "w") as f:
        f.writelines(json.dumps(add(p)) + "\n" for p in pairs)
  print(f"wrote rationale/condition/source files of {N_TRAIN} + {N_EVAL} pairs to {out}")


if __name__ == "__main__":
  main()
