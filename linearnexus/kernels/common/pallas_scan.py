"""A first-order linear scan usable inside Pallas kernels (Triton lowering and interpret mode).

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
``tt.scan`` with the affine combine ``(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)`` directly.
The rule goes through JAX's private Pallas-Triton lowering table
(``jax._src.pallas.triton.lowering``), checked on JAX 0.10 (lowering) and 0.11 (H200).
Everywhere else (interpret mode, plain XLA) the primitive is ``lax.associative_scan``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

from linearnexus.core.types import Array

__all__ = ["linear_scan"]

linear_scan_p = Primitive("linearnexus_linear_scan")
linear_scan_p.multiple_results = True


def _combine(first, second):
    (a1, b1), (a2, b2) = first, second
    return a1 * a2, a2 * b1 + b2


def _impl(a, b, *, axis: int, reverse: bool):
    return list(jax.lax.associative_scan(_combine, (a, b), reverse=reverse, axis=axis))


def _abstract(a, b, *, axis: int, reverse: bool):
    del axis, reverse
    return [a, b]


linear_scan_p.def_impl(_impl)
linear_scan_p.def_abstract_eval(_abstract)
mlir.register_lowering(linear_scan_p, mlir.lower_fun(_impl, multiple_results=True))


def _register_triton_rule() -> None:
    try:  # private API: see the module docstring
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith
        from jax._src.lib.triton import dialect as tt
        from jax._src.pallas.triton import lowering as tl
    except ImportError:  # no Triton lowering in this jaxlib: interpret mode still works
        return

    def rule(ctx, a, b, *, axis: int, reverse: bool):
        a = tl._ensure_ir_value(a, ctx.avals_in[0])
        b = tl._ensure_ir_value(b, ctx.avals_in[1])
        elt = ir.RankedTensorType(a.type).element_type
        op = tt.ScanOp([a, b], axis, reverse)
        block = op.regions[0].blocks.append(elt, elt, elt, elt)
        with ir.InsertionPoint.at_block_begin(block):
            a1, b1, a2, b2 = block.arguments
            tt.scan_return([arith.mulf(a1, a2), arith.addf(arith.mulf(a2, b1), b2)])
        op.verify()
        return list(op.results)

    tl.triton_lowering_rules[linear_scan_p] = rule


_register_triton_rule()


def linear_scan(a: Array, b: Array, *, axis: int = 0, reverse: bool = False) -> tuple[Array, Array]:
    """Composition of the affine maps ``h -> a_t h + b_t`` along ``axis`` (see module doc).

    Args:
        a, b: float32 arrays of one shape (decays and inputs).
        axis: the time axis.
        reverse: scan from the last element to the first (``B_t = a_t B_{t+1} + b_t``).

    Returns:
        ``(A, B)``, each ``a``'s shape: products of decays and accumulated inputs.
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"a, b: expected one shape and dtype, got {a.shape} {a.dtype} and "
                         f"{b.shape} {b.dtype}")
    if a.dtype != jnp.float32:
        raise ValueError(f"a: expected float32, got {a.dtype}")
    axis = axis % a.ndim
    A, B = linear_scan_p.bind(a, b, axis=axis, reverse=reverse)
    return A, B
