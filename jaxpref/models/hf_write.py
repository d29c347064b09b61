"""Writing Hugging Face folders: safetensors (one file, or shards with an index), the token
ids of config.json and generation_config.json, and PEFT LoRA adapters.

Shards follow transformers' `save_pretrained`: tensors in order, a new shard once the next
tensor would take the current one over `max_shard_size` (a tensor larger than that gets a
shard of its own), files `model-00001-of-0000N.safetensors` and `model.safetensors.index.json`
mapping every tensor to its file; one shard is written as the single `model.safetensors`.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
ADAPTER_CONFIG, ADAPTER_FILE = "adapter_config.json", "adapter_model.safetensors"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str | None) -> int | None:
  """Bytes of a shard size: an int, or "5GB" / "500MB" / "2GiB" as transformers reads them
  (GB = 10^9, GiB = 2^30); None or 0: no sharding."""
  if size is None or isinstance(size, int):
    return size or None
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
  if m is None:
    raise ValueError(f"max shard size {size!r}: expected bytes or a size like 5GB, 500MB, 2GiB")
  return int(float(m.group(1)) * _UNITS[m.group(2) or ""]) or None


def plan_shards(tensors: dict[str, np.ndarray], max_bytes: int | None) -> list[list[str]]:
  """Tensor names per shard, in order."""
  shards, size = [[]], 0
  for name, array in tensors.items():
    if max_bytes and shards[-1] and size + array.nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += array.nbytes
  return shards


def write_tensors(tensors: dict[str, np.ndarray], path: str,
                  max_shard_size: int | str | None = None) -> list[str]:
  """Writes `tensors` as one file or as shards with an index; earlier weight files in `path`
  are removed first, since transformers would read a stale single file before an index.
  Returns the files written."""
  os.makedirs(path, exist_ok=True)
  for old in glob.glob(os.path.join(path, "model*.safetensors")) + [
      os.path.join(path, INDEX_FILE)]:
    if os.path.isfile(old):
      os.remove(old)
  shards = plan_shards(tensors, parse_size(max_shard_size))
  # transformers refuses safetensors files without a "format" entry in their metadata.
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(tensors, os.path.join(path, SINGLE_FILE), metadata=meta)
    return [SINGLE_FILE]
  files, weight_map = [], {}
  for i, names in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({n: tensors[n] for n in names}, os.path.join(path, file), metadata=meta)
    files.append(file)
    weight_map.update({n: file for n in names})
  index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
           "weight_map": weight_map}
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2)
  return files + [INDEX_FILE]


def token_ids(bos=None, eos=None, pad=None) -> dict:
  """config.json's token-id keys; a negative or absent id (no such token) is null."""
  clean = lambda i: i if isinstance(i, list) else (int(i) if i is not None and i >= 0 else None)
  return dict(zip(TOKEN_IDS, (clean(bos), clean(eos), clean(pad))))


def write_generation_config(path: str, ids: dict) -> None:
  """generation_config.json with the token ids, so `generate` stops at EOS and pads; a file
  already there (the source checkpoint's, with its sampling defaults) keeps its values and
  gains only the ids it lacks."""
  file = os.path.join(path, GENERATION_FILE)
  config = {}
  if os.path.isfile(file):
    with open(file) as f:
      config = json.load(f)
  for key, value in ids.items():
    if config.get(key) is None and value is not None:
      config[key] = value
  with open(file, "w") as f:
    json.dump(config, f, indent=2)


# ---------------------------------------------------------------------------------------------
# PEFT LoRA adapters
# ---------------------------------------------------------------------------------------------

# jaxpref weight name -> the torch module holding it, under model.layers.{i}.
_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
            "down": "mlp.down_proj"}


def module_name(path: str) -> str:
  """The torch module of an adapted weight: `layers/0/attn/q` -> model.layers.0.self_attn.q_proj."""
  parts = path.split("/")
  if path == "lm_head":
    return "lm_head"
  if len(parts) == 4 and parts[0] == "layers" and parts[-1] in _MODULES:
    return f"model.layers.{parts[1]}.{_MODULES[parts[-1]]}"
  raise ValueError(f"a PEFT adapter file holds LoRA on linear layers; the adapter on {path} "
                   f"has no such form (adapt {', '.join(_MODULES)} or lm_head)")


def write_peft_adapter(adapters: dict, rank: int, alpha: float, path: str,
                       base_model: str = "", dtype=None) -> None:
  """`adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained`
  loads onto the base. Ours is W + (alpha / r) A @ B with A [*in, r], B [r, *out] on [in,
  out] weights; PEFT's is W + (lora_alpha / r) B' A' on torch's [out, in], so A' = A^T and
  B' = B^T with the head dims flattened, and alpha and r carry over as they are."""
  tensors, targets = {}, []
  for p, ad in sorted(adapters.items()):
    a, b = (np.asarray(ad[k]) for k in ("lora_a", "lora_b"))
    module = module_name(p)
    targets.append(module)
    prefix = f"base_model.model.{module}"
    cast = (lambda x: x.astype(dtype)) if dtype is not None else (lambda x: x)
    tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(cast(a.reshape(-1, rank).T))
    tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(cast(b.reshape(rank, -1).T))
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
            "base_model_name_or_path": base_model or None, "modules_to_save": None}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(path, ADAPTER_FILE), metadata={"format": "pt"})
