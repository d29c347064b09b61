"""The prompt log-probs a loss can ask for (`needs_prompt`, ORPO's TRL NLL): from the same
policy pass, equal to log_softmax of the model's logits gathered on the prompt tokens after
BOS, and the response's sums unchanged by asking for them."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref import losses, models
from jaxpref.train.roles import policy
from jaxpref.types import GroupBatch


def batch_and_model():
  cfg = models.get_config("tiny")
  model = models.Decoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  b, k, t = 3, 2, 12
  tokens = rng.integers(3, cfg.vocab_size, (b, k, t)).astype(np.int32)
  tokens[..., 0] = 1
  seg = np.zeros((b, k, t), np.int32)
  mask = np.zeros((b, k, t), np.float32)
  for i in range(b):
    for j in range(k):
      prompt, total = 3 + i, 7 + i + j  # prompt tokens 0..prompt-1, response up to total
      seg[i, j, :total] = 1
      mask[i, j, prompt:total] = 1.0
  batch = GroupBatch(tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(mask),
                     segment_ids=jnp.asarray(seg), valid=jnp.ones((b, k), bool),
                     weight=jnp.ones((b,), jnp.float32))
  return model, batch, tokens, seg, mask


def test_prompt_log_probs_are_the_models_on_the_prompt_tokens():
  model, batch, tokens, seg, mask = batch_and_model()
  graphdef, params = nnx.split(model)
  needs = losses.needs_tokens("orpo")
  assert needs.prompt and not needs  # asks for the prompt, not for per-token arrays
  lp = jax.jit(lambda p, b: policy.step_logps(graphdef, p, p, b, needs))(params, batch)
  plain = jax.jit(lambda p, b: policy.step_logps(graphdef, p, p, b))(params, batch)
  flat = tokens.reshape(-1, tokens.shape[-1])
  logits = np.asarray(model(jnp.asarray(flat), segment_ids=jnp.asarray(seg.reshape(flat.shape))),
                      np.float64)
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
  picked = np.take_along_axis(logp[:, :-1], flat[:, 1:, None], -1)[..., 0]  # token t from t-1
  prompt = ((seg > 0) & (mask == 0)).reshape(flat.shape)[:, 1:]
  want = (picked * prompt).sum(-1).reshape(mask.shape[:2])
  np.testing.assert_allclose(lp.prompt_policy, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(lp.prompt_length, prompt.sum(-1).reshape(mask.shape[:2]))
  np.testing.assert_allclose(lp.policy, plain.policy, rtol=1e-5, atol=1e-5)
  assert plain.prompt_policy is None
