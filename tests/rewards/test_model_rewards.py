"""Model-based rewards (jaxpref/rewards): CDR, FLR, R^3 mixtures and the labelling command,
on tiny random decoders against float64 numpy computations from the logits."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from cli_util import ROOT
from jaxpref import models
from jaxpref.data import Tokenizer
from jaxpref.data.pairs import tokenize_sequence
from jaxpref.rewards import label as label_cli
from jaxpref.rewards import model_rewards as mr

TOK = os.path.join(ROOT, "jaxpref", "data", "tiny", "tokenizer.model")
PROMPTS = ["name a fruit.", "which animal do you like?", "name an instrument."]
RESPONSES = ["banana.", "how about sheep?", "my answer is drum drum drum."]


def _lm(seed, max_len=32, batch_size=2):
  dec = models.Decoder(models.get_config("tiny", init_std=0.2), rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(dec)
  return mr.LM(graphdef, params, Tokenizer.load(TOK), max_len, batch_size)


@pytest.fixture(scope="module")
def strong():
  return _lm(0)


@pytest.fixture(scope="module")
def weak():
  return _lm(1)


def _reference_logp(lm, prompt, response):
  """sum_t log softmax(logits[t-1])[token t] over the response tokens and EOS, in float64."""
  tokens, mask, seg, _ = tokenize_sequence(lm.tok, prompt, response, lm.max_len)
  model = nnx.merge(lm.graphdef, lm.params)
  logits = np.asarray(model(tokens[None], seg[None])[0], np.float64)  # [T, V]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return sum(logits[t - 1, tokens[t]] - logz[t - 1] for t in range(1, len(tokens)) if mask[t])


def test_sequence_logps_match_the_logits(strong):
  got = mr.sequence_logps(strong, PROMPTS, RESPONSES)  # 3 records, batches of 2: a padded one
  want = [_reference_logp(strong, x, y) for x, y in zip(PROMPTS, RESPONSES)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.all(got < 0)


def test_cdr_is_the_difference_of_log_probs(strong, weak):
  got = mr.cdr(strong, weak, PROMPTS, RESPONSES)
  want = [_reference_logp(strong, x, y) - _reference_logp(weak, x, y)
          for x, y in zip(PROMPTS, RESPONSES)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.abs(got).max() > 1e-3  # two different models do differ
  np.testing.assert_allclose(mr.cdr(strong, strong, PROMPTS, RESPONSES), 0.0, atol=1e-6)
  # The customisation text is seen by both models in front of the prompt.
  sys_text = "be brief. "
  got = mr.cdr(strong, weak, PROMPTS, RESPONSES, system=sys_text)
  want = [_reference_logp(strong, sys_text + x, y) - _reference_logp(weak, sys_text + x, y)
          for x, y in zip(PROMPTS, RESPONSES)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_flr_follow_up_means(strong):
  pos, neg = ["thanks, that helps.", "great answer."], ["that is wrong."]
  ctx = [f"{x} {y} " for x, y in zip(PROMPTS, RESPONSES)]
  one = mr.flr(strong, PROMPTS, RESPONSES, pos[:1])
  np.testing.assert_allclose(one, [_reference_logp(strong, c, pos[0]) for c in ctx],
                             rtol=1e-4, atol=1e-4)
  got = mr.flr(strong, PROMPTS, RESPONSES, pos, neg)
  want = [(_reference_logp(strong, c, pos[0]) + _reference_logp(strong, c, pos[1])) / 2
          - _reference_logp(strong, c, neg[0]) for c in ctx]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="positive"):
    mr.flr(strong, PROMPTS, RESPONSES, [])


def test_length_and_repetition_penalties():
  tok = Tokenizer.load(TOK)
  n = [len(tok.encode(y)) for y in RESPONSES]
  got = mr.length_penalty(tok, 3)(PROMPTS, RESPONSES)
  np.testing.assert_allclose(got, [-max(0, k - 3) / 3 for k in n])
  ids = tok.encode("drum drum drum drum")
  grams = [tuple(ids[j:j + 2]) for j in range(len(ids) - 1)]
  rep = mr.repetition_penalty(tok)(["x"], ["drum drum drum drum"])
  assert rep[0] == pytest.approx(-(1 - len(set(grams)) / len(grams))) and rep[0] < 0
  assert mr.repetition_penalty(tok)(["x"], ["banana."])[0] == 0.0


def test_relevance_is_a_cosine(strong):
  rel = mr.relevance(strong)
  same = rel(PROMPTS, PROMPTS)
  np.testing.assert_allclose(same, 1.0, rtol=1e-6)
  got = rel(PROMPTS, RESPONSES)
  a, b = mr.embed(strong, PROMPTS), mr.embed(strong, RESPONSES)
  want = [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b)]
  np.testing.assert_allclose(got, want, rtol=1e-9)
  assert np.all(np.abs(got) <= 1 + 1e-9)


def test_r3_mixture_is_linear_in_its_weights(strong):
  tok = strong.tok
  comps = {"relevance": mr.relevance(strong), "length": mr.length_penalty(tok, 2),
           "repetition": mr.repetition_penalty(tok)}
  w1 = {"relevance": 1.0, "length": 0.5, "repetition": 0.0}
  w2 = {"relevance": -0.3, "length": 0.0, "repetition": 2.0}
  both = {k: 2 * w1[k] + 3 * w2[k] for k in w1}
  f = lambda w: mr.mixture(comps, w)(PROMPTS, RESPONSES)
  np.testing.assert_allclose(f(both), 2 * f(w1) + 3 * f(w2), rtol=1e-9, atol=1e-12)
  single = mr.mixture(comps, {"length": 1.0})(PROMPTS, RESPONSES)
  np.testing.assert_allclose(single, comps["length"](PROMPTS, RESPONSES))
  with pytest.raises(ValueError, match="unknown reward"):
    mr.mixture(comps, {"fluency": 1.0})


def test_label_picks_argmax_and_argmin_and_counts_ties():
  recs = [{"prompt": "p", "responses": ["aa", "a", "aaa"]},
          {"prompt": "q", "responses": ["b", "c"]}]
  reward = lambda xs, ys: np.array([len(y) if x == "p" else 1.0 for x, y in zip(xs, ys)])
  pairs, ties = label_cli.label(recs, reward)
  assert ties == 1 and pairs == [{"prompt": "p", "chosen": "aaa", "rejected": "a",
                                  "chosen_score": 3.0, "rejected_score": 1.0}]


def test_label_cli_r3_end_to_end(tmp_path, strong):
  from jaxpref.models import convert
  model_dir = tmp_path / "model"
  convert.save_jaxpref(nnx.merge(strong.graphdef, strong.params), str(model_dir))
  cands = tmp_path / "cands.jsonl"
  cands.write_text("".join(json.dumps({"prompt": x, "responses": [y, "banana."]}) + "\n"
                           for x, y in zip(PROMPTS, RESPONSES)))
  out = tmp_path / "pairs.jsonl"
  assert label_cli.main(["r3", f"--in={cands}", f"--out={out}", f"--model={model_dir}",
                         f"--tokenizer={TOK}", "--max_len=32", "--weights=length=1",
                         "--max_tokens=2"]) == 0
  pairs = [json.loads(line) for line in open(out)]
  # Length penalty only: "banana." (the shorter) wins wherever the lengths differ.
  assert pairs and all(p["chosen"] == "banana." for p in pairs)
  assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)


def test_label_cli_errors_name_the_record(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "p", "responses": ["only one"]}) + "\n")
  assert label_cli.main(["r3", f"--in={bad}", f"--out={tmp_path}/o", "--model=x"]) == 2
  assert f"{bad}:1: field 'responses'" in capsys.readouterr().err
  assert label_cli.main(["r3", "--in=x", "--out=y", "--model=m", "--weights=relevance"]) == 2
