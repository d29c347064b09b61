"""Per-user accuracy of a PAL and a BT run, and PAL's few-shot adaptation to an unseen user.

  python experiments/repro/pal_groups/fewshot.py --pal runs/pal_groups_pal --bt runs/pal_groups_bt \
      --data runs/pal_groups_data

Both runs' latest checkpoints score the eval split. Per-user accuracy groups its pairs by
the records' `user`. Few-shot: an unseen user is given n of one group's eval pairs; with
the PAL model frozen (item map f and prototypes g_k), only a fresh row of mixture logits
(K' numbers, starting from a uniform mixture) is fitted to those n pairs with the `pal`
loss; accuracy is measured on the group's other eval pairs, averaged over the groups and
`--draws` random draws of the n pairs. Writes results.json and fewshot.png to --out (the
PAL run's workdir by default) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

SHOTS = (0, 1, 2, 4, 8, 16, 32)  # 0: the uniform mixture, before any of the user's pairs


def load_run(workdir: str):
  """(cfg, graphdef, params) of a --role=reward run's latest checkpoint."""
  from absl import flags

  from jaxpref import flags as jflags
  from jaxpref.eval import reward_eval
  from jaxpref.parallel import mesh as mesh_lib
  flags.FLAGS.unparse_flags()  # a second run's flags.txt must not inherit the first's
  flags.FLAGS(["fewshot"] + jflags.expand_flagfiles([f"--flagfile={workdir}/flags.txt"])
              + [f"--workdir={workdir}"])
  cfg = jflags.to_config()
  graphdef, params, _ = reward_eval.restore(cfg, mesh_lib.make_mesh("data:-1"))
  return cfg, graphdef, params


def eval_logps(cfg, graphdef, params, data_dir: str):
  """(RewardOutputs of every eval pair as numpy arrays, the eval PairDataset)."""
  from jaxpref import data as data_lib
  from jaxpref.train.roles import reward
  tok = data_lib.Tokenizer.load(cfg.data.tokenizer)
  records, _ = data_lib.read_pairs(os.path.join(data_dir, "eval.jsonl"))
  ds = data_lib.PairDataset(records, tok, cfg.data.max_len)
  fn = jax.jit(lambda p, b: reward.model_logps(graphdef, p, b))
  parts = [jax.device_get(fn(params, b)) for b in data_lib.eval_batches(ds, 200)]
  lp = jax.tree.map(lambda *xs: np.concatenate(xs)[:ds.n], *parts)
  return lp, ds


def correct(margin: np.ndarray) -> np.ndarray:
  return np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))


def per_user(acc: np.ndarray, user: np.ndarray) -> dict[int, float]:
  return {int(u): float(acc[user == u].mean()) for u in np.unique(user)}


def pal_margins(lp) -> np.ndarray:
  from jaxpref.losses.pal import pal_rewards
  r = np.asarray(pal_rewards(lp))
  return r[:, 0] - r[:, 1]


def fit_mixture(f, g, steps: int = 200, lr: float = 0.1):
  """Mixture logits [K'] fitted by Adam on the `pal` loss of n pairs (f [n, 2, E], g [n, K', E])."""
  from jaxpref import losses
  from jaxpref.types import RewardOutputs
  n, k = g.shape[:2]
  zeros = jnp.zeros((n, 2))

  def loss(theta):
    mix = jnp.broadcast_to(jax.nn.softmax(theta), (n, k))
    lp = RewardOutputs(reward=zeros, length=zeros, valid=zeros == 0, weight=jnp.ones(n),
                       embed=f, prototypes=g, mixture=mix)
    return losses.get("pal")(lp, proto_penalty=0.0)[0]  # the prototypes are frozen

  opt = optax.adam(lr)

  def step(carry, _):
    theta, state = carry
    updates, state = opt.update(jax.grad(loss)(theta), state)
    return (optax.apply_updates(theta, updates), state), None

  theta = jnp.zeros(k)
  return jax.lax.scan(step, (theta, opt.init(theta)), None, length=steps)[0][0]


