"""Jinja chat templates (`--chat_template`), rendered as transformers' `apply_chat_template`.

The environment is the one transformers builds (a sandbox, `trim_blocks`, `lstrip_blocks`,
loop controls, its `tojson`, `raise_exception` and `strftime_now`) and the template sees the
same variables (`messages`, `add_generation_prompt`, `tools`, `documents` and the tokenizer's
special tokens), so the text is the text transformers renders for the same template.

A pair's prompt is the conversation rendered with `add_generation_prompt=True`; a response
is what rendering the conversation with the assistant's turn appended adds after it (its
end-of-turn marker included). jaxpref places BOS and EOS as token ids (`Tokenizer.frame`),
so a BOS token the template writes first and an EOS token it writes last are left to those
ids rather than doubled; and a template that writes no BOS (ChatML, Zephyr) or ends the
assistant's turn with something else than EOS (ChatML's "<|im_end|>\n", Gemma's
"<end_of_turn>\n") gets none placed (`resolve` sets the tokenizer's `add_bos`/`add_eos`),
so the ids are those `apply_chat_template` gives for the whole conversation.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

SETTINGS = ("auto", "none")


def _environment():
  import jinja2  # only chat-template runs pay for Jinja
  from jinja2 import nodes  # (the same)
  from jinja2.ext import Extension, loopcontrols  # (the same)
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # (the same)

  class Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders
    its body: the mask it marks is not used here."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, loopcontrols])
  # Jinja's own tojson escapes HTML characters; transformers' (and so the templates') does not.
  env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
      sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                  separators=separators, sort_keys=sort_keys)
  env.globals["raise_exception"] = raise_exception
  env.globals["range"] = _bounded_range
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  return env


MAX_RANGE = 10_000  # a chat template loops over messages; a huge range is an attack or a bug


def _bounded_range(*args):
  """`range` for templates, refusing more than MAX_RANGE items (Jinja's sandbox allows
  100,000 per call, and a nested pair of those would hang the data reader)."""
  r = range(*args)
  if len(r) > MAX_RANGE:
    raise OverflowError(f"range of {len(r)} items: a chat template may loop over at most "
                        f"{MAX_RANGE}")
  return r


def special_tokens(tok) -> dict[str, str]:
  """bos_token, eos_token (and unk_token where the tokenizer has one) as text."""
  out = {"bos_token": tok.token(tok.bos_id), "eos_token": tok.token(tok.eos_id)}
  if tok.unk_id >= 0:
    out["unk_token"] = tok.token(tok.unk_id)
  return out


class ChatTemplate:
  """A compiled template and the special tokens it is rendered with."""

  def __init__(self, source: str, where: str, special: dict[str, str]):
    import jinja2  # only chat-template runs pay for Jinja
    self.where, self.special, self.source = where, dict(special), source
    try:
      self._template = _environment().from_string(source)
    except jinja2.TemplateError as e:
      raise ValueError(f"--chat_template: {where} is not a valid Jinja template ({e})") from None

  def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
      return self._template.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **self.special)
    except Exception as e:  # noqa: BLE001 (the template is the user's code: any failure is its)
      what = str(e) if type(e).__name__ == "TemplateError" else f"{type(e).__name__}: {e}"
      raise ValueError(f"the chat template ({self.where}) failed: {what}") from None

  def framing(self) -> tuple[bool, bool]:
    """(writes BOS first, ends the assistant's turn with EOS), read off a one-turn
    conversation; (True, True) if the template refuses it."""
    bos, eos = self.special.get("bos_token"), self.special.get("eos_token")
    user = [{"role": "user", "content": "hi"}]
    try:
      full = self.render(user + [{"role": "assistant", "content": "hello"}], False)
    except ValueError:
      return True, True
    return bool(bos) and full.startswith(bos), bool(eos) and full.endswith(eos)

  def split(self, prompt: list[dict], response: str) -> tuple[str, str]:
    """(prompt text, response text) of one conversation and its final assistant turn."""
    head = self.render(prompt, add_generation_prompt=True)
    full = self.render(prompt + [{"role": "assistant", "content": response}],
                       add_generation_prompt=False)
    if not full.startswith(head):
      raise ValueError(f"the chat template ({self.where}) renders the conversation with the "
                       "response so that it does not start with the prompt rendered with "
                       "add_generation_prompt=True, so the response cannot be split off")
    body = full[len(head):]
    bos, eos = self.special.get("bos_token"), self.special.get("eos_token")
    if bos and head.startswith(bos):
      head = head[len(bos):]
    if eos and body.endswith(eos):
      body = body[:-len(eos)]
    return head, body


def resolve(setting: str, tok) -> ChatTemplate | None:
  """The template `--chat_template` names for `tok`: auto = the tokenizer folder's (None
  when it has none), none = None, else a Jinja file (or a tokenizer_config.json)."""
  if setting == "none":
    return None
  special = special_tokens(tok)
  if setting == "auto":
    if not tok.chat_template:
      return None
    return _framed(ChatTemplate(tok.chat_template, f"{tok.folder}'s chat template", special),
                   tok)
  if not os.path.isfile(setting):
    raise FileNotFoundError(f"--chat_template: {setting!r} is neither auto, none nor a file")
  with open(setting) as f:
    source = f.read()
  if setting.endswith(".json"):
    try:
      source = json.loads(source).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
      source = None
    if not isinstance(source, str):
      raise ValueError(f"--chat_template: {setting} holds no \"chat_template\" string")
  return _framed(ChatTemplate(source, setting, special), tok)


def _framed(template: ChatTemplate, tok) -> ChatTemplate:
  """`template`, with `tok` placing BOS and EOS only where the template writes them."""
  tok.add_bos, tok.add_eos = template.framing()
  tok.bos_in_text = tok.add_bos
  return template
