"""End-to-end DPO train step on CPU: jaxpref vs Hugging Face TRL's DPOTrainer, in tokens/s.

  python benchmarks/trl_compare.py [--prompt_len=256] [--response_len=256] [--batch_size=2]
      [--steps=5] [--rounds=2] [--d_model=512] [--n_layers=8] ...

TRL runs in its own virtual environment (created once under benchmarks/.trl_venv with the
pins of TRL_PINS), so TRL is never a jaxpref dependency; this script, run with jaxpref's
Python, re-runs itself there with --_trl_worker for the TRL side.

Both sides train the same Llama-style decoder (same sizes, float32, untied embeddings) from
the same initial weights (jaxpref's random init, copied into `LlamaForCausalLM`), with a
frozen reference copy, sigmoid DPO with beta 0.1, AdamW and gradient clipping at 1.0, on
the same batch of `batch_size` pairs of random token ids of fixed lengths (no padding):
each sequence is prompt_len prompt tokens then response_len response tokens, and only the
response tokens count in the log-probs.

What is timed, per step (median over `steps` steps of each of `rounds` rounds, the two
sides alternating round by round so that load from other processes hits both alike):
  jaxpref: one call of the jitted `make_steps` train step (policy forward and backward,
    reference forward, loss, optimizer update), after compilation and one warm-up step.
  TRL: one optimizer step of `DPOTrainer.train()` (max_steps = warm-up + steps), from the
    Trainer's on_step_begin to on_step_end callbacks: `training_step` (policy and reference
    forward, loss, backward) plus gradient clipping, optimizer and scheduler step; the
    collation of the batch by TRL's `DataCollatorForPreference` happens just before and is
    not in it. The Trainer's own train_runtime (which includes collation, logging and the
    warm-up steps) is printed too.
tokens/s = 2 * batch_size * (prompt_len + response_len) / step time for both.
Both fuse the LM head into a chunked log-softmax that recomputes the logits in the
backward, and on CPU TRL 1.16 scores every position as jaxpref does, so the model work per
step is the same. `--shared_prompt` adds a jaxpref line with shared-prompt packing, which
is not like-for-like: each pair's prompt runs once and the LM head sees only response
positions, while the same tokens/step are credited.

`--pack` adds a jaxpref line with `--batching=pack --pack_groups=1`: the same rows and
the same body work, but the LM head only at response positions (what TRL does on CUDA,
not on CPU).

The step-0 check: with identical weights and ids, the two must report the same loss
(log 2, as policy == reference) and the same policy log-probs of the chosen responses.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, ".trl_venv")
# torch 2.13.0 is pinned because its CPU build is what this machine's pip finds locally;
# the rest is what pip resolved with it (checked together).
TRL_PINS = ("torch==2.13.0", "transformers==5.24.0", "trl==1.16.0", "accelerate==1.15.0",
            "datasets==5.2.0")
RESULT = "TRL_RESULT "


def step_timer():
  """A Trainer callback timing each optimizer step (on_step_begin to on_step_end) and
  keeping the logged rows; built in the TRL worker, where transformers is importable."""
  from transformers import TrainerCallback  # the TRL venv's: only the worker has it

  class StepTimer(TrainerCallback):
    def __init__(self):
      self.times, self.logs, self._t0 = [], [], None

    def on_step_begin(self, *unused, **unused_kw):
      self._t0 = time.perf_counter()

    def on_step_end(self, *unused, **unused_kw):
      self.times.append(time.perf_counter() - self._t0)

    def on_log(self, _args, _state, _control, logs=None, **unused_kw):
      self.logs.append(dict(logs or {}))

  return StepTimer()


def ensure_venv() -> str:
  """Python of the TRL virtual environment, created (once) when missing or differently pinned."""
  python = os.path.join(VENV, "bin", "python")
  marker = os.path.join(VENV, "trl_pins.txt")
  wanted = "\n".join(TRL_PINS) + "\n"
  if os.path.exists(marker) and open(marker).read() == wanted:
    return python
  print(f"creating {VENV} with {' '.join(TRL_PINS)} (one-off, about a minute)", flush=True)
  subprocess.check_call([sys.executable, "-m", "venv", VENV])
  subprocess.check_call([python, "-m", "pip", "install", "--quiet", *TRL_PINS])
  with open(marker, "w") as f:
    f.write(wanted)
  return python


def synthetic_ids(args) -> np.ndarray:
  """int32[B, 2, T]: random ids; fixed lengths, so neither side pads or truncates."""
  rng = np.random.default_rng(args.seed)
  t = args.prompt_len + args.response_len
  ids = rng.integers(0, args.vocab_size, (args.batch_size, 2, t), dtype=np.int32)
  ids[:, 1, :args.prompt_len] = ids[:, 0, :args.prompt_len]  # one prompt per pair
  return ids


# ---------------------------------------------------------------------------- jaxpref side

class JaxprefSide:

  def __init__(self, args, ids: np.ndarray, shared_prompt: bool = False, packed: bool = False):
    import jax
    from flax import nnx

    from jaxpref import losses, models
    from jaxpref.data import packing
    from jaxpref.data.shared_prompt import pack
    from jaxpref.train.config import OptimConfig
    from jaxpref.train.optimizer import make_optimizer
    from jaxpref.train.reference import Reference
    from jaxpref.train.roles import policy
    from jaxpref.train.step import TrainState, make_steps
    from jaxpref.types import GroupBatch

    self.jax = jax
    cfg = models.get_config("small", vocab_size=args.vocab_size, d_model=args.d_model,
                            n_layers=args.n_layers, n_heads=args.n_heads,
                            n_kv_heads=args.n_kv_heads, head_dim=args.d_model // args.n_heads,
                            d_ff=args.d_ff, tie_embeddings=False)
    self.cfg = cfg
    self.model = models.Decoder(cfg, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(self.model)
    self.ref = Reference("model", jax.tree.map(lambda x: x.copy(), params))
    # A long schedule keeps the learning rate in its warm-up for every timed step: the
    # update's cost does not depend on it.
    optimizer = make_optimizer(OptimConfig(), 1000)
    self.train_step, _ = make_steps(policy.forward(graphdef), losses.get("dpo"), optimizer)
    b, k, t = ids.shape
    mask = np.zeros((b, k, t), np.float32)
    mask[:, :, args.prompt_len:] = 1.0
    batch = GroupBatch(tokens=ids, loss_mask=mask, segment_ids=np.ones((b, k, t), np.int32),
                       valid=np.ones((b, k), bool), weight=np.ones((b,), np.float32))
    if shared_prompt:
      batch = pack(batch)
    elif packed:  # --batching=pack --pack_groups=1: the same rows, LM head on responses only
      batch = packing.pack(batch, 1, t, args.response_len)
    self.batch = jax.device_put(batch)
    self.state = TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params))
    self.n_params = models.count_params(self.model)

  def weights(self) -> dict:
    """The initial weights as a LlamaForCausalLM state dict (numpy, [out, in] linears)."""
    m, c = self.model, self.cfg
    w = {"model.embed_tokens.weight": m.embed[...], "model.norm.weight": m.final_norm.scale[...],
         "lm_head.weight": m.lm_head[...].T}
    for i, layer in enumerate(m.layers):
      p = f"model.layers.{i}."
      a = layer.attn
      # [D, H, Dh] -> [H*Dh, D]: HF's head-major layout; both use rotate-half RoPE and the
      # same GQA grouping (query head h reads K/V head h // groups), so no permutation.
      w[p + "self_attn.q_proj.weight"] = a.q[...].reshape(c.d_model, -1).T
      w[p + "self_attn.k_proj.weight"] = a.k[...].reshape(c.d_model, -1).T
      w[p + "self_attn.v_proj.weight"] = a.v[...].reshape(c.d_model, -1).T
      w[p + "self_attn.o_proj.weight"] = a.o[...].reshape(-1, c.d_model).T
      w[p + "mlp.gate_proj.weight"] = layer.mlp.gate[...].T
      w[p + "mlp.up_proj.weight"] = layer.mlp.up[...].T
      w[p + "mlp.down_proj.weight"] = layer.mlp.down[...].T
      w[p + "input_layernorm.weight"] = layer.attn_norm.scale[...]
      w[p + "post_attention_layernorm.weight"] = layer.mlp_norm.scale[...]
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in w.items()}

  def step(self):
    self.state, metrics = self.train_step(self.state, self.ref, self.batch)
    return self.jax.block_until_ready(metrics)

  def first_step(self) -> dict:
    """Step 0 (compiles): its metrics are those of the initial weights."""
    del self.model  # its arrays are the ones the donated state is about to give up
    m = self.step()
    return {k: float(v) for k, v in m.items()}

  def time_steps(self, n: int) -> list[float]:
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      self.step()
      times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------- TRL side

def trl_worker(args):
  """Runs inside the TRL venv: loads ids and weights, trains, prints one RESULT line."""
  import copy

  import torch
  import transformers
  import trl
  from datasets import Dataset
  from tokenizers import Tokenizer, models as tok_models
  from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
  from trl import DPOConfig, DPOTrainer

  torch.set_num_threads(args.threads)
  data = np.load(args._trl_worker)
  ids = data["ids"]
  config = LlamaConfig(
      vocab_size=args.vocab_size, hidden_size=args.d_model, intermediate_size=args.d_ff,
      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
      num_key_value_heads=args.n_kv_heads, head_dim=args.d_model // args.n_heads,
      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
      max_position_embeddings=max(2048, ids.shape[-1]), tie_word_embeddings=False,
      attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  model = LlamaForCausalLM(config).to(torch.float32)
  state = {k: torch.from_numpy(data[k]) for k in data.files if k != "ids"}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if "rotary_emb" not in k]
  if missing or unexpected:
    raise RuntimeError(f"weight mapping: missing {missing}, unexpected {unexpected}")
  ref_model = copy.deepcopy(model)

  # The ids come pre-tokenized, so the tokenizer only has to name the pad/EOS tokens.
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
  tok = PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>")),
      pad_token="<pad>", bos_token="<s>", eos_token="</s>")

  p = args.prompt_len
  # One pass over the dataset is exactly one batch, so every step sees the same pairs as
  # jaxpref's (the Trainer's shuffling only reorders pairs within it).
  dataset = Dataset.from_dict({
      "prompt_ids": [r[0, :p].tolist() for r in ids],
      "chosen_ids": [r[0, p:].tolist() for r in ids],
      "rejected_ids": [r[1, p:].tolist() for r in ids]})

  class PreTokenizedDPOTrainer(DPOTrainer):
    # DPOTrainer would tokenize "prompt"/"chosen"/"rejected" text (and append EOS); the
    # dataset already holds the columns that tokenization produces, so it passes as is.
    def _prepare_dataset(self, dataset, *unused_args, **unused_kwargs):
      return dataset

  timer = step_timer()
  dpo_args = DPOConfig(
      output_dir=tempfile.mkdtemp(prefix="trl_compare_"), max_steps=args.warmup + args.steps,
      per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
      learning_rate=1e-3, max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"],
      max_length=None, bf16=False, fp16=False, use_cpu=True,
      # TRL defaults to gradient checkpointing; jaxpref does not recompute activations, so
      # it is off here for a like-for-like step (with it on TRL's step only gets slower).
      gradient_checkpointing=args.trl_gradient_checkpointing,
      logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
      dataloader_num_workers=0, seed=args.seed)
  trainer = PreTokenizedDPOTrainer(model=model, ref_model=ref_model, args=dpo_args,
                                   train_dataset=dataset, processing_class=tok,
                                   callbacks=[timer])
  out = trainer.train()
  first = next(l for l in timer.logs if "loss" in l)
  print(RESULT + json.dumps({
      "step_times": timer.times[args.warmup:], "train_runtime": out.metrics["train_runtime"],
      "train_steps": args.warmup + args.steps,
      "loss0": first["loss"], "logps_chosen0": first["logps/chosen"],
      "logps_rejected0": first["logps/rejected"],
      "optim": getattr(dpo_args.optim, "value", str(dpo_args.optim)),
      "attn": model.config._attn_implementation, "threads": torch.get_num_threads(),
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                   "trl": trl.__version__}}), flush=True)


def run_trl(python: str, argv: list[str], npz: str) -> dict:
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
             TOKENIZERS_PARALLELISM="false")
  proc = subprocess.run([python, os.path.abspath(__file__), *argv, f"--_trl_worker={npz}"],
                        capture_output=True, text=True, env=env)
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT):
      return json.loads(line[len(RESULT):])
  sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-10000:])
  raise SystemExit(f"TRL worker failed (exit {proc.returncode})")


# ---------------------------------------------------------------------------- driver

def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--prompt_len", type=int, default=256)
  parser.add_argument("--response_len", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=2, help="pairs per step")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--warmup", type=int, default=2, help="untimed TRL steps per round")
  parser.add_argument("--vocab_size", type=int, default=32000)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--n_layers", type=int, default=8)
  parser.add_argument("--n_heads", type=int, default=8)
  parser.add_argument("--n_kv_heads", type=int, default=4)
  parser.add_argument("--d_ff", type=int, default=1408)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--trl_gradient_checkpointing", action="store_true",
                      help="TRL's own default; off unless given")
  parser.add_argument("--shared_prompt", action="store_true",
                      help="also time jaxpref with shared-prompt packing (an extra line)")
  parser.add_argument("--pack", action="store_true",
                      help="also time jaxpref with --batching=pack --pack_groups=1 (an extra "
                      "line): every token still computed, the LM head on response positions")
  parser.add_argument("--_trl_worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._trl_worker:
    return trl_worker(args)
  worker_argv = [a for a in sys.argv[1:] if not a.startswith("--_trl_worker")]

  python = ensure_venv()
  import flax
  import jax
  ids = synthetic_ids(args)
  tokens_per_step = ids.size
  sides = {"jaxpref": JaxprefSide(args, ids)}
  if args.shared_prompt:
    sides["jaxpref shared-prompt"] = JaxprefSide(args, ids, shared_prompt=True)
  if args.pack:
    sides["jaxpref pack"] = JaxprefSide(args, ids, packed=True)
  n_params = sides["jaxpref"].n_params
  first, compile_s, times = {}, {}, {name: [] for name in [*sides, "TRL"]}
  with tempfile.TemporaryDirectory() as tmp:
    npz = os.path.join(tmp, "inputs.npz")
    np.savez(npz, ids=ids, **sides["jaxpref"].weights())
    for name, side in sides.items():
      t0 = time.perf_counter()
      first[name] = side.first_step()
      compile_s[name] = time.perf_counter() - t0
      side.step()  # warm-up
    for r in range(args.rounds):
      for name, side in sides.items():
        times[name] += side.time_steps(args.steps)
      trl = run_trl(python, worker_argv, npz)
      times["TRL"] += trl["step_times"]
      # Other processes on the machine skew the timings; the load average shows how much.
      print(f"round {r + 1}/{args.rounds}: median s/step so far: " + ", ".join(
          f"{name} {np.median(t):.3f}" for name, t in times.items())
          + f" (load average {os.getloadavg()[0]:.2f})", flush=True)
  first["TRL"] = {"loss": trl["loss0"], "logps/chosen": trl["logps_chosen0"],
                  "logps/rejected": trl["logps_rejected0"]}

  step = {name: float(np.median(t)) for name, t in times.items()}
  tps = {name: tokens_per_step / s for name, s in step.items()}
  v = trl["versions"]
  print()
  print(f"model: Llama-style, d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} "
        f"heads / {args.n_kv_heads} KV heads (head_dim {args.d_model // args.n_heads}), d_ff "
        f"{args.d_ff}, vocab {args.vocab_size}, untied, float32, {n_params / 1e6:.1f}M "
        f"parameters (+ frozen reference copy)")
  print(f"batch: {args.batch_size} pairs x 2 x ({args.prompt_len} prompt + {args.response_len} "
        f"response) tokens = {tokens_per_step} tokens/step; sigmoid DPO beta 0.1; "
        f"{args.threads} threads; medians of {args.rounds} alternating rounds x {args.steps} "
        f"steps per side")
  print(f"step-0 check (log 2 = {math.log(2):.6f}; same weights, same ids):")
  for name, m in first.items():
    print(f"  {name:22s} loss {m['loss']:.6f}  logps/chosen {m['logps/chosen']:.4f}  "
          f"logps/rejected {m['logps/rejected']:.4f}")
  print(f"jaxpref {jaxpref_version()} (jax {jax.__version__}, flax {flax.__version__}): "
        f"{step['jaxpref']:.3f} s/step, {tps['jaxpref']:,.0f} tokens/s "
        f"(compile + step 0: {compile_s['jaxpref']:.1f} s)")
  print(f"TRL {v['trl']} DPOTrainer (torch {v['torch']}, transformers {v['transformers']}, "
        f"optim {trl['optim']}, attention {trl['attn']}, {trl['threads']} threads): "
        f"{step['TRL']:.3f} s/step, {tps['TRL']:,.0f} tokens/s (train_runtime of the last "
        f"round: {trl['train_runtime']:.1f} s for {trl['train_steps']} steps incl. "
        f"{args.warmup} warm-up)")
  print(f"jaxpref / TRL: x{tps['jaxpref'] / tps['TRL']:.2f} tokens/s (target >= 1.5)")
  if args.pack:
    name = "jaxpref pack"
    print(f"{name} (--batching=pack --pack_groups=1; LM head on response positions only): "
          f"{step[name]:.3f} s/step, {tps[name]:,.0f} tokens/s, x{tps[name] / tps['TRL']:.2f} TRL")
  if args.shared_prompt:
    # Not like-for-like: each pair's prompt is run once instead of twice, and the LM head
    # only on response positions; the same tokens/step are credited.
    name = "jaxpref shared-prompt"
    print(f"{name} (--shared_prompt; prompt computed once per pair): {step[name]:.3f} "
          f"s/step, {tps[name]:,.0f} tokens/s, x{tps[name] / tps['TRL']:.2f} TRL")


def jaxpref_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("jaxpref")
  except metadata.PackageNotFoundError:
    return "(source)"


if __name__ == "__main__":
  main()
