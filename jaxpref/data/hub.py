"""Hugging Face Hub ids for `--init_from`, `--tokenizer`, `--train_data` and `--eval_data`.

A value that is no local path (and no `gs://...` URL) and reads `owner/name[@revision]`
(a dataset id also `owner/name[@revision][:split]`) is fetched with huggingface_hub's
`snapshot_download` into the Hub cache and replaced by a local path before anything opens
it. The cache is the one transformers and `huggingface-cli` use: `HF_HUB_CACHE`, else
`HF_HOME/hub`, else `~/.cache/huggingface/hub`. With `HF_HUB_OFFLINE=1` only the cache is
read, and an id not in it is a one-line error naming the flag and the id.

- a model id (`--init_from`) becomes its snapshot folder, holding `config.json`, the
  safetensors weights and the tokenizer files (nothing else is downloaded);
- a tokenizer id (`--tokenizer`) becomes the tokenizer file of its snapshot;
- a dataset id becomes a glob of one split's files in its snapshot: Parquet if the split
  has any, else JSONL. A split's files are the first of: one named `SPLIT.parquet`, those
  named `SPLIT-*`/`SPLIT.*` (the Hub's `data/train-00000-of-00001.parquet`), those under a
  folder named `SPLIT`. The split is
  `:SPLIT`, by default `train` for `--train_data` and `test` for `--eval_data` (TRL's
  defaults); a repository whose file names carry no split name is all `train`.

The snapshot folder's name is the commit it holds, so `origin(path)` reads the id and
commit back from a resolved path (run.json records them beside the files' checksums).
"""

from __future__ import annotations

import glob
import os
import re

from jaxpref.data import tokenizer as tokenizer_lib

# `owner/name`, an optional `@revision` (a branch, tag or commit; `refs/pr/1` has slashes)
# and, for datasets, an optional `:split`.
_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
                 r"(?:@(?P<revision>[\w./-]+))?(?::(?P<split>[\w.-]+))?")
# What a model run reads from a model repository; its other files (PyTorch .bin weights,
# ONNX exports, images) are never downloaded.
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors",
               "model.safetensors.index.json", "chat_template.jinja",
               *tokenizer_lib.FILES, *tokenizer_lib.SIDE_FILES]
FLAGS = ("init_from", "tokenizer", "train_data", "eval_data")  # the flags that take an id
DATA_SUFFIXES = (".parquet", ".jsonl")
# A missing file, not an id, whatever its shape: `data/train.jsonl` keeps its "no such file".
_FILE_SUFFIXES = (*DATA_SUFFIXES, ".json", ".model", ".safetensors", ".txt")
SPLITS = ("train", "test", "validation", "valid", "dev", "eval")
DEFAULT_SPLIT = {"train_data": "train", "eval_data": "test"}
_SNAPSHOT = re.compile(r"(?P<kind>models|datasets)--(?P<repo>[^/]+)/snapshots/(?P<commit>[^/]+)")


def parse(value: str, flag: str) -> dict | None:
  """{repo, revision, split} of a Hub id, or None for a local path, a URL or a glob."""
  if (not value or os.path.exists(value) or "://" in value or glob.has_magic(value)
      or value.startswith((".", "/", "~")) or value.endswith(_FILE_SUFFIXES)):
    return None
  m = _ID.fullmatch(value)
  if m is None:
    return None
  if m["split"] and flag not in DEFAULT_SPLIT:
    raise ValueError(f"--{flag}={value}: ':{m['split']}' names a dataset split, and --{flag} "
                     "takes a model repository (owner/name[@revision])")
  return m.groupdict()


def _snapshot(flag: str, value: str, repo: str, revision: str | None, repo_type: str,
              patterns: list[str]) -> str:
  from huggingface_hub import constants, errors, snapshot_download  # heavy, only for an id
  where = f"--{flag}={value}: no such local path, and the Hub {repo_type} {repo}"
  try:
    return snapshot_download(repo, repo_type=repo_type, revision=revision,
                             allow_patterns=patterns)
  except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
    if constants.HF_HUB_OFFLINE:
      raise ValueError(f"{where}{'@' + revision if revision else ''} is not in the Hub cache "
                       f"{constants.HF_HUB_CACHE} (HF_HUB_OFFLINE=1: nothing is downloaded; "
                       "fetch it once online, or give a local path)") from None
    raise ValueError(f"{where} could not be fetched ({str(e).splitlines()[0]})") from None
  except (errors.HfHubHTTPError, errors.HFValidationError) as e:
    # Not found, gated, private without a token, an unknown revision, a malformed name.
    raise ValueError(f"{where} could not be fetched ({type(e).__name__}: "
                     f"{str(e).splitlines()[0]})") from None


