"""Reward sources for online training (jaxpref/rewards/sources.py): user functions, weighted
sums, DAPO's overlong shaping, Pref-GRPO win rates, the model-reward wrappers, and the
one-line `RewardError` for bad reward functions."""

import os

import numpy as np
import pytest
from flax import nnx

from cli_util import ROOT
from jaxpref import models
from jaxpref.data import Tokenizer
from jaxpref.rewards import model_rewards as mr
from jaxpref.rewards import sources as S

PROMPTS = ["name a fruit.", "tell me a color.", "which sport do you like?"]
RESPONSES = [["apple.", "red."], ["blue.", "i would say pear."], ["golf?", "golf golf golf."]]
USER_FILE = """
import numpy as np

def count_words(prompts, responses, **ctx):
  return [[float(len(y.split())) for y in ys] for ys in responses]

def picky(prompts, responses, **ctx):
  if any("color" in x for x in prompts):
    raise ValueError("no colors\\nsecond line")
  return np.zeros((len(prompts), len(responses[0])))

def nan_on_golf(prompts, responses, **ctx):
  return [[float("nan") if "golf" in y else 1.0 for y in ys] for ys in responses]

def flat(prompts, responses, **ctx):
  return np.zeros(len(prompts) * len(responses[0]))

def words(prompts, responses, **ctx):
  return [["many"] * len(ys) for ys in responses]

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_file(tmp_path):
  path = tmp_path / "my_rewards.py"
  path.write_text(USER_FILE)
  return str(path)


def test_load_user_fn_by_path_and_base(user_file):
  fn = S.load_user_fn(f"{user_file}:count_words")
  assert fn(PROMPTS[:1], RESPONSES[:1]) == [[1.0, 1.0]]
  base, name = os.path.split(user_file)
  assert S.load_user_fn(f"{name}:count_words", base=base)(PROMPTS[1:2], RESPONSES[1:2]) == [
      [1.0, 4.0]]


def test_load_user_fn_errors_name_the_file(user_file, tmp_path):
  missing = str(tmp_path / "nope.py")
  with pytest.raises(S.RewardError, match=f"no such file {missing}"):
    S.load_user_fn(f"{missing}:reward")
  with pytest.raises(S.RewardError, match=r"my_rewards.py defines no function 'reward' "
                                          r"\(it has: count_words, flat, nan_on_golf"):
    S.load_user_fn(f"{user_file}:reward")
  with pytest.raises(S.RewardError, match="no function 'NOT_A_FUNCTION'"):
    S.load_user_fn(f"{user_file}:NOT_A_FUNCTION")
  with pytest.raises(S.RewardError, match="expected FILE.py:FUNCTION"):
    S.load_user_fn("rewards.txt")
  broken = tmp_path / "broken.py"
  broken.write_text("import numpy as np\nraise RuntimeError('needs a GPU')\n")
  with pytest.raises(S.RewardError, match=f"importing {broken} failed: RuntimeError: needs a GPU"):
    S.load_user_fn(f"{broken}:reward")


def test_weighted_sum_of_user_fn_and_overlong(user_file):
  reward = S.build("1.0*fn+0.5*overlong", reward_fn=f"{user_file}:count_words",
                   params={"overlong": {"max_tokens": 10, "buffer": 4}})
  lengths = np.array([[3, 8], [10, 4], [7, 2]])
  total, parts = reward.parts(PROMPTS, RESPONSES, lengths=lengths)
  words = np.array([[1, 1], [1, 4], [1, 3]], np.float64)
  shaped = np.array([[0, -0.5], [-1, 0], [-0.25, 0]])
  np.testing.assert_allclose(parts["my_rewards.py:count_words"], words)
  np.testing.assert_allclose(parts["overlong"], shaped)
  np.testing.assert_allclose(total, words + 0.5 * shaped)
  assert total.dtype == np.float64 and total.shape == (3, 2)
  # A FILE.py:name term, and a plain spec defaulting to the user function.
  inline = S.build(f"2*{user_file}:count_words")
  np.testing.assert_allclose(inline(PROMPTS, RESPONSES), 2 * words)
  np.testing.assert_allclose(S.build(reward_fn=f"{user_file}:count_words")(PROMPTS, RESPONSES),
                             words)


def test_build_errors():
  with pytest.raises(ValueError, match="unknown reward source 'lenght'.*overlong"):
    S.build("lenght")
  with pytest.raises(ValueError, match="no hyperparameter cap.*max_tokens=0, buffer=0"):
    S.build("overlong", params={"overlong": {"cap": 3}})
  with pytest.raises(ValueError, match="not in 'overlong'.*length"):
    S.build("overlong", params={"length": {"max_tokens": 3}})
  with pytest.raises(ValueError, match="uses 'fn' but no --reward_fn"):
    S.build("fn+overlong")
  with pytest.raises(ValueError, match="not WEIGHT\\*NAME"):
    S.build("x*overlong")
  with pytest.raises(ValueError, match="reserved"):
    S.register("fn")


def test_overlong_values():
  lengths = np.array([[0, 16, 17, 18, 20, 21, 25]])
  out = S.overlong(["p"], [["y"] * 7], max_tokens=20, buffer=4, lengths=lengths)
  np.testing.assert_allclose(out, [[0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]])
  # L_max from the sampler's cap, L_cache = L_max // 5; a truncated response gets -1.
  truncated = np.array([[False, False, True, False, False, False, False]])
  out = S.overlong(["p"], [["y"] * 7], lengths=lengths, truncated=truncated, max_new_tokens=20)
  np.testing.assert_allclose(out, [[0.0, 0.0, -1.0, -0.5, -1.0, -1.0, -1.0]])
  with pytest.raises(S.RewardError, match=r"reward 'overlong' raised ValueError: overlong needs "
                                          r"ctx 'lengths'.*prompt 0: 'name a fruit.'"):
    S.build("overlong")(PROMPTS, RESPONSES)


def test_win_rates_from_matrix_and_judge():
  p = np.array([[[0.5, 1.0, 0.5], [0.0, 0.5, 1.0], [0.5, 0.0, 0.5]]])
  np.testing.assert_allclose(S.win_rates(p), [[0.75, 0.5, 0.25]])
  # A padded third response: the others play only each other.
  np.testing.assert_allclose(S.win_rates(p, [[True, True, False]]), [[1.0, 0.0, 0.0]])
  longer = lambda x, a, b: 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5
  m = S.preference_matrix(longer, ["q"], [["aaa", "a", "aa", "bb"]])
  np.testing.assert_allclose(m[0] + m[0].T, np.ones((4, 4)))
  np.testing.assert_allclose(S.win_rates(m), [[1.0, 0.0, 0.5, 0.5]])
  calls = []
  S.preference_matrix(lambda x, a, b: calls.append((a, b)) or 0.5, ["q"], [["a", "b", "c"]])
  assert calls == [("a", "b"), ("a", "c"), ("b", "c")]  # each unordered pair once
  source = S.pairwise_source(longer)
  out = S.check_call("longer", source, ["q", "r"], [["aaa", "a"], ["b", "bb"]])
  np.testing.assert_allclose(out, [[1.0, 0.0], [0.0, 1.0]])
  bad = S.pairwise_source(lambda x, a, b: 1.5 if x == "r" else 0.5)
  with pytest.raises(S.RewardError, match=r"preference 1.5 .* not a probability.*prompt 1: 'r'"):
    S.check_call("judge", bad, ["q", "r"], [["a", "b"], ["c", "d"]])


@pytest.mark.parametrize("name,pattern", [
    ("picky", r"^reward 'my_rewards.py:picky' raised ValueError: no colors \(prompt 1: 'tell me "
              r"a color.'\)$"),
    ("nan_on_golf", r"^reward 'my_rewards.py:nan_on_golf' returned nan for prompt 2: 'which "
                    r"sport do you like\?', response 0: 'golf\?'$"),
    ("flat", r"^reward 'my_rewards.py:flat' returned shape \(6,\), expected \[B, K\] = \(3, 2\) "
             r"\(first prompt: 'name a fruit.'\)$"),
    ("words", r"^reward 'my_rewards.py:words' returned list, not numbers"),
])
def test_bad_reward_functions_give_one_line(user_file, name, pattern):
  reward = S.build("fn", reward_fn=f"{user_file}:{name}")
  with pytest.raises(S.RewardError, match=pattern) as info:
    reward(PROMPTS, RESPONSES)
  assert "\n" not in str(info.value)


def test_ragged_groups_are_refused(user_file):
  with pytest.raises(ValueError, match="lists of K responses"):
    S.build(reward_fn=f"{user_file}:count_words")(PROMPTS[:2], [["a"], ["b", "c"]])


TOK = os.path.join(ROOT, "jaxpref", "data", "tiny", "tokenizer.model")


def test_tokenizer_sources_wrap_r3_penalties():
  tok = Tokenizer.load(TOK)
  flat_x = [x for x, ys in zip(PROMPTS, RESPONSES) for _ in ys]
  flat_y = [y for ys in RESPONSES for y in ys]
  want = mr.length_penalty(tok, 2)(flat_x, flat_y).reshape(3, 2)
  got = S.build("length", params={"length": {"max_tokens": 2}})(PROMPTS, RESPONSES, tok=tok)
  np.testing.assert_allclose(got, want)
  assert np.any(want < 0)
  rep = S.build("repetition")(PROMPTS, RESPONSES, tok=tok)
  np.testing.assert_allclose(rep, mr.repetition_penalty(tok, 2)(flat_x, flat_y).reshape(3, 2))
  assert rep[2, 1] < 0 == rep[0, 0]  # "golf golf golf." repeats itself


def test_cdr_source_takes_its_models_from_ctx():
  def lm(seed):
    dec = models.Decoder(models.get_config("tiny", init_std=0.2), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(dec)
    return mr.LM(graphdef, params, Tokenizer.load(TOK), 32, 8)
  strong, weak = lm(0), lm(1)
  got = S.build("cdr", params={"cdr": {"system": "be brief. "}})(
      PROMPTS, RESPONSES, strong_lm=strong, weak_lm=weak)
  flat_x = [x for x, ys in zip(PROMPTS, RESPONSES) for _ in ys]
  want = mr.cdr(strong, weak, flat_x, [y for ys in RESPONSES for y in ys], "be brief. ")
  np.testing.assert_allclose(got, want.reshape(3, 2), rtol=1e-6)
  assert np.all(got != 0)
