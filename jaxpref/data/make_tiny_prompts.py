"""Prompt files for online training on the tiny task (jaxpref/data/tiny/): the distinct
prompts of train.jsonl and eval.jsonl, sorted, one `{"prompt": ...}` record per line; and
sft_mix.jsonl, the train pairs with chosen and rejected swapped in a seeded half of them,
so that supervised fine-tuning on its `chosen` answers gives a policy that names an item
of the asked category about half the time (the online toy's starting point).

  python -m jaxpref.data.make_tiny_prompts     # rewrites prompts_{train,eval}.jsonl
  python -m jaxpref.data.make_tiny_prompts --out=/tmp/tiny   # the same bytes elsewhere

A pure function of the pair files, so it regenerates byte for byte; the eval prompts are
the held-out (phrasing, category) combinations, as for the pairs.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from jaxpref.data.make_tiny import OUT

SPLITS = (("train.jsonl", "prompts_train.jsonl"), ("eval.jsonl", "prompts_eval.jsonl"))


def distinct_prompts(path: str) -> list[str]:
  with open(path) as f:
    return sorted({json.loads(line)["prompt"] for line in f if line.strip()})


def render(prompts: list[str]) -> str:
  return "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", default=OUT, help="folder with train.jsonl and eval.jsonl")
  parser.add_argument("--out", default=OUT, help="output folder (default: the shipped one)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  for src, dst in SPLITS:
    prompts = distinct_prompts(os.path.join(args.src, src))
    with open(os.path.join(args.out, dst), "w") as f:
      f.write(render(prompts))
    print(f"wrote {len(prompts)} prompts to {os.path.join(args.out, dst)}")
  mix = sft_mix(os.path.join(args.src, "train.jsonl"))
  with open(os.path.join(args.out, "sft_mix.jsonl"), "w") as f:
    f.write(mix)
  print(f"wrote {mix.count(chr(10))} records to {os.path.join(args.out, 'sft_mix.jsonl')}")


def sft_mix(path: str, seed: int = 0) -> str:
  """The pairs of `path`, each swapped with probability 1/2 (seeded)."""
  rng = np.random.default_rng(seed)
  out = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      rec = json.loads(line)
      if rng.random() < 0.5:
        rec["chosen"], rec["rejected"] = rec["rejected"], rec["chosen"]
      out.append(json.dumps({"prompt": rec["prompt"], "chosen": rec["chosen"],
                             "rejected": rec["rejected"]}) + "\n")
  return "".join(out)


if __name__ == "__main__":
  main()
