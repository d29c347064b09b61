"""Chat templates (jaxpref/data/chat_template.py, --chat_template): a message-list pair's
prompt and responses render to exactly the text, and tokenize to exactly the ids, that
transformers' apply_chat_template gives for the prompt plus each response; message lists in
unpaired and ranked records tokenize as the equivalent pair; plain records are untouched;
templates that refuse a conversation, and malformed messages, name the record."""

import json
import os

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from jaxpref import models  # noqa: E402
from jaxpref.data import (PairDataset, RankedDataset, Tokenizer, UnpairedDataset,  # noqa: E402
                          chat, make_tiny, pairs_from_ratings, read_pairs, read_ranked,
                          read_unpaired, tokenize_sequence)
from jaxpref.data import chat_template  # noqa: E402
from jaxpref.data.records import DataError  # noqa: E402
from test_chat_tokenization import pipeline_frames  # noqa: E402
from jaxpref.train import loop  # noqa: E402
from jaxpref.train.config import DataConfig, RunConfig  # noqa: E402

# Written in the style of Llama 3's and Gemma's published templates.
LLAMA3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
          "'<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
          "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "{% for message in messages %}{% if (message['role'] == 'user') != "
         "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
         "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
         "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
         "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
         "{{'<start_of_turn>model\\n'}}{% endif %}")
STYLES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                        "<|end_header_id|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>",
              "<eos>"),
}
PROMPT = [{"role": "user", "content": "name a fruit."},
          {"role": "assistant", "content": "apple."},
          {"role": "user", "content": "another one, please?"}]
CHOSEN, REJECTED = "i would say pear.", "a dog."


