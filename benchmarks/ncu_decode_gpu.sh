#!/bin/bash
# Nsight Compute over ONE batch-1 decode step (issue 23: where the step's time goes). The
# step's kernels, each with its duration (benchmarks/decode_step_once.py runs the step alone,
# inside a cudaProfilerStart / Stop range and between two marker kernels), then their summed
# duration: against the step's time in the decode loop (decode_gpu.py), what the kernels
# take themselves and what their launches and dependencies add. XLA runs the step's kernels
# as CUDA graphs: ncu profiles a graph's kernels one by one (--graph-profiling node), each
# replayed alone, so a duration is the kernel's own time without its launch.
# Usage, on the GPU from the repository root (~30-60 s a model on a warm machine):
#   bash benchmarks/ncu_decode_gpu.sh                      # MODELS="gdn mamba2"
#   MODELS=gdn BATCH=64 bash benchmarks/ncu_decode_gpu.sh
# ncu writes to a file, never a pipe (a piped run once hung until the call's limit).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ncu_decode}
NCU=${NCU:-/usr/local/cuda/bin/ncu}
MODELS=${MODELS:-gdn mamba2}
BATCH=${BATCH:-1}
mkdir -p "$OUT"
# JAX's compilation cache, filled by a run without ncu first: under ncu the step's programs
# load from it instead of compiling, so XLA's GEMM autotuning (hundreds of kernels at batch
# 64) neither fills the -c count nor slows the profiled run past its limit
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/ncu_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
for model in $MODELS; do
  tag="decode_${model}_b${BATCH}"
  echo "== compiling one $model decode step at batch $BATCH into the cache"
  timeout -k 10 "${NCU_S:-150}" python3 benchmarks/decode_step_once.py --model "$model" \
    --batch "$BATCH" 2>&1 | grep "one step"
  echo "== ncu, one $model decode step at batch $BATCH"
  # --cache-control none: the L2 keeps what the step before left, as in the loop;
  # --clock-control none: the clocks as the timed runs had them (METHOD.md)
  timeout -k 10 "${NCU_S:-150}" "$NCU" --profile-from-start off --cache-control none \
    --clock-control none --graph-profiling node --section SpeedOfLight --section LaunchStats \
    -c "${NCU_COUNT:-400}" python3 benchmarks/decode_step_once.py --model "$model" \
    --batch "$BATCH" > "$OUT/ncu_$tag.txt" 2>&1
  count=$(grep -c '^  [^ ].*(.*)x(.*)' "$OUT/ncu_$tag.txt")
  echo "   $count kernels profiled"
  if [ "$count" = 0 ]; then  # no profiler range (no CUDA runtime found): every kernel
    echo "   again from the start (the markers cut the report)"
    timeout -k 10 "${NCU_S:-150}" "$NCU" --cache-control none --clock-control none \
      --graph-profiling node --section SpeedOfLight --section LaunchStats \
      -c "${NCU_COUNT:-400}" python3 benchmarks/decode_step_once.py --model "$model" \
      --batch "$BATCH" > "$OUT/ncu_$tag.txt" 2>&1
  fi
  grep "one step" "$OUT/ncu_$tag.txt"
  python3 benchmarks/ncu_summary.py "$OUT/ncu_$tag.txt" --by-name --between step_marker_before \
    step_marker_after | tee "$OUT/ncu_$tag.md" | tail -"${SHOW:-120}"
done
