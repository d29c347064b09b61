#!/usr/bin/env bash
# The whole label-noise reproduction, from the repository root:
#   experiments/repro/label_noise/run.sh [OUT=runs/label_noise]
# Writes the data, the ensemble's strengths, the four runs and runs/label_noise/table.md.
set -euo pipefail
OUT=${1:-runs/label_noise}
HERE=experiments/repro/label_noise
# The flag files name runs/label_noise/...; another OUT overrides those paths.
DATA=(--eval_data=$OUT/clean/eval.jsonl --noprogress)
python -m jaxpref.data.synthetic bt --out_dir "$OUT/clean" --n_train 1000 --n_eval 500 --seed 0
python -m jaxpref.data.synthetic bt --out_dir "$OUT/noisy" --n_train 1000 --n_eval 0 --seed 0 \
  --flip_rate 0.25
python -m jaxpref.eval.strength --flagfile=$HERE/strength.flags --workdir="$OUT/ensemble" \
  --train_data="$OUT/noisy/train.jsonl" "${DATA[@]}"
python -m jaxpref.main --flagfile=$HERE/clean.flags --workdir="$OUT/clean_run" \
  --train_data="$OUT/clean/train.jsonl" "${DATA[@]}"
python -m jaxpref.main --flagfile=$HERE/noisy.flags --workdir="$OUT/noisy_run" \
  --train_data="$OUT/noisy/train.jsonl" "${DATA[@]}"
for r in flip margin; do
  python -m jaxpref.main --flagfile=$HERE/$r.flags --workdir="$OUT/${r}_run" \
    --train_data="$OUT/ensemble/strength.jsonl" "${DATA[@]}"
done
python $HERE/table.py "$OUT" | tee "$OUT/table.md"
