"""`jaxpref-generate`: samples from a model for every prompt of a file, through the online
role's rollout path (the same prompt layout, sampler, buckets and keys).

  jaxpref-generate --flagfile=experiments/online/base.flags --init_from=runs/online/sft_hf \\
      --prompts=jaxpref/data/tiny/prompts_eval.jsonl --samples_out=samples.jsonl
  jaxpref-generate --run=runs/online/grpo --prompts=... --samples_out=...  # its checkpoint

The model is `--init_from` (a Hugging Face or jaxpref-convert folder), or with `--run` a
policy run's latest checkpoint (its `flags.txt` read first; later flags override it).
`--online.num_generations` samples per prompt at `--online.temperature`, `top_k`, `top_p`,
up to `--online.max_new_tokens`, with the key of `--seed`. Each prompt gives one line
`{"prompt": ..., "responses": [...], "finished": [...]}` (finished: ended on EOS).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import app, flags, logging

from jaxpref import cli_errors
from jaxpref import flags as jflags
from jaxpref.data import chat, chat_template, prompts
from jaxpref.data.tokenizer import Tokenizer
from jaxpref.parallel import mesh as mesh_lib
from jaxpref.train import checkpoint as ckpt_lib
from jaxpref.train.online import Rollouts
from jaxpref.train.optimizer import make_optimizer
from jaxpref.train.setup import Setup
from jaxpref.train.state import init_state

flags.DEFINE_string("prompts", None, "jaxpref-generate: the prompts (any prompt-bearing file).")
flags.DEFINE_string("samples_out", None, "jaxpref-generate: the JSONL of samples to write.")
flags.DEFINE_string("run", "", "jaxpref-generate: a policy run's folder; its flags.txt and "
                    "latest checkpoint give the model.")
flags.DEFINE_integer("generate_batch", 16, "jaxpref-generate: prompts sampled together.")

FLAGS = flags.FLAGS


def _model(cfg, mesh):
  """(graphdef, policy params): `--init_from`'s weights, or the run's latest checkpoint."""
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  graphdef, state, ref = init_state(cfg, mesh, optimizer)
  if FLAGS.run:
    ckpt = ckpt_lib.Checkpointer(os.path.join(FLAGS.run, "checkpoints"), 1, 1)
    try:
      if ckpt.latest_step is None:
        raise cli_errors.WorkdirError(f"{FLAGS.run}/checkpoints: no checkpoint to sample from")
      restored, _, step = ckpt.restore(ckpt_lib.saved_layout(cfg, state, ref.params))
      state = restored["train"] if ckpt_lib.holds_reference(cfg) else restored
    finally:
      ckpt.close()
    logging.info("restored step %d of %s", step, FLAGS.run)
  lora_scale = cfg.lora.scale if cfg.lora is not None else None
  return graphdef, ref.policy(state.params, lora_scale)


def generate(cfg, path: str, out: str, batch: int) -> int:
  """Samples every prompt of `path` and writes `out`; returns the number of prompts."""
  tok = Tokenizer.load(cfg.data.tokenizer)
  with chat.using(chat_template.resolve(cfg.data.chat_template, tok)):
    ds = prompts.load(path, tok, cfg.data.max_len - 1, cfg.data.fields, cfg.data.skip_invalid)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, params = _model(cfg, mesh)
  rollouts = Rollouts(cfg, Setup(cfg, ds, None, mesh, tokenizer=tok), graphdef, mesh)
  k = cfg.online.num_generations
  key = jax.random.key(cfg.seed)
  with open(out + ".tmp", "w") as f:
    for start in range(0, ds.n, batch):
      idx = np.arange(start, min(start + batch, ds.n))
      tokens, starts, ends, finished = rollouts.sample(
          params, ds, idx, k, cfg.online.temperature, jax.random.fold_in(key, start))
      texts = rollouts.decode(tokens, starts, ends)
      for j, i in enumerate(idx):
        f.write(json.dumps({"prompt": ds.texts[i], "responses": texts[j * k:(j + 1) * k],
                            "finished": [bool(x) for x in finished[j * k:(j + 1) * k]]}) + "\n")
  os.replace(out + ".tmp", out)
  return ds.n


def main(argv: list[str]) -> None:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("prompts", "samples_out"):
    if not FLAGS[name].value:
      raise cli_errors.FlagError(f"jaxpref-generate: --{name} is required")
  # The training flags want a workdir; nothing is written there.
  workdir = (FLAGS.workdir or FLAGS.run
             or os.path.dirname(os.path.abspath(FLAGS.samples_out)))
  try:
    cfg = jflags.to_config(workdir)
  except ValueError as e:
    raise cli_errors.FlagError(str(e)) from e
  n = generate(cfg, FLAGS.prompts, FLAGS.samples_out, FLAGS.generate_batch)
  print(f"wrote {n} prompts x {cfg.online.num_generations} samples to {FLAGS.samples_out}")


def _parse(argv: list[str]) -> list[str]:
  """--run=DIR reads DIR/flags.txt before the command line's flags (which override it)."""
  run = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--run=")), "")
  saved = os.path.join(run, "flags.txt")
  if run and not os.path.isfile(saved):
    raise SystemExit(f"FATAL: {saved}: no such file (is --run a jaxpref-train run folder?)")
  return jflags.parse(argv[:1] + ([f"--flagfile={saved}"] if run else []) + argv[1:])


def run() -> None:
  cli_errors.entry_point(app.run)(main, flags_parser=_parse)


if __name__ == "__main__":
  run()
