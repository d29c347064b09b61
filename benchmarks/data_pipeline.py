"""Data pipeline throughput (records/s) and padding efficiency of pad, buckets and pack.

  python benchmarks/data_pipeline.py [--n=20000] [--max_len=1024] [--batch_size=32]
                                     [--pack_groups=2,4] [--tokenizer=MODEL] [--no_prepare]

Writes `--n` synthetic pair records whose token lengths follow an approximation of
UltraFeedback-binarized's (`LENGTHS`), as JSONL in a temporary folder, then times, in one
process, each stage against a baseline measured in the same run (`json.loads` of every
line of the same file: the floor of reading it at all):

- read: `read_pairs` (parse and check every record), as `jaxpref-train` reads a file;
- tokenize: `PairDataset` (encode, lay out as `[N, 2, max_len]` arrays);
- batch: one epoch of `Batcher` batches (`--batching=pad|buckets|pack`) put on the device;
- prepare: `jaxpref-data prepare` (`prepare.prepare`, TFDS ArrayRecord shards), once;
- grain: one epoch of batches read back from that folder by the grain loader that
  `--train_data=PREPARED` uses, put on the device.

Then the padding efficiency (real tokens / tokens the model computes) of one epoch of
each batching mode at `--max_len`, and pack vs pad and buckets vs pad as ratios.

The length distribution (`LENGTHS`, in tokens) is an approximation, not a measurement of
the dataset: log-normal prompt lengths with median 80 and sigma 1.0 (mean ~130, 90% below
~290, 1% above ~820: short-medium questions with a long tail of pasted documents and
code), chosen responses median 280 and rejected median 230, both sigma 0.7 (means ~360
and ~290, 1% above ~1400 and ~1200: answers of a few hundred tokens, the preferred one
longer on average, as preferred responses tend to be), each clipped to [4, 4096]. Based
on: the dataset card of HuggingFaceH4/ultrafeedback_binarized gives 405,688,662 bytes for
61,135 train_prefs records, 6.6 kB a record holding the prompt 4 times (`prompt` and the
three message lists) and chosen twice; these means at ~4 bytes/token give ~6.1 kB of text
plus JSON keys, which agrees. The text is words of the shipped tiny sentencepiece
tokenizer's corpus, so no token is unknown (`--tokenizer` takes another; the word count of
each field is set from its mean tokens per word); the realized token lengths are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time

import jax
import numpy as np

from jaxpref import data as data_lib
from jaxpref.data import make_tiny
from jaxpref.data.batching import Batcher

# (median tokens, log-normal sigma) per field; see the module docstring.
LENGTHS = {"prompt": (80, 1.0), "chosen": (280, 0.7), "rejected": (230, 0.7)}
CLIP = (4, 4096)
MULTIPLE, WINDOW = 16, 32  # --bucket_multiple and --bucket_window defaults (train/config.py)


def word_text(tok, seed: int, n_words: int = 200_000):
  """(text, start offsets of its words, tokens per word): a long random text of the tiny
  corpus's words, cut by word offsets so that records are slices of it (fast)."""
  with open(os.path.join(make_tiny.OUT, "corpus.txt")) as f:
    vocab = sorted({w.strip(".?,!") for w in f.read().split()} - {""})
  words = np.asarray(vocab)[np.random.default_rng([seed, 0]).integers(len(vocab), size=n_words)]
  text = " ".join(words) + " "
  starts = np.concatenate([[0], np.cumsum([len(w) + 1 for w in words])])
  per_word = len(tok.encode(text[:starts[5000] - 1])) / 5000
  return text, starts, per_word


def write_records(path: str, n: int, tok, seed: int = 0) -> dict[str, np.ndarray]:
  """Writes n pair records as JSONL; returns each field's target token lengths int[n]."""
  rng = np.random.default_rng([seed, 1])
  text, starts, per_word = word_text(tok, seed)
  target = {f: np.clip(np.rint(rng.lognormal(np.log(med), sigma, n)), *CLIP).astype(int)
            for f, (med, sigma) in LENGTHS.items()}
  n_words = len(starts) - 1
  with open(path, "w") as f:
    for i in range(n):
      rec = {}
      for field in LENGTHS:
        w = max(1, int(round(target[field][i] / per_word)))
        a = int(rng.integers(n_words - w))
        rec[field] = text[starts[a]:starts[a + w] - 1]
      f.write(json.dumps(rec) + "\n")
  return target


def realized_lengths(path: str, tok, sample: int = 2000) -> dict[str, np.ndarray]:
  """Token lengths of the first `sample` records' fields, as the tokenizer encodes them."""
  out = {f: [] for f in LENGTHS}
  with open(path) as f:
    for line, _ in zip(f, range(sample)):
      rec = json.loads(line)
      for field in LENGTHS:
        out[field].append(len(tok.encode(rec[field])))
  return {f: np.asarray(v) for f, v in out.items()}


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def baseline(path: str, reps: int = 3) -> float:
  """Seconds to read the file and `json.loads` every line (the best of `reps`: it is
  short, so one run is at the mercy of the machine's other load)."""
  def run():
    with open(path, "rb") as f:
      return sum(1 for line in f if json.loads(line))
  return min(_timed(run)[1] for _ in range(reps))


