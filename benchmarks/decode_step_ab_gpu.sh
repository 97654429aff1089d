#!/bin/bash
# One device call for the batch-1 decode step's fixed costs (issue 23); results under $OUT:
#   persist: the bare chain of a GDN LM's 48 projections (benchmarks/gemv_gpu.py --bare) as
#            separate kernels (xla, lib) and as ONE persistent kernel with grid barriers
#            between projections (benchmarks/persistent_gemv.py) at several tiles, with and
#            without each program's next weights loaded before it waits (~200 s);
#   layer:   the persistent layer kernels (kernels/fused_decode/persistent.py, one kernel per
#            Gated DeltaNet + MLP layer, five phases, or Mamba2 layer, three, with grid
#            barriers between them): their tests compiled on the GPU (real barriers), then
#            the GDN and Mamba2 decode loops at batch 1
#            with it off and on at each LINEARNEXUS_PERSISTENT_CONFIG in $LAYER_CONFIGS
#            (default "off rows=16,per_sm=1 rows=8,per_sm=2"), one process each (~500 s);
#   block:   the decode loop (GDN and Mamba2 of benchmarks/decode_gpu.py, batch 1) with its
#            steps in counted blocks of 1 (one while iteration a step) and of each size in
#            $BLOCKS (LINEARNEXUS_DECODE_BLOCK; 8, the GPU default since it won here on an
#            H100, 2026-12-07), one process each (~110 s each).
#   stream:  the bare chain as ONE Mosaic GPU kernel whose programs stream their weights
#            through a ring of TMA copies across grid barriers of GMEM semaphores
#            (benchmarks/streaming_gemv.py; never run on a GPU before: the first call checks
#            it against XLA in the same run) beside xla and lib, rings of 8, 12 and 16, and
#            the two-round-trip barrier, and 32-row tiles (~180 s);
#   ncu:     Nsight Compute over one batch-1 GDN and Mamba2 decode step
#            (benchmarks/ncu_decode_gpu.sh: each kernel's duration and their sum, ~120 s),
#            then Mamba2's step at batch 64 (NCU64_MODELS, ~60 s; NCU_B1=0: batch 64 only);
#   fla64:   the GDN and Mamba2 decode loops at batch 64 beside FLA's HF models, each FLA
#            cell in a process of its own (FLA's wheels installed first, as decode_gpu.py's
#            docstring says; ~200 s with FLA's autotuning).
#   rowsk:   the several-row fused projection kernels one projection at a time against the
#            same math in XLA, at 16 and 64 rows (benchmarks/rows_gpu.py, ~60 s);
#   rows64:  the several-row fused projection kernels (LINEARNEXUS_DECODE_ROWS): their
#            tests compiled, then the GDN and Mamba2 decode loops at batch 64 (ROWS_BATCH)
#            with them off (1) and on (64), one process each (~60 + 2 x 90 s).
#   state16: the GDN and Mamba2 decode loops at batch 1 and 64 (STATE16_BATCHES) with the
#            recurrent states kept in float32 (the default) and in bfloat16 between steps
#            (decode_gpu.py --state-dtype: the layer kernels read and write bf16, halving
#            the state's bytes), one process each (~2 x 100 s); beside PARTS's fla64 for
#            FLA's time in the same call.
#   flags64: the Mamba2 (FLAGS_MODELS) decode loop at batch 64 under each XLA_FLAGS value
#            in FLAGS_SETS (";"-separated; default: none, PDL on, PDL off, command-buffer
#            loops unrolled), one process each (~4 x 80 s): what XLA's launch machinery does
#            to a step of ~80 small kernels.
#   lb64:    the layer kernels alone at batch 64 against copies of the same bytes
#            (benchmarks/layer_b64_gpu.py: value blocks, warps, 16-bit states; ~200 s);
#   vb64:    the Mamba2 decode loop at batch 64 with its layer kernel at each value-block
#            count in $VBLOCKS (default "1 2"; LINEARNEXUS_SSD_VALUE_BLOCKS), one process
#            each (~2 x 80 s);
#   warps64: the GDN and Mamba2 decode loops at batch 64 with the layer kernels at their
#            default warps (2 there) and at each count in $WARPS (default "4 8";
#            LINEARNEXUS_LAYER_WARPS), one process each (~3 x 90 s).
#   gemm64:  the models' projections alone at GEMM_ROWS rows (default 64) with cold weights,
#            XLA over W and W^T against a bare Pallas kernel at several tilings
#            (benchmarks/skinny_gemm_gpu.py; GEMM_SHAPES, default the three layer
#            projections; ~250 s), then XLA's forms again under each XLA_FLAGS value in
#            GEMM_FLAG_SETS (";"-separated; default: exhaustive tiling search), one process
#            each (~40 s a shape: the search's autotuning).
#   layout64: the GDN and Mamba2 decode loops at LAYOUT_BATCHES (default 64) with each
#            LINEARNEXUS_DECODE_BATCH_LAYOUT in LAYOUTS (default "auto kn nk"), one process
#            each (~100 s each).
#   arrival: batch-1 input projection and layer kernel as one launch whose last program to
#            finish a head's columns runs that head's step (kernels/fused_decode/arrival.py,
#            Mamba2 and GDN; never run on a GPU before): its tests compiled (real atomics),
#            then the Mamba2 and GDN decode loops at batch 1 with LINEARNEXUS_DECODE_ARRIVAL=0,
#            =1 (8 rows of the weight a program), and =1 with LINEARNEXUS_ARRIVAL_ROWS in
#            ARRIVAL_ROWS (default 2: the separate kernel's), one process each
#            (~60 + 3 x 110 s; ARRIVAL_LAYERS: Mamba2's layers, default decode_gpu.py's).
# Usage (repo root, on the GPU): bash benchmarks/decode_step_ab_gpu.sh   # PARTS="persist block"
#   PARTS="layer" bash benchmarks/decode_step_ab_gpu.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/decode_step_ab}
PARTS=${PARTS:-persist block}
BLOCKS=${BLOCKS:-8}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
quiet() { grep -v "^W0000\|^I0000"; }
case " $PARTS " in *" persist "*)
  echo "== the bare projection chain: separate kernels against one persistent kernel"
  timeout ${PERSIST_S:-240} python3 benchmarks/gemv_gpu.py --bare --out "$OUT" --variants xla lib \
    persist_bn8_w4 persist_bn8_w4_pf persist_bn8_w8_pf persist_bn16_w8_pf persist_bn32_w8_pf \
    2>&1 | quiet | cut -c1-300;;
