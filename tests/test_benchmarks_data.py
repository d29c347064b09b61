"""benchmarks/data_pipeline.py at a tiny size: the synthetic lengths follow the stated
distribution, every stage runs (prepare and grain included), and the padding efficiencies
are fractions with packing and buckets above plain padding (no timing is asserted)."""

import importlib.util
import os

import numpy as np

from jaxpref.data import Tokenizer, make_tiny
from jaxpref.data.batching import padding_efficiency

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "data_pipeline.py")
_spec = importlib.util.spec_from_file_location("data_pipeline", _SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TOK = Tokenizer.load(os.path.join(make_tiny.OUT, "tokenizer.model"))


def test_data_pipeline_benchmark_tiny(tmp_path):
  path = str(tmp_path / "pairs.jsonl")
  target = bench.write_records(path, 256, TOK, seed=1)
  realized = bench.realized_lengths(path, TOK)
  for field, (median, _) in bench.LENGTHS.items():
    assert len(realized[field]) == 256
    # Words are placed by the tokenizer's mean tokens per word: lengths land near the target.
    assert 0.7 < np.median(realized[field]) / median < 1.4, field
    assert abs(np.median(realized[field] / target[field]) - 1) < 0.15, field
  times, ds = bench.throughput(path, TOK, 256, 16, [2, 4], str(tmp_path))
  assert ds.n == 256 and ds.n_truncated > 0  # the long tail is cut at max_len 256
  assert all(s > 0 for s in times.values())
  assert {"json.loads (baseline)", "prepare (jaxpref-data prepare)",
          "grain pad batches (prepared)", "batch pack m=4"} <= set(times)
  eff = bench.efficiency(ds, 16, [2, 4])
  assert all(0 < e <= 1 for e in eff.values()), eff
  assert eff["pack m=2"] >= eff["pad"] and eff["pack m=4"] >= eff["pad"]
  assert eff["buckets"] >= eff["pad"]
  # The estimate is what the built batches compute: checked on pack's first batches.
  b = bench.batchers(ds, 16, [2])["pack m=2"]
  real, computed = np.sum([padding_efficiency(b.batch(s)) for s in range(ds.n // 16)], 0)
  assert np.isclose(real / computed, eff["pack m=2"])
