"""What bounds the Mamba-1 selective scan's forward on this GPU, measured.

    python benchmarks/scan_bound.py [--shape B T C N] [--kernel-ms MS] [--out DIR]

Issue 5 asks the selective scan (B=8, T=4096, d_inner=2048, d_state=16, bf16, the step size
``softplus(dt + dt_bias)`` and the gate ``silu(z)`` as the Mamba block uses them) to reach half
of its memory floor's speed, i.e. a forward in at most twice ``bytes that must move / HBM
bandwidth``. This script measures the three rates that bound the forward and the fastest
forward they allow, whatever the kernel:

* the special-function unit (MUFU) rate: a Pallas-Triton kernel whose every thread runs 64
  independent chains of ``x = ex2.approx(c x)``;
* the FMA-pipe rate: the same kernel with ``x = fma(x, c, d)`` (the FMA pipe takes one warp
  instruction per cycle per scheduler, the issue limit);
* HBM bandwidth: by default the ceiling ``benchmarks/kernels_gpu.py`` measured (a device copy
  with torch, ``benchmarks/results/kernels_gpu.json``), so the floor is the benchmark table's;
  else ``--hbm-gbps``, else an XLA elementwise pass here (slower than the copy: a lower
  bandwidth, a looser target).

The bound is computed twice: with the datasheet rates at ``--clock-ghz`` (16 MUFU and 128 FMA
lane operations per clock per SM on compute capability 9.0), and with the measured ones.

**The work model.** Per state update ``(t, c, n)`` (``E = B T C N`` of them): one ``exp2`` for the
decay ``exp(dt A)`` (it differs per channel and state, so nothing is shared) and four FMA-pipe
instructions (``dt * A log2 e``, ``(dt x) * B``, the state's fma, ``C h``'s fma). Per token and
channel, shared by its ``N`` states: four MUFU instructions (the softplus's ``ex2`` and ``lg2``,
the sigmoid's ``ex2`` and ``rcp``) and ``PER_TOKEN_OTHER = 15`` others (unpacking ``x, dt, z``,
the bias add, the softplus's five, ``dt x``, ``D x + y``, the gate's four, packing ``y``). Loads,
stores, addresses and the cross-lane sums of ``C h`` are left out, so the model undercounts.

**The bound.** With ``m`` MUFU and ``s`` other instructions per update, the MUFU pipe needs
``E m / R_mufu`` seconds and issue ``E (s + m) / R_issue``. A software ``exp2`` on the FMA pipe
(Cody-Waite split and a degree-5 polynomial: ``SOFT_EXP2_INSTR = 9`` instructions, for float32
accuracy) moves work from the first to the second; the best split balances them. The result
assumes every cycle issues an instruction and the MUFU pipe never idles, which no kernel
reaches, so a real forward is slower than the bound. It is also given for a step size
handed to the kernel (no softplus inside: two MUFU and five other instructions fewer per
token and channel), which is not the benchmark's workload.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearnexus.kernels.common.pallas import compiler_params  # noqa: E402
from linearnexus.kernels.common.pallas_scan import exp2_approx, fma  # noqa: E402
from linearnexus.kernels.mamba.pallas import memory_floor_bytes  # noqa: E402

#: per token and channel: MUFU instructions (softplus ex2 + lg2, sigmoid ex2 + rcp)
PER_TOKEN_MUFU = 4
#: per token and channel: other instructions (a lower bound; see the module doc)
PER_TOKEN_OTHER = 15
#: the same with the step size given (no softplus in the kernel: no ex2 + lg2, five fewer)
PER_TOKEN_MUFU_STEP_GIVEN, PER_TOKEN_OTHER_STEP_GIVEN = 2, 10
#: per state update: FMA-pipe instructions besides the decay's exp2
PER_UPDATE_OTHER = 4
#: instructions of a float32-accurate exp2 on the FMA pipe (round, reduce, degree 5, scale)
SOFT_EXP2_INSTR = 9

_ROWS, _COLS, _WARPS = 64, 128, 4  # per program: 64 values per thread


_UNROLL = 8  # steps per loop iteration (the loop's own instructions stay under 1%)


def _chain_kernel(x_ref, o_ref, *, kind: str, iters: int):
    def body(_, x):
        for _ in range(_UNROLL):
            if kind == "ex2":
                x = exp2_approx(x * -0.9, interpret=False)  # stays in [0.5, 1]
            else:
                x = fma(x, jnp.full_like(x, 0.999), jnp.full_like(x, 1e-3))
        return x

    o_ref[...] = jax.lax.fori_loop(0, iters // _UNROLL, body, x_ref[...])


def _median_seconds(fn, arg, repeats: int) -> float:
    """Median wall time of ``fn(arg)`` to completion, after one warm-up (compile) call."""
    jax.block_until_ready(fn(arg))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_rate(kind: str, iters: int = 2048, repeats: int = 7) -> dict[str, float]:
    """Lane operations per second of ``kind`` ("ex2" or "fma") over the whole GPU."""
    from jax.experimental import pallas as pl

    sms = jax.devices()[0].core_count if hasattr(jax.devices()[0], "core_count") else 132
    programs = 16 * sms
    x = jnp.full((programs * _ROWS, _COLS), 0.7, jnp.float32)
    call = jax.jit(pl.pallas_call(
        functools.partial(_chain_kernel, kind=kind, iters=iters),
        grid=(programs,),
        in_specs=[pl.BlockSpec((_ROWS, _COLS), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((_ROWS, _COLS), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(x.shape, jnp.float32),
        compiler_params=compiler_params(_WARPS, 1),
        name=f"rate_{kind}"))
    seconds = _median_seconds(call, x, repeats)
    ops = programs * _ROWS * _COLS * (iters // _UNROLL * _UNROLL)
    return {"ops_per_s": ops / seconds, "seconds": seconds, "ops": ops, "sms": sms}


def measure_hbm(gib: float = 2.0, repeats: int = 9) -> float:
    """Bytes per second of an XLA elementwise pass (read + write) over ``gib`` GiB of bf16."""
    n = int(gib * 2**30) // 2
    x = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(lambda v: v + jnp.bfloat16(1))
    return 2 * n * 2 / _median_seconds(f, x, repeats)


def forward_bound(shape: tuple[int, int, int, int], r_mufu: float, r_issue: float,
                  soft_exp2: int = SOFT_EXP2_INSTR, step_given: bool = False) -> dict[str, float]:
    """Fastest forward (seconds) the MUFU and issue rates allow under the module doc's model.

    ``r_mufu`` / ``r_issue``: MUFU and FMA-pipe lane operations per second; ``step_given``:
    the kernel gets the step size itself (no softplus). Returns the time with every exp2 on
    the MUFU pipe, the time with the best share of them on the FMA pipe, that share, and the
    per-update instruction counts.
    """
    B, T, C, N = shape
    updates = B * T * C * N
    per_mufu, per_other = ((PER_TOKEN_MUFU_STEP_GIVEN, PER_TOKEN_OTHER_STEP_GIVEN) if step_given
                           else (PER_TOKEN_MUFU, PER_TOKEN_OTHER))
    m = 1 + per_mufu / N
    s = PER_UPDATE_OTHER + per_other / N

    def time_for(x: float) -> float:  # x MUFU ops per update moved to the FMA pipe
        mufu = updates * (m - x) / r_mufu
        issue = updates * (s + m + (soft_exp2 - 1) * x) / r_issue
        return max(mufu, issue)

    # both terms are linear in x: the optimum is where they cross (or an end point)
    cross = (m / r_mufu - (s + m) / r_issue) / (1 / r_mufu + (soft_exp2 - 1) / r_issue)
    best_x = min(max(cross, 0.0), m)
    return {"all_mufu_s": time_for(0.0), "best_s": time_for(best_x), "best_offload": best_x,
            "mufu_per_update": m, "other_per_update": s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=4, type=int, default=[8, 4096, 2048, 16],
                        help="B T C N (default: the benchmark's)")
    parser.add_argument("--kernel-ms", type=float, default=None,
                        help="a measured forward time to set beside the bound")
    parser.add_argument("--out", default=None, help="write scan_bound.json here")
    parser.add_argument("--hbm-gbps", type=float, default=None,
                        help="HBM bandwidth (default: kernels_gpu.json's ceiling, else measured)")
    parser.add_argument("--clock-ghz", type=float, default=1.98,
                        help="SM clock for the datasheet rates (the H200's boost clock)")
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit("scan_bound.py: needs an NVIDIA GPU (the rates are measured with Pallas-Triton "
                 "kernels)")
    shape = tuple(args.shape)
    dev = jax.devices()[0]
    ex2 = measure_rate("ex2")
    ffma = measure_rate("fma")
    hbm_xla = measure_hbm()
    hbm, hbm_src = hbm_xla, "XLA elementwise pass (this script)"
    table = Path(__file__).resolve().parent / "results" / "kernels_gpu.json"
    if args.hbm_gbps:
        hbm, hbm_src = args.hbm_gbps * 1e9, "--hbm-gbps"
    elif table.exists():
        gbps = json.loads(table.read_text()).get("ceilings", {}).get("hbm_gbps")
        if gbps:
            hbm, hbm_src = gbps * 1e9, f"{table.name} ceilings (torch device copy)"
    B, T, C, N = shape
    floor_bytes = memory_floor_bytes(B, T, C, N, jnp.bfloat16, with_initial_state=False)
    floor_s = floor_bytes / hbm
    sms = ex2["sms"]
    clock = args.clock_ghz * 1e9
    nominal = forward_bound(shape, 16 * sms * clock, 128 * sms * clock)
    bound = forward_bound(shape, ex2["ops_per_s"], ffma["ops_per_s"])
    given = forward_bound(shape, 16 * sms * clock, 128 * sms * clock, step_given=True)
    # how much the bound moves with a cheaper (less accurate) software exp2
    by_poly = {p: 1e3 * forward_bound(shape, 16 * sms * clock, 128 * sms * clock,
                                      soft_exp2=p)["best_s"] for p in (7, 8, 9)}
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": dev.device_kind, "jax": jax.__version__, "shape": list(shape),
        "hbm_gbps": hbm / 1e9, "hbm_source": hbm_src, "hbm_gbps_xla_pass": hbm_xla / 1e9,
        "ex2_per_s": ex2["ops_per_s"], "ffma_per_s": ffma["ops_per_s"], "sms": sms,
        "clock_ghz": args.clock_ghz,
        "ex2_per_sm_per_clock": ex2["ops_per_s"] / sms / clock,
        "ffma_per_sm_per_clock": ffma["ops_per_s"] / sms / clock,
        "floor_bytes": floor_bytes, "floor_ms": 1e3 * floor_s,
        "half_floor_target_ms": 2e3 * floor_s,
        "nominal_bound_all_mufu_ms": 1e3 * nominal["all_mufu_s"],
        "nominal_bound_best_ms": 1e3 * nominal["best_s"],
        "nominal_best_offload_per_update": nominal["best_offload"],
        "bound_all_mufu_ms": 1e3 * bound["all_mufu_s"], "bound_best_ms": 1e3 * bound["best_s"],
        "best_offload_per_update": bound["best_offload"],
        "mufu_per_update": bound["mufu_per_update"], "other_per_update": bound["other_per_update"],
        "soft_exp2_instr": SOFT_EXP2_INSTR, "kernel_ms": args.kernel_ms,
        "nominal_bound_best_ms_step_given": 1e3 * given["best_s"],
        "nominal_bound_best_ms_by_soft_exp2_instr": by_poly,
    }
    print(f"{res['gpu']}, JAX {res['jax']}, {res['date']}")
    print(f"measured: ex2 {res['ex2_per_s'] / 1e12:.2f} T/s ({res['ex2_per_sm_per_clock']:.1f} per SM "
          f"per clock at {args.clock_ghz} GHz; datasheet 16), fma {res['ffma_per_s'] / 1e12:.1f} T/s "
          f"({res['ffma_per_sm_per_clock']:.1f}; datasheet 128)")
    print(f"HBM {res['hbm_gbps']:.0f} GB/s ({hbm_src}; XLA pass here {hbm_xla / 1e9:.0f} GB/s)")
    print(f"shape {shape}: floor {floor_bytes / 1e6:.0f} MB = {res['floor_ms']:.3f} ms; half the "
          f"floor's speed = {res['half_floor_target_ms']:.3f} ms")
    print(f"model per update: {res['mufu_per_update']:.3f} MUFU + {res['other_per_update']:.3f} other")
    for name, key in (("datasheet rates", "nominal_"), ("measured rates", "")):
        best = res[f"{key}bound_best_ms"]
        print(f"bound ({name}): every exp2 on MUFU {res[f'{key}bound_all_mufu_ms']:.3f} ms; best "
              f"FMA-pipe share ({res[f'{key}best_offload_per_update']:.3f} per update) {best:.3f} ms "
              f"= {100 * res['floor_ms'] / best:.0f}% of the floor's speed")
    print("datasheet bound by the software exp2's length: " + ", ".join(
        f"{p} instructions {t:.3f} ms" for p, t in by_poly.items())
          + " (degree 3, 4, 5: ~1e-4 relative up to float32 accuracy)")
    print(f"with the step size given (no softplus in the kernel), datasheet rates: "
          f"{res['nominal_bound_best_ms_step_given']:.3f} ms")
    if args.kernel_ms:
        ratio = res["nominal_bound_best_ms"] / args.kernel_ms
        print(f"measured kernel {args.kernel_ms:.3f} ms = {100 * res['floor_ms'] / args.kernel_ms:.0f}% "
              f"of the floor's speed; the datasheet bound is {ratio:.2f}x its time")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scan_bound.json").write_text(json.dumps(res, indent=1))
        print(f"wrote {out / 'scan_bound.json'}")


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
