"""Every hyperparameter of a run as an absl flag, and flags -> `RunConfig`.

Model and loss hyperparameters are dotted flags derived from the code, not listed by hand:
`--model.<field>` for each `ModelConfig` field (overriding the `--model` preset) and
`--loss.<name>` for each hyperparameter of any registered loss (validated against the
selected `--loss` at start-up). Flag files may include other flag files; a relative
`--flagfile=` inside a file is resolved against that file's folder.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from absl import flags

from jaxpref import losses
from jaxpref import dotted_flags
from jaxpref.flag_files import expand_flagfiles
from jaxpref.dotted_flags import (define_dotted, define_loss_flags, dotted_values,
                                   import_loss_modules, loss_flag_hint)
from jaxpref import models
from jaxpref import ops
from jaxpref.data.pairs import TRUNCATION_MODES
from jaxpref.data import hub
from jaxpref.data.records import parse_fields
from jaxpref.data.tokenizer import find
from jaxpref.models import attention_kernels
from jaxpref.models import lora
from jaxpref.models import hf_reward
from jaxpref.models import convert, remote
from jaxpref.train.config import (DATA_FORMATS, DataConfig, LogpsOptions, OnlineConfig,
                                  OptimConfig, RunConfig)

FLAGS = flags.FLAGS
_D, _O = DataConfig(), OptimConfig()
_R = RunConfig(workdir="", model=None)

flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, plots, flags.txt. "
                    "An existing one is resumed from its latest checkpoint.")
# Data.
flags.DEFINE_string("train_data", _D.train_data, "Records: a JSONL or Parquet file, a folder "
                    "of them or a glob of shards (docs/data.md); check with jaxpref-data validate.")
flags.DEFINE_string("eval_data", _D.eval_data, "Held-out records in the same layout ('' for none).")
flags.DEFINE_string("tokenizer", _D.tokenizer, "sentencepiece model file, tokenizer.json or a "
                    "Hugging Face folder holding either; with --init_from and no --tokenizer, "
                    "the --init_from folder's tokenizer if it has one (docs/models.md).")
flags.DEFINE_string("chat_template", _D.chat_template, "Message-list records: auto = the "
                    "tokenizer folder's Jinja chat template if it has one, else the plain "
                    "format; none = the plain format; or a template file (docs/data.md).")
flags.DEFINE_integer("max_len", _D.max_len, "Tokens per sequence (BOS + prompt + response + EOS).")
flags.DEFINE_enum("truncation", _D.truncation, list(TRUNCATION_MODES), "A sequence over "
                  "--max_len: keep_end keeps the end of the prompt, keep_start its start (the "
                  "response keeps its start); drop drops the group, counted in the data report.")
flags.DEFINE_integer("max_prompt_len", _D.max_prompt_len, "Cut the prompt to this many tokens "
                     "first (by the --truncation rule; counted as truncated); 0 = no limit.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Pairs per train step (global).")
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Pairs per eval step (global).")
flags.DEFINE_integer("data_seed", _D.seed, "Seed of the data order.")
flags.DEFINE_enum("data_format", _D.format, list(DATA_FORMATS),
                  "pairs: {prompt, chosen, rejected}; unpaired: {prompt, completion, label} "
                  "(KTO-style losses); pairs_as_unpaired: each pair split into a desirable and "
                  "an undesirable record; ranked: {prompt, completions: [{response, score}]} as "
                  "lists of --group_size, best first (listwise losses); ratings_*: the same "
                  "records turned into pairs (best vs worst, best vs each other, all pairs).")
flags.DEFINE_integer("group_size", _D.group_size, "Responses per group for --data_format=ranked "
                     "(a record's best ones are kept; the dropped ones are counted).")
flags.DEFINE_bool("shared_prompt", _D.shared_prompt,
                  "Pack each group's K responses after one copy of their prompt (responses see "
                  "the prompt and themselves, never each other): the prompt is computed once.")
flags.DEFINE_enum("batching", _D.batching, ["pad", "buckets", "pack"],
                  "Train batches (docs/data.md): pad = every row to --max_len; buckets = "
                  "batches of similar length, padded to a multiple of --bucket_multiple; "
                  "pack = --pack_groups groups per block of K rows, one sequence per segment.")
flags.DEFINE_integer("bucket_multiple", _D.bucket_multiple, "buckets/pack: rows are padded to "
                     "a multiple of this (bounds the compiled shapes).")
flags.DEFINE_integer("bucket_window", _D.bucket_window, "buckets: this many consecutive "
                     "batches are re-cut by length together.")
flags.DEFINE_integer("pack_groups", _D.pack_groups, "pack: groups per packed block; "
                     "--batch_size must be a multiple of it.")
flags.DEFINE_string("curriculum", _D.curriculum, "FIELD[:asc|desc]: train groups in stages "
                    "sorted by FIELD (score_gap, weight, label_smoothing, length, policy_margin, "
                    "or a numeric field of the records); '' = none.")
flags.DEFINE_integer("curriculum_stages", _D.curriculum_stages, "Stages of --curriculum, "
                     "each shuffled, visited in order every epoch.")
flags.DEFINE_bool("skip_invalid_records", _D.skip_invalid,
                  "Skip (and count) malformed records instead of stopping at the first.")
flags.DEFINE_string("data_fields", _D.fields, "Our record fields from the dataset's own names, "
                    "e.g. prompt:question,chosen:response_j,rejected:response_k (docs/data.md).")
# Model.
flags.DEFINE_string("model", _R.model_preset, "Model size preset: " + ", ".join(models.PRESETS))
flags.DEFINE_string("init_from", _R.init_from, "Start the policy and the reference from a "
                    "Hugging Face folder (Llama, Qwen2, Gemma, Gemma 2) or a jaxpref-convert "
                    "folder; the model's shape comes from it (docs/models.md).")
flags.DEFINE_alias("init_from_hf", "init_from")  # the name the models issue uses
flags.DEFINE_string("export_hf", _R.export_hf, "At the end of training write the trained model "
                    "(LoRA merged; a reward model as *ForSequenceClassification) and the "
                    "tokenizer files to this folder as a Hugging Face checkpoint.")
# Optimizer.
flags.DEFINE_enum("export_hf_dtype", None, ["float32", "bfloat16", "float16"], "--export_hf: "
                  "the weights' dtype (default: as trained).")
flags.DEFINE_string("export_hf_max_shard_size", None, "--export_hf: split the weights into "
                    "safetensors shards of at most this size (e.g. 2GB), with an index.")
flags.DEFINE_bool("export_hf_adapter", False, "--export_hf with --lora_rank: also write the "
                  "LoRA adapters as a PEFT folder (OUT/adapter) that peft loads onto the base.")
_OPTIM_FLAGS = (  # flag, OptimConfig field, help
    ("learning_rate", "learning_rate", "Peak learning rate."),
    ("warmup_steps", "warmup_steps", "Linear warmup steps."),
    ("min_lr_ratio", "min_lr_ratio", "Cosine decay ends at learning_rate * this."),
    ("weight_decay", "weight_decay", "AdamW weight decay."),
    ("adam_b1", "b1", "Adam beta1."), ("adam_b2", "b2", "Adam beta2."),
    ("adam_eps", "adam_eps", "Adam epsilon."),
    ("grad_clip_norm", "grad_clip_norm", "Global-norm clip (0: off)."))
for _flag, _field, _help in _OPTIM_FLAGS:
  (flags.DEFINE_integer if isinstance(getattr(_O, _field), int) else flags.DEFINE_float)(
      _flag, getattr(_O, _field), _help)
# Role.
flags.DEFINE_enum("role", _R.role, ["policy", "reward", "online"],
                  "policy: train the language model on a preference loss against a reference; "
                  "reward: train a reward model (a head on the decoder's last token, no "
                  "reference) with a reward loss such as bt or gpm (docs/reward_models.md); "
                  "online: sample --online.num_generations responses per prompt, score them "
                  "and train on them (docs/online.md).")
flags.DEFINE_integer("reward_dim", _R.reward_dim,
                     "--role=reward head width: 1 = a scalar reward; an even 2k = a preference "
                     "embedding of k rotation blocks (--loss=gpm).")
flags.DEFINE_enum("reward_head", _R.reward_head, ["linear", "attributes", "pal", "gpm_gated"],
                  "--role=reward head: linear (a reward or GPM embedding); attributes (one "
                  "score per attribute, --reward_dim=A, --loss=attribute_bt); pal (PAL ideal "
                  "points in --reward_dim dims, --loss=pal); gpm_gated (GPM embeddings with "
                  "prompt-gated eigenvalues, --reward_dim=2k, --loss=gpm).")
flags.DEFINE_integer("pal_prototypes", _R.pal_prototypes, "--reward_head=pal: prototypes K'.")
flags.DEFINE_integer("pal_users", _R.pal_users, "--reward_head=pal: number of user ids (the "
                     "records' `user` field, 0 .. N-1; records without it are user 0).")
flags.DEFINE_enum("reward_pool", _R.reward_pool, ["last", "mean"],
                  "--role=reward: the head reads the last real token's hidden state (last) or "
                  "the mean over the sequence's real tokens (mean; Themis's two readouts).")
# Loss.
flags.DEFINE_string("loss", _R.loss, "Loss name, or a weighted sum such as 0.8*dpo+0.2*bco_pair+sft: "
                    + ", ".join(losses.names()))
flags.DEFINE_multi_string("loss_module", [], "A Python file (or importable module) imported "
                          "before the flags are parsed, so the losses it registers and their "
                          "--loss.HPARAM flags exist. Repeatable.")
# Mesh and loop.
flags.DEFINE_string("mesh", _R.mesh, "Device mesh, e.g. data:-1 or data:2,fsdp:2,tensor:2.")
flags.DEFINE_string("coordinator_address", "", "Multi-host: HOST:PORT of process 0. Not "
                    "needed on multi-host TPU slices or SLURM allocations (detected).")
flags.DEFINE_integer("num_processes", 1, "Multi-host: processes (hosts) in the run.")
flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index.")
flags.DEFINE_bool("estimate_only", False,
                  "Print the per-device memory plan of the train step on --mesh (parameters, "
                  "optimizer state, reference, gradients, batch, activations, LM head), "
                  "counted from the config and the sharding rules, allocating nothing; then "
                  "exit without training (docs/cloud.md#memory-plan).")
flags.DEFINE_integer("estimate_devices", 0,
                     "With --estimate_only: plan a slice from any machine by estimating on this "
                     "many fake CPU devices (e.g. 32 for a v5p-64); 0 uses the real devices.")
flags.DEFINE_bool("estimate_compile", False,
                  "With --estimate_only: also compile the train step and print the compiler's "
                  "own figure (the one to trust on the slice itself; XLA:CPU's overstates "
                  "remat runs, and an 8B compile on CPU takes minutes).")
flags.DEFINE_enum("reference", _R.reference, ["model", "precomputed", "lora_base"],
                  "model: run the frozen reference forward in every step; precomputed: compute "
                  "every group's reference log-probs once at start-up, then train without the "
                  "reference model in memory or in the step; lora_base (with --lora_rank): the "
                  "base weights under the adapters are the reference, no second copy held.")
# LoRA (jaxpref/models/lora.py, docs/lora.md).
flags.DEFINE_integer("lora_rank", 0, "LoRA rank r: train rank-r adapters on --lora_targets "
                     "and keep the base weights frozen (0: full fine-tuning).")
flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha: the update is (alpha / r) * A @ B.")
flags.DEFINE_list("lora_targets", ["q", "k", "v", "o", "gate", "up", "down"],
                  "Weights LoRA adapts: regular expressions matched in full against a weight's "
                  "name (q, k, v, o, gate, up, down, lm_head, embed) or slash path "
                  "(layers/0/attn/q).")
flags.DEFINE_integer("ref_sync_every", _R.ref_sync_every,
                     "TR-DPO reference updates: every N steps set the reference to "
                     "alpha*policy + (1-alpha)*reference (0: a frozen reference).")
flags.DEFINE_integer("rounds", _R.rounds, "Iterative rounds: --steps in this many equal "
                     "rounds; each later round starts with reference <- policy, and with "
                     "--curriculum=policy_margin re-ranks the train groups (docs/data.md).")
flags.DEFINE_float("ref_sync_alpha", _R.ref_sync_alpha,
                   "TR-DPO mixing weight: 1 = hard update (copy), < 1 = soft update.")
flags.DEFINE_string("reference_cache", _R.reference_cache,
                    "With --reference=precomputed: a folder where the reference log-probs are "
                    "stored, keyed by the reference weights, data and tokenizer bytes and the "
                    "layout settings; a later run with the same key reads them, any other "
                    "computes afresh. Empty: no cache.")
flags.DEFINE_enum("logps_impl", _R.logps.impl, list(ops.IMPLS),
                  "Per-token log-prob kernel when logits are materialised (--nofused_lm_head): "
                  "auto = Pallas on TPU/GPU, the vocabulary-streamed XLA twin on CPU.")
flags.DEFINE_bool("fused_lm_head", _R.logps.fused_lm_head,
                  "Fuse the LM head into the log-softmax, block by block over the vocabulary, "
                  "so [tokens, vocab] logits never exist (see benchmarks/README.md).")
flags.DEFINE_integer("grad_accum", _R.grad_accum,
                     "Micro-batches per step (gradient accumulation); --batch_size must be a "
                     "multiple of it times the mesh's batch devices.")
flags.DEFINE_integer("seed", _R.seed, "Seed of the model initialisation.")
flags.DEFINE_integer("steps", _R.steps, "Train steps.")
flags.DEFINE_integer("log_every", _R.log_every, "Log train metrics every N steps.")
flags.DEFINE_integer("eval_every", _R.eval_every, "Evaluate on eval_data every N steps.")
flags.DEFINE_integer("checkpoint_every", _R.checkpoint_every, "Checkpoint every N steps.")
flags.DEFINE_integer("keep_checkpoints", _R.keep_checkpoints, "Checkpoints kept on disk.")
flags.DEFINE_bool("progress", _R.progress, "Show a progress bar.")
flags.DEFINE_bool("plot", _R.plot, "Write WORKDIR/metrics.png at the end.")
flags.DEFINE_enum("nonfinite", _R.nonfinite, ["stop", "skip"], "A step whose loss or gradient "
                  "is not finite never updates the model; stop: the run stops naming the step "
                  "and its groups; skip: such steps are skipped and counted.")
flags.DEFINE_enum("tie_accuracy", _R.tie_accuracy, ["half", "loss"], "An exact tie in "
                  "rewards/accuracy counts half a win (0.5 at step 0), or a loss as in TRL.")
flags.DEFINE_bool("allow_flag_changes", False, "Resume a run whose result-changing flags "
                  "differ from its run.json record (the change is recorded as a new segment).")
flags.DEFINE_bool("log_records", _R.log_records, "Write WORKDIR/records/process_P.jsonl: the "
                  "train groups (dataset indices) each host read at every step, to audit a "
                  "resumed run's data against an uninterrupted one.")

define_dotted(
    "model", {f.name: getattr(models.get_config("tiny"), f.name)
              for f in dataclasses.fields(models.ModelConfig)}, "Overrides the preset's")


flags.DEFINE_enum("attention", None, list(attention_kernels.KERNELS), "The attention kernel "
                  "(sets --model.attention; default xla, the einsum): splash (TPU), cudnn (GPU), "
                  "auto (by backend); docs/kernels.md.")


define_dotted("online", {f.name: f.default for f in dataclasses.fields(OnlineConfig)},
              "The online role's")


define_loss_flags()


def _model_overrides() -> dict[str, Any]:
  return attention_kernels.with_flag(dotted_values("model"), FLAGS["attention"].value)


def _tokenizer(paths: dict[str, str]) -> str:
  """--tokenizer, or the --init_from folder when it holds a tokenizer and none was given."""
  if os.path.isdir(init_from := paths["init_from"]) and not FLAGS["tokenizer"].present:
    # The file, not the folder: --reference_cache keys on the tokenizer file's bytes. A
    # re-run from flags.txt resolves it again from the same --init_from.
    return find(init_from) or paths["tokenizer"]
  return paths["tokenizer"]


def _reward_dim(init_from: str) -> int:
  if FLAGS.role == "reward" and init_from:
    return hf_reward.reward_dim(init_from, FLAGS.reward_dim, FLAGS["reward_dim"].present)
  return FLAGS.reward_dim


def to_config(workdir: str | None = None) -> RunConfig:
  """The parsed flags as a `RunConfig` (in `workdir`, default --workdir); errors name the
  offending flag."""
  workdir = workdir or FLAGS.workdir
  if not workdir:
    raise ValueError("--workdir is required (an existing one is resumed)")
  loss_hparams = dotted_values("loss")
  parse_fields(FLAGS.data_fields)  # unknown target names -> error listing valid ones
  paths = {name: remote.local(name, hub.resolve(name, FLAGS[name].value or ""))  # Hub, gs://
           for name in hub.FLAGS}
  if FLAGS.init_from:  # the checkpoint's config replaces the --model preset (often in a flag file)
    model = convert.run_config(paths["init_from"], _model_overrides())
  else:
    model = models.get_config(FLAGS.model, **_model_overrides())
  for name in ("batch_size", "eval_batch_size", "steps", "max_len", "log_every", "eval_every",
               "checkpoint_every"):
    if FLAGS[name].value < 1:
      raise ValueError(f"--{name} must be >= 1, got {FLAGS[name].value}")
  cfg = RunConfig(
      workdir=workdir, model=model, init_from=paths["init_from"],
      model_preset=f"init_from={FLAGS.init_from}" if FLAGS.init_from else FLAGS.model,
      optim=OptimConfig(**{field: FLAGS[flag].value for flag, field, _ in _OPTIM_FLAGS}),
      data=DataConfig(train_data=paths["train_data"], eval_data=paths["eval_data"],
                      tokenizer=_tokenizer(paths), chat_template=FLAGS.chat_template,
                      max_len=FLAGS.max_len, truncation=FLAGS.truncation,
                      max_prompt_len=FLAGS.max_prompt_len,
                      batch_size=FLAGS.batch_size, eval_batch_size=FLAGS.eval_batch_size,
                      seed=FLAGS.data_seed, skip_invalid=FLAGS.skip_invalid_records,
                      format=FLAGS.data_format, group_size=FLAGS.group_size,
                      shared_prompt=FLAGS.shared_prompt, fields=FLAGS.data_fields,
                      batching=FLAGS.batching, bucket_multiple=FLAGS.bucket_multiple,
                      bucket_window=FLAGS.bucket_window, pack_groups=FLAGS.pack_groups,
                      curriculum=FLAGS.curriculum, curriculum_stages=FLAGS.curriculum_stages),
      role=FLAGS.role, reward_dim=_reward_dim(paths["init_from"]), reward_head=FLAGS.reward_head,
      reward_pool=FLAGS.reward_pool,
      export_hf=FLAGS.export_hf, export_hf_dtype=FLAGS.export_hf_dtype,
      export_hf_max_shard_size=FLAGS.export_hf_max_shard_size,
      export_hf_adapter=FLAGS.export_hf_adapter,
      pal_prototypes=FLAGS.pal_prototypes, pal_users=FLAGS.pal_users,
      loss=FLAGS.loss, loss_hparams=loss_hparams, mesh=FLAGS.mesh, reference=FLAGS.reference,
      reference_cache=FLAGS.reference_cache,
      lora=lora.LoraConfig(FLAGS.lora_rank, FLAGS.lora_alpha, tuple(FLAGS.lora_targets))
      if FLAGS.lora_rank else None,
      ref_sync_every=FLAGS.ref_sync_every, ref_sync_alpha=FLAGS.ref_sync_alpha,
      rounds=FLAGS.rounds,
      logps=LogpsOptions(impl=FLAGS.logps_impl, fused_lm_head=FLAGS.fused_lm_head),
      grad_accum=FLAGS.grad_accum, seed=FLAGS.seed,
      steps=FLAGS.steps, log_every=FLAGS.log_every, eval_every=FLAGS.eval_every,
      checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
      progress=FLAGS.progress, plot=FLAGS.plot,
      log_records=FLAGS.log_records, nonfinite=FLAGS.nonfinite, tie_accuracy=FLAGS.tie_accuracy,
      online=OnlineConfig(**dotted_values("online")))
  _ = cfg.loss_spec  # resolved here: an unknown loss or --loss.X is an error listing valid ones
  conflicts = models.decoder.scan_layers_conflicts(model, lora_rank=FLAGS.lora_rank,
                                                   init_from=FLAGS.init_from,
                                                   export_hf=FLAGS.export_hf)
  if conflicts:
    raise ValueError(conflicts[0])
  if FLAGS.learning_rate <= 0:
    raise ValueError(f"--learning_rate must be > 0, got {FLAGS.learning_rate}")
  return cfg


_PER_LAUNCH = ("workdir", "coordinator_address", "num_processes", "process_id",
               "allow_flag_changes")


def resolved_flags(cfg: RunConfig | None = None) -> str:
  """Every jaxpref flag with its value, as a flag file that re-runs this run exactly; with
  `cfg`, the values it resolved (the --init_from folder's tokenizer, its reward_dim)."""
  resolved = {} if cfg is None else {"tokenizer": hub.tokenizer_flag(cfg.data.tokenizer, FLAGS),
                                     "reward_dim": cfg.reward_dim}
  lines = ["# Written by jaxpref: re-run with  jaxpref-train --flagfile=THIS --workdir=NEW_DIR"]
  # absl files a flag under the module that defined it: the dotted ones are dotted_flags'.
  ours = FLAGS.get_flags_for_module(__name__) + FLAGS.get_flags_for_module(dotted_flags.__name__)
  for flag in sorted(ours, key=lambda f: f.name):
    if flag.name in _PER_LAUNCH:  # where and how this launch ran, not what it computed
      lines.append(f"# --{flag.name}={flag.value}")
    elif flag.name in resolved:
      lines.append(f"--{flag.name}={resolved[flag.name]}")
    elif flag.value is not None:
      lines.append(flag.serialize())
  return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> list[str]:
  """absl's flags parser for every jaxpref CLI that takes the training flags: flag files
  expanded (relative includes against their folder), loss modules imported first so their
  `--loss.*` flags exist, and a parsing error as one FATAL line with a hint."""
  args = []
  try:
    args = expand_flagfiles(argv[1:])
    import_loss_modules(args)
    return FLAGS(argv[:1] + args)
  except flags.Error as e:
    hint = loss_flag_hint(str(e), args, FLAGS["loss"].default)
    print(f"FATAL flags parsing error: {e}{hint}\nPass --helpfull to see all flags.",
          file=sys.stderr)
    sys.exit(1)
