"""`--init_from` and `--tokenizer` given as `gs://` URLs, made local before anything opens them.

safetensors memory-maps its files, and sentencepiece and tokenizers open paths themselves,
so a model or tokenizer in a bucket is copied once into the local cache
(`paths.local_copy`: `$JAXPREF_CACHE`, at the URL's own path) and the run reads the copy,
as a Hub id is read from the Hub cache (`data.hub`). Only the files a run reads are
fetched. Data files are not copied: `data.sources` streams them from the bucket.
"""

from __future__ import annotations

import os

from jaxpref import paths
from jaxpref.data import hub
from jaxpref.data import tokenizer as tokenizer_lib
from jaxpref.models import convert

# What a run reads of an --init_from folder: a Hugging Face folder's files, or a
# jaxpref-convert folder's.
INIT_FROM_FILES = (*hub.MODEL_FILES, convert.CONFIG_FILE, convert.IDS_FILE,
                   f"{convert.PARAMS_DIR}/**")
TOKENIZER_FILES = (*tokenizer_lib.FILES, *tokenizer_lib.SIDE_FILES, "chat_template.jinja")


def local(flag: str, path: str) -> str:
  """The local path to read for `--flag=path`: `path` itself unless it is a URL given to
  --init_from or --tokenizer, then its local copy (a tokenizer file with its folder's side
  files: tokenizer_config.json, the chat template)."""
  if not paths.is_remote(path) or flag not in ("init_from", "tokenizer"):
    return path
  if flag == "init_from" or paths.isdir(path):
    return paths.local_copy(path, INIT_FROM_FILES if flag == "init_from" else TOKENIZER_FILES)
  name = path.rstrip("/").rsplit("/", 1)[-1]
  return os.path.join(paths.local_copy(paths.dirname(path), (*TOKENIZER_FILES, name)), name)
