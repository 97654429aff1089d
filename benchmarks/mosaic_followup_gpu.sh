#!/bin/bash
# One device call for what issue 26 built without a GPU (docs/mosaic.md, "Next"), each part
# bounded so the call ends inside the 10-minute limit; logs and JSON under $OUT:
#   0. bad values (NaN / inf / positive gates) through the mosaic backend's guard against
#      the jax backend, exact NaN patterns (guard_nan_gpu.py, the four ops or NAN_OPS; then
#      simple_gla split in two, forward and gradient, --seq-split 2 --seq-split-grad), if
#      PARTS has "nan"
#      (~90 s);
#   0b. mosaic beside FLA in the same call (kernels_gpu.py; FLA_OPS, FLA_SHAPES: indices into
#      its SHAPES, default (8, 4096, 16, 128) and (2, 16384, 16, 128)), if PARTS has "fla"
#      (~140 s on a warm machine, ~450 s while FLA autotunes on a fresh one);
#   1. packed sequences through the Mosaic kernels (kernels_gpu.py's packed rows; on by
#      default since they passed on an H100, 2026-12-05);
#   2. the delta rules' Mosaic kernels: numerics against the reference (the gradient from
#      M^{-1} too) and their time beside the Triton backward and FLA (mosaic_gdn_check.py);
#   2b. the ungated delta_rule's speed against FLA's chunk_delta_rule (mosaic_gdn_check.py
#      --op delta_rule, no checks), if PARTS has "delta";
#   3. the ~211M Gated DeltaNet LM's training step through it (lm_train_gpu.py: mosaic, the
#      gradient from M^{-1} (mosaic-fused-grad) and pallas; LM_PARTS="losses throughput fla"
#      adds the 50-step losses against the jax backend and FLA's LM; LM_BACKENDS the backends
#      timed), if PARTS has "lm";
#   4. GLA's Mosaic GPU walk (kernels/gla/mosaic.py, never run on a GPU before): checks
#      against the reference (dense and packed, T = 63 / 1000, D = 64 / 128), then mosaic,
#      pallas and FLA timed at (8, 4096, 16, 128) and (2, 16384, 16, 128), if PARTS has "gla";
#   5. GLA's forward kernel by kernel (benchmarks/gla_profile_gpu.py), if PARTS has
#      "gla-profile";
#   5b. GLA through the api with the heuristic set from that profile (value blocks of 128
#      where they fill the SMs, the storing walk at one stage), mosaic and pallas at
#      (8, 4096, 16, 128) and (2, 16384, 16, 128), if PARTS has "gla-time";
#   5c. the api's guard and the gated gradient's switches in the forms GUARD_FORMS names
#      (default "cond bcond none": as shipped, the backward's cond in place of its where over
#      the cotangents (LINEARNEXUS_GUARD_BACKWARD=cond), the op called directly; "loop":
#      LINEARNEXUS_GUARD_SETTLE=loop; "dkswy0": the gated gradient's dks from the Mosaic dw
#      kernel (LINEARNEXUS_MOSAIC_DKS_IN_WY=0); "best0": bcond and dkswy0), one process each (guard_cost_gpu.py --skip-decode: simple_gla, gated_delta_rule, gla,
#      or the ops in GUARD_OPS), if PARTS has "guard" (~3 x 100 s: with gla-time, ~500 s);
#   5d. tile configs through the api (mosaic_config_gpu.py), if PARTS has "configs" (~350 s):
#      simple_gla at (2, 16384, 16, 128): the heuristic (value blocks of 32 there) against
#      blocks of 64; gated_delta_rule there at value blocks of 64 (the heuristic) and 32;
#      gla's storing walk at two stages (the heuristic at 64 programs) against one at
#      (2, 16384, 16, 128);
#   5d'. simple_gla's sequence split (MosaicConfig.seq_split: each segment's entering state
#      from a Triton walk of the segments before, then the Mosaic walk over B * split rows)
#      at (2, 16384, 16, 128): one walk (seq_split=1), the heuristic (two segments there),
#      the gradient split too (seq_split_grad, opt-in until timed) at two and four segments,
#      four; and the JAX profiler's kernel list of the heuristic, if PARTS has "split"
#      (~250 s + 2 x ~60 s);
#   5e. the fused gradient's WY kernels alone (wy_inverse; wy_fused_backward from dks and,
#      as the default gradient runs it, from the states) at 2 / 4 / 8 warps, with the rate
#      of their bytes (wy_profile_gpu.py --fused-warps), if PARTS has "wy-warps" (~90 s);
#   5f. the delta rules' Mosaic WY backward (mosaic_wy.py, LINEARNEXUS_MOSAIC_WY_BWD): checks
#      through the api and both WY backwards alone (wy_mosaic_gpu.py), the api's forward +
#      backward with it off and on (mosaic_config_gpu.py: gated_delta_rule at (8, 4096, 16,
#      128) and (2, 16384, 16, 128), twice each; delta_rule once), packed sequences through
#      it (kernels_gpu.py's packed rows), if PARTS has "wy" (~400 s);
#   5g. the backward's switches for small grids at (2, 16384, 16, 128) (mosaic_config_gpu.py):
#      dq / dk split by chunks (LINEARNEXUS_MOSAIC_DQK_SPLIT=1), the reverse walk at value
#      blocks of 32 (LINEARNEXUS_MOSAIC_BWD_BV32=1), both, and both with the Mosaic WY
#      backward, for gated_delta_rule; simple_gla with one walk's gradient
#      (seq_split_grad=False) off and with both, if PARTS has "small" (~300 s);
#   5h. the gated rule's forward + backward kernel by kernel at (8, 4096, 16, 128), the Triton
#      WY backward and the Mosaic one (profile_gpu.py, LINEARNEXUS_MOSAIC_WY_BWD=0 / 1), if
#      PARTS has "wy-profile" (~2 x 70 s): where the Mosaic kernel's saving goes;
#   5i. the programs' launch order (mosaic_chunk.program_grid): the blocks that share a head's
#      q / k tiles next to each other (the default) against batch rows fastest
#      (LINEARNEXUS_MOSAIC_SPLIT_MINOR=0, the order before), each twice, through the api at
#      (8, 4096, 16, 128) (mosaic_config_gpu.py: gated_delta_rule, simple_gla, then delta_rule
#      once each), if PARTS has "order" (~300 s);
#   5j. the wave balance (mosaic_chunk.balances_waves, on by default: the reverse walk at value
#      blocks of 32 and dq / dk in two chunk parts where twice the programs fill the last
#      wave better) on and off (LINEARNEXUS_MOSAIC_WAVES=0), twice each, for the ops in
#      WAVES_OPS (default gated_delta_rule simple_gla) at (1, 8192, 96, 128), the case it is
#      for (192 programs for 132 SMs), if PARTS has "waves" (~125 s an op);
#   5k. GLA's state walk on Mosaic GPU (gla/mosaic.py's gla_state_grad, LINEARNEXUS_MOSAIC_GLA_BWD=1:
#      the Triton bwd_dh and bwd_dv as one walk): checks against the reference with it on
#      (kernels_gpu.py, dense and packed, T = 63 / 1000, D = 64 / 128), then off and on twice
#      through the api at (8, 4096, 16, 128) and (2, 16384, 16, 128), if PARTS has "gla-bwd"
#      (~400 s);
#   5l. the gated rule at (1, 8192, 96, 128), its one target miss (forward + backward 0.614x
#      FLA's against 0.6x): the heuristic against the storing forward and reverse walk at one
#      and two stages (bwd_stages) and dq / dk at one (dqk_stages), if PARTS has "gdn-stages"
#      (~240 s; FLA's time there: PARTS="fla" FLA_OPS=gated_delta_rule FLA_SHAPES=0);
#   6. the one-row decode kernels' tests compiled on the GPU, failures with their tracebacks
#      (10 failed on an H100 on 2026-12-05: the tests' dispatch, fixed by tests/conftest.py's
#      cpu_dispatch; docs/benchmarks.md), if PARTS has "gemv-tests".
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
# mosaic_config_gpu.py's configs through the api, its rows to $OUT/NAME.log and JSON under
# $OUT/NAME: configs NAME SECONDS MARGIN OP "SHAPES" CONFIG... (the script's own budget is
# SECONDS - MARGIN, so that it stops starting cells before the timeout)
configs() {
  local name=$1 seconds=$2 margin=$3 op=$4 shapes=$5
  shift 5
  timeout "$seconds" python3 benchmarks/mosaic_config_gpu.py --op "$op" --shapes $shapes \
    --configs "$@" --budget $(( seconds - margin )) --out "$OUT/$name" 2>&1 | quiet \
    | grep -E "^\{|rror" | cut -c1-300 | tee "$OUT/$name.log"
}
case " $PARTS " in *" nan "*)
  echo "== bad values through the mosaic backend's guard, against the jax backend"
  timeout ${NAN_S:-180} python3 benchmarks/guard_nan_gpu.py --ops ${NAN_OPS:-simple_gla gated_delta_rule delta_rule gla} --out "$OUT" 2>&1 | quiet \
    | cut -c1-200 | tee "$OUT/nan.log"
  echo "== the same for simple_gla split in two segments, forward and gradient"
  timeout ${NAN_SPLIT_S:-90} python3 benchmarks/guard_nan_gpu.py --ops simple_gla --seq-split 2 \
    --seq-split-grad \
    --out "$OUT/nan_split" 2>&1 | quiet | cut -c1-200 | tee "$OUT/nan_split.log";;
