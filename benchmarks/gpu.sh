#!/usr/bin/env bash
# The benchmark suite on one GPU, in at most ~8 minutes, with only what a GPU machine already has
# (python3 with jax[cuda], flax, optax, numpy, torch, transformers; matplotlib optional: without
# it the PNG is skipped). Nothing is installed and nothing is downloaded: the weights are drawn at
# random and written to a temporary HF directory that both JAX and transformers load.
#
#   OUT=/path/to/results bash benchmarks/gpu.sh          # from the project root
#
# Writes under $OUT: gpu-<run>.{json,md,png} per run (each as soon as that run finishes),
# targets-gpu.{md,json} (the issue's GPU targets), log.txt, nvidia-smi.txt, env.txt.
# With more than one GPU (jax.device_count() > 1) a second run trains on meshes over all of them,
# data-parallel (data:N) and FSDP (fsdp:N), against one GPU: mesh-gpu.{json,md}, mesh-log.txt
# (~1 minute); on one GPU mesh-skipped.txt says it was skipped and why.
# Environment knobs: BENCH_PLAN (default gpu; "smoke" checks this script on a CPU in seconds),
# BENCH_TIMEOUT (seconds, default 460), MESH_TIMEOUT (seconds, default 120), PYTHON (default python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${OUT:?set OUT to the output directory}"
PLAN="${BENCH_PLAN:-gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX preallocates 75% of GPU memory by default; torch runs in the same process and needs room.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TOKENIZERS_PARALLELISM=false

{ nvidia-smi || echo "nvidia-smi: not available"; } > "$OUT/nvidia-smi.txt" 2>&1
"$PY" - > "$OUT/env.txt" 2>&1 <<'PYEOF' || true
import importlib.metadata as md, platform
print("python", platform.python_version())
for p in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "flax", "optax", "numpy", "torch",
          "transformers", "safetensors", "matplotlib"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "not installed")
import jax
print("jax devices", jax.devices())
PYEOF

status=0
timeout --signal=TERM --kill-after=15 "${BENCH_TIMEOUT:-460}" \
    "$PY" benchmarks/bench.py --plan "$PLAN" --out "$OUT" > "$OUT/log.txt" 2>&1 || status=$?
tail -n 60 "$OUT/log.txt"
if [ "$status" -ne 0 ]; then
    echo "bench exited with status $status (124 = timed out; finished runs are in $OUT)" >&2
fi

# Multi-GPU: the training step on a data-parallel and an FSDP mesh over every GPU, against one GPU
# (bigmodel bench --mesh). The batch is 4 examples per GPU, so both meshes divide it.
ndev=$("$PY" -c 'import jax; print(jax.device_count())' 2>/dev/null | tail -n 1) || ndev=0
case "$ndev" in ''|*[!0-9]*) ndev=0 ;; esac
if [ "$ndev" -gt 1 ]; then
    if [ "$PLAN" = smoke ]; then mesh_wl=(--preset gpt2-tiny --seq-len 16); else mesh_wl=(--preset gpt2 --seq-len 256); fi
    mesh_status=0
    timeout --signal=TERM --kill-after=15 "${MESH_TIMEOUT:-120}" \
        "$PY" benchmarks/bench.py --mesh "data:$ndev" "fsdp:$ndev" "${mesh_wl[@]}" --batch $((4 * ndev)) \
        --mesh-steps 10 --out "$OUT" --name mesh-gpu > "$OUT/mesh-log.txt" 2>&1 || mesh_status=$?
    tail -n 20 "$OUT/mesh-log.txt"
    if [ "$mesh_status" -ne 0 ]; then
        echo "bench --mesh exited with status $mesh_status (124 = timed out; see $OUT/mesh-log.txt)" >&2
        [ "$status" -ne 0 ] || status=$mesh_status
    fi
else
    echo "multi-GPU mesh run skipped: jax.device_count() = $ndev, a data-parallel / FSDP mesh needs more than one device" \
        | tee "$OUT/mesh-skipped.txt"
fi
ls -l "$OUT"
exit "$status"
