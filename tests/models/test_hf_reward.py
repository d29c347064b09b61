"""Reward models from Hugging Face folders (jaxpref/models/hf_reward.py): a
LlamaForSequenceClassification's decoder and score head give the rewards transformers gives
(its logits at the last non-padding token), num_labels sets --reward_dim, a causal-LM folder
gets a fresh head, and a reward model exports back to a sequence-classification folder."""

import dataclasses
import json
import os
import types

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxpref.data import make_tiny  # noqa: E402
from jaxpref.models import convert, hf, hf_export, hf_reward  # noqa: E402
from jaxpref.parallel import mesh as mesh_lib  # noqa: E402
from jaxpref.train import loop  # noqa: E402
from jaxpref.train.roles import reward as reward_step  # noqa: E402
from jaxpref.train.config import DataConfig, RunConfig  # noqa: E402

TINY = make_tiny.OUT
V = 160  # >= the tiny tokenizer's 156 pieces; its pad id 0 is the models' pad_token_id
SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             pad_token_id=0)


def save_random(model, path):
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.eval().save_pretrained(path)
  return str(path), model


@pytest.fixture(scope="module")
def seq_cls(tmp_path_factory):
  """(path, model) of random LlamaForSequenceClassification with 1 and 2 labels."""
  out = {}
  for labels in (1, 2):
    model = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(num_labels=labels, **SHAPE))
    out[labels] = save_random(model, tmp_path_factory.mktemp("hf") / f"cls{labels}")
  return out


def reward_config(workdir, init_from, reward_dim=None, explicit=False):
  dim = hf_reward.reward_dim(init_from, reward_dim or 1, explicit)
  return RunConfig(workdir=str(workdir), model=convert.run_config(init_from, {}),
                   init_from=init_from, role="reward", reward_dim=dim,
                   loss="bt" if dim == 1 else "gpm",  # 2 labels: a GPM embedding
                   reference="model", steps=2, progress=False, plot=False,
                   data=DataConfig(train_data=f"{TINY}/train.jsonl", eval_data="",
                                   tokenizer=f"{TINY}/tokenizer.model"))


def rewards(cfg, tmp_path):
  """(our rewards [N, E], the tokens [N, T]) on 8 tiny pairs, from the loop's own init."""
  s = loop.setup(cfg)
  graphdef, params = reward_step.init_params(cfg, s.mesh)
  batch = s.train_ds.batch(np.arange(8))
  out = np.asarray(reward_step.score(graphdef, params, batch))
  n, t = batch.tokens.shape[0] * batch.tokens.shape[1], batch.tokens.shape[2]
  return out.reshape(n, -1), np.asarray(batch.tokens).reshape(n, t), graphdef, params


@pytest.mark.slow
@pytest.mark.parametrize("labels", [1, 2])
def test_sequence_classification_rewards_equal_transformers(seq_cls, tmp_path, labels):
  path, model = seq_cls[labels]
  cfg = reward_config(tmp_path / "run", path)
  assert cfg.reward_dim == labels  # num_labels sets the reward dimension
  ours, tokens, _, _ = rewards(cfg, tmp_path)
  assert (tokens == 0).any() and (tokens[:, 0] != 0).all()  # padded rows, none all padding
  with torch.no_grad():
    theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  diff = np.abs(ours - theirs).max()
  print(f"hf reward ({labels} labels): max |jaxpref reward - HF logits| = {diff:.3g}")
  assert ours.shape == theirs.shape == (16, labels)
  assert diff <= 1e-4 and np.abs(theirs).std() > 1e-2  # distinct rewards, all matched


def test_reward_dim_contradicting_num_labels_is_an_error(seq_cls):
  path, _ = seq_cls[2]
  with pytest.raises(ValueError, match=r"--reward_dim=1 but .* num_labels=2"):
    hf_reward.reward_dim(path, 1, explicit=True)
  assert hf_reward.reward_dim(path, 1, explicit=False) == 2
  assert hf_reward.num_labels({}) == 2 and hf_reward.num_labels({"id2label": {"0": "a"}}) == 1
  with pytest.raises(ValueError, match="is a LlamaForSequenceClassification, a reward model"):
    convert.load_pretrained(path, convert.run_config(path, {}))  # not a policy


