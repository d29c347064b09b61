"""--online.prompt_buckets and --online.eval_samples (jaxpref/train/online.py): prompts
padded to a bucket share one compiled sampler and sample what they sample unpadded; held-out
evaluation draws eval_samples responses per prompt at eval_temperature."""

import os
import types

import jax
import pytest
import numpy as np
from flax import nnx

from cli_util import ROOT
from jaxpref import models
from jaxpref.data import Tokenizer, make_tiny, prompts
from jaxpref.models import sampler
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.train import online
from jaxpref.train.config import DataConfig, OnlineConfig, RunConfig
from jaxpref.train.setup import setup

TINY = make_tiny.OUT
# reward = K + (distinct responses in the group) / 10: the group size and the spread of
# the eval samples, read back from the eval row's mean reward.
GROUP = os.path.join(ROOT, "tests", "rewards", "group_rewards.py") + ":size_and_distinct"


def _config(workdir, **online_kw):
  o = {"num_generations": 2, "max_new_tokens": 6, "reward_fn": GROUP, **online_kw}
  return RunConfig(workdir=str(workdir), model=models.get_config("tiny"), role="online",
                   loss="grpo", steps=1, progress=False, plot=False, online=OnlineConfig(**o),
                   data=DataConfig(train_data=f"{TINY}/prompts_train.jsonl",
                                   eval_data=f"{TINY}/prompts_eval.jsonl", batch_size=8,
                                   eval_batch_size=8, tokenizer=f"{TINY}/tokenizer.model"))


def test_prompt_buckets_share_one_sampler_and_do_not_change_samples(tmp_path):
  tok = Tokenizer.load(f"{TINY}/tokenizer.model")
  ds = prompts.load(f"{TINY}/prompts_train.jsonl", tok)
  order = np.argsort([len(ids) for ids in ds.ids], kind="stable")
  short, long = order[:8], order[-8:]  # longest prompt 7 and 14 tokens
  assert max(len(ds.ids[i]) for i in short) < max(len(ds.ids[i]) for i in long) <= 16
  graphdef, params = nnx.split(models.Decoder(models.get_config("tiny"), rngs=nnx.Rngs(0)))
  mesh = mesh_lib.make_mesh("data:1", jax.devices()[:1])
  rng = jax.random.key(0)

  def run(buckets, n):  # a max_new_tokens of the test's own: a sampler no other test built
    cfg = _config(tmp_path, prompt_buckets=buckets, max_new_tokens=n)
    r = online.Rollouts(cfg, types.SimpleNamespace(tokenizer=tok), graphdef, mesh)
    outs = [r.sample(params, ds, idx, 2, 0.0, rng) for idx in (short, long)]
    jitted = sampler._compiled(graphdef, n, tok.pad_id, False, mesh, 2)
    return outs, jitted._cache_size()

  bucketed, programs = run("16,64", 3)
  assert [o[0].shape[1] for o in bucketed] == [16 + 3, 16 + 3] and programs == 1
  # No bucket holds them: each batch pads to its longest prompt, one program per length.
  own, programs = run("4", 4)
  assert [o[0].shape[1] for o in own] == [7 + 4, 14 + 4] and programs == 2
  for (tb, sb, eb, _), (to, so, eo, _) in zip(bucketed, own):  # greedy: the same responses
    for i in range(len(tb)):
      n = min(eb[i] - sb[i], 3)
      np.testing.assert_array_equal(tb[i, sb[i]:sb[i] + n], to[i, so[i]:so[i] + n])


def test_eval_samples_sets_the_held_out_group_size(tmp_path):
  cfg = _config(tmp_path, eval_samples=3, eval_temperature=1.0, max_new_tokens=4)
  row, = online.program(setup(cfg)).evaluate()
  # 3 samples a prompt (not num_generations=2), all distinct: sampled at temperature 1,
  # not greedily (3.1)
  assert row["reward/mean"] == pytest.approx(3.3)
