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
``S_{c+1} = gamma_L S_c + K_end^T u`` (two matmuls). Autodiff keeps one ``K x V`` state per
chunk, never one per token. Without a gate (``g is None``) every decay is 1 and no
exponential is computed.
"""

from __future__ import annotations

import jax
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


def _ungated_step(state: Array, w: Array, u0: Array, k_end: Array) -> tuple[Array, Array]:
    """``u = U - W S_c``; ``S_{c+1} = S_c + K^T u``. ``state [R, H, K, V]``, ``w, k_end
    [R, H, L, K]``, ``u0 [R, H, L, V]`` -> ``(next_state, u [R, H, L, V])``."""
    u = u0 - jnp.einsum("rhlk,rhkv->rhlv", w, state)
    return state + jnp.einsum("rhlk,rhlv->rhkv", k_end, u), u


def _gated_step(state: Array, w: Array, u0: Array, k_end: Array,
                log_decay: Array) -> tuple[Array, Array]:
    """As :func:`_ungated_step`, with ``S_{c+1} = exp(b_L) S_c + K_end^T u``; ``log_decay [R, H]``."""
    u = u0 - jnp.einsum("rhlk,rhkv->rhlv", w, state)
    nxt = jnp.exp(log_decay)[..., None, None] * state + jnp.einsum("rhlk,rhlv->rhkv", k_end, u)
    return nxt, u


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
    # heads before time inside a chunk, so every einsum below is a plain batched matmul
    qc, kc, vc = (jnp.swapaxes(to_chunks(x.astype(dtype), plan), 2, 3)
                  for x in (q, k, v))  # [B, T, H, *] -> [R, NC, H, L, *]
    betac = jnp.swapaxes(to_chunks(beta.astype(dtype), plan), 2, 3)[..., None]  # [R, NC, H, L, 1]
    kk = jnp.einsum("rchik,rchjk->rchij", kc, kc)  # [R, NC, H, L(i), L(j)]
    qk = jnp.einsum("rchik,rchjk->rchij", qc, kc) * scale
    strict = jnp.tril(jnp.ones((length, length), bool), -1)
    if g is None:
        scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), qk, 0.0)
        a = jnp.where(strict, kk, 0.0) * betac  # A = tril(diag(beta) K K^T, -1)
        k_beta = kc * betac
        k_end = kc
    else:
        gc = jnp.swapaxes(to_chunks(g.astype(dtype), plan), 2, 3)  # [R, NC, H, L]
        b = chunk_cumsum(gc)  # [R, NC, H, L] inclusive, within each chunk
        b_last = b[..., -1]  # [R, NC, H]
        decay = pairwise_decay(gc)  # [R, NC, H, L(i), L(j)], 0 above the diagonal
        scores = qk * decay
        a = jnp.where(strict, kk * decay, 0.0) * betac
        gamma = jnp.exp(b)[..., None]  # [R, NC, H, L, 1], <= 1
        k_beta = kc * (betac * gamma)
        # exp(b_L - b_j), the suffix summed directly (see chunk_suffix_sum)
        k_end = kc * jnp.exp(chunk_suffix_sum(gc))[..., None]  # [R, NC, H, L, K]
    # (I + A) [W | U] = [beta gamma K | beta V]; two matmuls rather than one on a concatenation,
    # which cost a copy each way
    inv = unit_lower_inverse(a)  # [R, NC, H, L, L]
    w = jnp.matmul(inv, k_beta)  # [R, NC, H, L, K]
    u0 = jnp.matmul(inv, vc * betac)  # [R, NC, H, L, V]
    if g is None:
        step, xs = _ungated_step, (w, u0, k_end)
    else:
        step, xs = _gated_step, (w, u0, k_end, b_last)
    entering, u, final = scan_chunk_states(step, xs, plan, initial_state,
                                           (heads, key_dim, value_dim), dtype)
    q_from_start = qc * scale if g is None else qc * (scale * gamma)  # [R, NC, H, L, K]
    o = (jnp.einsum("rchij,rchjv->rchiv", scores, u)
         + jnp.einsum("rchlk,rchkv->rchlv", q_from_start, entering))
    o = from_chunks(jnp.swapaxes(o, 2, 3), plan)  # [R, NC, L, H, V] -> [B, T, H, V]
    return o.astype(v.dtype), final
