"""Chat-layout records (HH-RLHF, UltraFeedback-binarized) -> plain prompt / response strings.

Two layouts are recognised per record, with no flag:

- Message lists: `chosen` and `rejected` are lists of `{"role", "content"}` messages
  (roles `system`, `user`, `assistant`), one conversation ending in two different final
  assistant turns. The prompt is the conversation before that turn, which must be the same
  in both; a `prompt` field, if present (a string, read as one user turn, or a message
  list), must equal it, or the lists may hold only the final turn.
- HH-RLHF transcripts: no `prompt` field, and `chosen`/`rejected` are strings holding
  "\n\nHuman: ... \n\nAssistant: ..." turns. They are split at the last "\n\nAssistant:";
  the text up to and including it is the prompt, which must be the same in both.

A message-list prompt is rendered by the tokenizer's Jinja chat template when there is one
(`--chat_template=auto`, the default, or a file; `chat_template.py`): the prompt as
transformers' `apply_chat_template(add_generation_prompt=True)` renders it, each response
as what rendering the whole conversation adds after that. Without a template (our
sentencepiece tokenizers have none, or `--chat_template=none`) `render` defines the plain
format: each turn as "Role: content\n", then "Assistant:" for the response to follow.
HH transcripts and string records keep their own text.

Unpaired and ranked records (`to_unpaired`, `to_ranked`) are rendered the same way when
their `prompt`, their `completion` or a `completions[i].response` is a message list: a
response list ends with the assistant's turn (a string response is that turn's content),
its earlier turns are the prompt, and the prompt is rendered once, each response as the
rest of its conversation, so each gives the ids the equivalent pair record gives it.
"""

from __future__ import annotations

import contextlib

# The template message lists are rendered with (`using`); None: the plain format.
_TEMPLATE = None


@contextlib.contextmanager
def using(template):
  """Renders message-list records with `template` (a `chat_template.ChatTemplate`, or None
  for the plain format) inside the block: the readers need no tokenizer argument."""
  global _TEMPLATE
  old, _TEMPLATE = _TEMPLATE, template
  try:
    yield template
  finally:
    _TEMPLATE = old


ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
HH_ASSISTANT = "\n\nAssistant:"


def render(messages: list[dict]) -> str:
  """The prompt text of a conversation, e.g. "User: hi\\nAssistant:"."""
  return "".join(f"{ROLES[m['role']]}: {m['content']}\n" for m in messages) + "Assistant:"


def is_chat(obj: dict) -> bool:
  chosen, rejected = obj.get("chosen"), obj.get("rejected")
  if isinstance(chosen, list) or isinstance(rejected, list):
    return True
  return ("prompt" not in obj and isinstance(chosen, str) and isinstance(rejected, str)
          and HH_ASSISTANT in chosen)


def _bad_messages(value, name: str):
  """(reason, message) for a value that is not a non-empty list of messages, or None."""
  if not isinstance(value, list):
    return (f"field '{name}' is not a message list",
            f"field '{name}' must be a list of {{\"role\", \"content\"}} messages like the "
            f"other response, got {type(value).__name__}")
  if not value:
    return f"field '{name}' is empty", f"field '{name}' is an empty message list"
  for i, m in enumerate(value):
    if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
      return (f"field '{name}' has a malformed message",
              f"field '{name}' message {i} must be {{\"role\": {'|'.join(ROLES)}, "
              f"\"content\": string}}, got {m!r:.80}")
  return None


def _turns(messages: list[dict]) -> list[tuple[str, str]]:
  return [(m["role"], m["content"]) for m in messages]