@pytest.mark.slow
def test_causal_lm_folder_gets_a_fresh_head(tmp_path):
  path, _ = save_random(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)),
                        tmp_path / "lm")
  cfg = reward_config(tmp_path / "run", path)
  assert cfg.reward_dim == 1 and not cfg.model.tie_embeddings
  mesh = mesh_lib.make_mesh(cfg.mesh)
  _, params = reward_step.init_params(cfg, mesh)
  _, fresh = reward_step.init_params(dataclasses.replace(cfg, init_from=""), mesh)
  np.testing.assert_array_equal(params["head"][...], fresh["head"][...])  # drawn as without
  _, lm = hf.load(path)
  np.testing.assert_array_equal(params["decoder"]["embed"][...], lm.embed[...])


@pytest.mark.slow
def test_export_round_trips_through_transformers(seq_cls, tmp_path):
  path, _ = seq_cls[1]
  cfg = reward_config(tmp_path / "run", path)
  ours, tokens, graphdef, params = rewards(cfg, tmp_path)
  # A trained head differs from the loaded one: scale it so the check is not a file copy.
  params["head"][...] = params["head"][...] * 3.0
  scaled = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, (t > 0).astype(np.int32)))(
      params, tokens))
  out = str(tmp_path / "export")
  hf_reward.save(params, cfg.model, out, pad_token_id=0)
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  assert written["architectures"] == ["LlamaForSequenceClassification"]
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(theirs, scaled, atol=1e-4)
  np.testing.assert_allclose(scaled, 3.0 * ours, rtol=1e-4, atol=1e-5)
  decoder, head = hf_reward.load(out, convert.run_config(out, {}))
  np.testing.assert_allclose(head, np.asarray(params["head"][...]), rtol=1e-6)


def test_a_head_other_than_linear_is_refused(seq_cls, tmp_path):
  path, _ = seq_cls[1]
  cfg = types.SimpleNamespace(**{**reward_config(tmp_path / "run", path).__dict__,
                                 "reward_head": "pal"})
  with pytest.raises(ValueError, match="holds a linear score head, but --reward_head=pal"):
    hf_reward.init_from(cfg, {})


def test_a_mean_pooled_head_is_refused_both_ways(seq_cls, tmp_path):
  # A sequence-classification head reads the last token: neither start from it nor export to it.
  path, _ = seq_cls[1]
  cfg = types.SimpleNamespace(**{**reward_config(tmp_path / "run", path).__dict__,
                                 "reward_pool": "mean"})
  with pytest.raises(ValueError, match="trained on the last token, but --reward_pool=mean"):
    hf_reward.init_from(cfg, {})
  cfg.export_hf = str(tmp_path / "export")
  with pytest.raises(ValueError, match="reads the last token; --reward_pool=mean"):
    hf_export.check(cfg)


@pytest.mark.slow
def test_reward_run_exports_a_sequence_classifier(seq_cls, tmp_path):
  path, _ = seq_cls[1]
  cfg = dataclasses.replace(reward_config(tmp_path / "run", path),
                            export_hf=str(tmp_path / "export"), log_every=1, eval_every=100,
                            checkpoint_every=100)
  loop.run(cfg)
  out = str(tmp_path / "export")
  assert "tokenizer.model" in os.listdir(out)  # the run's sentencepiece tokenizer, copied
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
  assert model.config.pad_token_id == 0 and model.config.num_labels == 1
  _, head = hf_reward.load(out, convert.run_config(out, {}))
  _, first = hf_reward.load(path, convert.run_config(path, {}))
  assert head.shape == (32, 1) and np.abs(head - first).max() > 0  # trained, then written
