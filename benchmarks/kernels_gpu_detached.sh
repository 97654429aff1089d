#!/usr/bin/env bash
# Run benchmarks/kernels_gpu.py in its own process session on a GPU machine whose commands are
# limited to ~10 minutes (the device tool's): the first call starts it, every call then waits
# up to POLL_S seconds for it and copies what it has written so far into $OUT (or ./kg_out).
# Call again at once until it prints FINISHED (the machine is released after ~30 s idle).
#   [PYTHON=python3] [PREWARM=14] [PREWARM_OPS="simple_gla gla|delta_rule gated_delta_rule"] \
#     bash benchmarks/kernels_gpu_detached.sh [POLL_S] [-- extra flags]
# FLA's wheels, if carried in .whl/, are installed into /tmp/site first.
#
# Most of a full run from a fresh machine is FLA's autotuning (~32 of ~45 minutes on
# 2026-11-23), and most of that is Triton compiling every candidate config, one at a time.
# PREWARM=N (0-14) first runs N FLA-only processes side by side (--skip-ln, one per shape and
# pair of ops, each limited to 15 minutes), which fill Triton's on-disk compile cache in
# parallel (PREWARM_OPS: the op groups, '|'-separated, one process per shape and group; set it
# to the ops of a run limited with `-- --ops ...`); any autotune choices they cached (made while they shared the GPU) are deleted,
# and the measured run autotunes FLA again alone on the GPU, now loading compiled configs
# from the cache instead of compiling them (2026-11-23: 8.4 minutes of prewarm, then a
# 642-second measured run).
set -u
POLL_S=560
if [ $# -gt 0 ] && [ "$1" != "--" ]; then POLL_S=$1; shift; fi
[ "${1:-}" = "--" ] && shift
case "$POLL_S" in ''|*[!0-9]*) echo "POLL_S: expected seconds (an integer), got '$POLL_S'" >&2; exit 2;; esac
PREWARM=${PREWARM:-0}
PREWARM_OPS=${PREWARM_OPS:-simple_gla gla|delta_rule gated_delta_rule}
IFS='|' read -ra GROUPS_ <<< "$PREWARM_OPS"
MAXW=$((7 * ${#GROUPS_[@]}))
case "$PREWARM" in ''|*[!0-9]*) echo "PREWARM: expected 0-$MAXW, got '$PREWARM'" >&2; exit 2;; esac
if [ "$PREWARM" -gt "$MAXW" ]; then
  echo "PREWARM: expected 0-$MAXW (7 shapes x ${#GROUPS_[@]} op groups of PREWARM_OPS), got $PREWARM" >&2; exit 2
fi
WORK=/tmp/kernels_gpu_detached
DEST=${OUT:-$PWD/kg_out}
PY=${PYTHON:-python3}
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$WORK/triton
if [ ! -f "$WORK/started" ]; then
  mkdir -p "$WORK"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  fi
  cp docs/benchmarks.md "$WORK/benchmarks.md"
  {
    printf 'set -u; cd %q\n' "$PWD"
    if [ "$PREWARM" -gt 0 ]; then
      echo 'echo "prewarm start $(date -u +%T)"'
      n=0
      for shape in 0 1 2 3 4 5 6; do
        for ops in "${GROUPS_[@]}"; do
          [ "$n" -ge "$PREWARM" ] && break 2
          printf 'timeout -k 10 900 %q benchmarks/kernels_gpu.py --skip-ln --skip-check --skip-mamba ' "$PY"
          printf -- '--skip-ceilings --repeats 1 --budget 0 --jax-cache "" --ops %s --shapes %s ' "$ops" "$shape"
          printf -- '--name prewarm_%s --out %q > %q 2>&1 &\n' "$n" "$WORK/prewarm" "$WORK/prewarm_$n.log"
          n=$((n + 1))
        done
      done
      echo "wait"
      printf 'find %q -name "*.autotune.json" -delete\n' "$TRITON_CACHE_DIR"
      echo 'echo "prewarm done $(date -u +%T)"'
    fi
    printf '%q benchmarks/kernels_gpu.py --budget 0 --out %q --docs %q' "$PY" "$WORK" "$WORK/benchmarks.md"
    for a in "$@"; do printf ' %q' "$a"; done
    echo
    echo 'echo "run done $(date -u +%T)"'
  } > "$WORK/driver.sh"
  touch "$WORK/started"
  setsid nohup bash "$WORK/driver.sh" > "$WORK/run.log" 2>&1 < /dev/null &
  echo "started"
fi
end=$((SECONDS + POLL_S))
while [ $SECONDS -lt $end ] && pgrep -f "$WORK/driver.sh" >/dev/null; do sleep 5; done
grep -v "^W0000\|^I0000" "$WORK/run.log" | tail -n 30
mkdir -p "$DEST" && cp "$WORK"/*.json "$WORK"/*.md "$WORK"/run.log "$WORK"/driver.sh "$DEST"/ 2>/dev/null
if pgrep -f "$WORK/driver.sh" >/dev/null; then echo "STILL_RUNNING"; else echo "FINISHED"; fi
