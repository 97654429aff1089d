"""A one-row matmul (batch-1 decoding) in one Pallas (Triton) kernel that reads the weights once.

XLA:GPU rewrites a matmul whose left side is one row (``[1, D] @ [D, N]``, every projection
of a batch-1 decode step) as an elementwise multiply and a reduce ("dot strength
reduction"): two kernels, the first writing a ``[D, N]`` product that the second reads back,
three times the weight bytes (``docs/benchmarks.md``, "Fused one-token layer kernels").
:func:`matvec` is one launch: program ``j`` owns ``BN`` output columns and walks the
contraction in ``BK``-row tiles of the weight, accumulating in float32; with ``glu`` it
owns the same columns of both halves ``[W_gate | W_up]`` and writes ``silu(gate) * up``
(SwiGLU's hidden activation), so the MLP's gate, up and activation are one kernel.

Prologue and epilogue options make a pre-norm layer's MLP half two kernels
(``modules.common.SwiGLU.residual_step``): ``rmsnorm(x + h)`` before gate | up, and the
residual sum ``(x + h) + out`` after down. Values are rounded to the output dtype where the
XLA path rounds them (the matmul's output, the bias sum, each step of ``silu(g) * u``, the
residual sums, the norm's output), so the two agree to the matmul's summation order.

Measured on the H200 (docs/benchmarks.md, 2026-12-04): it takes the GDN LM's loop body
from 11 to 7 kernels per layer but the batch-1 step from 0.69 to 1.30 ms. Each program
walks the contraction serially in ``BK``-row tiles (64 programs of ``D / BK`` dependent
loads for a ``D x 1024`` weight), so it is latency-bound where XLA's multiply spreads the
whole ``[D, N]`` product over the GPU; a split-K grid or wider tiles are the next step.
Off by default (``LINEARNEXUS_DECODE_GEMV=1`` turns it on).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas import compiler_params, interpret_mode, named_pallas_call

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Static:
    depth: int  # D
    width: int  # output columns (F with glu)
    block_k: int
    block_n: int
    half: int | None  # glu: column offset of W_up (F); None: a plain matmul
    out_dtype: jnp.dtype
    norm_eps: float | None  # an RMSNorm prologue with this epsilon, or None


def blocks(depth: int, width: int) -> tuple[int, int] | None:
    """``(BK, BN)`` for ``[1, depth] @ [depth, width]``: BK a power of two >= 16 dividing D
    (None when there is none), BN the widest of 64, 32, 16 that still gives 64 programs
    (the last block of columns may be partial: masked)."""
    bk = next((b for b in (128, 64, 32, 16) if depth % b == 0), None)
    if bk is None:
        return None
    return bk, next((b for b in (64, 32) if -(-width // b) >= 64), 16)


def _kernel(*, x_ref, add_ref, scale_ref, w_ref, bias_ref, res_ref, res_add_ref, y_ref,
            st: _Static):
    j = pl.program_id(0)
    columns = [j * st.block_n] + ([] if st.half is None else [st.half + j * st.block_n])
    valid = j * st.block_n + jnp.arange(st.block_n) < st.width  # the last block: partial

    def rnd(v):
        return v.astype(st.out_dtype).astype(F32)

    def row(k0):  # [BK] of the input row: x (+ add, rounded as the residual stream is)
        span = pl.ds(k0, st.block_k)
        xk = x_ref[0, span].astype(F32)
        return xk if add_ref is None else rnd(xk + add_ref[0, span].astype(F32))

    inv = None
    if st.norm_eps is not None:  # RMSNorm over the whole row first: it is one row, cheap
        squares = jax.lax.fori_loop(
            0, st.depth // st.block_k,
            lambda i, acc: acc + jnp.sum(jnp.square(row(pl.multiple_of(i * st.block_k,
                                                                       st.block_k)))),
            jnp.zeros((), F32))
        inv = jax.lax.rsqrt(squares / st.depth + st.norm_eps)

    def body(i, acc):
        k0 = pl.multiple_of(i * st.block_k, st.block_k)
        xk = row(k0)  # [BK]
        if inv is not None:
            xk = rnd(xk * inv * scale_ref[pl.ds(k0, st.block_k)].astype(F32))
        mask = jnp.broadcast_to(valid[None, :], (st.block_k, st.block_n))
        return tuple(a + jnp.sum(xk[:, None] * plt.load(
            w_ref.at[pl.ds(k0, st.block_k), pl.ds(c, st.block_n)], mask=mask,
            other=0.0).astype(F32), axis=0) for a, c in zip(acc, columns, strict=True))  # [BN]

    zeros = tuple(jnp.zeros((st.block_n,), F32) for _ in columns)
    acc = jax.lax.fori_loop(0, st.depth // st.block_k, body, zeros)
    outs = [rnd(a) for a in acc]  # the matmul's output, in the compute dtype
    if bias_ref is not None:
        outs = [rnd(o + plt.load(bias_ref.at[pl.ds(c, st.block_n)], mask=valid,
                                 other=0.0).astype(F32))
                for o, c in zip(outs, columns, strict=True)]
    if st.half is None:
        y = outs[0]
    else:  # silu(gate) * up, each step rounded as the XLA path rounds it
        gate, up = outs
        y = rnd(rnd(gate * rnd(1.0 / (1.0 + jnp.exp(-gate)))) * up)
    if res_ref is not None:  # the residual stream (res + res_add, rounded) plus this output
        cols = pl.ds(j * st.block_n, st.block_n)
        res = plt.load(res_ref.at[pl.ds(0, 1), cols], mask=valid[None], other=0.0)[0]
        if res_add_ref is not None:
            res = rnd(res.astype(F32) + plt.load(res_add_ref.at[pl.ds(0, 1), cols],
                                                 mask=valid[None], other=0.0)[0].astype(F32))
        y = rnd(res.astype(F32) + y)
    plt.store(y_ref.at[pl.ds(0, 1), pl.ds(j * st.block_n, st.block_n)],
              y.astype(y_ref.dtype)[None], mask=valid[None])  # [1, BN]


def matvec(x: Array, w: Array, bias: Array | None = None, *, glu: bool = False,
           add: Array | None = None, norm_scale: Array | None = None,
           norm_eps: float | None = None, residual: Array | None = None,
           residual_add: Array | None = None, out_dtype=None) -> Array:
    """``x [1, D] @ w [D, N] (+ bias [N])`` in one kernel; with ``glu``,
    ``silu(y[:, :N/2]) * y[:, N/2:]``.

    Prologue: ``x + add`` (``[1, D]``) and / or ``rmsnorm(.) * norm_scale [D]`` (epsilon
    ``norm_eps``) in place of ``x``; epilogue: ``(residual + residual_add) + y`` (each
    ``[1, N]``). Every sum is rounded to the compute dtype as the layers round it. The
    caller checks the shapes with :func:`blocks` (``..api.matvec_ready``).

    Returns:
        ``[1, N]`` (``[1, N/2]`` with ``glu``) in ``out_dtype`` (default ``x.dtype``).
    """
    depth, width = w.shape
    out_width = width // 2 if glu else width
    tiles = blocks(depth, out_width)
    if x.shape != (1, depth) or tiles is None or (glu and width % 2):
        raise NotImplementedError(f"matvec: expected x [1, {depth}] with D={depth} a multiple "
                                  f"of 16 (and an even N with glu); got x {x.shape}, N={width}")
    bk, bn = tiles
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    st = _Static(depth=depth, width=out_width, block_k=bk, block_n=bn,
                 half=out_width if glu else None, out_dtype=out_dtype,
                 norm_eps=None if norm_scale is None else float(norm_eps))
    interpret = interpret_mode()
    out = named_pallas_call(
        functools.partial(_kernel, st=st),
        inputs={"x": x, "add": add, "scale": norm_scale, "w": w, "bias": bias,
                "res": residual, "res_add": residual_add},
        outputs={"y": jax.ShapeDtypeStruct((1, out_width), out_dtype)},
        grid=(-(-out_width // bn),), interpret=interpret,
        compiler_params=None if interpret else compiler_params(4 if bk * bn >= 4096 else 2, 3),
        name="decode_matvec_glu" if glu else "decode_matvec")
    return out["y"]
