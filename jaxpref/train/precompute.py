"""`--reference=precomputed`: the reference's sequence log-probs, computed once before
training (or read from `--reference_cache`, or from the records) and stored with the data,
so no step runs a reference forward pass."""

from __future__ import annotations

import time

import jax

from jaxpref.train import ref_cache
from jaxpref.train.reference import Reference
from jaxpref.train.roles.policy import precompute_reference
from jaxpref.train.setup import say


def reference(cfg, graphdef, ref: Reference, datasets, put) -> Reference:
  """Stores the reference's log-probs in each dataset's `ref_logps`; returns the reference
  the steps keep: none, but LoRA's frozen base (the policy is built on it)."""
  model = ref.params if ref.base is None else ref.base
  t0 = time.perf_counter()
  weights = ref_cache.params_digest(model) if cfg.reference_cache else ""
  said = []
  for ds, path in zip(datasets, (cfg.data.train_data, cfg.data.eval_data)):
    if ds is None:
      continue
    given = getattr(ds, "record_ref_logps", None)  # the records' ref_chosen/rejected_logps
    if given is not None:
      if ds.tokens.shape[1] != given.shape[1]:
        raise ValueError(f"{path}: the records' reference log-probs cover (chosen, rejected), "
                         f"but --loss={cfg.loss} scores {ds.tokens.shape[1]} members a group")
      ds.ref_logps = given
      said.append(f"{ds.n} groups read from the records (taken as given: {ds.n_truncated} of "
                  "them are truncated here)")
      continue
    parts = ref_cache.key_parts(cfg, path, weights) if weights else None
    notes: list[str] = []
    cached = (ref_cache.load(cfg.reference_cache, parts, ds.tokens.shape[:2], notes)
              if parts else None)
    for note in notes:  # an unreadable entry is a miss, recomputed
      say(note)
    said.append(f"{ds.n} groups " + ("read from --reference_cache" if cached is not None
                                     else "computed"))
    if cached is None:
      cached = precompute_reference(graphdef, model, ds, cfg.data.eval_batch_size, put,
                                    cfg.logps)
      if parts and jax.process_index() == 0:
        ref_cache.save(cfg.reference_cache, parts, cached)
    ds.ref_logps = cached
  say(f"reference: log-probs of {', '.join(said)} in {time.perf_counter() - t0:.1f} s; "
      "the reference model is not kept")
  return Reference("precomputed", None, base=ref.base)
