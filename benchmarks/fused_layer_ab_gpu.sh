#!/usr/bin/env bash
# The fused one-token layer kernels (kernels/fused_decode) on the GPU, in one device call
# (docs/benchmarks.md, "Fused one-token layer kernels"): their tests compiled through
# Triton, kernels per layer of the compiled decode loop (XLA:GPU, command buffers off so the
# body is flat), and ms per decode step of the GDN and Mamba2 LMs at batch 1 and 64 (and
# the per-token host loop at batch 1) with the weight-read floor, for this tree (after) and
# for the tree in $BASE (before: the code this change started from; skipped when unset).
# Run from the repository root; logs go to $OUT.
set -u
OUT=${OUT:-/tmp/fused_layer_ab}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
HERE=$PWD
C="python3 benchmarks/count_decode_ops.py --models gdn mamba2 --verbose"
D="python3 benchmarks/decode_gpu.py --models gdn mamba2 --batches 1 64 --host-batches 1 --steps 64 --skip-fla --budget 70 --out /tmp/dg"
timeout 75 python3 -m pytest -q -p no:cacheprovider tests/test_fused_decode.py tests/test_fused_step.py > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 50 $C --hlo /tmp/hlo > "$OUT/count_after.log" 2>&1
grep -E "per layer|opcodes|Error" "$OUT/count_after.log"
tar czf "$OUT/hlo_after.tgz" -C /tmp hlo 2>/dev/null
timeout 90 $D > "$OUT/after.log" 2>&1
grep -E '^\| linearnexus|Error' "$OUT/after.log"
if [ -n "${BASE:-}" ]; then
  cd "$BASE" && export PYTHONPATH=$PWD
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 50 $C > "$OUT/count_before.log" 2>&1
  grep -E "per layer|opcodes|Error" "$OUT/count_before.log"
  timeout 90 $D > "$OUT/before.log" 2>&1
  grep -E '^\| linearnexus|Error' "$OUT/before.log"
  cd "$HERE"
fi