esac
case " $PARTS " in *" layer "*)
  echo "== the persistent layer kernel's tests, compiled (real grid barriers)"
  timeout ${LAYER_TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
    tests/test_persistent_decode.py 2>&1 | quiet | tail -25
  for config in ${LAYER_CONFIGS:-off rows=16,per_sm=1 rows=8,per_sm=2}; do
    on=1
    [ "$config" = off ] && on=0
    echo "== LINEARNEXUS_DECODE_PERSISTENT=$on LINEARNEXUS_PERSISTENT_CONFIG=$config"
    LINEARNEXUS_DECODE_PERSISTENT=$on LINEARNEXUS_PERSISTENT_CONFIG=${config/off/} \
      timeout ${LAYER_S:-120} python3 benchmarks/decode_gpu.py \
      --models gdn mamba2 --batches 1 --host-batches --steps 64 --skip-fla \
      --budget $(( ${LAYER_S:-120} - 20 )) --out "$OUT/persistent_${config//[=,]/_}" 2>&1 \
      | grep -E "^\| linearnexus|rror|budget" | cut -c1-300 | head -20
  done;;
esac
case " $PARTS " in *" stream "*)
  echo "== the bare projection chain: separate kernels against one streaming Mosaic kernel"
  # the first streaming variant alone under a short limit: a grid barrier that never
  # opens (programs not all resident) hangs, and should not eat the other variants' time
  timeout ${STREAM_FIRST_S:-100} python3 benchmarks/gemv_gpu.py --bare --out "$OUT/stream" \
    --variants xla lib stream_s8 2>&1 | quiet | cut -c1-300
  if [ "${PIPESTATUS[0]}" = 0 ] && grep -q stream_s8 "$OUT/stream/"*.json 2>/dev/null; then
    timeout ${STREAM_S:-150} python3 benchmarks/gemv_gpu.py --bare --out "$OUT/stream_more" \
      --variants xla stream_s12 stream_s16 stream_s12_two stream_s8_bn32 2>&1 | quiet | cut -c1-300
  else
    echo "stream_s8 failed or hung: the other streaming variants skipped"
  fi;;
esac
case " $PARTS " in *" ncu "*)
  if [ "${NCU_B1:-1}" = 1 ]; then
    OUT="$OUT/ncu" NCU_S=${NCU_S:-75} bash benchmarks/ncu_decode_gpu.sh 2>&1 | quiet
  fi
  # batch 64 (the issue's >= 20x FLA target), where the state's read and write weigh most
  OUT="$OUT/ncu" NCU_S=${NCU_S:-75} MODELS=${NCU64_MODELS:-mamba2} BATCH=64 SHOW=40 \
    bash benchmarks/ncu_decode_gpu.sh 2>&1 | quiet;;
