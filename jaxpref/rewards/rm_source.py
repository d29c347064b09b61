"""Reward-model sources, and the online role's reward built from its `--online.*` flags.

* `rm`: the scalar reward of a reward model (`--online.reward_model=PATH`, a `--role=reward`
  run folder or a Hugging Face `*ForSequenceClassification` folder, `loaded.py`), one
  batched forward over the B x K (prompt, response) rows.
* `pref_rm`: the same model as a pairwise preference model turned into within-group win
  rates (Pref-GRPO): P(y_i beats y_j) = sigmoid(s(y_i, y_j)), s = r_i - r_j for a scalar
  (Bradley-Terry) model, the GPM score `losses.reward.gpm_score(v_i, v_j, gate(x))` for a
  preference-embedding one; both orders averaged, (P(i, j) + 1 - P(j, i)) / 2, which for
  these skew-symmetric scores only evens out rounding.
* `judge` (`judge.py`): an LLM judge (`--online.judge_model`, `--online.judge_template`).

`for_online(o, tok)` loads the models the spec's terms name, once, and binds them (with
the policy's tokenizer `tok`, for `length`/`repetition`; the decoders of
`--online.reward_lm`, `strong_lm`, `weak_lm` for `relevance`/`flr`/`cdr`) as the reward's
fixed ctx; `--online.reward_params` sets the sources' hyperparameters.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jaxpref.cli_errors import FlagError
from jaxpref.losses.reward import gpm_score
from jaxpref.rewards import judge as judge_lib
from jaxpref.rewards import loaded, sources
from jaxpref.rewards.model_rewards import LM

RM_SOURCES = ("rm", "pref_rm")
# (flag, ctx key, the sources that read it): decoders for the model_rewards sources.
LM_FLAGS = (("reward_lm", "lm", ("relevance", "flr")), ("strong_lm", "strong_lm", ("cdr",)),
            ("weak_lm", "weak_lm", ("cdr",)))


def _scorer(ctx, who: str) -> loaded.RewardScorer:
  rm = ctx.get("reward_model")
  if rm is None:
    raise ValueError(f"{who} needs --online.reward_model=PATH (ctx 'reward_model')")
  return rm


def _flat_outputs(rm: loaded.RewardScorer, prompts, responses):
  """(outputs [B, K, E], gate [B, K, k] or None) of every (prompt, response) row."""
  b, k = len(prompts), len(responses[0]) if responses else 0
  out, gate = rm.outputs([x for x, ys in zip(prompts, responses) for _ in ys],
                         [y for ys in responses for y in ys])
  return out.reshape(b, k, -1), None if gate is None else gate.reshape(b, k, -1)


@sources.register("rm")
def rm(prompts, responses, **ctx) -> np.ndarray:
  """The scalar reward r(x, y) of ctx reward_model (`loaded.RewardScorer`)."""
  scorer = _scorer(ctx, "rm")
  if scorer.kind != "scalar":
    raise ValueError(f"rm: {scorer.path} is a {scorer.kind} model (an embedding per "
                     "response, scored in pairs): use --online.reward=pref_rm")
  return _flat_outputs(scorer, prompts, responses)[0][..., 0]


def preference_matrix(scorer: loaded.RewardScorer, prompts, responses) -> np.ndarray:
  """P [B, K, K]: P[b, i, j] = (sigmoid(s_ij) + 1 - sigmoid(s_ji)) / 2, s the model's
  pairwise score (r_i - r_j, or the GPM score under the prompt's gate)."""
  out, gate = _flat_outputs(scorer, prompts, responses)
  if scorer.kind == "scalar":
    s = out[:, :, None, 0] - out[:, None, :, 0]
  else:  # every ordered pair at once; the gate is the prompt's, the same in every row
    g = None if gate is None else jnp.asarray(gate[:, :1, None, :])
    s = np.asarray(gpm_score(jnp.asarray(out[:, :, None, :]), jnp.asarray(out[:, None, :, :]),
                             g), np.float64)
  p = 1.0 / (1.0 + np.exp(-s))
  return (p + 1.0 - np.swapaxes(p, 1, 2)) / 2.0


@sources.register("pref_rm")
def pref_rm(prompts, responses, **ctx) -> np.ndarray:
  """Each response's win rate against the rest of its group under ctx reward_model taken
  as a pairwise preference model (Bradley-Terry or GPM)."""
  return sources.win_rates(preference_matrix(_scorer(ctx, "pref_rm"), prompts, responses),
                           ctx.get("valid"))


SELF = "policy"  # --online.judge_model=policy: the policy judges its own samples (OSP)


def for_online(o, tok, say: Callable[[str], None] = print, base: str = "",
               policy_graphdef: Any = None, policy_max_len: int = 0) -> sources.Reward:
  """The reward of the online flags `o` (`OnlineConfig`): `--online.reward` (default `fn`
  with `--online.reward_fn`), with the models its terms name loaded from their flags. A
  model flag given to no term is an error (it would be silently ignored). With
  `--online.judge_model=policy` the judge is the policy itself: its `lm.params` are unset
  here and the rollout sets them to the sampling weights before each scoring."""
  names = {n for _, n in sources.parse(o.reward or sources.USER)}
  ctx = {"tok": tok}
  if names & set(RM_SOURCES):
    if not o.reward_model:
      raise FlagError(f"--online.reward={o.reward} uses a reward model: give "
                      "--online.reward_model=PATH (a --role=reward run folder or a Hugging "
                      "Face *ForSequenceClassification folder)")
    ctx["reward_model"] = loaded.load_reward_model(o.reward_model, max_len=o.score_max_len)
    say(ctx["reward_model"].describe(tok))
  elif o.reward_model:
    raise FlagError(f"--online.reward_model={o.reward_model} is given but --online.reward="
                    f"{o.reward or '(unset)'} names neither rm nor pref_rm")
  judge_flags = [f for f in ("judge_model", "judge_template") if getattr(o, f)]
  if "judge" in names:
    if not o.judge_model:
      raise FlagError(f"--online.reward={o.reward} uses the judge: give "
                      "--online.judge_model=PATH (a policy run folder, a jaxpref-convert or a "
                      "Hugging Face causal-LM folder)")
    template = judge_lib.read_template(o.judge_template)
    if o.judge_model == SELF:
      lm = LM(policy_graphdef, None, tok,
              o.score_max_len or min(policy_max_len or loaded.DEFAULT_MAX_LEN,
                                     loaded.DEFAULT_MAX_LEN))
    else:
      lm = loaded.load_decoder(o.judge_model, "--online.judge_model", o.score_max_len)
    ctx["judge"] = judge_lib.Judge(lm, template, tuple(o.judge_labels.split(",")),
                                   o.judge_model)
    say(ctx["judge"].describe())
  elif judge_flags:
    raise FlagError(f"--online.{judge_flags[0]} is given but --online.reward="
                    f"{o.reward or '(unset)'} does not name judge")
  for field, key, users in LM_FLAGS:
    wanted = sorted(names & set(users))
    path = getattr(o, field)
    if wanted and not path:
      raise FlagError(f"--online.reward={o.reward} uses {', '.join(wanted)}: give "
                      f"--online.{field}=PATH (a decoder folder or a policy run folder)")
    if path and not wanted:
      raise FlagError(f"--online.{field}={path} is given but --online.reward="
                      f"{o.reward or '(unset)'} names none of {', '.join(users)}")
    if path:
      ctx[key] = loaded.load_decoder(path, f"--online.{field}", o.score_max_len)
      say(f"--online.{field}: {path} for {', '.join(wanted)}")
  try:
    params = sources.parse_params(o.reward_params)
    return sources.build(o.reward, reward_fn=o.reward_fn, base=base, ctx=ctx, params=params)
  except sources.RewardError:
    raise
  except ValueError as e:  # an unknown source or hyperparameter: the flags' fault
    raise FlagError(f"--online.reward={o.reward}: {e}"
                    + (f" (--online.reward_params={o.reward_params})" if o.reward_params
                       else "")) from None
