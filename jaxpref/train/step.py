"""The one step builder: every role's jitted train and eval steps.

A role supplies `forward(params, ref, batch)`, the pytree its loss reads (a `Logps` for the
policy roles, `RewardOutputs` for the reward model); this file turns it and a loss into
`train_step(state, ref, batch) -> (state, metrics)` and `eval_step(params, ref, batch) ->
(metrics, weight)`, with gradient accumulation, the optimizer update and its metrics. `ref`
is whatever the role holds fixed beside the trained params (a `reference.Reference`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxpref.types import GroupBatch

Forward = Callable[[Any, Any, Any], Any]  # (params, ref, batch) -> what the loss reads
# The train step's per-step flag: 0 when the update was applied, else a bit per culprit
# (1: the loss, 2: the gradient norm), the update having been dropped.
NONFINITE = "guard/nonfinite"


def nonfinite(metrics: dict) -> jax.Array:
  """float32[] bits: 1 if the loss is not finite, 2 if the gradient norm is not."""
  loss_bad = ~jnp.isfinite(metrics["loss"])
  grad_bad = ~jnp.isfinite(metrics["grad_norm"])
  return loss_bad.astype(jnp.float32) + 2.0 * grad_bad.astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32[]
  params: Any  # nnx.State of the trained model (or its LoRA adapters)
  opt_state: Any


def micro_batches(batch: GroupBatch, n: int) -> GroupBatch:
  """[B, ...] leaves -> [n, B/n, ...]; micro-batch j takes rows j, j+n, j+2n, ...

  Strided rather than contiguous so that each device's rows (the batch is sharded in
  contiguous blocks) stay on that device in every micro-batch.
  """
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_steps(forward: Forward, loss_fn: Callable[[Any], Any],
               optimizer: optax.GradientTransformation, grad_accum: int = 1,
               grad_shardings: Any = None):
  """Jitted `train_step(state, ref, batch)` (donating `state`) and `eval_step(params, ref,
  batch)`.

  `grad_accum` > 1 runs the batch as that many micro-batches in a `lax.scan`, each one's
  gradient and metrics weighted by its share of the batch's total group weight: for losses
  that are weighted means over groups (all but the batch-statistic ones, such as KTO's
  batch-level reference point) this is the gradient of the whole batch.
  `grad_shardings` (the trainable params' shardings) pins the accumulated gradient to the
  params' layout: left to propagation, XLA may replicate the scan's carry, a full-size
  float32 copy of the model per device.
  """

  def loss_and_metrics(params, ref, batch):
    loss, metrics = loss_fn(forward(params, ref, batch))
    return loss, {"loss": loss, **metrics}

  grad_fn = jax.grad(loss_and_metrics, has_aux=True)

  def pin(tree):
    if grad_shardings is None:
      return tree
    grads, metrics = tree
    return jax.lax.with_sharding_constraint(grads, grad_shardings), metrics

  def accumulated_grad(params, ref, batch):
    mbs = micro_batches(batch, grad_accum)
    total = jnp.sum(batch.weight)
    first = jax.tree.map(lambda x: x[0], mbs)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, ref, first))

    def body(acc, mb):
      # Tied to the micro-batch, the weights are loop-variant to XLA, which otherwise
      # hoists their FSDP all-gathers (and bf16 casts) out of the loop and holds every
      # layer's gathered copy at once: at 8B on fsdp:8 that was +71 GiB per device.
      p, r, mb = jax.lax.optimization_barrier((params, ref, mb))
      out = grad_fn(p, r, mb)
      share = jnp.sum(mb.weight) / total
      return pin(jax.tree.map(lambda a, b: a + share * b, acc, out)), None

    return jax.lax.scan(body, pin(zeros), mbs)[0]

  def train_step(state: TrainState, ref, batch: GroupBatch):
    if grad_accum > 1:
      grads, metrics = accumulated_grad(state.params, ref, batch)
    else:
      grads, metrics = grad_fn(state.params, ref, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    # A non-finite loss or gradient never reaches the parameters: the update is dropped on
    # device (no host sync) and flagged, so no checkpoint ever holds a NaN; the loop stops
    # (or, with --nonfinite=skip, counts) on the flag.
    bad = nonfinite(metrics)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(bad > 0, b, a), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    metrics[NONFINITE] = bad
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(params, ref, batch: GroupBatch):
    _, metrics = loss_and_metrics(params, ref, batch)
    return metrics, jnp.sum(batch.weight)

  return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)
