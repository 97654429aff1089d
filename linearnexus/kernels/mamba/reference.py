"""The truth for the Mamba-1 selective scan (S6): one step at a time, in float32.

For every channel c and state index n (Gu & Dao 2023, eq. 2a-2b with ZOH on A and the
simplified Euler step on B)::

    h_t[c, n] = exp(dt_t[c] * A[c, n]) * h_{t-1}[c, n] + dt_t[c] * B_t[n] * x_t[c]
    y_t[c]    = sum_n C_t[n] * h_t[c, n] + D[c] * x_t[c]
    y_t[c]   *= silu(z_t[c])            (when z is given)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array, state_dtype


def selective_state_update(
    h: Array, x_t: Array, dt_t: Array, A: Array, B_t: Array, C_t: Array
) -> tuple[Array, Array]:
    """One recurrence step without the D skip or z gate.

    Args:
        h: ``[B, C, N]`` state (float32 / float64).
        x_t, dt_t: ``[B, C]``. A: ``[C, N]``. B_t, C_t: ``[B, N]``.

    Returns:
        ``(h_new [B, C, N], y_t [B, C])`` in the state's dtype.
    """
    cd = h.dtype
    dt_t = dt_t.astype(cd)
    decay = jnp.exp(dt_t[:, :, None] * A.astype(cd))  # [B, C, N]
    inp = (dt_t * x_t.astype(cd))[:, :, None] * B_t.astype(cd)[:, None, :]  # [B, C, N]
    h = decay * h + inp
    y = jnp.einsum("bcn,bn->bc", h, C_t.astype(cd))
    return h, y


def apply_skip_and_gate(y: Array, x: Array, D: Array | None, z: Array | None) -> Array:
    """``y + D * x``, then ``* silu(z)``; all ``[B, T, C]`` (D: ``[C]``) in y's dtype."""
    if D is not None:
        y = y + D.astype(y.dtype) * x.astype(y.dtype)
    if z is not None:
        y = y * jax.nn.silu(z.astype(y.dtype))
    return y


def selective_scan_reference(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    D: Array | None = None,
    z: Array | None = None,
    initial_state: Array | None = None,
) -> tuple[Array, Array]:
    """Per-step selective scan (a ``lax.scan`` over T). Also the recurrent decoding mode.

    Args:
        x, dt: ``[B, T, C]`` (dt already positive, i.e. after softplus).
        A: ``[C, N]`` (negative). B, C: ``[B, T, N]``. D: ``[C]``. z: ``[B, T, C]``.
        initial_state: ``[B, C, N]`` or None for zeros.

    Returns:
        ``(y [B, T, C] in x's dtype, final_state [B, C, N] float32 / float64)``.
    """
    batch, _, channels = x.shape
    sd = state_dtype(x.dtype)
    h0 = (jnp.zeros((batch, channels, A.shape[1]), sd) if initial_state is None
          else initial_state.astype(sd))

    def step(h, inputs):
        x_t, dt_t, b_t, c_t = inputs
        return selective_state_update(h, x_t, dt_t, A, b_t, c_t)

    time_major = tuple(jnp.swapaxes(a, 0, 1) for a in (x, dt, B, C))  # [B, T, .] -> [T, B, .]
    h, y = jax.lax.scan(step, h0, time_major)
    y = jnp.swapaxes(y, 0, 1)  # [T, B, C] -> [B, T, C]
    y = apply_skip_and_gate(y, x, D, z)
    return y.astype(x.dtype), h
