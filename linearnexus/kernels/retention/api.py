"""RetNet's retention: simple GLA with a fixed decay per head.

Built on simple_gla's public api rather than beside it (it *is* simple GLA with
``g[b, t, h] = log(1 - 2^(-5-h))``), so every simple_gla backend serves it too.
"""

from __future__ import annotations

import jax.numpy as jnp

from linearnexus.core.gating import retention_log_decay
from linearnexus.core.mode import KernelMode
from linearnexus.core.types import Array
from linearnexus.kernels.common.validation import check_qkv
from linearnexus.kernels.simple_gla.api import BACKENDS, simple_gla

__all__ = ["BACKENDS", "retention"]


def retention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: Array | None = None,
    chunk_size: int | None = None,
    mode: KernelMode | str | None = None,
    backend: str | None = None,
) -> tuple[Array, Array | None]:
    """Multi-scale retention (Sun et al. 2023) without its normalisations.

    ``S_t = gamma_h S_{t-1} + k_t v_t^T``, ``o_t = scale * q_t^T S_t`` with the fixed
    per-head decay ``gamma_h = 1 - 2^(-5-h)`` for head ``h = 0 .. H-1``.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``. Other arguments as
            :func:`linearnexus.kernels.simple_gla.simple_gla`.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.

    Raises:
        ValueError / TypeError naming the bad argument.
    """
    batch, seq, heads, _, _ = check_qkv(q, k, v)
    g = jnp.broadcast_to(retention_log_decay(heads), (batch, seq, heads))  # [H] -> [B, T, H]
    return simple_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                      chunk_size=chunk_size, mode=mode, backend=backend)
