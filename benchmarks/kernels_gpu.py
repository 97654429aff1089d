"""LinearNexus Pallas kernels on an NVIDIA GPU: correctness vs the per-step reference, and
speed vs flash-linear-attention (FLA), in one process.

    python3 benchmarks/kernels_gpu.py [--ops simple_gla gla ...] [--shapes 0 3] [--quick]
        [--skip-fla] [--skip-ln] [--skip-check] [--skip-mamba] [--skip-ceilings]
        [--chunk-size 64] [--repeats 9] [--budget 560]
        [--backends pallas mosaic] [--check-backends mosaic auto] [--check-seqs 63 1000 4096]
        [--check-dims 64 128]
        [--merge earlier.json] [--out DIR] [--name kernels_gpu] [--docs docs/benchmarks.md]

``--backends``: the LinearNexus backends timed (the first fills the LN columns; each other
one, ``mosaic`` (Mosaic GPU kernels on Hopper) or ``pallas`` (Triton), adds its own columns
with its ratio to FLA and its %HBM / %MMA); ``--check-backends`` those checked against the
reference (``auto``: the dispatcher's own choice), at every ``--check-seqs`` length and
``--check-dims`` head dim.

On the GPU machine (no internet; FLA carried as wheels in .whl/, pure Python):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    PYTHONUNBUFFERED=1 python3 benchmarks/kernels_gpu.py --out $OUT

CPU smoke test (Pallas in interpret mode, tiny shapes, no torch import):
``python benchmarks/kernels_gpu.py --quick --skip-fla``.

Writes ``benchmarks/results/<name>.json`` and ``<name>.md`` (and the same two files under
``--out DIR``); ``--docs FILE`` also puts the table into FILE between its
``kernels-gpu-table`` markers. A full run takes ~45 minutes on a fresh H200, ~32 of them
FLA's autotuning (Triton compiling each candidate config, one at a time);
``benchmarks/kernels_gpu_detached.sh`` runs it in its own process session across commands
that are limited to 10 minutes each, and with ``PREWARM=14`` first fills Triton's compile
cache from 14 FLA-only processes side by side (8 minutes), after which the measured run took
11 minutes (2026-11-23).

What it does
------------
1. Environment: date (UTC), GPU, JAX / jaxlib / Triton / PyTorch / FLA versions.
2. Ceilings, measured once with torch + ``triton.testing.do_bench(return_mode="median")``:
   HBM bandwidth (4 GiB device-to-device copy, bytes read + written) and the bf16 matmul
   rate (8192^3 through ``torch.matmul``). Skipped without torch / CUDA.
3. Correctness of every op's ``backend="pallas"`` against ``backend="naive"`` (the per-step
   scan, jitted, at B=2, T=1000, H=4, K=V=64, plus a packed case B=1, cu_seqlens
   [0, 100, 357, 1000]): output, final state and the gradients of
   ``sum(o * do) + sum(ht * dht)`` w.r.t. every input incl. gates and initial_state. The
   reference is fed the same values upcast to float32 and traced with
   ``jax.default_matmul_precision("highest")``. Metric ``||a - b|| / ||b||`` in float64 on
   the host. Thresholds: bf16 inputs: outputs/states <= 5e-3, gradients <= 1e-2 (bf16 keeps
   8 bits: rounding alone gives ~1e-3); float32: 1e-4 / 1e-3. NaN fails. In the bf16 case q,
   k, v, beta are bf16 while g and initial_state stay float32 (as FLA's tests and models).
   Same for the Mamba-1 selective scan (pallas vs naive, dense and packed).
4. Timing (bf16, K = V = D) of the forward and of forward+backward (the gradient of
   ``sum(o * do)`` w.r.t. all inputs incl. gates) for LinearNexus (``jax.jit`` of the api
   call, backend="pallas", mode="chunk", the op's default chunk size unless ``--chunk-size``)
   and for FLA's ``chunk_*`` (torch, same shapes and input recipe, its defaults: chunk 64).
   Same method for both: warm-up (compile / autotune), then n back-to-back calls between two
   device synchronisations on the host clock (n such that one measurement is >= 20 ms),
   divided by n, median over 9 repeats (3 with --quick). Inputs smaller than 3x the L2
   cache are rotated over several copies so they are not served from L2. FLA is also timed
   with ``triton.testing.do_bench`` (CUDA events, L2 flushed) as a cross-check; JAX has no
   CUDA events on torch's stream, so that cross-check exists for FLA only.
5. Per kernel: FLOPs of the chunked algorithm and the bytes that must move (formulas at
   ``flops`` / ``bytes_moved`` below), as shares of the measured ceilings.
6. Mamba-1 selective scan (B=8, T=4096, d_inner=2048, d_state=16, bf16): pallas and jax
   backends, fwd and fwd+bwd, against the memory floor (bytes that must move / bandwidth).

Memory: the largest case, (8, 2048, 32, 256) fwd+bwd, has 268 MB per bf16 [B, T, H, D]
tensor (q, k, v, o, do, dq, dk, dv: ~2.1 GB), GLA's float32 g and dg 0.5 GB each, and
float32 chunk states [B, T/64, H, K, V] of 2.1 GB (h and dh in the backward): < 10 GB per
framework, far below the H200's 141 GB (JAX capped at 75% by XLA_PYTHON_CLIENT_MEM_FRACTION,
torch's cache emptied between shapes). Runs longer than ``--budget`` seconds skip the timing
cells not yet started (results are saved after every shape); ``--merge`` joins split runs.

Input recipe (both frameworks; FLA's tests): q, k, v ~ N(0, 1); k L2-normalised for the delta
rules; simple_gla / gated_delta_rule g = logsigmoid(N(0, 1)) [B, T, H] float32;
gla g = logsigmoid(N(0, 1)) / 16 [B, T, H, K] float32; beta = sigmoid(N(0, 1)) in the input
dtype; scale = K^-0.5 (both defaults); no initial state, no final state when timing.

FLA 0.6.0 API (read from the wheel's source, fla/ops/*/chunk.py)
---------------------------------------------------------------
All take ``[B, T, H, D]`` (``head_first`` was removed: passing it raises), return
``(o [B, T, H, V], final_state [N, H, K, V] float32 or None)``, default
``scale = K ** -0.5``; ``cu_seqlens`` LongTensor [N+1] requires B == 1;
``initial_state`` [N, H, K, V].

* ``chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
  output_final_state=False, state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None,
  **kwargs)``: g [B, T, H] log-gates (tests pass float32; a local cumsum in float32 is taken
  inside, pre-scaled by 1/ln 2 for exp2), ``g_gamma`` [H] a fixed per-head log-decay
  instead; ``chunk_size`` kwarg (power of two, default 64).
* ``chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
  state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None)``: g [B, T, H, K] (same shape as
  q, k: asserted); ``initial_state`` must be float32 (asserted); chunk size fixed
  ``min(64, max(16, next_pow2(T)))``; float32 g lets it keep g's cumsum instead of
  recomputing it in the backward.
* ``chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
  use_qk_l2norm_in_kernel=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs)``:
  beta [B, T, H]; q, k, v must share a dtype and may NOT be float32 (asserted: bf16/fp16
  only); k is expected L2-normalised by the caller unless ``use_qk_l2norm_in_kernel=True``
  (which normalises q and k inside); ``chunk_size`` kwarg in (16, 32, 64), default 64.
* ``chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
  output_final_state=False, use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
  allow_neg_eigval=False, state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None,
  chunk_indices=None, cp_context=None, **kwargs)``: g [B, T, HV] log-gates (FLA's tests:
  float32), beta [B, T, HV] post-sigmoid (unless ``use_beta_sigmoid_in_kernel``); v may have
  more heads than q/k (GVA); ``use_gate_in_kernel`` / ``A_log`` / ``dt_bias`` kwargs fuse
  Gated DeltaNet's gate; ``chunk_size`` in (16, 32, 64), default 64. A "flash_qla" backend
  (package ``flash_qla``, K = V = 128 on SM90) replaces the Triton path when installed; it is
  not on the GPU machine, which is recorded.
* ``fla.ops.common.chunk_o.chunk_bwd_dqkwg`` (the backward of simple_gla and
  gated_delta_rule with a gate) raises RuntimeError when ``g is not None and
  IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1``: Triton 3.4 - 3.7.0
  miscompiles it on Hopper (FLA issue #640, wrong gradients) unless tilelang provides the
  kernel. ``TRITON_ABOVE_3_7_1`` is a module global of ``fla.ops.common.chunk_o`` (imported
  from fla.utils.env, ``triton.__version__ >= 3.7.1``) read at call time, so setting it True
  lets the backward run. This script sets it only when Triton < 3.7.1 on a capability-9.x
  GPU, for timing only (those FLA fwd+bwd gradients may be wrong), and says so under the
  tables and in the JSON (``fla_triton_flag_forced``).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the GPU
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")  # a cap; leaves torch >= 1/4

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS_DIR = ROOT / "benchmarks" / "results"

OPS = ("simple_gla", "gla", "delta_rule", "gated_delta_rule")
SHAPES = [(1, 8192, 96, 128), (2, 16384, 16, 128), (4, 2048, 16, 128), (4, 4096, 64, 128),
          (8, 1024, 8, 64), (8, 2048, 32, 256), (8, 4096, 16, 128)]  # (B, T, H, D), K = V = D
QUICK_SHAPE_GPU = 2  # --quick on the GPU: (4, 2048, 16, 128)
CPU_SHAPE = (1, 64, 2, 32)  # any run on the CPU (Pallas interpret mode is slow)
CHECK_SHAPE_GPU = (2, 1000, 4, 64)  # (B, T, H, D) of the correctness checks
CHECK_CU_GPU = (0, 100, 357, 1000)
CHECK_SHAPE_CPU = (2, 100, 2, 32)
CHECK_CU_CPU = (0, 17, 64, 100)
MAMBA_SHAPE_GPU = (8, 4096, 2048, 16)  # (B, T, d_inner, d_state)
MAMBA_SHAPE_QUICK = (2, 1024, 1024, 16)
MAMBA_SHAPE_CPU = (1, 64, 64, 16)
MAMBA_CHECK_GPU = (2, 1000, 256, 16)
MAMBA_CHECK_CPU = (1, 100, 32, 16)
THRESHOLDS = {"bfloat16": (5e-3, 1e-2), "float32": (1e-4, 1e-3)}  # (outputs/states, gradients)
TARGET_S = 0.020  # one measurement (n back-to-back calls) lasts at least this long
FLA_CHUNK = 64  # FLA 0.6.0's chunk size for all four ops at these T
FLAG_OPS = ("simple_gla", "gated_delta_rule")  # their FLA backward goes through chunk_bwd_dqkwg with g


def log(*args: Any) -> None:
    print(*args, flush=True)


def short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 600 else text[:600] + " ..."


def not_implemented(e: BaseException) -> bool:
    """A backend that does not exist yet (unknown name) or declines the call."""
    return isinstance(e, NotImplementedError) or (
        isinstance(e, ValueError) and "has no backend" in str(e))


# --------------------------------------------------------------------------- environment

def platform() -> str:
    return jax.default_backend()


def on_gpu() -> bool:
    return platform() in ("gpu", "cuda", "rocm")


def pkg_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_digest(root: Path | None = None) -> str:
    """The first 12 hex digits of a sha256 over the library's Python sources (each path
    relative to ``root`` and its bytes, in sorted order): which code a run imported, whatever
    the checkout's git metadata says (the device's copy of the tree can carry an older
    ``.git``). ``python benchmarks/kernels_gpu.py --digest`` prints it for the tree here."""
    import hashlib

    root = root or Path(ROOT)
    digest = hashlib.sha256()
    for path in sorted((root / "linearnexus").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def environment(torch: Any) -> dict[str, Any]:
    import jaxlib

    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "jax_backend": platform(),
        "jax_devices": [d.device_kind for d in jax.devices()],
        "triton": pkg_version("triton"), "torch": pkg_version("torch"),
        "fla_core": pkg_version("fla-core"), "flash_linear_attention": pkg_version("flash-linear-attention"),
        "tilelang_installed": importlib.util.find_spec("tilelang") is not None,
        "flash_qla_installed": importlib.util.find_spec("flash_qla") is not None,
        "python": sys.version.split()[0],
        "env": {k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_PREALLOCATE",
                                               "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS",
                                               "LINEARNEXUS_PALLAS_INTERPRET")},
        # every library switch set in the environment (the kernels read them when tracing)
        "linearnexus_switches": {k: v for k, v in sorted(os.environ.items())
                                 if k.startswith("LINEARNEXUS_")},
        "linearnexus_source": source_digest(),
    }
    try:  # LINEARNEXUS_COMMIT overrides git where the checkout's .git is not the tree's own
        env["linearnexus_commit"] = os.environ.get("LINEARNEXUS_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["linearnexus_commit"] = None
    gpu = None
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        env["capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2 ** 30, 1)
        env["l2_cache_mib"] = round(getattr(props, "L2_cache_size", 50 * 2 ** 20) / 2 ** 20, 1)
    elif on_gpu():
        gpu = jax.devices()[0].device_kind
        cap = getattr(jax.devices()[0], "compute_capability", None)
        env["capability"] = str(cap) if cap is not None else None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            env["nvidia_smi"] = smi.stdout.strip()
            gpu = gpu or smi.stdout.split(",")[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    env["gpu"] = gpu or f"none ({platform()})"
    return env


def is_hopper(env: dict[str, Any]) -> bool:
    cap = env.get("capability") or ""
    return str(cap).startswith("9")


def unlock_fla_gated_backward(env: dict[str, Any]) -> bool:
    """Set ``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1`` True where FLA 0.6.0 would refuse its
    gated backward (Hopper, Triton < 3.7.1: FLA issue #640, module doc), for timing only;
    True when it did."""
    chunk_o = importlib.import_module("fla.ops.common.chunk_o")
    if (version_tuple(env.get("triton")) < (3, 7, 1) and is_hopper(env)
            and not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True)):
        chunk_o.TRITON_ABOVE_3_7_1 = True
        return True
    return False


def version_tuple(text: str | None) -> tuple[int, ...]:
    parts = []
    for piece in (text or "0").split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# ------------------------------------------------------------------------------- timing

#: seconds of back-to-back calls before a measurement (clocks and caches settle)
WARM_S = 0.5
#: calls issued right after a synchronisation whose host time is the dispatch cost of one
DISPATCH_CALLS = 5
#: a measurement is host-bound when one call's dispatch takes this share of its time or more
HOST_BOUND = 0.8


def host_time(call: Callable[[int], Any], sync: Callable[[Any], None], *, repeats: int,
              n_sets: int) -> dict[str, Any]:
    """Median seconds per call: warm-up (compile, then :data:`WARM_S` of calls), then
    ``repeats`` x (n back-to-back calls between two
    device synchronisations on the host clock) / n, n so that one measurement >= TARGET_S.

    The time counts the device only while the host issues calls faster than the device runs
    them. So each measurement also takes the host time of its first :data:`DISPATCH_CALLS`
    calls, issued to an idle queue (``dispatch_ms``, the median). ``host_bound`` marks a
    result whose dispatch is :data:`HOST_BOUND` of its time or more: it measures the host,
    not the kernels. Seen on an H100 VM (2026-12-06): simple_gla's 0.3 ms forward read
    0.340-0.408 ms within one run, where another machine read 0.287-0.289.

    ``call(i)`` runs on input set ``i % n_sets`` and returns its outputs; ``sync(out)`` waits
    for the device (``jax.block_until_ready`` / ``torch.cuda.synchronize``).
    """
    start = time.perf_counter()
    sync(call(0))  # compile / autotune
    compile_s = time.perf_counter() - start
    for i in range(1, max(2, n_sets)):
        sync(call(i))
    start = time.perf_counter()
    sync(call(0))
    one = max(time.perf_counter() - start, 1e-6)
    n = int(min(5000, max(1, math.ceil(TARGET_S / one))))
    # the GPU busy for WARM_S before the first measurement: after a long compile the first
    # shape timed in a process read 0.42-0.50 ms where it read 0.32 ms timed second
    # (simple_gla (8, 4096, 16, 128), H100, 2026-12-06; FLA's, timed after it, unaffected)
    warm_start = time.perf_counter()
    while time.perf_counter() - warm_start < WARM_S:
        out = None
        for i in range(n):
            out = call(i)
        sync(out)
    times, dispatch = [], []
    k = min(n, DISPATCH_CALLS)
    for _ in range(repeats):
        sync(None)
        start = time.perf_counter()
        out = None
        for i in range(n):
            out = call(i)
            if i == k - 1:
                dispatch.append((time.perf_counter() - start) / k)
        sync(out)
        times.append((time.perf_counter() - start) / n)
        del out
    ms, dispatch_ms = 1e3 * statistics.median(times), 1e3 * statistics.median(dispatch)
    return {"ms": ms, "all_ms": [1e3 * t for t in times], "n": n,
            "warmup_s": round(compile_s, 2), "n_sets": n_sets,
            "dispatch_ms": round(dispatch_ms, 4), "host_bound": dispatch_ms >= HOST_BOUND * ms}


def jax_sync(out: Any) -> None:
    if out is not None:
        jax.block_until_ready(out)


def input_sets(nbytes: int, l2_bytes: int) -> int:
    """Copies of the inputs to rotate over so that they are not served from L2."""
    return int(min(8, max(1, math.ceil(3 * l2_bytes / max(nbytes, 1)))))


# ---------------------------------------------------------------------------- ceilings

def measure_ceilings(torch: Any, triton_testing: Any, quick: bool) -> dict[str, Any]:
    """HBM bandwidth (device-to-device copy) and the bf16 matmul rate, with torch."""
    out: dict[str, Any] = {}
    nbytes = (1 if quick else 4) * 2 ** 30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    ms = triton_testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    host = host_time(lambda i: dst.copy_(src), lambda o: torch.cuda.synchronize(), repeats=7, n_sets=1)
    out["hbm_copy_bytes"] = nbytes
    out["hbm_gbps"] = 2 * nbytes / (ms * 1e-3) / 1e9
    out["hbm_gbps_host_clock"] = 2 * nbytes / (host["ms"] * 1e-3) / 1e9
    src = dst = None  # free before the matmul
    torch.cuda.empty_cache()
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton_testing.do_bench(lambda: torch.matmul(a, b), warmup=50, rep=300, return_mode="median")
    host = host_time(lambda i: torch.matmul(a, b), lambda o: torch.cuda.synchronize(), repeats=7, n_sets=1)
    out["matmul_n"] = n
    out["bf16_tflops"] = 2 * n ** 3 / (ms * 1e-3) / 1e12
    out["bf16_tflops_host_clock"] = 2 * n ** 3 / (host["ms"] * 1e-3) / 1e12
    a = b = None
    torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------- FLOPs and bytes

def flops(op: str, B: int, T: int, H: int, K: int, V: int, C: int) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of the chunked algorithm (chunk C), matmuls only
    (2 per multiply-add; full C x C intra-chunk blocks, as the kernels compute them).

    Per token and head:
    * simple_gla, gla: forward ``2CK`` (Q K^T in the chunk) + ``2CV`` (scores @ V) + ``2KV``
      (Q h) + ``2KV`` (state update K^T V) = ``2CK + 2CV + 4KV``. Backward (FLA's kernels):
      recompute h ``2KV``, dh ``2KV``, dq ``2KV + 2CK``, dk ``2KV + 2CK``, dS = dO V^T ``2CV``,
      dv ``2KV + 2CK (A) + 2CV`` = ``10KV + 6CK + 4CV`` (2.5x the forward at K = V = C*2).
      GLA's per-dimension gates are elementwise and not counted.
    * delta_rule, gated_delta_rule (WY form): forward A = K K^T ``2CK``, triangular inverse
      ``2C^2/3``, W = A^-1 (beta K) ``2CK``, U = A^-1 (beta V) ``2CV``, v_new = U - W h
      ``2KV``, h += K^T v_new ``2KV``, o = Q h ``2KV`` + (Q K^T) v_new ``2CK + 2CV`` =
      ``6CK + 4CV + 6KV + 2C^2/3``. Backward (FLA's kernels): recompute W, U ``2CK + 2CV``
      and h ``4KV``; dv_local ``2CK + 2CV``; dh / dv ``6KV``; dq, dk, dw ``6KV + 4CK + 2CV``;
      WY backward ``8CK + 4CV + 4C^2`` = ``16CK + 10CV + 16KV + 4C^2`` (~2.7x forward).
    """
    if op in ("simple_gla", "gla"):
        fwd = 2 * C * K + 2 * C * V + 4 * K * V
        bwd = 10 * K * V + 6 * C * K + 4 * C * V
    else:
        fwd = 6 * C * K + 4 * C * V + 6 * K * V + 2 * C * C / 3
        bwd = 16 * C * K + 10 * C * V + 16 * K * V + 4 * C * C
    tokens = B * T * H
    return float(tokens * fwd), float(tokens * (fwd + bwd))


def input_bytes(op: str, B: int, T: int, H: int, K: int, V: int, elt: int = 2) -> int:
    """Bytes of the op's inputs (q, k, v in ``elt`` bytes; g float32; beta in ``elt``)."""
    n = B * T * H
    total = n * (2 * K + V) * elt
    if op == "simple_gla":
        total += n * 4
    elif op == "gla":
        total += n * K * 4
    elif op == "delta_rule":
        total += n * elt
    else:
        total += n * 4 + n * elt
    return total


def bytes_moved(op: str, B: int, T: int, H: int, K: int, V: int, elt: int = 2) -> tuple[int, int]:
    """(forward, forward+backward) bytes that must cross HBM at least once.

    Forward: every input read once + o written once (no initial / final state).
    Forward+backward: the forward's bytes + the inputs read again + do read + one gradient
    written per input (same dtype as the input) = 3 x inputs + 2 x |o|.
    """
    inp = input_bytes(op, B, T, H, K, V, elt)
    o = B * T * H * V * elt
    return inp + o, 3 * inp + 2 * o


def mamba_floor(B: int, T: int, D: int, N: int, elt: int = 2) -> tuple[int, int]:
    """(forward, forward+backward) bytes of the selective scan with z, D, dt_bias.

    Forward: read x, dt, z [B, T, D] and B, C [B, T, N] in the input dtype, A [D, N], D, dt_bias
    [D] float32; write y [B, T, D]. Forward+backward: forward + read x, dt, z, B, C, dy again +
    write dx, ddt, dz, dB, dC (+ dA, dD, ddt_bias, small).
    """
    big, small = B * T * D * elt, B * T * N * elt
    params = (D * N + 2 * D) * 4
    fwd = 3 * big + 2 * small + params + big
    bwd = 4 * big + 2 * small + params + 3 * big + 2 * small + params
    return fwd, fwd + bwd


# ----------------------------------------------------------------------------- inputs

def jax_inputs(op: str, key: jax.Array, B: int, T: int, H: int, K: int, V: int,
               dtype: Any) -> dict[str, jax.Array]:
    """The op's positional inputs (ordered dict) by the shared recipe; gates float32."""
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
    if op in ("delta_rule", "gated_delta_rule"):
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, H, V), jnp.float32)
    out = {"q": q.astype(dtype), "k": k.astype(dtype), "v": v.astype(dtype)}
    if op == "simple_gla" or op == "gated_delta_rule":
        out["g"] = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H), jnp.float32))
    if op == "gla":
        out["g"] = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, K), jnp.float32)) / 16
    if op in ("delta_rule", "gated_delta_rule"):
        out["beta"] = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H), jnp.float32)).astype(dtype)
    return out


