"""`jaxpref-eval` for the heads whose pairs are not scored by one reward difference: PAL's
per-user ideal points, the multi-objective attribute head, and gated GPM (`reward_eval.py`
calls these; docs/reward_models.md, section `jaxpref-eval`).

* `--reward_head=pal`: each pair is scored with its record's user's mixture, r(y) as the
  run's `pal` loss computes it (its `scorer`, `logit_scale`). A user id the model was not
  trained on (>= --pal_users) is an error naming the record's line unless
  `--pal_unseen_user` says how to score it: `uniform` (mixture 1/K', PAL's starting point
  for a new user before any of its pairs, as experiments/repro/pal_groups/fewshot.py
  adapts it) or `mean` (the mean of the trained users' mixtures, the population's).
  Accuracy is reported per known user, and for the unseen users pooled, with their count.
* `--reward_head=attributes`: accuracy per attribute over the pairs whose
  `attribute_prefs` entry is 1 or -1 (0, don't care, is left out and counted), per subset
  where the records have a `subset` field.
* `--reward_head=gpm_gated`: the GPM score with the prompt's gated eigenvalues.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref.data import passes
from jaxpref import losses
from jaxpref.losses.pal import pal_rewards
from jaxpref.losses.reward import gpm_score
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.train.roles import reward as reward_step

UNSEEN = ("error", "uniform", "mean")


def outcome(margin: np.ndarray) -> np.ndarray:
  """1 where the record's side wins (margin > 0), 0.5 on a tie, else 0."""
  return np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))


def batched(fn, params, ds, batch_size: int, mesh) -> np.ndarray:
  """fn(params, batch) -> [B, ...] over every record once, in order: a numpy [N, ...]."""

  jitted = jax.jit(fn)
  put = lambda b: jax.device_put(b, NamedSharding(mesh, P(mesh_lib.BATCH_AXES)))
  return passes.map_batches(lambda b: jitted(params, b), ds, batch_size, put)


def gated_gpm_margins(graphdef, params, ds, batch_size: int, mesh) -> np.ndarray:
  """float32[N]: s(y_w, y_l) = sum_b lambda_b(x) (R v_w . v_l)_b."""

  def margin(p, batch):
    lp = reward_step.model_logps(graphdef, p, batch)
    return gpm_score(lp.embed[:, 0], lp.embed[:, 1], lp.gate)

  return batched(margin, params, ds, batch_size, mesh)


def attribute_margins(graphdef, params, ds, batch_size: int, mesh) -> np.ndarray:
  """float32[N, A]: zeta_a(y_w) - zeta_a(y_l)."""

  def margin(p, batch):
    lp = reward_step.model_logps(graphdef, p, batch)
    return lp.embed[:, 0] - lp.embed[:, 1]

  return batched(margin, params, ds, batch_size, mesh)


def pal_users(cfg, ds, path: str, lines: list[int], unseen: str) -> tuple[np.ndarray, np.ndarray]:
  """(user ids [N], known [N] bool); puts the ids into `ds` for the batches. Records without
  a `user` field are user 0, as in training; an unseen id is an error unless `unseen`."""
  if unseen not in UNSEEN:
    raise ValueError(f"--pal_unseen_user must be one of {', '.join(UNSEEN)}, got {unseen!r}")
  users = cfg.pal_users
  if ds.user is None:
    if users > 1 and unseen == "error":
      raise ValueError(f"{path}: the records have no 'user' field, but the model was trained on "
                       f"--pal_users={users} users: add each record's user id, or pass "
                       "--pal_unseen_user=uniform|mean to score every record as a new user")
    ds.user = np.full(ds.n, 0 if users == 1 else users, np.int32)
  known = ds.user < users
  if not known.all() and unseen == "error":
    i = int(np.argmin(known))
    raise ValueError(f"{path}:{lines[i]}: field 'user' = {int(ds.user[i])}, but the model was "
                     f"trained on --pal_users={users} users (ids 0 .. {users - 1}); "
                     f"{int((~known).sum())} of {ds.n} records have an unseen user: drop them, "
                     "or pass --pal_unseen_user=uniform (mixture 1/K') or mean (the trained "
                     "users' mean mixture) to score them")
  return ds.user.copy(), known


