"""Models that reward sources load by path, each with its own tokenizer.

* `load_reward_model(path)`: a `--role=reward` run folder (its newest checkpoint) or a
  Hugging Face `*ForSequenceClassification` folder -> `RewardScorer`, which scores
  (prompt, response) texts with the jitted reward-model forward: a scalar reward, or a GPM
  embedding (and, for `--reward_head=gpm_gated`, the prompt's eigenvalues).
* `load_decoder(path)`: a policy run folder, a jaxpref-convert folder or a Hugging Face
  causal-LM folder -> `model_rewards.LM` (the LLM judge's decoder).

A run folder is read from its own files: `run.json`'s settings (the model shape, head and
tokenizer; written by train/workdir.py) and the newest `checkpoints/<step>/state` (orbax,
train/checkpoint.py). This layer sits below `train`, so it reads those files instead of
importing the loop's code. Responses arrive as text and are tokenized with the loaded
model's tokenizer, the one it was trained with, whether or not the policy shares it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref.cli_errors import FlagError
from jaxpref.data import Tokenizer
from jaxpref.data.pairs import tokenize_sequence
from jaxpref.losses.reward import FIRST_CHANNEL_REWARD
from jaxpref.models import convert, hf_reward
from jaxpref.models.decoder import Decoder, ModelConfig
from jaxpref.models.heads import RewardModel
from jaxpref.rewards.model_rewards import LM

ROW_MULTIPLE = 64  # rows pad to a multiple of this: a few compiled shapes, not one per length
DEFAULT_MAX_LEN = 2048  # a folder's rows are cut here unless its config says less


def is_run(path: str) -> bool:
  """A jaxpref-train run folder (run.json and checkpoints/)."""
  return (os.path.isfile(os.path.join(path, "run.json"))
          and os.path.isdir(os.path.join(path, "checkpoints")))


def run_settings(path: str, flag: str) -> dict:
  """run.json's settings of the run folder `path` ({flag name: value})."""
  try:
    with open(os.path.join(path, "run.json")) as f:
      return json.load(f)["settings"]
  except (OSError, ValueError, KeyError) as e:
    raise FlagError(f"{flag}={path}: cannot read its run.json settings ({e})") from None


def _model_config(settings: dict) -> ModelConfig:
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k[len("model."):]: v for k, v in settings.items()
                        if k.startswith("model.") and k[len("model."):] in names})


def _pure(tree: Any) -> Any:
  """An orbax-restored nnx State ({..., "value": array}) as a pure dict of arrays."""
  if isinstance(tree, dict):
    if set(tree) == {"value"}:
      return tree["value"]
    return {k: _pure(v) for k, v in tree.items()}
  return tree


def run_params(path: str, make: Any, flag: str) -> tuple[Any, Any, int]:
  """(graphdef, params, step): the newest checkpoint of the run at `path` restored into the
  module `make()` builds (built abstractly: no weights are drawn)."""
  folder = os.path.join(path, "checkpoints")
  steps = sorted((int(d) for d in os.listdir(folder) if d.isdigit()), reverse=True)
  if not steps:
    raise FlagError(f"{flag}={path}: no checkpoint in {folder} (train the run first)")
  import orbax.checkpoint as ocp  # heavy; only a run folder needs it
  state = os.path.join(folder, str(steps[0]), "state")
  try:
    restored = ocp.StandardCheckpointer().restore(os.path.abspath(state))
  except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds; one line
    raise FlagError(f"{flag}={path}: {state} does not restore ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:200]})") from None
  try:
    # a run with --rounds or reference syncing saves {"train": state, "ref": ...}
    graphdef, params = assemble(make, _pure(restored.get("train", restored)["params"]))
  except (KeyError, ValueError, TypeError) as e:
    raise FlagError(f"{flag}={path}: checkpoint {steps[0]}'s params do not fit the model "
                    f"its run.json describes ({e})") from None
  return graphdef, params, steps[0]


