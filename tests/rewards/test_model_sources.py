"""Model reward sources (jaxpref/rewards/rm_source.py, judge.py, loaded.py) on tiny models:
a reward-model run folder (BT and gated GPM) and a Hugging Face sequence-classification
folder as `rm` / `pref_rm`, and an LLM judge, against float64 computations from the
models' own outputs."""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from cli_util import ROOT
from jaxpref import models
from jaxpref.cli_errors import FlagError
from jaxpref.data import Tokenizer
from jaxpref.data.pairs import tokenize_sequence
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.rewards import judge as judge_lib
from jaxpref.rewards import loaded, rm_source, sources
from jaxpref.train import checkpoint, workdir
from jaxpref.train.config import OnlineConfig
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.state import init_state

TOK = os.path.join(ROOT, "jaxpref", "data", "tiny", "tokenizer.model")
PROMPTS = ["name a fruit.", "which animal do you like?"]
RESPONSES = [["banana.", "drum.", "how about sheep?"], ["sheep.", "golf", "my answer is cat."]]


def _reward_run(path, tiny_config, role="reward", **kw):
  """A run folder as jaxpref-train leaves it: run.json and a checkpoint."""
  cfg = tiny_config(path, role=role, model=models.get_config("tiny", init_std=0.2), **kw)
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  _, state, _ = init_state(cfg, mesh_lib.make_mesh("data:-1"), optimizer)
  ckpt = checkpoint.Checkpointer(os.path.join(path, "checkpoints"), every=1, keep=1)
  ckpt.save(3, state, {"seed": 0, "step": 3}, force=True)
  ckpt.close()
  workdir.record(str(path), workdir.settings_of(cfg, fingerprints=False))
  return str(path), jax.device_get(state.params.to_pure_dict())


@pytest.fixture(scope="module")
def bt_run(tmp_path_factory, tiny_config):
  return _reward_run(tmp_path_factory.mktemp("bt"), tiny_config, loss="bt")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):  # the conftest fixture, at module scope
  from jaxpref.data import make_tiny
  from jaxpref.train.config import DataConfig, RunConfig

  def make(path, **kw):
    data = DataConfig(train_data=f"{make_tiny.OUT}/train.jsonl", tokenizer=TOK, max_len=32)
    return RunConfig(workdir=str(path), data=data, steps=4, progress=False, plot=False, **kw)
  return make


def _hidden(params, cfg, max_len=32):
  """float64 [B, K, T, D] final-norm hidden states of every (prompt, response) row, with
  the rows' last real token [B, K] and response masks [B, K, T] (one jitted forward)."""
  tok = Tokenizer.load(TOK)
  rows = [tokenize_sequence(tok, x, y, max_len) for x, ys in zip(PROMPTS, RESPONSES)
          for y in ys]
  tokens, mask, seg = (np.stack([r[i] for r in rows]) for i in range(3))
  graphdef, dec = loaded.assemble(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0)),
                                  params["decoder"])
  h = jax.jit(lambda p: nnx.merge(graphdef, p).hidden(tokens, segment_ids=seg))(dec)
  last = np.array([np.nonzero(r)[0].max() for r in seg])
  shape = lambda a: a.reshape(2, 3, *a.shape[1:])
  return shape(np.asarray(h, np.float64)), shape(last), shape(mask)


def test_rm_from_a_reward_run_is_the_head_on_the_last_token(bt_run):
  path, params = bt_run
  rm = loaded.load_reward_model(path)
  assert rm.kind == "scalar" and rm.max_len == 32
  got = sources.build("rm", ctx={"reward_model": rm})(PROMPTS, RESPONSES)
  cfg = models.get_config("tiny", init_std=0.2)
  head = np.asarray(params["head"], np.float64)[:, 0]
  h, last, _ = _hidden(params, cfg)
  for b in range(2):
    for k in range(3):
      assert got[b, k] == pytest.approx(h[b, k, last[b, k]] @ head, rel=1e-4, abs=1e-5)
  # pref_rm: Bradley-Terry win rates, mean_j sigmoid(r_i - r_j) over the other K-1
  wins = sources.build("pref_rm", ctx={"reward_model": rm})(PROMPTS, RESPONSES)
  want = [[np.mean([1 / (1 + np.exp(got[b, j] - got[b, i])) for j in range(3) if j != i])
           for i in range(3)] for b in range(2)]
  np.testing.assert_allclose(wins, want, rtol=1e-9, atol=1e-9)


