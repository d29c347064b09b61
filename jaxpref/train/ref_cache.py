"""An on-disk cache of precomputed reference log-probs, keyed by everything they depend on.

The key hashes the reference weights (their bytes), the data files (every shard's bytes
and name), the field mapping, the tokenizer file the run actually loads (a folder's
tokenizer.json or .model), the chat template it renders message lists with, and every
setting that changes the token layout or the numbers (format, max_len, group_size,
shared-prompt packing, log-prob path). A run with any of these
different computes afresh and writes a new entry; it never reuses a stale one. Each entry
stores its key's parts beside the array, and a read checks them again.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

_CHUNK = 1 << 24


def file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
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
  from jaxpref.data.sources import resolve
  h = hashlib.sha256()
  for f in resolve(path)[0]:
    h.update(f"{os.path.basename(f)}|{file_digest(f)}\n".encode())
  return h.hexdigest()


def _tokenization(cfg) -> tuple[str, str]:
  """Digests of the tokenizer file and of the chat template source the run resolves."""
  from jaxpref.data import chat_template
  from jaxpref.data.tokenizer import Tokenizer
  tok = Tokenizer.load(cfg.data.tokenizer)
  template = chat_template.resolve(getattr(cfg.data, "chat_template", "none"), tok)
  source = template.source if template is not None else ""
  return file_digest(tok.path), hashlib.sha256(source.encode()).hexdigest()


def key_parts(cfg, data_path: str, weights: str) -> dict:
  tokenizer, template = _tokenization(cfg)
  return {
      "weights": weights,
      "data": data_digest(data_path),
      "fields": cfg.data.fields,
      "tokenizer": tokenizer,
      "chat_template": template,
      "format": cfg.data.format,
      "skip_invalid": cfg.data.skip_invalid,
      "max_len": cfg.data.max_len,
      "group_size": cfg.data.group_size,
      "shared_prompt": cfg.data.shared_prompt,
      "logps": [cfg.logps.impl, cfg.logps.fused_lm_head],
      "version": 2,
      # Another --truncation/--max_prompt_len lays out (or keeps) other rows; the default
      # adds nothing, so caches written before these flags existed stay valid.
      **({} if (cfg.data.truncation, cfg.data.max_prompt_len) == ("keep_end", 0) else
         {"truncation": [cfg.data.truncation, cfg.data.max_prompt_len]}),
  }


def _entry(cache_dir: str, parts: dict) -> str:
  digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
  return os.path.join(cache_dir, f"ref_logps_{digest}.npz")


def load(cache_dir: str, parts: dict, shape: tuple[int, ...]) -> np.ndarray | None:
  """The cached array for these key parts, or None (absent, or stored under other parts)."""
  path = _entry(cache_dir, parts)
  if not os.path.exists(path):
    return None
  with np.load(path) as z:
    stored = json.loads(str(z["key"]))
    if stored != parts or z["ref_logps"].shape != tuple(shape):
      return None
    return z["ref_logps"]


def save(cache_dir: str, parts: dict, ref_logps: np.ndarray) -> str:
  """Writes atomically (temp file + rename), so a killed run leaves no half entry."""
  os.makedirs(cache_dir, exist_ok=True)
  path = _entry(cache_dir, parts)
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, ref_logps=ref_logps, key=np.array(json.dumps(parts, sort_keys=True)))
  os.replace(tmp, path)
  return path
