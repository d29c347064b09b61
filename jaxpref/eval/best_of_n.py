"""Best-of-N reranking with a trained reward model (`jaxpref-eval --best_of_n=FILE`).

  jaxpref-eval --workdir=runs/rm --best_of_n=candidates.jsonl [--best_of_n_out=picked.jsonl]

Each record is `{prompt, candidates: [str, ...]}` with optional ground truth: `scores`
(a number per candidate, higher is better) and/or `best` (the index of the best candidate).
Every candidate is scored by the run's latest checkpoint (a scalar head); the pick is the
argmax (the first on ties). The output JSONL (default WORKDIR/best_of_n.jsonl) holds each
record's fields plus `candidate_rewards`, `picked_index` and `picked`. With ground truth
the summary gives the accuracy (the pick is `best`, or has the top score) and, with
`scores`, the regret (top score - the pick's score) and the picked/oracle/mean scores.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref import data as data_lib
from jaxpref.data import passes
from jaxpref.data import sources
from jaxpref.data.records import RankedRecord, _is_number
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.train.roles import reward as reward_step


def _where(path: str, line: int) -> str:
  return f"{path}:{line}"


def read_candidates(path: str) -> tuple[list[dict], list]:
  """The raw objects and their `RankedRecord`s (candidates kept in file order)."""

  objs, records = [], []
  for file, line, obj, problem in sources.rows(path):
    at = _where(file, line)
    if problem is not None:
      raise ValueError(f"{at}: {problem[1]}")
    if not isinstance(obj, dict):
      raise ValueError(f"{at}: expected a JSON object, got {type(obj).__name__}")
    prompt, cands = obj.get("prompt"), obj.get("candidates")
    if not isinstance(prompt, str) or not prompt.strip():
      raise ValueError(f"{at}: field 'prompt' is missing or not a non-empty string")
    if (not isinstance(cands, list) or not cands
        or not all(isinstance(c, str) and c.strip() for c in cands)):
      raise ValueError(f"{at}: field 'candidates' must be a non-empty list of non-empty strings")
    if "scores" in obj:
      s = obj["scores"]
      if not isinstance(s, list) or len(s) != len(cands) or not all(map(_is_number, s)):
        raise ValueError(f"{at}: field 'scores' must be a list of {len(cands)} finite numbers "
                         f"(one per candidate), got {s!r}")
    if "best" in obj:
      b = obj["best"]
      if not (isinstance(b, int) and not isinstance(b, bool) and 0 <= b < len(cands)):
        raise ValueError(f"{at}: field 'best' must be a candidate index in [0, {len(cands)}), "
                         f"got {b!r}")
    objs.append(obj)
    # Descending dummy scores keep the file order through RankedDataset's sort.
    records.append(RankedRecord(prompt, tuple(cands), tuple(-float(i) for i in range(len(cands)))))
  if not objs:
    raise ValueError(f"{path}: no records")
  return objs, records


def pick(objs: list[dict], rewards: list[np.ndarray]) -> tuple[list[dict], dict]:
  """The picked candidate per record and, where ground truth is present, the metrics."""
  out, correct, regret, picked_s, oracle_s, mean_s = [], [], [], [], [], []
  for obj, r in zip(objs, rewards):
    i = int(np.argmax(r))
    out.append({**obj, "candidate_rewards": [float(x) for x in r], "picked_index": i,
                "picked": obj["candidates"][i]})
    if "scores" in obj:
      s = np.asarray(obj["scores"], np.float64)
      regret.append(s.max() - s[i])
      picked_s.append(s[i])
      oracle_s.append(s.max())
      mean_s.append(s.mean())
    if "best" in obj:
      correct.append(float(i == obj["best"]))
    elif "scores" in obj:
      correct.append(float(regret[-1] == 0))
  res = {"n_prompts": len(objs), "n_candidates": int(sum(len(r) for r in rewards))}
  if correct:
    res.update(n_with_truth=len(correct), accuracy=float(np.mean(correct)))
  if regret:
    res.update(regret=float(np.mean(regret)), picked_score=float(np.mean(picked_s)),
               oracle_score=float(np.mean(oracle_s)), mean_score=float(np.mean(mean_s)))
  return out, res


def format_summary(res: dict) -> str:
  s = f"best-of-N over {res['n_prompts']} prompts ({res['n_candidates']} candidates)"
  if "accuracy" in res:
    s += f"; picked the best in {res['accuracy']:.4f} of {res['n_with_truth']} with ground truth"
  if "regret" in res:
    s += (f"; mean regret {res['regret']:.4f} (picked score {res['picked_score']:.4f}, oracle "
          f"{res['oracle_score']:.4f}, random pick {res['mean_score']:.4f})")
  return s


def score_groups(graphdef, params, ds, batch_size: int, mesh) -> np.ndarray:
  """float32[N, K]: the scalar reward of every group member (pairs: chosen, rejected)."""

  fn = jax.jit(lambda p, b: reward_step.score(graphdef, p, b)[..., 0])
  put = lambda b: jax.device_put(b, NamedSharding(mesh, P(mesh_lib.BATCH_AXES)))
  return passes.map_batches(lambda b: fn(params, b), ds, batch_size, put)


def best_of_n(cfg, path: str, restore, out: str = "") -> dict:
  """Scores every candidate of `path` with the run's latest checkpoint (`restore(cfg, mesh)`,
  passed in by the CLI: importing `reward_eval` here would define its flags twice when it
  runs as __main__); writes the picks."""

  if cfg.role != "reward" or cfg.reward_dim != 1:
    raise ValueError(f"{cfg.workdir}: best-of-N needs a scalar reward model (--role=reward "
                     f"--reward_dim=1), got --role={cfg.role} --reward_dim={cfg.reward_dim}")
  objs, records = read_candidates(path)
  k = max(2, max(len(r.responses) for r in records))
  tok = data_lib.Tokenizer.load(cfg.data.tokenizer)
  ds = data_lib.RankedDataset(records, tok, cfg.data.max_len, k,
                              truncation=data_lib.Truncation.for_scoring(cfg.data))
  mesh = mesh_lib.make_mesh("data:-1")
  batch_size = -(-cfg.data.eval_batch_size // mesh.size) * mesh.size
  graphdef, params, step = restore(cfg, mesh)
  scores = score_groups(graphdef, params, ds, batch_size, mesh)  # [N, K]
  picked, res = pick(objs, [scores[i, :len(r.responses)] for i, r in enumerate(records)])
  res.update(workdir=cfg.workdir, data=path, step=int(step), n_truncated=int(ds.n_truncated),
             output=out or os.path.join(cfg.workdir, "best_of_n.jsonl"))
  with open(res["output"], "w") as f:
    for obj in picked:
      f.write(json.dumps(obj) + "\n")
  return res