esac
case " $PARTS " in *" fla64 "*)
  timeout ${FLA64_S:-240} python3 benchmarks/decode_gpu.py --models gdn mamba2 --batches 64 \
    --host-batches --steps 64 --budget $(( ${FLA64_S:-240} - 20 )) --out "$OUT/fla64" 2>&1 \
    | grep -E "^\| |rror|budget" | cut -c1-300 | head -20;;
esac
case " $PARTS " in *" rowsk "*)
  echo "== the several-row kernels one projection at a time against XLA (rows_gpu.py)"
  timeout ${ROWSK_S:-90} python3 benchmarks/rows_gpu.py --rows ${ROWSK_ROWS:-16 64} \
    --out "$OUT/rowsk" 2>&1 | quiet | cut -c1-200;;
esac
case " $PARTS " in *" rows64 "*)
  # batch 2..64 through the fused projection kernels (gemv._rows_kernel: the norms, conv,
  # SwiGLU and residual sums folded into the projections as at batch 1): their tests
  # compiled (tests/test_gemv_rows.py picks the kernels; on a GPU they compile), then the
  # decode loops at batch 64 with LINEARNEXUS_DECODE_ROWS unset (XLA's matmuls) and 64
  echo "== the several-row kernels' tests, compiled"
  timeout ${ROWS_TEST_S:-120} python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
    tests/test_gemv_rows.py 2>&1 | quiet | tail -15
  for rows in 1 64; do
    echo "== batch ${ROWS_BATCH:-64}, LINEARNEXUS_DECODE_ROWS=$rows"
    LINEARNEXUS_DECODE_ROWS=$rows timeout ${ROWS_S:-100} python3 benchmarks/decode_gpu.py \
      --models ${ROWS_MODELS:-mamba2 gdn} --batches ${ROWS_BATCH:-64} --steps 64 --skip-fla \
      --budget $(( ${ROWS_S:-100} - 20 )) --out "$OUT/rows64_$rows" 2>&1 \
      | grep -E "^\| linearnexus|rror|budget" | cut -c1-300 | head -20
  done;;
esac
case " $PARTS " in *" state16 "*)
  for dtype in float32 bfloat16; do
    echo "== batches ${STATE16_BATCHES:-1 64}, --state-dtype $dtype"
    timeout ${STATE16_S:-110} python3 benchmarks/decode_gpu.py --models ${STATE16_MODELS:-mamba2 gdn} \
      --batches ${STATE16_BATCHES:-1 64} --steps 64 --skip-fla --state-dtype $dtype \
      --budget $(( ${STATE16_S:-110} - 20 )) --out "$OUT/state16_$dtype" 2>&1 \
      | grep -E "^\| linearnexus|rror|budget" | cut -c1-300 | head -20
  done;;
esac
case " $PARTS " in *" flags64 "*)
  # PDL both ways (its default differs between XLA versions), then loops unrolled into the
  # command buffer
  IFS=';' read -ra sets <<< "${FLAGS_SETS:-none;--xla_gpu_enable_pdl=true;--xla_gpu_enable_pdl=false;--xla_gpu_command_buffer_unroll_loops=true}"
  i=0
  for flags in "${sets[@]}"; do
    echo "== batch 64, XLA_FLAGS=${flags/none/}"
    XLA_FLAGS="${flags/none/}" timeout ${FLAGS_S:-90} python3 benchmarks/decode_gpu.py \
      --models ${FLAGS_MODELS:-mamba2} --batches 64 --steps 64 --skip-fla \
      --budget $(( ${FLAGS_S:-90} - 20 )) --out "$OUT/flags64_$i" 2>&1 \
      | grep -E "^\| linearnexus|rror|budget" | cut -c1-300 | head -20
    i=$((i + 1))
  done;;
esac
case " $PARTS " in *" lb64 "*)
  echo "== the layer kernels alone at batch 64 (layer_b64_gpu.py)"
  # LB64_ONLY: variants whose name contains one of these words (default: all)
  timeout ${LB64_S:-300} python3 benchmarks/layer_b64_gpu.py --json "$OUT/layer_b64.json" \
    ${LB64_ONLY:+--only $LB64_ONLY} \
    2>&1 | quiet | cut -c1-200;;
esac
case " $PARTS " in *" gemm64 "*)
  shapes=${GEMM_SHAPES:-mamba2_in mamba2_out gdn_in}
  echo "== the projections alone at ${GEMM_ROWS:-64} rows, cold weights (skinny_gemm_gpu.py)"
  timeout ${GEMM_S:-300} python3 benchmarks/skinny_gemm_gpu.py --rows ${GEMM_ROWS:-64} \
    --shapes $shapes --json "$OUT/gemm64.json" 2>&1 | quiet | cut -c1-200
  IFS=';' read -ra sets <<< "${GEMM_FLAG_SETS:---xla_gpu_exhaustive_tiling_search=true}"
  for i in "${!sets[@]}"; do
    echo "== XLA_FLAGS=${sets[$i]}"
    XLA_FLAGS="${sets[$i]}" timeout ${GEMM_FLAG_S:-150} python3 benchmarks/skinny_gemm_gpu.py \
      --rows ${GEMM_ROWS:-64} --shapes $shapes --only xla --json "$OUT/gemm64_flags$i.json" \
      2>&1 | quiet | cut -c1-200
  done;;
