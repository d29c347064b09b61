"""--export_hf: a run from a Hugging Face folder writes its trained policy (LoRA merged) as a
folder transformers loads, with the same logits, and the tokenizer files beside it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from cli_util import ROOT, train  # noqa: E402
from hf_util import random_llama  # noqa: E402
from jaxpref import models  # noqa: E402
from jaxpref.data import Tokenizer, make_tiny  # noqa: E402
from jaxpref.models import convert, hf_export, lora  # noqa: E402
from jaxpref.train import loop  # noqa: E402
from jaxpref.train.config import DataConfig, OptimConfig, RunConfig  # noqa: E402

TINY = make_tiny.OUT
V = 160  # >= the 150 tokens of the tokenizer below


def write_tokenizer(path):
  """A small BPE tokenizer.json trained on the tiny corpus, with its tokenizer_config.json."""
  from tokenizers import decoders, models as tk_models, pre_tokenizers, trainers
  with open(os.path.join(TINY, "corpus.txt")) as f:
    lines = [line.strip() for line in f if line.strip()]
  tk = tokenizers.Tokenizer(tk_models.BPE(unk_token="<unk>"))
  tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
  tk.train_from_iterator(lines, trainers.BpeTrainer(
      vocab_size=150, special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
  tk.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
               "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A random tiny LlamaForCausalLM with a tokenizer, as a Hub folder would hold it."""
  path, _ = random_llama(tmp_path_factory.mktemp("hf") / "llama", V)
  write_tokenizer(path)
  return path


def lora_config(workdir, init_from, export):
  return RunConfig(
      workdir=str(workdir), model=convert.run_config(init_from, {}), init_from=init_from,
      lora=lora.LoraConfig(rank=4, alpha=8.0), reference="lora_base", export_hf=str(export),
      optim=OptimConfig(learning_rate=3e-2, warmup_steps=0, min_lr_ratio=1.0),
      steps=3, log_every=1, eval_every=100, checkpoint_every=100, progress=False, plot=False,
      data=DataConfig(train_data=f"{TINY}/train.jsonl", eval_data="", tokenizer=init_from))


@pytest.mark.slow
def test_lora_run_exports_the_merged_model(hf_dir, tmp_path, monkeypatch):
  seen = {}
  real = hf_export.export

  def spy(cfg, params, frozen, say):  # keeps what the loop hands over, to compare against
    seen.update(params=params, base=frozen.base)
    return real(cfg, params, frozen, say)

  monkeypatch.setattr(hf_export, "export", spy)
  cfg = lora_config(tmp_path / "run", hf_dir, tmp_path / "export")
  loop.run(cfg)
  out = str(tmp_path / "export")
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                     "model.safetensors", "tokenizer.json",
                                     "tokenizer_config.json"]
  trained_b = max(float(jnp.abs(ad["lora_b"]).max()) for ad in seen["params"].values())
  assert trained_b > 1e-3  # the adapters moved, so the merge matters

  merged = lora.merge(seen["base"], seen["params"], cfg.lora.scale)
  graphdef = nnx.split(nnx.eval_shape(lambda: models.Decoder(cfg.model, rngs=nnx.Rngs(0))))[0]
  tok = Tokenizer.load(out)
  ids = np.array([[tok.bos_id] + tok.encode("name a fruit. i would say apple.")], np.int32)
  ours = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(merged, ids))
  base = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(seen["base"], ids))

  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  diff = np.abs(ours - theirs).max()
  print(f"export_hf: max |jaxpref merged logits - transformers logits| = {diff:.3g}; "
        f"merge changed logits by {np.abs(ours - base).max():.3g}")
  assert diff <= 1e-4
  assert np.abs(ours - base).max() > 1e-3  # the export is the adapted model, not the base
  with torch.no_grad():
    generated = model.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=4,
                               do_sample=False, pad_token_id=tok.pad_id)
  assert generated.shape == (1, ids.shape[1] + 4)
  fast = transformers.PreTrainedTokenizerFast.from_pretrained(out)
  assert fast.encode("name a fruit.", add_special_tokens=False) == tok.encode("name a fruit.")


