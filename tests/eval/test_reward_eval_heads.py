"""`jaxpref-eval` for the PAL, attribute and gated GPM heads: train each tiny run from the
CLI for a few steps, evaluate it with the CLI, and check the numbers against a direct
float64 computation from the restored parameters (and against the run's own final eval)."""

import json
import math
import os

import jax
import numpy as np
import pytest

import reward_refs as R
from cli_util import ROOT, metrics, train
from test_reward_e2e import jaxpref_eval
from jaxpref import data as data_lib
from jaxpref import models
from jaxpref.data import synthetic
from jaxpref.eval import reward_eval
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.train.roles import reward
from jaxpref.train.config import DataConfig, OptimConfig, RunConfig

TINY = os.path.join(ROOT, "jaxpref", "data", "tiny")
TOKENIZER = os.path.join(TINY, "tokenizer.model")
TINY_FLAGS = os.path.join(ROOT, "experiments", "tiny.flags")
COMMON = ("--role=reward", "--steps=40", "--log_every=20", "--eval_every=20",
          "--checkpoint_every=40", "--eval_batch_size=600", "--warmup_steps=5")
SUBSETS = ("alpacaeval-easy", "mt-bench-hard", "my-subset")
PAL = dict(reward_head="pal", reward_dim=4, pal_prototypes=2, pal_users=3, loss="pal")


def write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def restored(workdir, max_len, **head):
  """(graphdef, params) of a run's latest checkpoint, from a config with the run's flags."""
  cfg = RunConfig(workdir=workdir, model=models.get_config("tiny"), steps=40, role="reward",
                  optim=OptimConfig(learning_rate=1e-3, warmup_steps=5),
                  data=DataConfig(tokenizer=TOKENIZER, max_len=max_len), **head)
  graphdef, params, step = reward_eval.restore(cfg, mesh_lib.make_mesh("data:-1"))
  assert step == 40
  return graphdef, jax.device_get(params)


def head_outputs(graphdef, params, path, max_len):
  """The restored model's RewardOutputs of every record of `path`, as numpy float64."""
  records, _ = data_lib.read_pairs(path)
  ds = data_lib.PairDataset(records, data_lib.Tokenizer.load(TOKENIZER), max_len)
  if ds.user is not None:  # the direct computation uses the user's row itself, not the model's
    ds.user = np.minimum(ds.user, 0)
  fn = jax.jit(lambda p, b: reward.model_logps(graphdef, p, b))
  lp = fn(params, ds.batch(np.arange(ds.n)))
  return jax.tree.map(lambda x: np.asarray(x, np.float64), lp)


def run_eval(workdir, data, *extra):
  proc = jaxpref_eval(f"--workdir={workdir}", f"--data={data}", *extra)
  if proc.returncode:
    return proc, None
  with open(os.path.join(workdir, "eval_results.json")) as f:
    return proc, json.load(f)


# ---- PAL ----

@pytest.fixture(scope="module")
def pal_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("pal")
  assert synthetic.main(["groups", "--hide_group", f"--out_dir={root}", "--n_train=600",
                         "--n_eval=150"]) == 0
  workdir = str(root / "run")
  train(workdir, *COMMON, f"--train_data={root}/train.jsonl", f"--eval_data={root}/eval.jsonl",
        "--max_len=24", *(f"--{k}={v}" for k, v in PAL.items()), flagfile=TINY_FLAGS)
  return root, workdir


def pal_direct(graphdef, params, path, users):
  """Per record: 1 / 0.5 / 0 from r(y) = -||f(y) - a_u(x)|| with a_u = softmax(W_u) . g(x),
  W_u the user's row of the restored logits, or the mean of the rows' softmaxes for ids
  past them."""
  lp = head_outputs(graphdef, params, path, 24)
  logits = np.asarray(params["user_logits"][...], np.float64)
  soft = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  out = []
  for i, u in enumerate(users):
    w = soft[u] if u < len(soft) else soft.mean(0)
    a = w @ lp.prototypes[i]
    r = [-math.sqrt(np.sum((lp.embed[i, j] - a) ** 2) + 1e-12) for j in (0, 1)]
    out.append(1.0 if r[0] > r[1] else 0.5 if r[0] == r[1] else 0.0)
  return np.array(out)


@pytest.mark.slow
def test_pal_eval_scores_each_user_with_its_mixture(pal_run, tmp_path):
  root, workdir = pal_run
  rows = [{**r, "subset": SUBSETS[i % 3]} for i, r in enumerate(read_jsonl(root / "eval.jsonl"))]
  bench = write_jsonl(tmp_path / "bench.jsonl", rows)
  proc, res = run_eval(workdir, bench)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "user 0" in proc.stdout and "average over 3 categories" in proc.stdout
  users = np.array([r["user"] for r in rows])
  want = pal_direct(*restored(workdir, 24, **PAL), bench, users)
  assert res["n_pairs"] == 150 and res["n_unseen_user"] == 0
  assert res["accuracy"] == pytest.approx(want.mean())
  for u in range(3):
    assert res["users"][str(u)]["n"] == int((users == u).sum())
    assert res["users"][str(u)]["accuracy"] == pytest.approx(want[users == u].mean()), u
  assert res["subsets"]["my-subset"]["accuracy"] == pytest.approx(want[2::3].mean())
  # The run's own final eval on the same pairs (one batch) is the pooled accuracy.
  final = metrics(workdir, "eval")[-1]
  assert res["accuracy"] == pytest.approx(final["rewards/accuracy"], abs=1e-6)


