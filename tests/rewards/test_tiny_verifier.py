"""The shipped toy verifier (examples/rewards/tiny_verifier.py) and the tiny prompt files
for online training (jaxpref/data/make_tiny_prompts.py)."""

import json
import os

import numpy as np
import pytest

from cli_util import ROOT
from jaxpref.data import make_tiny, make_tiny_prompts
from jaxpref.rewards import sources

TINY = os.path.join(ROOT, "jaxpref", "data", "tiny")
SPEC = os.path.join(ROOT, "examples", "rewards", "tiny_verifier.py") + ":reward"


@pytest.fixture(scope="module")
def reward():
  return sources.build(reward_fn=SPEC)


def read(name):
  with open(os.path.join(TINY, name)) as f:
    return [json.loads(line) for line in f]


def test_every_shipped_pair_is_verified(reward):
  # The verifier agrees with the dataset's labels: chosen right, rejected wrong, 2300 pairs.
  rows = read("train.jsonl") + read("eval.jsonl")
  out = reward([r["prompt"] for r in rows], [[r["chosen"], r["rejected"]] for r in rows])
  assert out.shape == (len(rows), 2)
  np.testing.assert_array_equal(out[:, 0], 1.0)
  np.testing.assert_array_equal(out[:, 1], 0.0)


def test_rules_by_hand(reward):
  prompts = ["name an animal.", "what is your favorite tool?", "Tell me a  COLOR."]
  responses = [["tiger.", "i would say apple.", "tiger or carrot?", "i am not sure."],
               ["my answer is hammer.", "hammers are fun.", "hammer, saw, drill.", "saw."],
               ["red.", "pink!", "a tiger", "blue blue"]]
  np.testing.assert_array_equal(reward(prompts, responses),
                                [[1, 0, 0, 0], [1, 0, 1, 1], [1, 1, 0, 1]])


def test_prompts_outside_the_tiny_world_are_a_reward_error(reward):
  with pytest.raises(sources.RewardError,
                     match=r"raised ValueError: not a tiny-task prompt .*\(prompt 1: 'say hi.'\)"):
    reward(["name a fruit.", "say hi."], [["apple."], ["hi."]])


def test_verifier_uses_make_tiny_tables():
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_verifier", SPEC.rpartition(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.CATEGORIES is make_tiny.CATEGORIES
  assert sum(len(v) for v in module.ITEMS.values()) == 80 and len(module.ASKS) == 48


def test_prompt_files_regenerate_byte_for_byte(tmp_path):
  make_tiny_prompts.main([f"--out={tmp_path}"])
  for _, name in make_tiny_prompts.SPLITS:
    with open(os.path.join(TINY, name), "rb") as a, open(tmp_path / name, "rb") as b:
      assert a.read() == b.read(), name
  train = [r["prompt"] for r in read("prompts_train.jsonl")]
  evals = [r["prompt"] for r in read("prompts_eval.jsonl")]
  assert len(train) == 40 and len(evals) == 8  # README.md's counts of distinct prompts
  assert train == sorted(set(train)) and not set(train) & set(evals)
  assert set(evals) == {make_tiny.prompt_text(make_tiny.held_out_template(i), c)
                        for i, c in enumerate(make_tiny.CATEGORIES)}
