"""`--export_hf=PATH`: the trained model of a run as a Hugging Face folder.

The policy is written as its family's `*ForCausalLM` (LoRA adapters merged into the base
first, so the folder is a plain checkpoint); a reward model as `*ForSequenceClassification`
(`hf_reward.save`). The tokenizer files the run read are copied beside the weights, so the
folder loads with `AutoTokenizer` as well when they are Hugging Face files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable

import jax
from flax import nnx

from jaxpref import paths
from jaxpref.data.tokenizer import Tokenizer
from jaxpref.models import hf, hf_reward, hf_write, lora
from jaxpref.models.decoder import Decoder
from jaxpref.models.hf_config import family_of

# Files of a Hugging Face tokenizer, copied when present beside the run's tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def check(cfg) -> None:
  """Start-up check: the model must be one a Hugging Face family represents, or the export
  would fail only after training."""
  if not getattr(cfg, "export_hf", ""):
    return
  try:
    family_of(cfg.model)
  except ValueError as e:
    raise ValueError(f"--export_hf: {e}") from None
  if cfg.role == "reward" and getattr(cfg, "reward_head", "linear") != "linear":
    raise ValueError(f"--export_hf writes a reward model as *ForSequenceClassification, a "
                     f"linear head; --reward_head={cfg.reward_head} has no such form")
  if cfg.role == "reward" and getattr(cfg, "reward_pool", "last") != "last":
    raise ValueError("--export_hf writes a reward model as *ForSequenceClassification, which "
                     f"reads the last token; --reward_pool={cfg.reward_pool} has no such form")
  dtype = getattr(cfg, "export_hf_dtype", None)
  if dtype not in (None, "", "float32", "bfloat16", "float16"):
    raise ValueError(f"--export_hf_dtype must be float32, bfloat16 or float16, got {dtype!r}")
  hf_write.parse_size(getattr(cfg, "export_hf_max_shard_size", None))  # raises naming it
  if getattr(cfg, "export_hf_adapter", False):
    if cfg.lora is None:
      raise ValueError("--export_hf_adapter writes the LoRA adapters; this run has none")
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Decoder(cfg.model,
                                                                       rngs=nnx.Rngs(0)))))
    for path in lora.target_paths(shapes, cfg.lora):
      hf_write.module_name(path)  # raises for an adapter PEFT has no linear form for
      if cfg.model.fused_projections and path.rsplit("/", 1)[-1] in ("q", "k", "v", "gate", "up"):
        raise ValueError(f"--export_hf_adapter: {path} is a part of Phi-3's fused qkv_proj or "
                         f"gate_up_proj, which PEFT adapts whole; only the merged export has it")
  if cfg.init_from and os.path.abspath(cfg.export_hf) == os.path.abspath(cfg.init_from):
    raise ValueError(f"--export_hf={cfg.export_hf!r} is the --init_from folder; the export "
                     "would overwrite the weights the run started from")
  if paths.isfile(cfg.export_hf):
    raise ValueError(f"--export_hf={cfg.export_hf!r} is a file; it names the output folder")


def tokenizer_files(tokenizer: str) -> list[str]:
  """The files of the tokenizer at `tokenizer` (a file, or a Hugging Face folder)."""
  folder = tokenizer if os.path.isdir(tokenizer) else os.path.dirname(tokenizer)
  files = [os.path.join(folder, n) for n in TOKENIZER_FILES
           if os.path.isfile(os.path.join(folder, n))]
  if os.path.isfile(tokenizer) and os.path.abspath(tokenizer) not in map(os.path.abspath, files):
    files.append(tokenizer)
  return files


def _copy_tokenizer(tokenizer: str, path: str) -> list[str]:
  """Copies the tokenizer's files into `path`; a sentencepiece or tokenizers file of another
  name gets the name transformers looks for."""
  out = []
  for f in tokenizer_files(tokenizer):
    name = os.path.basename(f)
    if name not in TOKENIZER_FILES:
      name = "tokenizer.json" if name.endswith(".json") else "tokenizer.model"
    shutil.copyfile(f, os.path.join(path, name))
    out.append(name)
  return out


def host_copy(tree: Any) -> Any:
  """The whole of every (possibly sharded) array as numpy; with several processes every
  process must call it (an all-gather), then only process 0 writes."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # only multi-process exports gather
  return multihost_utils.process_allgather(tree, tiled=True)


