"""Fused one-token (decoding) step of the linear-attention ops: one Pallas (Triton) kernel.

For a call with ``T == 1`` every op here is, per row ``n`` and head ``h``::

    S   = exp(g) * S                       # decay: scalar g (simple_gla, ssd, retention,
                                           #   gated delta), a [K] vector (gla), none (delta)
    S  += k (beta (v - S^T k))^T           # the delta rules
    S  += k v^T                            # the others
    o   = scale * S^T q

The pure-JAX recurrent form runs this as a scan of one step plus the input guard's
cleaning and marking (``validation.causal_guard``): a dozen small XLA kernels per layer.
:func:`linear_step` is one launch that reads the ``[K, V]`` state once and writes it once
(in place when the caller donates it), with the guard folded in: bad entries (non-finite,
a positive log-gate) are zeroed, ``g = -inf`` floored, and the outputs / final state they
reach are marked NaN exactly as the guard marks them (for ``T == 1``: a bad ``k``, ``v``,
gate or ``beta`` marks the head's output and final state, a bad ``q`` its output only).

Grid ``(N, H, V / BV)``; the state tile is ``[K', BV]`` float32 in registers (``K'`` the
key dim padded to a power of two). Head dims that are not powers of two >= 16 are
zero-padded in the glue (zeros are inert), which costs a few copies: the fast path is a
model whose head dims are powers of two (64, 128), where the glue is reshapes only.

Differentiable: the backward pass is that of the guarded pure-JAX recurrent form (decoding
never needs it; tests and odd callers might).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas import (
    compiler_params,
    interpret_mode,
    named_pallas_call,
    next_pow2,
    pad_axis,
    with_reference_vjp,
)
from linearnexus.kernels.common.validation import LOG_GATE_FLOOR

F32 = jnp.float32
#: set to "0" to turn the fused one-token step off (the pure-JAX recurrent form runs instead)
FUSED_STEP_ENV = "LINEARNEXUS_FUSED_STEP"
#: state-tile elements per program: 8192 float32 is 64 registers a thread at 4 warps
_TILE = 8192


def fused_step_enabled() -> bool:
    """False when ``LINEARNEXUS_FUSED_STEP=0`` (read at trace time)."""
    return os.environ.get(FUSED_STEP_ENV, "1") != "0"


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What distinguishes one op's step: ``gate`` ("none", "scalar" [B, T, H] or "vector"
    [B, T, H, K]) and ``delta`` (a ``beta [B, T, H]`` argument after the gate)."""

    gate: str
    delta: bool

    def split(self, arrays: tuple[Array, ...]) -> tuple[Array | None, Array | None]:
        """``(g, beta)`` from the op's gate arrays (``arrays[3:]``), None where absent."""
        rest = list(arrays[3:])
        g = rest.pop(0) if self.gate != "none" else None
        beta = rest.pop(0) if self.delta else None
        return g, beta


@dataclasses.dataclass(frozen=True)
class _Static:
    gate: str
    delta: bool
    has_h0: bool
    scale: float
    key_dim: int  # padded K'
    value_dim: int  # padded V'
    block_v: int
    guard: bool


def _ok(x: Array) -> Array:
    """Entry-wise finiteness without ``isfinite`` (no Triton rule): NaN and +-inf fail."""
    return jnp.abs(x) < jnp.inf


def _count_bad(ok: Array) -> Array:
    return jnp.sum(jnp.where(ok, 0.0, 1.0))


def _mark(x: Array, bad: Array) -> Array:
    """``x`` with every entry NaN when ``bad > 0`` (a scalar); array operands on both sides
    of the select (a scalar NaN literal beside a scalar predicate fails Triton lowering)."""
    return jnp.where(jnp.broadcast_to(bad > 0, x.shape), jnp.full(x.shape, jnp.nan, F32), x)


