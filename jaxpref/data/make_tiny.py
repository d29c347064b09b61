"""Generates the shipped tiny preference dataset and its tokenizer (jaxpref/data/tiny/).

Prompts ask for an item of a category ("name a fruit."); the chosen response names an item
of that category, the rejected one (same response template) an item of another category.
Every item is chosen for its own category and rejected for others, so ranking a pair needs
the relation between the prompt's category and the item: nothing about an item alone, or
a response template, separates chosen from rejected. Each category has one prompt template
that never occurs with it in training; the held-out pairs use exactly those combinations,
so they are ranked correctly only by a model that learnt the pattern, not the phrasings.

  python -m jaxpref.data.make_tiny        # rewrites train.jsonl, eval.jsonl, corpus.txt, tokenizer.model
  python -m jaxpref.data.make_tiny --out=/tmp/tiny   # the same bytes elsewhere

The output is a pure function of SEED and the tables below (README.md in tiny/ has the counts).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from jaxpref.data import train_tokenizer
from jaxpref.data.tokenizer import Tokenizer

CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango peach pear plum melon",
    "vegetable": "carrot potato onion pepper lettuce cabbage spinach celery radish garlic",
    "animal": "dog cat horse rabbit tiger lion zebra monkey sheep goat",
    "color": "red blue green yellow purple brown black white pink gray",
    "country": "france spain italy japan china india brazil canada egypt kenya",
    "tool": "hammer wrench saw drill chisel shovel rake pliers axe ladder",
    "instrument": "piano guitar violin drum flute trumpet harp cello banjo tuba",
    "sport": "tennis soccer hockey golf rugby boxing cricket baseball skiing rowing",
}
PROMPTS = ("name {a} {cat}.", "give me one {cat}, please.", "which {cat} do you like?",
           "tell me {a} {cat}.", "can you think of {a} {cat}?", "what is your favorite {cat}?")
RESPONSES = ("{item}.", "i would say {item}.", "my answer is {item}.", "how about {item}?")
N_TRAIN, N_EVAL, SEED = 2000, 300, 0
# An upper bound: the corpus supports 156 unigram pieces, well inside the tiny preset's 512.
VOCAB = 320
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")


def held_out_template(cat_index: int) -> int:
  """The prompt template that category `cat_index` never appears with in training."""
  return cat_index % len(PROMPTS)


def prompt_text(template: int, cat: str) -> str:
  return PROMPTS[template].format(cat=cat, a="an" if cat[0] in "aeiou" else "a")


def sample_pairs(rng: np.random.Generator, n: int, held_out: bool) -> list[dict]:
  cats = list(CATEGORIES)
  items = {c: CATEGORIES[c].split() for c in cats}
  out = []
  while len(out) < n:
    ci = int(rng.integers(len(cats)))
    if held_out:
      template = held_out_template(ci)
    else:
      template = int(rng.choice([t for t in range(len(PROMPTS)) if t != held_out_template(ci)]))
    other = cats[int(rng.choice([j for j in range(len(cats)) if j != ci]))]
    response = RESPONSES[int(rng.integers(len(RESPONSES)))]
    out.append({"prompt": prompt_text(template, cats[ci]),
                "chosen": response.format(item=rng.choice(items[cats[ci]])),
                "rejected": response.format(item=rng.choice(items[other]))})
  return out


UNSURE = "i am not sure."
N_RANKED_TRAIN, N_RANKED_EVAL = 1000, 300


def sample_ranked(rng: np.random.Generator, n: int, held_out: bool) -> list[dict]:
  """Ranked lists for listwise losses: a right item (score 2) > an honest "i am not sure."
  (score 1) > a wrong item (score 0), in shuffled file order, same split rule as the pairs."""
  out = []
  for pair in sample_pairs(rng, n, held_out):
    completions = [{"response": pair["chosen"], "score": 2}, {"response": UNSURE, "score": 1},
                   {"response": pair["rejected"], "score": 0}]
    order = rng.permutation(3)
    out.append({"prompt": pair["prompt"], "completions": [completions[i] for i in order]})
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=OUT, help="output directory (default: the shipped one)")
  out = parser.parse_args(argv).out
  rng = np.random.default_rng(SEED)
  train, evals = sample_pairs(rng, N_TRAIN, False), sample_pairs(rng, N_EVAL, True)
  os.makedirs(out, exist_ok=True)
  for name, rows in (("train", train), ("eval", evals)):
    with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  # The tokenizer sees every phrasing and item, but only the train split's pairings.
  lines = sorted({r[k] for r in train for k in ("prompt", "chosen", "rejected")})
  lines += [prompt_text(t, c) for t in range(len(PROMPTS)) for c in CATEGORIES]
  lines += [RESPONSES[0].format(item=i) for c in CATEGORIES.values() for i in c.split()]
  with open(os.path.join(out, "corpus.txt"), "w") as f:
    f.writelines(line + "\n" for line in lines)
  # Lowercase ASCII needs no unicode normalization; "identity" also leaves out the 240 KB
  # NFKC table that sentencepiece would otherwise store in the model.
  model = train_tokenizer.train_bytes(lines, VOCAB, normalization="identity")
  with open(os.path.join(out, "tokenizer.model"), "wb") as f:
    f.write(model)
  # Ranked lists come from their own seed, after the tokenizer: they change neither.
  rng = np.random.default_rng(SEED + 1)
  for name, rows in (("ranked_train", sample_ranked(rng, N_RANKED_TRAIN, False)),
                     ("ranked_eval", sample_ranked(rng, N_RANKED_EVAL, True))):
    with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  vocab = Tokenizer.from_bytes(model).vocab_size
  assert vocab <= 512, f"{vocab} pieces do not fit the tiny preset's vocab_size=512"
  print(f"wrote {len(train)} train and {len(evals)} eval pairs, corpus and a {vocab}-piece "
        f"tokenizer to {out}")


if __name__ == "__main__":
  main()
