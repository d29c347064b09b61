"""Chat records tokenize to exactly the ids transformers' apply_chat_template gives for the
whole conversation, for Llama 3, ChatML (Qwen, "bos_token": null), Zephyr, Gemma and Mistral
templates on tokenizers trained here on the tiny corpus: BOS only where the template writes
it, no EOS after a turn that ends otherwise ("<|im_end|>\\n", "<end_of_turn>\\n"), and the
prompt/response seam split as the whole text is (byte-level "\\n\\n", Metaspace's "▁")."""

import json
import os

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from jaxpref.data import Tokenizer, chat, chat_template, make_tiny, pairs  # noqa: E402

LLAMA3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
          "'<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
          "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if "
          "add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
          "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + "
          "message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and "
          "add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}"
         "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
         "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
           "'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")

# template, tokenizer kind, special tokens, tokenizer_config.json tokens, config.json ids
STYLES = {
    "llama3": (LLAMA3, "bytelevel", ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                                     "<|end_header_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, None),
    # Qwen2.5: no BOS token; config.json names <|endoftext|> as bos_token_id all the same.
    "chatml": (CHATML, "bytelevel", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
               {"bos_token_id": 0, "eos_token_id": 2}),
    "zephyr": (ZEPHYR, "metaspace", ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>",
                                     "<|system|>"],
               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, None),
    "gemma": (GEMMA, "bytelevel", ["<pad>", "<eos>", "<bos>", "<start_of_turn>",
                                   "<end_of_turn>"],
              {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, None),
    "mistral": (MISTRAL, "metaspace", ["<unk>", "<s>", "</s>"],
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, None),
}
PROMPT = [{"role": "user", "content": "name a fruit."},
          {"role": "assistant", "content": "apple."},
          {"role": "user", "content": "another one, please?"}]
RESPONSES = ["i would say pear.", "\n\nbanana, then.", " a dog."]


def folder(path, style):
  from tokenizers import decoders, models as tk_models, pre_tokenizers, trainers
  template, kind, special, config, model_ids = STYLES[style]
  with open(os.path.join(make_tiny.OUT, "corpus.txt")) as f:
    lines = [line.strip() for line in f if line.strip()]
  if kind == "bytelevel":
    tk = tokenizers.Tokenizer(tk_models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Lines ending in "\n\n" teach the merge "ĊĊ" that a prompt's end, encoded alone, takes.
    lines = lines + [line + "\n\n" for line in lines[:200]]
  else:  # Mistral's and Zephyr's: "▁" marks a word start, and the text's first word
    tk = tokenizers.Tokenizer(tk_models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tk.decoder = decoders.Metaspace(prepend_scheme="first")
    alphabet = list("\n[]/")
  tk.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=360, special_tokens=special,
                                                    initial_alphabet=alphabet))
  os.makedirs(path, exist_ok=True)
  tk.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({**config, "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast"},
              f)
  if model_ids:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(model_ids, f)
  return str(path)


def hf_ids(out):
  return list(out["input_ids"] if hasattr(out, "keys") else out)


def pipeline_frames():
  """Whether pairs.py lays rows out with `Tokenizer.frame`/`encode_pair` (BOS/EOS where the
  template writes them), told by laying out a row for a tokenizer that places no BOS."""
  tok = Tokenizer.load(f"{make_tiny.OUT}/tokenizer.model")
  tok.add_bos = False
  return pairs.tokenize_sequence(tok, "a", "b", 8)[0][0] != tok.bos_id


def check_style(tmp_path, style):
  """(row of the equality table, failures)."""
  path = folder(tmp_path / style, style)
  tok = Tokenizer.load(path)
  template = chat_template.resolve("auto", tok)
  theirs = transformers.PreTrainedTokenizerFast.from_pretrained(path)
  row, bad = {"bos": tok.add_bos, "eos": tok.add_eos}, []
  framed = pipeline_frames()
  for response in RESPONSES:
    conversation = PROMPT + [{"role": "assistant", "content": response}]
    record = {"chosen": conversation, "rejected": PROMPT + [{"role": "assistant",
                                                             "content": "no."}]}
    with chat.using(template):
      out, problem = chat.to_pair(record)
    assert problem is None
    want = hf_ids(theirs.apply_chat_template(conversation, tokenize=True))
    p, r = tok.encode_pair(out["prompt"], out["chosen"])
    ids, start = tok.frame(p, r)
    seam = [tok.bos_id] * tok.add_bos + tok.encode(out["prompt"]) + tok.encode(out["chosen"])
    row.setdefault("apart", []).append(seam + [tok.eos_id] * tok.add_eos == want)
    row.setdefault("frame", []).append(ids == want)
    if ids != want:
      bad.append(f"{style} {response!r}: frame {ids} != {want}")
    if framed:  # the datasets' own layout
      tokens, mask, _, cut = pairs.tokenize_sequence(tok, out["prompt"], out["chosen"], 128)
      ok = list(tokens[:len(want)]) == want and (tokens[len(want):] == tok.pad_id).all()
      ok &= list(np.flatnonzero(mask)) == list(range(start, len(want))) and not cut
      row.setdefault("pipeline", []).append(ok)
      if not ok:
        bad.append(f"{style} {response!r}: pipeline {list(tokens[:len(want) + 1])} vs {want}")
  return row, bad


@pytest.mark.parametrize("style", list(STYLES))
def test_ids_equal_apply_chat_template(tmp_path, style):
  row, bad = check_style(tmp_path, style)
  print(f"{style}: {row}")
  assert not bad, bad
  expect = {"llama3": (True, True), "chatml": (False, False), "zephyr": (False, False),
            "gemma": (True, False), "mistral": (True, True)}[style]
  assert (row["bos"], row["eos"]) == expect
  if not pipeline_frames():
    pytest.skip("pairs.py places BOS and EOS unconditionally and encodes prompt and response "
                "apart; the ids above are Tokenizer.frame(encode_pair(...))")


def test_seams_the_separate_encoding_gets_wrong_are_covered(tmp_path):
  """The byte-level "\\n\\n" and Metaspace cases do differ when encoded apart, so the test
  above would catch a pipeline that went back to encoding prompt and response apart."""
  rows = {s: check_style(tmp_path, s)[0] for s in ("llama3", "mistral")}
  assert not all(rows["llama3"]["apart"]) and not all(rows["mistral"]["apart"])
