"""Reward, attribute and PAL heads on the decoder's last real token.

`RewardModel` holds a `Decoder` and a linear head [D, E] on the final-norm hidden state of
each sequence's last non-padding token (the EOS that closes the response, when it fits).
The head kind (`--reward_head`) says what the E outputs mean:

* `linear`: E = 1 is a scalar reward model (Bradley-Terry), an even E = 2k a General
  Preference embedding model (GPM, docs/reward_models.md#gpm).
* `attributes`: E = A scores, one per attribute (multi-objective reward, `attribute_bt`).
* `pal`: E-dim item points f(y) of PAL-B's ideal-point model (docs/reward_models.md#pal). The head
  also holds K' prototype maps g_k(x) = p_k + W_k h_x, read from the hidden state h_x of
  the prompt's last token (causal: it sees the prompt only), and one row of mixture
  logits per user (`prototypes_of`, `mixture_of`); the `pal` loss mixes them.
* `gpm_gated`: E = 2k GPM embeddings, plus the prompt-gated eigenvalues of GPM's "MoE"
  variant (docs/reward_models.md#gpm): lambda(x) = k softmax(W_p h_x / sqrt(D)) [k], h_x the prompt's
  last-token state (`gate_of`), one non-negative weight per rotation block.

`--reward_pool=mean` makes the head read the mean of the hidden states over the sequence's
real tokens instead of the last one (Themis's "mean" readout, docs/reward_models.md#themis). A
from-scratch model's last-token state hardly depends on a short response, while the mean
carries every response token's own state: what lets the toy in
`experiments/repro/gpm_vs_bt` leave GPM's tie saddle.

The LM head, if the decoder has one, is unused except by losses that read per-token
log-probs (`themis`, through the reward role).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref.models.decoder import Decoder, ModelConfig

HEADS = ("linear", "attributes", "pal", "gpm_gated")
POOLS = ("last", "mean")


def last_token_index(segment_ids: jax.Array, tokens: jax.Array | None = None,
                     skip_id: int = -1) -> jax.Array:
  """int32[N]: position of each row's last real token (segment id > 0); 0 for an all-padding row.

  With `skip_id` >= 0, the last real token that is not `skip_id`: transformers'
  `*ForSequenceClassification` reads the rightmost token that is not `pad_token_id`, so when
  that id is the EOS closing every row it reads the token before it (`hf_reward.read_rule`).
  """
  t = segment_ids.shape[-1]
  real = segment_ids > 0
  if skip_id >= 0:
    if tokens is None:
      raise ValueError(f"the reward head skips token {skip_id} (pad_token_id = eos_token_id), "
                       "so it needs the tokens to find the position it reads")
    real = real & (tokens != skip_id)
  pos = jnp.where(real, jnp.arange(t, dtype=jnp.int32), -1)
  return jnp.maximum(pos.max(-1), 0)


def prompt_end_index(loss_mask: jax.Array) -> jax.Array:
  """int32[N]: position of each row's last prompt token (BOS for an empty prompt): the one
  before the first response token. A row without response tokens gives 0."""
  first = jnp.argmax(loss_mask > 0, axis=-1).astype(jnp.int32)
  return jnp.maximum(first - 1, 0)


def prompt_state(h: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """h_x [N, D]: the hidden state of each row's last prompt token (causal: it sees the
  prompt only), from h [N, T, D] and the rows' response mask [N, T]."""
  idx = prompt_end_index(loss_mask)
  return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]


def check_head(head: str, out_dim: int, prototypes: int = 1, users: int = 1) -> None:
  if head not in HEADS:
    raise ValueError(f"--reward_head must be one of {', '.join(HEADS)}, got {head!r}")
  if head == "linear" and (out_dim < 1 or (out_dim > 1 and out_dim % 2)):
    raise ValueError(f"--reward_dim must be 1 (a scalar reward) or even (2k, a preference "
                     f"embedding of k rotation blocks), got {out_dim}")
  if head == "gpm_gated" and (out_dim < 2 or out_dim % 2):
    raise ValueError(f"--reward_head=gpm_gated needs an even --reward_dim=2k >= 2 (k rotation "
                     f"blocks, one gated eigenvalue each), got {out_dim}")
  if out_dim < 1:
    raise ValueError(f"--reward_dim must be >= 1 (--reward_head={head}), got {out_dim}")
  if head == "pal" and (prototypes < 1 or users < 1):
    raise ValueError(f"--reward_head=pal needs --pal_prototypes >= 1 and --pal_users >= 1, got "
                     f"{prototypes} and {users}")


