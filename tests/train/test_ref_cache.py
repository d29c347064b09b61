"""--reference_cache: reused only under an identical key, recomputed otherwise."""

import dataclasses
import glob
import os
import shutil

import numpy as np
import pytest

from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.train import loop, precompute, ref_cache
from jaxpref.train.config import DataConfig, RunConfig

TINY = make_tiny.OUT


def config(workdir, cache, train=f"{TINY}/train.jsonl", seed=0, max_len=32):
  return RunConfig(workdir=str(workdir), model=models.get_config("tiny"), steps=3, log_every=1,
                   eval_every=3, checkpoint_every=3, progress=False, plot=False,
                   reference="precomputed", reference_cache=str(cache), seed=seed,
                   data=DataConfig(train_data=train, eval_data=f"{TINY}/eval.jsonl",
                                   tokenizer=f"{TINY}/tokenizer.model", max_len=max_len))


def _no_compute(*a, **k):
  raise AssertionError("recomputed although the cache holds this key")


@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_same_key_reads_other_keys_recompute(tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  first = loop.run(config(tmp_path / "a", cache))
  assert len(glob.glob(f"{cache}/*.npz")) == 2  # train and eval
  with monkeypatch.context() as m:
    m.setattr(precompute, "precompute_reference", _no_compute)
    second = loop.run(config(tmp_path / "b", cache))
  assert second == first
  # Each of these changes the key, so the (patched-out) computation would be needed.
  edited = tmp_path / "train.jsonl"
  shutil.copy(f"{TINY}/train.jsonl", edited)
  with open(edited, "a") as f:
    f.write('{"prompt": "a b", "chosen": "c", "rejected": "d"}\n')
  for i, cfg in enumerate([config(tmp_path / "c", cache, seed=1),  # other reference weights
                           config(tmp_path / "d", cache, max_len=40),
                           config(tmp_path / "e", cache, train=str(edited))]):
    with monkeypatch.context() as m:
      m.setattr(precompute, "precompute_reference", _no_compute)
      with pytest.raises(AssertionError, match="recomputed"):
        loop.run(cfg)
  loop.run(config(tmp_path / "f", cache, seed=1))
  assert len(glob.glob(f"{cache}/*.npz")) == 4  # seed 1 added train + eval entries


def test_entry_with_another_key_inside_is_not_used(tmp_path):
  parts = {"weights": "w", "data": "d", "version": 1}
  ref_cache.save(str(tmp_path), parts, np.ones((3, 2), np.float32))
  assert ref_cache.load(str(tmp_path), parts, (3, 2)) is not None
  assert ref_cache.load(str(tmp_path), parts, (4, 2)) is None  # shape differs
  (path,) = glob.glob(f"{tmp_path}/*.npz")
  other = {**parts, "weights": "x"}
  np.savez(path, ref_logps=np.ones((3, 2)), key=np.array('{"weights": "x"}'))
  assert ref_cache.load(str(tmp_path), parts, (3, 2)) is None
  assert ref_cache.load(str(tmp_path), other, (3, 2)) is None  # its own name differs


def test_cache_needs_precomputed_reference(tmp_path):
  cfg = config(tmp_path / "w", tmp_path / "cache")
  import dataclasses
  with pytest.raises(ValueError, match="needs --reference=precomputed"):
    loop.setup(dataclasses.replace(cfg, reference="model"))


def test_data_digest_covers_every_shard_of_a_folder_or_glob(tmp_path):
  from jaxpref.train.ref_cache import data_digest
  folder = tmp_path / "shards"
  folder.mkdir()
  for i in range(2):
    (folder / f"part-{i}.jsonl").write_text(f'{{"prompt": "p", "chosen": "a{i}", "rejected": "b"}}\n')
  base = data_digest(str(folder))
  assert data_digest(str(folder / "part-*.jsonl")) == base  # same files, same order
  (folder / "part-1.jsonl").write_text('{"prompt": "p", "chosen": "changed", "rejected": "b"}\n')
  assert data_digest(str(folder)) != base
  (folder / "part-1.jsonl").rename(folder / "part-2.jsonl")
  assert len({base, data_digest(str(folder))}) == 2


def test_key_follows_the_tokenizer_file_and_the_chat_template(tmp_path):
  folder = tmp_path / "tok"
  folder.mkdir()
  shutil.copy(f"{TINY}/tokenizer.model", folder / "tokenizer.model")

  def key(tokenizer, template):
    (folder / "tokenizer_config.json").write_text(
        '{"chat_template": "%s"}' % template)
    cfg = config(tmp_path / "w", tmp_path / "cache")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, tokenizer=str(tokenizer), chat_template="auto"))
    return ref_cache.key_parts(cfg, f"{TINY}/train.jsonl", weights="w")

  plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
  # A folder and the file it resolves to are the same tokenization; no crash on a folder.
  assert key(folder, plain) == key(folder / "tokenizer.model", plain)
  assert key(folder, plain) != key(folder, "<s>" + plain)  # another template, another key
