"""benchmarks/trl_grpo_compare.py's jaxpref side at a toy size (no TRL, no timing bound), so
the benchmark keeps running as the online program changes."""

import math

import numpy as np
import os
import sys

import pytest

from cli_util import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import trl_grpo_compare  # noqa: E402

# 8 prompts: the tests' 8 fake devices split the rollout batch over the data axis.
ARGS = ["--skip_trl", "--preset=tiny", "--vocab_size=64", "--batch_size=8",
        "--num_generations=2", "--prompt_len=8", "--max_completion_length=4", "--steps=1",
        "--rounds=2", "--sampler_batches=2", "--sampler_new=4", "--sampler_reps=1"]


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_the_jaxpref_side_of_the_grpo_benchmark_runs(capsys):
  res = trl_grpo_compare.main(ARGS)
  step = res["step"]
  for key in ("total", "sample", "score", "layout", "update", "tokens", "tokens_per_s",
              "sample_share", "score_share", "layout_share", "update_share", "loss", "kl",
              "reward_mean", "completion_mean"):
    assert math.isfinite(step[key]), key
  assert step["total"] > 0 and step["tokens"] > 8 * 2 * 4  # prompts plus responses
  shares = sum(step[f"{p}_share"] for p in ("sample", "score", "layout", "update"))
  assert abs(shares - 1) < 0.05  # medians of shares, so close to 1 but not exactly
  # One prompt bucket: at most one sampler program per process (0 when another test of
  # this worker built it under another graphdef), and no compile is timed.
  assert res["sampler_programs"] <= 1 and res["xla_compiles_in_timed_steps"] >= 0
  assert "trl" not in res and "ratio" not in res
  assert res["plain"]["update"] > 0 and math.isfinite(res["plain"]["loss"])
  assert [(c["batch"], c["temperature"]) for c in res["sampler"]] == [(2, 0.0), (2, 1.0)]
  assert all(c["tokens_per_s"] > 0 for c in res["sampler"])
  out = capsys.readouterr().out
  assert "| sample |" in out and "sampled tokens/s" in out


def test_the_reward_counts_distinct_words_alike_on_both_sides():
  groups = [["w3 w4 w3", ""], ["w5", "w6 w7 w8"]]
  assert trl_grpo_compare.distinct_words(["p", "q"], groups) == [[2.0, 0.0], [1.0, 3.0]]
  flat = [r for g in groups for r in g]
  assert trl_grpo_compare.trl_distinct_words(["p"] * 4, flat) == [2.0, 0.0, 1.0, 3.0]


def test_tokens_count_each_sequences_prompt_in_either_layout():
  """The shared-prompt layout runs a group's prompt once; tokens/s still counts it for every
  one of the K sequences, as TRL does."""
  import numpy as np
  from jaxpref.data import shared_prompt
  from jaxpref.types import GroupBatch
  tokens = np.array([[[1, 5, 6, 7, 0], [1, 5, 8, 0, 0]]], np.int32)  # prompt [1, 5], K=2
  mask = np.array([[[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]], np.float32)
  batch = GroupBatch(tokens=tokens, loss_mask=mask, segment_ids=(tokens > 0).astype(np.int32),
                     valid=np.ones((1, 2), bool), weight=np.ones(1, np.float32),
                     scores=np.zeros((1, 2), np.float32))
  assert trl_grpo_compare.sequence_tokens(batch) == 4 + 3
  assert trl_grpo_compare.sequence_tokens(shared_prompt.pack(batch, length=8)) == 4 + 3


@pytest.mark.slow  # torch and transformers load, both sides compile (~30 s loaded)
def test_the_sampler_benchmark_counts_what_each_side_returned(capsys):
  """benchmarks/sampler_speed.py at a toy size: both stop cases, two torch variants, the
  same greedy tokens on both sides (one weights file), rates from the tokens returned."""
  pytest.importorskip("transformers")
  import sampler_speed
  rows = sampler_speed.main(["--presets=tiny", "--batches=2", "--new=6", "--reps=1",
                             "--torch_variants=eager,static"])
  assert [(r["batch"], r["stop"]) for r in rows] == [(2, False), (2, True)]
  for r in rows:
    assert r["same"] == 1.0 and r["jaxpref_tok_s"] > 0 and r["torch_static_tok_s"] > 0
  assert "| tiny | 2 | yes |" in capsys.readouterr().out
  stop = 7
  toks = np.array([[1, 2, 5, stop, 0, 0], [1, 2, 5, 6, 8, 9]])
  assert sampler_speed.new_tokens(toks, 2, stop, 0) == 2 + 4
  assert sampler_speed.new_tokens(toks, 2, None, 0) == 8
