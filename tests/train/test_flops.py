"""Model FLOPs per token and MFU (jaxpref/train/flops.py) against a hand count."""

import pytest

from jaxpref import models
from jaxpref.train import flops


def test_per_token_is_six_n_plus_attention_and_the_reference_forward():
  cfg = models.get_config("tiny")
  n = models.param_count(cfg)
  body = n - cfg.vocab_size * cfg.d_model
  attn = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 32
  assert flops.per_token(cfg, n, 32, reference=False) == 6 * body + 3 * attn
  assert flops.per_token(cfg, n, 32, reference=True) == 8 * body + 4 * attn


def test_mfu_only_where_the_peak_is_known():
  out = flops.metrics(1e12, 1000, 2.0, 4, "TPU v5 lite")
  assert out["perf/tflops_per_sec"] == pytest.approx(500.0)
  assert out["perf/mfu"] == pytest.approx(500e12 / (4 * 197e12))
  assert flops.peak("TPU v5p") == 459e12 and flops.peak("TPU v5") == 459e12
  assert "perf/mfu" not in flops.metrics(1e12, 1000, 2.0, 1, "cpu")
