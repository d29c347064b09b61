"""The resolved configuration of one run: what `main.py` builds from flags.

Plain frozen dataclasses, so tests and notebooks can build a run without absl.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from jaxpref import losses
from jaxpref.models.logps import LogpsOptions


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 1e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  adam_eps: float = 1e-8
  grad_clip_norm: float = 1.0  # 0 disables clipping


DATA_FORMATS = ("pairs", "unpaired", "pairs_as_unpaired", "ranked", "ratings_best_vs_worst",
                "ratings_best_vs_rest", "ratings_all_pairs")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  train_data: str = "jaxpref/data/tiny/train.jsonl"
  eval_data: str = "jaxpref/data/tiny/eval.jsonl"  # "" for no held-out evaluation
  tokenizer: str = "jaxpref/data/tiny/tokenizer.model"  # sentencepiece, tokenizer.json or HF folder
  chat_template: str = "auto"  # message-list records: auto (the tokenizer's) | none | PATH
  max_len: int = 32
  truncation: str = "keep_end"  # over max_len: keep_end | keep_start | drop (data.pairs.Truncation)
  max_prompt_len: int = 0  # prompt cut to this many tokens first; 0 = no limit
  batch_size: int = 32  # groups (pairs) per step
  eval_batch_size: int = 64
  seed: int = 0  # data order
  skip_invalid: bool = False
  format: str = "pairs"  # see DATA_FORMATS
  fields: str = ""  # our field:the file's field, comma-separated (data.records.parse_fields)
  group_size: int = 4  # K for --data_format=ranked
  shared_prompt: bool = False  # pack each group's K responses after one copy of the prompt
  batching: str = "pad"  # pad | buckets | pack (jaxpref/data/batching.py)
  bucket_multiple: int = 16  # buckets/pack: rows padded to a multiple of this
  bucket_window: int = 32  # buckets: consecutive batches re-cut by length together
  pack_groups: int = 2  # pack: groups sharing one packed block of K rows
  curriculum: str = ""  # FIELD[:asc|desc] (jaxpref/data/curriculum.py); "" = none
  curriculum_stages: int = 1


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
  """The online role's rollouts (`--online.*` flags; docs/online.md)."""
  num_generations: int = 4  # K responses sampled per prompt
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0
  updates_per_rollout: int = 1  # optimizer steps on one rollout (old log-probs held fixed)
  reward: str = ""  # reward spec, e.g. "fn" or "1.0*fn+0.5*overlong" (rewards/sources.py)
  reward_fn: str = ""  # FILE.py:name, a function (prompts, responses, **ctx) -> [B, K]
  advantage: str = "grpo"  # grpo | rloo | reinforce_pp | plain (losses/advantages.py)
  advantage_scale: str = "group"  # grpo's std: group | batch | none
  truncated: str = "keep"  # a response without EOS: keep | mask (no gradient) | penalize
  truncated_score: float = 0.0  # its score under truncated=penalize
  dynamic_sampling: bool = False  # DAPO: groups whose scores all agree get weight 0
  eval_temperature: float = 0.0  # held-out evaluation samples (0 = greedy)
  eval_samples: int = 1  # samples per held-out prompt
  prompt_buckets: str = "16,32,64,128,256,512"  # prompt lengths padded to these (compiles)
  # Model reward sources (rewards/rm_source.py, rewards/judge.py; docs/online.md):
  reward_model: str = ""  # rm / pref_rm: a --role=reward run folder or an HF seq-cls folder
  judge_model: str = ""  # judge: a policy run folder, jaxpref-convert or HF causal-LM folder;
  # "policy": the policy judges its own samples (OSP's self-preferring loop)
  judge_template: str = ""  # judge: a file with {prompt}, {a}, {b}; "" = the default one
  judge_labels: str = "A,B"  # judge: the answers naming the first / second response
  score_max_len: int = 0  # rows the reward model / judge read; 0: the run's --max_len or
  #                         the folder config's max length (at most 2048)
  reward_lm: str = ""  # relevance / flr: their decoder (a run, jaxpref or HF folder)
  strong_lm: str = ""  # cdr: the strong decoder
  weak_lm: str = ""  # cdr: the weak decoder
  reward_params: str = ""  # sources' hyperparameters: "overlong.buffer=4;cdr.system=..."
  # PPO (a loss that reads values, `--loss=ppo`; docs/online.md#ppo): the value function,
  # GAE, advantage whitening and the KL-penalised reward's controller (EasyLM's defaults).
  value: str = "head"  # head: a linear head on the policy trunk | model: a separate value model
  value_init: str = ""  # value=model starts from this reward run / HF seq-cls folder ("": policy)
  gamma: float = 1.0  # GAE's discount
  lam: float = 0.95  # GAE's lambda
  whiten: str = "batch"  # advantages whitened over the batch's tokens | row | none
  kl_coef: float = 0.2  # the KL penalty's (initial) coefficient in the per-token reward
  kl_target: float = 0.0  # > 0: Ziegler et al.'s adaptive controller aims at this KL; 0: fixed
  kl_horizon: float = 10000.0  # the adaptive controller's horizon (in sequences)
  shared_prompt: bool = True  # update on each group's prompt once (train/online.py `packs`)
  extrapolation_lr: float = 0.0  # egpo: step (a)'s SGD learning rate; 0: the schedule's
  mixture_coef: float = 0.5  # nash_md: the opponent samples pi^(1-m) pi_ref^m (TRL's default)
  pairs: str = "best_worst"  # a pairwise loss's pairs: best_worst | ranked (i with i + K/2)
  # | drift (the best sample against the record's rejected response, train/drift.py)
  # | refine (the best of K answers and K refinements over the refined answer, train/refine.py)
  refine_template: str = "{prompt} you said {response} try again."  # pairs=refine's prompt
  refine_train: str = "both"  # pairs=refine: both (direct + refinement pair) | direct
  eval_reward: str = ""  # reward spec for held-out samples ("": the training reward)
  prompt_pool: int = 0  # eva: sample this many prompts, train on the batch_size most
  prompt_priority: str = "gap"  # informative: gap (max - min score) | gap_mean (max - mean)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  workdir: str
  model: Any  # jaxpref.models.ModelConfig
  model_preset: str = "tiny"
  optim: OptimConfig = OptimConfig()
  data: DataConfig = DataConfig()
  role: str = "policy"  # policy | reward | online (docs/design.md#roles-what-a-run-trains)
  reward_dim: int = 1  # reward role: 1 = scalar reward head, even 2k = GPM embedding head
  reward_head: str = "linear"  # linear | attributes | pal | gpm_gated (docs/reward_models.md)
  pal_prototypes: int = 2  # --reward_head=pal: K' prototypes (ideal points) per prompt
  pal_users: int = 1  # --reward_head=pal: user ids 0 .. pal_users-1 get mixture weights
  reward_pool: str = "last"  # last | mean: the hidden state the reward head reads (Themis's two)
  loss: str = "dpo"
  loss_hparams: dict = dataclasses.field(default_factory=dict)
  mesh: str = "data:-1"
  reference: str = "model"  # model | precomputed | lora_base
  lora: Any = None  # jaxpref.models.lora.LoraConfig; None = full fine-tuning
  ref_sync_every: int = 0  # TR-DPO: every N steps ref <- alpha*policy + (1-alpha)*ref; 0 = never
  ref_sync_alpha: float = 1.0  # 1 = hard update (copy the policy)
  rounds: int = 1  # --steps in equal rounds, each with a fresh reference (train/rounds.py)
  reference_cache: str = ""  # folder of precomputed reference log-probs; "" = no cache
  logps: LogpsOptions = LogpsOptions()
  grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
  seed: int = 0  # model init
  init_from: str = ""  # HF or jaxpref-convert folder: policy and reference start from it
  export_hf: str = ""  # folder: the trained model is written there as a Hugging Face one
  export_hf_dtype: Any = None  # float32 | bfloat16 | float16; None: as trained
  export_hf_max_shard_size: Any = None  # e.g. "2GB": sharded safetensors with an index
  export_hf_adapter: bool = False  # LoRA: also the adapters as a PEFT folder (OUT/adapter)
  steps: int = 300
  log_every: int = 10
  eval_every: int = 50
  checkpoint_every: int = 50
  keep_checkpoints: int = 2
  progress: bool = True
  plot: bool = True
  log_records: bool = False  # WORKDIR/records/process_P.jsonl: each step's groups (exact resume)
  nonfinite: str = "stop"  # a non-finite loss or gradient: stop | skip (the update is dropped)
  tie_accuracy: str = "half"  # a tie in rewards/accuracy: half a win | loss (TRL; docs/trl.md)
  online: OnlineConfig = OnlineConfig()

  @functools.cached_property
  def loss_spec(self) -> losses.LossSpec:
    """The loss flag resolved: the one place a run turns `loss` into a function."""
    return losses.resolve(self.loss, self.loss_hparams)
