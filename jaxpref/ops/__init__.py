"""Per-token hot-path ops: plain-XLA versions (Pallas twins arrive with the ops issue)."""

from jaxpref.ops.logprobs import masked_sum, token_logps

__all__ = ["masked_sum", "token_logps"]
