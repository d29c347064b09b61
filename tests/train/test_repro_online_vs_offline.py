"""experiments/repro/online_vs_offline's pair rule: its offline pairs are what the online
role's pair rule would give the same groups (first best and first worst by the verifier;
a group whose samples all score the same gives no pair). The runs themselves need the
online toy's SFT policy (4 min): tests/train/test_online_toy.py runs seed 0 with it."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_run():
  spec = importlib.util.spec_from_file_location(
      "online_vs_offline_run", ROOT / "experiments/repro/online_vs_offline/run.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_offline_pairs_follow_the_online_pair_rule(tmp_path):
  run = _load_run()
  samples = [
      # "plum. drum." names an instrument too, so the verifier scores it 0
      {"prompt": "name a fruit.", "responses": ["plum. drum.", "apple.", "red."]},
      {"prompt": "tell me a color.", "responses": ["red.", "blue.", "pink."]},  # no pair
      {"prompt": "name an instrument.", "responses": ["lemon.", "goat.", "golf."]},  # none
      # two right: the first is chosen
      {"prompt": "what is your favorite sport?", "responses": ["carrot.", "golf.", "tennis."]},
  ]
  out = tmp_path / "pairs.jsonl"
  assert run.scores(samples).tolist() == [[0, 1, 0], [1, 1, 1], [0, 0, 0], [0, 1, 1]]
  assert run.write_pairs(samples, str(out)) == 2
  got = [json.loads(line) for line in out.read_text().splitlines()]
  assert got == [
      {"prompt": "name a fruit.", "chosen": "apple.", "rejected": "plum. drum."},
      {"prompt": "what is your favorite sport?", "chosen": "golf.", "rejected": "carrot."},
  ]