def test_pref_rm_of_a_gated_gpm_run(tmp_path, tiny_config):
  path, params = _reward_run(tmp_path / "gpm", tiny_config, loss="gpm", reward_dim=4,
                             reward_head="gpm_gated")
  rm = loaded.load_reward_model(path)
  assert rm.kind == "gpm_gated"
  p = rm_source.preference_matrix(rm, PROMPTS, RESPONSES)
  np.testing.assert_allclose(p + np.swapaxes(p, 1, 2), 1.0, atol=1e-12)
  cfg = models.get_config("tiny", init_std=0.2)
  head, gate_w = (np.asarray(params[k], np.float64) for k in ("head", "gate_proj"))
  h, last, mask = _hidden(params, cfg)
  for b in range(2):
    v = [h[b, k, last[b, k]] @ head for k in range(3)]
    h_x = h[b, 0, int(np.nonzero(mask[b, 0])[0].min()) - 1]  # the prompt's last token
    z = h_x @ gate_w / np.sqrt(h.shape[-1])
    gate = 2 * np.exp(z - z.max()) / np.exp(z - z.max()).sum()  # k softmax, k = 2
    for i in range(3):
      for j in range(3):
        s = sum(gate[c] * (v[i][2 * c] * v[j][2 * c + 1] - v[i][2 * c + 1] * v[j][2 * c])
                for c in range(2))
        assert p[b, i, j] == pytest.approx(1 / (1 + np.exp(-s)), abs=2e-5)
  with pytest.raises(sources.RewardError, match=r"reward 'rm' raised ValueError: .*pref_rm "
                                                r"\(prompt 0: 'name a fruit.'\)"):
    sources.build("rm", ctx={"reward_model": rm})(PROMPTS, RESPONSES)


@pytest.mark.slow  # imports torch and builds a transformers model: over 10 s on 2 busy cores
def test_rm_from_a_hugging_face_sequence_classification_folder(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  tok = Tokenizer.load(TOK)
  hf_cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                    intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64, num_labels=1,
                                    pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                                    eos_token_id=tok.eos_id)
  model = transformers.LlamaForSequenceClassification(hf_cfg).eval()
  with torch.no_grad():
    for prm in model.parameters():
      prm.normal_(0.0, 0.2)
  folder = tmp_path / "seqcls"
  model.save_pretrained(folder)
  shutil.copy(TOK, folder / "tokenizer.model")
  rm = loaded.load_reward_model(str(folder), max_len=32)
  assert rm.kind == "scalar"
  got = sources.build("rm", ctx={"reward_model": rm})(PROMPTS, RESPONSES)
  for b, x in enumerate(PROMPTS):
    for k, y in enumerate(RESPONSES[b]):
      tokens, _, seg, _ = tokenize_sequence(tok, x, y, 32)
      ids = torch.tensor(tokens[seg > 0][None].astype(np.int64))
      with torch.no_grad():
        want = float(model(input_ids=ids).logits[0, 0])
      assert got[b, k] == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from hf_util import random_llama
  folder = tmp_path_factory.mktemp("judge")
  random_llama(folder, Tokenizer.load(TOK).vocab_size, seed=1)
  shutil.copy(TOK, folder / "tokenizer.model")
  return str(folder)


def test_judge_is_antisymmetric_and_matches_its_logits(judge_folder, tmp_path):
  lm = loaded.load_decoder(judge_folder, "--online.judge_model", max_len=64)
  template = "prompt: {prompt}. one: {a}. two: {b}. the better one is"
  j = judge_lib.Judge(lm, template, ("a", "i"), judge_folder)
  p = j.preferences(PROMPTS, RESPONSES)
  np.testing.assert_allclose(p + np.swapaxes(p, 1, 2), 1.0, atol=1e-12)
  ids = lm.tok.encode("a") + lm.tok.encode("i")
  rows = [(b, i, k) for b in range(2) for i in range(3) for k in range(3) if i != k]
  ids_of = [[lm.tok.bos_id] + lm.tok.encode(template.format(
      prompt=PROMPTS[b], a=RESPONSES[b][i], b=RESPONSES[b][k])) for b, i, k in rows]
  tokens = np.zeros((len(rows), max(map(len, ids_of))), np.int32)
  seg = np.zeros_like(tokens)
  for r, row in enumerate(ids_of):
    tokens[r, :len(row)], seg[r, :len(row)] = row, 1
  logits = np.asarray(jax.jit(lambda p: nnx.merge(lm.graphdef, p)(tokens, seg))(lm.params),
                      np.float64)  # the full forward pass, [N, T, V]
  first = {row: 1 / (1 + np.exp(logits[r, len(ids_of[r]) - 1, ids[1]]
                                - logits[r, len(ids_of[r]) - 1, ids[0]]))
           for r, row in enumerate(rows)}
  for b, i, k in rows:
    want = (first[b, i, k] + 1 - first[b, k, i]) / 2
    assert p[b, i, k] == pytest.approx(want, abs=1e-5)
  wins = sources.build("judge", ctx={"judge": j})(PROMPTS, RESPONSES)
  np.testing.assert_allclose(wins, (p.sum(-1) - 0.5) / 2, atol=1e-12)
  assert 0 < p.min() and p.max() < 1 and np.ptp(wins) > 0


