"""The reward role's model and steps: the head reads each sequence's last real token, and
the batch sharded over 8 fake devices gives one device's numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loop_util import train_steps
from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.models.heads import RewardModel, last_token_index
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.train import loop
from jaxpref.train.config import DataConfig, RunConfig
from jaxpref.train.reference import Reference

TINY = make_tiny.OUT
MODEL = models.get_config("tiny")
STEPS = 3


def test_last_token_index():
  seg = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0]])
  np.testing.assert_array_equal(last_token_index(seg), [2, 4, 0, 2])


@pytest.mark.parametrize("out_dim", [1, 4])
def test_head_reads_the_last_real_token(out_dim):
  graphdef, params = nnx.split(RewardModel(MODEL, out_dim, rngs=nnx.Rngs(0)))
  model = jax.jit(lambda t, seg: nnx.merge(graphdef, params)(t, seg))
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 150, (3, 12)).astype(np.int32)
  seg = np.zeros((3, 12), np.int32)
  for i, n in enumerate((5, 9, 12)):
    seg[i, :n] = 1
  out = model(jnp.asarray(tokens), jnp.asarray(seg))
  assert out.shape == (3, out_dim)
  # Other padding tokens, and more padding, leave every reward unchanged.
  noisy = np.where(seg > 0, tokens, rng.integers(4, 150, tokens.shape)).astype(np.int32)
  np.testing.assert_allclose(model(jnp.asarray(noisy), jnp.asarray(seg)), out, atol=1e-5)
  wider = np.pad(tokens, ((0, 0), (0, 6))), np.pad(seg, ((0, 0), (0, 6)))
  np.testing.assert_allclose(model(*map(jnp.asarray, wider)), out, atol=1e-5)
  # A real token does change it (row 0's first real token after BOS).
  changed = tokens.copy()
  changed[0, 1] = 150 if tokens[0, 1] != 150 else 151
  assert not np.allclose(model(jnp.asarray(changed), jnp.asarray(seg))[0], out[0])


def test_mean_pool_reads_the_mean_real_state():
  model = RewardModel(MODEL, 4, pool="mean", rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda t, seg: nnx.merge(graphdef, params)(t, seg))
  rng = np.random.default_rng(1)
  tokens = rng.integers(4, 150, (3, 10)).astype(np.int32)
  seg = np.zeros((3, 10), np.int32)
  for i, n in enumerate((3, 7, 10)):
    seg[i, :n] = 1
  out = np.asarray(run(jnp.asarray(tokens), jnp.asarray(seg)), np.float64)
  # Float64 from the hidden states: the head on the plain mean of each row's real tokens.
  h = np.asarray(model.decoder.hidden(jnp.asarray(tokens), segment_ids=jnp.asarray(seg)),
                 np.float64)
  head = np.asarray(model.head[...], np.float64)
  want = np.stack([h[i, :n].mean(0) @ head for i, n in enumerate((3, 7, 10))])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # Padding never counts; a real token that is not the last one does.
  wider = np.pad(tokens, ((0, 0), (0, 5)), constant_values=7), np.pad(seg, ((0, 0), (0, 5)))
  np.testing.assert_allclose(run(*map(jnp.asarray, wider)), out, atol=1e-5)
  last = RewardModel(MODEL, 4, rngs=nnx.Rngs(0))
  assert not np.allclose(nnx.jit(lambda m, t, s: m(t, s))(last, tokens, seg), out, atol=1e-3)
  with pytest.raises(ValueError, match="--reward_pool must be one of last, mean"):
    RewardModel(MODEL, 1, pool="max", rngs=nnx.Rngs(0))


def config(workdir, mesh, loss="bt", reward_dim=1):
  return RunConfig(workdir=str(workdir), model=MODEL, steps=STEPS, mesh=mesh, progress=False,
                   plot=False, role="reward", reward_dim=reward_dim, loss=loss,
                   data=DataConfig(train_data=f"{TINY}/train.jsonl", eval_data="",
                                   tokenizer=f"{TINY}/tokenizer.model"))


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory):
  return loop.setup(config(tmp_path_factory.mktemp("setup"), "data:8")).train_ds


def run_steps(cfg, mesh, ds):
  """STEPS train steps through the loop's own placement and steps, then one eval step."""
  run = train_steps(cfg, mesh, ds, STEPS)
  assert run.ref == Reference("none")  # no reference model in the reward role
  metrics, _ = run.eval_step(run.state.params, run.ref, run.put(ds.batch(np.arange(64))))
  return run.losses, jax.device_get(metrics), jax.device_get(run.state.params)


@pytest.mark.slow
@pytest.mark.parametrize("loss,dim", [("bt", 1), ("gpm", 4)])
def test_eight_devices_match_one(train_ds, tmp_path, loss, dim):
  assert jax.device_count() == 8
  one = run_steps(config(tmp_path / "one", "data:1", loss, dim),
                  mesh_lib.make_mesh("data:1", jax.devices()[:1]), train_ds)
  eight = run_steps(config(tmp_path / "eight", "data:8", loss, dim),
                    mesh_lib.make_mesh("data:8"), train_ds)
  np.testing.assert_allclose(eight[0], one[0], atol=1e-6)
  assert one[0][-1] != one[0][0]  # it trained
  for key in one[1]:
    np.testing.assert_allclose(eight[1][key], one[1][key], atol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), eight[2], one[2])


def test_reward_role_rejects_policy_only_settings(tmp_path):
  import dataclasses
  cfg = config(tmp_path, "data:8")
  with pytest.raises(ValueError, match="--reference=precomputed"):
    loop.setup(dataclasses.replace(cfg, reference="precomputed"))
  with pytest.raises(ValueError, match="--reward_dim must be 1"):
    loop.setup(dataclasses.replace(cfg, reward_dim=3))
  with pytest.raises(ValueError, match="--reward_dim=2k"):
    loop.setup(dataclasses.replace(cfg, loss="gpm"))
  with pytest.raises(ValueError, match="--reward_dim=1"):
    loop.setup(dataclasses.replace(cfg, reward_dim=4))
  with pytest.raises(ValueError, match="--reward_pool=mean .* needs --role=reward"):
    loop.setup(dataclasses.replace(cfg, role="policy", loss="dpo", reward_pool="mean"))
  with pytest.raises(ValueError, match="--loss=bt is a reward-role loss, but --role=policy"):
    loop.setup(dataclasses.replace(cfg, role="policy"))


def test_init_from_puts_a_pretrained_decoder_under_a_fresh_head(tmp_path):
  import dataclasses
  from jaxpref.models import convert
  from jaxpref.train.roles import reward
  src = models.Decoder(MODEL, rngs=nnx.Rngs(7))
  convert.save_jaxpref(src, str(tmp_path / "pre"))
  cfg = dataclasses.replace(config(tmp_path / "run", "data:8"), init_from=str(tmp_path / "pre"),
                            model=convert.run_config(str(tmp_path / "pre"), {}))
  mesh = mesh_lib.make_mesh("data:8")
  _, params = reward.init_params(cfg, mesh)
  want = jax.tree.leaves(nnx.state(src, nnx.Param))
  got = jax.tree.leaves(params["decoder"])
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  _, fresh = reward.init_params(dataclasses.replace(cfg, init_from=""), mesh)
  np.testing.assert_array_equal(params["head"][...], fresh["head"][...])  # the head as drawn
  assert not np.array_equal(jax.tree.leaves(fresh["decoder"])[0], want[0])
