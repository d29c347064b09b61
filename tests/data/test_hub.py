"""Hugging Face Hub ids for --init_from, --tokenizer, --train_data and --eval_data, offline:
a Hub cache is laid out in a tmp dir exactly as the Hub client lays it out (checked with
huggingface_hub's own `scan_cache_dir`), from a tiny model saved by jaxpref and the tiny
data as Parquet, and jaxpref-train reads it with HF_HUB_OFFLINE=1."""

import hashlib
import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl import flags
from flax import nnx

from cli_util import ROOT, env, metrics, train_cmd
from jaxpref import models
from jaxpref.data import hub, make_tiny
from jaxpref.models import hf

TINY = make_tiny.OUT
MODEL_ID, DATA_ID = "tiny-org/tiny-llama", "tiny-org/tiny-prefs"
# LFS-tracked on the Hub (blob named by sha256); other files are git blobs (sha1 of a header).
_LFS = (".safetensors", ".parquet", ".model")


def _blob_name(name: str, data: bytes) -> str:
  if name.endswith(_LFS):
    return hashlib.sha256(data).hexdigest()
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_cache(cache: str, repo_type: str, repo_id: str, files: dict[str, bytes]) -> str:
  """`files` as the `main` snapshot of a repository in a Hub cache (docs:
  https://huggingface.co/docs/hub/local-cache): blobs/<hash>, refs/main holding the commit,
  snapshots/<commit>/<path> a relative symlink to its blob. Returns the commit."""
  repo_dir = os.path.join(cache, f"{repo_type}s--{repo_id.replace('/', '--')}")
  commit = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest())
                                          for k, v in files.items())).encode()).hexdigest()
  os.makedirs(os.path.join(repo_dir, "blobs"), exist_ok=True)
  os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
  with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
    f.write(commit)  # no newline, as the client writes it
  for path, data in files.items():
    blob = os.path.join(repo_dir, "blobs", _blob_name(path, data))
    with open(blob, "wb") as f:
      f.write(data)
    link = os.path.join(repo_dir, "snapshots", commit, path)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
  return commit


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _parquet(jsonl: str) -> bytes:
  with open(jsonl) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  sink = pa.BufferOutputStream()
  pq.write_table(pa.Table.from_pylist(rows), sink)
  return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """HF_HOME/hub with the tiny model (config, weights, tokenizer) and the tiny pairs."""
  root = tmp_path_factory.mktemp("hf")
  # Not the `tiny` preset the quickstart's flag file names: the run must take this shape.
  cfg = models.get_config("tiny", vocab_size=160, d_model=32, n_heads=2, n_kv_heads=1,
                          head_dim=16, d_ff=64, n_layers=1)
  hf.save(models.Decoder(cfg, rngs=nnx.Rngs(0)), cfg, str(root / "export"))
  model_files = {n: _read(str(root / "export" / n)) for n in os.listdir(root / "export")}
  model_files["tokenizer.model"] = _read(f"{TINY}/tokenizer.model")
  data_files = {"README.md": b"---\nlicense: mit\n---\n",
                "data/train-00000-of-00001.parquet": _parquet(f"{TINY}/train.jsonl"),
                "data/test-00000-of-00001.parquet": _parquet(f"{TINY}/eval.jsonl")}
  hub_cache = str(root / "home" / "hub")
  commits = {MODEL_ID: add_to_cache(hub_cache, "model", MODEL_ID, model_files),
             DATA_ID: add_to_cache(hub_cache, "dataset", DATA_ID, data_files)}
  return str(root / "home"), hub_cache, commits, model_files


def test_the_cache_reads_as_the_hub_clients(cache):
  from huggingface_hub import scan_cache_dir  # heavy, only here
  _, hub_cache, commits, model_files = cache
  info = scan_cache_dir(hub_cache)
  assert not info.warnings, info.warnings
  repos = {(r.repo_type, r.repo_id): r for r in info.repos}
  assert set(repos) == {("model", MODEL_ID), ("dataset", DATA_ID)}
  for (_, repo_id), repo in repos.items():
    (rev,) = repo.revisions
    assert rev.commit_hash == commits[repo_id] and rev.refs == frozenset({"main"})
  (rev,) = repos[("model", MODEL_ID)].revisions
  assert {f.file_name for f in rev.files} == set(model_files)


