"""Issue 19, stale reference cache: the key covers the whole model config and the layout
settings, not only the weights' bytes; an unreadable entry is a miss, recomputed and said."""

import dataclasses
import glob

import numpy as np
import pytest

from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.train import ref_cache
from jaxpref.train.config import DataConfig, RunConfig

TINY = make_tiny.OUT


def _config(**data):
  return RunConfig(workdir="/unused", model=models.get_config("tiny"),
                   reference="precomputed", reference_cache="/unused",
                   data=DataConfig(train_data=f"{TINY}/train.jsonl",
                                   eval_data=f"{TINY}/eval.jsonl",
                                   tokenizer=f"{TINY}/tokenizer.model", **data))


def _key(cfg):
  return ref_cache.key_parts(cfg, cfg.data.train_data, weights="same weights")


BASE = _config()


@pytest.mark.parametrize("change", [
    {"rope_theta": 500000.0}, {"mlp_activation": "gelu_tanh"}, {"final_logit_softcap": 30.0},
    {"norm_eps": 1e-6}, {"attn_logit_softcap": 50.0}])
def test_model_config_change_is_another_key(change):
  other = dataclasses.replace(BASE, model=dataclasses.replace(BASE.model, **change))
  assert _key(other) != _key(BASE)


@pytest.mark.parametrize("change", [
    {"truncation": "keep_start"}, {"max_prompt_len": 8}, {"max_len": 40},
    {"batching": "pack"}, {"shared_prompt": True}])
def test_layout_change_is_another_key(change):
  assert _key(_config(**change)) != _key(BASE)


def test_same_config_same_key():
  assert _key(_config()) == _key(BASE)


@pytest.mark.parametrize("garble", [b"", b"not a zip file", None])
def test_unreadable_entry_is_a_miss_and_said(tmp_path, garble):
  parts = _key(BASE)
  path = ref_cache.save(str(tmp_path), parts, np.ones((3, 2), np.float32))
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2] if garble is None else garble)  # None: a torn file
  notes = []
  assert ref_cache.load(str(tmp_path), parts, (3, 2), notes) is None
  assert len(notes) == 1 and path in notes[0] and "recomputing" in notes[0]
  ref_cache.save(str(tmp_path), parts, np.full((3, 2), 2, np.float32))  # the recompute
  np.testing.assert_array_equal(ref_cache.load(str(tmp_path), parts, (3, 2)), 2)
  assert glob.glob(f"{tmp_path}/*.tmp*") == []


def test_load_keeps_its_old_signature(tmp_path):
  parts = _key(BASE)
  ref_cache.save(str(tmp_path), parts, np.ones((3, 2), np.float32))
  assert ref_cache.load(str(tmp_path), parts, (3, 2)).shape == (3, 2)
  assert ref_cache.load(str(tmp_path / "none"), parts, (3, 2)) is None