@pytest.mark.slow
def test_pal_eval_unseen_users_are_an_error_or_the_mean_mixture(pal_run, tmp_path):
  root, workdir = pal_run
  rows = read_jsonl(root / "eval.jsonl")[:60]
  for r in rows[40:]:
    r["user"] = 7  # never trained on (--pal_users=3)
  bench = write_jsonl(tmp_path / "unseen.jsonl", rows)
  proc, _ = run_eval(workdir, bench)
  assert proc.returncode == 1
  assert f"{bench}:41: field 'user' = 7" in proc.stderr and "20 of 60 records" in proc.stderr
  proc, res = run_eval(workdir, bench, "--pal_unseen_user=mean")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "unseen (mean mixture)" in proc.stdout
  users = np.array([r["user"] for r in rows])
  want = pal_direct(*restored(workdir, 24, **PAL), bench, users)
  assert res["n_unseen_user"] == 20 and set(res["users"]) <= {"0", "1", "2"}
  assert sum(v["n"] for v in res["users"].values()) == 40
  assert res["unseen_accuracy"] == pytest.approx(want[40:].mean())
  assert res["accuracy"] == pytest.approx(want.mean())
  assert "subsets" not in res  # no `subset` field: no subset table


# ---- attributes ----

ATTR = dict(reward_head="attributes", reward_dim=2, loss="attribute_bt")


@pytest.mark.slow
def test_attribute_eval_reports_each_attribute_without_dont_cares(tmp_path):
  data = os.path.join(TINY, "attribute_pairs.jsonl")
  workdir = str(tmp_path / "attr")
  train(workdir, *COMMON, f"--train_data={data}", f"--eval_data={data}",
        *(f"--{k}={v}" for k, v in ATTR.items()), flagfile=TINY_FLAGS)
  rows = [{**r, "subset": SUBSETS[i % 3]} for i, r in enumerate(read_jsonl(data))]
  bench = write_jsonl(tmp_path / "bench.jsonl", rows)
  proc, res = run_eval(workdir, bench)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "dont_care" in proc.stdout and "attribute 1:" in proc.stdout
  lp = head_outputs(*restored(workdir, 32, **ATTR), bench, 32)
  prefs = np.array([r["attribute_prefs"] for r in rows], np.float64)
  d = lp.embed[:, 0] - lp.embed[:, 1]
  sub = np.array([r["subset"] for r in rows])
  for a in range(2):
    cared = prefs[:, a] != 0
    win = np.where(prefs[cared, a] * d[cared, a] > 0, 1.0, 0.0)
    entry = res["attributes"][a]
    assert entry["n"] == cared.sum() and entry["n_dont_care"] == (~cared).sum()
    assert entry["accuracy"] == pytest.approx(win.mean()), a
    s = sub[cared] == "my-subset"
    assert entry["subsets"]["my-subset"]["accuracy"] == pytest.approx(win[s].mean())
    assert entry["subsets"]["my-subset"]["n"] == s.sum()
  assert res["attributes"][1]["n_dont_care"] == 131  # the shipped file's rule (docs)
  final = metrics(workdir, "eval")[-1]
  assert res["accuracy"] == pytest.approx(final["rewards/accuracy"], abs=1e-6)
  for a in range(2):
    want = final[f"rewards/accuracy_attr{a}"]
    assert res["attributes"][a]["accuracy"] == pytest.approx(want, abs=1e-6)


# ---- gated GPM ----

@pytest.mark.slow
def test_gated_gpm_trains_from_the_cli_and_evaluates(tmp_path):
  workdir = str(tmp_path / "gated")
  head = dict(reward_head="gpm_gated", reward_dim=4, loss="gpm")
  train(workdir, *COMMON, *(f"--{k}={v}" for k, v in head.items()), "--loss.tau=0.1",
        flagfile=TINY_FLAGS)
  rows = [{**r, "subset": SUBSETS[i % 3]}
          for i, r in enumerate(read_jsonl(os.path.join(TINY, "eval.jsonl")))]
  bench = write_jsonl(tmp_path / "bench.jsonl", rows)
  proc, res = run_eval(workdir, bench)
  assert proc.returncode == 0, proc.stderr[-3000:]
  graphdef, params = restored(workdir, 32, **head)
  lp = head_outputs(graphdef, params, bench, 32)
  s = R.gpm_score(lp.embed[:, 0], lp.embed[:, 1], lp.gate)
  assert res["accuracy"] == pytest.approx(np.mean(np.where(s > 0, 1.0, 0.0)))
  final = metrics(workdir, "eval")[-1]
  assert res["accuracy"] == pytest.approx(final["rewards/accuracy"], abs=1e-6)
  assert 1.0 <= final["gpm/gate_max"] <= 2.0  # k = 2 blocks: lambda in [0, 2], summing to 2
  evals = metrics(workdir, "eval")
  assert evals[-1]["loss"] < evals[0]["loss"] - 0.1  # it trains (1.13 -> 0.69 when written)
