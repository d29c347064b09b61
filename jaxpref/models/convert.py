"""jaxpref-convert: Hugging Face Llama folders <-> jaxpref model folders, from the shell.

  jaxpref-convert to-jaxpref HF_DIR OUT_DIR [--dtype=float32]
  jaxpref-convert to-hf JAXPREF_DIR OUT_DIR [--dtype=bfloat16]

A jaxpref model folder holds `model_config.json` (the `ModelConfig` fields, i.e. the
`--model.FIELD` flag values) and `params/`, an orbax checkpoint of the Decoder's parameters
as a pure dict (`nnx.to_pure_dict` of its Param state). Orbax because it is what the train
loop already checkpoints with, and it restores straight into sharded arrays for models too
large to stage on one host.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jaxpref.models import hf
from jaxpref.models.decoder import Decoder, ModelConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_jaxpref(model: Decoder, path: str) -> None:
  """Writes a jaxpref model folder (config + orbax parameters); `path` must not hold one."""
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, PARAMS_DIR)):
    raise FileExistsError(f"{path}: already holds {PARAMS_DIR}/; choose an empty folder")
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(dataclasses.asdict(model.config), f, indent=2)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, PARAMS_DIR), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  checkpointer.wait_until_finished()
  checkpointer.close()


def load_jaxpref(path: str, dtype=None) -> tuple[ModelConfig, Decoder]:
  """(config, Decoder) from a folder written by `save_jaxpref`; `dtype` casts the parameters."""
  path = os.path.abspath(path)
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not a jaxpref model folder)")
  with open(file) as f:
    cfg = ModelConfig(**json.load(f))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nnx.to_pure_dict(state))
  checkpointer = ocp.StandardCheckpointer()
  pure = checkpointer.restore(os.path.join(path, PARAMS_DIR), target)
  checkpointer.close()
  if dtype is not None:
    pure = jax.tree.map(lambda x: x.astype(dtype), pure)
  nnx.replace_by_pure_dict(state, pure)
  return cfg, nnx.merge(graphdef, state)


def to_jaxpref(hf_dir: str, out_dir: str, dtype: str = "float32") -> ModelConfig:
  cfg, model = hf.load(hf_dir, jnp.dtype(dtype))
  save_jaxpref(model, out_dir)
  return cfg


def to_hf(jaxpref_dir: str, out_dir: str, dtype: str | None = None) -> ModelConfig:
  cfg, model = load_jaxpref(jaxpref_dir)
  hf.save(model, cfg, out_dir, None if dtype is None else jnp.dtype(dtype))
  return cfg


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxpref-convert", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  a = sub.add_parser("to-jaxpref", help="HF Llama folder -> jaxpref model folder")
  a.add_argument("src", metavar="HF_DIR")
  a.add_argument("dst", metavar="OUT_DIR")
  a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                 help="parameter dtype to store (default float32; bf16 checkpoints upcast "
                      "exactly)")
  b = sub.add_parser("to-hf", help="jaxpref model folder -> HF Llama folder")
  b.add_argument("src", metavar="JAXPREF_DIR")
  b.add_argument("dst", metavar="OUT_DIR")
  b.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                 help="tensor dtype to write (default: as stored)")
  return p


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  convert = to_jaxpref if args.command == "to-jaxpref" else to_hf
  try:
    cfg = convert(args.src, args.dst, args.dtype)
  except (ValueError, OSError) as e:  # user errors: say what is wrong, no traceback
    print(f"jaxpref-convert: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.dst}: {cfg}")
  return 0


def run() -> None:
  sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
  run()
