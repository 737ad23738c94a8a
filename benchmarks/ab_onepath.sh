#!/usr/bin/env bash
# Before/after comparison for issue #13 (one model path): GPT-2 batch-1 decoding and the
# bert-base training step, each side by side with HF-PyTorch in the same process, alternating
# the commit before the change (checked out at $BEFORE) and this tree, so host noise hits both.
#   BEFORE=/tmp/before OUT=benchmarks/results/cpu-2026-12-03-onepath bash benchmarks/ab_onepath.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:?set OUT}
BEFORE=${BEFORE:?set BEFORE to a checkout of the commit before the change}
mkdir -p "$OUT"
decode="--preset gpt2 --batch 1 --seq-len 8 --kinds decode --sides jax torch --decode-new-tokens 64 --decode-prompt-len 8 --min-time 10 --max-reps 10 --no-flop-check"
train="--preset bert-base --batch 8 --seq-len 128 --kinds train --sides jax torch --min-time 20 --max-reps 10 --no-flop-check"
for round in 1 2; do
  (cd "$BEFORE" && PYTHONPATH="$BEFORE" "$OLDPWD/$PY" -m bigmodel_jax bench $decode --out "$OLDPWD/$OUT" --name "before-decode-$round")
  $PY -m bigmodel_apps bench $decode --out "$OUT" --name "after-decode-$round"
done
(cd "$BEFORE" && PYTHONPATH="$BEFORE" "$OLDPWD/$PY" -m bigmodel_jax bench $train --out "$OLDPWD/$OUT" --name "before-train")
$PY -m bigmodel_apps bench $train --out "$OUT" --name "after-train"
