"""Online GRPO step on CPU, jaxpref's online loop vs TRL's GRPOTrainer (tokens/s), jaxpref's
step split, and sampled tokens/s of jaxpref's sampler vs transformers `generate`.

  python benchmarks/trl_grpo_compare.py [--batch_size=4] [--num_generations=4] [--steps=3] ...
TRL runs in trl_compare.py's venv (benchmarks/.trl_venv): this script re-runs itself there
as a worker, so TRL is never a jaxpref dependency. Both sides read one folder written here
(the `--preset` model saved by `hf.save`, a word-level tokenizer.json, random-word prompts)
and run the same step: K samples per prompt at temperature 1, the `distinct_words` reward,
std-scaled group advantages, one GRPO update (eps 0.2, k3 KL beta 0.04, AdamW, clip 1.0).
Timed per step (medians over `rounds` x `steps`, the sides alternating by round): jaxpref's
loop step after compile and a warm-up; TRL's optimizer step, on_step_begin to on_step_end.
tokens/s = prompt + completion tokens of all B*K sequences / step time, each side counting
its own. Then sampled tokens/s of both samplers (no stop, greedy and temperature 1, each of
`--sampler_batches`, compile apart); torch gets `--threads` threads, XLA:CPU every core.
Setup and numbers: benchmarks/README.md section 7.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from trl_compare import RESULT, ensure_venv, jaxpref_version, step_timer  # noqa: E402

SPECIAL = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 on both sides


def distinct_words(prompts, responses, **unused_ctx):
  """The reward, jaxpref's form: [B][K] response texts -> distinct words of each."""
  del prompts
  return [[float(len(set(r.split()))) for r in group] for group in responses]


def trl_distinct_words(prompts, completions, **unused_kw):
  """The same reward in TRL's form: one flat list of B*K completion texts."""
  return distinct_words(prompts, [completions])[0]


def write_inputs(args, folder: str) -> dict:
  """The model (HF folder), tokenizer and prompts both sides read; returns a summary."""
  from flax import nnx
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors

  from jaxpref import models
  from jaxpref.models import hf, hf_write

  vocab = {w: i for i, w in enumerate(SPECIAL)}
  vocab.update({f"w{i}": i for i in range(len(SPECIAL), args.vocab_size)})
  tk = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  # transformers adds BOS through the post-processor; jaxpref frames BOS itself.
  tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tk.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "pad_token": "<pad>", "model_max_length": 4096}, f)
  cfg = models.get_config(args.preset, vocab_size=args.vocab_size)
  model = models.Decoder(cfg, rngs=nnx.Rngs(args.seed))
  hf.save(model, cfg, folder, ids=hf_write.token_ids(bos=1, eos=2, pad=0))
  # Prompt lengths vary (half to all of prompt_len, BOS included): all pad to one bucket.
  rng = np.random.default_rng(args.seed)
  n = args.batch_size * (args.warmup + args.steps + 1)
  with open(os.path.join(folder, "prompts.jsonl"), "w") as f:
    for _ in range(n):
      words = rng.integers(len(SPECIAL), args.vocab_size, rng.integers(
          args.prompt_len // 2, args.prompt_len))
      f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in words)}) + "\n")
  return {"params": models.count_params(model), "prompts": n}


class CompileCounter:
  """XLA compiles (jax.monitoring's backend-compile events) since it was made."""

  def __init__(self):
    import jax
    self.n = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, *unused, **unused_kw):
    self.n += event == "/jax/core/compile/backend_compile_duration"


