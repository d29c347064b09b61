"""--init_from: training starts from a saved Hugging Face model (or its jaxpref-convert folder);
policy and reference are its weights, so the step-0 DPO loss is log 2 and the policy's
log-probs are the HF model's."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cli_util import metrics, train  # noqa: E402
from hf_util import random_llama  # noqa: E402
from jaxpref import losses  # noqa: E402
from jaxpref.data import make_tiny  # noqa: E402
from jaxpref.models import convert  # noqa: E402
from jaxpref.models.logps import token_logps  # noqa: E402
from jaxpref.train import loop, step  # noqa: E402
from jaxpref.train.config import DataConfig, RunConfig  # noqa: E402
from jaxpref.train.optimizer import make_optimizer  # noqa: E402
from jaxpref.train.roles import policy  # noqa: E402
from jaxpref.train.state import init_state  # noqa: E402

pytestmark = pytest.mark.slow
TINY = make_tiny.OUT
V = 160  # >= the tiny tokenizer's 156 pieces


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A random tiny LlamaForCausalLM, saved: weights far from any init jaxpref would draw."""
  return random_llama(tmp_path_factory.mktemp("hf") / "llama", V)


def run_config(workdir, init_from, **model):
  return RunConfig(workdir=str(workdir), model=convert.run_config(init_from, model),
                   init_from=init_from, steps=2, progress=False, plot=False,
                   data=DataConfig(train_data=f"{TINY}/train.jsonl", eval_data=f"{TINY}/eval.jsonl",
                                   tokenizer=f"{TINY}/tokenizer.model"))


def test_policy_and_reference_start_from_the_checkpoint(hf_dir, tmp_path):
  path, src = hf_dir
  cfg = run_config(tmp_path / "run", path)
  s = loop.setup(cfg)
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  graphdef, state, ref = init_state(cfg, s.mesh, optimizer)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                 jax.tree.leaves(ref.params)))
  batch = s.train_ds.batch(np.arange(8))  # [8 pairs, 2, T]
  got = np.asarray(token_logps(graphdef, state.params, batch))
  toks = np.asarray(batch.tokens).reshape(16, -1)
  with torch.no_grad():
    logp = torch.log_softmax(src(torch.tensor(toks)).logits, -1).numpy()
  want = np.take_along_axis(logp[:, :-1], toks[:, 1:, None], -1)[..., 0]
  want = want * np.asarray(batch.loss_mask).reshape(16, -1)[:, 1:]
  diff = np.abs(got.reshape(16, -1)[:, 1:] - want).max()
  print(f"init_from: max |policy log-prob - HF log-prob| = {diff:.3g}")
  assert diff <= 1e-4 and np.abs(want).max() > 1  # real log-probs, not masked zeros

  _, eval_step = step.make_steps(policy.forward(graphdef), losses.bind("dpo", {}), optimizer)
  metrics_, _ = eval_step(state.params, ref, batch)
  assert float(metrics_["loss"]) == np.float32(np.log(2))  # policy == reference exactly


def test_cli_from_a_converted_folder_and_contradicting_flags(hf_dir, tmp_path):
  path, _ = hf_dir
  convert.to_jaxpref(path, str(tmp_path / "jp"))
  workdir = str(tmp_path / "run")
  # The quickstart's flag file says --model=tiny; the checkpoint's config replaces it.
  train(workdir, f"--init_from={tmp_path / 'jp'}", "--steps=2", "--log_every=1",
        "--eval_every=2", "--checkpoint_every=2", "--noplot", "--model.remat=full")
  first = metrics(workdir, "train")[0]  # computed at the step-0 weights
  assert first["loss"] == pytest.approx(np.log(2), abs=1e-7)
  # The eval mean over batches of different weights rounds in float32: a few ulps.
  assert metrics(workdir, "eval")[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)

  proc = train(str(tmp_path / "bad"), f"--init_from={path}", "--model.d_model=64", check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "--model.d_model=64 but" in proc.stderr and "has d_model=32" in proc.stderr


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="--init_from: .*neither config.json"):
    convert.run_config(str(tmp_path), {})
