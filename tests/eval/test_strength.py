"""`jaxpref-strength`: ensemble preference strength (docs/reward_models.md#ensemble-preference-strength), its output fields and
how they drive the strength losses through `--data_fields`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cli_util import ROOT, env
from jaxpref.data import records as records_lib
from jaxpref.data import synthetic
from jaxpref.eval import strength

BASE = os.path.join(ROOT, "experiments", "repro", "label_noise", "base.flags")
MAP = "chosen_score:ensemble_chosen_reward,rejected_score:ensemble_rejected_reward"


def test_ensemble_stats_match_a_float64_reference():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(4, 7, 2))
  got = strength.ensemble_stats(r)
  # Reference from the definition: d_ij = r_j(x, y_w) - r_j(x, y_l), over members j.
  d = np.array([[r[j, i, 0] - r[j, i, 1] for j in range(4)] for i in range(7)])  # [N, M]
  mean = d.sum(1) / 4
  std = np.sqrt(((d - mean[:, None]) ** 2).sum(1) / 4)
  np.testing.assert_allclose(got["strength_mean"], mean, rtol=1e-12)
  np.testing.assert_allclose(got["strength_std"], std, rtol=1e-12)
  # The mean rewards' difference is the strength: what --data_fields feeds the losses.
  np.testing.assert_allclose(got["ensemble_chosen_reward"] - got["ensemble_rejected_reward"],
                             mean, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(got["strength_against"], np.minimum((d < 0).mean(1), 0.5))
  assert got["strength_against"].max() <= 0.5


def test_ensemble_stats_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"\[members, pairs, 2\]"):
    strength.ensemble_stats(np.zeros((3, 4)))


def test_flip_detection_precision_and_recall():
  mu = np.array([-1.0, -0.5, 0.2, 0.3, -0.1, 2.0])
  flipped = np.array([True, False, True, False, True, False])
  det = strength.flip_detection(mu, flipped)
  # negatives: 0, 1, 4; flipped: 0, 2, 4 -> tp = 2
  assert det["precision"] == pytest.approx(2 / 3) and det["recall"] == pytest.approx(2 / 3)
  assert det["n_flipped"] == 3 and det["n_negative"] == 3


def test_annotate_keeps_every_field_and_summary_counts():
  objs = [{"prompt": "p", "chosen": "a", "rejected": "b", "extra": [1, 2]},
          {"prompt": "p", "chosen": "c", "rejected": "d", "flipped": True}]
  stats = strength.ensemble_stats(np.array([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [1.0, 2.0]]]))
  out = strength.annotate(objs, stats)
  assert out[0]["extra"] == [1, 2] and out[1]["flipped"] is True
  assert out[0]["strength_mean"] == 2.0 and out[1]["strength_mean"] == -1.5
  assert out[0]["strength_std"] == 1.0 and out[1]["strength_against"] == 0.5
  text = strength.summary_text(stats)
  assert "negative (likely mislabelled): 1 (50.0%)" in text
  with pytest.raises(ValueError, match=r"3 records but strengths for \[2\] pairs"):
    strength.annotate(objs + objs[:1], stats)


def test_written_fields_drive_the_strength_losses(tmp_path):
  """The ensemble rewards mapped onto the score fields give mu = strength_mean."""
  path = tmp_path / "s.jsonl"
  recs = [{"prompt": "p", "chosen": "a", "rejected": "b", "strength_mean": -0.75,
           "ensemble_chosen_reward": 0.25, "ensemble_rejected_reward": 1.0,
           "strength_against": 0.5}]
  path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
  (rec,), _ = records_lib.read_pairs(str(path), fields=MAP + ",label_smoothing:strength_against")
  assert rec.scores[0] - rec.scores[1] == pytest.approx(-0.75)
  assert rec.label_smoothing == 0.5


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxpref.eval.strength", *args], cwd=ROOT,
                        env=env(), capture_output=True, text=True, timeout=900)


def test_cli_rejects_an_embedding_head(tmp_path):
  proc = _cli(f"--flagfile={BASE}", f"--workdir={tmp_path}/w", "--reward_dim=4", "--loss=gpm",
              "--train_data=jaxpref/data/tiny/train.jsonl", "--eval_data=")
  assert proc.returncode == 1 and "--reward_dim=1" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_cli_writes_strengths_histogram_and_kept_file(tmp_path):
  data = tmp_path / "data"
  assert synthetic.main(["bt", f"--out_dir={data}", "--n_train=96", "--n_eval=0",
                         "--flip_rate=0.25", "--n_items=6"]) == 0
  work = tmp_path / "ens"
  proc = _cli(f"--flagfile={BASE}", f"--workdir={work}", f"--train_data={data}/train.jsonl",
              "--eval_data=", "--loss=bt", "--ensemble_size=2", "--steps=8",
              "--eval_every=8", "--checkpoint_every=8", "--noprogress",
              "--strength_drop_below=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "member 2/2" in proc.stdout and "ground truth 'flipped'" in proc.stdout
  src = [json.loads(line) for line in open(data / "train.jsonl")]
  out = [json.loads(line) for line in open(work / "strength.jsonl")]
  assert len(out) == len(src) == 96
  for a, b in zip(src, out):
    assert {k: b[k] for k in a} == a  # every original field, unchanged
    assert b["strength_std"] >= 0
    assert b["strength_mean"] == pytest.approx(b["ensemble_chosen_reward"]
                                               - b["ensemble_rejected_reward"], abs=1e-5)
  # Two members with different seeds disagree somewhere.
  assert max(r["strength_std"] for r in out) > 0
  kept = [json.loads(line) for line in open(work / "strength_kept.jsonl")]
  assert len(kept) == sum(r["strength_mean"] >= 0 for r in out)
  assert os.path.getsize(work / "strength_hist.png") > 0
  assert "strength_mean over 96 pairs" in open(work / "strength_summary.txt").read()
  assert sorted(os.listdir(work / "member_1" / "checkpoints")) == ["8"]
