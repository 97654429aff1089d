"""Few-row matmuls (``[M, K] @ [K, N]``, M = 16 or 64) with cold weights: XLA against a bare
Pallas (Triton) kernel at several tilings (issue 23, batch 16-64 decoding).

    python3 benchmarks/skinny_gemm_gpu.py [--rows 16 64] [--json FILE]   # on the GPU, ~3 min
    python benchmarks/skinny_gemm_gpu.py --quick                         # CPU check (interpreter)

At batch 64 a decode step's projections are matmuls of 64 rows, and Nsight Compute put
Mamba2's ``in_proj`` (1024 -> 4256, 8.7 MB of bf16 weights, 2.9 us at 3 TB/s) at 9.1 us
for XLA's split-K GEMM plus 4.2 us for its sum (``docs/benchmarks.md``, "Batch 64: the
layer kernels' warps"). XLA's autotuner times its candidates with the weight in the 50 MB
L2 (it is called again and again on one buffer), while in a decode step every layer's
weights come from HBM, so the tiling it picks need not be the one that streams best. This
script times each projection
of the ~200M decode models as the decode loop meets it: ``C`` copies of the weight
(together over twice the L2) called in turn, one round of ``C`` calls an iteration of a
jitted ``fori_loop``, us per call = the iteration's time / ``C`` (its own cost, ~3 us for
the loop and the input's update, is spread over the calls alike for every form), median of
5 loops. (Two rounds an iteration would not do: XLA merges calls of the same input and
weight into one.)

Forms: ``xla`` (``x @ W`` in bf16, ``W [K, N]``, as ``nnx.Linear`` computes it), ``xla_t``
(the same over ``W^T [N, K]``, the decode weight table's layout), and ``pallas bnB bkK wW
sS kP`` (a bare Pallas kernel over ``W^T``: program ``(j, p)`` owns output columns
``[j B, (j + 1) B)`` and the ``p``-th of ``P`` slices of the contraction, reading
``[B, K_blk]`` weight tiles and ``[M, K_blk]`` input tiles on the tensor cores with ``W``
warps and ``S`` pipeline stages; ``P > 1`` writes float32 partial sums that XLA adds and
rounds, as XLA's split-K does). Each line: us per call, the weight's GB/s, and the relative
difference from ``xla``. Process-wide XLA flags (``XLA_FLAGS``) change the ``xla`` forms:
run the script once per flag set with ``--only xla``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import loop_time  # noqa: E402

from linearnexus.kernels.common.pallas import compiler_params, interpret_mode  # noqa: E402

BF16 = jnp.bfloat16
F32 = jnp.float32
#: (name, K, N): the ~200M decode models' projections (d_model 1024)
SHAPES = (("mamba2_in", 1024, 4256), ("mamba2_out", 2048, 1024), ("gdn_in", 1024, 6160),
          ("head", 1024, 8192))
#: (BN, BK, warps, stages, K slices)
TILINGS = ((32, 128, 4, 3, 1), (32, 128, 2, 3, 1), (32, 256, 4, 4, 1), (16, 256, 2, 4, 1),
           (64, 128, 4, 3, 1), (32, 128, 4, 3, 2), (64, 128, 4, 3, 4))
COLD_BYTES = 120e6  # the copies of one weight together: over twice the H100's 50 MB L2


def _kernel(x_ref, w_ref, o_ref, *, bn: int, bk: int, k_slice: int, depth: int,
            width: int) -> None:
    """``o[:, j B:(j + 1) B] (+)= x[:, slice p] @ W^T[j B:(j + 1) B, slice p]^T``."""
    from jax.experimental.pallas import triton as plt

    j, p = pl.program_id(0), pl.program_id(1)
    rows = x_ref.shape[0]
    cols = j * bn + jnp.arange(bn)  # [BN]
    k_first = p * k_slice

    def body(i, acc):
        k0 = pl.multiple_of(k_first + i * bk, bk)
        ks = k0 + jnp.arange(bk)  # [BK]
        xk = plt.load(x_ref.at[:, pl.ds(k0, bk)], mask=(ks < depth)[None, :], other=0.0)
        wk = plt.load(w_ref.at[pl.ds(j * bn, bn), pl.ds(k0, bk)],
                      mask=(cols < width)[:, None] & (ks < depth)[None, :], other=0.0)
        return acc + jax.lax.dot_general(xk, wk, (((1,), (1,)), ((), ())),
                                         preferred_element_type=F32)  # [M, BK] x [BN, BK] -> [M, BN]

    acc = jax.lax.fori_loop(0, k_slice // bk, body, jnp.zeros((rows, bn), F32))
    plt.store(o_ref.at[:, pl.ds(j * bn, bn)], acc.astype(o_ref.dtype),
              mask=(cols < width)[None, :])


def pallas_matmul(x: jax.Array, wt: jax.Array, *, bn: int, bk: int, warps: int, stages: int,
                  slices: int) -> jax.Array:
    """``x [M, K] @ wt[N, K]^T -> [M, N]`` bf16 (module docstring's ``pallas`` form)."""
    m, depth = x.shape
    width = wt.shape[0]
    k_slice = bk * math.ceil(depth / (bk * slices))
    out_dtype = BF16 if slices == 1 else F32
    kern = functools.partial(_kernel, bn=bn, bk=bk, k_slice=k_slice, depth=depth, width=width)
    out = pl.pallas_call(
        kern, grid=(pl.cdiv(width, bn), slices),
        out_shape=jax.ShapeDtypeStruct((m, width) if slices == 1 else (slices, m, width),
                                       out_dtype),
        **({} if slices == 1 else {"out_specs": pl.BlockSpec((None, m, width),
                                                             lambda j, p: (p, 0, 0))}),
        interpret=interpret_mode(),
        compiler_params=None if interpret_mode() else compiler_params(warps, stages),
        name="skinny_matmul")(x, wt)
    return out if slices == 1 else jnp.sum(out, axis=0).astype(BF16)  # [P, M, N] -> [M, N]


def _loop_time(call, x, weights, iters: int, repeats: int) -> float:
    """Seconds per iteration of ``iters`` iterations of one call on each of ``weights``;
    the outputs of one iteration are the carry (so none is dropped) and ``x`` moves with the
    iteration (so no call is hoisted out of the loop)."""

    def body(i, carry):
        xi = x + (i.astype(F32) * 1e-30).astype(x.dtype)
        return tuple(call(xi, w) for w in weights)

    return loop_time(body, tuple(call(x, w) for w in weights), iters=iters, repeats=repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    p.add_argument("--shapes", nargs="*", default=None, help="names from SHAPES")
    p.add_argument("--only", nargs="*", default=None, help="forms whose name starts so")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny sizes, interpret mode on the CPU")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes]
    tilings = TILINGS
    repeats = 5
    if args.quick:
        shapes, args.rows, tilings, args.iters, repeats = (
            [("tiny", 64, 96)], [16], ((32, 32, 4, 3, 1), (16, 32, 2, 3, 2)), 1, 1)
    print(json.dumps({"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                      "xla_flags": os.environ.get("XLA_FLAGS", "")}), flush=True)
    rows_out = []
    key = jax.random.key(0)
    for name, depth, width in shapes:
        nbytes = depth * width * 2
        copies = 2 if args.quick else max(2, math.ceil(COLD_BYTES / nbytes))
        w = [(jax.random.normal(jax.random.fold_in(key, i), (depth, width), F32)
              * depth ** -0.5).astype(BF16) for i in range(copies)]
        wt = [a.T.copy() for a in w]  # [N, K] each
        for m in args.rows:
            x = jax.random.normal(jax.random.fold_in(key, 10_000 + m), (m, depth), F32).astype(BF16)
            forms = {"xla": (lambda a, b: a @ b, w),
                     "xla_t": (lambda a, b: jax.lax.dot_general(
                         a, b, (((1,), (1,)), ((), ()))), wt)}  # [M, K] x [N, K] -> [M, N]
            for bn, bk, warps, stages, slices in tilings:
                forms[f"pallas bn{bn} bk{bk} w{warps} s{stages} k{slices}"] = (functools.partial(
                    lambda a, b, **kw: pallas_matmul(a, b, **kw), bn=bn, bk=bk, warps=warps,
                    stages=stages, slices=slices), wt)
            want = None
            for form, (call, ws) in forms.items():
                if args.only and not any(form.startswith(o) for o in args.only):
                    continue
                label = f"{name} M={m} {form}"
                try:
                    got = jax.jit(call)(x, ws[0]).astype(F32)
                    if want is None:
                        want = (x.astype(F32) @ w[0].astype(F32))
                    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
                    t0 = time.perf_counter()
                    us = _loop_time(call, x, ws, args.iters, repeats) / len(ws) * 1e6
                except Exception as e:  # noqa: BLE001 - one failing form must not lose the rest
                    print(f"{label:48s} {type(e).__name__}: {e}"[:400], flush=True)
                    continue
                print(f"{label:48s} {us:8.2f} us  {nbytes / max(us, 1e-9) / 1e3:6.0f} GB/s  "
                      f"rel err {err:.1e}  ({time.perf_counter() - t0:.0f} s)", flush=True)
                rows_out.append({"shape": name, "rows": m, "form": form, "us_per_call": us,
                                 "weight_bytes": nbytes, "rel_err_vs_f32": err})
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
