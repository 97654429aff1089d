"""GLA in chunks: matmuls inside a chunk, a scan of states across chunks.

With ``b_i`` the inclusive in-chunk sum of log-gates (a vector over K) and ``S_0`` the state
entering the chunk (README.md has the derivation)::

    o_i = scale * (q_i * exp(b_i))^T S_0 + scale * sum_{j<=i} sum_k q_ik k_jk exp(b_ik - b_jk) v_j
    S_L = diag(exp(b_L)) S_0 + sum_j (k_j * exp(b_L - b_j)) v_j^T

The decay differs per key dimension, so unlike simple GLA it cannot be pulled out of the
``q . k`` product as one ``L x L`` matrix; two ways to keep the intra-chunk term a matmul:

* **dense** (fast, the usual case): ``exp(b_i - b_j) = exp(b_i - c) exp(c - b_j)`` with
  ``c`` the middle of the chunk's range of ``b`` per key dimension: one ``L x L`` matmul of
  ``q exp(b - c)`` and ``k exp(c - b)``. Exact, but the factors reach ``exp(span / 2)``, so
  it is used only when every chunk's ``sum |g|`` (which bounds the span) is at most
  ``2 * DENSE_MAX_EXPONENT``.
* **tree** (any decay): the causal ``L x L`` block splits into its lower-left quadrant and
  two diagonal halves, recursively. A quadrant's queries all follow, and its keys all
  precede, the midpoint ``m`` between its halves, so its decay factors into
  ``exp(sum_{m<t<=i} g_t) exp(sum_{j<t<=m} g_t)``: both exponents <= 0, each summed over
  exactly its own steps. ``log2 L`` levels of block matmuls plus the diagonal ``q_i . k_i``.

The choice is made once per call from the gates (:func:`_fast_unless_needed`). The
backward pass (autodiff) keeps one state per chunk, never one per token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from linearnexus.core.types import Array
from linearnexus.kernels.common.chunking import (
    ChunkPlan,
    chunk_cumsum,
    from_chunks,
    maybe_tune_cpu_malloc,
    plan_chunks,
    scan_chunk_states,
    to_chunks,
)
from linearnexus.kernels.common.validation import compute_dtype

#: the dense form's factors stay within exp(+-DENSE_MAX_EXPONENT); its masked (j > i)
#: entries within exp(2 * DENSE_MAX_EXPONENT) ~ 1e26 times |q||k|, far from float32 overflow
DENSE_MAX_EXPONENT = 30.0

_PLAN_ARRAYS = ("src", "dst", "reset", "seq_of_chunk", "last_chunk")


def _scan_step(state: Array, kv: Array, log_decay: Array, kv_shift: Array,
               q_shift: Array) -> tuple[Array, Array]:
    """One chunk: the entering ``state [R, H, K, V]`` -> the next one, and the entering
    state as the queries read it.

    ``S_next = diag(exp(b_L)) S + diag(exp(kv_shift)) kv`` and the queries (which come as
    ``q_i exp(b_i - q_shift)``) read ``diag(exp(q_shift)) S``. ``log_decay, kv_shift,
    q_shift: [R, H, K]``.
    """
    nxt = (jnp.exp(log_decay)[..., :, None] * state
           + jnp.exp(kv_shift)[..., :, None] * kv)
    return nxt, jnp.exp(q_shift)[..., :, None] * state


def _in_chunk_sums(g_t: Array) -> tuple[Array, Array]:
    """``g_t [..., K, L]`` -> ``(b, r)``, both ``[..., K, L]``: ``b_i = sum_{t<=i} g_t`` and
    ``r_j = sum_{t>j} g_t`` (so ``exp(r_j)`` carries key j to the chunk's end).

    One matmul with ``[upper | strictly lower]`` ones (see ``chunk_cumsum`` for why not
    ``jnp.cumsum``). ``r`` is summed directly rather than as ``b_L - b``: that difference
    would make a strongly decayed key's gradient a cancellation of O(1) terms.
    """
    length = g_t.shape[-1]
    ones = jnp.ones((length, length), g_t.dtype)
    sums = jnp.concatenate([jnp.triu(ones), jnp.tril(ones, -1)], axis=1)  # [L(t), 2L]
    out = jnp.matmul(g_t, sums, precision=jax.lax.Precision.HIGHEST)
    return out[..., :length], out[..., length:]


def _intra_dense(q_side: Array, k_side: Array, vc: Array) -> Array:
    """Intra-chunk output ``[..., L, V]`` from ``q_side = q exp(b - c)`` and
    ``k_side = k exp(c - b)`` (``[..., L, K]``): one causally masked ``L x L`` matmul."""
    length = q_side.shape[-2]
    scores = jnp.einsum("...ik,...jk->...ij", q_side, k_side)  # [..., L, L]
    # a constant 0/1 mask (not jnp.where): under autodiff a where's broadcast zeros and
    # predicate become full-size residuals. Scores are finite (|exponents| are bounded).
    causal = np.tril(np.ones((length, length), np.dtype(scores.dtype)))
    return jnp.einsum("...ij,...jv->...iv", scores * causal, vc)


def _tree_exponents(size: int, dtype) -> Array:
    """``[S, log2(S) * S]`` 0/1 matrix: ``g_t [..., K, S] @ it`` gives, for every level
    ``h = 1, 2, ..., S/2`` of :func:`_intra_tree`, the exponent each token needs there:
    ``sum_{m<t<=i} g_t`` for a token i in the second half of its ``2h`` block (a query) and
    ``sum_{i<t<=m} g_t`` for one in the first half (a key), ``m`` the block's midpoint."""
    t = np.arange(size)[:, None]
    i = np.arange(size)[None, :]
    mats = []
    half = 1
    while half < size:
        m = (i // (2 * half)) * 2 * half + half - 1
        mats.append(np.where(i > m, (m < t) & (t <= i), (i < t) & (t <= m)))
        half *= 2
    return jnp.asarray(np.concatenate(mats, axis=1), dtype)


def _intra_tree(qc: Array, kc: Array, vc: Array, g_t: Array) -> Array:
    """Intra-chunk output ``[..., L, V]`` for any decay, by recursive halving (module doc).

    ``qc, kc: [..., L, K]``, ``vc: [..., L, V]``, ``g_t: [..., K, L]`` log-gates. Each level's
    exponents are sums over exactly the steps between a pair's token and the midpoint, so
    they lose no precision to large in-chunk sums and every exponent is <= 0 for decay.
    L is padded to a power of two here (q = k = v = g = 0: inert).
    """
    length = qc.shape[-2]
    size = 1 << (length - 1).bit_length()
    if size != length:
        pad = [(0, 0)] * (qc.ndim - 2) + [(0, size - length), (0, 0)]
        qc, kc, vc = (jnp.pad(x, pad) for x in (qc, kc, vc))
        g_t = jnp.pad(g_t, pad[:-2] + [(0, 0), (0, size - length)])
    lead = qc.shape[:-2]
    exponents = jnp.matmul(g_t, _tree_exponents(size, g_t.dtype),
                           precision=jax.lax.Precision.HIGHEST)  # [..., K, log2(S) * S]
    out = jnp.sum(qc * kc, axis=-1, keepdims=True) * vc  # the diagonal, decay exp(0) = 1
    half, level = 1, 0
    while half < size:
        n_blocks = size // (2 * half)

        def split(x, n_blocks=n_blocks, half=half):  # [..., S, D] -> [..., S/2h, 2, h, D]
            return x.reshape(*lead, n_blocks, 2, half, x.shape[-1])

        e = split(jnp.swapaxes(exponents[..., level * size : (level + 1) * size], -1, -2))
        qs, ks, vs = split(qc), split(kc), split(vc)
        q_after = qs[..., 1, :, :] * jnp.exp(e[..., 1, :, :])  # [..., S/2h, h, K]
        k_before = ks[..., 0, :, :] * jnp.exp(e[..., 0, :, :])
        scores = jnp.einsum("...ik,...jk->...ij", q_after, k_before)  # [..., S/2h, h, h]
        o_after = jnp.einsum("...ij,...jv->...iv", scores, vs[..., 0, :, :])
        # the quadrant writes only the second half's rows: [..., S/2h, 2, h, V] -> [..., S, V]
        out = out + jnp.stack([jnp.zeros_like(o_after), o_after], axis=-3).reshape(out.shape)
        half, level = half * 2, level + 1
    return out[..., :length, :]


@jax.custom_jvp
def _factor_decay(qc: Array, kc: Array, rel: Array) -> tuple[Array, Array]:
    """``(qc * exp(rel), kc * exp(-rel))``. The derivative rule reuses the outputs, so
    autodiff keeps ``exp(rel)`` and the two outputs rather than also ``qc`` and ``kc``."""
    scale = jnp.exp(rel)
    return qc * scale, kc / scale


@_factor_decay.defjvp
def _factor_decay_jvp(primals, tangents):
    qc, kc, rel = primals
    d_qc, d_kc, d_rel = tangents
    scale = jnp.exp(rel)
    q_side, k_side = qc * scale, kc / scale
    return (q_side, k_side), (d_qc * scale + q_side * d_rel, d_kc / scale - k_side * d_rel)


def _chunk_major(x: Array) -> Array:
    """``[R, NC, L, H, D] -> [NC, R, H, L, D]``: the dots below batch over (c, r, h), and
    chunk-major states are what the scan across chunks walks."""
    return jnp.transpose(x, (1, 0, 3, 2, 4))


def _inter_chunk(q_side: Array, k_side: Array, vc: Array, b_last: Array, kv_shift: Array,
                 q_shift: Array, plan: ChunkPlan, initial_state: Array | None,
                 dtype) -> tuple[Array | None, Array]:
    """Chunk states and what the queries read from them: ``(o_inter [NC, R, H, L, V],
    final [N, H, K, V])``. ``q_side, k_side [NC, R, H, L, K]``; see :func:`_scan_step`.
    ``o_inter`` is None when it is zero (one chunk per row and no initial state)."""
    shape = (q_side.shape[2], q_side.shape[4], vc.shape[4])
    kv = jnp.einsum("crhlk,crhlv->crhkv", k_side, vc)  # [NC, R, H, K, V]
    if not plan.packed and q_side.shape[0] == 1:  # one chunk per row: no scan
        if initial_state is None:
            return None, jnp.exp(kv_shift[0])[..., None] * kv[0]  # [R, H, K, V]
        start = initial_state.astype(dtype)  # [R, H, K, V]
        state, read = _scan_step(start, kv[0], b_last[0], kv_shift[0], q_shift[0])
        return jnp.einsum("rhlk,rhkv->rhlv", q_side[0], read)[None], state
    # scan_chunk_states wants [R, NC, ...] and scans over [NC, R, ...]: the swaps cancel
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (kv, b_last, kv_shift, q_shift))
    _, entering, final = scan_chunk_states(_scan_step, xs, plan, initial_state, shape, dtype)
    return jnp.einsum("crhlk,crhkv->crhlv", q_side, jnp.swapaxes(entering, 0, 1)), final


def _dense_path(q_raw: Array, k_raw: Array, v_raw: Array, g_raw: Array,
                initial_state: Array | None, *, plan: ChunkPlan,
                scale: float) -> tuple[Array, Array]:
    """The whole op with the dense intra-chunk form; inputs ``[R, NC, L, H, D]``, returns
    ``(o [R, NC, L, H, V], final)``. Exact when every chunk's ``sum |g|`` is at most
    ``2 * DENSE_MAX_EXPONENT`` (the caller checks); finite otherwise."""
    qc, kc, vc = _chunk_major(q_raw) * scale, _chunk_major(k_raw), _chunk_major(v_raw)
    b_t = chunk_cumsum(jnp.transpose(g_raw, (1, 0, 3, 4, 2)))  # [NC, R, H, K, L]
    b = jnp.swapaxes(b_t, -1, -2)  # [NC, R, H, L, K]
    b_last = b_t[..., -1]  # [NC, R, H, K]
    # c: the middle of each key dimension's range of b in the chunk; the result does not
    # depend on it (README), hence stop_gradient. The clip (on the value only) keeps this
    # path finite where its result is discarded for the tree path's.
    mid = jax.lax.stop_gradient(0.5 * (jnp.max(b_t, axis=-1) + jnp.min(b_t, axis=-1)))
    rel = b - mid[..., None, :]
    bound = DENSE_MAX_EXPONENT + 1.0
    rel = rel + jax.lax.stop_gradient(jnp.clip(rel, -bound, bound) - rel)
    q_side, k_side = _factor_decay(qc, kc, rel)  # [NC, R, H, L, K]
    o_intra = _intra_dense(q_side, k_side, vc)
    o_inter, final = _inter_chunk(q_side, k_side, vc, b_last, b_last - mid, mid, plan,
                                  initial_state, b.dtype)
    o = o_intra if o_inter is None else o_intra + o_inter
    return jnp.transpose(o, (1, 0, 3, 2, 4)), final


def _tree_path(q_raw: Array, k_raw: Array, v_raw: Array, g_raw: Array,
               initial_state: Array | None, *, plan: ChunkPlan,
               scale: float) -> tuple[Array, Array]:
    """The whole op with the tree intra-chunk form (any decay); as :func:`_dense_path`.

    One chunk per step of the scan across chunks, rematerialised in the backward pass. Done
    batched, the tree's temporaries are several times the inputs, and XLA sizes every
    call's scratch memory for them even when this (rare) path does not run, which made
    the dense case measurably slower on the CPU.
    """

    def step(state, q_c, k_c, v_c, g_c):  # state [R, H, K, V]; x_c [R, L, H, D]
        qc, kc, vc = (jnp.swapaxes(x, 1, 2) for x in (q_c * scale, k_c, v_c))  # [R, H, L, D]
        g_t = jnp.transpose(g_c, (0, 2, 3, 1))  # [R, H, K, L]
        b_t, r_t = _in_chunk_sums(g_t)
        q_side = qc * jnp.exp(jnp.swapaxes(b_t, -1, -2))  # q_i exp(b_i), exponents <= 0
        k_side = kc * jnp.exp(jnp.swapaxes(r_t, -1, -2))  # k_j exp(r_j), exponents <= 0
        o = _intra_tree(qc, kc, vc, g_t) + jnp.einsum("rhlk,rhkv->rhlv", q_side, state)
        nxt = (jnp.exp(b_t[..., -1])[..., :, None] * state
               + jnp.einsum("rhlk,rhlv->rhkv", k_side, vc))
        return nxt, jnp.swapaxes(o, 1, 2)  # [R, L, H, V]

    shape = (q_raw.shape[3], q_raw.shape[4], v_raw.shape[4])
    _, o, final = scan_chunk_states(jax.checkpoint(step), (q_raw, k_raw, v_raw, g_raw), plan,
                                    initial_state, shape, q_raw.dtype)
    return o, final


def _unless(pred: Array, value: Any, fallback: Callable[[], Any]) -> Any:
    """``value`` if ``pred`` else ``fallback()``; ``value`` is computed outside the cond."""
    return jax.lax.cond(pred, lambda: value, fallback)


def _fast_unless_needed(pred: Array, fast: Callable[..., Any], slow: Callable[..., Any],
                        aux: Any, *args: Any) -> Any:
    """``fast(aux, *args)`` where ``pred``, else ``slow(aux, *args)``, differentiable.

    ``fast`` always runs, outside any conditional (its result is discarded when ``pred``
    is false, so there it only has to be finite and cheap) and keeps exactly its own
    autodiff residuals; ``slow`` runs only when needed and is recomputed in the backward
    pass. Plain ``lax.cond(pred, fast, slow)`` was slower for the fast case: XLA:CPU
    copies at a conditional's boundary, and autodiff makes each branch emit the union of
    both branches' residuals (zeros for the other's).

    ``aux``: a pytree of arrays that get no gradient (a custom_vjp must not close over
    traced values, so they travel as an argument).
    """

    @jax.custom_vjp
    def run(pred, aux, *a):
        return _unless(pred, fast(aux, *a), lambda: slow(aux, *a))

    def fwd(pred, aux, *a):
        out, fast_vjp = jax.vjp(lambda *x: fast(aux, *x), *a)
        return _unless(pred, out, lambda: slow(aux, *a)), (pred, aux, a, fast_vjp)

    def bwd(res, ct):
        pred, aux, a, fast_vjp = res
        grads = _unless(pred, fast_vjp(ct), lambda: jax.vjp(lambda *x: slow(aux, *x), *a)[1](ct))
        return (None, None, *grads)

    run.defvjp(fwd, bwd)
    return run(pred, aux, *args)


def gla_chunked(q: Array, k: Array, v: Array, g: Array, *, scale: float,
                initial_state: Array | None = None, cu_seqlens: Array | None = None,
                chunk_size: int = 64) -> tuple[Array, Array]:
    """Chunked GLA; arguments and returns as :func:`~linearnexus.kernels.gla.reference.gla_reference`.

    The dense form runs when every chunk's ``sum |g|`` (over its steps, per key dimension)
    is at most ``2 * DENSE_MAX_EXPONENT`` (it bounds the range of ``b``), else the tree form.
    """
    dtype = compute_dtype(q.dtype, k.dtype, v.dtype, g.dtype)
    maybe_tune_cpu_malloc()
    plan = plan_chunks(q.shape[0], q.shape[1], chunk_size, cu_seqlens)
    arrays = tuple(x.astype(dtype) for x in (q, k, v, g))
    if initial_state is not None:
        initial_state = initial_state.astype(dtype)
    g_sums = jnp.sum(jnp.abs(to_chunks(arrays[3], plan)), axis=2)  # [R, NC, H, K]
    dense = jnp.max(g_sums) <= 2.0 * DENSE_MAX_EXPONENT
    # the plan's arrays (packed layout) are traced, so they travel as an argument
    traced = {f: getattr(plan, f) for f in _PLAN_ARRAYS if getattr(plan, f) is not None}
    static = plan._replace(**{f: None for f in traced})

    def path(run_path, traced, q, k, v, g, initial_state):
        """[B, T, H, D] in and out (gradients too, so they cross the fallback's loop in
        their final layout); each path is complete, so the backward of the one that ran
        gives every cotangent."""
        plan = static._replace(**traced)
        chunks = (to_chunks(x, plan) for x in (q, k, v, g))  # [R, NC, L, H, D]
        o, final = run_path(*chunks, initial_state, plan=plan, scale=scale)
        return from_chunks(o, plan), final

    o, final = _fast_unless_needed(dense, functools.partial(path, _dense_path),
                                   functools.partial(path, _tree_path), traced,
                                   *arrays, initial_state)
    return o.astype(v.dtype), final