esac
case " $PARTS " in *" fla "*)
  echo "== mosaic beside FLA in the same call (the issue's T >= 4096 shapes of these ops)"
  timeout ${FLA_S:-450} python3 benchmarks/kernels_gpu.py --ops ${FLA_OPS:-simple_gla gated_delta_rule} \
    --backends mosaic --skip-check --skip-mamba --skip-ceilings --shapes ${FLA_SHAPES:-6 1} \
    --budget $(( ${FLA_S:-450} - 20 )) --out "$OUT" --name fla_same_call 2>&1 | quiet \
    | grep -E "LN fwd|timing|rror" | cut -c1-230 | tee "$OUT/fla.log";;
esac
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
case " $PARTS " in *" delta "*)
  echo "== the ungated delta rule through mosaic against FLA's chunk_delta_rule"
  timeout ${DELTA_S:-170} python3 benchmarks/mosaic_gdn_check.py --op delta_rule --check-share 0 \
    --out "$OUT/delta_rule" --budget $(( ${DELTA_S:-170} - 20 )) 2>&1 | quiet \
    | tee "$OUT/delta_rule.log" | tail -16;;
esac
case " $PARTS " in *" gla "*)
  echo "== GLA's Mosaic GPU walk"
  timeout ${GLA_S:-300} python3 benchmarks/kernels_gpu.py --ops gla --backends mosaic pallas \
    --check-backends mosaic --check-seqs 63 1000 --check-dims 64 128 --shapes 6 1 \
    --skip-mamba --out "$OUT" --name gla_mosaic --budget $(( ${GLA_S:-300} - 30 )) 2>&1 \
    | quiet | grep -E "PASS|FAIL|ERROR|not impl|rror|fwd|ceiling" | cut -c1-260 \
    | tee "$OUT/gla.log";;