def folder(path, style, in_config=True):
  """A byte-level BPE tokenizer.json with the style's special tokens, and its template
  (in tokenizer_config.json, or in chat_template.jinja as transformers >= 4.43 saves it)."""
  from tokenizers import decoders, models as tk_models, pre_tokenizers, trainers
  template, special, bos, eos = STYLES[style]
  with open(os.path.join(make_tiny.OUT, "corpus.txt")) as f:
    lines = [line.strip() for line in f if line.strip()]
  tk = tokenizers.Tokenizer(tk_models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(lines, trainers.BpeTrainer(
      vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(path, exist_ok=True)
  tk.save(os.path.join(path, "tokenizer.json"))
  config = {"bos_token": bos, "eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast"}
  if in_config:
    config["chat_template"] = template
  else:
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
      f.write(template)
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return str(path)


def hf_ids(out):
  """apply_chat_template(tokenize=True) gives a list or, in newer transformers, a dict."""
  return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("style,in_config", [("llama3", True), ("gemma", False)])
def test_pair_renders_and_tokenizes_as_apply_chat_template(tmp_path, style, in_config):
  path = folder(tmp_path / style, style, in_config)
  tok = Tokenizer.load(path)
  template = chat_template.resolve("auto", tok)
  assert template is not None
  theirs = transformers.PreTrainedTokenizerFast.from_pretrained(path)
  record = {"chosen": PROMPT + [{"role": "assistant", "content": CHOSEN}],
            "rejected": PROMPT + [{"role": "assistant", "content": REJECTED}]}
  with chat.using(template):
    out, problem = chat.to_pair(record)
  assert problem is None
  bos, eos = STYLES[style][2:]
  want_prompt = theirs.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
  assert bos + out["prompt"] == want_prompt
  for name, text in (("chosen", CHOSEN), ("rejected", REJECTED)):
    conversation = PROMPT + [{"role": "assistant", "content": text}]
    full = theirs.apply_chat_template(conversation, tokenize=False)
    # BOS and (where the template ends with it) EOS are placed as ids, not text.
    closing = eos if full.endswith(eos) else ""
    assert bos + out["prompt"] + out[name] + closing == full
    tokens, mask, _, truncated = tokenize_sequence(tok, out["prompt"], out[name], 256)
    want = hf_ids(theirs.apply_chat_template(conversation, tokenize=True))
    # A turn that ends otherwise gets no EOS (`Tokenizer.frame`), once pairs.py frames rows.
    assert tok.add_eos == bool(closing)
    if not closing and not pipeline_frames():
      want = want + [tok.eos_id]
    assert list(tokens[:len(want)]) == want and not truncated
    assert (tokens[len(want):] == tok.pad_id).all()
    # The loss covers the response and its end-of-turn, never the prompt's header.
    n_prompt = len(hf_ids(theirs.apply_chat_template(PROMPT, tokenize=True,
                                                     add_generation_prompt=True)))
    assert list(np.flatnonzero(mask)) == list(range(n_prompt, len(want)))


def test_files_strings_and_settings(tmp_path):
  path = folder(tmp_path / "llama", "llama3")
  tok = Tokenizer.load(path)
  data = tmp_path / "pairs.jsonl"
  rows = [{"prompt": "name a fruit.", "chosen": "apple.", "rejected": "dog."},
          {"prompt": "name a fruit.", "chosen": [{"role": "assistant", "content": "apple."}],
           "rejected": [{"role": "assistant", "content": "dog."}]}]
  data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  with chat.using(chat_template.resolve("auto", tok)):
    plain, templated = read_pairs(str(data))[0]
  assert (plain.prompt, plain.chosen) == ("name a fruit.", "apple.")  # strings: untouched
  assert templated.prompt == ("<|start_header_id|>user<|end_header_id|>\n\nname a fruit."
                              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
  assert templated.chosen == "apple."  # its <|eot_id|> is the EOS jaxpref appends
  with chat.using(chat_template.resolve("none", tok)):
    assert read_pairs(str(data))[0][1].prompt == "User: name a fruit.\nAssistant:"
  file = tmp_path / "t.jinja"
  file.write_text(GEMMA)
  assert chat_template.resolve(str(file), tok).render(PROMPT, True).startswith(
      "<|begin_of_text|><start_of_turn>user\n")
  assert chat_template.resolve("auto", Tokenizer.load(make_tiny.OUT)) is None  # no template
  with pytest.raises(FileNotFoundError, match="--chat_template: 'nope.jinja' is neither"):
    chat_template.resolve("nope.jinja", tok)
  file.write_text("{% if %}")
  with pytest.raises(ValueError, match="t.jinja is not a valid Jinja template"):
    chat_template.resolve(str(file), tok)


def test_template_refusal_names_the_record(tmp_path):
  tok = Tokenizer.load(folder(tmp_path / "gemma", "gemma"))
  data = tmp_path / "pairs.jsonl"
  record = {"chosen": [{"role": "system", "content": "be brief."},
                       {"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "system", "content": "be brief."},
                         {"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]}
  data.write_text(json.dumps(record) + "\n")
  with chat.using(chat_template.resolve("auto", tok)):
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'chosen': the chat template "
                       r".* failed: System role not supported"):
      read_pairs(str(data))


def test_setup_renders_chat_records_with_the_tokenizers_template(tmp_path):
  path = folder(tmp_path / "llama", "llama3")
  data = tmp_path / "pairs.jsonl"
  rec = {"chosen": PROMPT + [{"role": "assistant", "content": CHOSEN}],
         "rejected": PROMPT + [{"role": "assistant", "content": REJECTED}]}
  data.write_text("\n".join([json.dumps(rec)] * 8) + "\n")
  cfg = RunConfig(workdir=str(tmp_path / "run"), model=models.get_config("tiny"),
                  data=DataConfig(train_data=str(data), eval_data="", tokenizer=path,
                                  max_len=96, batch_size=8))
  tokens = loop.setup(cfg).train_ds.tokens[0, 0]
  theirs = transformers.PreTrainedTokenizerFast.from_pretrained(path)
  want = hf_ids(theirs.apply_chat_template(rec["chosen"], tokenize=True))
  assert list(tokens[:len(want)]) == want


def _write(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return str(path)


@pytest.mark.parametrize("setting", ["auto", "none"])
def test_unpaired_and_ranked_messages_tokenize_as_the_pair(tmp_path, setting):
  """Message lists in unpaired and ranked records (and pairs from ratings) give each
  response exactly the ids the equivalent pair record gives it; strings stay as they are."""
  path = folder(tmp_path / "llama", "llama3")
  tok = Tokenizer.load(path)
  said = lambda text: [{"role": "assistant", "content": text}]
  pair = {"chosen": PROMPT + said(CHOSEN), "rejected": PROMPT + said(REJECTED)}
  unpaired = [{"completion": PROMPT + said(CHOSEN), "label": True},  # the list holds the prompt
              {"prompt": PROMPT, "completion": said(REJECTED), "label": False},
              {"prompt": PROMPT, "completion": REJECTED, "label": 0},  # a string reply
              {"prompt": "name a fruit.", "completion": "apple.", "label": 1}]  # plain: untouched
  ranked = {"prompt": PROMPT, "completions": [{"response": said(REJECTED), "score": 0},
                                              {"response": PROMPT + said(CHOSEN), "score": 2}]}
  with chat.using(chat_template.resolve(setting, tok)):
    pairs = read_pairs(_write(tmp_path / "p.jsonl", [pair]))[0]
    ups = read_unpaired(_write(tmp_path / "u.jsonl", unpaired))[0]
    ranks = read_ranked(_write(tmp_path / "r.jsonl", [ranked]))[0]
  want = PairDataset(pairs, tok, 128).tokens[0]  # [2, T]: chosen, rejected
  if setting == "auto":  # and that is what transformers renders and tokenizes
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    ids = hf_ids(theirs.apply_chat_template(pair["chosen"], tokenize=True))
    assert list(want[0, :len(ids)]) == ids
  got = UnpairedDataset(ups, tok, 128).tokens[:, 0]  # member 0: the record's own completion
  np.testing.assert_array_equal(got[:3], want[[0, 1, 1]])
  assert (ups[3].prompt, ups[3].completion) == ("name a fruit.", "apple.")
  np.testing.assert_array_equal(RankedDataset(ranks, tok, 128, 2).tokens[0], want)  # best first
  rated, _ = pairs_from_ratings(ranks, "best_vs_worst")
  np.testing.assert_array_equal(PairDataset(rated, tok, 128).tokens[0], want)


def test_unpaired_and_ranked_message_errors_name_the_record(tmp_path):
  tok = Tokenizer.load(folder(tmp_path / "gemma", "gemma"))
  good = {"prompt": "hi", "completion": "a", "label": True}
  cases = [
      ("unpaired", {"prompt": PROMPT, "completion": [{"role": "assistant"}], "label": True},
       r"u.jsonl:2: field 'completion' message 0 must be"),
      ("unpaired", {"completion": [{"role": "user", "content": "hi"}], "label": True},
       r"u.jsonl:2: field 'completion' must end with the assistant's response"),
      ("unpaired", {"prompt": [{"role": "user", "content": "other"}],
                    "completion": PROMPT + [{"role": "assistant", "content": "a"}], "label": True},
       r"u.jsonl:2: field 'completion' does not start with the conversation in field 'prompt'"),
      ("unpaired", {"prompt": [{"role": "system", "content": "be brief."}],
                    "completion": "a", "label": True},
       r"u.jsonl:2: field 'completion': the chat template .* failed: System role not supported"),
      ("ranked", {"completions": [
          {"response": PROMPT + [{"role": "assistant", "content": "a"}], "score": 1},
          {"response": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}],
           "score": 0}]},
       r"u.jsonl:2: completions\[1\]: field 'response' does not start with the conversation "
       r"in completions\[0\]'s field 'response'"),
      ("ranked", {"prompt": PROMPT, "completions": [{"response": "a", "score": 1},
                                                    {"response": [], "score": 0}]},
       r"u.jsonl:2: completions\[1\]: field 'response' is an empty message list"),
  ]
  ranked_good = {"prompt": "hi", "completions": [{"response": "a", "score": 1},
                                                 {"response": "b", "score": 0}]}
  with chat.using(chat_template.resolve("auto", tok)):
    for kind, bad, message in cases:
      data = _write(tmp_path / "u.jsonl", [good if kind == "unpaired" else ranked_good, bad])
      read = read_unpaired if kind == "unpaired" else read_ranked
      with pytest.raises(DataError, match=message):
        read(data)
      records, report = read(data, skip_invalid=True)  # or skipped, and counted
      assert len(records) == 1 and report.n_skipped == 1
  # --data_fields: the error names the file's own field.
  data = _write(tmp_path / "f.jsonl", [{"question": PROMPT, "answer": [{"role": "user",
                                                                        "content": "x"}],
                                        "label": True}])
  with pytest.raises(DataError, match=r"f.jsonl:1: field 'answer' must end with the assistant"):
    read_unpaired(data, fields="prompt:question,completion:answer")


@pytest.mark.parametrize("body", ["{% for i in range(10**9) %}x{% endfor %}", "{{ 1 // 0 }}"])
def test_a_hostile_template_fails_in_one_line_not_a_hang(body):
  template = chat_template.ChatTemplate(body, "the template file", {})
  with pytest.raises(ValueError, match="the chat template .the template file. failed"):
    template.render([{"role": "user", "content": "hi"}], True)
