"""`--init_from=gs://...` and `--tokenizer=gs://...` (the local GCS emulator of
tests/gcs_util.py): flags.to_config turns them into local copies (`models.remote.local`,
fetched once into $JAXPREF_CACHE) holding the files a run reads, byte for byte, and nothing
else; and `--export_hf=gs://...`."""

import filecmp
import os

import numpy as np
import pytest

from jaxpref import paths
from jaxpref.data import Tokenizer, make_tiny
from jaxpref.models import convert, hf, remote

pytest.importorskip("transformers")
from hf_util import random_llama  # noqa: E402


def _upload(src: str, dest: str) -> None:
  for name in paths.walk_files(src):
    paths.copy(os.path.join(src, name), paths.join(dest, name))


@pytest.mark.slow  # ~12 s on 2 busy cores, most of it torch saving the model
def test_init_from_and_tokenizer_in_a_bucket(gcs, tmp_path):
  local, _ = random_llama(tmp_path / "llama", 160)
  with open(os.path.join(local, "pytorch_model.bin"), "wb") as f:  # never read: not fetched
    f.write(b"\0" * 64)
  url = f"gs://{gcs.bucket}/models/llama"
  _upload(local, url)
  got = remote.local("init_from", url)
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
  assert remote.local("train_data", url + "/x.jsonl") == url + "/x.jsonl"  # streamed, as is

  tok_url = f"gs://{gcs.bucket}/tok/tokenizer.model"
  paths.copy(os.path.join(make_tiny.OUT, "tokenizer.model"), tok_url)
  tok = Tokenizer.load(remote.local("tokenizer", tok_url))
  want_tok = Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))
  text = "a test of the tokenizer"
  assert tok.vocab_size == want_tok.vocab_size and tok.encode(text) == want_tok.encode(text)
  with pytest.raises(FileNotFoundError, match=f"gs://{gcs.bucket}/nothing: no such"):
    remote.local("init_from", f"gs://{gcs.bucket}/nothing")


def test_export_hf_to_a_bucket_writes_what_a_local_export_writes(gcs, tmp_path):
  import types
  from flax import nnx
  from jaxpref import models
  from jaxpref.models import hf_export
  config = models.get_config("tiny", vocab_size=160)
  model = models.Decoder(config, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  url = f"gs://{gcs.bucket}/export"
  paths.makedirs(url)
  with paths.open(paths.join(url, "model-00009-of-00009.safetensors"), "wb") as f:
    f.write(b"stale")  # an earlier export's shard: removed, as a local export removes it
  said = []
  for out in (str(tmp_path / "export"), url):
    run = types.SimpleNamespace(
        lora=None, export_hf=out, role="policy", model=config, init_from="",
        data=types.SimpleNamespace(tokenizer=os.path.join(make_tiny.OUT, "tokenizer.model")))
    hf_export.check(run)
    hf_export.export(run, params, None, said.append)
  assert said[1].startswith(f"--export_hf: wrote {url} (")
  local = str(tmp_path / "export")
  assert paths.walk_files(url) == paths.walk_files(local)
  for name in paths.walk_files(local):
    with paths.open(paths.join(url, name), "rb") as f, open(os.path.join(local, name), "rb") as g:
      assert f.read() == g.read(), name
