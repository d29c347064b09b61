"""A verifier for the shipped tiny task (jaxpref/data/tiny/README.md): reward 1 when the
response names an item of the category the prompt asks for, else 0.

  --reward_fn=examples/rewards/tiny_verifier.py:reward

The categories and items are make_tiny's tables, so the verifier and the data agree. A
response must also name no item of another category: otherwise listing one item of every
category would earn full reward, a hack a sampled policy finds quickly.
"""

import re

from jaxpref.data.make_tiny import CATEGORIES, PROMPTS, prompt_text

ITEMS = {cat: set(items.split()) for cat, items in CATEGORIES.items()}
OWNER = {item: cat for cat, items in ITEMS.items() for item in items}
ASKS = {prompt_text(t, cat): cat for t in range(len(PROMPTS)) for cat in CATEGORIES}


def category(prompt: str) -> str:
  """The category a tiny prompt asks for: the phrasing table, else the one category word in
  it (a prompt naming none, or several, is not a tiny-task prompt)."""
  text = " ".join(prompt.lower().split())
  if text in ASKS:
    return ASKS[text]
  named = {w for w in re.findall(r"[a-z]+", text) if w in ITEMS}
  if len(named) != 1:
    raise ValueError(f"not a tiny-task prompt (names {len(named)} categories): {prompt!r}")
  return named.pop()


def correct(cat: str, response: str) -> bool:
  named = {OWNER[w] for w in re.findall(r"[a-z]+", response.lower()) if w in OWNER}
  return named == {cat}


def reward(prompts, responses, **ctx):
  """float [B, K]: 1.0 where response k names an item of prompt b's category only."""
  out = []
  for prompt, group in zip(prompts, responses):
    cat = category(prompt)
    out.append([1.0 if correct(cat, y) else 0.0 for y in group])
  return out
