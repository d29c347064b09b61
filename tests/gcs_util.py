"""A local Google Cloud Storage emulator for the gs:// tests (no network, no credentials).

`gcs` (a fixture, one emulator per test module) serves the JSON API of GCS from this process
on a free localhost port (`gcp-storage-emulator`, in memory) and points every client of the
package at it through the environment, which the CLI subprocesses inherit:
- `STORAGE_EMULATOR_HOST`: gcsfs (through etils.epath) and google-cloud-storage;
- `TENSORSTORE_GCS_HTTP_URL`: tensorstore's own gcs driver, which orbax writes arrays with;
- `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: gcsfs would otherwise ask the Storage Control
  gRPC API for the bucket's layout, which the emulator does not serve (a 60 s timeout);
- `JAXPREF_CACHE`: where `paths.local_copy` puts what it fetches.
Each test gets its own bucket (`gcs.bucket`).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket

import pytest

_count = itertools.count()


class Emulator:

  def __init__(self, url: str, server):
    self.url, self.server = url, server
    self.bucket = ""

  def new_bucket(self) -> str:
    from gcp_storage_emulator.handlers import buckets
    name = f"bucket{next(_count)}"
    buckets.create_bucket(name, self.server._storage)
    self.bucket = name
    return name


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def _emulator(tmp_path_factory):
  from gcp_storage_emulator.server import create_server
  logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
         "JAXPREF_CACHE": str(tmp_path_factory.mktemp("jaxpref_cache"))}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec
  fsspec.filesystem("gs").clear_instance_cache()  # a cached client may know another port
  try:
    yield Emulator(url, server)
  finally:
    fsspec.filesystem("gs").clear_instance_cache()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()


@pytest.fixture
def gcs(_emulator):
  """The emulator with a fresh bucket: `gs://{gcs.bucket}/...`."""
  _emulator.new_bucket()
  return _emulator
