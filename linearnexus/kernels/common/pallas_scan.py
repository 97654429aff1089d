"""Scan and arithmetic primitives for Pallas kernels (Triton lowering and interpret mode).

* :func:`linear_scan`: the first-order affine scan (below);
* :func:`fma` and :func:`dot_sum`: a fused multiply-add and a multiply-add reduction.
  Pallas's Triton pipeline does not contract ``mul`` + ``add`` into ``fma`` (measured on an
  H200: the selective scan compiled to separate FMUL and FADD, 820 instructions per sub-tile
  instead of 508), so issue-bound loops ask for it;
* :func:`exp2_approx`, :func:`exp_approx`, :func:`log2_approx` and :func:`rcp_approx`: one
  ``ex2`` / ``lg2`` / ``rcp.approx.ftz`` PTX instruction each (inline assembly; ``exp`` adds
  a multiply), without the range reductions, subnormal fix-ups and IEEE division Pallas
  emits otherwise.

``linear_scan(a, b, axis)`` returns the running composition of the affine maps
``h -> a_t * h + b_t`` along ``axis``::

    forward:  A_t = a_0 ... a_t,           B_t = a_t B_{t-1} + b_t        (B_{-1} = 0)
    reverse:  A_t = a_t ... a_{n-1},       B_t = a_t B_{t+1} + b_t        (B_n = 0)

so a recurrence ``h_t = a_t h_{t-1} + b_t`` entering with ``h_{-1}`` is
``h_t = A_t h_{-1} + B_t`` for every ``t`` at once, with no per-step code.

Why a custom primitive: Pallas's Triton lowering has no rule for ``lax.associative_scan``
(it is not a primitive) and lowers only ``cumsum`` to Triton's ``tt.scan``; a cumsum of
log-decays would need ``exp(-cumsum)`` factors that overflow at strong decay. Triton's scan
takes any associative combine, so this module registers a primitive whose Triton rule builds
``tt.scan`` with the affine combine ``(a1, b1), (a2, b2) -> (a1 a2, fma(a2, b1, b2))``
directly. Along an axis held inside one thread the scan is sequential and, when ``A`` is
unused, one fma per element (the products are dead code).
The rule goes through JAX's private Pallas-Triton lowering table
(``jax._src.pallas.triton.lowering``), checked on JAX 0.10 (lowering) and 0.11 (H200).
Everywhere else (interpret mode, plain XLA) the primitive is ``lax.associative_scan``, and the
others are ``a * b + c``, ``sum(u * v)``, ``jnp.exp2``, ``jnp.log2`` and ``1 / x``.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

from linearnexus.core.types import Array

__all__ = ["compensated_cumsum", "dot_sum", "exp2_approx", "exp_approx", "fma", "linear_scan",
           "log2_approx", "rcp_approx"]

_LOG2E = 1.4426950408889634

linear_scan_p = Primitive("linearnexus_linear_scan")
linear_scan_p.multiple_results = True


def _combine(first, second):
    (a1, b1), (a2, b2) = first, second
    return a1 * a2, a2 * b1 + b2


def _impl(a, b, *, axis: int, reverse: bool, flip: bool = False):
    del flip  # a lowering choice only
    return list(jax.lax.associative_scan(_combine, (a, b), reverse=reverse, axis=axis))


def _abstract(a, b, *, axis: int, reverse: bool, flip: bool = False):
    del axis, reverse, flip
    return [a, b]


linear_scan_p.def_impl(_impl)
linear_scan_p.def_abstract_eval(_abstract)
mlir.register_lowering(linear_scan_p, mlir.lower_fun(_impl, multiple_results=True))


fma_p = Primitive("linearnexus_fma")
fma_p.def_impl(lambda a, b, c: a * b + c)
fma_p.def_abstract_eval(lambda a, b, c: a)
mlir.register_lowering(fma_p, mlir.lower_fun(lambda a, b, c: [a * b + c], multiple_results=True))


def _two_sum_combine(first, second, add=operator.add, sub=operator.sub):
    """Combine two compensated sums ``(hi, lo)`` (TwoSum of the heads, renormalised); ``add``
    and ``sub`` are ``+`` / ``-`` on arrays, or MLIR's ``arith.addf`` / ``arith.subf`` in the
    Triton rule (the same combine in both)."""
    (h1, l1), (h2, l2) = first, second
    s = add(h1, h2)
    bb = sub(s, h1)
    err = add(sub(h1, sub(s, bb)), sub(h2, bb))
    lo = add(add(l1, l2), err)
    hi = add(s, lo)
    return hi, sub(lo, sub(hi, s))


compensated_cumsum_p = Primitive("linearnexus_compensated_cumsum")
compensated_cumsum_p.multiple_results = True


def _ccumsum_impl(x, *, axis: int):
    return list(jax.lax.associative_scan(_two_sum_combine, (x, jnp.zeros_like(x)), axis=axis))


compensated_cumsum_p.def_impl(_ccumsum_impl)
compensated_cumsum_p.def_abstract_eval(lambda x, *, axis: [x, x])
mlir.register_lowering(compensated_cumsum_p, mlir.lower_fun(_ccumsum_impl, multiple_results=True))

dot_sum_p = Primitive("linearnexus_dot_sum")


def _dot_sum_impl(u, v, *, axis: int):
    return jnp.sum(u * v, axis=axis)


dot_sum_p.def_impl(_dot_sum_impl)
dot_sum_p.def_abstract_eval(
    lambda u, v, *, axis: jax.core.ShapedArray(u.shape[:axis] + u.shape[axis + 1:], u.dtype))
mlir.register_lowering(dot_sum_p, mlir.lower_fun(_dot_sum_impl, multiple_results=False))


def _register_triton_rule() -> None:
    try:  # private API: see the module docstring
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith
        from jax._src.lib.mlir.dialects import math as math_d
        from jax._src.lib.triton import dialect as tt
        from jax._src.pallas.triton import lowering as tl
    except ImportError:  # no Triton lowering in this jaxlib: interpret mode still works
        return

    def flip_axis(x, axis: int):
        """``x`` reversed along ``axis`` (a power of two): the axis split into 2 x 2 x ... and
        the halves of each swapped (``tt.reshape`` / ``tt.trans`` / ``tt.split`` / ``tt.join``;
        register moves when the axis sits in one thread)."""
        ty = ir.RankedTensorType(x.type)
        shape, elt = list(ty.shape), ty.element_type
        n = shape[axis]
        k = n.bit_length() - 1
        if n != 1 << k:
            raise NotImplementedError(f"flip: axis of length {n}, expected a power of two")
        if k == 0:
            return x
        split_shape = shape[:axis] + [2] * k + shape[axis + 1:]
        y = tt.reshape(ir.RankedTensorType.get(split_shape, elt), x, allow_reorder=False)
        nd = len(split_shape)
        for d in range(axis, axis + k):
            perm = [i for i in range(nd) if i != d] + [d]
            inv = [perm.index(i) for i in range(nd)]
            lo, hi = tt.split(tt.trans(y, perm))
            joined = ir.RankedTensorType.get([split_shape[i] for i in perm], elt)
            y = tt.trans(tt.join(joined, hi, lo), inv)
        return tt.reshape(ir.RankedTensorType.get(shape, elt), y, allow_reorder=False)

    def rule(ctx, a, b, *, axis: int, reverse: bool, flip: bool = False):
        a = tl._ensure_ir_value(a, ctx.avals_in[0])
        b = tl._ensure_ir_value(b, ctx.avals_in[1])
        elt = ir.RankedTensorType(a.type).element_type
        flipped = reverse and flip
        if flipped:
            a, b = flip_axis(a, axis), flip_axis(b, axis)
        op = tt.ScanOp([a, b], axis, reverse and not flipped)
        block = op.regions[0].blocks.append(elt, elt, elt, elt)
        with ir.InsertionPoint.at_block_begin(block):
            a1, b1, a2, b2 = block.arguments
            tt.scan_return([arith.mulf(a1, a2), math_d.fma(a2, b1, b2)])
        op.verify()
        return [flip_axis(r, axis) for r in op.results] if flipped else list(op.results)

    def ccumsum_rule(ctx, x, *, axis: int):
        x = tl._ensure_ir_value(x, ctx.avals_in[0])
        elt = ir.RankedTensorType(x.type).element_type
        zero = tl._zeros(x.type) if hasattr(tl, "_zeros") else arith.subf(x, x)
        op = tt.ScanOp([x, zero], axis, False)
        block = op.regions[0].blocks.append(elt, elt, elt, elt)
        with ir.InsertionPoint.at_block_begin(block):
            h1, l1, h2, l2 = block.arguments
            tt.scan_return(list(_two_sum_combine((h1, l1), (h2, l2), arith.addf, arith.subf)))
        op.verify()
        return list(op.results)

    def fma_rule(ctx, a, b, c):
        a, b, c = (tl._ensure_ir_value(v, aval) for v, aval in zip((a, b, c), ctx.avals_in, strict=True))
        return math_d.fma(a, b, c)

    def dot_sum_rule(ctx, u, v, *, axis: int):
        u = tl._ensure_ir_value(u, ctx.avals_in[0])
        v = tl._ensure_ir_value(v, ctx.avals_in[1])
        elt = ir.RankedTensorType(u.type).element_type
        op = tt.ReduceOp([u, v], axis)
        block = op.regions[0].blocks.append(elt, elt, elt, elt)
        with ir.InsertionPoint.at_block_begin(block):
            u1, v1, u2, v2 = block.arguments
            one = arith.constant(elt, 1.0)
            # (u1 v1 + u2 v2, 1): associative; in a thread the v = 1 factors fold away and the
            # reduction is one fma per element
            tt.reduce_return([math_d.fma(u2, v2, arith.mulf(u1, v1)), one])
        op.verify()
        return op.results[0]

    tl.triton_lowering_rules[linear_scan_p] = rule
    tl.triton_lowering_rules[fma_p] = fma_rule
    tl.triton_lowering_rules[compensated_cumsum_p] = ccumsum_rule
    tl.triton_lowering_rules[dot_sum_p] = dot_sum_rule


_register_triton_rule()


def linear_scan(a: Array, b: Array, *, axis: int = 0, reverse: bool = False,
                flip: bool = False) -> tuple[Array, Array]:
    """Composition of the affine maps ``h -> a_t h + b_t`` along ``axis`` (see module doc).

    Args:
        a, b: float32 arrays of one shape (decays and inputs).
        axis: the time axis.
        reverse: scan from the last element to the first (``B_t = a_t B_{t+1} + b_t``).
        flip: with ``reverse``, lower to Triton as reversed inputs, a forward scan and a
            reversed result (the axis's length must be a power of two). Triton 3.6 lowers a
            reverse ``tt.scan`` with a lane reversal of every operand and result (five chained
            shuffles per value) even when the axis sits inside each thread; there the reversal
            is register moves. Measured in the selective scan's backward (H200): 834 -> 364
            shuffles per tile, forward + backward 6.17 -> 5.93 ms. Leave it off when the axis
            spans lanes or warps (the reshapes then cost layout conversions). No effect off
            Triton.

    Returns:
        ``(A, B)``, each ``a``'s shape: products of decays and accumulated inputs.
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"a, b: expected one shape and dtype, got {a.shape} {a.dtype} and "
                         f"{b.shape} {b.dtype}")
    if a.dtype != jnp.float32:
        raise ValueError(f"a: expected float32, got {a.dtype}")
    axis = axis % a.ndim
    n = a.shape[axis]
    if flip and reverse and n & (n - 1):
        raise ValueError(f"flip: the scanned axis must have a power-of-two length, got {n}")
    A, B = linear_scan_p.bind(a, b, axis=axis, reverse=reverse, flip=bool(flip and reverse))
    return A, B


