"""Synthetic preference worlds (`jaxpref/data/synthetic.py`): deterministic, readable by
`read_pairs`, free of unknown tokens, and true to the ground truth they record."""

import collections
import itertools
import json

import numpy as np
import pytest

from jaxpref import data as data_lib
from jaxpref.data import make_tiny, synthetic

TOKENIZER = f"{make_tiny.OUT}/tokenizer.model"


def records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("argv", [["bt", "--flip_rate=0.2"], ["cyclic"],
                                  ["groups", "--temperature=0.5"], ["groups", "--hide_group"]])
def test_cli_writes_deterministic_readable_files(tmp_path, argv):
  for run in ("a", "b"):
    assert synthetic.main([*argv, f"--out_dir={tmp_path / run}", "--n_train=120",
                           "--n_eval=30", "--seed=3"]) == 0
  for name in ("train.jsonl", "eval.jsonl", "truth.json"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  pairs, report = data_lib.read_pairs(str(tmp_path / "a" / "train.jsonl"))
  assert report.n_read == 120 and report.n_skipped == 0
  ds = data_lib.PairDataset(pairs, data_lib.Tokenizer.load(TOKENIZER), 40)
  assert ds.n_unk == 0 and ds.n_truncated == 0
  assert records(tmp_path / "a" / "train.jsonl") != records(tmp_path / "a" / "eval.jsonl")[:120]


def test_bad_arguments_are_reported(capsys):
  assert synthetic.main(["cyclic", "--out_dir=/tmp/unused", "--cycle_length=4"]) == 2
  assert "--cycle_length must be odd" in capsys.readouterr().err
  with pytest.raises(ValueError, match="--n_items must be in"):
    synthetic.BT(0, n_items=200)


def test_bt_labels_follow_utilities_and_flips_are_recorded():
  world = synthetic.BT(0, n_items=12, flip_rate=0.25)
  recs = world.sample(np.random.default_rng(1), 4000)
  for r in recs:
    higher = r["chosen_utility"] > r["rejected_utility"]
    assert higher != r["flipped"]  # temperature 0: only the injected flips go the wrong way
    assert world.utility[world.items.index(r["chosen_item"])] == r["chosen_utility"]
  assert np.mean([r["flipped"] for r in recs]) == pytest.approx(0.25, abs=0.02)


def test_bt_sampling_matches_its_probability():
  world = synthetic.BT(0, n_items=6, temperature=1.0)
  recs = world.sample(np.random.default_rng(2), 20000)
  p = np.array([r["p_chosen"] for r in recs])
  # Each record's chosen side was drawn with probability p_chosen, so on average
  # E[p_chosen] = E[p^2 + (1-p)^2] >= 1/2, and the higher-utility item wins as BT says.
  won = np.array([r["chosen_utility"] > r["rejected_utility"] for r in recs])
  q = np.where(won, p, 1 - p)  # P(higher wins) per record's pair
  np.testing.assert_allclose(won.mean(), q.mean(), atol=0.01)


def test_cyclic_is_balanced_and_no_scalar_beats_two_thirds():
  world = synthetic.Cyclic(0, n_cycles=4)
  recs = world.sample(np.random.default_rng(0), 24 * 10)
  counts = collections.Counter((r["chosen_item"], r["rejected_item"]) for r in recs)
  assert set(counts.values()) == {20}  # 12 pairs, each exactly 20 times
  wins = collections.Counter(r["chosen_item"] for r in recs)
  losses = collections.Counter(r["rejected_item"] for r in recs)
  assert wins == losses  # every item wins as often as it loses: the BT gradient at a tie is 0
  for cycle in world.cycles:
    beats = {(w, l) for _, w, l in world.pairs if w in cycle}
    best = max(sum(order.index(w) < order.index(l) for w, l in beats)
               for order in itertools.permutations(cycle))
    assert best == 2  # any ranking of a 3-cycle gets 2 of its 3 pairs right


def test_cyclic_bt_maximum_likelihood_is_a_tie():
  world = synthetic.Cyclic(1, n_cycles=2)
  recs = world.sample(np.random.default_rng(1), 600)
  items = sorted({r["chosen_item"] for r in recs})
  w = np.array([items.index(r["chosen_item"]) for r in recs])
  l = np.array([items.index(r["rejected_item"]) for r in recs])
  u = np.random.default_rng(0).normal(size=len(items))
  for _ in range(2000):  # gradient descent on the float64 BT negative log-likelihood
    g = 1 / (1 + np.exp(u[w] - u[l]))
    grad = np.zeros_like(u)
    np.add.at(grad, w, -g)
    np.add.at(grad, l, g)
    u -= 0.5 * grad / len(recs)
  for c in range(2):
    members = [items.index(i) for i in world.cycles[c]]
    assert np.ptp(u[members]) < 1e-3


def test_groups_prefer_their_ideal_points():
  world = synthetic.Groups(0, n_items=10, n_groups=3)
  recs = world.sample(np.random.default_rng(0), 600)
  for r in recs:
    g = world.groups.index(r["group"])
    f = {n: world.points[world.items.index(n)] for n in (r["chosen_item"], r["rejected_item"])}
    dist = {n: np.sum((p - world.ideal[g]) ** 2) for n, p in f.items()}
    assert dist[r["chosen_item"]] < dist[r["rejected_item"]]
    assert r["prompt"].startswith(f"for group {r['group']},")
  hidden = synthetic.Groups(0, n_items=10, n_groups=3, hide_group=True)
  assert not any("group" in r["prompt"] for r in hidden.sample(np.random.default_rng(0), 50))


def test_n_prompts_limits_the_phrasings():
  world = synthetic.Cyclic(0, n_cycles=2, n_prompts=1)
  assert {r["prompt"] for r in world.sample(np.random.default_rng(0), 30)} == {synthetic.PROMPTS[0]}
  with pytest.raises(ValueError, match="--n_prompts"):
    synthetic.BT(0, n_prompts=0)
