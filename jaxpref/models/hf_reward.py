"""Reward models from and to Hugging Face folders.

`--role=reward --init_from=DIR` reads either a causal-LM folder (its decoder, under a
freshly drawn head) or a `*ForSequenceClassification` folder of a family in
`hf_config.FAMILIES`: its decoder and its head `score.weight [num_labels, D]` (no bias), so
`num_labels` is the reward dimension. HF's head reads the final-norm hidden state at the
last non-padding token, as `heads.RewardModel` does, so the rewards agree.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxpref.models import convert, hf
from jaxpref.models.decoder import Decoder, ModelConfig
from jaxpref.models.hf_config import UnsupportedCheckpoint, config_to_hf, family_of

SCORE = "score.weight"


def _seq_cls_config(path: str) -> dict | None:
  """config.json of a sequence-classification folder at `path`, else None."""
  if not os.path.isfile(os.path.join(path, "config.json")):
    return None
  config = hf.read_json_config(path)
  return config if hf.sequence_classification(config) else None


def num_labels(config: dict) -> int:
  """As transformers counts them: id2label's entries, else num_labels, else its default 2."""
  if config.get("id2label"):
    return len(config["id2label"])
  return int(config.get("num_labels", 2))


def reward_dim(init_from: str, requested: int, explicit: bool) -> int:
  """--reward_dim for a run: a sequence-classification `init_from` sets it (num_labels);
  an explicit --reward_dim that contradicts it raises."""
  config = _seq_cls_config(init_from) if init_from else None
  if config is None:
    return requested
  n = num_labels(config)
  if explicit and requested != n:
    raise ValueError(f"--reward_dim={requested} but {init_from} is a "
                     f"{config['architectures'][0]} with num_labels={n}")
  return n


def load(path: str, cfg: ModelConfig) -> tuple[Decoder, np.ndarray | None]:
  """(decoder, head [D, E] or None) from `path`: None for a causal-LM (or jaxpref) folder,
  whose head is then drawn fresh; a sequence-classification folder's `score.weight`."""
  if _seq_cls_config(path) is None:
    return convert.load_pretrained(path, cfg), None
  tensors = hf.read_tensors(path)
  head = sorted(k for k in tensors if k.startswith("score."))
  if head != [SCORE]:
    raise UnsupportedCheckpoint(f"{path}: a sequence-classification head is {SCORE} alone "
                                f"(no bias); found {head}")
  score = tensors.pop(SCORE)
  if score.ndim != 2 or score.shape[1] != cfg.d_model:
    raise UnsupportedCheckpoint(f"{path}: {SCORE} has shape {score.shape}, expected "
                                f"[num_labels, {cfg.d_model}]")
  decoder = hf.model_from_tensors(cfg, tensors, where=path)
  return decoder, np.asarray(score, np.float32).T


def init_from(cfg, params: Any) -> Any:
  """The reward model's initial `params` (a State in its shardings) with the decoder, and
  a sequence-classification folder's head, of `cfg.init_from` placed alike."""
  decoder, head = load(cfg.init_from, cfg.model)
  kind = getattr(cfg, "reward_head", "linear")
  if head is not None and kind != "linear":
    raise ValueError(f"--init_from={cfg.init_from} holds a linear score head, but "
                     f"--reward_head={kind}; start that head from a causal-LM folder")
  if head is not None and getattr(cfg, "reward_pool", "last") != "last":
    raise ValueError(f"--init_from={cfg.init_from} holds a score head trained on the last "
                     f"token, but --reward_pool={cfg.reward_pool}; use --reward_pool=last")
  placed = lambda tree, like: jax.device_put(tree, jax.tree.map(lambda x: x.sharding, like))
  params["decoder"] = placed(nnx.split(decoder)[1], params["decoder"])
  if head is None:
    return params
  want = params["head"][...].shape
  if head.shape != want:
    raise ValueError(f"{cfg.init_from}: {SCORE} gives a head of shape {head.shape}, the "
                     f"model has {want} (--reward_dim={cfg.reward_dim})")
  params["head"][...] = placed(head, params["head"][...])
  return params


def save(params: Any, cfg: ModelConfig, path: str, pad_token_id: int | None = None) -> None:
  """Writes a reward model's params ({"decoder", "head"}, a State or pure dict) as the
  family's `*ForSequenceClassification` folder. transformers pools at the last token that
  is not `pad_token_id`, so that id must be the padding one, and not EOS."""
  pure = hf._pure_state(params)
  tensors = hf.to_tensors(pure["decoder"], cfg)
  tensors.pop("lm_head.weight", None)  # a classifier has no LM head
  head = np.asarray(jax.device_get(pure["head"]))
  tensors[SCORE] = np.ascontiguousarray(head.T.astype(next(iter(tensors.values())).dtype))
  family = family_of(cfg)
  config = config_to_hf(cfg, tensors[SCORE].dtype.name)
  labels = head.shape[1]
  config.update(architectures=[hf.seq_cls_architecture(family)], num_labels=labels,
                id2label={str(i): f"LABEL_{i}" for i in range(labels)},
                label2id={f"LABEL_{i}": i for i in range(labels)})
  if pad_token_id is not None:
    config["pad_token_id"] = int(pad_token_id)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(path, hf.SINGLE_FILE), metadata={"format": "pt"})

