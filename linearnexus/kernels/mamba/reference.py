"""The truth for the Mamba-1 selective scan (S6): one step at a time, in float32.

For every channel c and state index n (Gu & Dao 2023, eq. 2a-2b with ZOH on A and the
simplified Euler step on B)::

    h_t[c, n] = exp(dt_t[c] * A[c, n]) * h_{t-1}[c, n] + dt_t[c] * B_t[n] * x_t[c]
    y_t[c]    = sum_n C_t[n] * h_t[c, n] + D[c] * x_t[c]
    y_t[c]   *= silu(z_t[c])            (when z is given)

Packed sequences (``cu_seqlens``, B == 1): the state restarts at each sequence from its own
initial state (``[N_seq, C, N]``, zeros when None), and each sequence's final state is
returned (``[N_seq, C, N]``); an empty sequence's final state is its initial state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array, is_concrete, state_dtype
from linearnexus.kernels.common.recurrent import reference_loop, scan_tokens_packed


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
    cu_seqlens: Array | None = None,
) -> tuple[Array, Array]:
    """Per-step selective scan (a ``lax.scan`` over T). Also the recurrent decoding mode.

    Args:
        x, dt: ``[B, T, C]`` (dt already positive, i.e. after softplus).
        A: ``[C, N]`` (negative). B, C: ``[B, T, N]``. D: ``[C]``. z: ``[B, T, C]``.
        initial_state: ``[B, C, N]`` (``[N_seq, C, N]`` with ``cu_seqlens``) or None for zeros.
        cu_seqlens: ``[N_seq + 1]`` int offsets of packed sequences (B == 1) or None.
            Concrete offsets run each sequence alone (the definition the packed forms are
            tested against); traced ones (under ``jit``) run one scan over the packed
            tokens that restarts the state at each sequence.

    Returns:
        ``(y [B, T, C] in x's dtype, final_state [B or N_seq, C, N] float32 / float64)``.
    """
    sd = state_dtype(x.dtype)
    n_state = A.shape[1]

    def step(h, x_t, dt_t, b_t, c_t):
        return selective_state_update(h, x_t, dt_t, A, b_t, c_t)

    def run_one(xs, init):  # one batch of sequences: the scan without skip and gate
        h0 = (jnp.zeros((xs[0].shape[0], xs[0].shape[2], n_state), sd) if init is None
              else init.astype(sd))
        time_major = tuple(jnp.swapaxes(a, 0, 1) for a in xs)  # [B, T, .] -> [T, B, .]
        h, y = jax.lax.scan(lambda h, inputs: step(h, *inputs), h0, time_major)
        return jnp.swapaxes(y, 0, 1), h  # [T, B, C] -> [B, T, C]

    xs, shape = (x, dt, B, C), (x.shape[2], n_state)
    if cu_seqlens is not None and not is_concrete(cu_seqlens):
        y, h = scan_tokens_packed(step, xs, initial_state, shape, sd, cu_seqlens)
    else:
        y, h = reference_loop(run_one, xs, initial_state, cu_seqlens, shape, sd)
    y = apply_skip_and_gate(y, x, D, z)
    return y.astype(x.dtype), h
