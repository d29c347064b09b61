"""`jaxpref-data`: tools for preference data files, one subcommand each.

    jaxpref-data validate PATH [--format=pairs|unpaired|ranked] [--fields=prompt:question,...]
                               [--tokenizer=MODEL --max_len=N] [--truncation=keep_end|
                               keep_start|drop] [--max_prompt_len=N]
    jaxpref-data prepare PATH --format=pairs|ranked|unpaired --tokenizer=MODEL --max_len=N
                              --out=DIR [--fields=...] [--split=train] [--group_size=K]
                              [--skip_invalid_records] [--truncation=...] [--max_prompt_len=N]

validate: exit status 0 when training would read the data, 1 when it would stop (a bad
record, a file-wide problem, or --truncation=drop dropping every group), 2 for a usage error
(a bad flag, an unknown field name, no tokenizer). prepare (docs/data.md): 0 when written, 1
for bad data, 2 for a usage error. Errors are one `FATAL:` line; an unexpected exception
keeps its traceback, then one summary line, and exits 1 (`jaxpref.cli_errors`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jaxpref import cli_errors
from jaxpref.data import records
from jaxpref.data import validate as validate_lib
from jaxpref.data import prepare
from jaxpref.data.pairs import TRUNCATION_MODES, Truncation
from jaxpref.data.tokenizer import Tokenizer


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxpref-data", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  v = sub.add_parser("validate", help="check a data file as training would read it",
                     description=validate_lib.__doc__.split("\n")[0])
  v.add_argument("path", help="a JSONL or Parquet file, a folder of them, or a glob (quoted)")
  v.add_argument("--format", default="pairs", choices=tuple(records.KINDS),
                 help="record layout (ratings_* and pairs_as_unpaired read as ranked / pairs)")
  v.add_argument("--fields", default="", help="as --data_fields: ours:theirs,...")
  v.add_argument("--tokenizer", default="", help="sentencepiece model: lengths in tokens")
  v.add_argument("--max_len", type=int, default=None,
                 help="with --tokenizer: count responses training would truncate")
  _truncation_args(v)
  p = sub.add_parser("prepare", help="tokenize records once into ArrayRecord shards",
                     description="tokenize records once into ArrayRecord shards (docs/data.md)")
  p.add_argument("path", help="a JSONL or Parquet file, a folder of them, or a glob (quoted)")
  p.add_argument("--format", default="pairs", choices=("pairs", "ranked", "unpaired"))
  p.add_argument("--tokenizer", required=True, help="sentencepiece model, as --tokenizer")
  p.add_argument("--max_len", type=int, required=True, help="as training's --max_len")
  p.add_argument("--out", required=True, help="folder to write (an earlier prepare there "
                 "is replaced)")
  p.add_argument("--fields", default="", help="as --data_fields: ours:theirs,...")
  p.add_argument("--split", default="train", help="split name stored with the data")
  p.add_argument("--group_size", type=int, default=4, help="--format=ranked: as training's")
  p.add_argument("--skip_invalid_records", action="store_true",
                 help="skip bad records, counted by reason in the stats")
  _truncation_args(p)
  return parser


def _truncation_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--truncation", default="keep_end", choices=TRUNCATION_MODES,
                 help="as training's --truncation: over --max_len keep the prompt's end, its "
                 "start, or drop the group")
  p.add_argument("--max_prompt_len", type=int, default=0,
                 help="as training's --max_prompt_len: cut the prompt to N tokens first (0: no)")


def _fatal(e: Exception) -> None:
  print(f"FATAL: {cli_errors.one_line(e)}", file=sys.stderr)


def _prepare(args) -> int:
  try:
    tok = Tokenizer.load(args.tokenizer)
    records.parse_fields(args.fields, "--fields")
    job = prepare.Job(args.path, args.format, tok, args.max_len, split=args.split,
                      fields=args.fields, skip_invalid=args.skip_invalid_records,
                      group_size=args.group_size,
                      truncation=Truncation(args.truncation, args.max_prompt_len))
  except (ValueError, FileNotFoundError) as e:
    _fatal(e)
    return 2
  try:
    stats = prepare.prepare(job, args.out)
  except records.DataError as e:
    _fatal(e)
    return 1
  except (ValueError, FileNotFoundError) as e:
    _fatal(e)
    return 2
  print(prepare.summary(stats, args.out))
  return 0


def main(argv: Sequence[str]) -> int:
  args = _parser().parse_args(argv)
  if args.command == "prepare":
    return _prepare(args)
  try:
    tok = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    result = validate_lib.validate(args.path, args.format, args.fields, tok, args.max_len,
                                   Truncation(args.truncation, args.max_prompt_len))
  except (ValueError, FileNotFoundError) as e:
    _fatal(e)
    return 2
  print(result.render())
  return 0 if result.ok else 1


@cli_errors.entry_point
def run() -> int:
  return main(sys.argv[1:])


if __name__ == "__main__":
  run()
