"""A jitted, batched KV-cache sampler for the Decoder: greedy, temperature, top-k, top-p,
stop tokens and a new-token budget, each sequence finishing on its own.

One forward pass over the (right-padded, ragged) prompts fills the cache and gives each
row's first new token; a `lax.while_loop` then feeds one token per row through the cache
until every row has stopped or `max_new_tokens` are out. Under a training mesh the batch,
tokens and cache are split over the mesh's batch axes like a training batch. docs/sampling.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpref.models import kv_cache
from jaxpref.models.decoder import Decoder
from jaxpref.parallel.mesh import BATCH_AXES, batch_axis_size
from jaxpref.parallel.sharding import constrain_batch, in_mesh


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 is greedy (top_k and top_p then do nothing); top_k 0 and top_p 1 are
  off. A row stops after emitting any of `stop_tokens` (which is kept in its output)."""
  max_new_tokens: int = 128
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop_tokens: tuple = ()
  pad_id: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Output(NamedTuple):
  """tokens int32[B, P + N]: prompt then new tokens, pad_id after `lengths`; finished:
  the row ended on a stop token (False: it ran out of max_new_tokens); logits float32
  [B, N, V] of each step when asked for (rows' steps after they finished are junk)."""
  tokens: jax.Array
  lengths: jax.Array
  finished: jax.Array
  logits: Optional[jax.Array] = None


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """float32[B, V] scaled by 1/temperature, tokens outside top-k / the top-p nucleus at
  -inf (HF's order: temperature, then top-k, then top-p). The knobs are traced scalars, so
  one compiled sampler serves every setting."""
  z = logits / temperature
  desc = jnp.sort(z, axis=-1)[..., ::-1]
  k = jnp.clip(top_k, 1, z.shape[-1]) - 1
  kth = jnp.where(top_k > 0, jnp.take(desc, k, axis=-1)[..., None], -jnp.inf)
  z = jnp.where(z < kth, -jnp.inf, z)
  desc = jnp.where(desc < kth, -jnp.inf, desc)
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
  # The smallest prefix whose mass reaches top_p: a token is in while the mass before it
  # is short of top_p (so the most likely token always is).
  cut = jnp.min(jnp.where(before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
  return jnp.where((top_p < 1) & (z < cut), -jnp.inf, z)


def _pick(logits: jax.Array, knobs, key: jax.Array) -> jax.Array:
  temperature, top_k, top_p, vocab = knobs
  # Ids the tokenizer does not have (a model vocabulary padded past it) are never sampled.
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
  greedy = lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # The filter sorts the whole vocabulary of every row at every step (on CPU, 6x a greedy
  # decode step); without top-k or top-p it would only return logits / temperature.
  plain = lambda: jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
  filtered = lambda: jax.random.categorical(
      key, filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)
  sample = lambda: jax.lax.cond((top_k > 0) | (top_p < 1), filtered, plain)
  return jax.lax.cond(temperature == 0, greedy, sample)


def _sample(graphdef, state, prompt, prompt_lengths, rng, knobs, stops, mix=None, *, n: int,
            pad_id: int, return_logits: bool, copies: int = 1) -> Output:
  model = nnx.merge(graphdef, state)
  # A geometric mixture (Nash-MD): a second model with its own cache, fed the same tokens;
  # each step samples from (1 - beta) * logits + beta * its logits.
  models = (model,) if mix is None else (model, nnx.merge(graphdef, mix[0]))
  b, p = prompt.shape
  total = p + n
  cache = tuple(kv_cache.init(model.config, b, total) for _ in models)
  # Dynamic NTK RoPE's length per call, as transformers' generate has it: the longest prompt,
  # then one more each step, finished rows included (only dynamic RoPE reads it).
  longest = jnp.max(prompt_lengths)
  hidden, cache = zip(*[kv_cache.forward(m, c, prompt, prompt_lengths, longest)
                        for m, c in zip(models, cache)])
  last = tuple(jnp.take_along_axis(h, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
               for h in hidden)
  if copies > 1:  # each prompt's cache filled once, then copied for its `copies` samples
    rep = lambda x: constrain_batch(jnp.repeat(x, copies, axis=0))
    cache = jax.tree.map(rep, cache)
    prompt, prompt_lengths, last = rep(prompt), rep(prompt_lengths), jax.tree.map(rep, last)
    b *= copies
  slot = jnp.arange(total, dtype=jnp.int32)[None, :]
  tokens = jnp.pad(prompt, ((0, 0), (0, n)), constant_values=pad_id)
  tokens = jnp.where(slot < prompt_lengths[:, None], tokens, pad_id)

  def head(last):
    if mix is None:
      return model.logits(last[0])
    return (1 - mix[1]) * model.logits(last[0]) + mix[1] * models[1].logits(last[1])

  logits = head(last)
  record = (jnp.zeros((b, n, logits.shape[-1]), jnp.float32) if return_logits
            else jnp.zeros((b, 0, 0), jnp.float32))

  def emit(step, logits, tokens, lengths, finished, record):
    """Picks each live row's next token and appends it."""
    tok = _pick(logits, knobs, jax.random.fold_in(rng, step))
    live = ~finished
    tokens = jnp.where((slot == lengths[:, None]) & live[:, None], tok[:, None], tokens)
    finished = finished | (live & jnp.isin(tok, stops))
    if return_logits:
      record = record.at[:, step].set(logits)
    return tok, tokens, lengths + live, finished, record, live

  carry = emit(0, logits, tokens, prompt_lengths, jnp.zeros((b,), bool), record)

  def cond(c):
    step, (_, _, _, finished, _, _), _ = c
    return (step < n) & ~jnp.all(finished)

  def body(c):
    step, (tok, tokens, lengths, finished, record, live), cache = c
    # Only rows that appended a token feed it; the others' cache stays where it was.
    hidden, cache = zip(*[kv_cache.forward(m, c, tok[:, None], live.astype(jnp.int32),
                                           longest + step)
                          for m, c in zip(models, cache)])
    return step + 1, emit(step, head(tuple(h[:, 0] for h in hidden)), tokens, lengths,
                          finished, record), tuple(cache)

  _, (_, tokens, lengths, finished, record, _), _ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), carry, tuple(cache)))
  return Output(tokens, lengths, finished, record if return_logits else None)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, n: int, pad_id: int, return_logits: bool, mesh: Optional[Mesh],
              copies: int = 1):
  fn = functools.partial(_sample, graphdef, n=n, pad_id=pad_id, return_logits=return_logits,
                         copies=copies)
  return jax.jit(in_mesh(fn, mesh) if mesh is not None else fn)


