#!/bin/bash
# One device call for the batch-1 decode matmuls (kernels/fused_decode/gemv.py), each part
# bounded so the default set ends inside the 10-minute limit; results under $OUT:
#   tests:  tests/test_gemv.py with the kernels compiled through Triton (float32 checks);
#   decode: the decode loop (GDN and Mamba2 of benchmarks/decode_gpu.py) at batch 1 under
#           each LINEARNEXUS_DECODE_GEMV mode in $MODES (default "pallas table": the
#           default against XLA over the transposed table), and batch 64 under the first;
#   gemv:   the one-row matmul forms alone (benchmarks/gemv_gpu.py): the layer chain, then
#           the projections alone back to back (--bare, with the Mosaic few-row matmul).
# Usage (repo root, on the GPU; one device call is at most 600 s: the default set takes
# ~400 s and at most 520, each extra mode up to 150 s more, the tests up to 200 s):
#   bash benchmarks/gemv_ab_gpu.sh                      # PARTS="decode gemv"
#   PARTS="tests decode" MODES="pad xla" bash benchmarks/gemv_ab_gpu.sh   # a second call
# and, for the Triton kernel's tiles against XLA's row reduction in the bare chain:
#   python3 benchmarks/gemv_gpu.py --bare --variants xla lib lib_bn8_bk1024_w8 \
#     lib_bn4_bk1024_w4 lib_bn16_bk512_w8
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gemv_ab}
PARTS=${PARTS:-decode gemv}
MODES=${MODES:-pallas table}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case " $PARTS " in *" tests "*)
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 200 python3 -m pytest -q -p no:cacheprovider \
    tests/test_gemv.py 2>&1 | tail -3;;  # float32 checks: no TF32 in the XLA side
esac
case " $PARTS " in *" decode "*)
  first=1
  for mode in $MODES; do
    batches="1"
    [ $first = 1 ] && batches="1 64"
    first=0
    echo "== LINEARNEXUS_DECODE_GEMV=$mode"
    LINEARNEXUS_DECODE_GEMV=$mode timeout 150 python3 benchmarks/decode_gpu.py --models gdn \
      mamba2 --batches $batches --host-batches 1 --steps 64 --skip-fla --budget 130 \
      --out "$OUT/$mode" 2>&1 | grep -E "^\| linearnexus|Error|error:" | head -20
  done;;
esac
case " $PARTS " in *" gemv "*)
  timeout 100 python3 benchmarks/gemv_gpu.py --out "$OUT" --variants xla xla_t lib \
    lib_fused 2>&1 | grep -v "^W0000\|^I0000"
  timeout 120 python3 benchmarks/gemv_gpu.py --bare --out "$OUT" --variants xla lib mgpu \
    mgpu_pdl mgpu_wave mgpu_wave_pdl 2>&1 | grep -v "^W0000\|^I0000";;
esac