def fewshot_curve(lp, user: np.ndarray, draws: int, seed: int) -> dict[int, float]:
  """Mean query accuracy of an unseen user after n shots, for n in SHOTS."""
  from jaxpref.types import RewardOutputs
  rng = np.random.default_rng(seed)
  fit = jax.jit(jax.vmap(fit_mixture))
  out = {}
  for n in SHOTS:
    accs = []
    for u in np.unique(user):
      rows = np.flatnonzero(user == u)
      picks = [rng.permutation(rows) for _ in range(draws)]
      support = np.stack([p[:n] for p in picks])  # [draws, n]
      if n:
        theta = fit(jnp.asarray(lp.embed[support]), jnp.asarray(lp.prototypes[support]))
      else:
        theta = jnp.zeros((draws, lp.prototypes.shape[1]))
      for d in range(draws):
        query = picks[d][n:]
        mix = np.broadcast_to(np.asarray(jax.nn.softmax(theta[d])), (len(query), theta.shape[1]))
        q = RewardOutputs(reward=lp.reward[query], length=lp.length[query],
                          valid=lp.valid[query], weight=lp.weight[query], embed=lp.embed[query],
                          prototypes=lp.prototypes[query], mixture=mix)
        accs.append(correct(pal_margins(q)).mean())
    out[n] = float(np.mean(accs))
  return out


def plot(curve: dict[int, float], bt_acc: float, pal_acc: float, path: str) -> None:
  from jaxpref.train import plots  # noqa: F401  (selects the Agg backend)
  import matplotlib.pyplot as plt
  xs = [max(n, 0.5) for n in curve]  # n = 0 drawn at 0.5 on the log axis
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  ax.plot(xs, list(curve.values()), "o-", label="PAL, unseen user (mixture fitted)")
  ax.axhline(pal_acc, ls="--", color="C2", label="PAL, users seen in training")
  ax.axhline(bt_acc, ls=":", color="C3", label="single BT model")
  ax.set_xscale("log", base=2)
  ax.set_xticks(xs, ["0"] + [str(n) for n in list(curve)[1:]])
  ax.set_xlabel("pairs of the new user (n)")
  ax.set_ylabel("held-out accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pal", required=True, help="The PAL run's workdir.")
  p.add_argument("--bt", required=True, help="The BT run's workdir.")
  p.add_argument("--data", required=True, help="Folder of the groups data (eval.jsonl).")
  p.add_argument("--out", default="", help="Folder for results.json and fewshot.png "
                 "(default: the PAL run's workdir).")
  p.add_argument("--draws", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  args.out = args.out or args.pal
  os.makedirs(args.out, exist_ok=True)
  lp_pal, ds = eval_logps(*load_run(args.pal), args.data)
  lp_bt, _ = eval_logps(*load_run(args.bt), args.data)
  acc_pal, acc_bt = correct(pal_margins(lp_pal)), correct(lp_bt.reward[:, 0] - lp_bt.reward[:, 1])
  res = {"pal_accuracy": float(acc_pal.mean()), "bt_accuracy": float(acc_bt.mean()),
         "pal_per_user": per_user(acc_pal, ds.user), "bt_per_user": per_user(acc_bt, ds.user),
         "fewshot": fewshot_curve(lp_pal, ds.user, args.draws, args.seed), "draws": args.draws}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(res, f, indent=1)
  plot(res["fewshot"], res["bt_accuracy"], res["pal_accuracy"], os.path.join(args.out, "fewshot.png"))
  print("| user | BT | PAL |\n|---|---|---|")
  for u in res["pal_per_user"]:
    print(f"| {u} | {res['bt_per_user'][u]:.3f} | {res['pal_per_user'][u]:.3f} |")
  print(f"| all | {res['bt_accuracy']:.3f} | {res['pal_accuracy']:.3f} |\n")
  print("| n (pairs of the unseen user) | " + " | ".join(map(str, SHOTS)) + " |")
  print("|---" * (len(SHOTS) + 1) + "|")
  print("| held-out accuracy | " + " | ".join(f"{res['fewshot'][n]:.3f}" for n in SHOTS) + " |")
  return res


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())
  main()