def assemble(make: Any, pure: Any) -> tuple[Any, Any]:
  """(graphdef, params) of the module `make()` builds (abstractly: no weights are drawn)
  holding the arrays of the pure dict `pure`."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  nnx.replace_by_pure_dict(abstract, pure)
  return graphdef, jax.tree.map(jnp.asarray, abstract)


def _limit(max_len: int, cfg: ModelConfig) -> int:
  return max_len or min(cfg.max_len, DEFAULT_MAX_LEN)


def _rows(tok, prompts, responses, max_len: int) -> tuple[np.ndarray, ...]:
  """(tokens, loss mask, segment ids) [N, W] laid out as training lays out a pair's row,
  W the longest row rounded up to ROW_MULTIPLE (at most max_len)."""
  rows = [tokenize_sequence(tok, x, y, max_len)[:3] for x, y in zip(prompts, responses)]
  longest = max(int((r[2] > 0).sum()) for r in rows)
  width = min(max_len, -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE)
  return tuple(np.stack([r[i][:width] for r in rows]) for i in range(3))


@dataclasses.dataclass
class RewardScorer:
  """A reward model with its tokenizer: `outputs(prompts, responses)` -> (float64 [N, E]
  rewards or GPM embeddings, float64 [N, k] GPM gate or None)."""

  graphdef: Any
  params: Any
  tok: Any
  kind: str  # scalar | gpm | gpm_gated
  max_len: int
  path: str
  batch_size: int = 32

  def __post_init__(self):
    def fn(params, tokens, mask, seg):
      model = nnx.merge(self.graphdef, params)
      h = model.decoder.hidden(tokens, segment_ids=seg)
      out = model.read_out(h, seg, tokens)
      gate = model.gate_of(h, mask) if self.kind == "gpm_gated" else out[:, :0]
      return out, gate
    self._fn = jax.jit(fn)

  def outputs(self, prompts: Sequence[str], responses: Sequence[str]):
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    outs, gates = [], []
    for start in range(0, len(prompts), self.batch_size):
      xs, ys = prompts[start:start + self.batch_size], responses[start:start + self.batch_size]
      n = len(xs)
      pad = self.batch_size - n  # one batch shape per row width
      tokens, mask, seg = _rows(self.tok, list(xs) + [xs[0]] * pad, list(ys) + [ys[0]] * pad,
                                self.max_len)
      out, gate = self._fn(self.params, tokens, mask, seg)
      outs.append(np.asarray(out, np.float64)[:n])
      gates.append(np.asarray(gate, np.float64)[:n])
    out, gate = np.concatenate(outs), np.concatenate(gates)
    return (out[:, :1] if self.kind == "scalar" else out), (
        gate if self.kind == "gpm_gated" else None)

  def describe(self, policy_tok=None) -> str:
    same = policy_tok is not None and os.path.realpath(str(getattr(policy_tok, "path", ""))) \
        == os.path.realpath(str(getattr(self.tok, "path", "")))
    return (f"reward model {self.path} ({self.kind}); responses scored from their text under "
            f"its tokenizer {getattr(self.tok, 'path', '?')}"
            + (" (the policy's)" if same else " (not the policy's: re-tokenized)"))


def _kind(head: str, dim: int, loss: str, where: str) -> str:
  if head == "gpm_gated":
    return "gpm_gated"
  if head != "linear":
    raise FlagError(f"{where}: --reward_head={head} gives no reward or GPM embedding per "
                    "response (use a linear or gpm_gated head)")
  if dim == 1 or loss in FIRST_CHANNEL_REWARD:
    return "scalar"
  return "gpm"


def load_reward_model(path: str, flag: str = "--online.reward_model",
                      max_len: int = 0) -> RewardScorer:
  """A reward run folder or a Hugging Face sequence-classification folder as a scorer."""
  if not os.path.isdir(path):
    raise FlagError(f"{flag}={path}: no such folder")
  if is_run(path):
    s = run_settings(path, flag)
    if s.get("role") != "reward":
      raise FlagError(f"{flag}={path}: a --role={s.get('role')} run, not a reward model")
    cfg = _model_config(s)
    tok = _tokenizer(s.get("tokenizer") or "", flag, path)
    skip = hf_reward.read_rule(s.get("init_from") or "", tok)[1]
    head, dim = s.get("reward_head", "linear"), int(s.get("reward_dim", 1))
    kind = _kind(head, dim, s.get("loss", ""), f"{flag}={path}")
    make = lambda: RewardModel(cfg, dim, head=head, prototypes=s.get("pal_prototypes", 2),
                               users=s.get("pal_users", 1), pool=s.get("reward_pool", "last"),
                               rngs=nnx.Rngs(0), skip_id=skip)
    graphdef, params, _ = run_params(path, make, flag)
    return RewardScorer(graphdef, params, tok, kind, max_len or int(s.get("max_len") or 512),
                        path)
  if hf_reward._seq_cls_config(path) is None:
    raise FlagError(f"{flag}={path}: neither a --role=reward run folder (run.json, "
                    "checkpoints/) nor a Hugging Face *ForSequenceClassification folder")
  try:
    cfg = convert.run_config(path, {})
    decoder, head = hf_reward.load(path, cfg)
  except (ValueError, OSError) as e:
    raise FlagError(f"{flag}={path}: {' '.join(str(e).split())}") from None
  tok = _tokenizer(path, flag, path)
  skip = hf_reward.read_rule(path, tok)[1]
  graphdef, params = assemble(
      lambda: RewardModel(cfg, head.shape[1], rngs=nnx.Rngs(0), skip_id=skip),
      {"decoder": nnx.split(decoder)[1].to_pure_dict(), "head": head})
  return RewardScorer(graphdef, params, tok, _kind("linear", head.shape[1], "", path),
                      _limit(max_len, cfg), path)


def _tokenizer(where: str, flag: str, path: str):
  try:
    return Tokenizer.load(where)
  except (ValueError, OSError) as e:
    raise FlagError(f"{flag}={path}: its tokenizer {where!r} does not load "
                    f"({' '.join(str(e).split())})") from None


def load_decoder(path: str, flag: str, max_len: int = 0) -> LM:
  """A policy run folder (its newest checkpoint), or a jaxpref-convert or Hugging Face
  causal-LM folder, as a `model_rewards.LM`."""
  if not os.path.isdir(path):
    raise FlagError(f"{flag}={path}: no such folder")
  if is_run(path):
    s = run_settings(path, flag)
    if s.get("role") not in ("policy", "online"):
      raise FlagError(f"{flag}={path}: a --role={s.get('role')} run, not a decoder")
    if s.get("lora") is not None:
      raise FlagError(f"{flag}={path}: a LoRA run holds adapters only; export it with "
                      "--export_hf=DIR and pass DIR")
    cfg = _model_config(s)
    graphdef, params, _ = run_params(path, lambda: Decoder(cfg, rngs=nnx.Rngs(0)), flag)
    return LM(graphdef, params, _tokenizer(s.get("tokenizer") or "", flag, path),
              max_len or int(s.get("max_len") or 512))
  try:
    cfg = convert.run_config(path, {})
    graphdef, params = nnx.split(convert.load_pretrained(path, cfg))
  except (ValueError, OSError) as e:
    raise FlagError(f"{flag}={path}: {' '.join(str(e).split())}") from None
  return LM(graphdef, params, _tokenizer(path, flag, path), _limit(max_len, cfg))
