"""Every experiments/losses/NAME.flags trains: a few steps on one fixed batch of the tiny
data lower that loss, with finite values throughout (in-process, one tiny model)."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cli_util import ROOT
from jaxpref import data as data_lib
from jaxpref import flags as jflags
from jaxpref import losses, models
from jaxpref.models import token_mask
from jaxpref.train.config import OptimConfig
from jaxpref.train import step
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.reference import Reference
from jaxpref.train.roles import policy, reward
from jaxpref.train.step import TrainState

FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "experiments", "losses", "*.flags")))


def loss_from_flagfile(path):
  """(loss name, hyperparameters, data format) as the CLI would read them (later flags win)."""
  name, hps, fmt = None, {}, "pairs"
  for arg in jflags.expand_flagfiles([f"--flagfile={path}"]):
    key, _, value = arg.lstrip("-").partition("=")
    if key == "data_format":
      fmt = value
    elif key == "loss":
      name = value
    elif key.startswith("loss."):
      hps[key[5:]] = value
    elif key.startswith("noloss."):
      hps[key[7:]] = False
  defaults = losses.hparams(name)
  typed = {k: v if isinstance(v, bool) else (value_as(defaults[k], v)) for k, v in hps.items()}
  return name, typed, fmt


def reward_dim_of(path):
  """--reward_dim of a --role=reward flag file; None for the policy role."""
  args = dict(a.lstrip("-").partition("=")[::2] for a in jflags.expand_flagfiles([f"--flagfile={path}"]))
  return int(args.get("reward_dim", 1)) if args.get("role") == "reward" else None


def extra_batch(path, name):
  """16 groups of the flag file's own --train_data, for a loss that reads extra record
  fields (their tiny files, data/make_tiny_extra.py), with the group members it needs."""
  args = dict(a.lstrip("-").partition("=")[::2] for a in jflags.expand_flagfiles([f"--flagfile={path}"]))
  tok = data_lib.Tokenizer.load(os.path.join(ROOT, args["tokenizer"]))
  records, _ = data_lib.read_pairs(os.path.join(ROOT, args["train_data"]),
                                   require=losses.record_fields(name))
  return data_lib.PairDataset(records[:16], tok, 32, losses.member_fields(name)).batch(np.arange(16))


def value_as(default, text):
  if isinstance(default, bool):
    return True if text == "" else text.lower() == "true"
  return type(default)(text)


def test_every_loss_has_a_flagfile():
  """Offline losses: experiments/losses/NAME.flags; online ones: a flag file of
  experiments/online selects them (they train on rollouts, tests/train/test_online.py)."""
  names = {os.path.basename(f)[:-len(".flags")] for f in FLAGFILES}
  online = {n for n in losses.names() if losses.role(n) == "online"}
  assert names == set(losses.names()) - {"test_only_margin"} - online
  used = set()
  for path in glob.glob(os.path.join(ROOT, "experiments", "online", "*.flags")):
    used |= {a.split("=", 1)[1] for a in jflags.expand_flagfiles([f"--flagfile={path}"])
             if a.startswith("--loss=")}
  assert online <= used, online - used


@pytest.fixture(scope="module")
def fixed_batches():
  tiny = os.path.join(ROOT, "jaxpref", "data", "tiny")
  tok = data_lib.Tokenizer.load(os.path.join(tiny, "tokenizer.model"))
  records, _ = data_lib.read_pairs(os.path.join(tiny, "train.jsonl"))
  unpaired = data_lib.UnpairedDataset(data_lib.unpair(records[:8]), tok, 32)
  return {"pairs": data_lib.PairDataset(records[:16], tok, 32).batch(np.arange(16)),
          "pairs_as_unpaired": unpaired.batch(np.arange(16))}


def model_of(path, name, seed=0):
  """(graphdef, params) of the tiny model a flag file's loss trains: decoder + reward head
  for a --role=reward file, else the policy (with SparsePO's mask network when asked)."""
  if reward_dim_of(path):
    from jaxpref.models.heads import RewardModel
    args = dict(a.lstrip("-").partition("=")[::2] for a in jflags.expand_flagfiles([f"--flagfile={path}"]))
    head = dict(head=args.get("reward_head", "linear"), prototypes=int(args.get("pal_prototypes", 2)),
                users=int(args.get("pal_users", 1)))  # --reward_head=pal/attributes
    return nnx.split(RewardModel(models.get_config("tiny"), reward_dim_of(path),
                                 rngs=nnx.Rngs(seed), **head))
  decoder = models.Decoder(models.get_config("tiny"), rngs=nnx.Rngs(seed))
  return nnx.split(token_mask.attach(decoder, losses.needs_tokens(name)))


def batch_of(path, name, fmt, fixed_batches):
  return extra_batch(path, name) if losses.record_fields(name) else fixed_batches[fmt]


@pytest.mark.slow
@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_loss_flagfile_trains(path, fixed_batches):
  name, hps, fmt = loss_from_flagfile(path)
  assert hps.keys() == losses.hparams(name).keys()  # the file spells out every hyperparameter
  fixed_batch = batch_of(path, name, fmt, fixed_batches)
  optimizer = make_optimizer(OptimConfig(learning_rate=3e-3, warmup_steps=0), 10)
  graphdef, params = model_of(path, name)
  needs = losses.needs_tokens(name)
  if reward_dim_of(path):
    forward, ref = reward.forward(graphdef, needs), Reference("none")
  else:
    forward = policy.forward(graphdef, needs)
    ref = Reference("model", jax.tree.map(lambda x: x.copy(), params))
  train_step, _ = step.make_steps(forward, losses.bind(name, hps), optimizer)
  state = TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params))
  history = []
  for _ in range(10):
    state, metrics = train_step(state, ref, fixed_batch)
    history.append(float(metrics["loss"]))
  assert np.isfinite(history).all(), history
  assert history[-1] < history[0], history


@pytest.mark.slow
@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_loss_is_the_same_sharded_over_8_devices_and_under_vmap(path, fixed_batches):
  """Every loss, batch-coupled ones (KTO's reference point) included, on the Logps its real
  step computes for a tiny-data batch: split over 8 devices, and vmapped over a stack,
  it gives the value of the plain jitted loss."""
  name, hps, fmt = loss_from_flagfile(path)
  batch = batch_of(path, name, fmt, fixed_batches)
  needs = losses.needs_tokens(name)
  graphdef, params = model_of(path, name)
  ref = model_of(path, name, seed=1)[1]  # a reference unlike the policy: log-ratios != 0
  lp = jax.jit(lambda p, r, b: reward.model_logps(graphdef, p, b, needs) if reward_dim_of(path)
               else policy.step_logps(graphdef, p, r, b, needs))(params, ref, batch)
  fn = losses.bind(name, hps)
  plain = float(jax.jit(fn)(lp)[0])
  assert np.isfinite(plain)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(lp, NamedSharding(mesh, P("data")))
  np.testing.assert_allclose(float(jax.jit(fn)(sharded)[0]), plain, rtol=1e-5, atol=1e-6)
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), lp)
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(lambda l: fn(l)[0]))(stacked)), plain,
                             rtol=1e-5, atol=1e-6)
