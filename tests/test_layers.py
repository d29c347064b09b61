"""The layer table of docs/design.md, enforced: every import in `jaxpref/` (module level and
inside functions) points down to a layer its own may import, with no exception; imports
inside functions are kept only for heavy optional dependencies, each with a reason."""

import ast
import os
import re

from cli_util import ROOT

PACKAGE = os.path.join(ROOT, "jaxpref")
DESIGN = os.path.join(ROOT, "docs", "design.md")
# Third-party modules a function may import lazily (heavy, or optional for most runs).
LAZY_OK = ("torch", "transformers", "peft", "tensorboardX", "matplotlib", "grain",
           "tensorflow_datasets", "pyarrow", "jinja2", "tokenizers", "sentencepiece",
           "orbax", "safetensors", "huggingface_hub", "jax._src", "jax.experimental",
           "google", "gcsfs", "fsspec", "etils", "importlib")


def layer_table() -> dict[str, set[str]]:
  text = open(DESIGN).read()
  block = text.split("<!-- layers -->")[1].split("<!-- /layers -->")[0]
  table = {}
  for line in block.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) != 3 or not cells[0].startswith("`"):
      continue
    table[cells[0].strip("`")] = {c.strip() for c in cells[2].split(",") if c.strip()}
  return table


def layer_of(module: str) -> str | None:
  """`jaxpref.train.loop` -> `train`; `jaxpref.types` -> `types`; other packages -> None."""
  parts = module.split(".")
  if parts[0] != "jaxpref" or len(parts) == 1:
    return None
  return parts[1]


def imports(path: str):
  """(line, imported jaxpref module, inside a function, source line) of every import."""
  src = open(path).read()
  lines = src.splitlines()
  tree = ast.parse(src)
  inner = set()
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      inner |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = ([f"jaxpref.{a.name}" for a in node.names] if node.module == "jaxpref"
               else [node.module])
    else:
      continue
    for name in names:
      yield node.lineno, name, id(node) in inner, lines[node.lineno - 1]


def package_files():
  for folder, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if f.endswith(".py"):
        yield os.path.join(folder, f)


def test_the_table_names_every_layer():
  table = layer_table()
  assert {"types", "losses", "models", "data", "train", "eval"} <= set(table)
  for layer, allowed in table.items():
    assert allowed <= set(table), (layer, allowed - set(table))
  found = {layer_of(os.path.relpath(p, ROOT)[:-3].replace(os.sep, "."))
           for p in package_files()} - {"__init__"}
  assert found <= set(table), f"layers missing from docs/design.md: {found - set(table)}"


def test_imports_point_down_only():
  table = layer_table()
  bad = []
  for path in package_files():
    rel = os.path.relpath(path, ROOT)
    own = layer_of(rel[:-3].replace(os.sep, "."))
    if own == "__init__":
      continue
    for line, name, _, _ in imports(path):
      target = layer_of(name)
      if target is None or target == own:
        continue
      if target not in table.get(own, set()):
        bad.append(f"{rel}:{line}: {own} imports {name}")
  assert not bad, "imports against docs/design.md's layer table:\n" + "\n".join(bad)


def test_no_cycle_between_layers():
  table = layer_table()
  order, seen = [], set()

  def visit(layer, path):
    assert layer not in path, f"layer cycle: {' -> '.join(path + [layer])}"
    if layer in seen:
      return
    for dep in table[layer]:
      visit(dep, path + [layer])
    seen.add(layer)
    order.append(layer)

  for layer in table:
    visit(layer, [])
  assert len(order) == len(table)


def test_imports_inside_functions_are_heavy_and_explained():
  bad = []
  for path in package_files():
    rel = os.path.relpath(path, ROOT)
    for line, name, inner, text in imports(path):
      if not inner:
        continue
      if not name.startswith(LAZY_OK):
        bad.append(f"{rel}:{line}: {name} imported inside a function")
      elif not re.search(r"#\s*\S", text):
        bad.append(f"{rel}:{line}: lazy import of {name} without a reason on its line")
  assert not bad, "\n".join(bad)
