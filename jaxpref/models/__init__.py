"""Flax NNX decoder and its size presets."""

from jaxpref.models.decoder import Decoder, ModelConfig, count_params, param_count
from jaxpref.models.presets import PRESETS, get_config

__all__ = ["Decoder", "ModelConfig", "PRESETS", "count_params", "get_config", "param_count"]
