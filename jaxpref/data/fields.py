"""Our record field names, and `--data_fields` remapping of a dataset's own names to them.

`fields` renames a dataset's own field names to ours (`--data_fields=prompt:question,...`);
errors then name the dataset's fields, as they appear in the file (`rename`).
"""

from __future__ import annotations

import re
from typing import Mapping

from jaxpref.data import extra_members

FIELD_NAMES = ("prompt", "chosen", "rejected", "completion", "label", "completions", "weight",
               "chosen_score", "rejected_score", "label_smoothing", "user",
               "attribute_prefs", *extra_members.EXTRA_FIELDS,
               *extra_members.REF_FIELDS)  # --data_fields targets


def parse_fields(spec: str | Mapping[str, str], flag: str = "--data_fields") -> dict[str, str]:
  """`"prompt:question,chosen:response_j"` -> {ours: theirs}; a ValueError names `flag`."""
  if isinstance(spec, Mapping):
    spec = ",".join(f"{k}:{v}" for k, v in spec.items())
  out = {}
  for item in filter(None, (x.strip() for x in spec.split(","))):
    ours, sep, theirs = (x.strip() for x in item.partition(":"))
    if not sep or not ours or not theirs:
      raise ValueError(f"{flag}: {item!r} is not OURS:THEIRS (e.g. prompt:question)")
    if ours not in FIELD_NAMES:
      raise ValueError(f"{flag}: {ours!r} is not a record field; valid: {', '.join(FIELD_NAMES)}")
    if ours in out:
      raise ValueError(f"{flag}: {ours!r} is mapped twice")
    out[ours] = theirs
  return out


def remap(obj, mapping: dict[str, str]):
  # A field named like a target but not mapped to it is dropped, so a missing source is
  # reported as missing rather than quietly replaced by a same-named field.
  if not mapping or not isinstance(obj, dict):
    return obj
  out = {k: v for k, v in obj.items() if k not in mapping}
  out.update({ours: obj[theirs] for ours, theirs in mapping.items() if theirs in obj})
  return out


def rename(text: str, mapping: dict[str, str]) -> str:
  """Our quoted field names in a message -> the file's (one pass: swaps stay swaps)."""
  if not mapping:
    return text
  return re.sub(r"'(\w+)'", lambda m: f"'{mapping.get(m[1], m[1])}'", text)
