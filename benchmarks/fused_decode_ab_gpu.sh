#!/usr/bin/env bash
# The fused one-token projections on the GPU, in one device call (docs/benchmarks.md, "Fused
# one-token kernels..."): kernels per layer of the compiled decode loop (XLA:GPU, command
# buffers off so the body is flat) and ms per decode step of the GDN LM, with the fused
# projections (after) and without them (LINEARNEXUS_FUSED_DECODE=0: before), then the tests.
# Run from the repository root; logs go to $OUT.
set -u
OUT=${OUT:-/tmp/fused_decode_ab}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
C="python3 benchmarks/count_decode_ops.py --models gdn --verbose"
D="python3 benchmarks/decode_gpu.py --models gdn --batches 1 64 --host-batches 1 --steps 64 --skip-fla --budget 40"
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 40 $C > "$OUT/count_after.log" 2>&1
tail -2 "$OUT/count_after.log"
LINEARNEXUS_FUSED_DECODE=0 XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 40 $C > "$OUT/count_before.log" 2>&1
tail -2 "$OUT/count_before.log"
timeout 60 $D > "$OUT/after.log" 2>&1
grep -E '^\| linearnexus|Error' "$OUT/after.log"
LINEARNEXUS_FUSED_DECODE=0 timeout 60 $D > "$OUT/before.log" 2>&1
grep -E '^\| linearnexus|Error' "$OUT/before.log"
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_fused_decode.py > "$OUT/tests.log" 2>&1
tail -2 "$OUT/tests.log"