def test_for_online_loads_from_flags_and_names_bad_ones(judge_folder, bt_run, tmp_path):
  tok = Tokenizer.load(TOK)
  o = OnlineConfig(reward="judge+0.5*rm", judge_model=judge_folder, judge_labels="a,i",
                   reward_model=bt_run[0])
  said = []
  reward = rm_source.for_online(o, tok, said.append)
  assert "(the policy's)" in said[0] and "judge" in said[1]
  total, parts = reward.parts(PROMPTS, RESPONSES, valid=np.ones((2, 3), bool))
  np.testing.assert_allclose(total, parts["judge"] + 0.5 * parts["rm"], atol=1e-12)
  bad = tmp_path / "t.txt"
  bad.write_text("prompt {prompt}, first {a}. which?")
  with pytest.raises(FlagError, match=r"^--online.judge_template=.*t.txt: the template lacks "
                                      r"placeholder \{b\} \(it needs .*\)$"):
    rm_source.for_online(dataclasses.replace(o, judge_template=str(bad)), tok, said.append)
  with pytest.raises(FlagError, match=r"--online.judge_labels=A,B: label 'A' is not one"):
    rm_source.for_online(dataclasses.replace(o, judge_labels="A,B"), tok, said.append)
  with pytest.raises(FlagError, match=r"--online.reward_model=.* names neither rm nor pref_rm"):
    rm_source.for_online(dataclasses.replace(o, reward="judge"), tok, said.append)
  with pytest.raises(FlagError, match=r"--online.reward_model=.*: a --role=online run|"
                                      r"--online.reward_model=.*: neither"):
    rm_source.for_online(dataclasses.replace(o, reward_model=judge_folder), tok, said.append)


def test_for_online_decoders_and_hyperparameters_from_flags(judge_folder):
  tok = Tokenizer.load(TOK)
  o = OnlineConfig(reward="cdr+overlong", strong_lm=judge_folder, weak_lm=judge_folder,
                   reward_params="overlong.max_tokens=4;overlong.buffer=2;cdr.system=be brief. ")
  reward = rm_source.for_online(o, tok, lambda line: None)
  lengths = np.array([[1, 3, 4], [2, 2, 9]])
  _, parts = reward.parts(PROMPTS, RESPONSES, lengths=lengths)
  np.testing.assert_array_equal(parts["cdr"], 0.0)  # the same decoder as strong and weak
  np.testing.assert_allclose(parts["overlong"], [[0, -0.5, -1], [0, 0, -1]])  # (2 - L) / 2
  assert dict(reward.terms[1][3]) == {"max_tokens": 4, "buffer": 2}
  bad = dataclasses.replace(o, reward_params="overlong.buffer=two")
  with pytest.raises(FlagError, match=r"^--online.reward=cdr\+overlong: reward source "
                                      r"'overlong': hyperparameter buffer='two' is not an? int"):
    rm_source.for_online(bad, tok, lambda line: None)
  with pytest.raises(FlagError, match=r"--online.strong_lm=.* names none of cdr"):
    rm_source.for_online(dataclasses.replace(o, reward="overlong"), tok, lambda line: None)


def test_a_policy_run_folder_loads_as_the_judge(tmp_path, tiny_config):
  path, params = _reward_run(tmp_path / "policy", tiny_config, role="policy", loss="dpo")
  lm = loaded.load_decoder(path, "--online.judge_model")
  assert lm.max_len == 32 and lm.tok.vocab_size == Tokenizer.load(TOK).vocab_size
  got = jax.tree.leaves(jax.device_get(lm.params.to_pure_dict()))
  want = jax.tree.leaves(params)
  assert len(got) == len(want) > 0
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FlagError, match=r"--online.reward_model=.*policy: a --role=policy run, "
                                      r"not a reward model"):
    loaded.load_reward_model(path)