def generate(model, prompt, prompt_lengths=None, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), pad_id: int = 0, rng=None,
             left_padded: bool = False, mesh: Optional[Mesh] = None,
             return_logits: bool = False, vocab_size: int = 0,
             num_samples: int = 1, mix=None) -> Output:
  """Samples up to `max_new_tokens` after each prompt.

  model: a Decoder, or (graphdef, params) as training holds them (sharded params stay
  where they are). prompt int32[B, P], right-padded (left-padded with left_padded=True);
  prompt_lengths int32[B] (default: all P). rng: a PRNG key, needed when temperature > 0.
  mesh: the training mesh; the batch is then split over its data/fsdp axes.
  vocab_size: only ids below it are sampled (the tokenizer's size, when the model's
  vocabulary is padded past it); 0 = every id.
  num_samples: samples per prompt; output row i * num_samples + j is prompt i's j-th. The
  prompts' cache is filled once and copied (under a mesh, when the prompts divide over
  its batch axes; else the prompts are repeated first, with the same result).
  mix: (ref, beta) samples from the geometric mixture pi^(1-beta) pi_ref^beta, i.e. from
  softmax((1 - beta) logits + beta logits_ref) at every step (Nash-MD; TRL's
  GeometricMixtureWrapper); ref is a Decoder or params of `model`'s graphdef, beta in
  [0, 1] (traced: one program serves every beta). return_logits then records the mixture.
  """
  sp = SamplingParams(max_new_tokens, float(temperature), int(top_k), float(top_p),
                      tuple(int(t) for t in stop_tokens), int(pad_id))
  graphdef, state = nnx.split(model) if isinstance(model, Decoder) else model
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"prompt must be an integer array [batch, length], got {prompt.dtype}"
                     f"{list(prompt.shape)}")
  b, p = prompt.shape
  lengths = np.full((b,), p) if prompt_lengths is None else np.asarray(prompt_lengths)
  if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > p:
    raise ValueError(f"prompt_lengths must be [{b}] values in 1..{p} (every prompt needs a "
                     f"token), got {lengths.tolist()}")
  if left_padded:  # rotate each row so its prompt starts at slot 0
    prompt = np.stack([np.roll(row, n - p) for row, n in zip(prompt, lengths)])
  if sp.temperature > 0 and rng is None:
    raise ValueError("temperature > 0 samples: pass rng (a jax.random key)")
  rng = jax.random.key(0) if rng is None else rng
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  copies = num_samples
  if mesh is not None and b % batch_axis_size(mesh):
    prompt, lengths, b, copies = (np.repeat(prompt, copies, axis=0),
                                  np.repeat(lengths, copies), b * copies, 1)
  prompt, lengths = jnp.asarray(prompt, jnp.int32), jnp.asarray(lengths, jnp.int32)
  if mesh is not None:
    if b % batch_axis_size(mesh):
      raise ValueError(f"batch {b} is not divisible by the mesh's batch axes "
                       f"({batch_axis_size(mesh)} = data x fsdp)")
    prompt, lengths = jax.device_put((prompt, lengths), NamedSharding(mesh, P(BATCH_AXES)))
  knobs = (jnp.float32(sp.temperature), jnp.int32(sp.top_k), jnp.float32(sp.top_p),
           jnp.int32(vocab_size if vocab_size > 0 else np.iinfo(np.int32).max))
  stops = jnp.asarray(sp.stop_tokens or (-1,), jnp.int32)
  fn = _compiled(graphdef, sp.max_new_tokens, sp.pad_id, return_logits, mesh, copies)
  if mix is None:
    return fn(state, prompt, lengths, rng, knobs, stops)
  ref, beta = mix
  if not 0.0 <= float(beta) <= 1.0:
    raise ValueError(f"mix: beta must be in [0, 1], got {beta}")
  ref = nnx.split(ref)[1] if isinstance(ref, Decoder) else ref
  return fn(state, prompt, lengths, rng, knobs, stops, (ref, jnp.float32(beta)))
