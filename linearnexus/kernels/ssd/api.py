"""Mamba2's SSD (state-space duality) as simple GLA, plus its skip connection.

Per head ``h``: ``h_t = exp(dt_t A_h) h_{t-1} + dt_t B_t x_t^T`` and
``y_t = C_t^T h_t + D_h x_t``. That is simple GLA with ``q = C``, ``k = B``,
``v = dt * x``, ``g = dt * A`` and ``scale = 1``, so SSD is built on simple_gla's public
api (every simple_gla backend serves it) rather than beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linearnexus.core.mode import KernelMode
from linearnexus.core.types import Array
from linearnexus.kernels.common.validation import (
    as_cu_seqlens,
    check_array,
    check_cu_seqlens,
    check_float,
    check_initial_state,
    check_log_gate,
    compute_dtype,
)
from linearnexus.kernels.simple_gla.api import BACKENDS, simple_gla

__all__ = ["BACKENDS", "ssd"]


def _validate(x, dt, A, B, C, D, dt_bias) -> tuple[int, int, int, int, int, int]:
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x: expected rank 4 [B, T, H, P], got shape {tuple(getattr(x, 'shape', ()))}")
    check_float("x", x)
    batch, seq, heads, head_dim = x.shape
    if seq == 0:
        raise ValueError("x: sequence length T must be >= 1, got T=0")
    check_array("dt", dt, (batch, seq, heads), "[B, T, H]")
    check_array("A", A, (heads,), "[H]")
    if getattr(B, "ndim", None) != 4 or tuple(B.shape[:2]) != (batch, seq):
        raise ValueError(f"B: expected shape ({batch}, {seq}, G, N) [B, T, G, N], "
                         f"got {tuple(getattr(B, 'shape', ()))}")
    groups, n_state = B.shape[2], B.shape[3]
    if groups == 0 or heads % groups:
        raise ValueError(f"B: the number of groups G={groups} must divide the number of heads H={heads}")
    check_array("B", B, (batch, seq, groups, n_state), "[B, T, G, N]")
    check_array("C", C, (batch, seq, groups, n_state), "[B, T, G, N] (the shape of B)")
    if D is not None and getattr(D, "ndim", None) == 2:
        check_array("D", D, (heads, head_dim), "[H, P]")
    else:
        check_array("D", D, (heads,), "[H] or [H, P]")
    check_array("dt_bias", dt_bias, (heads,), "[H]")
    return batch, seq, heads, head_dim, groups, n_state


def ssd(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    D: Array | None = None,
    dt_bias: Array | None = None,
    dt_softplus: bool = False,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: Array | None = None,
    chunk_size: int | None = None,
    mode: KernelMode | str | None = None,
    backend: str | None = None,
) -> tuple[Array, Array | None]:
    """Mamba2's selective state-space layer (SSD), heads sharing B and C in groups.

    Args:
        x: ``[B, T, H, P]`` inputs (P = head dim).
        dt: ``[B, T, H]`` step sizes (raw when ``dt_softplus``: ``softplus(dt + dt_bias)``;
            else ``dt + dt_bias``), computed in float32.
        A: ``[H]`` decay rates, negative for a decaying state (Mamba2: ``-exp(A_log)``).
        B, C: ``[B, T, G, N]`` input / output projections; head ``h`` uses group
            ``h // (H / G)``.
        D: ``[H]`` or ``[H, P]`` skip, or None. dt_bias: ``[H]`` or None.
        initial_state: ``[N_seq, H, N, P]`` (one per row, or per packed sequence) or None.
        output_final_state, cu_seqlens, chunk_size, mode, backend: as
            :func:`linearnexus.kernels.simple_gla.simple_gla`.

    Returns:
        ``(y [B, T, H, P] in x's dtype, final_state [N_seq, H, N, P] float32 or None)``.

    Raises:
        ValueError / TypeError naming the bad argument (x, dt, A, B, C, D, dt_bias,
        initial_state, cu_seqlens; ``dt * A`` for a concrete positive log-gate).
    """
    batch, seq, heads, head_dim, groups, n_state = _validate(x, dt, A, B, C, D, dt_bias)
    cu_seqlens = as_cu_seqlens(cu_seqlens)
    n_states = check_cu_seqlens(cu_seqlens, batch, seq)
    check_initial_state(initial_state, n_states, heads, n_state, head_dim)
    dtype = compute_dtype(x.dtype, dt.dtype)
    dt = dt.astype(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(dtype)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    per_group = heads // groups
    q = jnp.repeat(C, per_group, axis=2)  # [B, T, G, N] -> [B, T, H, N]
    k = jnp.repeat(B, per_group, axis=2)
    v = (x.astype(dtype) * dt[..., None]).astype(jnp.promote_types(x.dtype, dt.dtype))  # [B, T, H, P]
    g = dt * A.astype(dtype)  # [B, T, H]
    check_log_gate("dt * A", g)  # named here: the caller never passed a `g`
    y, final = simple_gla(q, k, v, g, scale=1.0, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                          chunk_size=chunk_size, mode=mode, backend=backend)
    if D is not None:
        skip = D.astype(dtype) if D.ndim == 2 else D.astype(dtype)[:, None]  # [H, P] or [H, 1]
        y = y.astype(dtype) + x.astype(dtype) * skip
    return y.astype(x.dtype), final
