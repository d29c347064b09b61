"""Where records come from: a JSONL file, a Parquet file, a folder, or a glob of shards.

Every source becomes one stream of `(file, line, obj, problem)`: `line` is the 1-based
line of a JSONL file or row of a Parquet file, `obj` the decoded record (None when
`problem`, a `(reason, message)` pair, says why it could not be decoded). The record
checks in `records.py` read this stream and nothing else, so every format is checked the
same way.

A folder is read as its `*.jsonl` and `*.parquet` files (not recursively); other files
in it (a README, `.gitattributes`) are listed in the read report, never read. A glob
(`data/train-*.parquet`, `data/**/*.jsonl`) is read as every file it matches. Files are
read in sorted order, so the record order, and with it the batch order, is the same on
every machine. A file is Parquet if its name ends in `.parquet` and JSONL otherwise. Each
of these may be a `gs://` URL (`jaxpref.paths`), read as a stream, never copied whole.

Parquet columns map to record fields; a null is read as an absent field, since a
columnar file has no other way to leave a field out of one row.
"""

from __future__ import annotations

import json
from typing import Iterator

from jaxpref import paths

FILE_SUFFIXES = (".jsonl", ".parquet")
_ROWS_PER_BATCH = 1024


class DataError(ValueError):
  """A problem with a data file; the message starts with `FILE:LINE:` (or `FILE:`)."""


def resolve(path: str) -> tuple[list[str], list[str]]:
  """(files to read in order, files in a given folder that are not read)."""
  if paths.isfile(path):
    return [path], []
  if paths.isdir(path):
    names = sorted(paths.listdir(path))
    files = [paths.join(path, n) for n in names
             if n.endswith(FILE_SUFFIXES) and paths.isfile(paths.join(path, n))]
    ignored = [n for n in names if paths.join(path, n) not in files]
    if not files:
      raise DataError(f"{path}: a folder with no {' or '.join(FILE_SUFFIXES)} files"
                      + (f" (it holds {', '.join(ignored[:5])})" if ignored else ""))
    return files, ignored
  if paths.has_magic(path):
    files = sorted(f for f in paths.glob(path) if paths.isfile(f))
    if not files:
      raise DataError(f"{path}: no files match this pattern")
    return files, []
  raise DataError(f"{path}: no such file")


def _parse_line(raw: bytes, lineno: int):
  """(obj, None) for a JSON line, (None, None) for a blank one, (None, problem) otherwise."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return None, ("invalid UTF-8",
                  f"bytes are not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
  if lineno == 1:
    line = line.removeprefix("\ufeff")  # editors on Windows start files with a BOM
  if not line.strip():
    return None, None
  try:
    return json.loads(line.rstrip("\r\n")), None  # so a cut-off line's column is its end
  except json.JSONDecodeError as e:
    return None, ("invalid JSON", f"invalid JSON ({e.msg} at column {e.colno}); "
                  "JSONL holds one complete JSON object per line")


def _jsonl_rows(path: str):
  with paths.open(path, "rb") as f:
    # Iterating bytes splits on b"\n" only; str.splitlines would also split on U+2028 etc.
    for lineno, raw in enumerate(f, start=1):
      obj, problem = _parse_line(raw, lineno)
      if obj is not None or problem is not None:  # blank lines are not records
        yield lineno, obj, problem


def _without_nulls(row: dict) -> dict:
  return {k: v for k, v in row.items() if v is not None}


def _parquet_rows(path: str):
  import pyarrow as pa  # only runs that read Parquet pay for the import
  import pyarrow.parquet as pq  # (the same)
  row = 0
  try:
    source = paths.open(path, "rb") if paths.is_remote(path) else path  # pyarrow reads ranges
    for batch in pq.ParquetFile(source).iter_batches(batch_size=_ROWS_PER_BATCH):
      try:
        rows = batch.to_pylist()
      except UnicodeDecodeError:  # a string column with bad bytes: find the row(s)
        rows = None
      for i in range(batch.num_rows):
        row += 1
        if rows is not None:
          yield row, _without_nulls(rows[i]), None
          continue
        try:
          yield row, _without_nulls(batch.slice(i, 1).to_pylist()[0]), None
        except UnicodeDecodeError as e:
          yield row, None, ("invalid UTF-8", f"a string column holds bytes that are not valid "
                            f"UTF-8 ({e.reason} at byte {e.start})")
  except (pa.ArrowException, OSError) as e:  # a bad footer, page header or compressed page
    where = f" after row {row}" if row else ""
    raise DataError(f"{path}: not a readable Parquet file{where} ({e})") from None


def rows(path: str) -> Iterator[tuple[str, int, object, tuple[str, str] | None]]:
  """Every record of every file of `path`, as `(file, line or row, obj, problem)`."""
  for file in resolve(path)[0]:
    reader = _parquet_rows if file.endswith(".parquet") else _jsonl_rows
    for line, obj, problem in reader(file):
      yield file, line, obj, problem
