"""Model FLOPs of a train step from the config, and utilisation (MFU) against the device's
peak where the device kind is known.

Per token of a sequence of length T, a dense decoder with N parameters (embeddings
excluded) costs 2N FLOPs forward and 4N backward, and attention 4 L d T forward (QK^T and
AV, causal halving ignored, as PaLM's appendix B counts it) and twice that backward: so
6N + 12 L d T per trained token, and 2N + 4 L d T per token of a frozen reference's
forward pass. Tokens are those the step computes on, padding included (what the device
spends its time on); `data/padding_efficiency` says how many of them were real.
"""

from __future__ import annotations

# Dense bf16 peak FLOP/s per chip from the vendors' spec sheets (not measured here). A
# device kind not listed gets no MFU, only FLOP/s.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def per_token(model, n_params: int, seq_len: int, reference: bool) -> float:
  """Training FLOPs per computed token: policy forward + backward, plus the reference's
  forward when the step runs one."""
  body = n_params - model.vocab_size * model.d_model  # the embedding lookup is no matmul
  attn = 4 * model.n_layers * model.n_heads * model.head_dim * seq_len
  train = 3 * (2 * body + attn)
  return train + (2 * body + attn if reference else 0.0)


def peak(device_kind: str) -> float | None:
  """The peak of `device_kind` (jax's `device.device_kind`): an exact entry, else the
  longest entry it starts with; None when unknown (CPU)."""
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  known = [k for k in PEAK_FLOPS if device_kind.startswith(k)]
  return PEAK_FLOPS[max(known, key=len)] if known else None


def metrics(flops_per_token: float, tokens: int, seconds: float, devices: int,
            device_kind: str) -> dict:
  """`perf/tflops_per_sec` (model FLOPs, all devices) and, where the peak is known,
  `perf/mfu` (that over devices x peak)."""
  rate = flops_per_token * tokens / max(seconds, 1e-9)
  out = {"perf/tflops_per_sec": rate / 1e12}
  top = peak(device_kind)
  if top is not None:
    out["perf/mfu"] = rate / (devices * top)
  return out