esac
case " $PARTS " in *" gla-profile "*)
  echo "== GLA's forward, kernel by kernel"
  timeout ${GLA_PROFILE_S:-300} python3 benchmarks/gla_profile_gpu.py --out "$OUT" \
    --budget $(( ${GLA_PROFILE_S:-300} - 30 )) 2>&1 | quiet | tee "$OUT/gla_profile.log";;
esac
case " $PARTS " in *" gla-time "*)
  echo "== GLA through the api, the heuristic from the walk profile"
  timeout ${GLA_TIME_S:-200} python3 benchmarks/kernels_gpu.py --ops gla --backends pallas mosaic \
    --skip-check --skip-fla --skip-mamba --skip-ceilings --shapes 6 1 --out "$OUT" \
    --name gla_time --budget $(( ${GLA_TIME_S:-200} - 20 )) 2>&1 | quiet \
    | grep -E "fwd|rror" | cut -c1-260 | tee "$OUT/gla_time.log";;
esac
case " $PARTS " in *" guard "*)
  echo "== the api's guard and the gated gradient's switches: ${GUARD_FORMS:=cond bcond none}"
  for form in $GUARD_FORMS; do  # one process each; cond: as shipped; none: no guard;
    # loop: LINEARNEXUS_GUARD_SETTLE=loop; bcond: LINEARNEXUS_GUARD_BACKWARD=cond;
    # dkswy0: the dw kernel (LINEARNEXUS_MOSAIC_DKS_IN_WY=0); best0: bcond and dkswy0
    flag=; settle=cond; backward=where; dks=1
    case $form in
      none) flag=--no-guard;; loop) settle=loop;; bcond) backward=cond;; dkswy0) dks=0;;
      best0) backward=cond; dks=0;;
    esac
    LINEARNEXUS_GUARD_SETTLE=$settle LINEARNEXUS_GUARD_BACKWARD=$backward \
      LINEARNEXUS_MOSAIC_DKS_IN_WY=$dks \
      timeout ${GUARD_S:-100} python3 benchmarks/guard_cost_gpu.py $flag --skip-decode \
      --ops ${GUARD_OPS:-simple_gla gated_delta_rule gla} --out "$OUT/guard_$form.json" 2>&1 \
      | quiet | tee "$OUT/guard_$form.log" | grep -E "^\{|rror" | sed "s/^/$form /" | cut -c1-200
  done;;
