"""A run's start: tokenizer, data, mesh and batches read and checked before the first
compile. Bad input raises a ValueError that names the flag, file, line or field (the CLI
prints it without a traceback)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxpref import data as data_lib, paths
from jaxpref.data import batching, chat, chat_template, curriculum, grain_source, hub, prompts
from jaxpref.data.shared_prompt import SharedPromptView
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.models import hf_export
from jaxpref.train import roles, rounds as rounds_lib
from jaxpref.train.config import DATA_FORMATS, RunConfig
from jaxpref.train.progress import say


def _read(cfg: RunConfig, path: str, tok, keep: str = ""):
  if grain_source.is_prepared(path):  # a `jaxpref-data prepare` folder: read with grain
    return grain_source.load(cfg, path)
  fmt = cfg.data.format
  opts = dict(skip_invalid=cfg.data.skip_invalid, fields=cfg.data.fields, keep=keep)
  tr = data_lib.Truncation.of(cfg.data)  # --truncation, --max_prompt_len
  if fmt == "pairs":  # a loss may need extra record fields and group members (K = 3)
    spec = cfg.loss_spec
    records, report = data_lib.read_pairs(path, **opts, require=spec.record_fields)
    return (data_lib.PairDataset(records, tok, cfg.data.max_len, spec.member_fields,
                                 truncation=tr), report, "")
  if fmt == "unpaired":
    records, report = data_lib.read_unpaired(path, **opts)
  elif fmt == "pairs_as_unpaired":
    pairs, report = data_lib.read_pairs(path, **opts)
    records = data_lib.unpair(pairs)
  elif fmt == "ranked":
    records, report = data_lib.read_ranked(path, **opts)
    ds = data_lib.RankedDataset(records, tok, cfg.data.max_len, cfg.data.group_size,
                                truncation=tr)
    return ds, report, (f"; groups of {cfg.data.group_size}, {ds.n_dropped_responses} responses "
                        "beyond --group_size dropped")
  elif fmt.startswith("ratings_"):
    ranked, report = data_lib.read_ranked(path, **opts)
    pairs, ties = data_lib.pairs_from_ratings(ranked, fmt[len("ratings_"):])
    if not pairs:
      raise data_lib.DataError(f"{path}: no pairs with distinct scores ({ties} tied pairs skipped)")
    return (data_lib.PairDataset(pairs, tok, cfg.data.max_len, truncation=tr), report,
            f"; {len(pairs)} pairs ({fmt[len('ratings_'):]}), {ties} tied pairs skipped")
  else:
    raise ValueError(f"--data_format={fmt!r} is not one of {', '.join(DATA_FORMATS)}")
  ds = data_lib.UnpairedDataset(records, tok, cfg.data.max_len, truncation=tr)
  return ds, report, f"; {ds.n_desirable} desirable, {ds.n - ds.n_desirable} undesirable"


def load_data(cfg: RunConfig, tok):
  """Reads, validates and tokenizes the train (and eval) files, reporting what was skipped."""
  out = []
  for split, path in (("train", cfg.data.train_data), ("eval", cfg.data.eval_data)):
    if not path:
      out.append(None)
      continue
    if cfg.role == "online":  # rollouts need only the prompts, of any prompt-bearing file
      ds = prompts.load(path, tok, cfg.data.max_len - 1, cfg.data.fields, cfg.data.skip_invalid,
                        negatives=split == "train" and cfg.online.pairs == "drift",
                        answers=split == "train" and "chosen" in cfg.loss_spec.member_fields)
      say(f"{split} prompts: {ds.summary()} (--max_len={cfg.data.max_len} tokens with BOS)")
      out.append(ds)
      continue
    ds, report, extra = _read(cfg, path, tok, curriculum.record_field(cfg.data.curriculum)
                              if split == "train" else "")
    say(f"{split} data: {report.summary()}{extra}; {ds.n_truncated} of {ds.n} groups truncated "
         f"to --max_len={cfg.data.max_len}{ds.drop_note}"
         + ("; its ref_chosen/rejected_logps unused (--reference=precomputed reads them)"
            if getattr(ds, "record_ref_logps", None) is not None
            and cfg.reference != "precomputed" else ""))
    if cfg.data.shared_prompt:
      ds = _shared_prompt(cfg, ds, split)
    out.append(ds)
  return out


def _shared_prompt(cfg: RunConfig, ds, split: str):
  if cfg.data.format in ("unpaired", "pairs_as_unpaired"):
    raise ValueError(f"--shared_prompt needs groups that share a prompt; --data_format="
                     f"{cfg.data.format} pairs each completion with another prompt's")
  view = SharedPromptView(ds)
  length, resp = view.shape
  k = ds.tokens.shape[1]
  say(f"{split} data: shared-prompt rows of {length} tokens for {k} responses (<= {resp} "
       f"tokens each), instead of {k} x {cfg.data.max_len}")
  return view


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built and validated before the first compile."""

  cfg: RunConfig
  train_ds: Any
  eval_ds: Any
  mesh: Mesh
  batcher: Any = None  # data.batching.Batcher: the train batches (order, shapes)
  tokenizer: Any = None  # the online role decodes its samples for the reward


