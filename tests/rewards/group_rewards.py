"""Reward functions that report the shape of what they are given
(tests/train/test_online_flags.py)."""


def size_and_distinct(prompts, responses, **ctx):
  """K + (distinct responses in the group) / 10 for every response of a group of K."""
  return [[len(group) + len(set(group)) / 10.0] * len(group) for group in responses]
