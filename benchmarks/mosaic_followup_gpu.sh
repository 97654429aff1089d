#!/bin/bash
# One device call for what issue 26 built without a GPU (docs/mosaic.md, "Next" 2), each part
# bounded so the call ends inside the 10-minute limit; logs and JSON under $OUT:
#   1. packed sequences through the Mosaic kernels (kernels_gpu.py's packed rows; on by
#      default since they passed on an H100, 2026-12-05);
#   2. the delta rules' Mosaic backward: numerics against the reference and its time beside
#      the Triton backward and FLA (mosaic_gdn_check.py);
#   3. the ~211M Gated DeltaNet LM's training step through it (lm_train_gpu.py, mosaic-bwd
#      against mosaic and pallas), if PARTS has "lm";
#   4. GLA's Mosaic GPU walk (kernels/gla/mosaic.py, never run on a GPU before): checks
#      against the reference (dense and packed, T = 63 / 1000, D = 64 / 128), then mosaic,
#      pallas and FLA timed at (8, 4096, 16, 128) and (2, 16384, 16, 128), if PARTS has "gla".
# Usage, on the GPU from the repository root, with FLA's wheels in .whl/ (carry .whl):
#   bash benchmarks/mosaic_followup_gpu.sh            # PARTS="packed gdn lm" by default
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/mosaic_followup}
PARTS=${PARTS:-packed gdn lm}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
quiet() { grep -v "^W0000\|^I0000"; }
case " $PARTS " in *" packed "*)
  echo "== packed sequences through mosaic"
  LINEARNEXUS_MOSAIC_PACKED=1 timeout ${PACKED_S:-110} python3 benchmarks/kernels_gpu.py \
    --ops simple_gla gated_delta_rule delta_rule --check-backends mosaic --skip-fla --skip-ln \
    --skip-mamba --skip-ceilings --out "$OUT" --name packed_check 2>&1 | quiet \
    | grep -E "PASS|FAIL|ERROR|not impl|rror" | cut -c1-230 | tee "$OUT/packed.log";;
esac
case " $PARTS " in *" gdn "*)
  echo "== the delta rules' Mosaic backward"
  timeout ${GDN_S:-230} python3 benchmarks/mosaic_gdn_check.py --out "$OUT" \
    --budget $(( ${GDN_S:-230} - 30 )) 2>&1 | quiet | tee "$OUT/gdn.log" | tail -30;;
esac
case " $PARTS " in *" gla "*)
  echo "== GLA's Mosaic GPU walk"
  timeout ${GLA_S:-300} python3 benchmarks/kernels_gpu.py --ops gla --backends mosaic pallas \
    --check-backends mosaic --check-seqs 63 1000 --check-dims 64 128 --shapes 6 1 \
    --skip-mamba --out "$OUT" --name gla_mosaic --budget $(( ${GLA_S:-300} - 30 )) 2>&1 \
    | quiet | grep -E "PASS|FAIL|ERROR|not impl|rror|fwd|ceiling" | cut -c1-260 \
    | tee "$OUT/gla.log";;
esac
case " $PARTS " in *" lm "*)
  echo "== the GDN LM through the delta rules' Mosaic backward"
  timeout ${LM_S:-200} python3 benchmarks/lm_train_gpu.py --parts throughput \
    --backends mosaic-bwd mosaic pallas --budget $(( ${LM_S:-200} - 20 )) --out "$OUT" 2>&1 \
    | quiet | tee "$OUT/lm.log" | tail -12;;
esac
