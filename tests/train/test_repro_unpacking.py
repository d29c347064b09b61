"""experiments/repro/unpacking_dpo_ppo: the label flipping behind its "noisy" pairs, the
aspect ranking its table states, and (slow) one shortened PPO cell through run.py's own
functions. The full grid needs the online toy's SFT policy and about 40 minutes."""

import importlib.util
import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAIRS = ROOT / "jaxpref/data/tiny/train.jsonl"


def _load_run():
  spec = importlib.util.spec_from_file_location(
      "unpacking_run", ROOT / "experiments/repro/unpacking_dpo_ppo/run.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _records():
  return [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]


def test_flip_labels_is_seeded_and_flips_exactly_the_stated_fraction():
  run = _load_run()
  recs = _records()
  out, idx = run.flip_labels(recs, 0.35, seed=0)
  assert len(idx) == 700 == sum(r["flipped"] for r in out)  # 35% of 2000, not about 35%
  assert run.flip_labels(recs, 0.35, seed=0)[1] == idx  # seeded
  assert run.flip_labels(recs, 0.35, seed=1)[1] != idx
  for r, o in zip(recs, out):
    pair = (o["rejected"], o["chosen"]) if o["flipped"] else (o["chosen"], o["rejected"])
    assert pair == (r["chosen"], r["rejected"]) and o["prompt"] == r["prompt"]
  assert run.flip_labels(recs, 0.0, seed=0)[1] == []


def test_noisy_data_is_written_once_and_clean_is_the_shipped_file(tmp_path):
  run = _load_run()
  assert run.write_data(str(tmp_path), "clean", 0.35, 0) == os.path.join(run.TINY, "train.jsonl")
  path = run.write_data(str(tmp_path), "noisy", 0.35, 0)
  first = pathlib.Path(path).read_text()
  assert sum(json.loads(line)["flipped"] for line in first.splitlines()) == 700
  assert pathlib.Path(run.write_data(str(tmp_path), "noisy", 0.5, 1)).read_text() == first


def _acc(data_gain, ppo_gain, rm_gain, base=0.5):
  """acc[data][cell] with the given gains of clean over noisy, PPO over DPO, tiny over small."""
  acc = {}
  for d, shift in (("clean", data_gain), ("noisy", 0.0)):
    ppo_small = base + shift + ppo_gain - rm_gain / 2
    acc[d] = {"dpo": base + shift, "ppo_tiny": ppo_small + rm_gain, "ppo_small": ppo_small,
              "grpo_tiny": base + shift + rm_gain, "grpo_small": base + shift}
  return acc


def test_aspects_rank_the_gains_in_the_papers_direction():
  run = _load_run()
  got = {a["aspect"].split()[0]: a for a in run.aspects(_acc(0.3, 0.1, 0.05))}
  assert {k: round(a["gain"], 6) for k, a in got.items()} == {
      "data": 0.3, "algorithm": 0.1, "reward": 0.05}
  assert all(a["rank"] == a["paper_rank"] for a in got.values())  # data > algorithm > RM
  # PPO below DPO: the algorithm's gain is negative and it ranks last, below a zero RM gain
  got = {a["aspect"].split()[0]: a for a in run.aspects(_acc(0.2, -0.1, 0.0))}
  assert round(got["algorithm"]["gain"], 6) == -0.1
  assert [got[k]["rank"] for k in ("data", "reward", "algorithm")] == [1, 2, 3]


def test_table_states_every_cell_and_the_ranking():
  run = _load_run()
  acc = _acc(0.25, 0.125, 0.0)
  cells = {d: {"rm": {"tiny": {"accuracy": 0.9}, "small": {"accuracy": 0.8}},
               "cells": {c: {"greedy": v, "sampled": v / 2}
                         for c, v in {**acc[d], "dpo_lr1e-4": 0.375}.items()}}
           for d in acc}
  gold = {"greedy": 1.0, "sampled": 0.75}
  md = run.table({"greedy": 0.5, "sampled": 0.25}, [{"seed": 0, "gold": gold, **cells}], 0.35)
  assert md.count("| clean |") == 6 and md.count("| noisy (35% flipped) |") == 6
  assert "| none | PPO | the verifier (a perfect RM) | - | 1.000 | 0.750 |" in md
  assert "| data (clean vs noisy pairs) | +0.250 | 1 | +0.125 | 1 | 1 |" in md
  assert "| algorithm (PPO vs DPO) | +0.125 | 2 | +0.062 | 2 | 2 |" in md
  # the second ranking puts the lr-1e-4 DPO run (0.375 on both data) in the DPO cell
  assert "| algorithm (PPO vs DPO) | +0.375 | 1 | +0.188 | 1 | 2 |" in md
  assert "| data (clean vs noisy pairs) | +0.200 | 2 |" in md


@pytest.mark.slow  # two jaxpref-train runs and one jaxpref-generate: about a minute
def test_one_short_ppo_cell_runs_end_to_end(tmp_path, monkeypatch):
  """A 2-step BT model on 64 flipped pairs, then 2 PPO steps against it from a fresh tiny
  policy (CI has no SFT policy), through run_rm and run_cell; a second call runs nothing."""
  # run.py's subprocesses inherit the environment: one CPU device, as the grid ran (the
  # suite's 8 fake devices would also make the batch sizes below invalid)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  run = _load_run()
  src = tmp_path / "pairs.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in _records()[:64]))
  pairs = run.write_data(str(tmp_path), "noisy", 0.25, 0, source=str(src))
  short = ["--steps=2", "--log_every=1", "--eval_every=2", "--checkpoint_every=2",
           "--noprogress"]
  rm = run.run_rm(str(tmp_path), "small", pairs, 0,
                  extra=short + ["--batch_size=8", f"--eval_data={src}"])
  assert 0.0 <= rm["accuracy"] <= 1.0 and rm["wall_s"] > 0
  flags = (tmp_path / "rm_small" / "flags.txt").read_text()
  assert pairs in flags and "--model.d_model=32" in flags  # rm_small.flags and the noisy pairs
  cell = run.run_cell(str(tmp_path), "ppo", rm, pairs, 0, "",
                      extra=short + ["--batch_size=4", "--online.num_generations=2"], samples=0)
  assert [s for s, _ in cell["eval_curve"]][-1] == 2
  # the online role's eval and jaxpref-generate score the same greedy samples
  assert cell["greedy"] == cell["greedy_generate"]
  assert (tmp_path / "ppo_small" / "final_metrics.json").is_file()
  assert run.run_cell(str(tmp_path), "ppo", rm, pairs, 0, "", extra=short,
                      samples=0)["wall_s"] == 0.0
