"""GLA, the truth: a per-step scan of ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``.

``o_t = scale * q_t^T S_t`` with a log-gate ``g_t`` per head, step and key dimension (row
``k`` of the ``K x V`` state decays by ``exp(g_t[k])``). Short enough to check against the
equation by eye; it is also the recurrent (decoding) form.
"""

from __future__ import annotations

import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common.recurrent import reference_loop, scan_tokens, scan_tokens_packed
from linearnexus.kernels.common.validation import compute_dtype


def gla_step(state: Array, q_t: Array, k_t: Array, v_t: Array, g_t: Array, *,
             scale: float) -> tuple[Array, Array]:
    """One token for every row: ``state [R, H, K, V]``, ``q_t, k_t, g_t [R, H, K]``,
    ``v_t [R, H, V]`` -> ``(next_state, o_t [R, H, V])``."""
    state = jnp.exp(g_t)[..., :, None] * state + k_t[..., :, None] * v_t[..., None, :]
    o_t = scale * jnp.einsum("rhk,rhkv->rhv", q_t, state)
    return state, o_t


def _prepare(q, k, v, g):
    dtype = compute_dtype(q.dtype, k.dtype, v.dtype, g.dtype)
    return tuple(x.astype(dtype) for x in (q, k, v, g)), dtype


def gla_reference(q: Array, k: Array, v: Array, g: Array, *, scale: float,
                  initial_state: Array | None = None,
                  cu_seqlens: Array | None = None) -> tuple[Array, Array]:
    """Per-step truth; packed sequences are run one by one (needs concrete ``cu_seqlens``).

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``. g: ``[B, T, H, K]`` log-gates.
        scale: multiplies ``q``. initial_state: ``[N, H, K, V]`` or None.
        cu_seqlens: ``[N+1]`` int offsets of packed sequences (B == 1) or None.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 (float64 for f64))``.
    """
    xs, dtype = _prepare(q, k, v, g)
    shape = (q.shape[2], q.shape[3], v.shape[3])

    def run_one(xs_n, init):
        return scan_tokens(lambda s, *x: gla_step(s, *x, scale=scale), xs_n, init, shape, dtype)

    o, final = reference_loop(run_one, xs, initial_state, cu_seqlens, shape, dtype)
    return o.astype(v.dtype), final


def gla_recurrent(q: Array, k: Array, v: Array, g: Array, *, scale: float,
                  initial_state: Array | None = None,
                  cu_seqlens: Array | None = None) -> tuple[Array, Array]:
    """The recurrent (decoding) form: same math as the reference, jit-safe with packed
    sequences (the state restarts at each ``cu_seqlens`` boundary). Shapes as the reference."""
    xs, dtype = _prepare(q, k, v, g)
    shape = (q.shape[2], q.shape[3], v.shape[3])
    step = lambda s, *x: gla_step(s, *x, scale=scale)  # noqa: E731
    if cu_seqlens is None:
        o, final = scan_tokens(step, xs, initial_state, shape, dtype)
    else:
        o, final = scan_tokens_packed(step, xs, initial_state, shape, dtype, cu_seqlens)
    return o.astype(v.dtype), final