def guarded_update(q: Array, k: Array, v: Array, g: Array | None, beta: Array | None,
                   s: Array, *, delta: bool, scale: float, guard: bool,
                   v_full: Array | None = None) -> tuple[Array, Array]:
    """One head's one-token update inside a kernel, the input guard folded in.

    ``q, k [K']``, ``v [BV]`` (``v_full [V']``, the whole head, for the guard's check: None
    when ``v`` is the whole head), ``g`` None / ``[1]`` / ``[K']`` (log-gate), ``beta`` None
    / ``[1]``, ``s [K', BV]`` float32 -> ``(o [BV], s [K', BV])``, every value float32.
    With ``guard``: bad entries are zeroed and the outputs they reach marked NaN, as
    ``validation.causal_guard`` does for ``T == 1``.
    """
    head_bad = q_bad = None
    if guard:
        q_ok, k_ok, v_ok = _ok(q), _ok(k), _ok(v)
        q_bad = _count_bad(q_ok)
        head_bad = _count_bad(k_ok) + _count_bad(v_ok if v_full is None else _ok(v_full))
        q, k, v = jnp.where(q_ok, q, 0.0), jnp.where(k_ok, k, 0.0), jnp.where(v_ok, v, 0.0)
        if g is not None:
            g_ok = g <= 0  # False for NaN and +inf; -inf is a valid hard reset
            head_bad = head_bad + _count_bad(g_ok)
            g = jnp.where(g_ok, jnp.maximum(g, LOG_GATE_FLOOR), 0.0)
        if beta is not None:
            beta_ok = _ok(beta)
            head_bad = head_bad + _count_bad(beta_ok)
            beta = jnp.where(beta_ok, beta, 0.0)
    if g is not None:  # [1, 1] (scalar gate) or [K', 1] (one decay per key row)
        s = s * jnp.exp(g)[:, None]
    if delta:
        predicted = jnp.sum(k[:, None] * s, axis=0)  # S^T k: [BV]
        err = beta * (v - predicted)  # [1] * [BV]
        s = s + k[:, None] * err[None, :]
    else:
        s = s + k[:, None] * v[None, :]
    o = scale * jnp.sum(q[:, None] * s, axis=0)  # [BV]
    if guard:
        o = _mark(o, head_bad + q_bad)
        s = _mark(s, head_bad)
    return o, s


def _step_kernel(*, q_ref, k_ref, v_ref, g_ref, beta_ref, h0_ref, o_ref, final_ref, st: _Static):
    j = pl.program_id(2)
    q = q_ref[...].astype(F32)  # [K']
    k = k_ref[...].astype(F32)
    v_all = v_ref[...].astype(F32)  # [V']: the whole head, for the guard's check
    v = v_ref[pl.ds(j * st.block_v, st.block_v)].astype(F32)  # [BV]
    g = None if g_ref is None else g_ref[...].astype(F32)  # [1] or [K']
    beta = None if beta_ref is None else beta_ref[...].astype(F32)  # [1]
    if st.has_h0:
        s = h0_ref[...]  # [K', BV] float32
    else:
        s = jnp.zeros((st.key_dim, st.block_v), F32)
    o, s = guarded_update(q, k, v, g, beta, s, delta=st.delta, scale=st.scale, guard=st.guard,
                          v_full=v_all)
    o_ref[...] = o.astype(o_ref.dtype)
    final_ref[...] = s


