"""Hugging Face Llama checkpoints (config.json + safetensors) to and from the jaxpref Decoder.

Only `LlamaForCausalLM` maps onto `Decoder` exactly; anything else it cannot represent (other
architectures, biases, RoPE scaling, non-SiLU activations) is refused by name rather than
loaded into a model that would silently compute something else. Our RoPE is the same
rotate-half convention as HF Llama, so q/k weights need no permutation, only the
transposes between torch's [out, in] Linear weights and our [in, ...] einsum weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Union

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers np.dtype("bfloat16"), which safetensors.numpy needs
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxpref.models.decoder import Decoder, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# HF config keys whose only supported value is the one listed (the Decoder has no such feature).
_FIXED = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
          "partial_rotary_factor": 1.0}
# Buffers some older checkpoints carry; RoPE frequencies are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class UnsupportedCheckpoint(ValueError):
  """The checkpoint is not something the jaxpref Decoder can represent exactly."""


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------


def _rope(hf: dict) -> tuple[float, dict]:
  """(theta, scaling dict or {}) from either the transformers-5 `rope_parameters` or the
  older top-level `rope_theta` + `rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = dict(hf.get("rope_scaling") or params)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  return float(theta), ({} if kind == "default" else {**scaling, "rope_type": kind})


def config_from_hf(hf: dict) -> ModelConfig:
  """ModelConfig from a parsed HF config.json; raises UnsupportedCheckpoint naming what differs."""
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or ["LlamaForCausalLM"]
  if model_type != "llama" or archs != ["LlamaForCausalLM"]:
    raise UnsupportedCheckpoint(
        f"unsupported architecture: model_type={model_type!r}, architectures={archs}; only "
        f"Llama checkpoints (model_type 'llama', LlamaForCausalLM) can be loaded")
  bad = [f"{k}={hf[k]!r} (supported: {v!r})" for k, v in _FIXED.items()
         if k in hf and hf[k] != v]
  theta, scaling = _rope(hf)
  if scaling and scaling["rope_type"] != "llama3":
    bad.append(f"RoPE scaling {scaling} (only unscaled RoPE and Llama 3.1 'llama3' scaling "
               f"are implemented)")
  if bad:
    raise UnsupportedCheckpoint("unsupported Llama features: " + "; ".join(bad))
  heads = hf["num_attention_heads"]
  return ModelConfig(
      **_llama3_fields(scaling, hf.get("max_position_embeddings", 2048)),
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"], n_heads=heads,
      n_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      d_ff=hf["intermediate_size"], rope_theta=theta, norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_len=hf.get("max_position_embeddings", 2048))


def _llama3_fields(scaling: dict, max_len: int) -> dict:
  if not scaling:
    return {}
  missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in scaling]
  if missing:
    raise UnsupportedCheckpoint(f"'llama3' RoPE scaling {scaling} lacks {missing}")
  return dict(rope_scaling_factor=float(scaling["factor"]),
              rope_low_freq_factor=float(scaling["low_freq_factor"]),
              rope_high_freq_factor=float(scaling["high_freq_factor"]),
              rope_original_max_len=int(scaling.get("original_max_position_embeddings",
                                                    max_len)))


def _rope_to_hf(cfg: ModelConfig) -> dict:
  if cfg.rope_scaling_factor == 1.0:
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}
  return {"rope_type": "llama3", "rope_theta": cfg.rope_theta,
          "factor": cfg.rope_scaling_factor, "low_freq_factor": cfg.rope_low_freq_factor,
          "high_freq_factor": cfg.rope_high_freq_factor,
          "original_max_position_embeddings": cfg.rope_original_max_len}


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
  """config.json for `LlamaForCausalLM`. Both the transformers-5 `rope_parameters` and the
  legacy top-level `rope_theta` (+ `rope_scaling`) are written, so older transformers read
  it too."""
  rope = _rope_to_hf(cfg)
  legacy_scaling = None if rope["rope_type"] == "default" else {
      k: v for k, v in rope.items() if k != "rope_theta"}
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.d_ff, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": rope, "rope_scaling": legacy_scaling,
      "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_len,
      "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "torch_dtype": dtype, "dtype": dtype,
  }


def read_config(path: str) -> ModelConfig:
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model folder)")
  with open(file) as f:
    return config_from_hf(json.load(f))


# ---------------------------------------------------------------------------------------------
# Tensor names and layouts
# ---------------------------------------------------------------------------------------------

# One mapped tensor: HF name, path in the Decoder's pure state dict, and the layout changes
# (HF array -> ours, ours -> HF).
Entry = tuple[str, tuple, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _same(x):
  return x


def _transpose(x):
  return x.T


def _in_heads(heads: int, dh: int):
  """q/k/v: torch [H*Dh, D] <-> ours [D, H, Dh]."""
  return (lambda w: w.T.reshape(w.shape[1], heads, dh),
          lambda w: w.reshape(w.shape[0], heads * dh).T)


def _out_heads(heads: int, dh: int):
  """o: torch [D, H*Dh] <-> ours [H, Dh, D]."""
  return (lambda w: w.T.reshape(heads, dh, w.shape[0]),
          lambda w: w.reshape(heads * dh, w.shape[2]).T)


def tensor_map(cfg: ModelConfig) -> list[Entry]:
  """Every HF tensor of a LlamaForCausalLM with this config, and where it lives in ours."""
  q = _in_heads(cfg.n_heads, cfg.head_dim)
  kv = _in_heads(cfg.n_kv_heads, cfg.head_dim)
  o = _out_heads(cfg.n_heads, cfg.head_dim)
  out: list[Entry] = [("model.embed_tokens.weight", ("embed",), _same, _same)]
  for i in range(cfg.n_layers):
    hf, us = f"model.layers.{i}.", ("layers", i)
    out += [
        (hf + "self_attn.q_proj.weight", us + ("attn", "q"), *q),
        (hf + "self_attn.k_proj.weight", us + ("attn", "k"), *kv),
        (hf + "self_attn.v_proj.weight", us + ("attn", "v"), *kv),
        (hf + "self_attn.o_proj.weight", us + ("attn", "o"), *o),
        (hf + "mlp.gate_proj.weight", us + ("mlp", "gate"), _transpose, _transpose),
        (hf + "mlp.up_proj.weight", us + ("mlp", "up"), _transpose, _transpose),
        (hf + "mlp.down_proj.weight", us + ("mlp", "down"), _transpose, _transpose),
        (hf + "input_layernorm.weight", us + ("attn_norm", "scale"), _same, _same),
        (hf + "post_attention_layernorm.weight", us + ("mlp_norm", "scale"), _same, _same),
    ]
  out.append(("model.norm.weight", ("final_norm", "scale"), _same, _same))
  if not cfg.tie_embeddings:
    out.append(("lm_head.weight", ("lm_head",), _transpose, _transpose))
  return out


# ---------------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------------


def _shard_files(path: str) -> list[str]:
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      return sorted(set(json.load(f)["weight_map"].values()))
  if os.path.isfile(os.path.join(path, SINGLE_FILE)):
    return [SINGLE_FILE]
  raise FileNotFoundError(
      f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints are "
      f"read; re-save a pytorch_model.bin with save_pretrained(safe_serialization=True))")


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a single-file or sharded safetensors checkpoint, as numpy (bf16 via
  ml_dtypes)."""
  tensors: dict[str, np.ndarray] = {}
  for name in _shard_files(path):
    with safe_open(os.path.join(path, name), framework="np") as f:
      for key in f.keys():
        tensors[key] = f.get_tensor(key)
  return tensors


def _check_names(cfg: ModelConfig, tensors: dict, entries: list[Entry], where: str) -> None:
  expected = {e[0] for e in entries}
  present = {k for k in tensors if not k.endswith(_IGNORED_SUFFIXES)}
  if cfg.tie_embeddings and "lm_head.weight" in present:
    # Some tied checkpoints store the head anyway; it must be the embedding to be dropped.
    if not np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
      raise UnsupportedCheckpoint(f"{where}: tie_word_embeddings is true but lm_head.weight "
                                  f"differs from model.embed_tokens.weight")
    present.discard("lm_head.weight")
  missing, unexpected = sorted(expected - present), sorted(present - expected)
  if missing or unexpected:
    raise UnsupportedCheckpoint(
        f"{where}: tensors do not match a LlamaForCausalLM with this config.json; "
        f"missing: {missing or 'none'}; unexpected: {unexpected or 'none'}")


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


# ---------------------------------------------------------------------------------------------
# load / save
# ---------------------------------------------------------------------------------------------


def _abstract(cfg: ModelConfig):
  """graphdef and shape-only state: no random init of a model about to be overwritten."""
  return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))


def model_from_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], dtype=jnp.float32,
                       where: str = "checkpoint") -> Decoder:
  entries = tensor_map(cfg)
  _check_names(cfg, tensors, entries, where)
  graphdef, state = _abstract(cfg)
  shapes = nnx.to_pure_dict(state)
  pure: dict = {}
  for name, path, to_ours, _ in entries:
    array = to_ours(tensors[name])
    want = _get(shapes, path).shape
    if array.shape != want:
      raise UnsupportedCheckpoint(f"{where}: {name} has shape {tensors[name].shape}, which "
                                  f"does not give {want} for this config.json")
    _set(pure, path, jnp.asarray(array, dtype))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def load(path: str, dtype=jnp.float32) -> tuple[ModelConfig, Decoder]:
  """(config, Decoder) from a local HF Llama folder (config.json + safetensors).

  `dtype` is the dtype of the loaded parameters and the model's compute dtype
  (bf16 checkpoints are upcast exactly to the float32 default).
  """
  cfg = read_config(path)
  name = jnp.dtype(dtype).name
  if name in ("float32", "bfloat16", "float16"):
    cfg = dataclasses.replace(cfg, dtype=name)
  return cfg, model_from_tensors(cfg, read_tensors(path), dtype, where=path)


def _pure_state(model_or_state: Union[nnx.Module, nnx.State, dict]) -> dict:
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state, nnx.Param)
  if isinstance(model_or_state, nnx.State):
    return nnx.to_pure_dict(model_or_state)
  return model_or_state


def to_tensors(model_or_state, cfg: ModelConfig, dtype=None) -> dict[str, np.ndarray]:
  """HF-named numpy tensors of a Decoder (or its Param state / pure dict)."""
  pure = _pure_state(model_or_state)
  out = {}
  for name, path, _, to_hf in tensor_map(cfg):
    array = np.asarray(jax.device_get(_get(pure, path)))
    if dtype is not None:
      array = array.astype(jnp.dtype(dtype))
    out[name] = np.ascontiguousarray(to_hf(array))
  return out


def save(model_or_state, config: ModelConfig, path: str, dtype=None) -> None:
  """Writes config.json and model.safetensors for `transformers.AutoModelForCausalLM`.

  `dtype` (e.g. jnp.bfloat16) casts the tensors; default: as held.
  """
  tensors = to_tensors(model_or_state, config, dtype)
  stored = next(iter(tensors.values())).dtype.name
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(config, stored), f, indent=2)
  # transformers refuses safetensors files without a "format" entry in their metadata.
  save_file(tensors, os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