class JaxprefGRPO:
  """The online program of a GRPO run on the shared folder, stepped as the loop steps it."""

  def __init__(self, args, folder: str, workdir: str, shared_prompt: bool = True):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxpref import models
    from jaxpref.parallel import distributed, mesh as mesh_lib
    from jaxpref.train import online, setup as setup_lib
    from jaxpref.train.config import DataConfig, OnlineConfig, OptimConfig, RunConfig

    self.jax = jax
    cfg = RunConfig(
        workdir=workdir, model=models.get_config(args.preset, vocab_size=args.vocab_size),
        model_preset=args.preset, role="online", loss="grpo", mesh=args.mesh,
        loss_hparams={"beta": 0.04, "kl_estimator": "k3"}, steps=10**6, progress=False,
        plot=False, init_from=folder, seed=args.seed,
        optim=OptimConfig(learning_rate=args.learning_rate, warmup_steps=0),
        online=OnlineConfig(num_generations=args.num_generations,
                            max_new_tokens=args.max_completion_length, temperature=1.0,
                            shared_prompt=shared_prompt, reward_fn=f"{os.path.abspath(__file__)}:distinct_words"),
        data=DataConfig(train_data=os.path.join(folder, "prompts.jsonl"), eval_data="",
                        tokenizer=folder, batch_size=args.batch_size, seed=args.seed))
    self.s = setup_lib.setup(cfg)
    self.prog = online.program(self.s)
    # The program's Rollouts is inside its batch(), which is step()'s first two lines: one
    # built alike exposes each step's sample and score times.
    self.rollouts = online.Rollouts(cfg, self.s, self.prog.graphdef, self.prog.mesh)
    self.params_of = jax.jit(lambda p, r: r.policy(p, None))
    sharding = NamedSharding(self.prog.mesh, P(mesh_lib.BATCH_AXES))
    self.put = lambda b: distributed.put_global(b, sharding)
    self.next_step = 0

  def step(self) -> dict:
    p, step = self.prog, self.next_step
    self.next_step += 1
    t0 = time.perf_counter()
    host = self.rollouts(self.params_of(p.state.params, p.ref), self.s.train_ds, step)
    placed = self.put(host)
    t1 = time.perf_counter()
    p.state, metrics = p.train_step(p.state, p.ref, placed)
    metrics = self.jax.device_get(metrics)
    t2 = time.perf_counter()
    st = self.rollouts.stats
    return {"total": t2 - t0, "sample": st["time/sample"], "score": st["time/score"],
            "layout": (t1 - t0) - st["time/sample"] - st["time/score"], "update": t2 - t1,
            "tokens": sequence_tokens(host),
            "completion_mean": st["length/mean"], "reward_mean": st["reward/mean"],
            "loss": float(metrics["loss"]), "kl": float(metrics["kl/mean"])}


def sequence_tokens(host) -> int:
  """Prompt + response tokens of the step's B*K sequences, each counting its prompt (as TRL
  counts them), whether or not the update ran the prompt once per group."""
  seg = np.asarray(host.segment_ids)
  if seg.ndim == 2:  # shared-prompt rows [B, L]: segment 1 is the prompt of K responses
    return int((seg == 1).sum() * host.group.valid.shape[1] + (seg > 1).sum())
  return int((seg > 0).sum())


def summarize(rows: list[dict]) -> dict:
  """Medians; tokens/s from the median step; each part's share of the summed step time."""
  med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
  med["tokens_per_s"] = med["tokens"] / med["total"]
  for part in [q for q in ("sample", "score", "layout", "update") if q in rows[0]]:
    med[f"{part}_share"] = sum(r[part] for r in rows) / sum(r["total"] for r in rows)
  return med