def _launch(q, k, v, g, beta, h0, *, spec: StepSpec, scale: float, guard: bool):
    """The kernel on ``q, k [N, H, K]``, ``v [N, H, V]``, gates, ``h0 [N, H, K, V]`` (or None);
    returns ``(o [N, H, V] in v's dtype, final [N, H, K, V] float32)``."""
    n, heads, key_dim = q.shape
    value_dim = v.shape[2]
    kp, vp = next_pow2(key_dim), next_pow2(value_dim)
    bv = min(vp, max(16, _TILE // kp))
    q, k = pad_axis(q, 2, kp), pad_axis(k, 2, kp)
    v = pad_axis(v, 2, vp)
    if g is not None:
        g = g.astype(F32)
        g = g[..., None] if spec.gate == "scalar" else pad_axis(g, 2, kp)  # [N, H, 1] / [N, H, K']
    if beta is not None:
        beta = beta.astype(F32)[..., None]  # [N, H] -> [N, H, 1]
    if h0 is not None:
        h0 = pad_axis(pad_axis(h0.astype(F32), 2, kp), 3, vp)
    st = _Static(gate=spec.gate, delta=spec.delta, has_h0=h0 is not None, scale=float(scale),
                 key_dim=kp, value_dim=vp, block_v=bv, guard=guard)

    def vec(size):
        return pl.BlockSpec((None, None, size), lambda i, h, j: (i, h, 0))

    tile = pl.BlockSpec((None, None, kp, bv), lambda i, h, j: (i, h, 0, j))
    specs = {"q": vec(kp), "k": vec(kp), "v": vec(vp),
             "g": None if g is None else vec(g.shape[2]), "beta": vec(1), "h0": tile,
             "o": pl.BlockSpec((None, None, bv), lambda i, h, j: (i, h, j)), "final": tile}
    interpret = interpret_mode()
    out = named_pallas_call(
        functools.partial(_step_kernel, st=st),
        inputs={"q": q, "k": k, "v": v, "g": g, "beta": beta, "h0": h0},
        outputs={"o": jax.ShapeDtypeStruct((n, heads, vp), v.dtype),
                 "final": jax.ShapeDtypeStruct((n, heads, kp, vp), F32)},
        in_specs=specs, out_specs=specs,
        aliases={"h0": "final"} if h0 is not None else None,
        grid=(n, heads, vp // bv), interpret=interpret,
        compiler_params=None if interpret else compiler_params(4 if kp * bv >= 4096 else 2, 1),
        name=f"linear_step_{spec.gate}{'_delta' if spec.delta else ''}")
    o, final = out["o"], out["final"]
    return o[..., :value_dim], final[:, :, :key_dim, :value_dim]


def linear_step(spec: StepSpec, arrays: tuple[Array, ...], *, scale: float,
                initial_state: Array | None,
                fallback: Callable[..., tuple[Array, Array]]) -> tuple[Array, Array]:
    """One token of a linear-attention op in one kernel, the input guard folded in.

    Args:
        spec: the op's gate kind and whether it is a delta rule.
        arrays: ``(q [B, 1, H, K], k, v [B, 1, H, V], *gates)`` as the op's api takes them.
        scale: multiplies q. initial_state: ``[B, H, K, V]`` or None (zeros).
        fallback: ``(*arrays, initial_state) -> (o, final)``, the guarded pure-JAX recurrent
            form: its VJP is this function's backward pass.

    Returns:
        ``(o [B, 1, H, V] in v's dtype, final_state [B, H, K, V] float32)``.

    Raises:
        NotImplementedError: ``T != 1`` or an input dtype the kernel does not take (float64).
    """
    from linearnexus.kernels.common.pallas_ops import check_pallas_dtype

    q = arrays[0]
    if q.shape[1] != 1:
        raise NotImplementedError(f"the fused step runs one-token calls (T == 1), got T={q.shape[1]}")
    check_pallas_dtype("linear_step", *arrays, initial_state)

    def forward(arrays, h0):
        q, k, v = (x[:, 0] for x in arrays[:3])  # [B, 1, H, D] -> [B, H, D]
        g, beta = spec.split(arrays)
        g = None if g is None else g[:, 0]  # [B, 1, H(, K)] -> [B, H(, K)]
        beta = None if beta is None else beta[:, 0]
        o, final = _launch(q, k, v, g, beta, h0, spec=spec, scale=scale, guard=True)
        return o[:, None], final  # [B, H, V] -> [B, 1, H, V]

    return with_reference_vjp(forward, lambda a, s: fallback(*a, initial_state=s),
                              tuple(arrays), initial_state)