esac
case " $PARTS " in *" configs "*)
  echo "== tile configs through the api"
  configs configs_simple_gla 120 60 simple_gla "2,16384,16,128" "" block_v=64
  configs configs_gated_delta_rule 150 60 gated_delta_rule "2,16384,16,128" "" block_v=32
  configs configs_gla 160 60 gla "2,16384,16,128" "" bwd_stages=1;;
esac
case " $PARTS " in *" split "*)
  echo "== simple_gla's sequence split (entering states first) at (2, 16384, 16, 128)"
  configs split ${SPLIT_S:-250} 40 simple_gla 2,16384,16,128 seq_split=1 "" \
    seq_split=2,seq_split_grad=True seq_split=4,seq_split_grad=True seq_split=4
  for mode in ${SPLIT_PROFILE:-fwd fwd+bwd}; do
    timeout 90 python3 benchmarks/profile_gpu.py simple_gla --shape 2,16384,16,128 \
      --mode $mode --backend mosaic --calls 3 \
      --json "$OUT/split_profile_${mode/+/_}.json" 2>&1 | quiet | cut -c1-160 \
      | tee "$OUT/split_profile_${mode/+/_}.log" | head -24
  done;;
esac
case " $PARTS " in *" wy-warps "*)
  echo "== the fused gradient's WY kernels by warps"
  timeout ${WY_S:-120} python3 benchmarks/wy_profile_gpu.py --fused-warps 2 4 8 --variants \
    --skip-op --skip-fla --shapes 8,4096,16,128 --out "$OUT" --budget $(( ${WY_S:-120} - 20 )) \
    2>&1 | quiet | grep -E "fused|rror" | cut -c1-200 | tee "$OUT/wy_warps.log";;
esac
case " $PARTS " in *" wy "*)
  echo "== the delta rules' Mosaic WY backward: checks, and the two WY backwards alone"
  timeout ${WYM_S:-190} python3 benchmarks/wy_mosaic_gpu.py --out "$OUT" \
    --budget $(( ${WYM_S:-190} - 30 )) 2>&1 | quiet | tee "$OUT/wy_mosaic.log" \
    | grep -E "PASS|FAIL|ERROR|shape|rror" | cut -c1-400
  echo "== through the api, the Triton WY backward (0) and the Mosaic one (1)"
  W0=LINEARNEXUS_MOSAIC_WY_BWD=0; W1=LINEARNEXUS_MOSAIC_WY_BWD=1
  configs wy_api ${WYA_S:-150} 30 gated_delta_rule "8,4096,16,128 2,16384,16,128" \
    $W0 $W1 $W0 $W1
  configs wy_api_delta ${WYD_S:-60} 25 delta_rule 8,4096,16,128 $W0 $W1
  echo "== packed sequences through it"
  LINEARNEXUS_MOSAIC_WY_BWD=1 LINEARNEXUS_MOSAIC_PACKED=1 timeout ${WYP_S:-90} python3 \
    benchmarks/kernels_gpu.py --ops gated_delta_rule delta_rule --check-backends mosaic \
    --skip-fla --skip-ln --skip-mamba --skip-ceilings --out "$OUT" --name wy_packed_check 2>&1 \
    | quiet | grep -E "PASS|FAIL|ERROR|not impl|rror" | cut -c1-230 | tee "$OUT/wy_packed.log";;
esac
case " $PARTS " in *" small "*)
  echo "== the backward's switches for small grids at (2, 16384, 16, 128)"
  D1=LINEARNEXUS_MOSAIC_DQK_SPLIT=1; B1=LINEARNEXUS_MOSAIC_BWD_BV32=1
  configs small_gdn ${SMALL_S:-200} 30 gated_delta_rule 2,16384,16,128 "" $D1 $B1 "$D1,$B1" \
    "$D1,$B1,LINEARNEXUS_MOSAIC_WY_BWD=1" ""
  configs small_sgla ${SMALL_SGLA_S:-100} 25 simple_gla 2,16384,16,128 seq_split_grad=False \
    "seq_split_grad=False,$D1,$B1" "";;
