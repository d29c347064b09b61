"""AdamW with linear warmup, cosine decay and global-norm clipping."""

from __future__ import annotations

import optax

from jaxpref.train.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate,
      warmup_steps=min(cfg.warmup_steps, max(total_steps - 1, 0)),
      decay_steps=max(total_steps, 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                      eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
  if cfg.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
  return adamw
