"""Reward functions for the online tests: text length has spread even under a random policy
(the tiny verifier gives a random policy 0 everywhere: no signal to test with)."""


def length(prompts, responses, **ctx):
  return [[len(r) / 10.0 for r in group] for group in responses]


def nan(prompts, responses, **ctx):
  return [[float("nan")] * len(group) for group in responses]
