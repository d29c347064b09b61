"""Synthetic preference pairs with known ground truth, for toy studies of reward models.

Three worlds, each writing `{prompt, chosen, rejected}` records plus the truth behind them:

* `bt`: items with utilities u ~ N(0, utility_scale^2); the chosen item of a pair is the
  one with the higher utility (temperature 0) or is drawn with P = sig((u_i - u_j)/T);
  then a `flip_rate` fraction of labels is swapped (Secrets of RLHF II; docs/reward_models.md#toy-reproduction-label-noise-and-preference-strength).
* `cyclic`: items in disjoint cycles of odd length L, where item p beats the next (L-1)/2
  items of its cycle (rock-paper-scissors for L=3). Every within-cycle pair occurs equally
  often, so the Bradley-Terry MLE is a tie and no scalar reward ranks more than 2/3 of a
  3-cycle's pairs (docs/reward_models.md#gpm).
* `groups`: items at points in the plane, user groups with ideal points; a group prefers
  the item nearer its ideal point (u_g(i) = -|f_i - a_g|^2, labels drawn as in `bt`). The
  prompt names the group unless `--hide_group`, which makes the population's preferences a
  mixture no single reward can fit. Each record's integer `user` field is its group's index
  (the record field PAL reads, docs/reward_models.md).

Items are single words the tiny tokenizer (`jaxpref/data/tiny/tokenizer.model`) holds as one
piece; prompts use only letters it knows (it has no `q` and no digits), so no record holds
an unknown token. One seed fixes everything: the world from `[seed, 0]`, the train split
from `[seed, 1]`, the eval split from `[seed, 2]`.

  python -m jaxpref.data.synthetic cyclic --out_dir /tmp/cyclic --n_train 2400 --n_eval 600
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from jaxpref.data.make_tiny import CATEGORIES

ITEMS = tuple(w for words in CATEGORIES.values() for w in words.split())  # 80 one-piece words
PROMPTS = ("which do you prefer?", "pick one for me.", "what would you choose?",
           "tell me your pick.", "which one is better?")
GROUP_NAMES = tuple("abcdefghijklmnoprstuvwxyz")  # no 'q': the tiny tokenizer lacks it
RESPONSE = "i pick {item}."


def _items(n: int) -> list[str]:
  if not 2 <= n <= len(ITEMS):
    raise ValueError(f"--n_items must be in [2, {len(ITEMS)}] (one-piece words of the tiny "
                     f"tokenizer), got {n}")
  return list(ITEMS[:n])


def _record(rng, prompt: str, win: str, lose: str, flip_rate: float, **truth) -> dict:
  """A record with `win` chosen, or swapped with probability `flip_rate` (`flipped` says so)."""
  flipped = bool(rng.random() < flip_rate)
  chosen, rejected = (lose, win) if flipped else (win, lose)
  return {"prompt": prompt, "chosen": RESPONSE.format(item=chosen),
          "rejected": RESPONSE.format(item=rejected), "chosen_item": chosen,
          "rejected_item": rejected, "flipped": flipped, **truth}


def _prompts(n: int) -> tuple[str, ...]:
  if not 1 <= n <= len(PROMPTS):
    raise ValueError(f"--n_prompts must be in [1, {len(PROMPTS)}], got {n}")
  return PROMPTS[:n]


def _draw_winner(rng, u_i: float, u_j: float, temperature: float) -> bool:
  """Whether i wins: the higher utility at temperature 0, else Bradley-Terry sampling."""
  if temperature == 0:
    return u_i > u_j if u_i != u_j else bool(rng.random() < 0.5)
  return bool(rng.random() < 1.0 / (1.0 + np.exp(-(u_i - u_j) / temperature)))


def _bt_truth(u_w: float, u_l: float, temperature: float, flipped: bool) -> dict:
  """Utilities of chosen/rejected and the true probability that chosen is preferred."""
  u_c, u_r = (u_l, u_w) if flipped else (u_w, u_l)
  p = float(u_c > u_r) if temperature == 0 else 1.0 / (1.0 + np.exp(-(u_c - u_r) / temperature))
  return {"chosen_utility": float(u_c), "rejected_utility": float(u_r), "p_chosen": float(p)}


class BT:
  """Items with known utilities; labels from their order or from Bradley-Terry."""

  def __init__(self, seed: int, n_items: int = 16, utility_scale: float = 1.0,
               temperature: float = 0.0, flip_rate: float = 0.0, n_prompts: int = len(PROMPTS)):
    if temperature < 0 or not 0 <= flip_rate <= 1:
      raise ValueError(f"need --temperature >= 0 and --flip_rate in [0, 1], got "
                       f"{temperature}, {flip_rate}")
    self.items, self.prompts = _items(n_items), _prompts(n_prompts)
    self.utility = np.random.default_rng([seed, 0]).normal(0, utility_scale, n_items)
    self.temperature, self.flip_rate = temperature, flip_rate

  def truth(self) -> dict:
    return {"world": "bt", "utility": dict(zip(self.items, map(float, self.utility))),
            "temperature": self.temperature, "flip_rate": self.flip_rate}

  def sample(self, rng, n: int) -> list[dict]:
    out = []
    for _ in range(n):
      i, j = rng.choice(len(self.items), 2, replace=False)
      if not _draw_winner(rng, self.utility[i], self.utility[j], self.temperature):
        i, j = j, i
      rec = _record(rng, self.prompts[rng.integers(len(self.prompts))], self.items[i],
                    self.items[j], self.flip_rate)
      rec.update(_bt_truth(self.utility[i], self.utility[j], self.temperature, rec["flipped"]))
      out.append(rec)
    return out


class Cyclic:
  """Disjoint cycles of odd length; each within-cycle pair equally often (BT MLE = a tie)."""

  def __init__(self, seed: int, n_cycles: int = 8, cycle_length: int = 3, flip_rate: float = 0.0,
               n_prompts: int = len(PROMPTS)):
    if cycle_length < 3 or cycle_length % 2 == 0:
      raise ValueError(f"--cycle_length must be odd and >= 3 (each item beats as many as "
                       f"beat it), got {cycle_length}")
    if not 0 <= flip_rate <= 1:
      raise ValueError(f"--flip_rate must be in [0, 1], got {flip_rate}")
    items, self.prompts = _items(n_cycles * cycle_length), _prompts(n_prompts)
    order = np.random.default_rng([seed, 0]).permutation(len(items))
    self.cycles = [[items[k] for k in order[c * cycle_length:(c + 1) * cycle_length]]
                   for c in range(n_cycles)]
    self.flip_rate = flip_rate
    half = (cycle_length - 1) // 2
    # (cycle, winner, loser): position p beats p+1 .. p+half (mod L), a regular tournament.
    self.pairs = [(c, cyc[p], cyc[(p + d) % cycle_length]) for c, cyc in enumerate(self.cycles)
                  for p in range(cycle_length) for d in range(1, half + 1)]

  def truth(self) -> dict:
    return {"world": "cyclic", "cycles": self.cycles, "flip_rate": self.flip_rate,
            "beats": [[w, l] for _, w, l in self.pairs]}

  def sample(self, rng, n: int) -> list[dict]:
    # Whole rounds of every pair, shuffled: counts differ by at most one across pairs.
    reps = -(-n // len(self.pairs))
    idx = np.concatenate([rng.permutation(len(self.pairs)) for _ in range(reps)])[:n]
    return [_record(rng, self.prompts[rng.integers(len(self.prompts))], w, l, self.flip_rate,
                    cycle=int(c)) for c, w, l in (self.pairs[k] for k in idx)]


class Groups:
  """User groups with ideal points in the plane; each prefers items nearer its point."""

  def __init__(self, seed: int, n_items: int = 16, n_groups: int = 3, temperature: float = 0.0,
               flip_rate: float = 0.0, hide_group: bool = False, spread: float = 1.5,
               n_prompts: int = len(PROMPTS)):
    if not 2 <= n_groups <= len(GROUP_NAMES):
      raise ValueError(f"--n_groups must be in [2, {len(GROUP_NAMES)}], got {n_groups}")
    if temperature < 0 or not 0 <= flip_rate <= 1:
      raise ValueError(f"need --temperature >= 0 and --flip_rate in [0, 1], got "
                       f"{temperature}, {flip_rate}")
    rng = np.random.default_rng([seed, 0])
    self.items, self.prompts = _items(n_items), _prompts(n_prompts)
    self.points = rng.normal(0, 1, (n_items, 2))  # [I, 2]
    self.ideal = rng.normal(0, spread, (n_groups, 2))  # [G, 2]
    # u[g, i] = -|f_i - a_g|^2: the ideal-point model (PAL, docs/reward_models.md#pal)
    self.utility = -((self.points[None] - self.ideal[:, None]) ** 2).sum(-1)  # [G, I]
    self.groups = GROUP_NAMES[:n_groups]
    self.temperature, self.flip_rate, self.hide_group = temperature, flip_rate, hide_group

  def truth(self) -> dict:
    return {"world": "groups",
            "items": {k: list(map(float, p)) for k, p in zip(self.items, self.points)},
            "ideal_points": {g: list(map(float, a)) for g, a in zip(self.groups, self.ideal)},
            "temperature": self.temperature, "flip_rate": self.flip_rate,
            "hide_group": self.hide_group}

  def sample(self, rng, n: int) -> list[dict]:
    out = []
    for _ in range(n):
      g = int(rng.integers(len(self.groups)))
      i, j = rng.choice(len(self.items), 2, replace=False)
      u = self.utility[g]
      if not _draw_winner(rng, u[i], u[j], self.temperature):
        i, j = j, i
      question = self.prompts[rng.integers(len(self.prompts))]
      prompt = question if self.hide_group else f"for group {self.groups[g]}, {question}"
      rec = _record(rng, prompt, self.items[i], self.items[j], self.flip_rate,
                    group=self.groups[g], user=g)  # `user`: PAL's per-user id (the group)
      rec.update(_bt_truth(u[i], u[j], self.temperature, rec["flipped"]))
      out.append(rec)
    return out


WORLDS = {"bt": BT, "cyclic": Cyclic, "groups": Groups}


def write(world, out_dir: str, n_train: int, n_eval: int, seed: int) -> dict[str, str]:
  """Writes train.jsonl, eval.jsonl and truth.json into `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for split, n, stream in (("train", n_train, 1), ("eval", n_eval, 2)):
    if n <= 0:
      continue
    paths[split] = os.path.join(out_dir, f"{split}.jsonl")
    with open(paths[split], "w") as f:
      for rec in world.sample(np.random.default_rng([seed, stream]), n):
        f.write(json.dumps(rec) + "\n")
  paths["truth"] = os.path.join(out_dir, "truth.json")
  with open(paths["truth"], "w") as f:
    json.dump({**world.truth(), "seed": seed}, f, indent=1)
  return paths


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m jaxpref.data.synthetic", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="world", required=True)
  for name, cls in WORLDS.items():
    s = sub.add_parser(name, help=(cls.__doc__ or "").splitlines()[0])
    s.add_argument("--out_dir", required=True, help="Folder for train.jsonl, eval.jsonl, truth.json.")
    s.add_argument("--n_train", type=int, default=2000)
    s.add_argument("--n_eval", type=int, default=500)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--flip_rate", type=float, default=0.0, help="Fraction of labels swapped.")
    s.add_argument("--n_prompts", type=int, default=len(PROMPTS),
                   help=f"Use the first N of the {len(PROMPTS)} question phrasings.")
    if name == "cyclic":
      s.add_argument("--n_cycles", type=int, default=8)
      s.add_argument("--cycle_length", type=int, default=3)
    else:
      s.add_argument("--n_items", type=int, default=16)
      s.add_argument("--temperature", type=float, default=0.0,
                     help="0: the higher utility wins; > 0: Bradley-Terry draws at this temperature.")
    if name == "bt":
      s.add_argument("--utility_scale", type=float, default=1.0)
    if name == "groups":
      s.add_argument("--n_groups", type=int, default=3)
      s.add_argument("--hide_group", action="store_true", help="Leave the group out of the prompt.")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = vars(parser().parse_args(argv))
  name = args.pop("world")
  out_dir, n_train, n_eval = args.pop("out_dir"), args.pop("n_train"), args.pop("n_eval")
  try:
    world = WORLDS[name](**args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  paths = write(world, out_dir, n_train, n_eval, args["seed"])
  print(f"{name}: wrote " + ", ".join(f"{k} {v}" for k, v in paths.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
