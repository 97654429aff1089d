"""Gated delta rule, the truth: a per-step scan of
``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.

``o_t = scale * q_t^T S_t`` with a scalar log-gate ``g_t`` per head and step. The state is
decayed first, then corrected toward ``v_t`` at ``k_t`` (``(I - beta k k^T)`` commutes with
the scalar decay). Short enough to check against the equation by eye; it is also the
recurrent (decoding) form.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common.recurrent import per_step_recurrent, per_step_reference


def gated_delta_rule_step(state: Array, q_t: Array, k_t: Array, v_t: Array, g_t: Array,
                          beta_t: Array, *, scale: float) -> tuple[Array, Array]:
    """One token for every row: ``state [R, H, K, V]``, ``q_t, k_t [R, H, K]``,
    ``v_t [R, H, V]``, ``g_t, beta_t [R, H]`` -> ``(next_state, o_t [R, H, V])``."""
    state = jnp.exp(g_t)[..., None, None] * state
    predicted = jnp.einsum("rhk,rhkv->rhv", k_t, state)  # S^T k_t
    error = beta_t[..., None] * (v_t - predicted)  # [R, H, V]
    state = state + k_t[..., :, None] * error[..., None, :]
    o_t = scale * jnp.einsum("rhk,rhkv->rhv", q_t, state)
    return state, o_t


def gated_delta_rule_reference(q: Array, k: Array, v: Array, g: Array, beta: Array, *,
                               scale: float, initial_state: Array | None = None,
                               cu_seqlens: Array | None = None) -> tuple[Array, Array]:
    """Per-step truth; packed sequences are run one by one (needs concrete ``cu_seqlens``).

    Args:
        q, k: ``[B, T, H, K]`` (k L2-normalised). v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log-gates. beta: ``[B, T, H]``.
        scale: multiplies ``q``. initial_state: ``[N, H, K, V]`` or None.
        cu_seqlens: ``[N+1]`` int offsets of packed sequences (B == 1) or None.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 (float64 for f64))``.
    """
    step = functools.partial(gated_delta_rule_step, scale=scale)
    return per_step_reference(step, (q, k, v, g, beta), initial_state=initial_state, cu_seqlens=cu_seqlens)


def gated_delta_rule_recurrent(q: Array, k: Array, v: Array, g: Array, beta: Array, *,
                               scale: float, initial_state: Array | None = None,
                               cu_seqlens: Array | None = None) -> tuple[Array, Array]:
    """The recurrent (decoding) form: same math as the reference, jit-safe with packed
    sequences (the state restarts at each ``cu_seqlens`` boundary). Shapes as the reference."""
    step = functools.partial(gated_delta_rule_step, scale=scale)
    return per_step_recurrent(step, (q, k, v, g, beta), initial_state=initial_state, cu_seqlens=cu_seqlens)
