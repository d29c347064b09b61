"""Hugging Face checkpoints (config.json + safetensors) to and from the jaxpref Decoder.

The families in `hf_config.FAMILIES` (Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma, Gemma 2,
Gemma 3, Phi-3) map onto
`Decoder` exactly; anything else it cannot represent (other architectures, MLP biases, other RoPE
scalings or activations) is refused by name rather than loaded into a model that would
silently compute something else. Our RoPE is the same rotate-half convention as HF's, so
q/k weights need no permutation, only the transposes between torch's [out, in] Linear
weights and our [in, ...] einsum weights.
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

from jaxpref.models import hf_write
from jaxpref.models.decoder import Decoder, ModelConfig
from jaxpref.models.hf_config import (FAMILIES, UnsupportedCheckpoint, config_from_hf,  # noqa: F401
                                      config_to_hf, family_of)

SINGLE_FILE, INDEX_FILE = hf_write.SINGLE_FILE, hf_write.INDEX_FILE

# Buffers some older checkpoints carry; RoPE frequencies are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_json_config(path: str) -> dict:
  """The parsed config.json of a Hugging Face folder."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model folder)")
  with open(file) as f:
    return json.load(f)


def sequence_classification(hf_config: dict) -> bool:
  """Whether the config is a `*ForSequenceClassification` of a family we read."""
  family = FAMILIES.get(hf_config.get("model_type"))
  return family is not None and hf_config.get("architectures") == [seq_cls_architecture(family)]


def seq_cls_architecture(family) -> str:
  return family.seq_cls or family.architecture.replace("ForCausalLM", "ForSequenceClassification")


def check_causal(path: str) -> None:
  """Raises for a sequence-classification folder where a causal LM is wanted."""
  config = read_json_config(path)
  if sequence_classification(config):  # hf_reward.load reads these, with their head
    raise UnsupportedCheckpoint(
        f"{path} is a {config['architectures'][0]}, a reward model without an LM head: it "
        f"starts --role=reward runs (jaxpref.models.hf_reward), not a causal LM")


def read_config(path: str) -> ModelConfig:
  """The decoder's config. A `*ForSequenceClassification` folder stores no LM head, so its
  decoder reads as a tied one (which holds none); `hf_reward` loads its score head."""
  hf_config = read_json_config(path)
  if sequence_classification(hf_config):
    family = FAMILIES[hf_config["model_type"]]
    hf_config = dict(hf_config, architectures=[family.architecture], tie_word_embeddings=True)
  return config_from_hf(hf_config)


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


def _swap(x):
  """Stacked experts: torch [E, out, in] <-> ours [E, in, out]."""
  return np.swapaxes(x, 1, 2)


def _bias(heads: int, dh: int):
  """q/k/v bias: torch [H*Dh] <-> ours [H, Dh]."""
  return lambda b: b.reshape(heads, dh), lambda b: b.reshape(-1)


def _in_heads(heads: int, dh: int):
  """q/k/v: torch [H*Dh, D] <-> ours [D, H, Dh]."""
  return (lambda w: w.T.reshape(w.shape[1], heads, dh),
          lambda w: w.reshape(w.shape[0], heads * dh).T)


def _out_heads(heads: int, dh: int):
  """o: torch [D, H*Dh] <-> ours [H, Dh, D]."""
  return (lambda w: w.T.reshape(heads, dh, w.shape[0]),
          lambda w: w.reshape(heads * dh, w.shape[2]).T)


