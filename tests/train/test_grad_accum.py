"""Gradient accumulation: 4 micro-batches give the update and grad norm of one 4x batch."""

import os

import jax
import numpy as np
import optax
from flax import nnx

from jaxpref import data as data_lib
from jaxpref import losses, models
from jaxpref.data import make_tiny
from jaxpref.train import step
from jaxpref.train.reference import Reference
from jaxpref.train.roles import policy
from jaxpref.train.step import TrainState, micro_batches


def _setup(loss="dpo"):
  tok = data_lib.Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))
  records, _ = data_lib.read_pairs(os.path.join(make_tiny.OUT, "train.jsonl"))
  ds = data_lib.PairDataset(records[:64], tok, 32)
  graphdef, params = nnx.split(models.Decoder(models.get_config("tiny"), rngs=nnx.Rngs(0)))
  # Plain SGD: the update is -lr * gradient. (Adam's first step is lr * g / (|g| + eps),
  # which turns float32 summation-order noise in near-zero gradients into O(lr) changes.)
  opt = optax.sgd(0.5)
  batch = ds.batch(np.arange(32))
  # Unequal group weights: the micro-batches' shares of the total weight differ.
  batch = batch.__class__(**{**batch.__dict__,
                             "weight": np.linspace(0.2, 2.0, 32).astype(np.float32)})
  return graphdef, params, opt, batch, losses.bind(loss, {})


def _step(grad_accum, loss="dpo"):
  graphdef, params, opt, batch, loss_fn = _setup(loss)
  train_step, _ = step.make_steps(policy.forward(graphdef), loss_fn, opt, grad_accum=grad_accum)
  ref = Reference("model", jax.tree.map(lambda x: x.copy(), params))
  state = TrainState(step=np.int32(0), params=params, opt_state=opt.init(params))
  state, metrics = train_step(state, ref, batch)
  return jax.device_get(state.params), jax.device_get(metrics)


def test_micro_batches_are_strided_and_cover_the_batch():
  _, _, _, batch, _ = _setup()
  mbs = micro_batches(batch, 4)
  assert mbs.tokens.shape == (4, 8) + batch.tokens.shape[1:]
  np.testing.assert_array_equal(mbs.weight[1], batch.weight[1::4])


def test_four_micro_batches_equal_one_batch():
  # Tolerance: float32 sums in a different order.
  p1, m1 = _step(1)
  p4, m4 = _step(4)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["rewards/accuracy"], m1["rewards/accuracy"], atol=1e-6)
  for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
