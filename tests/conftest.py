"""Shared test setup: 8 fake CPU devices for the mesh tests, a persistent XLA compilation
cache (the tiny model's steps compile once per suite, not once per file), the helpers'
folder on the path, and fixtures every layer's tests use."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests live in folders that mirror the package's layers; their shared helpers
# (cli_util, loss_refs, ...) stay in tests/.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Mesh tests use fake CPU devices; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Inherited by the CLI subprocesses the tests start, so they share the cache too.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

from gcs_util import _emulator, gcs  # noqa: E402,F401 (the gs:// tests' GCS emulator)


@pytest.fixture
def registry():
  """The loss registry, restored after the test: register test-only losses freely."""
  from jaxpref.losses import registry as reg
  saved = {name: dict(getattr(reg, name)) for name in ("_LOSSES", "_NEEDS", "_ROLES", "_RANGES")}
  yield reg
  for name, value in saved.items():
    table = getattr(reg, name)
    table.clear()
    table.update(value)


@pytest.fixture
def tiny_config(tmp_path):
  """A `RunConfig(workdir=..., **overrides)` builder for the tiny model on the shipped data:
  short runs without progress bars or plots."""
  from jaxpref import models
  from jaxpref.data import make_tiny
  from jaxpref.train.config import DataConfig, RunConfig

  def make(workdir=None, data=None, **kw):
    tiny = make_tiny.OUT
    d = dict(train_data=f"{tiny}/train.jsonl", eval_data=f"{tiny}/eval.jsonl",
             tokenizer=f"{tiny}/tokenizer.model")
    d.update(data or {})
    base = dict(model=models.get_config("tiny"), steps=4, log_every=1, eval_every=4,
                checkpoint_every=4, progress=False, plot=False)
    base.update(kw)
    return RunConfig(workdir=str(workdir or tmp_path), data=DataConfig(**d), **base)

  return make


# The longest tests (CI's --durations), longest first. Started first, they overlap the
# many short ones on the other worker instead of running alone at the end of a tier.
HEAVY_FIRST = (
    "tests/train/test_online_toy.py",
    "tests/eval/test_label_noise_repro.py",
    "tests/eval/test_pal_repro.py",
    "tests/eval/test_reward_repro.py",
    "tests/parallel/test_multihost.py",
    "tests/eval/test_ensemble_vmap.py",
    "tests/test_examples.py",
    "tests/train/test_online.py",
    "tests/train/test_online_refine.py",
    "tests/train/test_gcs_run.py",
    "tests/test_sweep.py",
    "tests/train/test_faults_loop.py",
    "tests/train/test_online_egpo.py",
    "tests/parallel/test_sharding.py",
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {path: i for i, path in enumerate(HEAVY_FIRST)}
  order = {id(item): n for n, item in enumerate(items)}
  items.sort(key=lambda item: (rank.get(item.nodeid.split("::")[0], len(rank)),
                               order[id(item)]))