esac
case " $PARTS " in *" wy-profile "*)
  echo "== the gated rule's gradient kernel by kernel, Triton (0) and Mosaic (1) WY backward"
  for wy in 0 1; do
    LINEARNEXUS_MOSAIC_WY_BWD=$wy timeout 100 python3 benchmarks/profile_gpu.py gated_delta_rule \
      --shape 8,4096,16,128 --mode fwd+bwd --backend mosaic --calls 3 \
      --json "$OUT/wy_profile_fwd_bwd_$wy.json" 2>&1 | quiet | cut -c1-160 \
      | tee "$OUT/wy_profile_fwd_bwd_$wy.log" | head -24
  done;;
esac
case " $PARTS " in *" order "*)
  echo "== the programs' launch order: blocks of a head side by side (default) against rows fastest"
  O0=LINEARNEXUS_MOSAIC_SPLIT_MINOR=0
  for op in gated_delta_rule simple_gla; do
    configs order_$op ${ORDER_S:-120} 20 $op 8,4096,16,128 "" $O0 "" $O0
  done
  configs order_delta_rule ${ORDER_DR_S:-70} 15 delta_rule 8,4096,16,128 "" $O0;;
esac
case " $PARTS " in *" waves "*)
  echo "== the wave balance on (the default) and off at (1, 8192, 96, 128)"
  W0=LINEARNEXUS_MOSAIC_WAVES=0
  for op in ${WAVES_OPS:-gated_delta_rule simple_gla}; do
    configs waves_$op ${WAVES_S:-130} 20 $op 1,8192,96,128 "" $W0 "" $W0
  done;;
esac
case " $PARTS " in *" gdn-stages "*)
  echo "== the gated rule at (1, 8192, 96, 128): the gradient's pipeline depths"
  configs gdn_stages ${GDN_STAGES_S:-240} 25 gated_delta_rule 1,8192,96,128 "" bwd_stages=1 \
    bwd_stages=2 dqk_stages=1;;
esac
case " $PARTS " in *" gla-bwd "*)
  echo "== GLA's state walk on Mosaic GPU: checks with it on, then off / on through the api"
  G1=LINEARNEXUS_MOSAIC_GLA_BWD=1
  env $G1 timeout ${GLA_BWD_CHECK_S:-200} python3 benchmarks/kernels_gpu.py --ops gla \
    --check-backends mosaic --check-seqs 63 1000 --check-dims 64 128 --skip-fla --skip-ln \
    --skip-mamba --skip-ceilings --out "$OUT" --name gla_bwd_check 2>&1 | quiet \
    | grep -E "PASS|FAIL|ERROR|not impl|rror" | cut -c1-230 | tee "$OUT/gla_bwd_check.log"
  configs gla_bwd ${GLA_BWD_S:-200} 25 gla "8,4096,16,128 2,16384,16,128" "" $G1 "" $G1;;
esac
case " $PARTS " in *" gemv-tests "*)
  echo "== one-row decode kernel tests on the GPU: the ten that failed on 2026-12-05 first"
  G=tests/test_gemv.py
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout ${GEMV_FIRST_S:-200} python3 -m pytest -q \
    -p no:cacheprovider -rf --tb=short "$G::test_one_token_models_match_xla" \
    "$G::test_mlp_half_runs_two_kernels_and_matches" "$G::test_transposed_decode_table" \
    "$G::test_dense_with_a_norm_is_the_norm_then_the_matmul" 2>&1 | quiet \
    | tee "$OUT/gemv_failed_before.log" | grep -E "^(FAILED|E  |[0-9]+ (passed|failed))" \
    | cut -c1-240 | head -60
  echo "== both files whole"
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout ${GEMV_S:-400} python3 -m pytest -q \
    -p no:cacheprovider tests/test_gemv.py tests/test_fused_decode.py -rf --tb=line 2>&1 \
    | quiet | tee "$OUT/gemv_tests.log" | grep -E "^(FAILED|[0-9]+ (passed|failed))" \
    | cut -c1-240 | head -40;;
esac
case " $PARTS " in *" lm "*)
  echo "== the GDN LM through the delta rules' Mosaic backward"
  # (three LMs of ~211M: the first mosaic step compiles for ~110 s)
  timeout ${LM_S:-330} python3 benchmarks/lm_train_gpu.py --parts ${LM_PARTS:-throughput} \
    --loss-backends mosaic mosaic-fused-grad --backends ${LM_BACKENDS:-mosaic mosaic-fused-grad pallas} \
    --budget $(( ${LM_S:-330} - 20 )) --out "$OUT" 2>&1 | quiet | tee "$OUT/lm.log" | tail -16;;
esac