def compensated_cumsum(x: Array, *, axis: int = 0) -> tuple[Array, Array]:
    """Inclusive prefix sums of ``x`` along ``axis`` as ``(hi, lo)`` with ``hi + lo`` carrying
    the sum to ~2^-40 relative (a scan whose combine is Knuth's TwoSum, renormalised).

    One ``tt.scan`` in a Triton kernel; ``lax.associative_scan`` with the same combine
    elsewhere. Args: ``x`` float32; Returns: two float32 arrays of ``x``'s shape.
    """
    if x.dtype != jnp.float32:
        raise ValueError(f"x: expected float32, got {x.dtype}")
    hi, lo = compensated_cumsum_p.bind(x, axis=axis % x.ndim)
    return hi, lo


def fma(a: Array, b: Array, c: Array) -> Array:
    """``a * b + c`` as one fused multiply-add in a Triton kernel (elsewhere two ops).

    Pallas's Triton pipeline does not contract ``mulf`` + ``addf`` into ``fma`` on its own
    (measured on an H200: the selective scan compiled to separate FMUL and FADD), so the
    inner loops that are bound by instruction issue ask for it. Operands: one shape and dtype
    (float32); broadcast before calling.
    """
    if not (a.shape == b.shape == c.shape and a.dtype == b.dtype == c.dtype):
        raise ValueError(f"a, b, c: expected one shape and dtype, got {a.shape} {a.dtype}, "
                         f"{b.shape} {b.dtype}, {c.shape} {c.dtype}")
    return fma_p.bind(a, b, c)