def time_cases(args, make_run, compiles=lambda: 0) -> list[dict]:
  """Each (batch, temperature) case of the sampler part: the first call (compile, warm-up)
  apart, then the median of `sampler_reps` calls; new tokens/s from that median."""
  out = []
  for b in args.sampler_batches:
    prompt = np.random.default_rng(b).integers(3, args.vocab_size, (b, args.prompt_len))
    for temp in (0.0, 1.0):
      run = make_run(prompt, temp)
      t0, n = time.perf_counter(), compiles()
      run()
      first, n = time.perf_counter() - t0, compiles() - n
      times = []
      for _ in range(args.sampler_reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
      steady = float(np.median(times))
      out.append({"batch": b, "temperature": temp, "s": steady, "compile_s": first - steady,
                  "compiles": n, "tokens_per_s": b * args.sampler_new / steady})
  return out


def sampler_speed(args, folder: str, counter: CompileCounter) -> list[dict]:
  """jaxpref's generate on the shared weights (greedy and sampling share one program)."""
  import jax

  from jaxpref.models import hf, sampler
  _, model = hf.load(folder)
  return time_cases(args, lambda prompt, temp: lambda: jax.block_until_ready(sampler.generate(
      model, prompt, max_new_tokens=args.sampler_new, temperature=temp,
      rng=jax.random.key(0)).tokens), lambda: counter.n)


def trl_worker(args, mode: str, folder: str):
  """Runs inside the TRL venv; prints one RESULT line."""
  import torch
  import transformers
  from transformers import AutoTokenizer, LlamaForCausalLM

  torch.set_num_threads(args.threads)
  versions = {"torch": torch.__version__, "transformers": transformers.__version__}
  model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
  if mode == "generate":
    def make_run(prompt, temp):
      ids = torch.tensor(prompt)
      sample = ({"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if temp
                else {"do_sample": False})
      return lambda: model.generate(
          ids, attention_mask=torch.ones_like(ids), eos_token_id=None, pad_token_id=0,
          max_new_tokens=args.sampler_new, min_new_tokens=args.sampler_new, **sample)
    with torch.no_grad():
      cases = time_cases(args, make_run)
    return print(RESULT + json.dumps({"cases": cases, "versions": versions,
                                      "threads": torch.get_num_threads()}), flush=True)

  import trl
  from datasets import Dataset
  from trl import GRPOConfig, GRPOTrainer

  tok = AutoTokenizer.from_pretrained(folder)
  with open(os.path.join(folder, "prompts.jsonl")) as f:
    prompts = [json.loads(line)["prompt"] for line in f]

  timer, gen_times, generate = step_timer(), [], model.generate

  def timed_generate(*a, **kw):  # TRL's rollout calls the policy's own generate
    t0 = time.perf_counter()
    out = generate(*a, **kw)
    gen_times.append(time.perf_counter() - t0)
    return out
  model.generate = timed_generate
  steps = args.warmup + args.steps
  k = args.num_generations
  config = GRPOConfig(
      output_dir=tempfile.mkdtemp(prefix="trl_grpo_"), max_steps=steps,
      # B*K completions per optimizer step, generated once: one rollout per update.
      per_device_train_batch_size=args.batch_size * k, gradient_accumulation_steps=1,
      num_generations=k, num_iterations=1, max_completion_length=args.max_completion_length,
      temperature=1.0, top_p=1.0, top_k=0, beta=0.04, epsilon=0.2, loss_type="grpo",
      scale_rewards="group", learning_rate=args.learning_rate, lr_scheduler_type="constant",
      max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
      shuffle_dataset=False, logging_steps=1, report_to="none", save_strategy="no",
      disable_tqdm=True, dataloader_num_workers=0, seed=args.seed)
  trainer = GRPOTrainer(model=model, reward_funcs=trl_distinct_words, args=config,
                        train_dataset=Dataset.from_dict({"prompt": prompts}),
                        processing_class=tok, callbacks=[timer])
  trainer.train()
  logs = [l for l in timer.logs if "loss" in l][args.warmup:]
  print(RESULT + json.dumps({
      "step_times": timer.times[args.warmup:], "generate_times": gen_times[args.warmup:],
      # TRL logs the mean lengths; the tokens of a step follow from them.
      "prompt_lengths": [float(np.mean([len(tok(p)["input_ids"]) for p in
                                        prompts[i * args.batch_size:(i + 1) * args.batch_size]]))
                         for i in range(args.warmup, steps)],
      "completion_lengths": [l["completions/mean_length"] for l in logs],
      "attn": model.config._attn_implementation, "threads": torch.get_num_threads(),
      "versions": {**versions, "trl": trl.__version__}}), flush=True)


def run_worker(python: str, argv: list[str], mode: str, folder: str) -> dict:
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
             TOKENIZERS_PARALLELISM="false")
  proc = subprocess.run([python, os.path.abspath(__file__), *argv,
                         f"--_worker={mode}:{folder}"], capture_output=True, text=True, env=env)
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT):
      return json.loads(line[len(RESULT):])
  sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-10000:])
  raise SystemExit(f"TRL worker ({mode}) failed (exit {proc.returncode})")


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="small", help="jaxpref model preset (vocab overridden)")
  for name, default, what in (
      ("vocab_size", 8192, ""), ("batch_size", 4, "prompts per step"),
      ("num_generations", 4, "K responses per prompt"),
      ("prompt_len", 32, "longest prompt, BOS included"), ("max_completion_length", 32, ""),
      ("steps", 3, "timed steps per round and side"), ("rounds", 2, ""),
      ("warmup", 1, "untimed TRL steps per round"), ("sampler_new", 64, "new tokens"),
      ("sampler_reps", 3, "timed calls per case"), ("seed", 0, "")):
    p.add_argument(f"--{name}", type=int, default=default, help=what or None)
  p.add_argument("--learning_rate", type=float, default=1e-5)
  p.add_argument("--sampler_batches", type=lambda s: [int(x) for x in s.split(",") if x],
                 default=[1, 8, 32])
  p.add_argument("--mesh", default="data:-1")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  p.add_argument("--skip_trl", action="store_true", help="jaxpref's side only (no venv)")
  p.add_argument("--compare_plain", type=int, default=1, help="also time jaxpref with "
                 "--online.shared_prompt=false (the [B, K, T] update layout), alternating")
  p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse(argv)
  if args._worker:
    mode, folder = args._worker.split(":", 1)
    return trl_worker(args, mode, folder)
  worker_argv = [a for a in (sys.argv[1:] if argv is None else argv)
                 if not a.startswith("--_worker")]
  python = None if args.skip_trl else ensure_venv()
  import jax

  from jaxpref.models import sampler
  counter = CompileCounter()
  res = {"args": vars(args), "jax": jax.__version__, "jaxpref": jaxpref_version()}
  rows, trl_rows = [], []
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "model")
    os.makedirs(folder)
    res.update(write_inputs(args, folder))
    side = JaxprefGRPO(args, folder, os.path.join(tmp, "work"))
    plain = (JaxprefGRPO(args, folder, os.path.join(tmp, "plain"), shared_prompt=False)
             if args.compare_plain else None)
    t0 = time.perf_counter()
    side.step()  # compiles the sampler and the update
    res["compile_s"] = time.perf_counter() - t0
    side.step()  # warm-up
    if plain is not None:
      plain.step(), plain.step()
    warm = counter.n
    plain_rows = []
    for r in range(args.rounds):
      rows += [side.step() for _ in range(args.steps)]
      if plain is not None:
        plain_rows += [plain.step() for _ in range(args.steps)]
      if python:
        trl = run_worker(python, worker_argv, "grpo", folder)
        trl_rows += [{"total": s, "sample": g, "tokens": args.batch_size * args.num_generations
                      * (p + c)} for s, g, p, c in zip(trl["step_times"], trl["generate_times"],
                                                       trl["prompt_lengths"],
                                                       trl["completion_lengths"])]
      print(f"round {r + 1}/{args.rounds}: median s/step: " + ", ".join(
          f"{name} {np.median([x['total'] for x in xs]):.3f}" for name, xs in
          (("jaxpref", rows), ("TRL", trl_rows)) if xs) + f" (load {os.getloadavg()[0]:.2f})",
          flush=True)
    res["xla_compiles_in_timed_steps"] = counter.n - warm
    # The jitted sampler the rollouts called (an lru hit): its compiled specialisations.
    o, tok = side.s.cfg.online, side.s.tokenizer
    res["sampler_programs"] = sampler._compiled(side.prog.graphdef, o.max_new_tokens, tok.pad_id,
                                                False, side.prog.mesh,
                                                o.num_generations)._cache_size()
    res["step"] = summarize(rows)
    if plain_rows:
      res["plain"] = summarize(plain_rows)
    if trl_rows:
      res["trl"] = {**{k: v for k, v in trl.items() if k not in ("step_times",)},
                    **summarize(trl_rows)}
      res["ratio"] = res["step"]["tokens_per_s"] / res["trl"]["tokens_per_s"]
    res["sampler"] = sampler_speed(args, folder, counter)
    if python:
      res["hf_generate"] = run_worker(python, worker_argv, "generate", folder)
  report(res)
  return res


