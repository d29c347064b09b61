"""The offline policy role: group batch -> Logps -> loss, as jitted train and eval steps.

The reference model shares the policy's graphdef and differs only in its (frozen) state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpref import ops
from jaxpref.data import eval_batches
from jaxpref.data.packing import PackedBatch
from jaxpref.data.shared_prompt import SharedPromptBatch
from jaxpref.models import lora, token_mask
from jaxpref.train.config import LogpsOptions
from jaxpref.types import GroupBatch, Logps


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32[]
  params: Any  # nnx.State of the policy
  opt_state: Any


def _packed_token_logps(model, batch: SharedPromptBatch | PackedBatch,
                        opts: LogpsOptions, prob_sq: bool = False):
  """float32[B, K, R] log-probs of each response's tokens, read from packed rows: one
  shared-prompt row per group, or a `PackedBatch` block's K rows per m groups (and, with
  `prob_sq`, the [B, K] sums of `vocab_log_prob_sq` over those tokens)."""
  p = batch.tokens.shape[0]
  flat = lambda x: x.reshape(-1, x.shape[-1])  # [P, K, L] blocks -> [P*K, L] rows
  h = model.hidden(flat(batch.tokens), segment_ids=flat(batch.segment_ids),
                   positions=flat(batch.positions),
                   shared_prompt=isinstance(batch, SharedPromptBatch))
  h = h.reshape(p, -1, h.shape[-1])  # [P, rows*L, D]: pred_index counts within a block
  rows = jnp.take_along_axis(h, batch.pred_index.reshape(p, -1, 1), axis=1)
  rows = rows.reshape(*batch.pred_index.shape, -1)
  w = model.lm_head_weight().astype(h.dtype)
  if opts.fused_lm_head:
    logp, _ = ops.fused_linear_logps(rows, w, batch.targets, batch.loss_mask,
                                     softcap=model.config.final_logit_softcap)
  else:
    logp, _ = ops.token_logps(model.logits(rows), batch.targets, batch.loss_mask, impl=opts.impl)
  logp = logp.reshape(-1, *logp.shape[-2:])  # a PackedBatch's [P, m, K, R] -> [P*m, K, R]
  if not prob_sq:
    return logp
  sq = vocab_log_prob_sq(rows.reshape(-1, rows.shape[-1]), model.lm_head_weight(),
                         model.config.final_logit_softcap).reshape(batch.loss_mask.shape)
  return logp, (sq * batch.loss_mask).sum(-1).reshape(logp.shape[:2])


def token_logps(graphdef: nnx.GraphDef, params: Any,
                batch: GroupBatch | SharedPromptBatch | PackedBatch,
                opts: LogpsOptions = LogpsOptions(), prob_sq: bool = False):
  """Masked per-token log-probs float32[B, K, T] of every group member's realised tokens
  ([B, K, R], response tokens only, for a `SharedPromptBatch` or `PackedBatch`)."""
  model = nnx.merge(graphdef, params)
  if isinstance(batch, (SharedPromptBatch, PackedBatch)):
    return _packed_token_logps(model, batch, opts, prob_sq)
  b, k, t = batch.tokens.shape
  tokens, mask, segment_ids = (x.reshape(b * k, t) for x in
                               (batch.tokens, batch.loss_mask, batch.segment_ids))
  h = model.hidden(tokens, segment_ids=segment_ids)
  logp = _head_logps(model, h, tokens, mask, opts).reshape(b, k, t)
  return (logp, _prob_sq(model, h, mask).reshape(b, k)) if prob_sq else logp


def _prob_sq(model, h: jax.Array, mask: jax.Array) -> jax.Array:
  """[N] masked sums of log sum_v pi(v|t)^2 over each row's tokens; position t-1 predicts
  token t, as for its log-prob."""
  d = h.shape[-1]
  sq = vocab_log_prob_sq(h[:, :-1].reshape(-1, d), model.lm_head_weight(),
                         model.config.final_logit_softcap).reshape(h.shape[0], -1)
  return (sq * mask[:, 1:]).sum(-1)


def _head_logps(model, h: jax.Array, tokens: jax.Array, mask: jax.Array,
                opts: LogpsOptions) -> jax.Array:
  """float32[N, T] masked log-probs of `tokens` from hidden states `h` [N, T, D]."""
  if opts.fused_lm_head:
    # Position t predicts token t+1, whose loss-mask entry decides whether it counts.
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    row_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    logp, _ = ops.fused_linear_logps(h, model.lm_head_weight().astype(h.dtype), targets,
                                     row_mask, softcap=model.config.final_logit_softcap)
    return jnp.pad(logp[:, :-1], ((0, 0), (1, 0)))
  return ops.next_token_logps(model.logits(h), tokens, mask, impl=opts.impl)


_NEG = -1e30  # finite: exp(_NEG - m) is 0 and its gradient too, where -inf would give NaN


def _kl_update(carry, a, b):
  """Online-softmax step over one vocabulary chunk of policy (a) and reference (b) logits:
  running max and sum of exp for both, and e = sum_v exp(b_v - m_b) (a_v - b_v)."""
  m_a, s_a, m_b, s_b, e = carry
  new_a = jnp.maximum(m_a, a.max(-1))
  new_b = jnp.maximum(m_b, b.max(-1))
  p_b = jnp.exp(b - new_b[:, None])
  scale_b = jnp.exp(m_b - new_b)
  return (new_a, s_a * jnp.exp(m_a - new_a) + jnp.exp(a - new_a[:, None]).sum(-1),
          new_b, s_b * scale_b + p_b.sum(-1), e * scale_b + (p_b * (a - b)).sum(-1))


def _chunk_logits(x, wt, start, width, softcap):
  y = jnp.dot(x, jax.lax.dynamic_slice_in_dim(wt, start, width, axis=1).astype(x.dtype),
              preferred_element_type=jnp.float32)
  return softcap * jnp.tanh(y / softcap) if softcap else y


def vocab_log_prob_sq(h: jax.Array, w: jax.Array, softcap: float = 0.0,
                      chunk: int = 4096) -> jax.Array:
  """log sum_v p(v)^2 per row of p = softmax(h @ w), float32[N], without gradient.

  WPO's weight alignment divides each token's probability by this expected probability
  of the policy's own sample. Streamed over vocabulary chunks with running (max, sum of
  e^(z-m), sum of e^(2(z-m))), so no [N, V] array exists: log s2 - 2 log s1.
  """
  h, w = jax.lax.stop_gradient((h, w))
  v = w.shape[1]
  chunk = min(chunk, v)
  n_full, tail = divmod(v, chunk)

  def update(carry, start, width):
    m, s1, s2 = carry
    z = _chunk_logits(h, w, start, width, softcap)
    new = jnp.maximum(m, z.max(-1))
    e, c = jnp.exp(z - new[:, None]), jnp.exp(m - new)
    return new, s1 * c + e.sum(-1), s2 * c * c + (e * e).sum(-1)

  n = h.shape[0]
  carry = (jnp.full((n,), _NEG), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
  carry, _ = jax.lax.scan(lambda c, start: (update(c, start, chunk), None), carry,
                          jnp.arange(n_full, dtype=jnp.int32) * chunk)
  if tail:
    carry = update(carry, n_full * chunk, tail)
  _, s1, s2 = carry
  return jnp.log(s2) - 2.0 * jnp.log(s1)


def vocab_kl(h: jax.Array, w: jax.Array, h_ref: jax.Array, w_ref: jax.Array,
             softcap: float = 0.0, chunk: int = 4096) -> jax.Array:
  """k = sum_v p_ref(v) (log p_pol(v) - log p_ref(v)) <= 0 per row, float32[N].

  h, h_ref [N, D] hidden states and w, w_ref [D, V] LM heads of policy and reference (the
  reference side should come stop-gradient). The vocabulary is walked in chunks with an
  online softmax, each chunk rematerialised in the backward, so no [N, V] array is held:
  k = E_ref[a - b] - LSE(a) + LSE(b) for logits a (policy) and b (reference).
  """
  v = w.shape[1]
  chunk = min(chunk, v)
  n_full, tail = divmod(v, chunk)

  def update(carry, start, width):
    return _kl_update(carry, _chunk_logits(h, w, start, width, softcap),
                      _chunk_logits(h_ref, w_ref, start, width, softcap))

  n = h.shape[0]
  zeros = jnp.zeros((n,), jnp.float32)
  carry = (jnp.full((n,), _NEG), zeros, jnp.full((n,), _NEG), zeros, zeros)
  body = jax.checkpoint(lambda c, start: (update(c, start, chunk), None))
  carry, _ = jax.lax.scan(body, carry, jnp.arange(n_full, dtype=jnp.int32) * chunk)
  if tail:
    carry = update(carry, n_full * chunk, tail)
  m_a, s_a, m_b, s_b, e = carry
  k = e / s_b - (m_a + jnp.log(s_a)) + (m_b + jnp.log(s_b))
  # Minus a KL, so <= 0; float32 round-off may leave +1e-7 where the models agree (where
  # the gradient is 0 anyway).
  return jnp.minimum(k, 0.0)


def token_level_logps(graphdef: nnx.GraphDef, params: Any, ref_params: Any, batch: GroupBatch,
                      needs: Any, opts: LogpsOptions = LogpsOptions()):
  """(policy_tok, ref_tok, extras) [B, K, T] for losses that ask for `Logps.kl_tok` or
  `token_mask` (`needs`, a losses.TokenNeeds): one forward pass of each model serves the
  log-probs, the full-vocabulary k_t and the reference's per-layer states.

  Token t's k_t and mask come from position t-1, the state that predicts token t, as its
  log-prob does; all are 0 off the loss mask.
  """
  if isinstance(batch, (SharedPromptBatch, PackedBatch)):
    raise ValueError("losses that read Logps.kl_tok or token_mask (sparse_po, mapo) are not "
                     "supported with --shared_prompt or --batching=pack; use --batching=pad or "
                     "buckets")
  model, ref = nnx.merge(graphdef, params), nnx.merge(graphdef, ref_params)
  b, k, t = batch.tokens.shape
  tokens, mask, segment_ids = (x.reshape(b * k, t) for x in
                               (batch.tokens, batch.loss_mask, batch.segment_ids))
  h = model.hidden(tokens, segment_ids=segment_ids)
  h_ref = ref.hidden(tokens, segment_ids=segment_ids, all_layers=bool(needs.token_mask))
  h_ref, states = (h_ref if needs.token_mask else (h_ref, None))
  h_ref, states = jax.lax.stop_gradient((h_ref, states))
  policy_tok = _head_logps(model, h, tokens, mask, opts).reshape(b, k, t)
  ref_tok = _head_logps(ref, h_ref, tokens, mask, opts).reshape(b, k, t)
  shift = lambda x: jnp.pad(x, ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2))  # t-1 -> t
  extras = {}
  if needs.vocab_kl:
    d = h.shape[-1]
    kl = vocab_kl(h[:, :-1].reshape(-1, d), model.lm_head_weight(),
                  h_ref[:, :-1].reshape(-1, d), jax.lax.stop_gradient(ref.lm_head_weight()),
                  model.config.final_logit_softcap)
    extras["kl_tok"] = (shift(kl.reshape(b * k, t - 1)) * mask).reshape(b, k, t)
  if needs.token_mask == "learned":
    net = getattr(model, token_mask.ATTR, None)
    if net is None:
      raise ValueError("this loss trains a token-mask network, but the policy has none: build "
                       "the policy with jaxpref.models.token_mask.attach(model, needs)")
    masks = net(states[:, :, :-1])  # [N, T-1, M]
  elif needs.token_mask == "activations":
    masks = jnp.moveaxis(states[:, :, :-1].mean(-1), 0, -1)  # [N, T-1, L] feature means
  if needs.token_mask:
    extras["token_mask"] = (shift(masks) * mask[..., None]).reshape(b, k, t, -1)
  if needs.prob_sq:
    extras["prob_sq"] = _prob_sq(model, h, mask).reshape(b, k)
  return policy_tok, ref_tok, extras


def group_logps(policy_tok: jax.Array, ref_tok: jax.Array | None, batch: GroupBatch,
                with_tokens: Any = False, kl_tok: jax.Array | None = None,
                token_mask: jax.Array | None = None, prob_sq: jax.Array | None = None) -> Logps:
  """`ref_tok` None: the reference's sequence log-probs come precomputed in the batch.

  `with_tokens` a losses.TokenNeeds: `kl_tok`, `token_mask` and `prob_sq` must be given when
  it asks for them (a missing one raises: zeros would train silently on a wrong loss;
  `probe_logps` is the one place stand-ins are wanted).
  """
  if isinstance(batch, PackedBatch):
    batch = batch.groups()
  extra = dict(policy_tok=policy_tok, ref_tok=ref_tok, mask=batch.loss_mask) if with_tokens else {}
  for name, value, wanted in (("kl_tok", kl_tok, getattr(with_tokens, "vocab_kl", False)),
                              ("prob_sq", prob_sq, getattr(with_tokens, "prob_sq", False)),
                              ("token_mask", token_mask, getattr(with_tokens, "token_mask", None))):
    if wanted and value is None:
      raise ValueError(f"the loss reads Logps.{name}, which was not computed")
    if wanted:
      extra[name] = value
  ref = batch.ref_logps if ref_tok is None else ref_tok.sum(-1)
  return Logps(policy=policy_tok.sum(-1), ref=ref, length=batch.loss_mask.sum(-1),
               valid=batch.valid, weight=batch.weight, scores=batch.scores, label=batch.label,
               label_smoothing=batch.label_smoothing, source_logps=batch.source_logps, **extra)


def probe_logps(batch: GroupBatch, with_tokens: Any = False) -> Logps:
  """Zeros of every shape `with_tokens` asks for (M = 2 learned masks, or 1 activation
  layer): for tracing a loss on the data's shapes (the loop's start-up probe), never for
  training."""
  zeros = np.zeros(batch.loss_mask.shape, np.float32)
  kind = getattr(with_tokens, "token_mask", None)
  return group_logps(
      zeros, zeros, batch, with_tokens,
      kl_tok=zeros if getattr(with_tokens, "vocab_kl", False) else None,
      prob_sq=np.zeros(zeros.shape[:2], np.float32) if getattr(with_tokens, "prob_sq", False) else None,
      token_mask=np.zeros((*zeros.shape, 2 if kind == "learned" else 1), np.float32) if kind else None)


def micro_batches(batch: GroupBatch, n: int) -> GroupBatch:
  """[B, ...] leaves -> [n, B/n, ...]; micro-batch j takes rows j, j+n, j+2n, ...

  Strided rather than contiguous so that each device's rows (the batch is sharded in
  contiguous blocks) stay on that device in every micro-batch.
  """
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def step_logps(graphdef: nnx.GraphDef, params: Any, ref_params: Any,
               batch: GroupBatch | SharedPromptBatch | PackedBatch, with_tokens: Any = False,
               opts: LogpsOptions = LogpsOptions()) -> Logps:
  """The `Logps` the train step hands its loss: policy and reference passes (none for the
  reference when the batch carries precomputed `ref_logps`), plus whatever `with_tokens`
  (a losses.TokenNeeds) asks for."""
  if getattr(with_tokens, "vocab_kl", False) or getattr(with_tokens, "token_mask", None):
    if batch.ref_logps is not None:
      raise ValueError("Logps.kl_tok and token_mask need the reference model: --reference=model")
    policy_tok, ref_tok, more = token_level_logps(graphdef, params, ref_params, batch,
                                                  with_tokens, opts)
    return group_logps(policy_tok, ref_tok, batch, with_tokens, **more)
  if batch.ref_logps is None:
    ref_tok = jax.lax.stop_gradient(token_logps(graphdef, ref_params, batch, opts))
  else:  # --reference=precomputed: no reference forward pass at all
    ref_tok = None
  if getattr(with_tokens, "prob_sq", False):  # WPO's alignment: one policy pass serves both
    policy_tok, prob_sq = token_logps(graphdef, params, batch, opts, prob_sq=True)
    return group_logps(policy_tok, ref_tok, batch, with_tokens, prob_sq=prob_sq)
  return group_logps(token_logps(graphdef, params, batch, opts), ref_tok, batch, with_tokens)


def make_steps(graphdef: nnx.GraphDef, loss_fn: Callable[[Logps], Any],
               optimizer: optax.GradientTransformation, with_tokens: bool = False,
               opts: LogpsOptions = LogpsOptions(), grad_accum: int = 1,
               lora_scale: float | None = None, grad_shardings: Any = None):
  """Returns jitted `train_step(state, ref_params, batch)` and `eval_step(params, ref_params, batch)`.

  `with_tokens` passes the per-token log-probs to the loss (`losses.needs_tokens(name)`);
  when that asks for `kl_tok` or `token_mask`, the step computes them (`token_level_logps`).
  `grad_accum` > 1 runs the batch as that many micro-batches in a `lax.scan`, each one's
  gradient and metrics weighted by its share of the batch's total group weight: for losses
  that are weighted means over groups (all but the batch-statistic ones, such as KTO's
  batch-level reference point) this is the gradient of the whole batch.
  `lora_scale` (alpha/r): the state's params are LoRA adapters and `ref_params` a
  `lora.Frozen`; the policy is the base with the adapters merged in, the only thing
  differentiated is the adapters.
  `grad_shardings` (the trainable params' shardings) pins the accumulated gradient to the
  params' layout: left to propagation, XLA may replicate the scan's carry, a full-size
  float32 copy of the model per device.
  """

  if lora_scale is not None and getattr(with_tokens, "token_mask", None) == "learned":
    raise ValueError("a loss with a learned token mask (sparse_po) is not supported with "
                     "--lora_rank: the mask network would sit frozen in the LoRA base")

  def loss_and_metrics(params, ref_params, batch):
    if lora_scale is not None:
      params, ref_params = (lora.merge(ref_params.base, params, lora_scale),
                            ref_params.reference)
    loss, metrics = loss_fn(step_logps(graphdef, params, ref_params, batch, with_tokens, opts))
    return loss, {"loss": loss, **metrics}

  grad_fn = jax.grad(loss_and_metrics, has_aux=True)

  def accumulated_grad(params, ref_params, batch):
    mbs = micro_batches(batch, grad_accum)
    total = jnp.sum(batch.weight)
    first = jax.tree.map(lambda x: x[0], mbs)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, ref_params, first))

    def pin(tree):
      if grad_shardings is None:
        return tree
      grads, metrics = tree
      return jax.lax.with_sharding_constraint(grads, grad_shardings), metrics

    def body(acc, mb):
      # Tied to the micro-batch, the weights are loop-variant to XLA, which otherwise
      # hoists their FSDP all-gathers (and bf16 casts) out of the loop and holds every
      # layer's gathered copy at once: at 8B on fsdp:8 that was +71 GiB per device.
      p, r, mb = jax.lax.optimization_barrier((params, ref_params, mb))
      out = grad_fn(p, r, mb)
      share = jnp.sum(mb.weight) / total
      return pin(jax.tree.map(lambda a, b: a + share * b, acc, out)), None

    return jax.lax.scan(body, pin(zeros), mbs)[0]

  def train_step(state: TrainState, ref_params, batch: GroupBatch):
    if grad_accum > 1:
      grads, metrics = accumulated_grad(state.params, ref_params, batch)
    else:
      grads, metrics = grad_fn(state.params, ref_params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(params, ref_params, batch: GroupBatch):
    _, metrics = loss_and_metrics(params, ref_params, batch)
    return metrics, jnp.sum(batch.weight)

  return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def precompute_reference(graphdef: nnx.GraphDef, ref_params: Any, ds, batch_size: int,
                         put: Callable, opts: LogpsOptions = LogpsOptions()) -> np.ndarray:
  """The reference's sequence log-probs of every group of `ds`, float32[N, K], in batches."""
  forward = jax.jit(lambda p, b: token_logps(graphdef, p, b, opts).sum(-1))
  out = np.zeros(ds.tokens.shape[:2], np.float32)
  for start, batch in zip(range(0, ds.n, batch_size), eval_batches(ds, batch_size)):
    n = min(batch_size, ds.n - start)
    out[start:start + n] = np.asarray(jax.device_get(forward(ref_params, put(batch))))[:n]
  return out
