"""Simple GLA in chunks: matmuls inside a chunk, a scan of states across chunks.

With ``b_i`` the inclusive sum of log-gates inside a chunk and ``S_0`` the state entering
it (see README.md for the derivation)::

    o_i  = scale * exp(b_i) q_i^T S_0 + scale * sum_{j<=i} exp(b_i - b_j) (q_i . k_j) v_j
    S_L  = exp(b_L) S_0 + sum_j exp(b_L - b_j) k_j v_j^T

Every exponent is a difference ``b_i - b_j`` with ``j <= i`` (<= 0), so strong decay
underflows to zero instead of overflowing. The intra-chunk terms of all chunks are
batched matmuls, and so is ``S_{c+1} = exp(b_L) S_c + dS_c`` across chunks when there are
few (:func:`~linearnexus.kernels.common.chunking.decayed_chunk_states`). The backward pass
(written out in ``_core``) keeps one state per chunk, never one per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from linearnexus.core.types import Array
from linearnexus.kernels.common.chunking import (
    ChunkPlan,
    chunk_cumsum,
    chunk_suffix_sum,
    decayed_chunk_states,
    from_head_major,
    maybe_tune_cpu_malloc,
    pairwise_decay,
    plan_chunks,
    split_plan,
    to_head_major,
)
from linearnexus.kernels.common.validation import compute_dtype


def _core(plan: ChunkPlan, scale: float, traced: dict[str, Array], qc: Array, kc: Array,
          vc: Array, gc: Array, initial_state: Array | None) -> tuple[Array, Array]:
    """The op on head-major chunks (``[R, H, NC, L, D]``, gates ``[R, H, NC, L]``) with a
    hand-written backward pass; returns ``(o [R, H, NC, L, V], final [N, H, K, V])``.
    ``plan`` without its arrays, which come as ``traced`` (see ``split_plan``).

    Autodiff of the forward differentiated the decay matrix (a ``[L, L*L]`` matmul each
    way) and kept its masks as residuals. Here each log-gate ``g_t`` gets the sum of what
    flows through the exponents that contain it, every term summed over exactly its own
    pairs (so strong decay loses no digits to cancellation, as in ``pairwise_decay``):

    * in-chunk pairs ``j < t <= i``: ``P_ij = dA_ij * scores_ij`` (``dA = dO V^T``, the
      diagonal left out: ``exp(0)``), summed over exactly those pairs (``P @ U`` with
      ``U[j, t] = [j < t]``, then over ``i >= t``);
    * queries reading the entering state (``i >= t``): ``q_i . dq_i`` of that term;
    * keys written into the next state (``j < t``): ``k_j . dk_j`` of that term;
    * the state's decay ``exp(b_L)`` (every ``t``).

    Backward: ten matmuls per chunk (two of them ``[L, L]`` sums), no ``[L, L]`` mask
    residuals, plus the states' backward.
    """

    def forward(traced, qc, kc, vc, gc, initial_state):
        def states(d_state, log_decay, initial_state):
            return decayed_chunk_states(d_state, log_decay, plan._replace(**traced),
                                        initial_state)

        b = chunk_cumsum(gc)  # [R, H, NC, L] inclusive, within each chunk
        decay = pairwise_decay(gc) * scale  # [R, H, NC, L(i), L(j)], 0 above the diagonal
        scores = jnp.einsum("rhcik,rhcjk->rhcij", qc, kc) * decay
        to_end = jnp.exp(chunk_suffix_sum(gc))[..., None]  # [R, H, NC, L, 1]: exp(b_L - b_j)
        k_to_end = kc * to_end
        d_state = jnp.einsum("rhclk,rhclv->rhckv", k_to_end, vc)  # [R, H, NC, K, V]
        (entering, final), states_vjp = jax.vjp(states, d_state, b[..., -1], initial_state)
        from_start = (scale * jnp.exp(b))[..., None]  # [R, H, NC, L, 1]
        o = (jnp.einsum("rhcij,rhcjv->rhciv", scores, vc)
             + jnp.einsum("rhclk,rhckv->rhclv", qc * from_start, entering))
        res = (qc, kc, vc, decay, scores, to_end, k_to_end, from_start, d_state, entering,
               states_vjp)
        return (o, final), res

    @jax.custom_vjp
    def run(traced, qc, kc, vc, gc, initial_state):
        return forward(traced, qc, kc, vc, gc, initial_state)[0]

    def bwd(res, cts):
        qc, kc, vc, decay, scores, to_end, k_to_end, from_start, d_state, entering, \
            states_vjp = res
        do, d_final = cts  # [R, H, NC, L, V], [N, H, K, V]
        d_entering = jnp.einsum("rhclk,rhclv->rhckv", qc * from_start, do)
        d_d_state, d_log_decay, d_initial = states_vjp((d_entering, d_final))
        d_a = jnp.einsum("rhciv,rhcjv->rhcij", do, vc)  # [R, H, NC, L(i), L(j)]
        d_scores = d_a * decay
        length = scores.shape[-1]
        strict = np.tril(np.ones((length, length), np.dtype(scores.dtype)), -1)
        pairs = d_a * scores * strict  # P_ij for j < i (the diagonal's decay is exp(0))
        dq_inter = jnp.einsum("rhclv,rhckv->rhclk", do, entering) * from_start
        dk_state = jnp.einsum("rhclv,rhckv->rhclk", vc, d_d_state) * to_end
        dq = jnp.einsum("rhcij,rhcjk->rhcik", d_scores, kc) + dq_inter
        dk = jnp.einsum("rhcij,rhcik->rhcjk", d_scores, qc) + dk_state
        dv = (jnp.einsum("rhcij,rhciv->rhcjv", scores, do)
              + jnp.einsum("rhclk,rhckv->rhclv", k_to_end, d_d_state))
        # the pairs j < t <= i: crossing_it = sum_{j < t} P_ij (P @ U, U[j, t] = [j < t]),
        # then summed over i >= t. Row sums minus column sums, reverse-summed, are the same
        # in exact arithmetic but cancel: a strongly decayed t next to mild ones got an
        # error of eps times the chunk's largest P
        crossing = chunk_cumsum(pairs, inclusive=False)  # [R, H, NC, L(i), L(t)]
        from_t = np.tril(np.ones((length, length), np.dtype(scores.dtype)))  # [i, t]: i >= t
        dg = (jnp.sum(crossing * from_t, axis=-2)  # [R, H, NC, L]
              + chunk_suffix_sum(jnp.sum(qc * dq_inter, -1), inclusive=True)  # i >= t
              + chunk_cumsum(jnp.sum(kc * dk_state, axis=-1), inclusive=False)  # j < t
              + d_log_decay[..., None])
        return None, dq, dk, dv, dg, d_initial

    run.defvjp(forward, bwd)
    return run(traced, qc, kc, vc, gc, initial_state)


def simple_gla_chunked(q: Array, k: Array, v: Array, g: Array, *, scale: float,
                       initial_state: Array | None = None, cu_seqlens: Array | None = None,
                       chunk_size: int = 64) -> tuple[Array, Array]:
    """Chunked simple GLA; arguments and returns as :func:`simple_gla_reference`."""
    batch, seq = q.shape[:2]
    dtype = compute_dtype(q.dtype, k.dtype, v.dtype, g.dtype)
    maybe_tune_cpu_malloc()
    plan = plan_chunks(batch, seq, chunk_size, cu_seqlens)
    qc, kc, vc = (to_head_major(x.astype(dtype), plan) for x in (q, k, v))  # [R, H, NC, L, *]
    gc = to_head_major(g.astype(dtype), plan)  # [R, H, NC, L]
    if initial_state is not None:
        initial_state = initial_state.astype(dtype)
    static, traced = split_plan(plan)  # the packed layout's arrays are traced
    o, final = _core(static, scale, traced, qc, kc, vc, gc, initial_state)
    return from_head_major(o, plan).astype(v.dtype), final
