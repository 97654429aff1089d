#!/usr/bin/env bash
# Run benchmarks/kernels_gpu.py in its own process session on a GPU machine whose commands are
# limited to ~10 minutes (the device tool's): the first call starts it, every call then waits
# up to POLL_S seconds for it and copies what it has written so far into $OUT (or ./kg_out).
# Call again at once until it prints FINISHED (the machine is released after ~30 s idle).
#   [PYTHON=python3] bash benchmarks/kernels_gpu_detached.sh [POLL_S] [-- extra kernels_gpu.py flags]
# FLA's wheels, if carried in .whl/, are installed into /tmp/site first.
# FLA's autotuning is most of a full run (~27 of ~45 minutes on 2026-11-23). Triton keeps
# autotune results on disk with TRITON_CACHE_AUTOTUNING=1; the script copies those files
# (*.autotune.json, small) to $DEST/triton_autotune, and a later session that carries them in
# .triton_autotune/ starts with FLA's earlier choices (FLA's own mechanism: it then compiles
# only the chosen configs). Not yet tried on the device: check the log's FLA warm-up times.
set -u
POLL_S=${1:-560}
shift || true
[ "${1:-}" = "--" ] && shift
WORK=/tmp/kernels_gpu_detached
DEST=${OUT:-$PWD/kg_out}
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
export TRITON_CACHE_DIR=$WORK/triton TRITON_CACHE_AUTOTUNING=1
if [ ! -f "$WORK/started" ]; then
  mkdir -p "$WORK"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  fi
  cp docs/benchmarks.md "$WORK/benchmarks.md"
  if [ -d .triton_autotune ]; then mkdir -p "$TRITON_CACHE_DIR" && cp -r .triton_autotune/. "$TRITON_CACHE_DIR"/; fi
  touch "$WORK/started"
  setsid nohup "${PYTHON:-python3}" benchmarks/kernels_gpu.py --budget 0 --out "$WORK" \
    --docs "$WORK/benchmarks.md" "$@" > "$WORK/run.log" 2>&1 < /dev/null &
  echo "started"
fi
end=$((SECONDS + POLL_S))
while [ $SECONDS -lt $end ] && pgrep -f "benchmarks/kernels_gpu.py" >/dev/null; do sleep 5; done
grep -v "^W0000\|^I0000" "$WORK/run.log" | tail -n 30
mkdir -p "$DEST" && cp "$WORK"/*.json "$WORK"/*.md "$WORK"/run.log "$DEST"/ 2>/dev/null
mkdir -p "$DEST/triton_autotune"
if [ -d "$TRITON_CACHE_DIR" ]; then
  (cd "$TRITON_CACHE_DIR" && find . -name "*.autotune.json" -exec cp --parents {} "$DEST/triton_autotune/" \;)
fi
if pgrep -f "benchmarks/kernels_gpu.py" >/dev/null; then echo "STILL_RUNNING"; else echo "FINISHED"; fi
