"""eva's prompt prioritisation (--online.prompt_pool): the kept groups are the most
informative by hand, and a run trains on a pool's best B prompts."""

import numpy as np
import pytest

from jaxpref.train import loop, prompt_priority

from test_online import config, rows


def test_the_most_informative_groups_are_kept_in_pool_order():
  scores = np.array([[1.0, 1.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.5, 0.4], [3.0, 0.0, 3.0]])
  np.testing.assert_allclose(prompt_priority.spread(scores, "gap"), [0.0, 2.0, 0.5, 3.0])
  np.testing.assert_allclose(prompt_priority.spread(scores, "gap_mean"), [0.0, 1.0, 0.2, 1.0])
  np.testing.assert_array_equal(prompt_priority.keep(scores, 2, "gap"), [1, 3])
  # gap_mean ties groups 1 and 3 (1.0 each): both kept before group 2 (0.2).
  np.testing.assert_array_equal(prompt_priority.keep(scores, 2, "gap_mean"), [1, 3])
  np.testing.assert_array_equal(prompt_priority.keep(scores, 3, "gap_mean"), [1, 2, 3])
  np.testing.assert_array_equal(prompt_priority.rows_of(np.array([1, 3]), 3), [3, 4, 5, 9, 10, 11])
  with pytest.raises(ValueError, match="--online.prompt_priority must be"):
    prompt_priority.spread(scores, "max")


@pytest.mark.slow  # a 16-prompt sampler program and the update compile
def test_a_pooled_run_trains_on_its_most_spread_prompts(tmp_path):
  loop.run(config(tmp_path / "pool", steps=1, prompt_pool=16))
  train = rows(tmp_path / "pool")
  assert len(train) == 1
  for r in train:  # the kept half of the pool spreads at least as much as the whole pool
    assert r["prompts/kept_spread"] >= r["prompts/pool_spread"] > 0
  with pytest.raises(ValueError, match="prompt_pool=4 must be 0"):
    loop.run(config(tmp_path / "small", steps=1, prompt_pool=4))
