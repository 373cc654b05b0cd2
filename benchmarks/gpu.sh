#!/usr/bin/env bash
# The GPU benchmark run (issue 14, item 5): on a machine with a CUDA GPU and JAX for CUDA
# installed, from the repository root, with $OUT a folder for the results:
#     OUT=/tmp/gpu bash benchmarks/gpu.sh
# Runs the product, operator and analysis (eigsh) benchmarks on the GPU; each writes its table
# to $OUT/<name>.txt and its JSON beside it. The source is used in place (PYTHONPATH=src).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src" XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$OUT"
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' | tee "$OUT/devices.txt"
nvidia-smi -L 2>/dev/null | tee -a "$OUT/devices.txt"
run() {  # name, time limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name" >&2
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "exit $?" >>"$OUT/$name.txt"
  tail -40 "$OUT/$name.txt"
}
run products "${PRODUCTS_S:-150}" python3 benchmarks/bench_products.py --repeats 10
run operators "${OPERATORS_S:-150}" python3 benchmarks/bench_operators.py --repeats 10
run analysis "${ANALYSIS_S:-200}" python3 benchmarks/bench_analysis.py
for f in products operators analysis; do
  cp "benchmarks/results/$f.json" "$OUT/$f.json" 2>/dev/null || true
done