esac
case " $PARTS " in *" arrival "*)
  echo "== the one-launch projection and layer kernel's tests, compiled"
  timeout ${ARRIVAL_TEST_S:-120} python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
    tests/test_arrival_decode.py 2>&1 | quiet | tail -25
  for run in 0 1 ${ARRIVAL_ROWS:-2}; do
    on=1 rows=
    case $run in 0) on=0;; 1) ;; *) rows=$run;; esac
    echo "== batch 1, LINEARNEXUS_DECODE_ARRIVAL=$on LINEARNEXUS_ARRIVAL_ROWS=$rows"
    LINEARNEXUS_DECODE_ARRIVAL=$on LINEARNEXUS_ARRIVAL_ROWS=$rows \
      timeout ${ARRIVAL_S:-120} python3 benchmarks/decode_gpu.py \
      --models mamba2 gdn --batches 1 --host-batches --steps 64 --skip-fla \
      --budget $(( ${ARRIVAL_S:-120} - 20 )) \
      ${ARRIVAL_LAYERS:+--mamba2-layers $ARRIVAL_LAYERS} --out "$OUT/arrival_$run" 2>&1 \
      | grep -E "^\| linearnexus|rror|budget" | cut -c1-300 | head -20
  done;;
esac
case " $PARTS " in *" layout64 "*)
  for layout in ${LAYOUTS:-auto kn nk}; do
    echo "== LINEARNEXUS_DECODE_BATCH_LAYOUT=$layout"
    LINEARNEXUS_DECODE_BATCH_LAYOUT=$layout timeout ${LAYOUT_S:-110} python3 \
      benchmarks/decode_gpu.py --models ${LAYOUT_MODELS:-mamba2 gdn} \
      --batches ${LAYOUT_BATCHES:-64} --steps 64 --skip-fla \
      --budget $(( ${LAYOUT_S:-110} - 20 )) --out "$OUT/layout_$layout" 2>&1 \
      | grep -E "^\| linearnexus|rror|budget" | cut -c1-300 | head -20
  done;;
esac
case " $PARTS " in *" vb64 "*)
  for vb in ${VBLOCKS:-1 2}; do
    echo "== batch 64, LINEARNEXUS_SSD_VALUE_BLOCKS=$vb"
    LINEARNEXUS_SSD_VALUE_BLOCKS=$vb timeout ${VB_S:-100} python3 benchmarks/decode_gpu.py \
      --models mamba2 --batches 64 --steps 64 --skip-fla --budget $(( ${VB_S:-100} - 20 )) \
      --out "$OUT/vb64_$vb" 2>&1 | grep -E "^\| linearnexus|rror|budget" | cut -c1-300
  done;;
esac
case " $PARTS " in *" warps64 "*)
  # the layer kernels' warps at batch 64 (2 by layer_warps there since 2026-12-07, 4 before;
  # LINEARNEXUS_LAYER_WARPS forces a count), one process each
  for warps in default ${WARPS:-4 8}; do
    echo "== batch 64, LINEARNEXUS_LAYER_WARPS=$warps"
    LINEARNEXUS_LAYER_WARPS=${warps/default/} timeout ${WARPS_S:-100} python3 \
      benchmarks/decode_gpu.py --models ${WARPS_MODELS:-mamba2 gdn} --batches 64 --steps 64 \
      --skip-fla --budget $(( ${WARPS_S:-100} - 20 )) --out "$OUT/warps64_$warps" 2>&1 \
      | grep -E "^\| linearnexus|rror|budget" | cut -c1-300 | head -20
  done;;
esac
case " $PARTS " in *" block "*)
  for block in 1 $BLOCKS; do
    echo "== LINEARNEXUS_DECODE_BLOCK=$block"
    LINEARNEXUS_DECODE_BLOCK=$block timeout ${BLOCK_S:-130} python3 benchmarks/decode_gpu.py \
      --models gdn mamba2 --batches 1 --host-batches --steps 64 --skip-fla \
      --budget $(( ${BLOCK_S:-130} - 20 )) --out "$OUT/block$block" 2>&1 \
      | grep -E "^\| linearnexus|rror|budget" | cut -c1-300 | head -20
  done;;
esac
