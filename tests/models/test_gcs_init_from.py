"""`--init_from=gs://...` and `--tokenizer=gs://...` (the local GCS emulator of
tests/gcs_util.py): flags.to_config turns them into local copies (`flags._local`, fetched once
into $JAXPREF_CACHE) holding the files a run reads, byte for byte, and nothing else."""

import filecmp
import os

import numpy as np
import pytest

from jaxpref import flags as jflags
from jaxpref import paths
from jaxpref.data import Tokenizer, make_tiny
from jaxpref.models import convert, hf

pytest.importorskip("transformers")
from hf_util import random_llama  # noqa: E402


def _upload(local: str, remote: str) -> None:
  for name in paths.walk_files(local):
    paths.copy(os.path.join(local, name), paths.join(remote, name))


@pytest.mark.slow  # ~12 s on 2 busy cores, most of it torch saving the model
def test_init_from_and_tokenizer_in_a_bucket(gcs, tmp_path):
  local, _ = random_llama(tmp_path / "llama", 160)
  with open(os.path.join(local, "pytorch_model.bin"), "wb") as f:  # never read: not fetched
    f.write(b"\0" * 64)
  url = f"gs://{gcs.bucket}/models/llama"
  _upload(local, url)
  got = jflags._local("init_from", url)
  assert got == os.path.join(os.environ["JAXPREF_CACHE"], "gs", gcs.bucket, "models", "llama")
  assert "pytorch_model.bin" not in os.listdir(got)
  assert {"config.json", "model.safetensors"} <= set(os.listdir(got))
  for name in os.listdir(got):
    assert filecmp.cmp(os.path.join(got, name), os.path.join(local, name), shallow=False), name
  assert convert.run_config(got, {}) == convert.run_config(local, {})
  want = hf.read_tensors(local)
  tensors = hf.read_tensors(got)
  assert tensors.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(tensors[k], want[k], err_msg=k)
  assert jflags._local("train_data", url + "/x.jsonl") == url + "/x.jsonl"  # streamed, as is

  tok_url = f"gs://{gcs.bucket}/tok/tokenizer.model"
  paths.copy(os.path.join(make_tiny.OUT, "tokenizer.model"), tok_url)
  tok = Tokenizer.load(jflags._local("tokenizer", tok_url))
  want_tok = Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))
  text = "a test of the tokenizer"
  assert tok.vocab_size == want_tok.vocab_size and tok.encode(text) == want_tok.encode(text)
  with pytest.raises(FileNotFoundError, match=f"gs://{gcs.bucket}/nothing: no such"):
    jflags._local("init_from", f"gs://{gcs.bucket}/nothing")
