"""The delta rule in chunks (the WY / UT form), shared by ``delta_rule`` and ``gated_delta_rule``.

Both ops run ``S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` with
``o_t = scale * q_t^T S_t``; ``a_t = exp(g_t)`` for the gated form and ``a_t = 1`` without a
gate. Inside a chunk entering with state ``S_0``, with ``b_i`` the inclusive in-chunk sum of
log-gates, ``Gamma_ij = exp(b_i - b_j)`` for ``j <= i`` (else 0) and ``gamma_i = exp(b_i)``::

    S_t = gamma_t S_0 + sum_{j<=t} Gamma_tj k_j u_j^T
    (I + A) [W | U] = [diag(beta gamma) K | diag(beta) V],  A = tril(diag(beta) (Gamma * K K^T), -1)
    u   = U - W S_0                                 (the values each token actually writes)
    o   = scale (gamma * Q) S_0 + scale ((Q K^T) * Gamma) u
    S_L = gamma_L S_0 + (K * exp(b_L - b))^T u

(derivations: the READMEs of ``kernels/delta_rule`` and ``kernels/gated_delta_rule``).
``I + A`` is unit lower triangular; its inverse (:func:`unit_lower_inverse`, matmuls only)
gives ``W, U``. Everything that does not involve ``S_0`` is computed for all chunks at once,
and the scan across chunks does only ``u = U - W S_c`` and
``S_{c+1} = gamma_L S_c + K_end^T u`` (two matmuls). The backward pass (the loop's written
out) keeps one ``K x V`` state per chunk, never one per token. Without a gate
(``g is None``) every decay is 1 and no exponential is computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common.chunking import (
    ChunkPlan,
    chunk_cumsum,
    chunk_suffix_sum,
    from_head_major,
    maybe_tune_cpu_malloc,
    pairwise_decay,
    plan_chunks,
    scan_chunk_states,
    to_head_major,
)
from linearnexus.kernels.common.validation import compute_dtype


@jax.custom_jvp
def unit_lower_inverse(a: Array) -> Array:
    """``(I + a)^{-1}`` for strictly lower-triangular ``a [..., L, L]``, by 2 x 2 block recursion.

    Starting from 1 x 1 diagonal blocks, each level inverts blocks twice as large from the
    inverses already known: ``[[M11, 0], [A21, M22]]^{-1} = [[X11, 0], [-X22 A21 X11, X22]]``.
    Every intermediate is the inverse of a principal block, itself a block of the answer, so
    nothing grows beyond it: unlike the Neumann product ``prod_k (I + (-a)^{2^k})``, which
    cancels huge terms when keys are correlated. ``L`` is padded to a power of two (the
    padding inverts to identity). All matmuls, about ``2 L^3 / 3`` flops per matrix; the
    derivative is written out (``dX = -X da X``), so the backward pass is two matmuls.

    Not ``jax.scipy.linalg.solve_triangular``: on a busy 2-core CPU its batched LAPACK kernel
    took 0.4-12 s per fwd+bwd of 256 64 x 64 systems (this: 20-60 ms), and one run hung for
    good, both XLA pool threads waiting inside jaxlib's ``TriMatrixEquationSolver``.
    """
    length = a.shape[-1]
    size = 1 << (length - 1).bit_length()
    if size != length:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, size - length)] * 2)
    lead = a.shape[:-2]
    x = jnp.ones((*lead, size, 1, 1), a.dtype)  # [..., n, s, s]: inverses of the diagonal blocks
    s = 1
    while s < size:
        n = size // s  # s-blocks per side; the pairs to merge are blocks (2m, 2m) and (2m+1, 2m+1)
        # [..., size, size] -> [..., n, s, n, s] -> (swap) [..., n, n, s, s] -> [..., n*n, s, s]
        grid = jnp.swapaxes(a.reshape(*lead, n, s, n, s), -3, -2).reshape(*lead, n * n, s, s)
        # block (2m+1, 2m) of the [n, n] grid sits at n + m (2n + 2) once flattened: a strided
        # slice (a gather, and a slow scatter in the backward pass, otherwise)
        a21 = grid[..., n :: 2 * n + 2, :, :]  # [..., n/2, s, s]
        x = x.reshape(*lead, n // 2, 2, s, s)  # [..., n, s, s] -> [..., n/2, 2, s, s]: pairs
        x11, x22 = x[..., 0, :, :], x[..., 1, :, :]
        x21 = -jnp.matmul(x22, jnp.matmul(a21, x11))
        top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
        x = jnp.concatenate([top, jnp.concatenate([x21, x22], axis=-1)], axis=-2)
        s *= 2
    # [..., 1, size, size] (one block left) -> [..., size, size], padding cut off
    return x.reshape(*lead, size, size)[..., :length, :length]


@unit_lower_inverse.defjvp
def _inverse_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    # d(M^-1) = -M^-1 dM M^-1 with dM the strictly lower part of da. Its transpose (what
    # autodiff runs backward) is -X^T dX X^T: two full matmuls instead of differentiating
    # every level of the recursion
    (a,), (da,) = primals, tangents
    x = unit_lower_inverse(a)
    return x, -jnp.matmul(x, jnp.matmul(jnp.tril(da, -1), x))


def _chunk_step(state: Array, w: Array, u0: Array, k_end: Array,
                log_decay: Array | None) -> tuple[Array, Array]:
    """One chunk: ``u = U - W S_c``, ``S_{c+1} = exp(a_c) S_c + K_end^T u`` (no decay when
    ``log_decay`` is None). ``state [R, H, K, V]``, ``w, k_end [R, H, L, K]``, ``u0
    [R, H, L, V]``, ``log_decay [R, H]`` -> ``(next_state, u [R, H, L, V])``."""
    u = u0 - jnp.einsum("rhlk,rhkv->rhlv", w, state)
    kept = state if log_decay is None else jnp.exp(log_decay)[..., None, None] * state
    return kept + jnp.einsum("rhlk,rhlv->rhkv", k_end, u), u


def _delta_scan(w: Array, u0: Array, k_end: Array, log_decay: Array | None,
                initial_state: Array) -> tuple[Array, Array, Array]:
    """The sequential part in the batch layout, head-major, with a hand-written backward.

    For each chunk ``c`` entering with ``S_c``: ``u_c = U_c - W_c S_c`` and
    ``S_{c+1} = exp(a_c) S_c + K_end_c^T u_c``.

    Args:
        w, k_end: ``[R, H, NC, L, K]``. u0: ``[R, H, NC, L, V]`` (``U``).
        log_decay: ``[R, H, NC]`` (``a_c = b_L``) or None (no decay).
        initial_state: ``[R, H, K, V]``.

    Returns:
        ``(entering [R, H, NC, K, V], u [R, H, NC, L, V], final [R, H, K, V])``.

    A ``fori_loop`` that slices the chunk axis in place (no chunk-major copies of the
    inputs or of the stacked outputs, which ``lax.scan`` needs). The backward loop runs
    only the two matmuls the state's cotangent needs per chunk (``du_c = dU_c + K_end_c
    dS_{c+1}``, ``dS_c = exp(a_c) dS_{c+1} - W_c^T du_c + dEntering_c``); the parameter
    gradients (``dW = -du S^T``, ``dK_end = u dS_{c+1}^T``, ``da``) are batched matmuls
    over all chunks afterwards. Autodiff of the scan did all four per chunk in the loop.
    """
    n_chunks = w.shape[2]

    def at(x, c):  # [R, H, NC, ...] -> [R, H, ...] at chunk c
        return jax.lax.dynamic_index_in_dim(x, c, axis=2, keepdims=False)

    def put(buf, x, c):
        return jax.lax.dynamic_update_index_in_dim(buf, x, c, axis=2)

    def decayed(state, log_decay, c):  # exp(a_c) S for state [R, H, K, V]
        return state if log_decay is None else jnp.exp(at(log_decay, c))[..., None, None] * state

    def forward(w, u0, k_end, log_decay, initial_state):
        def body(c, carry):
            state, entering, u = carry
            nxt, u_c = _chunk_step(state, at(w, c), at(u0, c), at(k_end, c),
                                   None if log_decay is None else at(log_decay, c))
            return nxt, put(entering, state, c), put(u, u_c, c)

        shape = (*w.shape[:3], w.shape[4], u0.shape[4])  # [R, H, NC, K, V]
        carry = (initial_state, jnp.zeros(shape, w.dtype), jnp.zeros_like(u0))
        final, entering, u = jax.lax.fori_loop(0, n_chunks, body, carry)
        return (entering, u, final), (w, k_end, log_decay, entering, u)

    @jax.custom_vjp
    def run(w, u0, k_end, log_decay, initial_state):
        return forward(w, u0, k_end, log_decay, initial_state)[0]

    def bwd(res, cts):
        w, k_end, log_decay, entering, u = res
        d_entering, d_u_out, d_final = cts

        def body(i, carry):
            c = n_chunks - 1 - i
            d_next, d_u, d_nexts = carry  # d_next: the cotangent of S_{c+1}
            du_c = at(d_u_out, c) + jnp.einsum("rhlk,rhkv->rhlv", at(k_end, c), d_next)
            d_state = at(d_entering, c) - jnp.einsum("rhlk,rhlv->rhkv", at(w, c), du_c)
            d_state = d_state + decayed(d_next, log_decay, c)
            return d_state, put(d_u, du_c, c), put(d_nexts, d_next, c)

        carry = (d_final, jnp.zeros_like(d_u_out), jnp.zeros_like(d_entering))
        d_initial, d_u, d_nexts = jax.lax.fori_loop(0, n_chunks, body, carry)
        dw = -jnp.einsum("rhclv,rhckv->rhclk", d_u, entering)  # [R, H, NC, L, K]
        dk_end = jnp.einsum("rhclv,rhckv->rhclk", u, d_nexts)
        d_log_decay = (None if log_decay is None else  # exp(a_c) <dS_{c+1}, S_c>
                       jnp.exp(log_decay) * jnp.sum(d_nexts * entering, axis=(-2, -1)))
        return dw, d_u, dk_end, d_log_decay, d_initial

    run.defvjp(forward, bwd)
    return run(w, u0, k_end, log_decay, initial_state)


def _packed_scan(w: Array, u0: Array, k_end: Array, log_decay: Array | None, plan: ChunkPlan,
                 initial_state: Array | None) -> tuple[Array, Array, Array]:
    """:func:`_delta_scan` for the packed layout (the state restarts at sequence starts),
    through ``scan_chunk_states`` and autodiff; returns ``final [N, H, K, V]``."""

    def step(state, w_c, u0_c, k_end_c, *a_c):  # state [R, H, K, V]; x_c [R, H, L, *]
        return _chunk_step(state, w_c, u0_c, k_end_c, a_c[0] if a_c else None)

    xs = (w, u0, k_end) + (() if log_decay is None else (log_decay,))
    xs = tuple(jnp.moveaxis(x, 2, 1) for x in xs)  # [R, H, NC, ...] -> [R, NC, H, ...]
    heads, key_dim, value_dim = w.shape[1], w.shape[4], u0.shape[4]
    entering, u, final = scan_chunk_states(step, xs, plan, initial_state,
                                           (heads, key_dim, value_dim), w.dtype)
    return jnp.moveaxis(entering, 1, 2), jnp.moveaxis(u, 1, 2), final


def delta_chunked(q: Array, k: Array, v: Array, beta: Array, g: Array | None, *, scale: float,
                  initial_state: Array | None = None, cu_seqlens: Array | None = None,
                  chunk_size: int = 64) -> tuple[Array, Array]:
    """Chunked (gated) delta rule.

    Args:
        q, k: ``[B, T, H, K]`` (k L2-normalised). v: ``[B, T, H, V]``. beta: ``[B, T, H]``.
        g: ``[B, T, H]`` log-gates, or None for the ungated delta rule.
        scale: multiplies ``q``. initial_state: ``[N, H, K, V]`` or None.
        cu_seqlens: ``[N+1]`` int offsets of packed sequences (B == 1) or None.
        chunk_size: L, tokens per chunk.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 (float64 for f64))``.
    """
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[3]
    gates = () if g is None else (g.dtype,)
    dtype = compute_dtype(q.dtype, k.dtype, v.dtype, beta.dtype, *gates)
    maybe_tune_cpu_malloc()
    plan = plan_chunks(batch, seq, chunk_size, cu_seqlens)
    length = plan.chunk
    # heads before chunks, so every einsum below is a plain batched matmul
    qc, kc, vc = (to_head_major(x.astype(dtype), plan) for x in (q, k, v))  # [R, H, NC, L, *]
    betac = to_head_major(beta.astype(dtype), plan)[..., None]  # [R, H, NC, L, 1]
    kk = jnp.einsum("rhcik,rhcjk->rhcij", kc, kc)  # [R, H, NC, L(i), L(j)]
    qk = jnp.einsum("rhcik,rhcjk->rhcij", qc, kc) * scale
    strict = jnp.tril(jnp.ones((length, length), bool), -1)
    if g is None:
        scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), qk, 0.0)
        a = jnp.where(strict, kk, 0.0) * betac  # A = tril(diag(beta) K K^T, -1)
        k_beta = kc * betac
        k_end = kc
        log_decay = None
    else:
        gc = to_head_major(g.astype(dtype), plan)  # [R, H, NC, L]
        b = chunk_cumsum(gc)  # [R, H, NC, L] inclusive, within each chunk
        log_decay = b[..., -1]  # [R, H, NC]
        decay = pairwise_decay(gc)  # [R, H, NC, L(i), L(j)], 0 above the diagonal
        scores = qk * decay
        a = jnp.where(strict, kk * decay, 0.0) * betac
        gamma = jnp.exp(b)[..., None]  # [R, H, NC, L, 1], <= 1
        k_beta = kc * (betac * gamma)
        # exp(b_L - b_j), the suffix summed directly (see chunk_suffix_sum)
        k_end = kc * jnp.exp(chunk_suffix_sum(gc))[..., None]  # [R, H, NC, L, K]
    # (I + A) [W | U] = [beta gamma K | beta V]; two matmuls rather than one on a concatenation,
    # which cost a copy each way
    inv = unit_lower_inverse(a)  # [R, H, NC, L, L]
    w = jnp.matmul(inv, k_beta)  # [R, H, NC, L, K]
    u0 = jnp.matmul(inv, vc * betac)  # [R, H, NC, L, V]
    q_from_start = qc * scale if g is None else qc * (scale * gamma)  # [R, H, NC, L, K]
    if not plan.packed and plan.n_chunks == 1:  # one chunk per row (short training windows)
        if initial_state is None:  # nothing enters: u = U, S_1 = K_end^T U
            u = u0
            final = jnp.einsum("rhclk,rhclv->rhkv", k_end, u)  # [R, H, K, V]
            o = jnp.einsum("rhcij,rhcjv->rhciv", scores, u)
        else:
            start = initial_state.astype(dtype)  # [R, H, K, V]
            final, u = _chunk_step(start, w[:, :, 0], u0[:, :, 0], k_end[:, :, 0],
                                   None if g is None else log_decay[:, :, 0])
            u = u[:, :, None]  # [R, H, L, V] -> [R, H, 1, L, V]
            o = (jnp.einsum("rhcij,rhcjv->rhciv", scores, u)
                 + jnp.einsum("rhclk,rhkv->rhclv", q_from_start, start))
        return from_head_major(o, plan).astype(v.dtype), final
    if plan.packed:
        entering, u, final = _packed_scan(w, u0, k_end, log_decay, plan, initial_state)
    else:
        start = (jnp.zeros((batch, heads, key_dim, value_dim), dtype) if initial_state is None
                 else initial_state.astype(dtype))
        entering, u, final = _delta_scan(w, u0, k_end, log_decay, start)
    o = (jnp.einsum("rhcij,rhcjv->rhciv", scores, u)
         + jnp.einsum("rhclk,rhckv->rhclv", q_from_start, entering))
    return from_head_major(o, plan).astype(v.dtype), final  # [R, H, NC, L, V] -> [B, T, H, V]
