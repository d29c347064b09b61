"""Reward models from and to Hugging Face folders.

`--role=reward --init_from=DIR` reads either a causal-LM folder (its decoder, under a
freshly drawn head) or a `*ForSequenceClassification` folder of a family in
`hf_config.FAMILIES`: its decoder and its head `score.weight [num_labels, D]` (no bias), so
`num_labels` is the reward dimension. HF's head reads the final-norm hidden state at the
rightmost token that is not `pad_token_id` (transformers 5, `GenericForSequenceClassification`),
`heads.RewardModel` at the last real token: the same one unless the pad id is the EOS that
closes every row, where HF reads the token before it; `read_rule` gives the `skip_id` that
makes ours read that one too, on import and on export.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxpref.models import convert, hf, hf_write
from jaxpref.models.decoder import Decoder, ModelConfig
from jaxpref.models.hf_config import (FAMILIES, UnsupportedCheckpoint, config_to_hf, family_of,
                                      with_defaults)

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


def read_rule(init_from: str, tok) -> tuple[int | None, int, str | None]:
  """(pad_token_id, skip_id, start-up note) of a reward run: the pad id transformers pools
  with (a sequence-classification `init_from`'s, with its family's default when config.json
  omits it, else the one our rows pad with), and `skip_id` = that id when it is the EOS that
  closes our rows (else -1), for `heads.RewardModel(skip_id=)`."""
  config = _seq_cls_config(init_from) if init_from else None
  if config is not None:
    pad = with_defaults(config, FAMILIES[config["model_type"]].defaults)["pad_token_id"]
  else:  # the id our rows pad with (0 when the tokenizer has none), so batches score alike
    pad = tok.pad_id
  if pad is None or pad != tok.eos_id:
    return pad, -1, None
  return pad, pad, (f"pad_token_id = eos_token_id = {pad}: as transformers' "
                    f"*ForSequenceClassification, the reward head reads the last token that is "
                    f"not {pad}, the one before the closing EOS")


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


def save(params: Any, cfg: ModelConfig, path: str, pad_token_id: int | None = None,
         eos_token_id: int | None = None, bos_token_id: int | None = None, skip_id: int = -1,
         dtype=None, max_shard_size=None) -> list[str]:
  """Writes a reward model's params ({"decoder", "head"}, a State or pure dict) as the
  family's `*ForSequenceClassification` folder (`dtype`, `max_shard_size` as `hf.save`).
  transformers pools at the rightmost token that is not `pad_token_id`: a pad id equal to
  the EOS is refused unless the model read the token before it (`skip_id`, `read_rule`)."""
  if pad_token_id is not None and pad_token_id == eos_token_id and skip_id != pad_token_id:
    raise ValueError(f"pad_token_id = eos_token_id = {pad_token_id}: transformers would score "
                     f"the token before the closing EOS, but this model read the EOS itself "
                     f"(build it with skip_id={pad_token_id}, hf_reward.read_rule)")
  pure = hf._pure_state(params)
  tensors = hf.to_tensors(pure["decoder"], cfg, dtype)
  tensors.pop("lm_head.weight", None)  # a classifier has no LM head
  head = np.asarray(jax.device_get(pure["head"]))
  tensors[SCORE] = np.ascontiguousarray(head.T.astype(next(iter(tensors.values())).dtype))
  family = family_of(cfg)
  config = config_to_hf(cfg, tensors[SCORE].dtype.name)
  labels = head.shape[1]
  config.update(architectures=[hf.seq_cls_architecture(family)], num_labels=labels,
                id2label={str(i): f"LABEL_{i}" for i in range(labels)},
                label2id={f"LABEL_{i}": i for i in range(labels)})
  ids = hf_write.token_ids(bos_token_id, eos_token_id, pad_token_id)
  return hf.write_folder(config, tensors, path, max_shard_size, ids)
