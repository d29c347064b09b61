"""Per-token hot-path ops: log-probs of realised tokens, as Pallas kernels and XLA twins."""

from jaxpref.ops.fused_linear import fused_linear_logps
from jaxpref.ops.logprobs import IMPLS, masked_sum, next_token_logps, token_logps
from jaxpref.ops.logratio import LogRatio, token_logratio
from jaxpref.ops.vocab import vocab_kl, vocab_log_prob_sq

__all__ = ["IMPLS", "LogRatio", "fused_linear_logps", "masked_sum", "next_token_logps",
           "token_logps", "token_logratio", "vocab_kl", "vocab_log_prob_sq"]