def epoch(batcher, steps: int) -> float:
  """Seconds to build `steps` batches and put each on the device."""
  def run():
    for step in range(steps):
      jax.block_until_ready(jax.device_put(batcher.batch(step)))
  return _timed(run)[1]


def batchers(ds, batch_size: int, pack_groups: list[int]) -> dict[str, Batcher]:
  out = {mode: Batcher(ds, batch_size, 0, mode, MULTIPLE, WINDOW) for mode in ("pad", "buckets")}
  for m in pack_groups:
    out[f"pack m={m}"] = Batcher(ds, batch_size, 0, "pack", MULTIPLE, WINDOW, pack_groups=m)
  return out


def efficiency(ds, batch_size: int, pack_groups: list[int]) -> dict[str, float]:
  """Padding efficiency of one epoch (N // batch_size batches) of each mode."""
  steps = ds.n // batch_size
  return {name: b.estimate(steps)[0] for name, b in batchers(ds, batch_size, pack_groups).items()}


def throughput(path: str, tok, max_len: int, batch_size: int, pack_groups: list[int],
               workdir: str, prepare: bool = True) -> tuple[dict[str, float], object]:
  """Seconds per stage (see the module docstring), and the tokenized dataset."""
  times = {"json.loads (baseline)": baseline(path)}
  records, times["read (read_pairs)"] = _timed(lambda: data_lib.read_pairs(path)[0])
  ds, times["tokenize (PairDataset)"] = _timed(lambda: data_lib.PairDataset(records, tok, max_len))
  steps = ds.n // batch_size
  for name, b in batchers(ds, batch_size, pack_groups).items():
    times[f"batch {name}"] = epoch(b, steps)
  if prepare:
    from jaxpref.data import grain_source
    from jaxpref.data import prepare as prepare_lib
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    out = os.path.join(workdir, "prepared")
    job = prepare_lib.Job(path, "pairs", tok, max_len, say=lambda msg: None)
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading and preparing"
      times["prepare (jaxpref-data prepare)"] = _timed(lambda: prepare_lib.prepare(job, out))[1]
    grain = grain_source.GrainBatcher(grain_source.PreparedDataset(out), batch_size, 0)
    times["grain pad batches (prepared)"] = epoch(grain, steps)
  return times, ds


def _quantiles(x: np.ndarray) -> str:
  q = np.percentile(x, [10, 50, 90, 99])
  return f"mean {x.mean():6.0f}  p10/p50/p90/p99 " + "/".join(f"{v:.0f}" for v in q)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, default=20_000, help="pair records to generate")
  parser.add_argument("--max_len", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--pack_groups", default="2,4", help="comma-separated m values")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_prepare", action="store_true", help="skip prepare and grain")
  parser.add_argument("--tokenizer", default=os.path.join(make_tiny.OUT, "tokenizer.model"),
                      help="as --tokenizer (a sentencepiece model, tokenizer.json or HF folder)")
  args = parser.parse_args()
  pack_groups = [int(m) for m in args.pack_groups.split(",")]

  tok = data_lib.Tokenizer.load(args.tokenizer)
  with tempfile.TemporaryDirectory(prefix="jaxpref-bench-") as workdir:
    path = os.path.join(workdir, "pairs.jsonl")
    _, gen_s = _timed(lambda: write_records(path, args.n, tok, args.seed))
    print(f"{args.n} records, {os.path.getsize(path) / 2**20:.1f} MiB JSONL (written in "
          f"{gen_s:.1f} s), tokenizer {tok.describe()}, {os.cpu_count()} cores, "
          f"max_len {args.max_len}, batch {args.batch_size}")
    for field, x in realized_lengths(path, tok).items():
      print(f"  {field:8s} tokens: {_quantiles(x)}")
    times, ds = throughput(path, tok, args.max_len, args.batch_size, pack_groups, workdir,
                           prepare=not args.no_prepare)
  print(f"  truncated at max_len {args.max_len}: {ds.n_truncated / ds.n:.1%} of pairs")
  base = times["json.loads (baseline)"]
  n_epoch = ds.n // args.batch_size * args.batch_size
  print("\n| stage | seconds | records/s | batches/s | x json.loads |\n|---|---|---|---|---|")
  for stage, s in times.items():
    batched = stage.startswith(("batch", "grain"))
    n = n_epoch if batched else ds.n
    per_batch = f"{n / args.batch_size / s:,.1f}" if batched else ""
    print(f"| {stage} | {s:.2f} | {n / s:,.0f} | {per_batch} | {(n / s) / (ds.n / base):.3f} |")
  eff = efficiency(ds, args.batch_size, pack_groups)
  print(f"\n| batching | padding efficiency | vs pad |\n|---|---|---|")
  for name, e in eff.items():
    print(f"| {name} | {e:.3f} | x{e / eff['pad']:.2f} |")


if __name__ == "__main__":
  main()
