#!/usr/bin/env bash
# The GPU figures of the README, in one go: the CUDA tests, then bench_speed and bench_quality on CUDA.
#   bash benchmarks/run_cuda.sh [RESULTS_DIR]      (default: benchmarks/results)
# Inpainting, segmentation and the 1 mm decoding rows are left out here (they need SimpleITK and nilearn's
# template, which the GPU machine this was written for did not have); run bench_speed.py --device cuda for them.
set -uo pipefail
cd "$(dirname "$0")/.."
export MEDDIFF_BENCH_RESULTS="${1:-benchmarks/results}" PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$MEDDIFF_BENCH_RESULTS"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
status=0
$PY -m pytest -q tests/runtime/test_cuda.py 2>&1 | tee "$MEDDIFF_BENCH_RESULTS/test_cuda.log" || status=1
$PY benchmarks/bench_speed.py --device cuda --tasks generate-3d generate-2d --skip memory || status=1
$PY benchmarks/bench_quality.py --device cuda --num 32 --batch 32 || status=1
exit $status
