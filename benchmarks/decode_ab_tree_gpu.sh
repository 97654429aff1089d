#!/bin/bash
# One device call: the batch-1 decode loop of benchmarks/decode_gpu.py for a base tree and for
# this tree, in turns (base, this, base, this), plus this tree's kernel tests compiled on the
# GPU and the per-kernel parts (benchmarks/decode_parts_gpu.py). Usage (repo root, on the GPU):
#   git archive <base commit> | (mkdir -p .ab_base && tar -x -C .ab_base)   # on the dev host
#   BASE=.ab_base bash benchmarks/decode_ab_tree_gpu.sh                   # results under $OUT
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/decode_ab}
BASE=${BASE:-.ab_base}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# SKIP_CHECKS=1 leaves out the tests and the parts (a second call's turns); TURNS="3 4" names them.
if [ -z "${SKIP_CHECKS:-}" ]; then
JAX_DEFAULT_MATMUL_PRECISION=highest timeout ${TEST_S:-200} python3 -m pytest -q -p no:cacheprovider \
  ${TESTS:-tests/test_gemv.py tests/test_fused_decode.py} 2>&1 | tail -3
timeout ${PARTS_S:-150} python3 benchmarks/decode_parts_gpu.py --json "$OUT/parts.json" 2>&1 \
  | grep -v "^W0000\|^I0000"
fi
decode() {  # label, tree, args...
  local label=$1 tree=$2; shift 2
  echo "== $label"
  (cd "$tree" && timeout 150 python3 benchmarks/decode_gpu.py --host-batches --steps 64 \
    --skip-fla --budget 120 "$@" 2>&1 | grep -E "^\| linearnexus|Error|error:" | head -12)
}
for turn in ${TURNS:-1 2}; do
  decode "base $turn" "$BASE" --models ${MODELS:-gdn mamba2 gpt} --batches ${BATCHES:-1}
  decode "this $turn" . --models ${MODELS:-gdn mamba2 gpt} --batches ${BATCHES:-1}
done