def dot_sum(u: Array, v: Array, *, axis: int) -> Array:
    """``sum(u * v, axis)`` with the products fused into the reduction (one fma per element).

    Args:
        u, v: arrays of one shape and dtype (float32).
        axis: the reduced axis.

    Returns:
        ``u``'s shape without ``axis``.
    """
    if u.shape != v.shape or u.dtype != v.dtype:
        raise ValueError(f"u, v: expected one shape and dtype, got {u.shape} {u.dtype} and "
                         f"{v.shape} {v.dtype}")
    axis = axis % u.ndim
    if u.shape[axis] == 1:  # Triton's reduce never calls the combine on a length-1 axis
        return jnp.sum(u * v, axis=axis)
    return dot_sum_p.bind(u, v, axis=axis)


def _inline_f32(asm: str, x: Array) -> Array:
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.elementwise_inline_asm(
        asm, args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def exp2_approx(x: Array, *, interpret: bool) -> Array:
    """``2 ** x`` as one ``ex2.approx.ftz.f32`` (a single MUFU op; results below 2^-126 flush to 0).

    Pallas's ``exp2`` lowers with subnormal range fix-ups around the MUFU op (a compare and
    two predicated multiplies each); decays never need subnormals. ``interpret``: plain
    ``jnp.exp2`` (CPU interpret mode has no PTX).
    """
    return jnp.exp2(x) if interpret else _inline_f32("ex2.approx.ftz.f32 $0, $1;", x)


def exp_approx(x: Array, *, interpret: bool | None = None) -> Array:
    """``exp(x)`` as ``exp2_approx(x log2 e)``: a multiply and one MUFU op.

    Pallas lowers ``jnp.exp`` to libdevice's ``__nv_expf`` (a range reduction, the MUFU op
    and subnormal fix-ups, about eight instructions). Relative error: the rounding of
    ``x log2 e`` (``|x| 2^-24``) plus ``ex2.approx``'s ~2^-22; ``-inf`` gives 0.
    ``interpret``: ``None`` asks :func:`~linearnexus.kernels.common.pallas.interpret_mode`.
    """
    if interpret is None:
        from linearnexus.kernels.common.pallas import interpret_mode

        interpret = interpret_mode()
    return exp2_approx(x * _LOG2E, interpret=interpret)


def log2_approx(x: Array, *, interpret: bool) -> Array:
    """``log2(x)`` as one ``lg2.approx.ftz.f32`` (absolute error ~2^-22 on [1, 2])."""
    return jnp.log2(x) if interpret else _inline_f32("lg2.approx.ftz.f32 $0, $1;", x)


def rcp_approx(x: Array, *, interpret: bool) -> Array:
    """``1 / x`` as one ``rcp.approx.ftz.f32`` (relative error ~1 ulp; no IEEE division)."""
    return 1.0 / x if interpret else _inline_f32("rcp.approx.ftz.f32 $0, $1;", x)
