"""--reference=precomputed trains exactly like the frozen reference model, without it."""

import json
import os

import numpy as np
import pytest

from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.train import loop
from jaxpref.train.config import DataConfig, RunConfig

TINY = make_tiny.OUT


def config(workdir, **kw):
  return RunConfig(workdir=str(workdir), model=models.get_config("tiny"), steps=30, log_every=1,
                   eval_every=30, checkpoint_every=30, progress=False, plot=False, mesh="data:8",
                   data=DataConfig(train_data=f"{TINY}/train.jsonl", eval_data=f"{TINY}/eval.jsonl",
                                   tokenizer=f"{TINY}/tokenizer.model"), **kw)


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_precomputed_reference_matches_model_reference(tmp_path):
  a = loop.run(config(tmp_path / "model"))
  b = loop.run(config(tmp_path / "pre", reference="precomputed"))
  np.testing.assert_allclose(train_losses(tmp_path / "pre"), train_losses(tmp_path / "model"),
                             atol=1e-5, rtol=0)
  assert abs(a["rewards/accuracy"] - b["rewards/accuracy"]) < 0.01


def test_precomputed_reference_refuses_token_level_losses(tmp_path):
  with pytest.raises(ValueError, match="--reference=precomputed stores sequence log-probs"):
    loop.setup(config(tmp_path / "w", reference="precomputed", loss="ld_dpo"))
