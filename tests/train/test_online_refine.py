"""Self-refinement pairs (--online.pairs=refine, EVOLVE / SPHERE): which answers pair up,
how the direct and refinement pairs are laid out, the flags' checks, and a short run."""

import subprocess
import sys

import numpy as np
import pytest

from cli_util import ROOT, env, metrics, train
from jaxpref.train import loop, refine

from test_online import LENGTH, TINY, TINY_FLAGS, config


def test_the_worst_first_answer_is_refined_and_the_best_of_all_is_chosen():
  first = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.5, 0.0]])
  second = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 2.0]])
  worst, best, prefer = refine.choose(first, second)
  np.testing.assert_array_equal(worst, [1, 0, 0])  # ties: the first of the worst
  # ties between a first answer and a refinement keep the first answer (index < K)
  np.testing.assert_array_equal(best, [0, 0, 4])
  np.testing.assert_array_equal(prefer, [True, False, True])  # group 1: nothing better


def test_direct_and_refinement_pairs_share_chosen_and_rejected():
  prompts, refine_prompts = [[1, 5], [1, 6, 6]], [[1, 5, 9, 9, 9], [1, 6, 6, 9]]
  chosen, rejected = [[7, 2], [8, 8, 2]], [[3], [4, 4, 4, 4]]
  scores = np.array([[1.0, 0.0], [0.5, 0.5]])
  out = refine.pairs(prompts, refine_prompts, chosen, rejected, scores, np.array([1.0, 0.0]),
                     "both", pad_id=0, width_multiple=4)
  assert out.tokens.shape == (4, 2, 8)  # the longest row (1,6,6 + 4 tokens = 7) rounded to 4
  np.testing.assert_array_equal(out.tokens[0, 0], [1, 5, 7, 2, 0, 0, 0, 0])
  np.testing.assert_array_equal(out.tokens[1, 1], [1, 6, 6, 4, 4, 4, 4, 0])
  np.testing.assert_array_equal(out.tokens[2, 0], [1, 5, 9, 9, 9, 7, 2, 0])  # under x'
  np.testing.assert_array_equal(out.tokens[3, 1], [1, 6, 6, 9, 4, 4, 4, 4])
  np.testing.assert_array_equal(out.loss_mask[2, 0], [0, 0, 0, 0, 0, 1, 1, 0])  # y+ only
  np.testing.assert_array_equal(out.segment_ids[0, 0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(out.weight, [1.0, 0.0, 1.0, 0.0])
  np.testing.assert_array_equal(out.scores[3], [0.5, 0.5])
  direct = refine.pairs(prompts, refine_prompts, chosen, rejected, scores, np.ones(2), "direct",
                        pad_id=0, width_multiple=4)
  assert direct.tokens.shape == (2, 2, 8)
  np.testing.assert_array_equal(direct.tokens, out.tokens[:2])


def test_the_template_shows_question_and_answer():
  assert (refine.prompt_text("{prompt} you said {response} try again.", "name a fruit?",
                             "i would say red.")
          == "name a fruit? you said i would say red. try again.")
  with pytest.raises(ValueError, match=r"has no \{response\}"):
    refine.check_template("{prompt} try again.")


@pytest.mark.parametrize("overrides, match", [
    (dict(loss="grpo"), "--online.pairs=refine makes preference pairs"),
    (dict(refine_train="refine"), "--online.refine_train must be both or direct"),
    (dict(refine_template="{prompt} again"), r"has no \{response\}"),
    (dict(prompt_pool=16), "does not combine with --online.prompt_pool"),
])
def test_bad_refine_flags_are_refused(tmp_path, overrides, match):
  loss = overrides.pop("loss", "dpo")
  with pytest.raises(ValueError, match=match):
    loop.run(config(tmp_path, loss=loss, steps=1, pairs="refine", **overrides))


@pytest.mark.slow  # a 2-step CLI run in 2 rounds, then jaxpref-generate on it (~1 min)
def test_a_refine_run_trains_both_pairs_and_its_rounds_checkpoint_samples(tmp_path):
  workdir = tmp_path / "refine"
  train(workdir, "--role=online", "--loss=dpo", "--online.pairs=refine",
        f"--online.reward_fn={LENGTH}", f"--train_data={TINY}/prompts_train.jsonl",
        f"--eval_data={TINY}/prompts_eval.jsonl",
        "--online.num_generations=4", "--online.max_new_tokens=6", "--online.eval_samples=2",
        "--batch_size=8", "--steps=2", "--rounds=2", "--eval_every=2", "--checkpoint_every=2",
        "--log_every=1", "--plot=false", flagfile=TINY_FLAGS)
  train_rows, evals = metrics(workdir, "train"), metrics(workdir, "eval")
  assert len(train_rows) == 2 and all(np.isfinite(r["loss"]) for r in train_rows)
  for r in train_rows:
    assert 0.0 <= r["refine/improved_fraction"] <= 1.0
    assert 0.0 <= r["refine/chosen_is_refinement"] <= 1.0
  assert "reward/refined" in evals[-1] and np.isfinite(evals[-1]["reward/refined"])
  # --rounds checkpoints hold the reference beside the state; sampling must restore them
  out = tmp_path / "samples.jsonl"
  gen = subprocess.run(
      [sys.executable, "-m", "jaxpref.eval.generate", f"--run={workdir}",
       f"--prompts={TINY}/prompts_eval.jsonl", f"--samples_out={out}",
       "--online.num_generations=1"], cwd=ROOT, env=env(), capture_output=True, text=True,
      timeout=600)
  assert gen.returncode == 0, gen.stderr[-2000:]
  assert len(open(out).readlines()) == 8