def tensor_map(cfg: ModelConfig) -> list[Entry]:
  """Every HF tensor of the model of this config (any family), and where it lives in ours."""
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
        (hf + "input_layernorm.weight", us + ("attn_norm", "scale"), _same, _same),
    ]
    if cfg.n_experts:  # Mixtral; the checkpoint holds each expert apart (stacked_tensors)
      moe = hf + "block_sparse_moe."
      out += [(moe + "gate.weight", us + ("mlp", "router"), _transpose, _transpose)]
      out += [(moe + f"experts.{w}.weight", us + ("mlp", f"expert_{n}"), _swap, _swap)
              for w, n in (("w1", "gate"), ("w3", "up"), ("w2", "down"))]
    else:
      out += [(hf + f"mlp.{n}_proj.weight", us + ("mlp", n), _transpose, _transpose)
              for n in ("gate", "up", "down")]
    if cfg.post_norms:  # Gemma 2: HF's post_attention_layernorm is then the branch's output norm
      out += [
          (hf + "post_attention_layernorm.weight", us + ("post_attn_norm", "scale"), _same, _same),
          (hf + "pre_feedforward_layernorm.weight", us + ("mlp_norm", "scale"), _same, _same),
          (hf + "post_feedforward_layernorm.weight", us + ("post_mlp_norm", "scale"), _same,
           _same),
      ]
    else:
      out.append((hf + "post_attention_layernorm.weight", us + ("mlp_norm", "scale"), _same,
                  _same))
    if cfg.qkv_bias or cfg.attn_bias:
      out += [(hf + f"self_attn.{n}_proj.bias", us + ("attn", f"{n}_bias"), *_bias(h, cfg.head_dim))
              for n, h in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads))]
    if cfg.attn_bias:  # Llama's attention_bias also biases o_proj
      out.append((hf + "self_attn.o_proj.bias", us + ("attn", "o_bias"), _same, _same))
    if cfg.qk_norm:  # Qwen3: RMSNorm weights over head_dim
      out += [(hf + f"self_attn.{n}_norm.weight", us + ("attn", f"{n}_norm", "scale"), _same,
               _same) for n in ("q", "k")]
  out.append(("model.norm.weight", ("final_norm", "scale"), _same, _same))
  if not cfg.tie_embeddings:
    out.append(("lm_head.weight", ("lm_head",), _transpose, _transpose))
  return out


