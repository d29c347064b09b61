"""The offline policy training loop: data, model, steps, checkpoints, metrics, plot."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging
from tqdm import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpref import data as data_lib
from jaxpref import losses
from jaxpref.models import hf_export
from jaxpref.eval import plots
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.data import batching, chat, chat_template, curriculum, grain_source
from jaxpref.data.shared_prompt import SharedPromptView
from jaxpref.parallel import distributed
from jaxpref.train import checkpoint as ckpt_lib
from jaxpref.train import ref_cache, rounds as rounds_lib
from jaxpref.train.config import DATA_FORMATS, RunConfig
from jaxpref.train.metrics import MetricWriter, RecordLog, read_metrics
from jaxpref.train.optimizer import learning_rate_schedule, make_optimizer
from jaxpref.train.policy_step import precompute_reference, probe_logps
from jaxpref.train.state import build_steps, check_lora, init_state
from jaxpref.train import reward_step


def _say(msg: str) -> None:
  """Progress for a person at a terminal; absl logging keeps the full record."""
  if jax.process_index() == 0:
    tqdm.write(msg)  # keeps an active progress bar intact
  logging.info(msg)


class _Preemption:
  """SIGTERM (a TPU VM preemption notice) asks the loop to save and exit cleanly."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
      self._old = None

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _read(cfg: RunConfig, path: str, tok, keep: str = ""):
  if grain_source.is_prepared(path):  # a `jaxpref-data prepare` folder: read with grain
    return grain_source.load(cfg, path)
  fmt = cfg.data.format
  opts = dict(skip_invalid=cfg.data.skip_invalid, fields=cfg.data.fields, keep=keep)
  tr = data_lib.Truncation.of(cfg.data)  # --truncation, --max_prompt_len
  if fmt == "pairs":  # a loss may need extra record fields and group members (K = 3)
    records, report = data_lib.read_pairs(path, **opts, require=losses.record_fields(cfg.loss))
    return (data_lib.PairDataset(records, tok, cfg.data.max_len, losses.member_fields(cfg.loss),
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
    ds, report, extra = _read(cfg, path, tok, curriculum.record_field(cfg.data.curriculum)
                              if split == "train" else "")
    _say(f"{split} data: {report.summary()}{extra}; {ds.n_truncated} of {ds.n} groups truncated "
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
  _say(f"{split} data: shared-prompt rows of {length} tokens for {k} responses (<= {resp} "
       f"tokens each), instead of {k} x {cfg.data.max_len}")
  return view


def evaluate(eval_step, params, ref_params, ds, batch_size, put) -> dict:
  """Weighted mean of every metric over the whole eval set (each record exactly once)."""
  totals, weight = {}, 0.0
  for batch in data_lib.eval_batches(ds, batch_size):
    metrics, w = jax.device_get(eval_step(params, ref_params, put(batch)))
    for k, v in metrics.items():
      totals[k] = totals.get(k, 0.0) + float(v) * float(w)
    weight += float(w)
  return reward_step.finish_metrics({k: v / weight for k, v in totals.items()})


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built and validated before the first compile."""

  cfg: RunConfig
  train_ds: Any
  eval_ds: Any
  mesh: Mesh
  batcher: Any = None  # data.batching.Batcher: the train batches (order, shapes)


def setup(cfg: RunConfig) -> Setup:
  """Reads the tokenizer and data and builds the mesh; bad input raises a ValueError that
  names the flag, file, line or field (the CLI prints it without a traceback)."""
  os.makedirs(cfg.workdir, exist_ok=True)
  tok = data_lib.Tokenizer.load(cfg.data.tokenizer)
  if tok.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"--model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary ({tok.vocab_size}, {cfg.data.tokenizer})")
  template = chat_template.resolve(cfg.data.chat_template, tok)
  _say(f"tokenizer: {tok.describe()}" + (" (the --init_from folder's)" if cfg.init_from and
       os.path.dirname(os.path.abspath(tok.path)) == os.path.abspath(cfg.init_from) else "") +
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
  reward_step.check_config(cfg, train_ds, eval_ds)
  check_lora(cfg)
  hf_export.check(cfg)
  if cfg.ref_sync_every and cfg.reference != "model":
    raise ValueError("--ref_sync_every updates the reference model's weights; it needs "
                     "--reference=model")
  if not 0 < cfg.ref_sync_alpha <= 1:
    raise ValueError(f"--ref_sync_alpha must be in (0, 1], got {cfg.ref_sync_alpha}")
  if cfg.reference_cache and cfg.reference != "precomputed":
    raise ValueError("--reference_cache stores precomputed reference log-probs; it needs "
                     "--reference=precomputed")
  if cfg.reference == "precomputed" and losses.needs_tokens(cfg.loss):
    raise ValueError(f"--reference=precomputed stores sequence log-probs, but --loss={cfg.loss} "
                     "reads per-token reference log-probs; use --reference=model")
  _probe_loss(cfg, train_ds)
  rounds_lib.check(cfg, train_ds)
  return Setup(cfg, train_ds, eval_ds, mesh, _batcher(cfg, train_ds, n_batch_shards))


def _batcher(cfg: RunConfig, ds, n_batch_shards: int) -> batching.Batcher:
  """--batching and --curriculum as a `Batcher`; combinations that cannot work raise."""
  if cfg.data.batching == "pack" and getattr(cfg, "role", "policy") != "policy":
    raise ValueError("--batching=pack is built for the policy role's log-probs")
  if isinstance(ds, grain_source.PreparedDataset):
    return grain_source.batcher(cfg, ds)
  return rounds_lib.wrap(cfg, batching.from_config(cfg.data, ds, cfg.grad_accum * n_batch_shards))


def _probe_loss(cfg: RunConfig, ds) -> None:
  """Traces the loss on the data's shapes, so a loss/data mismatch (say, score margins on
  records without scores) is a start-up error instead of a failure inside the first jit."""
  batch = ds.batch(np.arange(min(2, ds.n)))
  lp = (reward_step.probe_logps(batch, cfg) if cfg.role == "reward" else
        probe_logps(batch, losses.needs_tokens(cfg.loss)))
  jax.eval_shape(losses.bind(cfg.loss, cfg.loss_hparams), lp)


def run(cfg: RunConfig) -> dict:
  return train(setup(cfg))


def train(s: Setup) -> dict:
  """Trains the policy; returns the final eval metrics (or train metrics without eval data)."""
  cfg, train_ds, eval_ds, mesh = s.cfg, s.train_ds, s.eval_ds, s.mesh
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  put = lambda batch: distributed.put_global(batch, batch_sharding)
  batcher = s.batcher or _batcher(cfg, train_ds, mesh_lib.batch_axis_size(mesh))
  rows, put_train = _host_rows(batcher, batch_sharding)
  eff, n_est = batcher.estimate(min(-(-train_ds.n // cfg.data.batch_size), 200))
  _say(f"train batches: {batcher.describe()}; padding efficiency {eff:.1%} (real / computed "
       f"tokens, first {n_est} batches)"
       + (f"; curriculum {batcher.curriculum.describe()}" if batcher.curriculum else ""))

  optimizer = make_optimizer(cfg.optim, cfg.steps)
  graphdef, state, ref_params = init_state(cfg, mesh, optimizer)
  if cfg.reference == "precomputed" and cfg.lora is not None:  # keeps the base under the adapters
    _precompute(cfg, graphdef, ref_params.base, (train_ds, eval_ds), put)
  elif cfg.reference == "precomputed":
    ref_params = _precompute(cfg, graphdef, ref_params, (train_ds, eval_ds), put)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  _say(f"model: preset {cfg.model_preset}, {n_params:,} parameters; mesh {dict(mesh.shape)} "
       f"on {jax.device_count()} {jax.devices()[0].platform} device(s)")
  if cfg.lora is not None:
    _say(f"LoRA: those are rank-{cfg.lora.rank} adapters on {len(state.params)} weights; the "
         f"{sum(x.size for x in jax.tree.leaves(ref_params.base)):,} base weights are frozen")

  train_step, eval_step = build_steps(cfg, graphdef, optimizer, state, mesh)

  ckpt = ckpt_lib.Checkpointer(os.path.join(cfg.workdir, "checkpoints"),
                               cfg.checkpoint_every, cfg.keep_checkpoints)
  ckpt.data_iterator = getattr(batcher, "iterator", None)  # grain's state, saved with the step
  # With reference syncing (or --rounds) the reference is training state too: checkpointed.
  syncing = cfg.ref_sync_every > 0 or cfg.rounds > 1
  saved = lambda: {"train": state, "ref": ref_params} if syncing else state
  sync_ref = jax.jit(lambda p, r, alpha: jax.tree.map(
      lambda a, b: (alpha * a + (1 - alpha) * b).astype(b.dtype), p, r))
  start = 0
  if ckpt.latest_step is not None:
    restored, position, start = ckpt.restore(saved())
    state, ref_params = (restored["train"], restored["ref"]) if syncing else (restored, ref_params)
    if position.get("seed") != cfg.data.seed:
      raise ValueError(f"{cfg.workdir}: checkpoint was written with --data_seed="
                       f"{position.get('seed')}, this run has --data_seed={cfg.data.seed}")
    if position.get("order", batcher.describe()) != batcher.describe():
      raise ValueError(f"{cfg.workdir}: checkpoint was written with {position['order']}, this "
                       f"run has {batcher.describe()}: the batches after resuming would differ")
    _say(f"resuming from step {start} ({cfg.workdir}/checkpoints)")
  if start >= cfg.steps:
    ckpt.close()
    rows = [r for r in read_metrics(os.path.join(cfg.workdir, "metrics.jsonl")) if r["step"] <= start]
    _say(f"{cfg.workdir} already finished {start} of --steps={cfg.steps}; nothing to do")
    evals = [r for r in rows if r["split"] == "eval"]
    return evals[-1] if evals else rows[-1] if rows else {}
  writer = MetricWriter(cfg.workdir, resume_step=start, enabled=jax.process_index() == 0)
  records = RecordLog(cfg.workdir, jax.process_index(), start) if cfg.log_records else None
  rounds = rounds_lib.Rounds(cfg, batcher, graphdef, train_ds, put, mesh, _say, start)

  def run_eval(step):
    if eval_ds is None:
      return None
    row = writer.write(step, "eval", evaluate(eval_step, state.params, ref_params, eval_ds,
                                              cfg.data.eval_batch_size, put))
    _say(f"step {step:>6} eval  loss {row['loss']:.4f}  "
         f"accuracy {row['rewards/accuracy']:.3f}  margin {row['rewards/margin']:.3f}")
    return row

  last_eval = run_eval(0) if start == 0 else None
  last_train = None
  preemption = _Preemption()
  bar = _progress(cfg, start)
  t0, steps_done = time.perf_counter(), 0
  tokens = np.zeros(2, np.int64)  # real, computed since the last log (host-side, no device cost)
  try:
    for step in range(start, cfg.steps):
      ref_params = rounds.begin(step, state.params, ref_params, sync_ref)  # --rounds
      host_batch = batcher.batch(step, rows)
      if records is not None:
        records.write(step + 1, batcher.last_indices)
      tokens += batching.padding_efficiency(host_batch)
      state, metrics = train_step(state, ref_params, put_train(host_batch))
      done = step + 1
      if cfg.ref_sync_every and done % cfg.ref_sync_every == 0:  # TR-DPO: a*policy + (1-a)*ref
        ref_params = sync_ref(state.params, ref_params, cfg.ref_sync_alpha)
      steps_done += 1
      if bar is not None:
        bar.update(1)
      if done % cfg.log_every == 0 or done == cfg.steps:
        metrics = reward_step.finish_metrics(jax.device_get(metrics))
        metrics["learning_rate"] = _lr(cfg, step)
        metrics["steps_per_sec"] = steps_done / (time.perf_counter() - t0)
        metrics["data/padding_efficiency"] = float(tokens[0] / tokens[1])
        tokens[:] = 0
        last_train = writer.write(done, "train", metrics)
        if bar is not None:
          bar.set_postfix(loss=f"{last_train['loss']:.4f}",
                          acc=f"{last_train['rewards/accuracy']:.2f}")
        else:
          _say(f"step {done:>6} train loss {last_train['loss']:.4f}  "
               f"{last_train['steps_per_sec']:.1f} steps/s")
      if done % cfg.eval_every == 0 or done == cfg.steps:
        last_eval = run_eval(done)
      position = {"seed": cfg.data.seed, "step": done, "order": batcher.describe()}
      if preemption.requested:
        ckpt.save(done, saved(), position, force=True)
        _say(f"SIGTERM: saved a checkpoint at step {done} and stopped")
        break
      ckpt.save(done, saved(), position, force=done == cfg.steps)
  finally:
    if bar is not None:
      bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    if records is not None:
      records.close()
    preemption.restore()

  if cfg.plot and jax.process_index() == 0:
    plots.plot_run(read_metrics(writer.path), os.path.join(cfg.workdir, "metrics.png"),
                   title=f"{cfg.loss} on {os.path.basename(cfg.data.train_data)}")
  final = last_eval or last_train or {}
  if cfg.export_hf and not preemption.requested:  # all processes gather; process 0 writes
    hf_export.export(cfg, state.params, ref_params, _say)
  if jax.process_index() == 0:
    with open(os.path.join(cfg.workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=1)
  return final


def _host_rows(batcher, batch_sharding):
  """(rows this host builds, how to place them). With several processes each host builds
  only the block of rows its devices hold, when that block is one contiguous slice."""
  everything = (slice(None), lambda b: distributed.put_global(b, batch_sharding))
  if jax.process_count() == 1:
    return everything
  mine = batching.host_rows(batcher.rows, jax.process_index(), jax.process_count())
  if distributed.local_rows(batch_sharding, batcher.rows) != mine:
    _say("train batches: this host's devices do not hold one contiguous block of rows; "
         "every host builds the whole batch")
    return everything
  return mine, lambda b: distributed.put_host_rows(b, batch_sharding, batcher.rows)


def _precompute(cfg: RunConfig, graphdef, ref_params, datasets, put):
  """Stores the reference's log-probs with the data (from `--reference_cache` when an entry
  matches); returns None, the reference to keep."""
  t0 = time.perf_counter()
  weights = ref_cache.params_digest(ref_params) if cfg.reference_cache else ""
  said = []
  for ds, path in zip(datasets, (cfg.data.train_data, cfg.data.eval_data)):
    if ds is None:
      continue
    given = getattr(ds, "record_ref_logps", None)  # the records' ref_chosen/rejected_logps
    if given is not None:
      if ds.tokens.shape[1] != given.shape[1]:
        raise ValueError(f"{path}: the records' reference log-probs cover (chosen, rejected), "
                         f"but --loss={cfg.loss} scores {ds.tokens.shape[1]} members a group")
      ds.ref_logps = given
      said.append(f"{ds.n} groups read from the records (taken as given: {ds.n_truncated} of "
                  "them are truncated here)")
      continue
    parts = ref_cache.key_parts(cfg, path, weights) if weights else None
    cached = ref_cache.load(cfg.reference_cache, parts, ds.tokens.shape[:2]) if parts else None
    said.append(f"{ds.n} groups " + ("read from --reference_cache" if cached is not None
                                     else "computed"))
    if cached is None:
      cached = precompute_reference(graphdef, ref_params, ds, cfg.data.eval_batch_size, put,
                                    cfg.logps)
      if parts and jax.process_index() == 0:
        ref_cache.save(cfg.reference_cache, parts, cached)
    ds.ref_logps = cached
  _say(f"reference: log-probs of {', '.join(said)} in {time.perf_counter() - t0:.1f} s; "
       "the reference model is not kept")
  return None


def _lr(cfg: RunConfig, step: int) -> float:
  return float(learning_rate_schedule(cfg.optim, cfg.steps)(step))


def _progress(cfg: RunConfig, start: int) -> Optional[object]:
  if not cfg.progress or jax.process_index() != 0:
    return None
  return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
              mininterval=0.5)
