#!/bin/bash
# Nsight Compute over one call of the mosaic backend's kernels (issue 26: "what bounds it,
# from a profile"). Each op runs once, untraced (benchmarks/profile_gpu.py --once), under
# ncu with the sections that say what bounds a kernel; the reports, one text file per op,
# go under $OUT, and benchmarks/ncu_summary.py turns them into one table.
# Usage, on the GPU from the repository root (Firecracker machines only: on gVisor ncu cannot
# read the counters; ~60-120 s an op at the default shape):
#   bash benchmarks/ncu_gpu.sh                                  # SPECS below
#   SPECS="simple_gla:fwd gla:fwd" BACKEND=pallas bash benchmarks/ncu_gpu.sh
# ncu's output goes to a file, never a pipe (a piped run once hung until the call's limit),
# under timeout -k so a hung profiler still leaves the other ops' reports.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ncu}
NCU=${NCU:-/usr/local/cuda/bin/ncu}
SPECS=${SPECS:-simple_gla:fwd gated_delta_rule:fwd gated_delta_rule:fwd+bwd}
BACKEND=${BACKEND:-mosaic}
SHAPE=${SHAPE:-8,4096,16,128}
# every kernel but XLA's own (fusions, copies, cuBLAS, the autotuner's redzone checks and
# delays), which otherwise fill -c with the inputs' generation and the GEMM autotuning; ncu
# names kernels without their namespaces and its regexes take lookaheads
FILTER=${FILTER:-'regex:^(?!(input_|loop_|wrapped_|fusion|copy|transpose|nvjet|sm90_|cutlass|void|Redzone|Delay|RepeatBuffer|xla_|unnamed))'}
# no GEMM autotuning (its hundreds of launches; the kernels profiled here are not autotuned)
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
mkdir -p "$OUT"
for spec in $SPECS; do
  op=${spec%%:*}
  mode=${spec#*:}
  tag="${op}_${mode/+/_}_${BACKEND}"
  echo "== ncu $op $mode $BACKEND $SHAPE"
  # --clock-control none: the clocks stay as the timed runs had them (METHOD.md)
  timeout -k 10 "${NCU_S:-150}" "$NCU" --clock-control none --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats \
    -k "$FILTER" -c "${NCU_COUNT:-40}" python3 benchmarks/profile_gpu.py "$op" --mode "$mode" \
    --backend "$BACKEND" --shape "$SHAPE" --once > "$OUT/ncu_$tag.txt" 2>&1
  echo "   exit $?, $(grep -c '^  [^ ].*(.*)x(.*)' "$OUT/ncu_$tag.txt") kernels profiled"
done
python3 benchmarks/ncu_summary.py "$OUT"/ncu_*.txt | tee "$OUT/ncu_summary.md"
