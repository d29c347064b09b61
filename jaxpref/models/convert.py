"""jaxpref-convert: Hugging Face model folders (Llama, Qwen2, Gemma, Gemma 2) <-> jaxpref
model folders, from the shell; and `--init_from`'s reading of either kind of folder.

  jaxpref-convert to-jaxpref HF_DIR OUT_DIR [--dtype=float32]
  jaxpref-convert to-hf JAXPREF_DIR OUT_DIR [--dtype=bfloat16] [--max_shard_size=5GB]
      [--tokenizer=PATH]

A jaxpref model folder holds `model_config.json` (the `ModelConfig` fields, i.e. the
`--model.FIELD` flag values) and `params/`, an orbax checkpoint of the Decoder's parameters
as a pure dict (`nnx.to_pure_dict` of its Param state); from a Hugging Face folder it also
keeps the source's token ids (`hf_token_ids.json`) and `generation_config.json`, so `to-hf`
writes them back. Orbax because it is what the train
loop already checkpoints with, and it restores straight into sharded arrays for models too
large to stage on one host.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jaxpref.cli_errors import entry_point
from jaxpref.data.tokenizer import Tokenizer
from jaxpref.models import hf, hf_write
from jaxpref.models.decoder import Decoder, ModelConfig
from jaxpref.models.hf_config import FAMILIES, with_defaults

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
IDS_FILE = "hf_token_ids.json"


def save_jaxpref(model: Decoder, path: str) -> None:
  """Writes a jaxpref model folder (config + orbax parameters); `path` must not hold one."""
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, PARAMS_DIR)):
    raise FileExistsError(f"{path}: already holds {PARAMS_DIR}/; choose an empty folder")
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    # What the model is, not how the saving run computed it: --attention is each run's own.
    json.dump(dataclasses.asdict(dataclasses.replace(model.config, attention="xla")), f,
              indent=2)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, PARAMS_DIR), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  checkpointer.wait_until_finished()
  checkpointer.close()


def load_jaxpref(path: str, dtype=None, config: ModelConfig | None = None
                 ) -> tuple[ModelConfig, Decoder]:
  """(config, Decoder) from a folder written by `save_jaxpref`; `dtype` casts the parameters;
  `config` (same shapes, e.g. another compute dtype) replaces the stored one."""
  path = os.path.abspath(path)
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not a jaxpref model folder)")
  with open(file) as f:
    cfg = config or ModelConfig(**json.load(f))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nnx.to_pure_dict(state))
  checkpointer = ocp.StandardCheckpointer()
  pure = checkpointer.restore(os.path.join(path, PARAMS_DIR), target)
  checkpointer.close()
  if dtype is not None:
    pure = jax.tree.map(lambda x: x.astype(dtype), pure)
  nnx.replace_by_pure_dict(state, pure)
  return cfg, nnx.merge(graphdef, state)


# ModelConfig fields that say how a run computes, not what the checkpoint is: --model.FIELD
# may set them with --init_from. Any other field comes from the checkpoint.
RUN_FIELDS = ("dtype", "remat", "max_len", "init_std", "attention")


def read_model_config(path: str) -> ModelConfig:
  """The ModelConfig of a Hugging Face folder (config.json) or a jaxpref one (model_config.json)."""
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    with open(os.path.join(path, CONFIG_FILE)) as f:
      return ModelConfig(**json.load(f))
  if os.path.isfile(os.path.join(path, "config.json")):
    return hf.read_config(path)
  raise FileNotFoundError(f"{path}: neither config.json (a Hugging Face model folder) nor "
                          f"{CONFIG_FILE} (a jaxpref-convert folder)")


def run_config(path: str, overrides: dict) -> ModelConfig:
  """The checkpoint's ModelConfig with the --model.FIELD `overrides` that only say how to run;
  one that contradicts the checkpoint raises naming both values."""
  try:
    cfg = read_model_config(path)
  except OSError as e:  # a ValueError, so the CLI prints it as a start-up error
    raise ValueError(f"--init_from: {e}") from e
  clash = [f"--model.{k}={v!r} but {path} has {k}={getattr(cfg, k)!r}"
           for k, v in overrides.items() if k not in RUN_FIELDS and v != getattr(cfg, k)]
  if clash:
    raise ValueError("--init_from gives the model's shape; " + "; ".join(clash) +
                     f" (settable with --init_from: {', '.join(RUN_FIELDS)})")
  return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k in RUN_FIELDS})


def load_pretrained(path: str, cfg: ModelConfig) -> Decoder:
  """The weights at `path` (either kind of folder) in a Decoder of `cfg` (from `run_config`),
  float32."""
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    return load_jaxpref(path, jnp.float32, cfg)[1]
  hf.check_causal(path)
  return hf.model_from_tensors(cfg, hf.read_tensors(path), jnp.float32, where=path)


def to_jaxpref(hf_dir: str, out_dir: str, dtype: str = "float32") -> ModelConfig:
  cfg, model = hf.load(hf_dir, jnp.dtype(dtype))
  save_jaxpref(model, out_dir)
  source = hf.read_json_config(hf_dir)
  family = FAMILIES[source["model_type"]]  # omitted ids: the family's, as transformers reads
  source = with_defaults(source, family.defaults)
  with open(os.path.join(out_dir, IDS_FILE), "w") as f:
    json.dump({k: source.get(k) for k in hf_write.TOKEN_IDS}, f, indent=2)
  generation = os.path.join(hf_dir, hf_write.GENERATION_FILE)
  if os.path.isfile(generation):
    shutil.copyfile(generation, os.path.join(out_dir, hf_write.GENERATION_FILE))
  return cfg


def token_ids_of(jaxpref_dir: str, tokenizer: str = "") -> dict | None:
  """The ids to_hf writes: the tokenizer's when one is given, else those kept by to_jaxpref,
  else None (config.json then names none)."""
  if tokenizer:
    tok = Tokenizer.load(tokenizer)
    return hf_write.token_ids(tok.bos_id, tok.eos_id, tok.declared_pad_id)
  file = os.path.join(jaxpref_dir, IDS_FILE)
  if not os.path.isfile(file):
    return None
  with open(file) as f:
    return json.load(f)


def to_hf(jaxpref_dir: str, out_dir: str, dtype: str | None = None,
          max_shard_size: str | None = None, tokenizer: str = "") -> ModelConfig:
  cfg, model = load_jaxpref(jaxpref_dir)
  ids = token_ids_of(jaxpref_dir, tokenizer)
  generation = os.path.join(jaxpref_dir, hf_write.GENERATION_FILE)
  if ids and os.path.isfile(generation):  # the source's sampling defaults, ids filled in
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(generation, os.path.join(out_dir, hf_write.GENERATION_FILE))
  hf.save(model, cfg, out_dir, None if dtype is None else jnp.dtype(dtype), max_shard_size, ids)
  return cfg


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxpref-convert", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  a = sub.add_parser("to-jaxpref", help="HF model folder -> jaxpref model folder")
  a.add_argument("src", metavar="HF_DIR")
  a.add_argument("dst", metavar="OUT_DIR")
  a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                 help="parameter dtype to store (default float32; bf16 checkpoints upcast "
                      "exactly)")
  b = sub.add_parser("to-hf", help="jaxpref model folder -> HF model folder")
  b.add_argument("src", metavar="JAXPREF_DIR")
  b.add_argument("dst", metavar="OUT_DIR")
  b.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                 help="tensor dtype to write (default: as stored)")
  b.add_argument("--max_shard_size", default=None,
                 help="split the weights into shards of at most this size (e.g. 5GB, 500MB) "
                      "with model.safetensors.index.json (default: one file)")
  b.add_argument("--tokenizer", default="",
                 help="the tokenizer whose BOS/EOS/pad ids config.json and "
                      "generation_config.json name (default: the ids the folder kept from "
                      "its Hugging Face source, if any)")
  return p


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "to-jaxpref":
      cfg = to_jaxpref(args.src, args.dst, args.dtype)
    else:
      cfg = to_hf(args.src, args.dst, args.dtype, args.max_shard_size, args.tokenizer)
  except (ValueError, OSError) as e:  # user errors: say what is wrong, no traceback
    print(f"jaxpref-convert: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.dst}: {cfg}")
  return 0


def run() -> None:
  entry_point(main)(sys.argv[1:])


if __name__ == "__main__":
  run()