def pal_margins(graphdef, params, ds, batch_size: int, mesh, hparams: dict, unseen: str
                ) -> np.ndarray:
  """float32[N]: r(y_w) - r(y_l) under each record's user's mixture (an unseen user's: the
  `unseen` fallback), r from `losses.pal.pal_rewards` with the run's hyperparameters."""

  hp = {**losses.hparams("pal"), **hparams}

  def margin(p, batch):
    logits = nnx.merge(graphdef, p).user_logits[...]  # [U, K']
    known = batch.user < logits.shape[0]
    lp = reward_step.model_logps(graphdef, p, dataclasses.replace(
        batch, user=jnp.where(known, batch.user, 0)))
    fallback = (jnp.full(logits.shape[1:], 1.0 / logits.shape[1]) if unseen == "uniform"
                else jax.nn.softmax(logits, -1).mean(0))
    mix = jnp.where(known[:, None], lp.mixture, fallback[None])
    r = pal_rewards(dataclasses.replace(lp, mixture=mix), hp["scorer"], hp["logit_scale"])
    return r[:, 0] - r[:, 1]

  return batched(margin, params, ds, batch_size, mesh)


def per_user(users: np.ndarray, known: np.ndarray, correct: np.ndarray) -> dict:
  """{user id: {n, accuracy}} over the known users present."""
  return {str(u): {"n": int((users == u).sum()), "accuracy": float(correct[users == u].mean())}
          for u in sorted(set(users[known].tolist()))}


def attribute_summary(margin: np.ndarray, prefs: np.ndarray | None, subsets, summarize) -> list:
  """Per attribute: cared-for pairs, don't-care count, accuracy, and (with `subsets`) the
  per-subset/category summary of the cared-for pairs. Without prefs every attribute is
  scored against the overall label (the training convention)."""
  t = np.ones_like(margin) if prefs is None else prefs
  out = []
  for a in range(margin.shape[1]):
    cared = t[:, a] != 0
    entry = {"attribute": a, "n": int(cared.sum()), "n_dont_care": int((~cared).sum())}
    correct = outcome(t[cared, a] * margin[cared, a])
    entry["accuracy"] = float(correct.mean()) if cared.any() else float("nan")
    if subsets is not None and cared.any():
      entry.update(summarize([s for s, c in zip(subsets, cared) if c], correct))
    out.append(entry)
  return out


def format_users(res: dict) -> str:
  rows = [(f"user {u}", v["n"], v["accuracy"]) for u, v in res["users"].items()]
  if res["n_unseen_user"]:
    rows.append((f"unseen ({res['pal_unseen_user']} mixture)", res["n_unseen_user"],
                 res["unseen_accuracy"]))
  rows.append(("all", res["n_pairs"], res["accuracy"]))
  w = max(len("user"), *(len(r[0]) for r in rows))
  return "\n".join([f"{'user':<{w}}  {'pairs':>6}  accuracy"]
                   + [f"{name:<{w}}  {n:>6}  {acc:.4f}" for name, n, acc in rows])


def format_attributes(res: dict, format_table) -> str:
  lines = [f"attribute  {'pairs':>6}  {'dont_care':>9}  accuracy"]
  for e in res["attributes"]:
    lines.append(f"{e['attribute']:<9}  {e['n']:>6}  {e['n_dont_care']:>9}  {e['accuracy']:.4f}")
  lines.append(f"pooled over cared-for entries: {res['accuracy']:.4f}")
  for e in res["attributes"]:
    if "subsets" in e:
      lines += ["", f"attribute {e['attribute']}:", format_table(e)]
  return "\n".join(lines)