def torch_inputs(torch: Any, op: str, seed: int, B: int, T: int, H: int, K: int, V: int,
                 requires_grad: bool) -> dict[str, Any]:
    """The same recipe in torch (bf16, gates float32), on the GPU."""
    import torch.nn.functional as F

    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf16 = "cuda", torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.float32, generator=gen)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    if op in ("delta_rule", "gated_delta_rule"):
        k = F.normalize(k, p=2, dim=-1)
    out = {"q": q.to(bf16), "k": k.to(bf16), "v": v.to(bf16)}
    if op in ("simple_gla", "gated_delta_rule"):
        out["g"] = F.logsigmoid(randn(B, T, H))
    if op == "gla":
        out["g"] = F.logsigmoid(randn(B, T, H, K)) / 16
    if op in ("delta_rule", "gated_delta_rule"):
        out["beta"] = randn(B, T, H).sigmoid().to(bf16)
    for t in out.values():
        t.requires_grad_(requires_grad)
    return out


def ln_api(op: str) -> Callable[..., Any]:
    module = importlib.import_module(f"linearnexus.kernels.{op}.api")
    return getattr(module, op)


def fla_api(op: str) -> Callable[..., Any]:
    if op == "simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla
        return chunk_simple_gla
    if op == "gla":
        from fla.ops.gla import chunk_gla
        return chunk_gla
    if op == "delta_rule":
        from fla.ops.delta_rule import chunk_delta_rule
        return chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    return chunk_gated_delta_rule


