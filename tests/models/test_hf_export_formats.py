"""Exports a Hugging Face user can load as they are: token ids in config.json and
generation_config.json, float32 or bfloat16 tensors, shards with an index, and LoRA adapters
as a PEFT folder; transformers (and peft) load each with the logits jaxpref computes."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxpref.data import make_tiny  # noqa: E402
from jaxpref.models import convert, hf, hf_export, hf_write, lora  # noqa: E402

V = 160
TINY = make_tiny.OUT


def random_llama(path, pad=0, tie=False):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64,
                                 bos_token_id=2, eos_token_id=3, pad_token_id=pad,
                                 tie_word_embeddings=tie)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.generation_config.temperature = 0.7  # a sampling default the export must keep
  model.generation_config.do_sample = True
  model.save_pretrained(path)
  return str(path), model


def toks(seed=0):
  return np.random.default_rng(seed).integers(4, V, (2, 24))


def their_logits(path, ids, **kw):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy(), model


def test_parse_size_and_plan():
  assert hf_write.parse_size("5GB") == 5 * 10**9 and hf_write.parse_size("2GiB") == 2 * 2**30
  assert hf_write.parse_size("40KB") == 40_000 and hf_write.parse_size(None) is None
  assert hf_write.parse_size(0) is None and hf_write.parse_size(1234) == 1234
  with pytest.raises(ValueError, match="expected bytes or a size"):
    hf_write.parse_size("lots")
  arrays = {n: np.zeros(s, np.float32) for n, s in (("a", 10), ("b", 10), ("c", 30), ("d", 1))}
  # 40 + 40 > 100? no; + 120 > 100: new shard; the 120-byte tensor alone over the limit.
  assert hf_write.plan_shards(arrays, 100) == [["a", "b"], ["c"], ["d"]]
  assert hf_write.plan_shards(arrays, None) == [["a", "b", "c", "d"]]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_to_hf_writes_ids_dtype_and_shards_transformers_loads(tmp_path, dtype):
  src_path, src = random_llama(tmp_path / "src")
  assert convert.main(["to-jaxpref", src_path, str(tmp_path / "jp")]) == 0
  out = str(tmp_path / "out")
  assert convert.main(["to-hf", str(tmp_path / "jp"), out, f"--dtype={dtype}",
                       "--max_shard_size=40KB"]) == 0
  files = sorted(os.listdir(out))
  shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
  assert len(shards) > 1 and hf.INDEX_FILE in files and hf.SINGLE_FILE not in files
  with open(os.path.join(out, hf.INDEX_FILE)) as f:
    index = json.load(f)
  assert sorted(set(index["weight_map"].values())) == shards
  config = json.load(open(os.path.join(out, "config.json")))
  generation = json.load(open(os.path.join(out, hf_write.GENERATION_FILE)))
  ids = dict(bos_token_id=2, eos_token_id=3, pad_token_id=0)
  assert {k: config[k] for k in ids} == ids and {k: generation[k] for k in ids} == ids
  assert generation["temperature"] == 0.7  # the source's sampling defaults kept
  assert config["torch_dtype"] == dtype

  ids_in = toks()
  theirs, model = their_logits(out, ids_in, dtype="auto")
  assert next(model.parameters()).dtype == getattr(torch, dtype)
  assert model.generation_config.eos_token_id == 3 and model.generation_config.pad_token_id == 0
  _, ours = hf.load(out)  # the written tensors, upcast exactly
  diff = float(np.abs(np.asarray(ours(jnp.asarray(ids_in, jnp.int32))) - theirs).max())
  print(f"to-hf {dtype} sharded: max |jaxpref - transformers logit| = {diff:.3g}")
  assert diff <= (1e-4 if dtype == "float32" else 5e-2)  # bf16: torch computes in bf16
  if dtype == "float32":  # and equal to the source model's
    np.testing.assert_allclose(theirs, their_logits(src_path, ids_in)[0], atol=1e-5, rtol=0)
  else:  # transformers' own float32 reading of the bf16 tensors agrees to float32 precision
    theirs32, _ = their_logits(out, ids_in, dtype=torch.float32)
    assert np.abs(np.asarray(ours(jnp.asarray(ids_in, jnp.int32))) - theirs32).max() <= 1e-4


def test_to_hf_token_ids_from_a_tokenizer_and_none(tmp_path):
  from jaxpref import models
  model = models.Decoder(models.get_config("tiny", vocab_size=V), rngs=nnx.Rngs(0))
  convert.save_jaxpref(model, str(tmp_path / "jp"))
  assert convert.main(["to-hf", str(tmp_path / "jp"), str(tmp_path / "plain")]) == 0
  config = json.load(open(tmp_path / "plain" / "config.json"))
  assert "eos_token_id" not in config  # no source, no tokenizer: nothing invented
  assert not os.path.exists(tmp_path / "plain" / hf_write.GENERATION_FILE)
  assert convert.main(["to-hf", str(tmp_path / "jp"), str(tmp_path / "tok"),
                       f"--tokenizer={TINY}/tokenizer.model"]) == 0
  config = json.load(open(tmp_path / "tok" / "config.json"))
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 0)


def random_adapters(params, targets, seed=1):
  cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
  ads = lora.init(params, cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  for ad in ads.values():  # B != 0, so the adapters change the logits
    ad["lora_b"] = jnp.asarray(rng.normal(0, 0.3, ad["lora_b"].shape), jnp.float32)
  return cfg, ads


@pytest.mark.slow
@pytest.mark.parametrize("targets", [lora.TARGETS, ("layers/1/attn/[qv]", "down")],
                         ids=["all", "some_layers"])
def test_peft_adapter_loads_onto_the_base_with_equal_logits(tmp_path, targets):
  peft = pytest.importorskip("peft")
  base_path, _ = random_llama(tmp_path / "base")
  cfg, model = hf.load(base_path)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  lcfg, ads = random_adapters(pure, targets)
  merged = lora.merge(pure, ads, lcfg.scale)
  graphdef = nnx.split(model)[0]
  ids_in = toks(1)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, merged)
  ours = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(ids_in)))
  hf_write.write_peft_adapter(ads, lcfg.rank, lcfg.alpha, str(tmp_path / "adapter"), base_path)
  base = transformers.AutoModelForCausalLM.from_pretrained(base_path).eval()
  with torch.no_grad():
    plain = base(torch.tensor(ids_in)).logits.numpy()
  tuned = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    theirs = tuned(torch.tensor(ids_in)).logits.numpy()
  diff = float(np.abs(ours - theirs).max())
  print(f"peft adapter ({targets}): max |jaxpref merged - peft logit| = {diff:.3g}; "
        f"the adapter moves logits by {np.abs(theirs - plain).max():.3g}")
  assert diff <= 1e-4 and np.abs(theirs - plain).max() > 1e-2


def test_peft_refuses_adapters_it_has_no_form_for():
  with pytest.raises(ValueError, match="adapter on embed has no such form"):
    hf_write.module_name("embed")
  assert hf_write.module_name("layers/3/mlp/gate") == "model.layers.3.mlp.gate_proj"


@pytest.mark.slow
def test_export_hf_writes_dtype_shards_ids_and_adapter(tmp_path):
  """hf_export.export as the loop calls it at the end of a LoRA run, with the options the
  run config may carry (export_hf_dtype, export_hf_max_shard_size, export_hf_adapter)."""
  peft = pytest.importorskip("peft")
  base_path, _ = random_llama(tmp_path / "base")
  cfg_m, model = hf.load(base_path)
  base = nnx.state(model, nnx.Param)
  lcfg, ads = random_adapters(nnx.to_pure_dict(base), lora.TARGETS)
  out = str(tmp_path / "export")
  run = types.SimpleNamespace(
      lora=lcfg, export_hf=out, role="policy", model=cfg_m, init_from=base_path,
      data=types.SimpleNamespace(tokenizer=f"{TINY}/tokenizer.model"),
      export_hf_dtype="bfloat16", export_hf_max_shard_size="40KB", export_hf_adapter=True)
  said = []
  hf_export.export(run, ads, lora.Frozen(base=base), said.append)
  assert "adapter/ (PEFT)" in said[0]
  files = os.listdir(out)
  assert hf.INDEX_FILE in files and "tokenizer.model" in files
  config = json.load(open(os.path.join(out, "config.json")))
  assert (config["torch_dtype"], config["eos_token_id"], config["pad_token_id"]) == (
      "bfloat16", 3, 0)
  ids_in = toks(2)
  merged, _ = their_logits(out, ids_in, dtype=torch.float32)
  tuned = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base_path), os.path.join(out, "adapter"))
  with torch.no_grad():
    theirs = tuned.eval()(torch.tensor(ids_in)).logits.numpy()
  # The merged export is bf16-rounded; the adapter applies to the float32 base exactly.
  assert np.abs(merged - theirs).max() < 0.2


def test_export_check_reads_the_options(tmp_path):
  from jaxpref import models
  base = dict(export_hf=str(tmp_path / "out"), role="policy", init_from="", lora=None,
              model=models.get_config("tiny"))
  check = lambda **kw: hf_export.check(types.SimpleNamespace(**{**base, **kw}))
  check(export_hf_dtype="bfloat16", export_hf_max_shard_size="2GB")
  with pytest.raises(ValueError, match="--export_hf_dtype must be"):
    check(export_hf_dtype="int8")
  with pytest.raises(ValueError, match="max shard size 'big'"):
    check(export_hf_max_shard_size="big")
  with pytest.raises(ValueError, match="this run has none"):
    check(export_hf_adapter=True)
  check(export_hf_adapter=True, lora=lora.LoraConfig(rank=2))
  with pytest.raises(ValueError, match="adapter on embed has no such form"):
    check(export_hf_adapter=True, lora=lora.LoraConfig(rank=2, targets=("q", "embed")))
