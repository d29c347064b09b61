"""Flax NNX decoder (Llama, Qwen2, Gemma, Gemma 2 switches), its size presets and Hugging
Face checkpoints of those families (`hf`)."""

from jaxpref.models import hf
from jaxpref.models.decoder import Decoder, ModelConfig
from jaxpref.models.presets import PRESETS, count_params, get_config, param_count

__all__ = ["Decoder", "ModelConfig", "PRESETS", "count_params", "get_config", "hf", "param_count"]
