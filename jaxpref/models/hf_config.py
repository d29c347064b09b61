"""Hugging Face `config.json` <-> `ModelConfig` for the families the Decoder represents.

A family is data, not a branch: its `model_type` and architecture, the `ModelConfig`
switches it fixes (checked both ways, so a load never computes something else and a save
names the family transformers will build), the config.json values it cannot represent, and
the keys it adds on save. Adding a family is one more `FAMILIES` entry.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jaxpref.models.decoder import ModelConfig, is_local_layer
from jaxpref.models.hf_defaults import (  # noqa: F401  (with_defaults: hf_reward, convert)
    GEMMA2_DEFAULTS, GEMMA3_DEFAULTS, GEMMA_DEFAULTS, HEADS, HIDDEN, LLAMA_DEFAULTS,
    MISTRAL_DEFAULTS, MIXTRAL_DEFAULTS, PHI3_DEFAULTS, QWEN2_DEFAULTS, QWEN3_DEFAULTS,
    with_defaults)


class UnsupportedCheckpoint(ValueError):
  """The checkpoint is not something the jaxpref Decoder can represent exactly."""


# The switches as Llama has them (the ModelConfig defaults).
# A tuple is a switch the family leaves to its config.json (`fields`): any of those values.
_LLAMA = dict(qkv_bias=False, attn_bias=False, qk_norm=False, embed_scale=False,
              mlp_activation="silu", norm_offset=0.0, post_norms=False, attn_logit_softcap=0.0,
              final_logit_softcap=0.0, sliding_window=0, query_pre_attn_scalar=0.0,
              rope_local_theta=0.0, fused_projections=False, n_experts=0)
_GEMMA = dict(_LLAMA, embed_scale=True, mlp_activation="gelu_tanh", norm_offset=1.0,
              rope_scaling_factor=1.0)


def _gemma2_fields(hf: dict) -> dict:
  # `hf` has the family's defaults filled in: an absent cap is 50/30, an explicit null is off.
  return dict(attn_logit_softcap=float(hf["attn_logit_softcapping"] or 0.0),
              final_logit_softcap=float(hf["final_logit_softcapping"] or 0.0),
              query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]))


def _attention_bias(hf: dict) -> dict:
  return dict(attn_bias=bool(hf.get("attention_bias", False)))


def _mistral_fields(hf: dict) -> dict:
  # Mistral's window, when it has one, applies to every layer (pattern 0: none global).
  return dict(sliding_window=int(hf["sliding_window"] or 0), sliding_window_pattern=0)


def _mixtral_fields(hf: dict) -> dict:
  if not hf["num_local_experts"]:
    raise UnsupportedCheckpoint(f"num_local_experts={hf['num_local_experts']!r}: a Mixtral "
                                f"needs at least one expert")
  return dict(_mistral_fields(hf), n_experts=int(hf["num_local_experts"]),
              experts_per_token=int(hf["num_experts_per_tok"]))


def _gemma3_fields(hf: dict) -> dict:
  # transformers' Gemma 3 attention never applies attn_logit_softcapping (it is not passed
  # to the attention function), so neither do we; the final cap is applied when set.
  full, local = _gemma3_rope(hf)
  if local[1].get("rope_type", "default") != "default":
    raise UnsupportedCheckpoint(f"{local[0]}.rope_type={local[1]['rope_type']!r}: local "
                                f"layers with scaled RoPE are not implemented")
  return dict(final_logit_softcap=float(hf["final_logit_softcapping"] or 0.0),
              query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
              rope_local_theta=float(local[1]["rope_theta"]), **_attention_bias(hf))


def _gemma3_rope(hf: dict) -> tuple[tuple[str, dict], tuple[str, dict]]:
  """((key, params) of the global layers' RoPE, the same of the local layers'), as
  Gemma3TextConfig builds them: `rope_parameters.full_attention` / `.sliding_attention`, the
  legacy `rope_scaling` merged into the global one, thetas from `rope_theta` and
  `rope_local_base_freq` where those omit it. Flat keys of `rope_parameters` are ignored,
  as transformers ignores them."""
  params = hf.get("rope_parameters") or {}
  full = {**(params.get("full_attention") or {"rope_type": "default"}),
          **(hf.get("rope_scaling") or {})}
  full.setdefault("rope_theta", hf.get("rope_theta") or GEMMA3_DEFAULTS["rope_theta"])
  local = dict(params.get("sliding_attention") or {"rope_type": "default"})
  local.setdefault("rope_theta", hf.get("rope_local_base_freq") or
                   GEMMA3_DEFAULTS["rope_local_base_freq"])
  where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters.full_attention"
  return (where, full), ("rope_parameters.sliding_attention", local)


def _gemma3_keys(cfg: ModelConfig) -> dict:
  local = cfg.rope_local_theta or cfg.rope_theta
  return {**_gemma2_keys(cfg), "attention_bias": cfg.attn_bias, "attn_logit_softcapping": None,
          "use_bidirectional_attention": False, "rope_local_base_freq": local,
          "rope_parameters": {"full_attention": _rope_to_hf(cfg),
                              "sliding_attention": {"rope_type": "default", "rope_theta": local}}}


def _qwen_keys(cfg: ModelConfig) -> dict:
  return {"hidden_act": "silu", "use_sliding_window": False, "max_window_layers": cfg.n_layers}


def _gemma2_keys(cfg: ModelConfig) -> dict:
  scalar = cfg.query_pre_attn_scalar or cfg.head_dim
  return {"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
          "attention_bias": False,
          # transformers' strict config wants an int here; a fractional value stays a float.
          "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
          "attn_logit_softcapping": cfg.attn_logit_softcap or None,
          "final_logit_softcapping": cfg.final_logit_softcap or None,
          "sliding_window": cfg.sliding_window or None,
          "layer_types": ["sliding_attention" if cfg.is_local(i) else "full_attention"
                          for i in range(cfg.n_layers)]}


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  architecture: str
  switches: dict  # ModelConfig fields this family fixes
  unsupported: dict  # config.json key -> the values it may have (absent is fine)
  defaults: dict  # transformers' value of each key read, when config.json omits it
  default_pattern: int | None = None  # layer_types when omitted: HF's (i + 1) % p rule
  fields: Callable[[dict], dict] = lambda hf: {}  # family-only ModelConfig fields
  keys: Callable[[ModelConfig], dict] = lambda cfg: {}  # family-only config.json keys
  # (config.json key, params) of the RoPE the global layers take, in the flat form
  rope: Callable[[dict], tuple[str, dict]] = lambda hf: _rope_params(hf)
  seq_cls: str = ""  # the *ForSequenceClassification architecture, if not the usual name
  # The RoPE scaling types (HF rope_type) implemented for it, where rope_scaling_factor is free
  rope_types: tuple = ("llama3", "linear", "dynamic")


FAMILIES: dict[str, Family] = {
    # attention_bias: biases on q/k/v and o (the switch attn_bias).
    "llama": Family("llama", "LlamaForCausalLM", dict(_LLAMA, attn_bias=(False, True)),
                    {"mlp_bias": (False,), "hidden_act": ("silu",)}, LLAMA_DEFAULTS,
                    fields=_attention_bias,
                    keys=lambda cfg: {"hidden_act": "silu", "attention_bias": cfg.attn_bias,
                                      "mlp_bias": False}),
    # Mistral: Llama with a sliding window on every layer (or none: sliding_window null).
    "mistral": Family("mistral", "MistralForCausalLM",
                      dict({k: v for k, v in _LLAMA.items() if k != "sliding_window"},
                           sliding_window_pattern=0),
                      {"hidden_act": ("silu",)}, MISTRAL_DEFAULTS, fields=_mistral_fields,
                      keys=lambda cfg: {"hidden_act": "silu",
                                        "sliding_window": cfg.sliding_window or None}),
    # Mixtral: Mistral with a mixture-of-experts MLP (jaxpref.models.moe). The router's
    # training-time jitter and load-balancing loss are training options transformers' forward
    # pass in eval mode does not apply; they are not read.
    "mixtral": Family("mixtral", "MixtralForCausalLM",
                      dict({k: v for k, v in _LLAMA.items() if k not in ("sliding_window",
                                                                        "n_experts")},
                           sliding_window_pattern=0),
                      {"hidden_act": ("silu",)}, MIXTRAL_DEFAULTS, fields=_mixtral_fields,
                      keys=lambda cfg: {"hidden_act": "silu",
                                        "sliding_window": cfg.sliding_window or None,
                                        "num_local_experts": cfg.n_experts,
                                        "num_experts_per_tok": cfg.experts_per_token}),
    # Qwen2 (and Qwen2.5, the same architecture): Llama with q/k/v biases.
    "qwen2": Family("qwen2", "Qwen2ForCausalLM",
                    dict(_LLAMA, qkv_bias=True, rope_scaling_factor=1.0),
                    {"hidden_act": ("silu",), "use_sliding_window": (False,)}, QWEN2_DEFAULTS,
                    keys=_qwen_keys),
    # Qwen3: Llama with RMSNorm on each head's q and k (attention_bias: on q/k/v and o).
    "qwen3": Family("qwen3", "Qwen3ForCausalLM",
                    dict(_LLAMA, qk_norm=True, attn_bias=(False, True), rope_scaling_factor=1.0),
                    {"hidden_act": ("silu",), "use_sliding_window": (False,)}, QWEN3_DEFAULTS,
                    fields=_attention_bias,
                    keys=lambda cfg: {**_qwen_keys(cfg), "attention_bias": cfg.attn_bias}),
    # Gemma's released configs say hidden_act "gelu", which transformers reads as the tanh
    # approximation (transformers PR 29402), so both mean gelu_tanh here.
    "gemma": Family("gemma", "GemmaForCausalLM", _GEMMA,
                    {"attention_bias": (False,), "hidden_act": ("gelu", "gelu_pytorch_tanh"),
                     "use_bidirectional_attention": (None, False)}, GEMMA_DEFAULTS,
                    keys=lambda cfg: {"hidden_act": "gelu_pytorch_tanh", "attention_bias": False}),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM",
                     {k: v for k, v in dict(_GEMMA, post_norms=True).items()
                      if k not in ("attn_logit_softcap", "final_logit_softcap", "sliding_window",
                                   "query_pre_attn_scalar")},
                     {"attention_bias": (False,), "hidden_activation": ("gelu_pytorch_tanh",),
                      "use_bidirectional_attention": (None, False)}, GEMMA2_DEFAULTS,
                     default_pattern=2, fields=_gemma2_fields, keys=_gemma2_keys),
    # Gemma 3 text: Gemma 2 with (1 + w) q/k norms, its own RoPE theta on local layers, and
    # no attention soft-cap (see _gemma3_fields).
    "gemma3_text": Family("gemma3_text", "Gemma3ForCausalLM",
                          {k: v for k, v in dict(_GEMMA, post_norms=True, qk_norm=True).items()
                           if k not in ("final_logit_softcap", "sliding_window", "attn_bias",
                                        "query_pre_attn_scalar", "rope_local_theta",
                                        "rope_scaling_factor")},
                          {"hidden_activation": ("gelu_pytorch_tanh",),
                           "use_bidirectional_attention": (None, False)}, GEMMA3_DEFAULTS,
                          fields=_gemma3_fields, keys=_gemma3_keys,
                          rope=lambda hf: _gemma3_rope(hf)[0],
                          # dynamic NTK per layer type is not checked against transformers
                          rope_types=("llama3", "linear"),
                          seq_cls="Gemma3TextForSequenceClassification"),
    # Phi-3: Llama computed from fused qkv_proj / gate_up_proj tensors (split on load, fused
    # on save), with Mistral's every-layer sliding window when sliding_window is set.
    "phi3": Family("phi3", "Phi3ForCausalLM",
                   dict({k: v for k, v in _LLAMA.items() if k != "sliding_window"},
                        fused_projections=True, sliding_window_pattern=0,
                        rope_scaling_factor=1.0),
                   {"hidden_act": ("silu",)}, PHI3_DEFAULTS, fields=_mistral_fields,
                   keys=lambda cfg: {"hidden_act": "silu",
                                     "sliding_window": cfg.sliding_window or None}),
}


def _supported() -> str:
  return ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())


def _family(hf: dict) -> Family:
  model_type = hf.get("model_type")
  family = FAMILIES.get(model_type)
  archs = hf.get("architectures") or ([family.architecture] if family else [])
  if family is None or archs != [family.architecture]:
    raise UnsupportedCheckpoint(
        f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
        f"supported: {_supported()}")
  return family


def mismatches(cfg: ModelConfig, family: Family) -> list[str]:
  """The switches of `cfg` that `family` fixes otherwise, as 'field=ours (family: theirs)'."""
  bad = [f"{k}={getattr(cfg, k)!r} ({family.model_type}: {v!r})"
         for k, v in family.switches.items()
         if (getattr(cfg, k) not in v if isinstance(v, tuple) else getattr(cfg, k) != v)]
  if cfg.rope_scaling_factor != 1.0 and cfg.rope_scaling_type not in family.rope_types:
    bad.append(f"rope_scaling_type={cfg.rope_scaling_type!r} ({family.model_type}: "
               f"{family.rope_types!r})")
  return bad


def family_of(cfg: ModelConfig) -> Family:
  """The one family whose switches `cfg` has; raises naming what rules out each family."""
  why = {}
  for name, family in FAMILIES.items():
    bad = mismatches(cfg, family)
    if not bad:
      return family
    why[name] = bad
  raise UnsupportedCheckpoint("this ModelConfig is no Hugging Face family jaxpref writes: " +
                              "; ".join(f"not {n}: {', '.join(b)}" for n, b in why.items()))


def _rope_params(hf: dict) -> tuple[str, dict]:
  """(config.json key, flat RoPE params with rope_theta) from either the transformers-5
  `rope_parameters` or the older top-level `rope_theta` + `rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
  where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  return where, {**(hf.get("rope_scaling") or params), "rope_theta": theta}


def _rope(params: dict) -> tuple[float, dict]:
  """(theta, scaling dict or {}) of flat RoPE params."""
  scaling = {k: v for k, v in params.items() if k != "rope_theta"}
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  return float(params["rope_theta"]), ({} if kind == "default" else {**scaling, "rope_type": kind})


def _scaling_fields(scaling: dict, max_len: int) -> dict:
  """The ModelConfig fields of an 'llama3', 'linear' or 'dynamic' RoPE scaling dict."""
  if not scaling:
    return {}
  linear = scaling["rope_type"] in ("linear", "dynamic")
  need = ("factor",) if linear else ("factor", "low_freq_factor", "high_freq_factor")
  missing = [k for k in need if k not in scaling]
  if missing:
    raise UnsupportedCheckpoint(f"{scaling['rope_type']!r} RoPE scaling {scaling} lacks {missing}")
  if scaling["rope_type"] == "dynamic":
    # transformers' dynamic NTK measures lengths against max_position_embeddings, never an
    # original_max_position_embeddings in the dict.
    return dict(rope_scaling_type="dynamic", rope_scaling_factor=float(scaling["factor"]),
                rope_original_max_len=int(max_len))
  if linear:
    return dict(rope_scaling_type="linear", rope_scaling_factor=float(scaling["factor"]))
  return dict(rope_scaling_factor=float(scaling["factor"]),
              rope_low_freq_factor=float(scaling["low_freq_factor"]),
              rope_high_freq_factor=float(scaling["high_freq_factor"]),
              rope_original_max_len=int(scaling.get("original_max_position_embeddings",
                                                    max_len)))


def _layer_types(hf: dict, family: Family) -> list[str]:
  n, p = hf["num_hidden_layers"], family.default_pattern
  if "sliding_window_pattern" in family.defaults:  # Gemma 3 reads it when layer_types is absent
    p = hf["sliding_window_pattern"]
  if hf.get("layer_types") is not None:
    return list(hf["layer_types"])
  if p is None:
    return ["full_attention"] * n
  return ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]


def _sliding_fields(hf: dict, family: Family) -> dict:
  """sliding_window(_pattern) from `layer_types`, if jaxpref's every-p-th-global rule gives it."""
  types = _layer_types(hf, family)
  unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
  if unknown or len(types) != hf["num_hidden_layers"]:
    raise UnsupportedCheckpoint(f"layer_types {types}: one of 'sliding_attention' or "
                                f"'full_attention' per layer is supported")
  local = [t == "sliding_attention" for t in types]
  if not any(local):
    return {}
  window = hf.get("sliding_window")
  if not window:
    raise UnsupportedCheckpoint(f"layer_types has sliding layers but sliding_window={window!r}")
  first_global = local.index(False) + 1 if not all(local) else 0
  for pattern in (0, first_global):
    if [is_local_layer(i, window, pattern) for i in range(len(local))] == local:
      return dict(sliding_window=int(window), sliding_window_pattern=pattern)
  raise UnsupportedCheckpoint(f"layer_types {types}: jaxpref's local layers are all but every "
                              f"p-th (sliding_window_pattern); this pattern is not one")


def config_from_hf(hf: dict) -> ModelConfig:
  """ModelConfig from a parsed HF config.json; raises UnsupportedCheckpoint naming what differs."""
  family = _family(hf)
  hf = with_defaults(hf, family.defaults)
  bad = [f"{k}={hf[k]!r} (supported: {', '.join(map(repr, ok))})"
         for k, ok in family.unsupported.items() if k in hf and hf[k] not in ok]
  where, params = family.rope(hf)
  theta, scaling = _rope(params)
  if scaling and scaling["rope_type"] not in family.rope_types:
    # The key, not the dict: longrope's factor lists would bury the one line.
    bad.append(f"RoPE scaling {where}.rope_type={scaling['rope_type']!r} (implemented: "
               f"default, {', '.join(map(repr, family.rope_types))})")
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    key = "partial_rotary_factor"
    bad.append(f"{f'{where}.{key}' if key in params else key}={partial!r} (partial RoPE is "
               f"not implemented)")
  if bad:
    raise UnsupportedCheckpoint(f"unsupported {family.model_type} features: " + "; ".join(bad))
  fields = dict(family.switches, **family.fields(hf), **_sliding_fields(hf, family),
                **_scaling_fields(scaling, hf["max_position_embeddings"]))
  cfg = ModelConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
      n_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
      d_ff=hf["intermediate_size"], rope_theta=theta, norm_eps=hf["rms_norm_eps"],
      tie_embeddings=bool(hf["tie_word_embeddings"]),
      max_len=hf["max_position_embeddings"], **fields)
  bad = mismatches(cfg, family)  # e.g. sliding layers in a family that has none
  if bad:
    raise UnsupportedCheckpoint(f"unsupported {family.model_type} features: " + "; ".join(bad))
  return cfg


def _rope_to_hf(cfg: ModelConfig) -> dict:
  if cfg.rope_scaling_factor == 1.0:
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling_type in ("linear", "dynamic"):
    return {"rope_type": cfg.rope_scaling_type, "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_scaling_factor}
  return {"rope_type": "llama3", "rope_theta": cfg.rope_theta,
          "factor": cfg.rope_scaling_factor, "low_freq_factor": cfg.rope_low_freq_factor,
          "high_freq_factor": cfg.rope_high_freq_factor,
          "original_max_position_embeddings": cfg.rope_original_max_len}


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
  """config.json of `cfg`'s family. Both the transformers-5 `rope_parameters` and the
  legacy top-level `rope_theta` (+ `rope_scaling`) are written, so older transformers read
  it too."""
  family = family_of(cfg)
  rope = _rope_to_hf(cfg)
  legacy_scaling = None if rope["rope_type"] == "default" else {
      k: v for k, v in rope.items() if k != "rope_theta"}
  return {
      "architectures": [family.architecture], "model_type": family.model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.d_ff, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": rope, "rope_scaling": legacy_scaling,
      "tie_word_embeddings": cfg.tie_embeddings,
      # Dynamic NTK reads its original length from max_position_embeddings.
      "max_position_embeddings": (cfg.rope_original_max_len if rope["rope_type"] == "dynamic"
                                  else cfg.max_len),
      **family.keys(cfg),
      "torch_dtype": dtype, "dtype": dtype,
  }
