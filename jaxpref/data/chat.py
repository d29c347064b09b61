"""Chat-layout pairs (HH-RLHF, UltraFeedback-binarized) -> plain prompt / chosen / rejected.

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