def _split_glob(flag: str, value: str, folder: str, split: str, explicit: bool) -> str:
  """The glob of `split`'s data files in a dataset snapshot (see the module doc)."""
  files = [os.path.relpath(f, folder) for f in glob.glob(os.path.join(folder, "**", "*"),
                                                          recursive=True)
           if f.endswith(DATA_SUFFIXES)]
  for ext in DATA_SUFFIXES:
    for pattern, name in ((f"**/{split}{ext}", f"{split}{ext}"),
                          (f"**/{split}[-.]*{ext}", f"{split}[-.]*{ext}"),
                          (f"**/{split}/**/*{ext}", f"*{ext}")):
      found = glob.glob(os.path.join(folder, pattern), recursive=True)
      dirs = {os.path.dirname(f) for f in found}
      if len(dirs) == 1:  # the usual case, one folder: a glob without `**` says which
        return os.path.join(dirs.pop(), name)
      if found:
        return os.path.join(folder, pattern)
  named = sorted({s for f in files for s in SPLITS
                  if re.search(rf"(^|/){s}([-./]|$)", f)})
  if files and not named and split == "train" and not explicit:
    ext = ".parquet" if any(f.endswith(".parquet") for f in files) else ".jsonl"
    return os.path.join(folder, f"**/*{ext}")
  if not files:
    raise ValueError(f"--{flag}={value}: the dataset snapshot {folder} holds no Parquet or "
                     "JSONL files (other formats are not read; convert them to JSONL)")
  raise ValueError(f"--{flag}={value}: no '{split}' split in {folder} (no file named "
                   f"{split}-* or {split}.*, none under a {split}/ folder); "
                   f"splits found: {', '.join(named) or 'none'}; pick one with "
                   f"{value.split(':')[0]}:SPLIT")


def resolve(flag: str, value: str) -> str:
  """The local path for `--flag=value`: `value` itself unless it is a Hub id (above)."""
  hub_id = parse(value, flag)
  if hub_id is None:
    return value
  repo, revision, split = hub_id["repo"], hub_id["revision"], hub_id["split"]
  if flag in DEFAULT_SPLIT:
    folder = _snapshot(flag, value, repo, revision, "dataset",
                       [f"*{s}" for s in DATA_SUFFIXES] + [f"**/*{s}" for s in DATA_SUFFIXES])
    return _split_glob(flag, value, folder, split or DEFAULT_SPLIT[flag], bool(split))
  folder = _snapshot(flag, value, repo, revision, "model", MODEL_FILES)
  if flag == "tokenizer":
    found = tokenizer_lib.find(folder)
    if found is None:
      raise ValueError(f"--tokenizer={value}: the snapshot {folder} holds none of "
                       f"{', '.join(tokenizer_lib.FILES)}")
    return found
  return folder


def tokenizer_flag(resolved: str, flags) -> str:
  """What flags.txt writes for --tokenizer (`flags`: absl's parsed flags): the Hub id it came
  from (its own, or --init_from's when it is that snapshot's tokenizer), which a re-run on
  another machine resolves again; otherwise the file `resolved`."""
  if origin(resolved) is None:
    return resolved
  explicit = flags["tokenizer"].present
  if explicit and parse(flags.tokenizer, "tokenizer"):
    return flags.tokenizer
  if not explicit and parse(flags.init_from, "init_from"):
    return flags.init_from
  return resolved


def origin(path: str) -> str | None:
  """`owner/name@commit` (`dataset:` before a dataset's) when `path` lies in a Hub cache
  snapshot, else None."""
  m = _SNAPSHOT.search(path.replace(os.sep, "/"))
  if m is None:
    return None
  return (("dataset:" if m["kind"] == "datasets" else "") + m["repo"].replace("--", "/", 1)
          + "@" + m["commit"])
