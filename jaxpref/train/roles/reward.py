"""The reward-model role: group batch -> a reward (or preference embedding) per response ->
`RewardOutputs` -> loss. There is no reference model (`Reference("none")`).

A scalar head (`--reward_dim=1`) fills `RewardOutputs.reward`; a preference-embedding head
(`--reward_dim=2k`) or an attribute head (`--reward_head=attributes`) fills `embed`; a PAL
head (`--reward_head=pal`) fills `embed` with item points and `prototypes`/`mixture` with
the prompt's prototypes and the record's user's mixture weights; a gated GPM head
(`--reward_head=gpm_gated`) fills `embed` and `gate` with the prompt's eigenvalues
lambda(x) [B, k]. A loss that reads per-token log-probs (`themis`) gets the decoder's LM
log-probs of every response in `policy_tok`/`mask` from the same forward pass.
`--init_from` puts a pretrained decoder under a freshly drawn head.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref import ops
from jaxpref.data.tokenizer import Tokenizer
from jaxpref.models import hf_reward
from jaxpref.models.heads import RewardModel, check_head
from jaxpref.parallel import sharding
from jaxpref.train.progress import say
from jaxpref.train.reference import Reference
from jaxpref.train.roles.policy import new_state
from jaxpref.types import GroupBatch, RewardOutputs


def check(cfg, *datasets) -> None:
  """Start-up checks of the reward role's flags, and of its `datasets` (`PairDataset`s,
  None skipped) against its head."""
  note = read_rule(cfg)[2]
  if note:
    say(note)
  check_head(cfg.reward_head, cfg.reward_dim, cfg.pal_prototypes, cfg.pal_users)
  clashes = [f for f, on in (("--reference=" + cfg.reference, cfg.reference != "model"),
                             ("--ref_sync_every", cfg.ref_sync_every > 0),
                             ("--reference_cache", bool(cfg.reference_cache)),
                             ("--lora_rank", getattr(cfg, "lora", None) is not None),
                             ("--shared_prompt", cfg.data.shared_prompt)) if on]
  if clashes:
    raise ValueError(f"--role=reward does not support {', '.join(clashes)}: it has no "
                     "reference model, and LoRA and shared-prompt rows are built for the "
                     "policy role")
  for ds in filter(lambda d: d is not None, datasets):
    user, prefs = getattr(ds, "user", None), getattr(ds, "attribute_prefs", None)
    if cfg.reward_head == "pal" and user is None and cfg.pal_users > 1:
      raise ValueError(f"--pal_users={cfg.pal_users}, but the records have no 'user' field "
                       "(without it every record is user 0: pass --pal_users=1)")
    if cfg.reward_head == "pal" and user is not None and user.max() >= cfg.pal_users:
      raise ValueError(f"a record has field 'user' = {int(user.max())}, but --pal_users="
                       f"{cfg.pal_users} (ids must be 0 .. {cfg.pal_users - 1})")
    if cfg.reward_head == "attributes" and prefs is not None and prefs.shape[1] != cfg.reward_dim:
      raise ValueError(f"the records' field 'attribute_prefs' has {prefs.shape[1]} entries, "
                       f"but --reward_dim={cfg.reward_dim} attribute scores")
  if cfg.reward_head == "gpm_gated" and cfg.loss != "gpm":
    raise ValueError(f"--reward_head=gpm_gated gates GPM's eigenvalues, which only --loss=gpm "
                     f"reads; got --loss={cfg.loss} (use --reward_head=linear)")


def read_rule(cfg) -> tuple:
  """(pad id, skip id, start-up note): the token the head reads, as transformers'
  *ForSequenceClassification reads it (the one before the closing EOS when pad = EOS)."""
  return hf_reward.read_rule(cfg.init_from, Tokenizer.load(cfg.data.tokenizer))


def make_model(cfg) -> RewardModel:
  """The reward model of a `RunConfig` (decoder of `cfg.model`, head of `cfg.reward_dim`)."""
  return RewardModel(cfg.model, cfg.reward_dim, head=cfg.reward_head,
                     prototypes=cfg.pal_prototypes, users=cfg.pal_users,
                     pool=getattr(cfg, "reward_pool", "last"), rngs=nnx.Rngs(cfg.seed),
                     skip_id=read_rule(cfg)[1])


def init_params(cfg, mesh):
  """(graphdef, params) of the reward model, in their shardings; with `--init_from` the
  decoder is the pretrained one (its LM head unused) and only the reward head is drawn."""
  graphdef, params = sharding.init_params(lambda: make_model(cfg), mesh)
  if cfg.init_from:  # a sequence-classification folder brings its head too (hf_reward.py)
    params = hf_reward.init_from(cfg, params)
  return graphdef, params


def score(graphdef: nnx.GraphDef, params: Any, batch: GroupBatch) -> jax.Array:
  """float32[B, K, E]: a linear head's output (a reward or GPM embedding) for every group
  member, as `jaxpref-eval` and the strength tools read it."""
  model = nnx.merge(graphdef, params)
  if model.kind != "linear":
    raise ValueError(f"this reads a reward or GPM embedding per response, but the model has "
                     f"--reward_head={model.kind} (its outputs are not one; use model_logps "
                     "and the loss's own scorer)")
  b, k, t = batch.tokens.shape
  out = model(batch.tokens.reshape(b * k, t), batch.segment_ids.reshape(b * k, t))
  return out.reshape(b, k, -1)


def reward_logps(out: jax.Array, batch: GroupBatch, head: str = "linear",
                 pal: tuple | None = None, tokens: jax.Array | None = None,
                 gate: jax.Array | None = None) -> RewardOutputs:
  """The head's output [B, K, E] as `RewardOutputs` (a linear head with E = 1: rewards in
  `reward`; else `embed`); `pal` = (prototypes [B, K', E], mixture [B, K']); `tokens`:
  per-token LM log-probs [B, K, T] for `policy_tok`; `gate`: GPM eigenvalues [B, k]."""
  scalar = head == "linear" and out.shape[-1] == 1
  zeros = jnp.zeros(out.shape[:2], jnp.float32)
  extra = {} if tokens is None else dict(policy_tok=tokens, mask=batch.loss_mask)
  return RewardOutputs(
      reward=out[..., 0] if scalar else zeros, length=batch.loss_mask.sum(-1),
      valid=batch.valid, weight=batch.weight, scores=batch.scores, label=batch.label,
      label_smoothing=batch.label_smoothing, embed=None if scalar else out, user=batch.user,
      attribute_prefs=batch.attribute_prefs, prototypes=None if pal is None else pal[0],
      mixture=None if pal is None else pal[1], gate=gate, **extra)


def model_logps(graphdef: nnx.GraphDef, params: Any, batch: GroupBatch,
                with_tokens: bool = False) -> RewardOutputs:
  """One forward pass of every group member -> the outputs of the model's head kind."""
  model = nnx.merge(graphdef, params)
  b, k, t = batch.tokens.shape
  flat = lambda x: x.reshape(b * k, *x.shape[2:])
  tokens, seg, mask = flat(batch.tokens), flat(batch.segment_ids), flat(batch.loss_mask)
  h = model.decoder.hidden(tokens, segment_ids=seg)
  out = model.read_out(h, seg, tokens).reshape(b, k, -1)
  pal, gate = None, None
  # Every member of a group shares the prompt: what the prompt gives comes from member 0's row.
  h0, mask0 = h.reshape(b, k, t, -1)[:, 0], batch.loss_mask[:, 0]
  if model.kind == "pal":
    user = jnp.zeros(b, jnp.int32) if batch.user is None else batch.user
    pal = (model.prototypes_of(h0, mask0), model.mixture_of(user))
  if model.kind == "gpm_gated":
    gate = model.gate_of(h0, mask0)
  tok = None
  if with_tokens:
    tok = ops.next_token_logps(model.decoder.logits(h), tokens, mask).reshape(b, k, t)
  return reward_logps(out, batch, model.kind, pal, tok, gate)


def probe_logps(batch: GroupBatch, cfg) -> RewardOutputs:
  """The Logps the steps will produce for `cfg`, in shapes only, for tracing the loss at
  start-up (`cfg` may also be a bare --reward_dim, for a linear head)."""
  if isinstance(cfg, int):
    b, k = batch.tokens.shape[:2]
    return reward_logps(np.zeros((b, k, cfg), np.float32), batch)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: make_model(cfg)))
  return jax.eval_shape(lambda p: model_logps(graphdef, p, batch, cfg.loss_spec.needs), params)


def forward(graphdef: nnx.GraphDef, needs: Any = False):
  """The role's `forward(params, ref, batch) -> RewardOutputs` (`ref` unused); `needs`: the
  loss reads per-token LM log-probs."""
  return lambda params, ref, batch: model_logps(graphdef, params, batch, needs)


def init(cfg, mesh, optimizer):
  """(graphdef, TrainState, Reference("none")): a decoder with a reward head."""
  graphdef, params = init_params(cfg, mesh)
  return graphdef, new_state(params, optimizer, mesh), Reference("none")


def probe(batch: GroupBatch, cfg) -> RewardOutputs:
  return probe_logps(batch, cfg)
