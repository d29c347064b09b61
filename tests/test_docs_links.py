"""The docs are self-contained: every relative link in README.md and docs/*.md resolves (file
and, where given, a GitHub-style heading anchor), every `docs/PAGE.md#anchor` that code,
flag files or tests cite exists, and nothing points at internal files outside the repository
(the math digest and the architecture notes live in docs/ now)."""

import os
import re
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Files allowed to mention the internal files, relative to ROOT: none.
ALLOWED: set[str] = set()

# Written in pieces so that grepping the repository for them finds nothing here.
FORBIDDEN = ("LOSSES" + ".md", "DESIGN" + ".md", "../" + "shared")

MENTION_DIRS = ("docs", "jaxpref", "experiments", "tests", "benchmarks", "examples", "tpu")
TEXT_SUFFIXES = (".py", ".md", ".flags", ".sh", ".txt", ".toml", ".cfg", ".yaml", ".yml")

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOCS_REF = re.compile(r"(?<![\w/.])docs/([A-Za-z0-9_\-]+\.md)(?:#([A-Za-z0-9_\-]+))?")
FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def _rel(path):
  return os.path.relpath(path, ROOT).replace(os.sep, "/")


def markdown_pages():
  pages = [os.path.join(ROOT, "README.md")]
  docs = os.path.join(ROOT, "docs")
  pages += sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))
  return pages


def text_files():
  out = [os.path.join(ROOT, "README.md")]
  for top in MENTION_DIRS:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
      dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
      out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(TEXT_SUFFIXES)]
  return out


def slug(heading):
  """GitHub's anchor for a heading: links reduced to their text, lower case, everything but
  letters, digits, marks, '_', '-' and spaces dropped, spaces turned into '-'."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
  kept = "".join(c for c in text
                 if c in " -_" or unicodedata.category(c)[0] in ("L", "N", "M"))
  return kept.replace(" ", "-")


def prose_lines(text):
  """Lines outside fenced code blocks, with their 1-based numbers."""
  fenced = False
  for n, line in enumerate(text.splitlines(), 1):
    if FENCE.match(line.lstrip()):
      fenced = not fenced
      continue
    if not fenced:
      yield n, line


_anchor_cache = {}


def anchors(path):
  if path not in _anchor_cache:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    seen, found = {}, set(HTML_ANCHOR.findall(text))
    for _, line in prose_lines(text):
      m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
      if not m:
        continue
      s = slug(m.group(1))
      n = seen.get(s, 0)
      seen[s] = n + 1
      found.add(s if n == 0 else f"{s}-{n}")
    _anchor_cache[path] = found
  return _anchor_cache[path]


def check_target(path, anchor, where):
  if not os.path.exists(path):
    return [f"{where}: {_rel(path)} does not exist"]
  if anchor and (not path.endswith(".md") or anchor not in anchors(path)):
    return [f"{where}: no anchor #{anchor} in {_rel(path)}"]
  return []


def test_slug_matches_github():
  assert slug("Formulas and sources") == "formulas-and-sources"
  assert slug("`robust_dpo`") == "robust_dpo"
  assert slug("Preference strength from an ensemble: `jaxpref-strength`") == (
      "preference-strength-from-an-ensemble-jaxpref-strength")
  assert slug("Themis: LM loss + BT") == "themis-lm-loss--bt"


def test_markdown_links_resolve():
  errors = []
  for page in markdown_pages():
    if _rel(page) in ALLOWED:
      continue
    with open(page, encoding="utf-8") as f:
      text = f.read()
    for n, line in prose_lines(text):
      line = INLINE_CODE.sub("", line)
      where = f"{_rel(page)}:{n}"
      for target in LINK.findall(line):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
          continue
        file_part, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        errors += check_target(path, anchor, where)
  assert not errors, "\n".join(errors)


def test_docs_references_resolve():
  """`docs/PAGE.md#anchor` as code comments, flag files, tests and the pages themselves cite it."""
  errors = []
  for path in text_files():
    if _rel(path) in ALLOWED or _rel(path) == "tests/test_docs_links.py":
      continue
    with open(path, encoding="utf-8", errors="replace") as f:
      for n, line in enumerate(f, 1):
        for page, anchor in DOCS_REF.findall(line):
          errors += check_target(os.path.join(ROOT, "docs", page), anchor, f"{_rel(path)}:{n}")
  assert not errors, "\n".join(errors)


@pytest.mark.parametrize("needle", FORBIDDEN)
def test_no_internal_references(needle):
  hits = []
  for path in text_files():
    if _rel(path) in ALLOWED:
      continue
    with open(path, encoding="utf-8", errors="replace") as f:
      for n, line in enumerate(f, 1):
        if needle in line:
          hits.append(f"{_rel(path)}:{n}: {line.strip()[:120]}")
  assert not hits, "\n".join(hits)


def test_mentioned_test_files_exist():
  """`tests/.../test_x.py` named in the docs, flag files and code is where the suite has it
  (the tests live in folders that mirror the package's layers)."""
  errors = []
  for path in text_files():
    with open(path, encoding="utf-8") as f:
      text = f.read()
    for n, line in enumerate(text.splitlines(), 1):
      for rel in re.findall(r"\btests/(?:[a-z_]+/)*test_[a-z0-9_]+\.py\b", line):
        if not os.path.exists(os.path.join(ROOT, rel)):
          errors.append(f"{_rel(path)}:{n}: {rel} does not exist")
  assert not errors, "\n".join(errors)
