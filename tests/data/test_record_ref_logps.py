"""Reference log-probs carried by the records (TRL's `ref_chosen_logps`/`ref_rejected_logps`):
checked like every record field, and read by `--reference=precomputed` instead of running
the reference model."""

import glob
import json

import numpy as np
import pytest

from jaxpref import data as data_lib
from jaxpref import models
from jaxpref.data import make_tiny
from jaxpref.train import loop
from jaxpref.train.config import DataConfig, RunConfig

TINY = make_tiny.OUT
PAIR = {"prompt": "hi", "chosen": "yes", "rejected": "no"}


def write(path, objs):
  path.write_text("".join(json.dumps(o) + "\n" for o in objs))
  return str(path)


def test_records_carry_both_fields_or_neither(tmp_path):
  given = dict(PAIR, ref_chosen_logps=-3.5, ref_rejected_logps=-7)
  records, _ = data_lib.read_pairs(write(tmp_path / "ok.jsonl", [given, given]))
  assert [r.ref_logps for r in records] == [(-3.5, -7.0)] * 2
  records, _ = data_lib.read_pairs(write(tmp_path / "none.jsonl", [PAIR]))
  assert records[0].ref_logps is None
  bad = [(dict(PAIR, ref_chosen_logps=-1.0), "ok.jsonl:1: field 'ref_rejected_logps' is missing"),
         (dict(PAIR, ref_chosen_logps=0.5, ref_rejected_logps=-1.0),
          "field 'ref_chosen_logps' must be a finite summed log-prob <= 0"),
         (dict(PAIR, ref_chosen_logps="x", ref_rejected_logps=-1.0), "ref_chosen_logps")]
  for obj, message in bad:
    with pytest.raises(ValueError, match=message):
      data_lib.read_pairs(write(tmp_path / "ok.jsonl", [obj]))
  with pytest.raises(ValueError, match="mixed.jsonl:2: fields ref_chosen_logps/ref_rejected_logps "
                     "are missing"):
    data_lib.read_pairs(write(tmp_path / "mixed.jsonl", [given, PAIR]))
  records, report = data_lib.read_pairs(write(tmp_path / "skip.jsonl", [bad[0][0], given]),
                                        skip_invalid=True)
  assert len(records) == 1 and report.n_skipped == 1
  remapped, _ = data_lib.read_pairs(
      write(tmp_path / "theirs.jsonl", [dict(PAIR, rc=-1.0, rr=-2.0)]),
      fields="ref_chosen_logps:rc,ref_rejected_logps:rr")
  assert remapped[0].ref_logps == (-1.0, -2.0)


def config(workdir, train, **kw):
  return RunConfig(workdir=str(workdir), model=models.get_config("tiny"), steps=1, log_every=1,
                   eval_every=1, checkpoint_every=1, progress=False, plot=False,
                   reference="precomputed",
                   data=DataConfig(train_data=train, eval_data="", tokenizer=f"{TINY}/tokenizer.model"),
                   **kw)


@pytest.mark.slow
def test_precomputed_reads_the_records_values(tmp_path):
  # The reference's own log-probs, from a run that computes them into a cache.
  cache = tmp_path / "cache"
  loop.run(config(tmp_path / "computed", f"{TINY}/train.jsonl", reference_cache=str(cache)))
  (npz,) = glob.glob(f"{cache}/*.npz")
  ref = np.load(npz)["ref_logps"].astype(np.float64)
  objs = [json.loads(line) for line in open(f"{TINY}/train.jsonl")]
  assert ref.shape == (len(objs), 2)
  # Given values 5 nats below the reference on every chosen response: at step 0 the policy is
  # the reference, so each pair's DPO margin is beta * 5 and the loss softplus(-0.5).
  shifted = [dict(o, ref_chosen_logps=float(c) - 5.0, ref_rejected_logps=float(r))
             for o, (c, r) in zip(objs, ref)]
  run = tmp_path / "given"
  out = loop.run(config(run, write(tmp_path / "shifted.jsonl", shifted)))
  first = [json.loads(line) for line in open(run / "metrics.jsonl")]
  train = [r for r in first if r["split"] == "train"][0]
  np.testing.assert_allclose(train["loss"], np.log1p(np.exp(-0.5)), rtol=1e-4)
  np.testing.assert_allclose(train["rewards/margin"], 0.5, rtol=1e-3)
  assert np.isfinite(out["loss"])
