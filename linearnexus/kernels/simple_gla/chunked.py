"""Simple GLA in chunks: matmuls inside a chunk, a scan of states across chunks.

With ``b_i`` the inclusive sum of log-gates inside a chunk and ``S_0`` the state entering
it (see README.md for the derivation)::

    o_i  = scale * exp(b_i) q_i^T S_0 + scale * sum_{j<=i} exp(b_i - b_j) (q_i . k_j) v_j
    S_L  = exp(b_L) S_0 + sum_j exp(b_L - b_j) k_j v_j^T

Every exponent is a difference ``b_i - b_j`` with ``j <= i`` (<= 0), so strong decay
underflows to zero instead of overflowing. The intra-chunk terms of all chunks are
batched matmuls; only ``S_{c+1} = exp(b_L) S_c + dS_c`` runs sequentially. The backward
pass (autodiff) keeps one state per chunk, never one per token.
"""

from __future__ import annotations

import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common.chunking import (
    chunk_cumsum,
    chunk_suffix_sum,
    from_chunks,
    maybe_tune_cpu_malloc,
    pairwise_decay,
    plan_chunks,
    scan_chunk_states,
    to_chunks,
)
from linearnexus.kernels.common.validation import compute_dtype


def _decay_step(state: Array, d_state: Array, log_decay: Array) -> tuple[Array, tuple[()]]:
    """``S_{c+1} = exp(b_L) S_c + dS_c`` for ``state [R, H, K, V]``, ``log_decay [R, H]``."""
    return jnp.exp(log_decay)[..., None, None] * state + d_state, ()


def simple_gla_chunked(q: Array, k: Array, v: Array, g: Array, *, scale: float,
                       initial_state: Array | None = None, cu_seqlens: Array | None = None,
                       chunk_size: int = 64) -> tuple[Array, Array]:
    """Chunked simple GLA; arguments and returns as :func:`simple_gla_reference`."""
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[3]
    dtype = compute_dtype(q.dtype, k.dtype, v.dtype, g.dtype)
    maybe_tune_cpu_malloc()
    plan = plan_chunks(batch, seq, chunk_size, cu_seqlens)
    # heads before time inside a chunk, so every einsum below is a plain batched matmul
    qc, kc, vc = (jnp.swapaxes(to_chunks(x.astype(dtype), plan), 2, 3)
                  for x in (q, k, v))  # [B, T, H, *] -> [R, NC, H, L, *]
    gc = jnp.swapaxes(to_chunks(g.astype(dtype), plan), 2, 3)  # [R, NC, H, L]
    b = chunk_cumsum(gc)  # [R, NC, H, L] inclusive, within each chunk
    b_last = b[..., -1]  # [R, NC, H]
    decay = pairwise_decay(gc)  # [R, NC, H, L(i), L(j)]
    scores = jnp.einsum("rchik,rchjk->rchij", qc, kc) * decay * scale
    o_intra = jnp.einsum("rchij,rchjv->rchiv", scores, vc)
    k_to_end = kc * jnp.exp(chunk_suffix_sum(gc))[..., None]  # [R, NC, H, L, K]; exp(b_L - b_j)
    d_state = jnp.einsum("rchlk,rchlv->rchkv", k_to_end, vc)  # [R, NC, H, K, V]
    entering, _, final = scan_chunk_states(_decay_step, (d_state, b_last), plan, initial_state,
                                           (heads, key_dim, value_dim), dtype)
    q_from_start = qc * (scale * jnp.exp(b))[..., None]  # [R, NC, H, L, K]
    o_inter = jnp.einsum("rchlk,rchkv->rchlv", q_from_start, entering)
    o = from_chunks(jnp.swapaxes(o_intra + o_inter, 2, 3), plan)  # [R, NC, L, H, V] -> [B, T, H, V]
    return o.astype(v.dtype), final