# ------------------------------------------------------------------------ correctness

def rel_err(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| in float64 on the host; NaN when a or b holds a NaN / inf."""
    a = np.asarray(jax.device_get(a)).astype(np.float64).ravel()
    b = np.asarray(jax.device_get(b)).astype(np.float64).ravel()
    if a.shape != b.shape:
        return float("nan")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    den = np.linalg.norm(b)
    num = np.linalg.norm(a - b)
    return float(num / den) if den > 0 else float(num)


def judge(errors: dict[str, float], grad_names: set[str], dtype_name: str) -> tuple[bool, str]:
    tol_out, tol_grad = THRESHOLDS[dtype_name]
    bad = [name for name, e in errors.items()
           if not (e <= (tol_grad if name in grad_names else tol_out))]
    return (not bad), ", ".join(bad)


def check_linear(op: str, dtype_name: str, case: str, key: jax.Array, shape: tuple[int, ...],
                 cu: tuple[int, ...], chunk_size: int | None, ref_cache: dict,
                 backend: str = "pallas") -> dict[str, Any]:
    """``backend`` vs naive: o, final state, and gradients of sum(o*do) + sum(ht*dht)."""
    B, T, H, D = shape
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    cu_arr = None
    if case == "packed":
        B = 1
        cu_arr = jnp.asarray(np.asarray(cu, np.int32))
    n_states = B if cu_arr is None else len(cu) - 1
    k1, k2, k3, k4 = jax.random.split(key, 4)
    inputs = jax_inputs(op, k1, B, T, H, D, D, dtype)
    names = list(inputs)
    h0 = jax.random.normal(k2, (n_states, H, D, D), jnp.float32)
    do = jax.random.normal(k3, (B, T, H, D), jnp.float32)
    dht = jax.random.normal(k4, (n_states, H, D, D), jnp.float32)
    fn = ln_api(op)

    def make(backend: str, extra: dict) -> Callable:
        def loss(args, h0, do, dht):
            o, ht = fn(*args, initial_state=h0, output_final_state=True, cu_seqlens=cu_arr,
                       backend=backend, **extra)
            return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(ht * dht), (o, ht)
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))

    extra = {"mode": "chunk"}
    if chunk_size is not None:
        extra["chunk_size"] = chunk_size
    args = tuple(inputs[n] for n in names)
    # the backend first: one that declines (NotImplementedError) costs no reference run
    (g, g_h0), (o, ht) = make(None if backend == "auto" else backend, extra)(args, h0, do, dht)
    ref_key = (op, case, T, D)
    if ref_key not in ref_cache:
        ref_cache[ref_key] = make("naive", {})
    ref_fn = ref_cache[ref_key]
    args32 = tuple(inputs[n].astype(jnp.float32) for n in names)
    with jax.default_matmul_precision("highest"):
        (ref_g, ref_h0), (ref_o, ref_ht) = ref_fn(args32, h0, do, dht)
    errors = {"o": rel_err(o, ref_o), "ht": rel_err(ht, ref_ht)}
    for name, a, b in zip(names, g, ref_g, strict=True):
        errors[f"d{name}"] = rel_err(a, b)
    errors["dh0"] = rel_err(g_h0, ref_h0)
    grad_names = {f"d{n}" for n in names} | {"dh0"}
    ok, bad = judge(errors, grad_names, dtype_name)
    return {"status": "PASS" if ok else "FAIL", "errors": errors, "failed": bad}


def mamba_inputs(key: jax.Array, B: int, T: int, D: int, N: int, dtype: Any) -> dict[str, jax.Array]:
    """Mamba-1 inputs as the block feeds them: raw dt with dt_bias + softplus."""
    ks = jax.random.split(key, 8)
    dt_init = jnp.exp(jax.random.uniform(ks[1], (D,), minval=math.log(1e-3), maxval=math.log(1e-1)))
    return {
        "x": jax.random.normal(ks[0], (B, T, D), jnp.float32).astype(dtype),
        "dt": (0.5 * jax.random.normal(ks[2], (B, T, D), jnp.float32)).astype(dtype),
        "A": -jnp.broadcast_to(jnp.arange(1, N + 1, dtype=jnp.float32), (D, N)),
        "B": jax.random.normal(ks[3], (B, T, N), jnp.float32).astype(dtype),
        "C": jax.random.normal(ks[4], (B, T, N), jnp.float32).astype(dtype),
        "D": jax.random.normal(ks[5], (D,), jnp.float32),
        "z": jax.random.normal(ks[6], (B, T, D), jnp.float32).astype(dtype),
        "dt_bias": dt_init + jnp.log(-jnp.expm1(-dt_init)),  # softplus^-1(dt_init)
    }


def mamba_call(backend: str, extra: dict, cu_seqlens: jax.Array | None = None) -> Callable:
    from linearnexus.kernels.mamba.api import selective_scan

    def run(args: dict, h0: jax.Array | None, final: bool):
        return selective_scan(args["x"], args["dt"], args["A"], args["B"], args["C"], D=args["D"],
                              z=args["z"], dt_bias=args["dt_bias"], dt_softplus=True,
                              initial_state=h0, output_final_state=final, backend=backend,
                              cu_seqlens=cu_seqlens, **extra)
    return run


def check_mamba(dtype_name: str, case: str, key: jax.Array, shape: tuple[int, ...],
                cu: tuple[int, ...], ref_cache: dict) -> dict:
    """pallas vs naive for the selective scan: y, final state(s), every gradient; ``case``
    "packed" runs B=1 with ``cu_seqlens`` ``cu`` (one initial / final state per sequence)."""
    B, T, D, N = shape
    cu_arr = None
    if case == "packed":
        B, cu_arr = 1, jnp.asarray(np.asarray(cu, np.int32))
    n_states = B if cu_arr is None else len(cu) - 1
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    k1, k2, k3, k4 = jax.random.split(key, 4)
    inputs = mamba_inputs(k1, B, T, D, N, dtype)
    h0 = 0.1 * jax.random.normal(k2, (n_states, D, N), jnp.float32)
    dy = jax.random.normal(k3, (B, T, D), jnp.float32)
    dht = jax.random.normal(k4, (n_states, D, N), jnp.float32)

    def make(backend: str, extra: dict) -> Callable:
        run = mamba_call(backend, extra, cu_arr)

        def loss(args, h0, dy, dht):
            y, ht = run(args, h0, True)
            return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(ht * dht), (y, ht)
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))

    if ("mamba", case) not in ref_cache:
        ref_cache[("mamba", case)] = make("naive", {})
    args32 = {n: a.astype(jnp.float32) for n, a in inputs.items()}
    with jax.default_matmul_precision("highest"):
        (ref_g, ref_h0), (ref_y, ref_ht) = ref_cache[("mamba", case)](args32, h0, dy, dht)
    (g, g_h0), (y, ht) = make("pallas", {"mode": "chunk"})(inputs, h0, dy, dht)
    errors = {"y": rel_err(y, ref_y), "ht": rel_err(ht, ref_ht)}
    for name in inputs:
        errors[f"d{name}"] = rel_err(g[name], ref_g[name])
    errors["dh0"] = rel_err(g_h0, ref_h0)
    grad_names = {f"d{n}" for n in inputs} | {"dh0"}
    ok, bad = judge(errors, grad_names, dtype_name)
    return {"status": "PASS" if ok else "FAIL", "errors": errors, "failed": bad}


def check_cu(T: int) -> tuple[int, ...]:
    """Packed offsets for a check at T tokens: CHECK_CU_GPU's three sequences scaled to T."""
    if T == CHECK_SHAPE_GPU[1]:
        return CHECK_CU_GPU
    return tuple(sorted({0, max(1, T // 10), max(1, T // 3), T}))


def run_checks(ops: list[str], quick: bool, chunk_size: int | None, do_mamba: bool,
               backends: tuple[str, ...] = ("pallas",),
               seqs: tuple[int, ...] | None = None,
               dims: tuple[int, ...] | None = None) -> list[dict]:
    """Every (op, backend, dtype, case, T, D) check; ``seqs`` / ``dims``: sequence lengths and
    head dims (default: the check shape's); the mamba checks run once (pallas)."""
    shape = CHECK_SHAPE_GPU if on_gpu() else CHECK_SHAPE_CPU
    cu = CHECK_CU_GPU if on_gpu() else CHECK_CU_CPU
    cases = [("float32", "dense"), ("bfloat16", "dense"), ("float32", "packed"), ("bfloat16", "packed")]
    if quick:
        cases = [("float32", "dense"), ("bfloat16", "packed")]
    rows = []
    ref_cache: dict = {}
    seed = 1000
    seqs, dims = seqs or (shape[1],), dims or (shape[3],)
    jobs: list[tuple[str, str, str, str, int, int]] = [
        (op, be, dt, case, T, D) for op in ops for be in backends for D in dims for T in seqs
        for dt, case in cases]
    if do_mamba:
        jobs += [("selective_scan", "pallas", dt, case, shape[1], shape[3]) for dt, case in cases]
    for op, backend, dtype_name, case, T, D in jobs:
        seed += 1
        key = jax.random.PRNGKey(seed)
        label = f"{op:17s} {backend:6s} T={T:<5d} D={D:<3d} {dtype_name:8s} {case:6s}"
        start = time.perf_counter()
        try:
            if op == "selective_scan":
                mshape = MAMBA_CHECK_GPU if on_gpu() else MAMBA_CHECK_CPU
                row = check_mamba(dtype_name, case, key, mshape, cu, ref_cache)
                row["shape"] = [1 if case == "packed" else mshape[0], *mshape[1:]]
                if case == "packed":
                    row["cu_seqlens"] = list(cu)
            else:
                tshape = (shape[0], T, shape[2], D)
                tcu = cu if T == shape[1] else check_cu(T)
                row = check_linear(op, dtype_name, case, key, tshape, tcu, chunk_size, ref_cache,
                                   backend)
                row["shape"] = [1 if case == "packed" else tshape[0], *tshape[1:]]
                if case == "packed":
                    row["cu_seqlens"] = list(tcu)
        except Exception as e:  # noqa: BLE001 - one failure must not end the run
            if not_implemented(e):
                row = {"status": "not implemented", "error": short_error(e)}
            else:
                row = {"status": "ERROR", "error": short_error(e)}
                traceback.print_exc(limit=3)
        row.update(op=op, backend=backend, dtype=dtype_name, case=case,
                   seconds=round(time.perf_counter() - start, 1))
        rows.append(row)
        if "errors" in row:
            worst = max(row["errors"].items(), key=lambda kv: -1 if kv[1] != kv[1] else kv[1])
            errs = " ".join(f"{n}={e:.1e}" for n, e in row["errors"].items())
            log(f"{row['status']:4s} {label} worst {worst[0]}={worst[1]:.2e}  [{errs}]"
                + (f"  over threshold: {row['failed']}" if row["failed"] else ""))
        else:
            log(f"{row['status']} {label} {row.get('error', '')[:200]}")
        gc.collect()
    return rows


# ---------------------------------------------------------------------------- timing

def time_ln(op: str, shape: tuple[int, ...], repeats: int, chunk_size: int | None,
            l2_bytes: int, backend: str = "pallas") -> dict[str, Any]:
    B, T, H, D = shape
    fn = ln_api(op)
    kw: dict[str, Any] = {"backend": backend, "mode": "chunk"}
    if chunk_size is not None:
        kw["chunk_size"] = chunk_size
    n_sets = input_sets(input_bytes(op, B, T, H, D, D), l2_bytes)
    sets = [tuple(jax_inputs(op, jax.random.PRNGKey(100 + i), B, T, H, D, D, jnp.bfloat16).values())
            for i in range(n_sets)]
    do = jax.random.normal(jax.random.PRNGKey(99), (B, T, H, D), jnp.float32).astype(jnp.bfloat16)
    fwd = jax.jit(lambda *a: fn(*a, **kw)[0])
    argnums = tuple(range(1, len(sets[0]) + 1))

    def loss(do, *a):  # the cotangent is an argument, not a constant baked into the program
        return jnp.sum(fn(*a, **kw)[0].astype(jnp.float32) * do.astype(jnp.float32))

    fwd_bwd = jax.jit(jax.grad(loss, argnums=argnums))
    out: dict[str, Any] = {}
    try:
        out["fwd"] = host_time(lambda i: fwd(*sets[i % n_sets]), jax_sync, repeats=repeats, n_sets=n_sets)
    except Exception as e:  # noqa: BLE001
        out["fwd_error"] = short_error(e)
        out["status"] = "not implemented" if not_implemented(e) else "ERROR"
        if not not_implemented(e):
            traceback.print_exc(limit=3)
        return out
    try:
        out["fwd_bwd"] = host_time(lambda i: fwd_bwd(do, *sets[i % n_sets]), jax_sync, repeats=repeats,
                                   n_sets=n_sets)
    except Exception as e:  # noqa: BLE001
        out["fwd_bwd_error"] = short_error(e)
        traceback.print_exc(limit=3)
    out["status"] = "ok"
    return out


def time_fla(torch: Any, triton_testing: Any, op: str, shape: tuple[int, ...], repeats: int,
             l2_bytes: int) -> dict[str, Any]:
    B, T, H, D = shape
    fn = fla_api(op)
    n_sets = input_sets(input_bytes(op, B, T, H, D, D), l2_bytes)
    out: dict[str, Any] = {"status": "ok"}
    sync = lambda o: torch.cuda.synchronize()  # noqa: E731
    try:
        sets = [torch_inputs(torch, op, 100 + i, B, T, H, D, D, requires_grad=False) for i in range(n_sets)]

        def fwd(i):
            return fn(**sets[i % n_sets])[0]

        with torch.no_grad():
            out["fwd"] = host_time(fwd, sync, repeats=repeats, n_sets=n_sets)
            out["fwd"]["do_bench_ms"] = triton_testing.do_bench(lambda: fwd(0), return_mode="median")
        sets = None
        sets = [torch_inputs(torch, op, 100 + i, B, T, H, D, D, requires_grad=True) for i in range(n_sets)]
        do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)

        def fwd_bwd(i):
            inputs = sets[i % n_sets]
            o = fn(**inputs)[0]
            return torch.autograd.grad(o, tuple(inputs.values()), do)

        out["fwd_bwd"] = host_time(fwd_bwd, sync, repeats=repeats, n_sets=n_sets)
        out["fwd_bwd"]["do_bench_ms"] = triton_testing.do_bench(lambda: fwd_bwd(0), return_mode="median")
    except Exception as e:  # noqa: BLE001
        out["status"] = "ERROR"
        out["error"] = short_error(e)
        traceback.print_exc(limit=3)
    return out


def efficiency(entry: dict[str, Any], fl: tuple[float, float], by: tuple[int, int],
               ceil: dict[str, Any]) -> None:
    """Add %HBM and %MMA for fwd and fwd_bwd to a timing entry (in place)."""
    for i, part in enumerate(("fwd", "fwd_bwd")):
        t = entry.get(part)
        if not t:
            continue
        s = t["ms"] * 1e-3
        t["tflops"] = fl[i] / s / 1e12
        t["gbps"] = by[i] / s / 1e9
        if ceil.get("hbm_gbps"):
            t["pct_hbm"] = 100 * t["gbps"] / ceil["hbm_gbps"]
        if ceil.get("bf16_tflops"):
            t["pct_mma"] = 100 * t["tflops"] / ceil["bf16_tflops"]


def time_mamba(shape: tuple[int, ...], repeats: int, l2_bytes: int, ceil: dict) -> dict[str, Any]:
    B, T, D, N = shape
    floor = mamba_floor(B, T, D, N)
    floor_src = "benchmarks/kernels_gpu.py: mamba_floor (x, dt, z, B, C read, y written)"
    try:
        from linearnexus.kernels.mamba import pallas as mamba_pallas

        if hasattr(mamba_pallas, "memory_floor_bytes"):
            try:  # timed without initial / final state
                fwd_floor = mamba_pallas.memory_floor_bytes(B, T, D, N, jnp.bfloat16,
                                                            with_initial_state=False)
            except TypeError:
                fwd_floor = mamba_pallas.memory_floor_bytes(B, T, D, N, jnp.bfloat16)
            floor = (int(fwd_floor), floor[1])
            floor_src = ("fwd: linearnexus.kernels.mamba.pallas.memory_floor_bytes(with_initial_state="
                         "False); fwd+bwd: kernels_gpu.mamba_floor")
    except Exception:  # noqa: BLE001 - the module may not exist yet
        pass
    res: dict[str, Any] = {"shape": list(shape), "floor_bytes": list(floor), "floor_source": floor_src}
    bw = ceil.get("hbm_gbps")
    if bw:
        res["floor_ms"] = [1e3 * b / (bw * 1e9) for b in floor]
    big = B * T * D * 2
    n_sets = input_sets(3 * big, l2_bytes)
    sets = [mamba_inputs(jax.random.PRNGKey(200 + i), B, T, D, N, jnp.bfloat16) for i in range(n_sets)]
    dy = jax.random.normal(jax.random.PRNGKey(7), (B, T, D), jnp.float32).astype(jnp.bfloat16)
    for backend in ("pallas", "jax"):
        run = mamba_call(backend, {"mode": "chunk"})
        fwd = jax.jit(lambda a, run=run: run(a, None, False)[0])
        fwd_bwd = jax.jit(jax.grad(lambda a, dy, run=run: jnp.sum(run(a, None, False)[0].astype(jnp.float32)
                                                                   * dy.astype(jnp.float32))))
        entry: dict[str, Any] = {}
        calls = (("fwd", lambda i, f=fwd: f(sets[i % n_sets])),
                 ("fwd_bwd", lambda i, f=fwd_bwd: f(sets[i % n_sets], dy)))
        for part, call in calls:
            try:
                entry[part] = host_time(call, jax_sync, repeats=repeats, n_sets=n_sets)
                if bw:
                    floor_ms = res["floor_ms"][0 if part == "fwd" else 1]
                    entry[part]["floor_over_time"] = floor_ms / entry[part]["ms"]
            except Exception as e:  # noqa: BLE001
                entry[f"{part}_error"] = short_error(e)
                entry["status"] = "not implemented" if not_implemented(e) else "ERROR"
                if not not_implemented(e):
                    traceback.print_exc(limit=3)
                break
        entry.setdefault("status", "ok")
        res[backend] = entry
        log(f"  selective_scan {backend:6s} " + " ".join(
            f"{p} {entry[p]['ms']:.3f} ms" for p in ("fwd", "fwd_bwd") if p in entry)
            + (f" {entry['status']}" if entry["status"] != "ok" else ""))
        gc.collect()
    return res


# --------------------------------------------------------------------------- reporting

def fmt_ms(entry: dict | None, part: str) -> str:
    if not entry:
        return "-"
    if part in entry:  # (* : host-bound, the host's dispatch not the kernels: host_time)
        return f"{entry[part]['ms']:.3f}" + ("*" if entry[part].get("host_bound") else "")
    status = entry.get("status", "-")
    if status == "not implemented":
        return "n/i"
    if status in ("skipped", "not run"):
        return status
    if entry.get(f"{part}_error") or entry.get("error") or status == "ERROR":
        return "err"
    return "-"


def ratio(ln: dict | None, fla: dict | None, part: str) -> str:
    if ln and fla and part in ln and part in fla:
        return f"{ln[part]['ms'] / fla[part]['ms']:.2f}"
    return "-"


def pct(entry: dict | None, key: str) -> str:
    if not entry:
        return "-"
    vals = [entry[p].get(key) for p in ("fwd", "fwd_bwd") if p in entry]
    if not vals or any(v is None for v in vals):
        return "-"
    return " / ".join(f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in vals)


def markdown(results: dict[str, Any]) -> str:
    env, ceil = results["env"], results.get("ceilings") or {}
    lines = ["# LinearNexus Pallas kernels vs FLA (GPU)", "",
             f"- Date: {env['date_utc']}; GPU: {env['gpu']}"
             + (f" (capability {env['capability']})" if env.get("capability") else ""),
             f"- JAX {env['jax']}, jaxlib {env['jaxlib']}, Triton {env['triton']}, PyTorch {env['torch']}, "
             f"FLA {env['fla_core']} (fla-core) / {env['flash_linear_attention']}; "
             f"LinearNexus {(env.get('linearnexus_commit') or '?')[:10]}"]
    if ceil:
        lines.append(f"- Ceilings (do_bench median): HBM {ceil['hbm_gbps']:.0f} GB/s "
                     f"({ceil['hbm_copy_bytes'] / 2 ** 30:.0f} GiB copy, read + write); bf16 matmul "
                     f"{ceil['bf16_tflops']:.0f} TFLOP/s ({ceil['matmul_n']}^3)")
    else:
        lines.append("- Ceilings: not measured (no torch / CUDA)")
    lines.append(f"- Timing: {results['method']}")
    if results.get("merged_from"):
        lines.append(f"- Rows not measured in this run come from {results['merged_from']['path']} "
                     f"({results['merged_from']['date_utc']})")
    lines.append("")
    checks = results.get("checks") or []
    if checks:
        lines += ["## Correctness (LinearNexus backends vs naive per-step reference)", "",
                  "Thresholds ||a-b||/||b||: bf16 outputs/states <= 5e-3, gradients <= 1e-2; "
                  "float32 1e-4 / 1e-3.", "",
                  "| op | backend | dtype | case | shape | result | worst (tensor = err) |",
                  "|---|---|---|---|---|---|---|"]
        for c in checks:
            if "errors" in c:
                worst = max(c["errors"].items(), key=lambda kv: float("inf") if kv[1] != kv[1] else kv[1])
                detail = f"{worst[0]} = {worst[1]:.1e}" + (f"; over: {c['failed']}" if c["failed"] else "")
            else:
                detail = c.get("error", "")[:120].replace("|", "/")
            shape = "x".join(map(str, c.get("shape", [])))
            if c.get("cu_seqlens"):
                shape += f" cu={c['cu_seqlens']}"
            lines.append(f"| {c['op']} | {c.get('backend', 'pallas')} | {c['dtype']} | {c['case']} | "
                         f"{shape} | {c['status']} | {detail} |")
        lines.append("")
    lines += ["## Speed (bf16, K = V = D; ms, median)", "",
              "ratio = LinearNexus time / FLA time (< 1: LinearNexus faster). %HBM / %MMA: "
              "fwd / fwd+bwd share of the measured ceilings (bytes that must move, FLOPs of the "
              "chunked algorithm; formulas in benchmarks/kernels_gpu.py). A * after a time: "
              "host-bound (the host's dispatch of a call took >= 80% of it: host_time).", ""]
    for op, rows in results["timing"].items():
        # backends after the first of --backends (which fills the LN columns) get columns of
        # their own: their times, ratios to FLA and shares
        extras = [b for b in ("mosaic", "pallas") if any(r.get(b) for r in rows)]
        head = ("| shape (B, T, H, D) | LN fwd ms | FLA fwd ms | ratio | LN fwd+bwd ms | FLA fwd+bwd ms "
                "| ratio | LN %HBM | LN %MMA | FLA %HBM | FLA %MMA |")
        for b in extras:
            head += f" {b} fwd ms | ratio | {b} fwd+bwd ms | ratio | {b} %HBM | {b} %MMA |"
        lines += [f"### {op}", "", head, "|---" * (head.count("|") - 1) + "|"]
        forced = results.get("fla_triton_flag_forced") and op in FLAG_OPS
        by_shape = {tuple(r["shape"]): r for r in rows}
        if set(by_shape) <= set(SHAPES):  # a GPU run: every shape of the issue, "not run" if absent
            rows = [by_shape.get(shape, {"shape": list(shape), "ln": {"status": "not run"}})
                    for shape in SHAPES]
        for row in rows:
            ln, fla = row.get("ln"), row.get("fla")
            fla_fb = fmt_ms(fla, "fwd_bwd") + (" †" if forced and fla and "fwd_bwd" in fla else "")
            cells = [str(tuple(row["shape"])), fmt_ms(ln, "fwd"), fmt_ms(fla, "fwd"), ratio(ln, fla, "fwd"),
                     fmt_ms(ln, "fwd_bwd"), fla_fb, ratio(ln, fla, "fwd_bwd"),
                     pct(ln, "pct_hbm"), pct(ln, "pct_mma"), pct(fla, "pct_hbm"), pct(fla, "pct_mma")]
            for b in extras:
                ex = row.get(b)
                cells += [fmt_ms(ex, "fwd"), ratio(ex, fla, "fwd"), fmt_ms(ex, "fwd_bwd"),
                          ratio(ex, fla, "fwd_bwd"), pct(ex, "pct_hbm"), pct(ex, "pct_mma")]
            lines.append("| " + " | ".join(cells) + " |")
        errs = []
        for row in rows:
            for who in ("ln", *extras, "fla"):
                e = row.get(who) or {}
                text = e.get("error") or e.get("fwd_error") or e.get("fwd_bwd_error")
                if text:
                    errs.append((row["shape"], who, text))
        if forced:
            triton_v = results["env"].get("triton")
            lines += ["", f"† FLA 0.6.0 refuses this backward on Hopper with Triton {triton_v} (< 3.7.1: "
                      f"Triton miscompiles its gated chunk_bwd_dqkwg, FLA issue #640); timed with "
                      f"fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 forced True, for timing only (its "
                      f"gradients may be wrong)."]
        if errs:
            lines.append("")
            lines += [f"- {tuple(s)} {who}: {str(e)[:160]}" for s, who, e in errs]
        lines.append("")
    sc = results.get("selective_scan")
    if sc and "error" in sc:
        lines += ["## Mamba-1 selective scan", "", f"- {tuple(sc['shape'])}: ERROR {sc['error'][:200]}", ""]
    elif sc:
        B, T, D, N = sc["shape"]
        floor = sc.get("floor_ms")
        lines += ["## Mamba-1 selective scan", ""]
        for backend in ("pallas", "jax"):
            e = sc.get(backend) or {}
            parts = []
            for i, part in enumerate(("fwd", "fwd_bwd")):
                if part in e:
                    text = f"{part.replace('_', '+')} {e[part]['ms']:.3f} ms"
                    if floor:
                        text += f" (floor {floor[i]:.3f} ms, {100 * floor[i] / e[part]['ms']:.0f}% of it)"
                    parts.append(text)
            status = ""
            if e.get("status") != "ok":
                why = str(e.get("fwd_error") or e.get("fwd_bwd_error") or "")[:120]
                status = f" {e.get('status')}: {why}"
            lines.append(f"- B={B}, T={T}, d_inner={D}, d_state={N}, bf16, {backend}: "
                         + ("; ".join(parts) + status).strip())
        lines.append("- inputs: x, z, B, C and raw dt in bf16, dt_bias + dt_softplus=True (pallas: applied "
                     "in float32 inside the kernels; jax: by the api in a float32 pass before the scan), "
                     "D, A float32; no initial / final state; fwd+bwd = gradient w.r.t. all of them")
        fb = sc["floor_bytes"]
        lines += [f"- floor = bytes that must move / measured HBM bandwidth ({sc['floor_source']}); "
                  f"bytes {fb[0] / 1e6:.0f} MB fwd, {fb[1] / 1e6:.0f} MB fwd+bwd", ""]
    notes = results.get("notes") or []
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def save(results: dict[str, Any], name: str, out_dir: str | None) -> None:
    text = json.dumps(results, indent=2, default=str)
    md = markdown(results)
    for folder in [RESULTS_DIR] + ([Path(out_dir)] if out_dir else []):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for suffix, body in ((".json", text), (".md", md)):
                path = folder / f"{name}{suffix}"
                tmp = path.with_suffix(suffix + ".tmp")
                tmp.write_text(body)
                os.replace(tmp, path)
        except OSError as e:
            log(f"could not write results to {folder}: {e}")


DOCS_BEGIN = "<!-- kernels-gpu-table:begin (written by benchmarks/kernels_gpu.py --docs) -->"
DOCS_END = "<!-- kernels-gpu-table:end -->"


def write_docs(results: dict[str, Any], path: str) -> None:
    """Put the run's table into ``path`` between the DOCS_BEGIN / DOCS_END markers (headings one
    level down, the title dropped), leaving the rest of the file as it is."""
    doc = Path(path)
    text = doc.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise ValueError(f"--docs: {path} has no {DOCS_BEGIN!r} ... {DOCS_END!r} markers")
    body = []
    for line in markdown(results).splitlines()[1:]:  # drop the "# ..." title
        body.append("#" + line if line.startswith("#") else line)
    head, rest = text.split(DOCS_BEGIN, 1)
    tail = rest.split(DOCS_END, 1)[1]
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(head + DOCS_BEGIN + "\n" + "\n".join(body).strip() + "\n" + DOCS_END + tail)
    os.replace(tmp, doc)


# -------------------------------------------------------------------------------- main

def merge_previous(results: dict[str, Any], path: str) -> None:
    """Start from an earlier results JSON (a split run): its checks, timing rows, ceilings and
    selective scan stay unless this run measures them again."""
    prev = json.loads(Path(path).read_text())
    results["checks"] = list(prev.get("checks") or [])
    results["timing"] = {op: list(rows) for op, rows in (prev.get("timing") or {}).items()}
    results["ceilings"] = prev.get("ceilings")
    if prev.get("selective_scan"):
        results["selective_scan"] = prev["selective_scan"]
    results["notes"] = [n for n in prev.get("notes") or [] if n not in results["notes"]] + results["notes"]
    results["fla_triton_flag_forced"] = bool(prev.get("fla_triton_flag_forced"))
    results["merged_from"] = {"path": path, "date_utc": (prev.get("env") or {}).get("date_utc")}


def put_check(results: dict[str, Any], row: dict[str, Any]) -> None:
    def key(c: dict[str, Any]) -> tuple:
        return (c["op"], c.get("backend", "pallas"), c["dtype"], c["case"], tuple(c.get("shape", ())))

    results["checks"] = [c for c in results["checks"] if key(c) != key(row)] + [row]


def _measured(row: dict[str, Any] | None) -> bool:
    return bool(row) and "fwd" in (row.get("ln") or {})


def put_timing(results: dict[str, Any], op: str, row: dict[str, Any]) -> None:
    old = [r for r in results["timing"].get(op, []) if r["shape"] == row["shape"]]
    if old and _measured(old[0]) and not _measured(row) and row.get("ln", {}).get("status") == "skipped":
        return  # a cell skipped for time keeps what an earlier (merged) run measured
    rows = [r for r in results["timing"].get(op, []) if r["shape"] != row["shape"]] + [row]
    results["timing"][op] = sorted(rows, key=lambda r: SHAPES.index(tuple(r["shape"]))
                                   if tuple(r["shape"]) in SHAPES else -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--shapes", nargs="+", type=int, default=None,
                        help=f"indices into {SHAPES}")
    parser.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    parser.add_argument("--skip-fla", action="store_true")
    parser.add_argument("--skip-ln", action="store_true",
                        help="time FLA only (e.g. to fill Triton's compile and autotune caches first)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-mamba", action="store_true")
    parser.add_argument("--skip-ceilings", action="store_true",
                        help="do not measure HBM / matmul ceilings (no %%HBM / %%MMA columns)")
    parser.add_argument("--backends", nargs="+", default=["pallas"], choices=("pallas", "mosaic"),
                        help="LinearNexus backends to check and time (the first one fills the LN "
                             "columns; mosaic adds its own columns)")
    parser.add_argument("--check-backends", nargs="+", default=None,
                        choices=("pallas", "mosaic", "auto"),
                        help="backends of the correctness checks (default: --backends); auto: "
                             "backend=None, the dispatcher's own choice")
    parser.add_argument("--check-seqs", nargs="+", type=int, default=None,
                        help="sequence lengths of the correctness checks (default: 1000 on the GPU)")
    parser.add_argument("--check-dims", nargs="+", type=int, default=None,
                        help="head dims (K = V) of the correctness checks (default: 64 on the GPU)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="LinearNexus chunk size (default: each op's own); FLA keeps 64")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget", type=float, default=560.0,
                        help="seconds; timing cells not started by then are marked skipped (0: none)")
    parser.add_argument("--merge", default=None,
                        help="an earlier results JSON to extend (split runs); rows measured now replace its")
    parser.add_argument("--jax-cache", default="/tmp/jax_cache_kernels_gpu",
                        help="JAX persistent compilation cache on the GPU ('' to disable); reruns on a "
                             "warm machine then skip most compiles (FLA keeps Triton's autotune cache)")
    parser.add_argument("--out", default=None, help="also write the results into this folder")
    parser.add_argument("--name", default="kernels_gpu", help="results file stem")
    parser.add_argument("--docs", default=None,
                        help="also write the table into this markdown file, between its "
                             "kernels-gpu-table markers (docs/benchmarks.md)")
    parser.add_argument("--digest", action="store_true",
                        help="print the library's source digest (the JSON's linearnexus_source: "
                             "match a result to a commit) and exit")
    args = parser.parse_args()
    if args.digest:
        print(source_digest())
        return
    if args.docs:  # fail now, not after half an hour of timing
        doc_text = Path(args.docs).read_text() if Path(args.docs).is_file() else ""
        if DOCS_BEGIN not in doc_text or DOCS_END not in doc_text:
            parser.error(f"--docs: expected a markdown file with the {DOCS_BEGIN!r} and {DOCS_END!r} "
                         f"markers, got {args.docs!r}")
    t_start = time.perf_counter()
    deadline = t_start + args.budget if args.budget > 0 else float("inf")
    gpu = on_gpu()
    repeats = args.repeats or (3 if args.quick else 9)
    if gpu and args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)

    torch = triton_testing = None
    if gpu:  # torch measures the ceilings even with --skip-fla
        try:
            import torch  # noqa: F811
            if not torch.cuda.is_available():
                torch = None
            else:
                import triton.testing as triton_testing  # noqa: F811
        except ImportError as e:
            log(f"torch / triton not importable ({e}): no ceilings, no FLA")
            torch = None
    env = environment(torch)
    log("environment: " + json.dumps(env, default=str))

    results: dict[str, Any] = {
        "env": env, "args": vars(args), "ceilings": None, "checks": [], "timing": {},
        "method": (f"host clock around n back-to-back calls between device synchronisations "
                   f"(one measurement >= {TARGET_S * 1e3:.0f} ms), /n, median of {repeats}; inputs "
                   f"rotated over copies when < 3x L2; same for LinearNexus (jax.jit) and FLA (torch); "
                   f"FLA also do_bench median in the JSON"),
        "notes": [], "fla_triton_flag_forced": False,
        "thresholds": {"bfloat16": {"outputs": 5e-3, "grads": 1e-2},
                       "float32": {"outputs": 1e-4, "grads": 1e-3}},
    }
    if args.merge:
        merge_previous(results, args.merge)
    l2_bytes = int((env.get("l2_cache_mib") or 50) * 2 ** 20)

    use_fla = False
    if torch is not None and not args.skip_fla:
        try:
            importlib.import_module("fla.ops.common.chunk_o")
            use_fla = True
        except Exception as e:  # noqa: BLE001
            results["notes"].append(f"FLA not importable: {short_error(e)}")
            log(f"FLA not importable: {short_error(e)}")
    if use_fla:
        if unlock_fla_gated_backward(env):
            results["fla_triton_flag_forced"] = True
            note = (f"FLA 0.6.0 refuses the gated backward (chunk_bwd_dqkwg) of simple_gla and "
                    f"gated_delta_rule on Hopper with Triton < 3.7.1 (here {env.get('triton')}): Triton "
                    f"3.4-3.7.0 miscompiles it (FLA issue #640, wrong gradients). For timing only we set "
                    f"fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True, so FLA's fwd+bwd times for those "
                    f"two ops are of a kernel whose gradients may be wrong.")
            if note not in results["notes"]:
                results["notes"].append(note)
            log("NOTE: " + note)
    if args.chunk_size is not None:
        results["notes"].append(f"LinearNexus chunk size {args.chunk_size} (--chunk-size); "
                                f"FLA uses its default 64")

    if torch is not None and not args.skip_ceilings:
        try:
            log("measuring ceilings ...")
            results["ceilings"] = measure_ceilings(torch, triton_testing, args.quick)
            log(f"ceilings: {results['ceilings']}")
        except Exception as e:  # noqa: BLE001
            results["notes"].append(f"ceilings failed: {short_error(e)}")
            traceback.print_exc(limit=3)
    ceil = results["ceilings"] or {}

    if not args.skip_check:
        log(f"correctness: {', '.join(args.backends)} vs naive ...")
        for row in run_checks(args.ops, args.quick, args.chunk_size, not args.skip_mamba,
                              tuple(args.check_backends or args.backends),
                              tuple(args.check_seqs or ()) or None,
                              tuple(args.check_dims or ()) or None):
            put_check(results, row)
        save(results, args.name, args.out)
        log(f"checks done at {time.perf_counter() - t_start:.0f} s")

    if not args.skip_mamba and time.perf_counter() > deadline:
        results["notes"].append(f"selective scan timing skipped: time budget ({args.budget:.0f} s) spent")
    elif not args.skip_mamba:
        mshape = (MAMBA_SHAPE_QUICK if args.quick else MAMBA_SHAPE_GPU) if gpu else MAMBA_SHAPE_CPU
        log(f"timing selective_scan {mshape} ...")
        try:
            results["selective_scan"] = time_mamba(mshape, repeats, l2_bytes, ceil)
        except Exception as e:  # noqa: BLE001
            results["selective_scan"] = {"shape": list(mshape), "error": short_error(e)}
            traceback.print_exc(limit=3)
        gc.collect()
        save(results, args.name, args.out)

    if not gpu:
        shapes = [CPU_SHAPE]
    elif args.shapes is not None:
        shapes = [SHAPES[i] for i in args.shapes]
    elif args.quick:
        shapes = [SHAPES[QUICK_SHAPE_GPU]]
    else:
        shapes = SHAPES
    for op in args.ops:
        chunk = args.chunk_size or getattr(importlib.import_module(f"linearnexus.kernels.{op}.api"),
                                           "DEFAULT_CHUNK_SIZE", 64)
        for shape in shapes:
            B, T, H, D = shape
            row: dict[str, Any] = {
                "shape": list(shape), "bytes": bytes_moved(op, B, T, H, D, D),
                "flops": {"ln": flops(op, B, T, H, D, D, chunk), "fla": flops(op, B, T, H, D, D, FLA_CHUNK)}}
            if time.perf_counter() > deadline:
                row["ln"] = {"status": "skipped", "error": f"time budget ({args.budget:.0f} s) spent"}
                put_timing(results, op, row)
                log(f"  {op} {shape}: skipped (time budget)")
                continue
            log(f"timing {op} {shape} ... ({time.perf_counter() - t_start:.0f} s)")
            if args.skip_ln:
                row["ln"] = {"status": "skipped", "error": "--skip-ln"}
            else:
                for i, backend in enumerate(args.backends):
                    slot = "ln" if i == 0 else backend  # the first backend fills the LN columns
                    try:
                        row[slot] = time_ln(op, shape, repeats, args.chunk_size, l2_bytes, backend)
                        row[slot]["backend"] = backend
                        efficiency(row[slot], row["flops"]["ln"], row["bytes"], ceil)
                    except Exception as e:  # noqa: BLE001
                        row[slot] = {"status": "ERROR", "error": short_error(e), "backend": backend}
                        traceback.print_exc(limit=3)
                    gc.collect()
            if use_fla:
                row["fla"] = time_fla(torch, triton_testing, op, shape, repeats, l2_bytes)
                efficiency(row["fla"], row["flops"]["fla"], row["bytes"], ceil)
                gc.collect()
                torch.cuda.empty_cache()
            put_timing(results, op, row)
            ln, fla = row.get("ln"), row.get("fla")
            if row.get("mosaic"):
                mo = row["mosaic"]
                log(f"  {op} {shape}: mosaic fwd {fmt_ms(mo, 'fwd')} fwd+bwd {fmt_ms(mo, 'fwd_bwd')}"
                    f" %HBM {pct(mo, 'pct_hbm')} %MMA {pct(mo, 'pct_mma')}"
                    + (f" | {str(mo.get('error') or mo.get('fwd_error') or '')[:300]}"
                       if mo.get("status") != "ok" else ""))
            log(f"  {op} {shape}: LN fwd {fmt_ms(ln, 'fwd')} fwd+bwd {fmt_ms(ln, 'fwd_bwd')} | "
                f"FLA fwd {fmt_ms(fla, 'fwd')} fwd+bwd {fmt_ms(fla, 'fwd_bwd')} ms"
                + (f" | LN: {ln.get('status')} {str(ln.get('error') or ln.get('fwd_error') or '')[:160]}"
                   if ln and ln.get("status") != "ok" else ""))
            save(results, args.name, args.out)

    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    save(results, args.name, args.out)
    if args.docs:
        write_docs(results, args.docs)
        log(f"wrote the table into {args.docs}")
    log("")
    log(markdown(results))
    log(f"total {results['total_seconds']} s; wrote {RESULTS_DIR / args.name}.json/.md"
        + (f" and {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