class RewardModel(nnx.Module):
  """tokens int32[N, T], segment_ids int32[N, T] -> float32[N, E].

  `skip_id` >= 0: the last-token readout passes over that token id (`last_token_index`),
  as transformers does when pad_token_id is the EOS."""

  def __init__(self, config: ModelConfig, out_dim: int = 1, *, rngs: nnx.Rngs,
               head: str = "linear", prototypes: int = 2, users: int = 1, pool: str = "last",
               skip_id: int = -1):
    check_head(head, out_dim, prototypes, users)
    if pool not in POOLS:
      raise ValueError(f"--reward_pool must be one of {', '.join(POOLS)}, got {pool!r}")
    self.kind, self.pool, self.skip_id = head, pool, int(skip_id)
    self.decoder = Decoder(config, rngs=rngs)
    d = config.d_model
    # Scaled by 1/sqrt(D): an initial reward of O(1) whatever the width.
    self.head = nnx.Param(jax.random.normal(rngs.params(), (d, out_dim), jnp.float32)
                          / jnp.sqrt(d))
    if head == "pal":
      self.proto_bias = nnx.Param(jax.random.normal(rngs.params(), (prototypes, out_dim)))
      self.proto_proj = nnx.Param(jax.random.normal(rngs.params(), (prototypes, d, out_dim))
                                  / jnp.sqrt(d))
      # N(0, 1) logits as in PAL-B: users start from different, non-uniform mixtures.
      self.user_logits = nnx.Param(jax.random.normal(rngs.params(), (users, prototypes)))
    if head == "gpm_gated":
      # GPM's prompt head: no bias, N(0, (1/(D+1))^2), so the gate starts near uniform (all
      # eigenvalues ~1: the plain model) and the prompt learns to move it.
      self.gate_proj = nnx.Param(jax.random.normal(rngs.params(), (d, out_dim // 2))
                                 / (d + 1))

  def read_out(self, h: jax.Array, segment_ids: jax.Array,
               tokens: jax.Array | None = None) -> jax.Array:
    """The head on each row's last real token, or on the mean over its real tokens (`pool`):
    h [N, T, D] -> [N, E]. `tokens` [N, T]: needed with `skip_id`."""
    if self.pool == "mean":
      real = (segment_ids > 0).astype(h.dtype)[..., None]
      pooled = jnp.sum(h * real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1.0)
    else:
      idx = last_token_index(segment_ids, tokens, self.skip_id)
      pooled = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
    return pooled @ self.head[...]

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    return self.read_out(self.decoder.hidden(tokens, segment_ids=segment_ids), segment_ids,
                         tokens)

  def prototypes_of(self, h: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """g_k(x) = p_k + W_k h_x, h_x the prompt's last-token state: h [N, T, D] -> [N, K', E]."""
    h_x = prompt_state(h, loss_mask)
    return self.proto_bias[...] + jnp.einsum("nd,kde->nke", h_x, self.proto_proj[...])

  def gate_of(self, h: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """lambda(x) = k softmax(W_p h_x / sqrt(D)): h [N, T, D] -> [N, k], >= 0, summing to k."""
    h_x = prompt_state(h, loss_mask)
    logits = h_x @ self.gate_proj[...] / jnp.sqrt(jnp.float32(h.shape[-1]))
    return logits.shape[-1] * jax.nn.softmax(logits, axis=-1)

  def mixture_of(self, user: jax.Array) -> jax.Array:
    """softmax(W_u): int32[N] -> [N, K']."""
    return jax.nn.softmax(self.user_logits[...][user], axis=-1)