def export(cfg, params: Any, frozen: Any = None, say: Callable[[str], None] = print) -> None:
  """Writes the run's model to `cfg.export_hf`. `params` is the train state's params (the
  adapters under LoRA, whose frozen base is `frozen.base`).

  Options the run config may carry (getattr, default in brackets): `export_hf_dtype`
  [float32, as trained], `export_hf_max_shard_size` [one file], `export_hf_adapter`
  [False: under LoRA, also the adapters alone as a PEFT folder, OUT/adapter]."""
  dtype = getattr(cfg, "export_hf_dtype", None) or None
  shard = getattr(cfg, "export_hf_max_shard_size", None) or None
  adapters = params if cfg.lora is not None else None
  if adapters is not None:
    params = lora.merge(frozen.base, params, cfg.lora.scale)
  params = host_copy(params)
  want_adapter = adapters is not None and getattr(cfg, "export_hf_adapter", False)
  if want_adapter:
    adapters = host_copy(adapters)
  if jax.process_index() != 0:
    return
  # gs://: safetensors writes local files, so the folder is written here, then uploaded.
  path = (tempfile.mkdtemp(prefix="jaxpref-export-") if paths.is_remote(cfg.export_hf)
          else cfg.export_hf)
  tok = None
  if cfg.data.tokenizer:
    tok = Tokenizer.load(cfg.data.tokenizer)
  # The tokenizer's files go first: its generation_config.json (sampling defaults) is kept,
  # gaining only the token ids it lacks.
  os.makedirs(path, exist_ok=True)
  copied = _copy_tokenizer(cfg.data.tokenizer, path) if cfg.data.tokenizer else []
  ids = ({} if tok is None else
         hf_write.token_ids(tok.bos_id, tok.eos_id, tok.declared_pad_id))
  if cfg.role == "reward":
    pad, skip, _ = hf_reward.read_rule(cfg.init_from, tok) if tok else (None, -1, None)
    hf_reward.save(params, cfg.model, path, pad_token_id=pad, eos_token_id=ids.get("eos_token_id"),
                   bos_token_id=ids.get("bos_token_id"), skip_id=skip, dtype=dtype,
                   max_shard_size=shard)
    kind = hf.seq_cls_architecture(family_of(cfg.model))
  else:
    hf.save(params, cfg.model, path, dtype=dtype, max_shard_size=shard, ids=ids or None)
    kind = family_of(cfg.model).architecture
  what = "LoRA adapters merged into the base" if cfg.lora is not None else "trained weights"
  if want_adapter:
    hf_write.write_peft_adapter(adapters, cfg.lora.rank, cfg.lora.alpha,
                                os.path.join(path, "adapter"),
                                os.path.abspath(cfg.init_from) if cfg.init_from else "")
    what += "; the adapters alone in adapter/ (PEFT)"
  if path != cfg.export_hf:
    _upload(path, cfg.export_hf)
  say(f"--export_hf: wrote {cfg.export_hf} ({kind}, {what}; tokenizer files: "
      f"{', '.join(copied) or 'none'})")


def _upload(local: str, remote: str) -> None:
  """A local export folder copied to a gs:// one (its earlier weight shards removed first,
  as `hf_write.save_tensors` does locally), then deleted."""
  try:
    for old in paths.glob(paths.join(remote, "model*.safetensors")) + [
        paths.join(remote, hf_write.INDEX_FILE)]:
      if paths.isfile(old):
        paths.remove(old)
    for name in paths.walk_files(local):
      paths.copy(os.path.join(local, name), paths.join(remote, name))
  finally:
    shutil.rmtree(local, ignore_errors=True)
