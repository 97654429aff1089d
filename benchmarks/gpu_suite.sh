#!/usr/bin/env bash
# Every test that compiles kernels for the GPU, plus the Mosaic checks, in one device call
# (docs/gpu_notes.md): the Triton kernels' op suite, the fused one-token kernels, the Mosaic
# GPU forward against the reference (head dims 64 and 128), and generation / the blocks on
# the GPU (the device loop and the fused step together). Run from the repository root;
# logs go to $OUT (default /tmp/gpu_suite). About 4 minutes on an H200.
set -u
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, print its last lines
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $?"
    tail -n 4 "$OUT/$name.log"
}
PYTEST="python3 -m pytest -q -n 8 -p no:cacheprovider"
run kernels 150 $PYTEST tests/test_pallas_ops.py tests/test_mamba_pallas.py \
    tests/test_mamba_kernel.py tests/test_fused_step.py tests/test_mosaic_lowering.py
run linear_ops 120 $PYTEST tests/test_linear_ops.py -k "pallas or mosaic"
run mosaic_check 90 python3 benchmarks/kernels_gpu.py --ops simple_gla --skip-fla --skip-mamba \
    --skip-ceilings --backends mosaic --check-backends mosaic auto --check-seqs 63 1000 \
    --check-dims 64 128 --budget 1 --out "$OUT"
grep -iE "max|err|fail|pass" "$OUT/mosaic_check.log" | head -20
run generate 150 $PYTEST tests/test_generate.py tests/test_blocks_registry.py