def setup(cfg: RunConfig) -> Setup:
  """Reads the tokenizer and data and builds the mesh; bad input raises a ValueError that
  names the flag, file, line or field (the CLI prints it without a traceback)."""
  paths.makedirs(cfg.workdir)
  for flag, path in zip(hub.FLAGS, (cfg.init_from, cfg.data.tokenizer, cfg.data.train_data,
                                    cfg.data.eval_data)):
    if hub.origin(path or ""):  # a Hub id, resolved to the cache by flags.to_config
      say(f"--{flag}: Hub {hub.origin(path)}, read from {path}")
  tok = data_lib.Tokenizer.load(cfg.data.tokenizer)
  if tok.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"--model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary ({tok.vocab_size}, {cfg.data.tokenizer})")
  template = chat_template.resolve(cfg.data.chat_template, tok)
  say(f"tokenizer: {tok.describe()}" + (" (the --init_from folder's)" if cfg.init_from and
       paths.dirname(paths.abspath(tok.path)) == paths.abspath(cfg.init_from) else "") +
       (f"; message-list records rendered with {template.where}" if template else ""))
  with chat.using(template):
    train_ds, eval_ds = load_data(cfg, tok)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  n_batch_shards = mesh_lib.batch_axis_size(mesh)
  for flag, size in (("batch_size", cfg.data.batch_size), ("eval_batch_size", cfg.data.eval_batch_size)):
    if size % n_batch_shards:
      raise ValueError(f"--{flag}={size} must be divisible by the mesh's data*fsdp size "
                       f"({n_batch_shards}, --mesh={cfg.mesh})")
  if cfg.grad_accum < 1 or cfg.data.batch_size % (cfg.grad_accum * n_batch_shards):
    raise ValueError(f"--batch_size={cfg.data.batch_size} must be divisible by --grad_accum="
                     f"{cfg.grad_accum} times the mesh's data*fsdp size ({n_batch_shards})")
  if cfg.role == "online":
    check_role(cfg)
    roles.get(cfg.role).check(cfg)
    _probe_loss(cfg, None)
    return Setup(cfg, train_ds, eval_ds, mesh, tokenizer=tok)
  for split, ds, path in (("train", train_ds, cfg.data.train_data),
                          ("eval", eval_ds, cfg.data.eval_data)):
    weight = getattr(ds, "weight", None)
    if weight is not None and not np.any(np.asarray(weight) > 0):
      raise ValueError(f"{path}: every {split} group has weight 0 (the records' 'weight' "
                       "field): there is nothing to learn from or average over")
  check_role(cfg)
  roles.get(cfg.role).check(cfg, train_ds, eval_ds)
  hf_export.check(cfg)
  _probe_loss(cfg, train_ds)
  rounds_lib.check(cfg, train_ds)
  return Setup(cfg, train_ds, eval_ds, mesh, batcher_of(cfg, train_ds, n_batch_shards))


def batcher_of(cfg: RunConfig, ds, n_batch_shards: int) -> batching.Batcher:
  """--batching and --curriculum as a `Batcher`; combinations that cannot work raise."""
  if cfg.data.batching == "pack" and getattr(cfg, "role", "policy") != "policy":
    raise ValueError("--batching=pack is built for the policy role's log-probs")
  if isinstance(ds, grain_source.PreparedDataset):
    return grain_source.batcher(cfg, ds, cfg.grad_accum * n_batch_shards)
  return rounds_lib.wrap(cfg, batching.from_config(cfg.data, ds, cfg.grad_accum * n_batch_shards))


def check_role(cfg: RunConfig) -> None:
  """The loss must be written for the run's role: a reward loss under the policy role (or
  the reverse) would read slots the role never fills. The online role also trains the
  offline pairwise losses, on each rollout group's best-vs-worst pair."""
  roles.get(cfg.role)
  written_for = cfg.loss_spec.role
  if written_for != cfg.role and not (cfg.role == "online" and written_for == "policy"):
    raise ValueError(f"--loss={cfg.loss} is a {written_for}-role loss, but --role={cfg.role}"
                     + (" (set --role=reward)" if written_for == "reward" else ""))


def _probe_loss(cfg: RunConfig, ds) -> None:
  """Traces the loss on the data's shapes, so a loss/data mismatch (say, score margins on
  records without scores) is a start-up error instead of a failure inside the first jit."""
  batch = None if ds is None else ds.batch(np.arange(min(2, ds.n)))
  jax.eval_shape(cfg.loss_spec.fn, roles.get(cfg.role).probe(batch, cfg))