def _run(tmp_path, *flags, **environ):
  e = {**env(), **environ}
  for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "TRANSFORMERS_OFFLINE"):
    if name not in environ:
      e.pop(name, None)
  return subprocess.run(train_cmd(str(tmp_path), *flags), cwd=ROOT,
                        env=e, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_train_from_a_model_id_and_a_dataset_id_offline(cache, tmp_path):
  home, _, commits, model_files = cache
  workdir = tmp_path / "run"
  proc = _run(workdir, f"--init_from={MODEL_ID}", f"--tokenizer={MODEL_ID}",
              f"--train_data={DATA_ID}", f"--eval_data={DATA_ID}", "--steps=2", "--log_every=1",
              "--eval_every=2", "--checkpoint_every=2", "--noplot",
              HF_HOME=home, HF_HUB_OFFLINE="1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for flag in ("init_from", "tokenizer"):
    assert f"--{flag}: Hub {MODEL_ID}@{commits[MODEL_ID]}, read from" in proc.stdout
  for flag in ("train_data", "eval_data"):
    assert f"--{flag}: Hub dataset:{DATA_ID}@{commits[DATA_ID]}, read from" in proc.stdout
  with open(workdir / "run.json") as f:
    settings = json.load(f)["settings"]
  assert settings["init_from hub"] == f"{MODEL_ID}@{commits[MODEL_ID]}"
  assert settings["train_data hub"] == f"dataset:{DATA_ID}@{commits[DATA_ID]}"
  assert settings["train_data"].endswith(f"snapshots/{commits[DATA_ID]}/data/train[-.]*.parquet")
  assert list(settings["train_data files"]) == ["train-00000-of-00001.parquet"]
  assert list(settings["eval_data files"]) == ["test-00000-of-00001.parquet"]
  # The weights read are the cached file's bytes, and their shape replaced --model=tiny.
  sha = hashlib.sha256(model_files["model.safetensors"]).hexdigest()
  assert settings["init_from files"]["model.safetensors"]["sha256"] == sha
  assert settings["model.d_model"] == 32 and settings["model.n_layers"] == 1
  # Policy and reference both start from the cached weights: the step-0 DPO loss is log 2,
  # on the 2000 train pairs of the Parquet shard.
  assert metrics(str(workdir), "train")[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
  assert "train[-.]*.parquet: read 2000 records, skipped 0" in proc.stdout
  assert "test[-.]*.parquet: read 300 records, skipped 0" in proc.stdout
  # flags.txt re-runs it elsewhere: the ids as given, never this machine's cache paths.
  with open(workdir / "flags.txt") as f:
    written = f.read().splitlines()
  assert {f"--init_from={MODEL_ID}", f"--tokenizer={MODEL_ID}", f"--train_data={DATA_ID}",
          f"--eval_data={DATA_ID}"} <= set(written)


@pytest.mark.slow  # 10 s: a jaxpref-train start-up
def test_an_id_not_in_the_cache_is_one_line(cache, tmp_path):
  _, hub_cache, _, _ = cache
  proc = _run(tmp_path / "run", "--init_from=tiny-org/absent", HF_HUB_CACHE=hub_cache,
              HF_HUB_OFFLINE="1")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  (line,) = [ln for ln in proc.stderr.splitlines() if "tiny-org/absent" in ln]
  assert "--init_from=tiny-org/absent" in line and f"not in the Hub cache {hub_cache}" in line


def test_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
  assert hub.parse("Qwen/Qwen2.5-0.5B-Instruct", "init_from") == {
      "repo": "Qwen/Qwen2.5-0.5B-Instruct", "revision": None, "split": None}
  assert hub.parse("trl-lib/ultrafeedback_binarized@refs/pr/3:test", "eval_data") == {
      "repo": "trl-lib/ultrafeedback_binarized", "revision": "refs/pr/3", "split": "test"}
  (tmp_path / "org").mkdir()
  (tmp_path / "org" / "name").mkdir()
  monkeypatch.chdir(tmp_path)  # an existing folder of that shape is a path, never an id
  for value in ("org/name", "data/train.jsonl", "gs://b/x", "runs/*.parquet", "./a/b", "a/b/c",
                "jaxpref/data/tiny/tokenizer.model", ""):
    assert hub.parse(value, "train_data") is None, value
  with pytest.raises(ValueError, match=r"--init_from=a/b:train: ':train' names a dataset split"):
    hub.parse("a/b:train", "init_from")


def _touch(folder, *names):
  for n in names:
    os.makedirs(os.path.dirname(os.path.join(folder, n)) or folder, exist_ok=True)
    open(os.path.join(folder, n), "w").close()


def test_a_splits_files(tmp_path):
  hub_layout = str(tmp_path / "a")
  _touch(hub_layout, "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
         "data/test-00000-of-00001.parquet", "train_prefs.jsonl", "extra/train.jsonl")
  got = hub._split_glob("train_data", "o/n", hub_layout, "train", False)
  assert got == os.path.join(hub_layout, "data", "train[-.]*.parquet")  # Parquet over JSONL
  assert hub._split_glob("eval_data", "o/n", hub_layout, "test", False) == os.path.join(
      hub_layout, "data", "test[-.]*.parquet")
  # `train_prefs` is its own split, not `train`'s.
  assert hub._split_glob("train_data", "o/n:train_prefs", hub_layout, "train_prefs", True) == (
      os.path.join(hub_layout, "train_prefs.jsonl"))
  with pytest.raises(ValueError, match=r"--eval_data=o/n:dev: no 'dev' split .* splits found: "
                     r"test, train; pick one with o/n:SPLIT"):
    hub._split_glob("eval_data", "o/n:dev", hub_layout, "dev", True)

  by_folder = str(tmp_path / "b")
  _touch(by_folder, "default/train/0000.parquet", "default/train/0001.parquet",
         "default/test/0000.parquet")
  assert hub._split_glob("train_data", "o/n", by_folder, "train", False) == os.path.join(
      by_folder, "default", "train", "*.parquet")

  unnamed = str(tmp_path / "c")
  _touch(unnamed, "pairs.jsonl", "more/pairs2.jsonl")  # no split names: all of it is train
  assert hub._split_glob("train_data", "o/n", unnamed, "train", False) == os.path.join(
      unnamed, "**/*.jsonl")
  with pytest.raises(ValueError, match="no 'test' split"):
    hub._split_glob("eval_data", "o/n", unnamed, "test", False)


def test_flags_txt_writes_the_tokenizers_id():
  snap = "/c/hub/models--o--m/snapshots/abc/tokenizer.json"

  def values(*argv):
    fv = flags.FlagValues()
    flags.DEFINE_string("tokenizer", "jaxpref/data/tiny/tokenizer.model", "", flag_values=fv)
    flags.DEFINE_string("init_from", "", "", flag_values=fv)
    fv(["prog", *argv])
    return fv

  assert hub.tokenizer_flag(snap, values("--init_from=o/m")) == "o/m"  # the snapshot's own
  assert hub.tokenizer_flag(snap, values("--tokenizer=o/t@v1", "--init_from=x")) == "o/t@v1"
  assert hub.tokenizer_flag(snap, values(f"--tokenizer={snap}")) == snap  # a path given
  local = "jaxpref/data/tiny/tokenizer.model"
  assert hub.tokenizer_flag(local, values("--init_from=o/m")) == local


def test_origin_reads_the_id_and_commit_back():
  assert hub.origin("/c/hub/models--Qwen--Qwen2.5-0.5B/snapshots/abc123") == "Qwen/Qwen2.5-0.5B@abc123"
  assert hub.origin("/c/hub/datasets--o--n/snapshots/f00/data/train[-.]*.parquet") == (
      "dataset:o/n@f00")
  assert hub.origin("jaxpref/data/tiny/train.jsonl") is None
