"""An on-disk cache of precomputed reference log-probs, keyed by everything they depend on.

The key hashes the reference weights (their bytes), the whole model config (the same
weights under another rope_theta, activation or softcap give other log-probs), the data
files (every shard's bytes and name), the field mapping, the tokenizer file the run
actually loads (a folder's tokenizer.json or .model), the chat template it renders message
lists with, and every setting that changes the token layout or the numbers (format,
max_len, truncation, max_prompt_len, group_size, shared-prompt packing, batching, log-prob
path). A run with any of these different computes afresh and writes a new entry; it never
reuses a stale one. Each entry stores its key's parts beside the array, and a read checks
them again. An entry that cannot be read (a torn or garbled file) is a miss: `load` says so
in `notes` and the run recomputes and rewrites it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from typing import Any, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxpref import paths
from jaxpref.data import chat_template
from jaxpref.data.sources import resolve
from jaxpref.data.tokenizer import Tokenizer

_CHUNK = 1 << 24


def file_digest(path: str) -> str:
  h = hashlib.sha256()
  with paths.open(path, "rb") as f:
    while block := f.read(_CHUNK):
      h.update(block)
  return h.hexdigest()


def params_digest(params: Any) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes (fetched leaf by leaf)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      arr = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))  # multi-host
    else:
      arr = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


def data_digest(path: str) -> str:
  """One digest of every file a data path names (a file, a folder or a glob of shards), in
  reading order, with their names, so a renamed or reordered shard is a different key."""
  h = hashlib.sha256()
  for f in resolve(path)[0]:
    h.update(f"{os.path.basename(f)}|{file_digest(f)}\n".encode())
  return h.hexdigest()


def _tokenization(cfg) -> tuple[str, str]:
  """Digests of the tokenizer file and of the chat template source the run resolves."""
  tok = Tokenizer.load(cfg.data.tokenizer)
  template = chat_template.resolve(getattr(cfg.data, "chat_template", "none"), tok)
  source = template.source if template is not None else ""
  return file_digest(tok.path), hashlib.sha256(source.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
  """A config value as JSON (dataclasses as dicts, anything else exotic by repr)."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def key_parts(cfg, data_path: str, weights: str) -> dict:
  tokenizer, template = _tokenization(cfg)
  d = cfg.data
  return {
      "weights": weights,
      # Weights alone do not fix the numbers: rope_theta, the activation, softcaps,
      # norm_eps... change the forward pass over the same bytes.
      "model": _jsonable(cfg.model),
      "data": data_digest(data_path),
      "fields": d.fields,
      "tokenizer": tokenizer,
      "chat_template": template,
      "format": d.format,
      "skip_invalid": d.skip_invalid,
      "max_len": d.max_len,
      "group_size": d.group_size,
      "shared_prompt": d.shared_prompt,
      "batching": [d.batching, d.bucket_multiple, d.pack_groups],
      "logps": [cfg.logps.impl, cfg.logps.fused_lm_head],
      "version": 3,  # 2 keyed on the weights' bytes only: its entries are never reused
      # The default policy adds nothing (the key of a default run keeps its shape).
      **({} if (d.truncation, d.max_prompt_len) == ("keep_end", 0) else
         {"truncation": [d.truncation, d.max_prompt_len]}),
  }


def _entry(cache_dir: str, parts: dict) -> str:
  digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
  return paths.join(cache_dir, f"ref_logps_{digest}.npz")


def load(cache_dir: str, parts: dict, shape: tuple[int, ...],
         notes: Optional[list] = None) -> np.ndarray | None:
  """The cached array for these key parts, or None (absent, stored under other parts, or
  unreadable: then a line saying so is appended to `notes`, and the caller recomputes)."""
  path = _entry(cache_dir, parts)
  if not paths.exists(path):
    return None
  try:
    with paths.open(path, "rb") as f, np.load(f) as z:
      stored = json.loads(str(z["key"]))
      if stored != parts or z["ref_logps"].shape != tuple(shape):
        return None
      return np.asarray(z["ref_logps"])
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    note = (f"{path}: unreadable reference cache entry ({type(e).__name__}: {e}); "
            "recomputing it")
    if notes is not None:
      notes.append(note)
    logging.warning(note)
    return None


def save(cache_dir: str, parts: dict, ref_logps: np.ndarray) -> str:
  """Writes atomically (temp file + rename; a gs:// object is written whole), so a killed run
  leaves no half entry."""
  paths.makedirs(cache_dir)
  path = _entry(cache_dir, parts)
  if paths.is_remote(path):
    with paths.open(path, "wb") as f:
      np.savez(f, ref_logps=ref_logps, key=np.array(json.dumps(parts, sort_keys=True)))
    return path
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, ref_logps=ref_logps, key=np.array(json.dumps(parts, sort_keys=True)))
  os.replace(tmp, path)
  return path