def report(res: dict) -> None:
  a, st = res["args"], res["step"]
  print(f"\nmodel: preset {a['preset']} (vocab {a['vocab_size']}), float32, "
        f"{res['params'] / 1e6:.2f}M parameters + frozen reference; {a['batch_size']} prompts x "
        f"K={a['num_generations']}; prompts <= {a['prompt_len']} tokens, <= "
        f"{a['max_completion_length']} new; GRPO beta 0.04; "
        f"torch threads {a['threads']}; medians of {a['rounds']} rounds x {a['steps']} steps")
  print(f"jaxpref {res['jaxpref']} (jax {res['jax']}): {st['total']:.3f} s/step, "
        f"{st['tokens']:.0f} tokens/step, {st['tokens_per_s']:,.0f} tokens/s; compile + "
        f"step 0 {res['compile_s']:.1f} s; mean completion {st['completion_mean']:.1f} tokens")
  print("| part | s | share |\n|---|---|---|")
  for part in ("sample", "score", "layout", "update"):
    print(f"| {part} | {st[part]:.3f} | {st[part + '_share']:.1%} |")
  print(f"sampler: {res['sampler_programs']} compiled program(s); XLA compiles in the timed "
        f"steps: {res['xla_compiles_in_timed_steps']}")
  if "plain" in res:
    pl = res["plain"]
    print(f"jaxpref with --online.shared_prompt=false: {pl['total']:.3f} s/step (sample "
          f"{pl['sample']:.3f}, update {pl['update']:.3f}), {pl['tokens_per_s']:,.0f} tokens/s; "
          f"the shared-prompt update is x{pl['update'] / st['update']:.2f} faster, the step "
          f"x{pl['total'] / st['total']:.2f}")
  if "trl" in res:
    t, v = res["trl"], res["trl"]["versions"]
    print(f"TRL {v['trl']} GRPOTrainer (torch {v['torch']}, transformers {v['transformers']}, "
          f"attention {t['attn']}, {t['threads']} threads): {t['total']:.3f} s/step, "
          f"{t['tokens']:.0f} tokens/step, {t['tokens_per_s']:,.0f} tokens/s; mean completion "
          f"{np.mean(t['completion_lengths']):.1f} tokens; generate {t['sample']:.3f} s "
          f"({t['sample'] / t['total']:.1%})")
    print(f"jaxpref / TRL: x{res['ratio']:.2f} tokens/s (target >= 3)")
  hf = {(c["batch"], c["temperature"]): c for c in res.get("hf_generate", {}).get("cases", [])}
  print(f"\nsampled tokens/s ({a['prompt_len']}-token prompts, {a['sampler_new']} new, no stop)")
  print("| batch | temperature | jaxpref tok/s | transformers tok/s | ratio | jaxpref compile s "
        "(compiles) |")
  print("|---|---|---|---|---|---|")
  for c in res["sampler"]:
    h = hf.get((c["batch"], c["temperature"]))
    theirs = (f"{h['tokens_per_s']:,.0f} | x{c['tokens_per_s'] / h['tokens_per_s']:.2f}" if h
              else "- | -")
    print(f"| {c['batch']} | {c['temperature']:g} | {c['tokens_per_s']:,.0f} | {theirs} | "
          f"{c['compile_s']:.1f} ({c['compiles']}) |")


if __name__ == "__main__":
  main()