def _from_messages(obj: dict):
  for name in ("chosen", "rejected"):
    problem = _bad_messages(obj.get(name), name)
    if problem is not None:
      return None, problem
    if obj[name][-1]["role"] != "assistant":
      return None, (f"field '{name}' does not end with an assistant turn",
                    f"field '{name}' must end with the assistant's response, but its last "
                    f"message is the {obj[name][-1]['role']}'s")
  history = {n: _turns(obj[n][:-1]) for n in ("chosen", "rejected")}
  if "prompt" in obj:
    p = obj["prompt"]
    if isinstance(p, str):
      p = [{"role": "user", "content": p}]
    problem = _bad_messages(p, "prompt")
    if problem is not None:
      return None, problem
    prompt = _turns(p)
    for name, h in history.items():
      if h and h != prompt:
        return None, ("chat prompts differ", f"field '{name}' does not start with the "
                      "conversation in field 'prompt' (the pair must share its prompt)")
  else:
    prompt = history["chosen"]
    if prompt != history["rejected"]:
      at = next((i for i, (a, b) in enumerate(zip(prompt, history["rejected"])) if a != b),
                min(len(prompt), len(history["rejected"])))
      return None, ("chat prompts differ", f"fields 'chosen'/'rejected' do not share a prompt: "
                    f"the conversations differ at message {at} (a pair is one conversation "
                    "with two final assistant turns)")
  if not prompt:
    return None, ("field 'prompt' is empty",
                  "field 'prompt' is empty: the conversation has no turn before the responses")
  messages = [{"role": r, "content": c} for r, c in prompt]
  if _TEMPLATE is None:
    out = dict(obj, prompt=render(messages))
    out.update({n: obj[n][-1]["content"] for n in ("chosen", "rejected")})
    return out, None
  out = dict(obj)
  for n in ("chosen", "rejected"):
    try:
      out["prompt"], out[n] = _TEMPLATE.split(messages, obj[n][-1]["content"])
    except ValueError as e:  # the template refused the conversation (raise_exception, ...)
      return None, ("chat template failed", f"field '{n}': {e}")
  return out, None


def _from_transcripts(obj: dict):
  parts = {}
  for name in ("chosen", "rejected"):
    text = obj[name]
    cut = text.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
    if cut < len(HH_ASSISTANT):
      return None, (f"field '{name}' has no assistant turn", f"field '{name}' has no "
                    "'\\n\\nAssistant:' turn, but 'chosen' is an HH-RLHF transcript")
    parts[name] = text[:cut], text[cut:]
  if parts["chosen"][0] != parts["rejected"][0]:
    return None, ("chat prompts differ", "fields 'chosen'/'rejected' differ before their last "
                  "'\\n\\nAssistant:' (an HH-RLHF pair shares everything but the final turn)")
  return dict(obj, prompt=parts["chosen"][0], chosen=parts["chosen"][1],
              rejected=parts["rejected"][1]), None


def to_pair(obj: dict):
  """(record with string prompt/chosen/rejected, None) or (None, (reason, message))."""
  if isinstance(obj.get("chosen"), list) or isinstance(obj.get("rejected"), list):
    return _from_messages(obj)
  return _from_transcripts(obj)


# ---------------------------------------------------------------------------------------------
# Unpaired (`completion`) and ranked (`completions[i].response`) records
# ---------------------------------------------------------------------------------------------


def _response_turn(value, where: str, name: str):
  """(history turns, content) of one response, or (None, (reason, message)): a string is
  the assistant's reply; a message list is the conversation ending with it."""
  if isinstance(value, str):
    return [], value
  problem = _bad_messages(value, name)
  if problem is None and value[-1]["role"] != "assistant":
    problem = (f"field '{name}' does not end with an assistant turn",
               f"field '{name}' must end with the assistant's response, but its last message "
               f"is the {value[-1]['role']}'s")
  if problem is not None:
    return None, (problem[0], where + problem[1])
  return _turns(value[:-1]), value[-1]["content"]


