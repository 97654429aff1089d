#!/bin/bash
# One device call for the batch-1 decode matmuls (kernels/fused_decode/gemv.py):
# the tests with the kernels compiled through Triton, the decode loop under each
# LINEARNEXUS_DECODE_GEMV mode (GDN and Mamba2 of benchmarks/decode_gpu.py), and the
# one-row matmul forms alone (benchmarks/gemv_gpu.py, in the layer chain and --bare). Usage (repo root, on the GPU):
#   bash benchmarks/gemv_ab_gpu.sh            # results under $OUT
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gemv_ab}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 200 python3 -m pytest -q -p no:cacheprovider \
  tests/test_gemv.py 2>&1 | tail -3  # float32 checks: no TF32 in the XLA side
decode() {  # mode, batches...
  local mode=$1; shift
  echo "== LINEARNEXUS_DECODE_GEMV=$mode"
  LINEARNEXUS_DECODE_GEMV=$mode timeout 150 python3 benchmarks/decode_gpu.py --models gdn mamba2 \
    --batches "$@" --host-batches 1 --steps 64 --skip-fla --budget 130 --out "$OUT/$mode" 2>&1 \
    | grep -E "^\| linearnexus|Error|error:" | head -20
}
decode pallas 1 64
decode xla 1 64
decode pad 1
decode table 1
timeout 120 python3 benchmarks/gemv_gpu.py --out "$OUT" --variants xla xla_t pad8 \
  rowsT_bn2_bk1024_w4 lib lib_fused 2>&1 | grep -v "^W0000\|^I0000"
timeout 150 python3 benchmarks/gemv_gpu.py --bare --out "$OUT" 2>&1 | grep -v "^W0000\|^I0000"
