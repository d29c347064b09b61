"""`--init_from` streamed into the sharded layout (jaxpref/models/streaming.py): the same
weights as the whole-model load, in the shardings the rules give, from HF folders (single
file, sharded with an index, Phi-3's fused tensors, Mixtral's per-expert tensors) and jaxpref
folders."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxpref import models
from jaxpref.models import convert, hf, streaming
from jaxpref.parallel import mesh as mesh_lib, sharding

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _save(tmp_path, family: str, shard: bool):
  torch.manual_seed(0)
  common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  if family == "phi3":
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**common, pad_token_id=0))
  elif family == "mixtral":
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **common, num_local_experts=4, num_experts_per_tok=2))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  path = tmp_path / f"{family}_{shard}"
  model.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
  return str(path)


def _streamed(path: str, cfg, mesh):
  graphdef, params = sharding.init_params(lambda: models.Decoder(cfg, rngs=nnx.Rngs(1)), mesh)
  return graphdef, streaming.load_into(path, cfg, params)


@pytest.mark.parametrize("family,shard", [("llama", False), ("llama", True), ("phi3", False),
                                          ("mixtral", True)])
def test_hf_folder_streams_into_the_rules_shardings(tmp_path, family, shard):
  path = _save(tmp_path, family, shard)
  if shard:
    assert len(hf.shard_files(path)) > 1  # the index names several files
  cfg, whole = hf.load(path)
  mesh = mesh_lib.make_mesh("data:2,fsdp:2,tensor:2")
  _, params = _streamed(path, cfg, mesh)
  _, abstract = sharding.abstract_params(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0)), mesh)
  want = jax.tree.leaves(nnx.state(whole, nnx.Param))
  got, shapes = jax.tree.leaves(params), jax.tree.leaves(abstract)
  assert len(got) == len(want) == len(shapes)
  for g, w, s in zip(got, want, shapes):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert g.sharding == s.sharding and g.dtype == s.dtype
  # Sharded for real: the embedding [V, D] is cut over tensor and fsdp, a quarter per device.
  embed = nnx.to_pure_dict(params)["embed"]
  assert embed.addressable_shards[0].data.shape == (96 // 2, 32 // 2)


def test_jaxpref_folder_restores_into_the_shardings(tmp_path):
  cfg = models.get_config("tiny", n_layers=2)
  model = models.Decoder(cfg, rngs=nnx.Rngs(5))
  convert.save_jaxpref(model, str(tmp_path / "jp"))
  mesh = mesh_lib.make_mesh("fsdp:4,tensor:2")
  _, params = _streamed(str(tmp_path / "jp"), cfg, mesh)
  for g, w in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(model, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  q = nnx.to_pure_dict(params)["layers"][0]["attn"]["q"]
  assert tuple(q.sharding.spec) == ("fsdp", "tensor")


def test_a_wrong_shape_names_the_tensor(tmp_path):
  path = _save(tmp_path, "llama", False)
  cfg = dataclasses.replace(hf.read_config(path), d_ff=48)
  with pytest.raises(hf.UnsupportedCheckpoint, match=r"layers/0/mlp/gate has shape \(32, 64\)"):
    _streamed(path, cfg, mesh_lib.make_mesh("data:-1"))