def fused_tensors(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
  """Phi-3's fused tensors: (HF name, the tensor_map names stacked along its rows, in
  order), each part's rows as torch's [out, in] layout has them; [] for other layouts."""
  if not cfg.fused_projections:
    return []
  out = []
  for i in range(cfg.n_layers):
    attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    out += [(attn + "qkv_proj.weight", [attn + f"{n}_proj.weight" for n in "qkv"]),
            (mlp + "gate_up_proj.weight", [mlp + "gate_proj.weight", mlp + "up_proj.weight"])]
  return out


def split_fused(cfg: ModelConfig, tensors: dict, where: str) -> dict:
  """`tensors` with each fused tensor split into its tensor_map parts (rows: q, then k, then
  v; gate, then up). A fused tensor of the wrong row count is named with both counts."""
  tensors = dict(tensors)
  rows = {"q_proj": cfg.n_heads * cfg.head_dim, "k_proj": cfg.n_kv_heads * cfg.head_dim,
          "v_proj": cfg.n_kv_heads * cfg.head_dim, "gate_proj": cfg.d_ff, "up_proj": cfg.d_ff}
  for name, parts in fused_tensors(cfg):
    if name not in tensors:
      continue  # named as missing by check_names
    sizes = [rows[p.split(".")[-2]] for p in parts]
    if tensors[name].shape[0] != sum(sizes):
      raise UnsupportedCheckpoint(f"{where}: {name} has shape {tensors[name].shape}, which "
                                  f"does not give {sum(sizes)} rows for this config.json")
    fused = tensors.pop(name)
    tensors.update(zip(parts, np.split(fused, np.cumsum(sizes)[:-1], axis=0)))
  return tensors


def _fuse(cfg: ModelConfig, tensors: dict) -> dict:
  for name, parts in fused_tensors(cfg):
    tensors[name] = np.concatenate([tensors.pop(p) for p in parts], axis=0)
  for name, parts in stacked_tensors(cfg):
    tensors.update(zip(parts, (np.ascontiguousarray(x) for x in tensors.pop(name))))
  return tensors


def stacked_tensors(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
  """Mixtral's experts: (the tensor_map name of an [E, ...] stack, the checkpoint's
  per-expert names in expert order), w1/w3/w2 of every layer; [] for a dense model."""
  out = []
  for i in range(cfg.n_layers if cfg.n_experts else 0):
    experts = f"model.layers.{i}.block_sparse_moe.experts."
    out += [(experts + f"{w}.weight", [experts + f"{e}.{w}.weight" for e in range(cfg.n_experts)])
            for w in ("w1", "w2", "w3")]
  return out


def stack_experts(cfg: ModelConfig, tensors: dict, where: str) -> dict:
  """`tensors` with each layer's per-expert tensors stacked under the tensor_map name."""
  tensors = dict(tensors)
  for name, parts in stacked_tensors(cfg):
    shapes = sorted({tensors[p].shape for p in parts})
    if len(shapes) != 1:
      raise UnsupportedCheckpoint(f"{where}: the experts of {name} differ in shape: {shapes}")
    tensors[name] = np.stack([tensors.pop(p) for p in parts])
  return tensors


# ---------------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------------


def shard_files(path: str) -> list[str]:
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
  for name in shard_files(path):
    with safe_open(os.path.join(path, name), framework="np") as f:
      for key in f.keys():
        tensors[key] = f.get_tensor(key)
  return tensors


def check_names(cfg: ModelConfig, tensors: dict, entries: list[Entry], where: str) -> None:
  expected = {e[0] for e in entries}
  for name, parts in fused_tensors(cfg):  # names as the checkpoint stores them
    expected = (expected - set(parts)) | {name}
  for name, parts in stacked_tensors(cfg):
    expected = (expected - {name}) | set(parts)
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
        f"{where}: tensors do not match a {_arch(cfg)} with this config.json; "
        f"missing: {missing or 'none'}; unexpected: {unexpected or 'none'}")


def _arch(cfg: ModelConfig) -> str:
  try:
    return family_of(cfg).architecture
  except UnsupportedCheckpoint:
    return "model"


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
  check_names(cfg, tensors, entries, where)
  tensors = split_fused(cfg, tensors, where)
  tensors = stack_experts(cfg, tensors, where)
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
  """(config, Decoder) from a local HF folder (config.json + safetensors) of a family in
  `hf_config.FAMILIES`.

  `dtype` is the dtype of the loaded parameters and the model's compute dtype
  (bf16 checkpoints are upcast exactly to the float32 default).
  """
  check_causal(path)
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
  return _fuse(cfg, out)


def save(model_or_state, config: ModelConfig, path: str, dtype=None,
         max_shard_size: int | str | None = None, ids: dict | None = None) -> list[str]:
  """Writes config.json and the safetensors for `transformers.AutoModelForCausalLM`.

  `dtype` (e.g. jnp.bfloat16) casts the tensors; default: as held. `max_shard_size`
  (bytes or "5GB") splits them into shards with an index (`hf_write`). `ids`
  (`hf_write.token_ids`: bos/eos/pad) go into config.json and generation_config.json, so
  `generate` knows where to stop. Returns the weight files written.
  """
  tensors = to_tensors(model_or_state, config, dtype)
  hf_config = config_to_hf(config, next(iter(tensors.values())).dtype.name)  # raises first
  return write_folder(hf_config, tensors, path, max_shard_size, ids)


def write_folder(hf_config: dict, tensors: dict, path: str, max_shard_size=None,
                 ids: dict | None = None) -> list[str]:
  """config.json (with the token ids), generation_config.json (with ids) and the weights."""
  os.makedirs(path, exist_ok=True)
  if ids:
    hf_config = {**hf_config, **ids}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  if ids:
    hf_write.write_generation_config(path, ids)
  return hf_write.write_tensors(tensors, path, max_shard_size)