def test_export_check_refuses_what_it_cannot_write(tmp_path):
  file = tmp_path / "f"
  file.write_text("")
  cfg = RunConfig(workdir=str(tmp_path), model=models.get_config("tiny"), export_hf=str(file))
  with pytest.raises(ValueError, match="--export_hf=.* is a file"):
    hf_export.check(cfg)
  gelu_llama = models.get_config("tiny", mlp_activation="gelu_tanh")
  with pytest.raises(ValueError, match="--export_hf: .*no Hugging Face family"):
    hf_export.check(RunConfig(workdir=str(tmp_path), model=gelu_llama, export_hf="out"))


@pytest.mark.slow
def test_lora_from_hf_flagfile_trains_and_exports_a_model_transformers_generates_with(
    hf_dir, tmp_path):
  """experiments/lora_from_hf.flags as documented, on a random Llama folder: the folder's
  tokenizer is used, step 0 is log 2 (the base is the reference), and the merged export
  loads in transformers and generates. The export flags through jaxpref-train: bfloat16
  weights, sharded files with an index, and the adapters as a PEFT folder."""
  proc = train(str(tmp_path / "run"), f"--init_from={hf_dir}",
               f"--export_hf={tmp_path / 'export'}", "--steps=4", "--eval_every=4",
               "--checkpoint_every=4", "--log_every=1", "--noplot",
               "--export_hf_dtype=bfloat16", "--export_hf_max_shard_size=20KB",
               "--export_hf_adapter",
               flagfile=os.path.join(ROOT, "experiments", "lora_from_hf.flags"))
  export = tmp_path / "export"
  index = json.loads((export / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  from safetensors import safe_open
  with safe_open(str(export / next(iter(index["weight_map"].values()))), "np") as f:
    assert all(str(f.get_slice(k).get_dtype()) == "BF16" for k in f.keys())
  adapter = json.loads((export / "adapter" / "adapter_config.json").read_text())
  assert adapter["r"] == 8 and adapter["lora_alpha"] == 16  # the flag file's rank and alpha
  peft = pytest.importorskip("peft")
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  tuned = peft.PeftModel.from_pretrained(base, str(export / "adapter"))
  b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
  assert b and any(float(p.abs().max()) > 0 for p in b)  # trained: B moved off its zero init
  log = proc.stdout + proc.stderr
  assert "tokenizer: " + os.path.join(hf_dir, "tokenizer.json") in log
  assert "--export_hf: wrote" in log
  first = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")
           if '"eval"' in line][0]
  assert first["step"] == 0 and abs(first["loss"] - np.log(2)) < 1e-6
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
  tok = Tokenizer.load(str(tmp_path / "export"))
  ids = torch.tensor([[tok.bos_id] + tok.encode("name a fruit.")], dtype=torch.long)
  with torch.no_grad():
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_id)
  assert out.shape == (1, ids.shape[1] + 4)


@pytest.mark.slow
def test_cli_uses_the_folders_tokenizer_and_exports(hf_dir, tmp_path):
  flagfile = tmp_path / "run.flags"
  flagfile.write_text("\n".join([
      f"--train_data={TINY}/train.jsonl", "--eval_data=", "--max_len=32", "--batch_size=8",
      "--steps=2", "--log_every=1", "--eval_every=2", "--checkpoint_every=2", "--noplot",
      f"--init_from={hf_dir}", f"--export_hf={tmp_path / 'export'}"]))
  proc = train(str(tmp_path / "run"), flagfile=str(flagfile))
  log = proc.stdout + proc.stderr
  assert "tokenizer: " + os.path.join(hf_dir, "tokenizer.json") in log
  assert "(the --init_from folder's)" in log
  with open(tmp_path / "run" / "flags.txt") as f:  # a re-run reads the same tokenizer
    assert f"--tokenizer={os.path.join(hf_dir, 'tokenizer.json')}" in f.read().split("\n")
  assert "--export_hf: wrote" in log and "LlamaForCausalLM" in log
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
  assert model.config.vocab_size == V
  assert os.path.isfile(tmp_path / "export" / "tokenizer.json")