def _conversation(obj: dict, responses: list[tuple[str, str, object]]):
  """(prompt text, [response text]) or (None, (reason, message)) of a record whose prompt
  and/or responses are message lists; `responses` holds (error prefix, field, value).

  As for pairs: a string prompt is one user turn; a response list's turns before its final
  assistant turn must be the prompt (or be absent when a prompt is given), and without a
  `prompt` field the first list's turns are the prompt, which every other list must share.
  """
  turns = []
  for where, name, value in responses:
    history, content = _response_turn(value, where, name)
    if history is None:
      return None, content
    turns.append((where, name, history, content))
  if "prompt" in obj:
    p = obj["prompt"]
    p = [{"role": "user", "content": p}] if isinstance(p, str) else p
    problem = _bad_messages(p, "prompt")
    if problem is not None:
      return None, problem
    prompt, source = _turns(p), "the conversation in field 'prompt'"
  else:
    first = next((t for t in turns if t[2]), None)  # the first response given as a list
    prompt = first[2] if first else []
    owner = first[0].rstrip(": ") + "'s " if first and first[0] else ""
    source = first and f"the conversation in {owner}field '{first[1]}'"
  for where, name, history, _ in turns:
    if history and history != prompt:
      return None, ("chat prompts differ", f"{where}field '{name}' does not start with {source} "
                    "(the responses of a record share its prompt)")
  if not prompt:
    return None, ("field 'prompt' is empty", "field 'prompt' is empty: the conversation has no "
                  "turn before the response")
  messages = [{"role": r, "content": c} for r, c in prompt]
  if _TEMPLATE is None:
    return render(messages), [content for *_, content in turns]
  texts = []
  for where, name, _, content in turns:
    try:
      head, body = _TEMPLATE.split(messages, content)
    except ValueError as e:  # the template refused the conversation (raise_exception, ...)
      return None, ("chat template failed", f"{where}field '{name}': {e}")
    texts.append(body)
  return head, texts


def _not_text(obj: dict, name: str, where: str):
  """(reason, message) when a response field is missing or neither a string nor a list."""
  if name not in obj:
    return f"missing field '{name}'", f"{where}field '{name}' is missing"
  if not isinstance(obj[name], (str, list)):
    return (f"field '{name}' is not a string",
            f"{where}field '{name}' must be a string or a message list, got "
            f"{type(obj[name]).__name__}")
  return None


def to_unpaired(obj):
  """An unpaired record with message-list `prompt`/`completion` rendered to strings (as
  `to_pair` renders pairs): (record, None) or (None, (reason, message)); other records are
  returned as they are, for the reader's own checks."""
  if not (isinstance(obj, dict) and (isinstance(obj.get("prompt"), list)
                                     or isinstance(obj.get("completion"), list))):
    return obj, None
  problem = _not_text(obj, "completion", "")
  if problem is not None:
    return None, problem
  prompt, texts = _conversation(obj, [("", "completion", obj["completion"])])
  if prompt is None:
    return None, texts
  return dict(obj, prompt=prompt, completion=texts[0]), None


def to_ranked(obj):
  """A ranked record with a message-list `prompt` or `completions[i].response` rendered to
  strings, every response in the one conversation: as `to_unpaired`."""
  items = obj.get("completions") if isinstance(obj, dict) else None
  if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
    return obj, None  # the reader's check names what is wrong
  if not (isinstance(obj.get("prompt"), list)
          or any(isinstance(c.get("response"), list) for c in items)):
    return obj, None
  for i, c in enumerate(items):
    problem = _not_text(c, "response", f"completions[{i}]: ")
    if problem is not None:
      return None, problem
  if len(items) < 2:  # as the reader says it; a conversation needs a response to render
    return None, ("fewer than 2 completions", f"field 'completions' has {len(items)} entries; "
                  "need >= 2")
  prompt, texts = _conversation(obj, [(f"completions[{i}]: ", "response", c["response"])
                                      for i, c in enumerate(items)])
  if prompt is None:
    return None, texts
  return dict(obj, prompt=prompt,
              completions=[dict(c, response=t) for c, t in zip(items, texts)]), None
