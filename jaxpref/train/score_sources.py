"""Writes `source_logps` (infifpo's source models, docs/data.md) by scoring a pair file.

    python -m jaxpref.train.score_sources --model=SRC1 --model=SRC2 [--tokenizer=T1 ...] \\
        [--max_len=512] [--batch_size=16] [--fields=...] in.jsonl out.jsonl

Each `--model` is a jaxpref model folder (`jaxpref-convert`) or a Hugging Face one; its
tokenizer is the matching `--tokenizer` or, by default, the folder itself. Every record of
`in.jsonl` is written to `out.jsonl` unchanged but for `source_logps`: one
`[chosen, rejected]` pair of summed response log-probs per model, in `--model` order, laid
out exactly as training lays out a pair (`BOS + prompt + response + EOS`, truncated to
`--max_len` the same way; truncated pairs are counted and reported, since their sums
cover less of the response). A record training would reject stops the run with its
file and line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from jaxpref.data import pairs as pairs_lib
from jaxpref.data import passes
from jaxpref.data import records as records_lib
from jaxpref.data import sources
from jaxpref.data.tokenizer import Tokenizer
from jaxpref.models import convert
from jaxpref.models.logps import token_logps


def score(model_path: str, tok: Tokenizer, records: list, max_len: int, batch_size: int
          ) -> tuple[np.ndarray, int]:
  """(float32[N, 2] summed chosen/rejected log-probs under the model, truncated pairs)."""
  cfg = convert.read_model_config(model_path)
  graphdef, params = nnx.split(convert.load_pretrained(model_path, cfg))
  ds = pairs_lib.PairDataset(records, tok, max_len)
  forward = jax.jit(lambda p, b: token_logps(graphdef, p, b).sum(-1))
  return passes.map_batches(lambda b: forward(params, b), ds, batch_size), ds.n_truncated


def score_sources(in_path: str, out_path: str, models: Sequence[str],
                  tokenizers: Sequence[str] = (), max_len: int = 512, batch_size: int = 16,
                  fields: str = "") -> list[str]:
  """Scores `in_path` (JSONL) with every model and writes `out_path`; returns report lines."""
  if not models:
    raise ValueError("give at least one --model")
  if tokenizers and len(tokenizers) != len(models):
    raise ValueError(f"{len(tokenizers)} --tokenizer for {len(models)} --model (one each, or none)")
  records, _ = records_lib.read_pairs(in_path, fields=fields)
  objs = [obj for _, _, obj, problem in sources.rows(in_path) if problem is None]
  assert len(objs) == len(records)  # read_pairs stops on any bad record
  columns, report = [], []
  for i, path in enumerate(models):
    tok = Tokenizer.load(tokenizers[i] if tokenizers else path)
    logps, cut = score(path, tok, records, max_len, batch_size)
    columns.append(logps)
    report.append(f"{path}: scored {len(records)} pairs, {cut} truncated to --max_len={max_len}")
  target = records_lib.parse_fields(fields).get("source_logps", "source_logps")
  with open(out_path, "w") as f:
    for j, obj in enumerate(objs):
      obj = {**obj, target: [[round(float(c[j, 0]), 4), round(float(c[j, 1]), 4)] for c in columns]}
      f.write(json.dumps(obj) + "\n")
  return report


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("in_path")
  parser.add_argument("out_path")
  parser.add_argument("--model", action="append", default=[], help="a source model folder")
  parser.add_argument("--tokenizer", action="append", default=[],
                      help="its tokenizer (default: the model folder)")
  parser.add_argument("--max_len", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--fields", default="", help="as --data_fields: ours:theirs,...")
  args = parser.parse_args(argv)
  try:
    lines = score_sources(args.in_path, args.out_path, args.model, args.tokenizer, args.max_len,
                          args.batch_size, args.fields)
  except (ValueError, OSError) as e:
    print(f"score_sources: error: {e}", file=sys.stderr)
    return 2
  print("\n".join(lines + [f"wrote {args.out_path}"]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
