#!/usr/bin/env bash
# The fused one-token kernels on the GPU, in one device call (docs/benchmarks.md, "Fused
# decode step"): their tests compiled through Triton, then kernels and ms per decode step
# with them (after), without them (LINEARNEXUS_FUSED_STEP=0: before), with the decode loop
# as CUDA graphs (LINEARNEXUS_DECODE_GRAPH=while), and FLA's GDN beside ours at batch 64.
# Run from the repository root with FLA's wheels in ../../.whl (optional); logs go to $OUT.
set -u
OUT=${OUT:-/tmp/decode_ab}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
P="python3 benchmarks/profile_decode.py --models gdn mamba2 --steps 32"
timeout 50 python3 -m pytest -q -p no:cacheprovider tests/test_fused_step.py > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
timeout 70 $P --batches 1 64 --json "$OUT/after.json" > "$OUT/after.log" 2>&1
grep -E "batch|Error" "$OUT/after.log"
LINEARNEXUS_FUSED_STEP=0 timeout 70 $P --batches 1 64 --json "$OUT/before.json" > "$OUT/before.log" 2>&1
grep -E "batch|Error" "$OUT/before.log"
LINEARNEXUS_DECODE_GRAPH=while timeout 45 $P --batches 1 > "$OUT/graph.log" 2>&1
grep -E "batch|Error" "$OUT/graph.log"
timeout 60 python3 benchmarks/decode_gpu.py --models gdn --batches 64 --host-batches \
    --fla-steps 16 --repeats 2 --budget 50 > "$OUT/decode_gpu.log" 2>&1
tail -5 "$OUT/decode_gpu.log"
