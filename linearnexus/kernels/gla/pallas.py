"""GLA's ``pallas`` backend: Pallas (Triton) kernels for a log-gate per key dimension.

Per chunk of L tokens, entering with state ``S_c [K, V]``, with ``b`` the inclusive in-chunk
sum of the log-gates (float32, a vector over K per token) and ``b_L`` its last row::

    o       = scale * [ (q * e^b) S_c + A v ],   A_ij = sum_k q_ik k_jk e^{b_ik - b_jk}  (j <= i)
    S_{c+1} = diag(e^{b_L}) S_c + (k * e^{b_L - b})^T v

The decay of ``A`` depends on the key dimension, so it cannot multiply one ``L x L`` score
matrix as in simple GLA, and ``e^{b_i - b_j}`` must never be formed as ``e^{b_i} e^{-b_j}``
over an unbounded span (it overflows). Two forms, chosen per program at run time:

* **Factored (the fast path).** With ``b_0`` the chunk's first row,
  ``A = mask((q e^{b - b_0}) (k e^{b_0 - b})^T)``: one ``L x L x K`` matmul. Stable whenever
  the chunk's decay ``max_k (b_0 - b_{L-1})`` is at most :data:`DIAG_DENSE_MAX` (40): the
  first factor lies in ``[e^-40, 1]``, the second in ``[1, e^40]``, every kept product
  ``e^{b_i - b_j}`` is <= 1 with each factor rounded on its own (float32), and the
  masked-out products (``j > i``, up to ``e^40 |q||k| K``) stay finite. Its rounding grows
  with ``|b - b_0|`` rather than ``|b_i - b_j|`` (the exp of each factor is ~``2^-24 |x|``
  off): float32 output 7e-7 against the walk's 1.2e-7 at a decay of 39.5 per chunk
  (interpret mode); at usual decays the two agree. The operands are
  float32, multiplied as TF32 for 16-bit inputs (bfloat16 operands, as FLA's sub-chunk
  products take, raised the bf16 output error; TF32 lowered it below the sub-chunk form's)
  and exactly for float32 inputs. The backward's ``dq``, ``dk`` are the same products with
  ``dA``. Usual gates are far from the bound (GLA's ``log sigmoid(x) / 16``: ~3 per chunk).
* **By sub-chunks** (any decay, as in FLA): the chunk is cut into sub-chunks of 16 tokens;
  pairs ``I > J`` go through the reference row ``r`` (the last row of ``J``),
  ``A_IJ = (q_I e^{b_I - b_r}) (k_J e^{b_r - b_J})^T`` (both exponents <= 0); a diagonal
  block is the factored product over its 16 tokens where their decay is at most
  :data:`DIAG_DENSE_MAX`, else exact by a walk over its 16 key rows ``j`` (column ``j`` is
  ``sum_k q_I k_j e^{b_I - b_j}``, the exponent masked to ``-inf`` where ``i < j`` before
  the exp; each walk loads row ``j + 1`` while it works on row ``j``).

Pallas's Triton lowering slices only refs, never values, so every sub-block and row is
loaded from its ref. Kernels (``R`` rows of the chunk layout, ``H`` heads, ``NC`` chunks):

* ``sums`` (grid ``[K blocks, chunks, rows x heads]``): the compensated in-chunk sums
  ``b = hi + lo`` of the log-gates (:func:`_in_chunk_sums`).
* ``fwd_a`` (grid ``[1, chunks, rows x heads]``): ``A`` for every chunk, stored float32
  ``[R, TP, H, L]`` (zeros above the diagonal) and reused by ``fwd_o`` and ``bwd_dv``.
* ``fwd_h`` (grid ``[K blocks, V blocks, rows x heads]``): the sequential walk over chunks,
  as in ``common/pallas_chunk.py`` with a decay per state row.
* ``fwd_o`` (grid ``[V blocks, chunks, rows x heads]``).
* ``bwd_dh`` (as ``fwd_h``, chunks in reverse):
  ``dS_c = diag(e^{b_L}) dS_{c+1} + scale (q e^b)^T do``.
* ``bwd_da`` (grid ``[1, chunks, rows x heads]``): ``dA = scale (do v^T)``, masked ``j <= i``.
* ``bwd_dv`` (grid ``[V blocks, chunks, rows x heads]``):
  ``dv = scale A^T do + (k e^{b_L - b}) dS_{c+1}``.
* ``bwd_dqk`` (grid ``[K blocks, chunks, rows x heads]``): ``dq``, ``dk`` (inter-chunk
  parts by matmuls with ``S_c`` / ``dS_{c+1}``, intra-chunk by either form) and the
  per-token terms of the gate gradient. Sub-chunks that need the walk get float32 partials
  here, and ``bwd_dqk_walk`` (grid ``[K blocks x sub-chunks, chunks, rows x heads]``,
  ``SUB_WARPS`` warps; every other program returns at once) adds their diagonal blocks.
* ``dg`` (grid ``[K blocks, chunks, rows x heads]``): the gate gradient's in-chunk sums.

Gate gradient. It is taken chunk by chunk (``g`` of chunk c acts only on chunk c's outputs
and on ``S_{c+1}``, given ``S_c``), per key dimension::

    dg_t = sum_{i >= t} [ q_i dq_i^inter + q_i dq_i^intra' - k_i dk_i^intra' ]
           + e^{b_L} <S_c, dS_{c+1}>  +  sum_{j < t} k_j dk_j^inter

where ``'`` leaves out the diagonal (``i == j``) pairs, whose contributions to ``q.dq`` and
``k.dk`` cancel exactly. ``bwd_dqk`` stores the first bracket (with the ``<S_c, dS_{c+1}>``
term on the chunk's last row) and ``k dk^inter`` (one row down); the ``dg`` kernel takes
the in-chunk reverse (inclusive) and forward (exclusive) sums as affine scans. Unlike the global identity
``dB_t = q.dq - k.dk (+ <S_T, dS_T>)`` followed by a reverse cumsum over the sequence,
no O(1) terms cancel here: under strong decay (log-gates near -20) the true ``dg`` is
~e^-20 times the other gradients, and those cancellations left rounding noise of the size
of ``dg`` itself.

Exponent precision. Exponents that are differences ``b_i - b_j`` use a compensated in-chunk
sum ``b = hi + lo`` (``hi`` float32, ``lo`` bfloat16, :func:`_in_chunk_sums`) as
``(hi_i - hi_j) + (lo_i - lo_j)``. With ``hi`` alone, a one-step difference at log-gates
near -20 carries the rounding of a sum near ``-20 L``, and the gate gradient (all of whose
entries are then ~e^-20, made of exactly such one-step terms) was off by 1.5e-5 (L = 32);
with ``lo`` it is at float32 rounding. Absolute exponents (``e^{b_i}``, ``e^{b_L}``) take
``hi`` alone: they matter only where ``|b|`` is small, and there ``hi`` is accurate.

Inputs come in the chunk layout ``[R, NC * L, H, D]`` (``common/chunking.py``) with head
dims padded to powers of two >= 16 (padded key dims have q = k = 0, g = 0: inert).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas import TritonConfig
from linearnexus.kernels.common.pallas_chunk import (
    CoreStatic,
    _call,
    _causal,
    _dot,
    _has_chunk,
    _row_col,
    _state_block,
    _value_block,
    _walk,
    chunk_layout_info,
)
from linearnexus.kernels.common.pallas_ops import (
    LOG_GATE_FLOOR,
    _chunk_of,
    _layout,
    _pad_last,
    _prepare,
    _static,
    _unlayout,
    check_pallas_dtype,
)
from linearnexus.kernels.common.pallas_scan import compensated_cumsum, exp_approx, linear_scan

F32 = jnp.float32
#: rows of a sub-chunk (the smallest ``jnp.dot`` operand the Triton lowering takes)
SUB = 16
#: warps of ``bwd_dqk_walk``, whose tiles are only ``[16, K]``. Chosen when every diagonal block
#: took the walk (H200, bf16 (8, 4096, 16, 128), 2026-11-23, fwd / fwd+bwd: 3.95 / 10.08 ms at
#: 2 warps against 4.70 / 11.82 at 4, 5.43 / 13.67 at 1 and 7.39 / 14.51 at 8); not
#: re-measured since the walk became the strong-decay fallback
SUB_WARPS = 2
#: largest decay ``max_k (b_first - b_last)`` over a chunk (or a 16-token sub-chunk) for which
#: its block of ``A`` (and of ``dA`` in the backward) is one factored matmul (module doc).
#: ``e^40 ~ 2e17``: the factors and the masked-out products (``j > i``, up to
#: ``e^40 |q||k| K``) stay far inside float32's range. Stronger decay takes the sub-chunk
#: form, per program.
DIAG_DENSE_MAX = 40.0


def default_config(*, rows: int, heads: int, key_dim: int, value_dim: int) -> TritonConfig:
    """The heuristic launch config for GLA.

    * chunk 64 (as FLA): one 64 x 64 factored product per chunk on the fast path, 4
      sub-chunks of 16 otherwise; the per-chunk state store (``K x V`` per 64 tokens) stays
      under the q/k/v/g traffic. Shorter chunks store more states, longer ones grow the
      ``L^2`` intra-chunk work quadratically and reach the factored form's decay bound
      sooner.
    * block_k = block_v = 64: a 64 x 64 float32 state is 32 registers a thread at 4 warps in
      the sequential kernels (``fwd_h``, ``bwd_dh``). block_v stays 64 even when that
      leaves few programs: for simple_gla's ``fwd_h`` (the same walk with a scalar decay)
      block_v 16 was 4.6x slower at (8, 4096, 16, 128) on an H200 and 1.3x at
      (2, 16384, 16, 128). ``fwd_a`` and ``bwd_da`` take all of K / V in one program.
    * warps: 4 (``bwd_dqk`` at 8 was 6% slower fwd+bwd at (8, 4096, 16, 128) on an H200,
      despite its register spills at 4), ``SUB_WARPS`` for ``bwd_dqk_walk``.
    """
    del rows, heads
    block_k = min(64, key_dim)
    block_v = min(64, value_dim)
    return TritonConfig(chunk=64, block_k=block_k, block_v=block_v, num_warps=4, num_stages=2)


def _resolve(cfg: TritonConfig, *, rows, heads, key_dim, value_dim) -> TritonConfig:
    if cfg.par_block_k is not None:
        raise ValueError(f"config: par_block_k is a knob of the shared chunk core (simple_gla, the "
                         f"delta rules); GLA's kernels take block_k, got par_block_k={cfg.par_block_k}")
    cfg = cfg.merged(default_config(rows=rows, heads=heads, key_dim=key_dim, value_dim=value_dim))
    if key_dim % cfg.block_k or value_dim % cfg.block_v:
        raise ValueError(f"config: block_k={cfg.block_k} / block_v={cfg.block_v} must divide the "
                         f"padded head dims K={key_dim} / V={value_dim}")
    return cfg


# ----------------------------------------------------------------------------- helpers


def _iota(shape, axis: int) -> Array:
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _rows(t0, i) -> pl.Slice:
    """The rows of sub-chunk ``i`` of the chunk starting at token ``t0``."""
    return pl.ds(t0 + i * SUB, SUB)


def _load_b(b_ref, c_ref, *idx) -> tuple[Array, Array]:
    """``(hi, lo)`` of the in-chunk log-decay at ``idx``, ``b = hi + lo`` (:func:`_in_chunk_sums`)."""
    return b_ref[idx], c_ref[idx].astype(F32)


def _gap(x: tuple[Array, Array], y: tuple[Array, Array]) -> Array:
    """``x - y`` of two compensated sums, accurate to the rounding of the result itself."""
    return (x[0] - y[0]) + (x[1] - y[1])


def _keys_to_ref(k_ref, b_ref, c_ref, r, h, t0, bj, ks) -> tuple[tuple[Array, Array], Array]:
    """``(b_r, k_J e^{b_r - b_J})`` for sub-chunk ``bj`` (``J``), ``b_r`` its last row's
    log-decay: keys decayed up to the reference row (exponents <= 0)."""
    b_r = _load_b(b_ref, c_ref, r, t0 + bj * SUB + SUB - 1, h, ks)  # [BK]
    rows = _rows(t0, bj)
    return b_r, _scaled(k_ref[r, rows, h, ks], _gap(b_r, _load_b(b_ref, c_ref, r, rows, h, ks)))


def _queries_from_ref(q_ref, b_ref, c_ref, r, rows, h, ks, b_r) -> Array:
    """``q_I e^{b_I - b_r}`` for the query rows ``rows`` (``I``, after the reference row)."""
    return _scaled(q_ref[r, rows, h, ks], _gap(_load_b(b_ref, c_ref, r, rows, h, ks), b_r))


def _dense_over(b_ref, c_ref, r, h, first, last, ks) -> Array:
    """Whether the decay from token row ``first`` to ``last``, ``max_k (b_first - b_last)``
    over the key dims ``ks``, is at most :data:`DIAG_DENSE_MAX` (a scalar). A NaN decay gives
    False in interpret mode; Triton's max skips NaN lanes. Every kernel that must agree on
    the answer evaluates it on the same values, so they agree either way."""
    b0 = _load_b(b_ref, c_ref, r, first, h, ks)  # [BK]
    b1 = _load_b(b_ref, c_ref, r, last, h, ks)
    return jnp.max(_gap(b0, b1)) <= DIAG_DENSE_MAX


def _diag_dense(b_ref, c_ref, r, h, t0, bi, ks) -> Array:
    """Whether the diagonal block of sub-chunk ``bi`` may go through the factored product
    ``(q_I e^{b_I - b_0}) (k_I e^{b_0 - b_I})^T`` (``b_0``: the sub-chunk's first row): the
    decay over the sub-chunk is at most :data:`DIAG_DENSE_MAX` (:func:`_dense_over`). Then
    the first factor is <= 1, the second <= e^{DIAG_DENSE_MAX}, and every kept product
    (``j <= i``) is ``e^{b_i - b_j} <= 1``, each factor with its own float32 rounding (about
    ``2^-24 |b - b_0|`` relative, against the walk's ``2^-24 |b_i - b_j|``).
    """
    return _dense_over(b_ref, c_ref, r, h, t0 + bi * SUB, t0 + bi * SUB + SUB - 1, ks)


def _factors(b_ref, c_ref, r, h, row0, ks, b) -> tuple[Array, Array]:
    """``(e^{b - b_0}, e^{b_0 - b})`` of a factored block whose first token row is ``row0``
    (``b_0``), for its rows' log-decay ``b [n, BK]`` (:func:`_dense_over`)."""
    x = _gap(b, _load_b(b_ref, c_ref, r, row0, h, ks))  # <= 0
    return exp_approx(x), exp_approx(-x)


def _factored_scores(q_ref, k_ref, b_ref, c_ref, r, h, rows, row0, st: CoreStatic,
                     decayed: tuple[Any, Any] | None = None) -> Array:
    """``(q e^{b - b_0}) (k e^{b_0 - b})^T`` over all key dims (blocks of ``block_k``) for the
    token rows ``rows`` (first row ``row0``): ``[n, n]`` float32, unmasked.

    ``decayed`` (``(qe_ref, ke_ref)``, a whole chunk's rows): also write the chunk walk's
    operands from the same loads and exponentials, ``q e^{b} = (q e^{b - b_0}) e^{b_0}`` and
    ``k e^{b_L - b} = (k e^{b_0 - b}) e^{b_L - b_0}`` (one ``[BK]`` exponential each per key
    block, in place of two more ``[n, BK]`` ones and a second read of q, k and ``b``)."""
    n, BK = rows.size, st.block_k
    acc = jnp.zeros((n, n), F32)
    for ik in range(st.key_dim // BK):
        ks = pl.ds(ik * BK, BK)
        e_q, e_k = _factors(b_ref, c_ref, r, h, row0, ks, _load_b(b_ref, c_ref, r, rows, h, ks))
        qf = q_ref[r, rows, h, ks].astype(F32) * e_q
        kf = k_ref[r, rows, h, ks].astype(F32) * e_k
        acc += _diag_dot(qf, kf, exact=q_ref.dtype == F32, tb=True)
        if decayed is not None:
            qe_ref, ke_ref = decayed
            b0 = _load_b(b_ref, c_ref, r, row0, h, ks)  # [BK]
            b_last = _load_b(b_ref, c_ref, r, row0 + n - 1, h, ks)
            qe_ref[r, rows, h, ks] = (qf * exp_approx(b0[0] + b0[1])[None, :]).astype(
                qe_ref.dtype)
            ke_ref[r, rows, h, ks] = (kf * exp_approx(_gap(b_last, b0))[None, :]).astype(
                ke_ref.dtype)
    return acc


def _diag_dot(a: Array, b: Array, *, exact: bool, ta: bool = False, tb: bool = False) -> Array:
    """A factored product's matmul (a chunk's or a diagonal block's) on float32 operands:
    exact float32 for float32 inputs, TF32 for 16-bit ones (10 mantissa bits: bfloat16
    operands, as the sub-chunk form's off-diagonal blocks take, raised the bf16 output error
    from 2.8e-3 to 3.3e-3 at T = 512)."""
    if ta:
        a = a.T
    if tb:
        b = b.T
    precision = jax.lax.Precision.HIGHEST if exact else jax.lax.Precision.DEFAULT
    return jnp.dot(a, b, preferred_element_type=F32, precision=(precision, precision))


def _scaled(x: Array, exponent: Array) -> Array:
    """``x * exp(exponent)`` computed in float32, back in ``x``'s dtype (a matmul operand)."""
    return (x.astype(F32) * exp_approx(exponent)).astype(x.dtype)


# ----------------------------------------------------------------------------- forward


def _fwd_a_kernel(q_ref, k_ref, b_ref, c_ref, a_ref, qe_ref=None, ke_ref=None, *,
                  st: CoreStatic):
    """``A`` for one chunk (without ``scale``), one program per (chunk, row x head).

    Where the chunk's decay, ``max_k (b_0 - b_{L-1})``, is at most :data:`DIAG_DENSE_MAX`,
    ``A`` is one masked matmul ``(q e^{b - b_0}) (k e^{b_0 - b})^T`` (first factor <= 1,
    second <= e^{DIAG_DENSE_MAX}; every kept product ``e^{b_i - b_j} <= 1``; float32
    operands, TF32 for 16-bit inputs). Otherwise the program builds it sub-chunk by
    sub-chunk (:func:`_fwd_a_rows`), stable at any decay.

    With ``qe_ref`` / ``ke_ref`` (the Mosaic GPU forward, ``gla/mosaic.py``) it also writes
    the decayed operands of the chunk walk, in the input dtype: ``q e^{b}`` and
    ``k e^{b_L - b}``, both factors <= 1; on the one-matmul path from the factored operands
    it already holds (:func:`_factored_scores`), on the sub-chunk path directly.
    """
    L = st.chunk
    c = pl.program_id(1)
    r, h = _row_col(st)
    t0 = c * L
    rows = pl.ds(t0, L)
    decayed = None if qe_ref is None else (qe_ref, ke_ref)
    dense = _dense_over(b_ref, c_ref, r, h, t0, t0 + L - 1, pl.ds(0, st.key_dim))

    @pl.when(dense)
    def _one_matmul():  # (the decayed operands from the factored product's own operands)
        acc = _factored_scores(q_ref, k_ref, b_ref, c_ref, r, h, rows, t0, st, decayed)
        a_ref[r, rows, h, pl.ds(0, L)] = jnp.where(_causal(L), acc, 0.0).astype(a_ref.dtype)

    @pl.when(jnp.logical_not(dense))
    def _by_sub_chunks():
        if decayed is not None:
            for ik in range(st.key_dim // st.block_k):
                ks = pl.ds(ik * st.block_k, st.block_k)
                b = _load_b(b_ref, c_ref, r, rows, h, ks)  # [L, BK]
                qe_ref[r, rows, h, ks] = _scaled(q_ref[r, rows, h, ks], b[0] + b[1])
                b_last = _load_b(b_ref, c_ref, r, t0 + L - 1, h, ks)  # [BK]
                ke_ref[r, rows, h, ks] = _scaled(k_ref[r, rows, h, ks], _gap(b_last, b))
        for bi in range(L // SUB):
            _fwd_a_rows(q_ref, k_ref, b_ref, c_ref, a_ref, bi, r, h, t0, st=st)


def _fwd_a_rows(q_ref, k_ref, b_ref, c_ref, a_ref, bi, r, h, t0, *, st: CoreStatic):
    """Row block ``bi`` of ``A`` for the chunk starting at token ``t0``, at any decay.

    Blocks left of the diagonal go through the reference row as matmuls. The diagonal
    block is one factored matmul where the sub-chunk's decay allows (:func:`_diag_dense`),
    else built column by column, each column stored as soon as it is summed over K (no
    assembling of a ``[16, 16]`` value from columns, which cost a layout conversion per
    column). ``bi`` is static (the sub-chunks of a program are unrolled).
    """
    L, BK = st.chunk, st.block_k
    ns = L // SUB
    ri = _rows(t0, bi)
    whole = pl.ds(0, st.key_dim)
    dense = _diag_dense(b_ref, c_ref, r, h, t0, bi, whole)

    @pl.when(dense)
    def _diag_matmul():
        acc = _factored_scores(q_ref, k_ref, b_ref, c_ref, r, h, ri, t0 + bi * SUB, st)
        a_ref[r, ri, h, pl.ds(bi * SUB, SUB)] = jnp.where(_causal(SUB), acc, 0.0).astype(
            a_ref.dtype)

    @pl.when(jnp.logical_not(dense))
    def _diag_walk():
        qf = q_ref[r, ri, h, whole].astype(F32)
        b = _load_b(b_ref, c_ref, r, ri, h, whole)  # [SUB, K] float32
        row_i = _iota((SUB, st.key_dim), 0)

        def key_row(j):  # row j of the sub-chunk (clamped: the walk prefetches one row ahead)
            row = t0 + bi * SUB + jnp.minimum(j, SUB - 1)
            return k_ref[r, row, h, whole].astype(F32), _load_b(b_ref, c_ref, r, row, h, whole)

        def column(j, cur):
            k_j, b_j = cur
            nxt = key_row(j + 1)  # issued before this column's math and store
            e = exp_approx(jnp.where(row_i >= j, _gap(b, b_j), -jnp.inf))
            # zero above i
            a_ref[r, ri, h, bi * SUB + j] = jnp.sum(qf * k_j[None, :] * e, axis=1).astype(
                a_ref.dtype)
            return nxt

        jax.lax.fori_loop(0, SUB, column, key_row(0))

    for bj in range(ns):

        @pl.when(bj < bi)
        def _below(bj=bj):  # through the reference row (last row of sub-chunk bj)
            acc = jnp.zeros((SUB, SUB), F32)
            for ik in range(st.key_dim // BK):
                ks = pl.ds(ik * BK, BK)
                b_r, kj = _keys_to_ref(k_ref, b_ref, c_ref, r, h, t0, bj, ks)
                acc += _dot(_queries_from_ref(q_ref, b_ref, c_ref, r, ri, h, ks, b_r), kj, tb=True)
            a_ref[r, ri, h, pl.ds(bj * SUB, SUB)] = acc.astype(a_ref.dtype)

        @pl.when(bj > bi)
        def _above(bj=bj):
            a_ref[r, ri, h, pl.ds(bj * SUB, SUB)] = jnp.zeros((SUB, SUB), a_ref.dtype)


def _fwd_h_kernel(*, k_ref, v_ref, b_ref, c_ref, h0_ref, seq_ref, flag_ref, h_ref, final_ref,
                  st: CoreStatic):
    """The sequential walk of ``common/pallas_chunk.py`` with a decay per state row."""
    L = st.chunk
    where = r, h, ks, vs = _state_block(st)

    def step(c, t0, state):
        b = _load_b(b_ref, c_ref, r, pl.ds(t0, L), h, ks)  # [L, BK]
        b_last = _load_b(b_ref, c_ref, r, t0 + L - 1, h, ks)  # [BK]
        k = _scaled(k_ref[r, pl.ds(t0, L), h, ks], _gap(b_last, b))
        v = v_ref[r, pl.ds(t0, L), h, vs]
        return state * exp_approx(b_last[0])[:, None] + _dot(k, v, ta=True)

    _walk(st, where, seq_ref, flag_ref, h0_ref, final_ref, h_ref, step, reverse=False)


def _fwd_o_kernel(q_ref, v_ref, h_ref, b_ref, a_ref, o_ref, *, st: CoreStatic):
    L, BK, BV = st.chunk, st.block_k, st.block_v
    r, h, c, t0, vs = _value_block(st, st.block_v)
    acc = jnp.zeros((L, BV), F32)
    for ik in range(st.key_dim // BK):
        ks = pl.ds(ik * BK, BK)
        q = _scaled(q_ref[r, pl.ds(t0, L), h, ks], b_ref[r, pl.ds(t0, L), h, ks])
        acc += _dot(q, h_ref[r, c, h, ks, vs])
    v = v_ref[r, pl.ds(t0, L), h, vs]
    a = a_ref[r, pl.ds(t0, L), h, pl.ds(0, L)]
    o = (acc + _dot(a.astype(v.dtype), v)) * st.scale
    o_ref[r, pl.ds(t0, L), h, vs] = o.astype(o_ref.dtype)


def run_fwd_a(st: CoreStatic, q: Array, k: Array, b: Array, bc: Array, *,
              decayed: bool = False, a_dtype: Any = F32
              ) -> tuple[Array, Array | None, Array | None]:
    """The ``fwd_a`` kernel: ``A [R, TP, H, L]`` (zeros above the diagonal; summed in float32,
    stored in ``a_dtype``) from q, k ``[R, TP, H, K]`` and the compensated in-chunk sums
    ``b`` (float32), ``bc`` (bfloat16). ``decayed``: also ``q e^{b}`` and ``k e^{b_L - b}``
    in q's dtype (else None)."""
    R, TP, H, _ = q.shape
    outs = dict(a=jax.ShapeDtypeStruct((R, TP, H, st.chunk), a_dtype))
    if decayed:
        outs.update(qe=jax.ShapeDtypeStruct(q.shape, q.dtype),
                    ke=jax.ShapeDtypeStruct(k.shape, k.dtype))
    res = _call(functools.partial(_fwd_a_kernel, st=st), st, (1, st.n_chunks, R * H),
                dict(q=q, k=k, b=b, c=bc), outs)
    return res["a"], res.get("qe"), res.get("ke")


def gla_forward(st: CoreStatic, q, k, v, b, bc, h0, seq_info, flags):
    """Run ``fwd_a``, ``fwd_h``, ``fwd_o``; returns ``(o, a, h, final)``."""
    R, NC, L, H, K, V = st.rows, st.n_chunks, st.chunk, st.heads, st.key_dim, st.value_dim
    TP = NC * L
    dt = q.dtype
    nk, nv = K // st.block_k, V // st.block_v
    a = run_fwd_a(st, q, k, b, bc)[0]
    ins = dict(k=k, v=v, b=b, c=bc, h0=h0 if st.has_h0 else None, seq=seq_info, flag=flags)
    outs = dict(h=jax.ShapeDtypeStruct((R, NC, H, K, V), dt),
                final=jax.ShapeDtypeStruct((st.n_seqs, H, K, V), F32))
    res = _call(functools.partial(_fwd_h_kernel, st=st), st, (nk, nv, R * H), ins, outs)
    o = _call(functools.partial(_fwd_o_kernel, st=st), st, (nv, NC, R * H),
              dict(q=q, v=v, h=res["h"], b=b, a=a),
              dict(o=jax.ShapeDtypeStruct((R, TP, H, V), dt)))["o"]
    return o, a, res["h"], res["final"]


# ----------------------------------------------------------------------------- backward


def _bwd_dh_kernel(q_ref, do_ref, b_ref, dht_ref, seq_ref, flag_ref, dh_ref, dh0_ref, *,
                   st: CoreStatic):
    """``dh[c] = dS_{c+1}`` (the gradient of the state leaving chunk c), and ``dh0``."""
    L = st.chunk
    where = r, h, ks, vs = _state_block(st)

    def step(c, t0, ds):
        q = _scaled(q_ref[r, pl.ds(t0, L), h, ks], b_ref[r, pl.ds(t0, L), h, ks])
        do = do_ref[r, pl.ds(t0, L), h, vs]
        b_last = b_ref[r, t0 + L - 1, h, ks]
        return _dot(q, do, ta=True) * st.scale + ds * exp_approx(b_last)[:, None]

    _walk(st, where, seq_ref, flag_ref, dht_ref, dh0_ref, dh_ref, step, reverse=True)


def _bwd_da_kernel(do_ref, v_ref, da_ref, *, st: CoreStatic):
    """``dA = scale * do v^T`` masked to ``j <= i`` (float32)."""
    L, BV = st.chunk, st.block_v
    c = pl.program_id(1)
    r, h = _row_col(st)
    t0 = c * L
    acc = jnp.zeros((L, L), F32)
    for iv in range(st.value_dim // BV):
        vs = pl.ds(iv * BV, BV)
        acc += _dot(do_ref[r, pl.ds(t0, L), h, vs], v_ref[r, pl.ds(t0, L), h, vs], tb=True)
    da_ref[r, pl.ds(t0, L), h, pl.ds(0, L)] = jnp.where(_causal(L), acc * st.scale, 0.0)


def _bwd_dv_kernel(k_ref, do_ref, dh_ref, b_ref, c_ref, a_ref, dv_ref, *, st: CoreStatic):
    L, BK, BV = st.chunk, st.block_k, st.block_v
    r, h, c, t0, vs = _value_block(st, st.block_v)
    acc = jnp.zeros((L, BV), F32)
    for ik in range(st.key_dim // BK):
        ks = pl.ds(ik * BK, BK)
        b = _load_b(b_ref, c_ref, r, pl.ds(t0, L), h, ks)
        b_last = _load_b(b_ref, c_ref, r, t0 + L - 1, h, ks)
        k = _scaled(k_ref[r, pl.ds(t0, L), h, ks], _gap(b_last, b))
        acc += _dot(k, dh_ref[r, c, h, ks, vs])
    do = do_ref[r, pl.ds(t0, L), h, vs]
    a = a_ref[r, pl.ds(t0, L), h, pl.ds(0, L)] * st.scale
    dv = _dot(a.astype(do.dtype), do, ta=True) + acc
    dv_ref[r, pl.ds(t0, L), h, vs] = dv.astype(dv_ref.dtype)


def _sub_chunk_of(st: CoreStatic):
    """``(ik, bi, c, r, h, t0, ks, ri)`` of a program on the ``bwd_dqk_walk`` grid
    ``[K blocks x sub-chunks, chunks, rows x heads]``."""
    ns = st.chunk // SUB
    ik, bi = pl.program_id(0) // ns, pl.program_id(0) % ns
    c = pl.program_id(1)
    r, h = _row_col(st)
    t0 = c * st.chunk
    return ik, bi, c, r, h, t0, pl.ds(ik * st.block_k, st.block_k), _rows(t0, bi)


def _chunk_block(st: CoreStatic):
    """``(r, h, rows, ks)`` of a program on a ``[K blocks, chunks, rows x heads]`` grid: its
    row and head, its chunk's token rows and its key dims."""
    r, h = _row_col(st)
    return (r, h, pl.ds(pl.program_id(1) * st.chunk, st.chunk),
            pl.ds(pl.program_id(0) * st.block_k, st.block_k))


def _factored_grads(da: Array, qf: Array, kf: Array, e_q: Array, e_k: Array,
                    exact: bool) -> tuple[Array, Array, Array]:
    """``(dd, dq, dk)`` of one factored block: ``da [n, n]`` (zero above the diagonal),
    ``qf``, ``kf``, ``e_q = e^{b - b_0}``, ``e_k = e^{b_0 - b}`` ``[n, BK]``. Pairs ``i > j``:
    ``dq_i += e^{b_i - b_0} sum_j dA_ij k_j e^{b_0 - b_j}``,
    ``dk_j += e^{b_0 - b_j} sum_i dA_ij q_i e^{b_i - b_0}``; ``dd`` (``[n]``) is the diagonal of
    ``dA``, whose ``i == j`` pairs go to ``dq``, ``dk`` only (never into the gate gradient)."""
    n = da.shape[0]
    i, j = _iota((n, n), 0), _iota((n, n), 1)
    dd = jnp.sum(jnp.where(i == j, da, 0.0), axis=1)
    strict = jnp.where(i > j, da, 0.0)
    dq = _diag_dot(strict, kf * e_k, exact=exact) * e_q
    dk = _diag_dot(strict, qf * e_q, exact=exact, ta=True) * e_k
    return dd, dq, dk


def _inter_chunk(do_ref, v_ref, h_ref, dh_ref, r, c, h, rows, ks, st: CoreStatic, *,
                 with_hdh: bool) -> tuple[Array, Array, Array]:
    """``(do S_c^T, v dS_{c+1}^T, <S_c, dS_{c+1}> per key row)`` for the token rows ``rows``
    and key dims ``ks`` (summed over V blocks); the last is zeros unless ``with_hdh``."""
    n = rows.size
    acc_q = jnp.zeros((n, st.block_k), F32)
    acc_k = jnp.zeros((n, st.block_k), F32)
    hdh = jnp.zeros((st.block_k,), F32)
    for iv in range(st.value_dim // st.block_v):
        vs = pl.ds(iv * st.block_v, st.block_v)
        s_c = h_ref[r, c, h, ks, vs]
        ds = dh_ref[r, c, h, ks, vs]
        acc_q += _dot(do_ref[r, rows, h, vs], s_c, tb=True)
        acc_k += _dot(v_ref[r, rows, h, vs], ds, tb=True)
        if with_hdh:
            hdh += jnp.sum(s_c.astype(F32) * ds.astype(F32), axis=1)
    return acc_q, acc_k, hdh


def _bwd_dqk_kernel(q_ref, k_ref, v_ref, do_ref, h_ref, dh_ref, b_ref, c_ref, da_ref,
                    dq_ref, dk_ref, p_ref, pk_ref, dq1_ref, dk1_ref, *, st: CoreStatic):
    """``dq``, ``dk`` and the gate-gradient terms of one chunk and K block, by matmuls.

    Where the chunk's decay allows (:func:`_dense_over`, as ``fwd_a``), the whole chunk at
    once: with ``e_q = e^{b - b_0}``, ``e_k = e^{b_0 - b}`` (``b_0``: the chunk's first row)
    and ``dA'`` the strictly lower part of ``dA``, ``dq^intra' = e_q (dA' (k e_k))`` and
    ``dk^intra' = e_k (dA'^T (q e_q))``; the ``i == j`` pairs (``dd``) go to ``dq``, ``dk``
    only. Otherwise sub-chunk by sub-chunk (:func:`_bwd_dqk_rows`). Outputs as
    :func:`_bwd_dqk_rows`.
    """
    L = st.chunk
    ik, c = pl.program_id(0), pl.program_id(1)
    r, h, rows, ks = _chunk_block(st)
    t0 = c * L
    dense = _dense_over(b_ref, c_ref, r, h, t0, t0 + L - 1, ks)
    exact = q_ref.dtype == F32

    @pl.when(dense)
    def _whole_chunk():
        b = _load_b(b_ref, c_ref, r, rows, h, ks)  # [L, BK]
        b_last = _load_b(b_ref, c_ref, r, t0 + L - 1, h, ks)  # [BK]
        e_q, e_k = _factors(b_ref, c_ref, r, h, t0, ks, b)
        qf, kf = q_ref[r, rows, h, ks].astype(F32), k_ref[r, rows, h, ks].astype(F32)
        dd, dq, dk = _factored_grads(da_ref[r, rows, h, pl.ds(0, L)], qf, kf, e_q, e_k, exact)
        acc_q, acc_k, hdh = _inter_chunk(do_ref, v_ref, h_ref, dh_ref, r, c, h, rows, ks, st,
                                         with_hdh=True)
        dq += acc_q * (exp_approx(b[0]) * st.scale)
        dk_inter = acc_k * exp_approx(_gap(b_last, b))
        pk_ref[r, pl.ds(t0 + 1, L), h, ks] = kf * dk_inter  # one row down (_dg_kernel)
        last_row = _iota((L, st.block_k), 0) == L - 1
        p_ref[r, rows, h, ks] = (qf * dq - kf * dk
                                 + jnp.where(last_row, (exp_approx(b_last[0]) * hdh)[None, :], 0.0))
        dq_ref[r, rows, h, ks] = (dq + dd[:, None] * kf).astype(dq_ref.dtype)
        dk_ref[r, rows, h, ks] = (dk + dk_inter + dd[:, None] * qf).astype(dk_ref.dtype)

    @pl.when(jnp.logical_not(dense))
    def _by_sub_chunks():
        for bi in range(L // SUB):
            _bwd_dqk_rows(q_ref, k_ref, v_ref, do_ref, h_ref, dh_ref, b_ref, c_ref, da_ref, dq_ref,
                          dk_ref, p_ref, pk_ref, dq1_ref, dk1_ref, (ik, bi, c, r, h), st=st)


def _bwd_dqk_rows(q_ref, k_ref, v_ref, do_ref, h_ref, dh_ref, b_ref, c_ref, da_ref,
                  dq_ref, dk_ref, p_ref, pk_ref, dq1_ref, dk1_ref, where, *, st: CoreStatic):
    """``dq``, ``dk`` and the gate-gradient terms of sub-chunk ``bi`` (``where``:
    ``(ik, bi, c, r, h)``, ``bi`` static) by matmuls, at any decay.

    Always writes ``pk``: ``k dk^inter`` (final, one row down). Where the sub-chunk's
    diagonal block may be factored (:func:`_diag_dense`) it is two more ``16 x 16`` matmuls
    here, and the program writes its final ``dq``, ``dk`` (input dtype) and ``p``
    (``q dq - k dk`` without the inter-chunk ``dk`` and the cancelling ``i == j`` pairs,
    plus ``e^{b_L} <S_c, dS_{c+1}>`` on the chunk's last row). Otherwise it writes float32
    partials without the diagonal block, ``dq1`` (inter-chunk + blocks left of it), ``dk1``
    (inter-chunk + blocks below) and ``p``, which :func:`_bwd_dqk_walk_kernel` completes
    with the exact walk: a kernel of its own, so that the walks' programs hold no matmul
    operands or states.
    """
    L = st.chunk
    ns = L // SUB
    ik, bi, c, r, h = where
    t0 = c * L
    ks, ri = pl.ds(ik * st.block_k, st.block_k), _rows(t0, bi)
    dt = q_ref.dtype
    row_i = _iota((SUB, st.block_k), 0)
    b_last = _load_b(b_ref, c_ref, r, t0 + L - 1, h, ks)  # [BK]
    qf, kf = q_ref[r, ri, h, ks].astype(F32), k_ref[r, ri, h, ks].astype(F32)
    b = _load_b(b_ref, c_ref, r, ri, h, ks)  # [SUB, BK]
    # the diagonal block first, while few tiles are live (zeros where it takes the walk);
    # pairs i > j: dq_i += e^{b_i - b_0} sum_j dA_ij k_j e^{b_0 - b_j},
    # dk_j += e^{b_0 - b_j} sum_i dA_ij q_i e^{b_i - b_0}; i == j (dd) to dq, dk only
    dense = _diag_dense(b_ref, c_ref, r, h, t0, bi, ks)
    e_q, e_k = _factors(b_ref, c_ref, r, h, t0 + bi * SUB, ks, b)
    dd, dq, dk = _factored_grads(da_ref[r, ri, h, pl.ds(bi * SUB, SUB)], qf, kf, e_q, e_k,
                                 dt == F32)
    dd, dq, dk = (jnp.where(dense, x, 0.0) for x in (dd, dq, dk))
    # <S_c, dS_{c+1}> only where it is used: on the chunk's last row
    acc_q, acc_k, hdh = _inter_chunk(do_ref, v_ref, h_ref, dh_ref, r, c, h, ri, ks, st,
                                     with_hdh=bi == ns - 1)
    dq += acc_q * (exp_approx(b[0]) * st.scale)
    dk_inter = acc_k * exp_approx(_gap(b_last, b))
    pk_ref[r, pl.ds(t0 + bi * SUB + 1, SUB), h, ks] = kf * dk_inter  # one row down (_dg_kernel)

    # intra-chunk, off-diagonal sub-chunk pairs through the reference row
    def key_block(bj, dq):  # keys of sub-chunk bj < bi act on dq_I
        b_r, kj = _keys_to_ref(k_ref, b_ref, c_ref, r, h, t0, bj, ks)
        da = da_ref[r, ri, h, pl.ds(bj * SUB, SUB)]  # dA_IJ [SUB, SUB]
        return dq + _dot(da.astype(dt), kj) * exp_approx(_gap(b, b_r))

    b_r = _load_b(b_ref, c_ref, r, t0 + bi * SUB + SUB - 1, h, ks)

    def query_block(bj, dk):  # queries of sub-chunk bj > bi act on dk_I
        rj = _rows(t0, bj)
        qj = _queries_from_ref(q_ref, b_ref, c_ref, r, rj, h, ks, b_r)
        da = da_ref[r, rj, h, pl.ds(bi * SUB, SUB)]  # dA_JI [SUB, SUB]
        return dk + _dot(da.astype(dt), qj, ta=True) * exp_approx(_gap(b_r, b))

    dq = jax.lax.fori_loop(0, bi, key_block, dq)
    dk = jax.lax.fori_loop(bi + 1, ns, query_block, dk)
    # e^{b_L} <S_c, dS_{c+1}> acts on every token of the chunk: stored on its last row
    last_row = (row_i == SUB - 1) & (bi == ns - 1)
    p_ref[r, ri, h, ks] = (qf * dq - kf * dk
                           + jnp.where(last_row, (exp_approx(b_last[0]) * hdh)[None, :], 0.0))
    dk += dk_inter

    @pl.when(dense)
    def _final():
        dq_ref[r, ri, h, ks] = (dq + dd[:, None] * kf).astype(dq_ref.dtype)
        dk_ref[r, ri, h, ks] = (dk + dd[:, None] * qf).astype(dk_ref.dtype)

    @pl.when(jnp.logical_not(dense))
    def _partials():
        dq1_ref[r, ri, h, ks] = dq
        dk1_ref[r, ri, h, ks] = dk


def _bwd_dqk_walk_kernel(q_ref, k_ref, b_ref, c_ref, da_ref, dq1_ref, dk1_ref, p1_ref,
                         dq0_ref, dk0_ref, dq_ref, dk_ref, p_ref, *, st: CoreStatic):
    """The diagonal ``[16, 16]`` blocks of ``dA`` acting on ``dq`` and ``dk``, exactly, added
    to :func:`_bwd_dqk_rows`'s partials, for the sub-chunks it did not finish
    (``p_ref``, ``dq_ref``, ``dk_ref`` are the buffers of ``p1_ref``, ``dq0_ref``,
    ``dk0_ref``; the other programs return at once).

    Pairs ``i > j`` by two walks over the sub-chunk's rows ``j``, each adding a
    ``[16, BK]`` term with no reduction: keys ``j`` act on ``dq_i`` (i > j) through column
    ``j`` of ``dA``, queries ``j`` on ``dk_i`` (i < j) through row ``j`` (summing over rows
    instead cost a cross-warp reduction per step); each walk prefetches row ``j + 1``
    (clamped) through its carry. The ``i == j`` pairs (``dd``), whose ``q.dq`` and ``k.dk``
    shares cancel in the gate gradient, go to ``dq`` and ``dk`` only.
    """
    del p1_ref, dq0_ref, dk0_ref
    _, bi, _, r, h, t0, ks, ri = _sub_chunk_of(st)
    # the chunk's test as _bwd_dqk_kernel takes it (in floating point the sub-chunk's does
    # not follow from it), then the sub-chunk's as _bwd_dqk_rows takes it
    done = (_dense_over(b_ref, c_ref, r, h, t0, t0 + st.chunk - 1, ks)
            | _diag_dense(b_ref, c_ref, r, h, t0, bi, ks))
    pl.when(jnp.logical_not(done))(functools.partial(
        _diag_walk_grads, q_ref, k_ref, b_ref, c_ref, da_ref, dq1_ref, dk1_ref, dq_ref, dk_ref,
        p_ref, (bi, r, h, t0, ks, ri), st=st))


def _diag_walk_grads(q_ref, k_ref, b_ref, c_ref, da_ref, dq1_ref, dk1_ref, dq_ref, dk_ref, p_ref,
                     where, *, st: CoreStatic):
    """The body of :func:`_bwd_dqk_walk_kernel` for a sub-chunk that takes the walk (``where``:
    its program's ``(bi, r, h, t0, ks, ri)``; interpret mode has no ``program_id`` inside a
    conditional)."""
    bi, r, h, t0, ks, ri = where
    b = _load_b(b_ref, c_ref, r, ri, h, ks)  # [SUB, BK]
    row_i = _iota((SUB, st.block_k), 0)
    sub_i = _iota((SUB,), 0)
    qf, kf = q_ref[r, ri, h, ks].astype(F32), k_ref[r, ri, h, ks].astype(F32)

    def key_row(j):
        j = jnp.minimum(j, SUB - 1)
        row = t0 + bi * SUB + j
        return (da_ref[r, ri, h, bi * SUB + j],  # dA_{i j}, i in the sub-chunk: [SUB]
                k_ref[r, row, h, ks].astype(F32), _load_b(b_ref, c_ref, r, row, h, ks))

    def key_step(j, carry):
        dq, dd, (col, k_j, b_j) = carry
        nxt = key_row(j + 1)
        e = exp_approx(jnp.where(row_i > j, _gap(b, b_j), -jnp.inf))
        return dq + col[:, None] * k_j[None, :] * e, dd + jnp.where(sub_i == j, col, 0.0), nxt

    def query_row(j):
        row = t0 + bi * SUB + jnp.minimum(j, SUB - 1)
        return (da_ref[r, row, h, pl.ds(bi * SUB, SUB)],  # dA_{j i}, i in the sub-chunk: [SUB]
                q_ref[r, row, h, ks].astype(F32), _load_b(b_ref, c_ref, r, row, h, ks))

    def query_step(j, carry):
        dk, (rowda, q_j, b_j) = carry
        nxt = query_row(j + 1)
        e = exp_approx(jnp.where(row_i < j, _gap(b_j, b), -jnp.inf))
        return dk + rowda[:, None] * q_j[None, :] * e, nxt

    zero = jnp.zeros((SUB, st.block_k), F32)
    dq, dd, _ = jax.lax.fori_loop(0, SUB, key_step, (zero, jnp.zeros((SUB,), F32), key_row(0)))
    dk, _ = jax.lax.fori_loop(0, SUB, query_step, (zero, query_row(0)))
    p_ref[r, ri, h, ks] = p_ref[r, ri, h, ks] + qf * dq - kf * dk
    dq_ref[r, ri, h, ks] = (dq1_ref[r, ri, h, ks] + dq + dd[:, None] * kf).astype(dq_ref.dtype)
    dk_ref[r, ri, h, ks] = (dk1_ref[r, ri, h, ks] + dk + dd[:, None] * qf).astype(dk_ref.dtype)


def gla_backward(st: CoreStatic, res, do, dfinal, state_grads=None):
    """Gradients in the chunk layout: ``(dq, dk, dv, p, pk, dh0)`` (``p``, ``pk``: see
    :func:`_bwd_dqk_rows` and :func:`_bwd_dqk_walk_kernel`). ``state_grads``: ``(dv, dh,
    dh0)`` formed elsewhere (the Mosaic GPU walk, ``gla/mosaic.py``'s ``gla_state_grad``),
    in place of ``bwd_dh`` and ``bwd_dv``."""
    q, k, v, b, bc, a, h0, seq_info, flags, h = res
    del h0
    R, NC, L, H, K, V = st.rows, st.n_chunks, st.chunk, st.heads, st.key_dim, st.value_dim
    TP = NC * L
    dt = q.dtype
    nk, nv = K // st.block_k, V // st.block_v
    do = do.astype(dt)
    if state_grads is None:
        outs = dict(dh=jax.ShapeDtypeStruct((R, NC, H, K, V), dt),
                    dh0=jax.ShapeDtypeStruct((st.n_seqs, H, K, V), F32))
        ins = dict(q=q, do=do, b=b, dht=dfinal.astype(F32), seq=seq_info, flag=flags)
        res_ = _call(functools.partial(_bwd_dh_kernel, st=st), st, (nk, nv, R * H), ins, outs)
        dh, dh0 = res_["dh"], res_["dh0"]
        dv = _call(functools.partial(_bwd_dv_kernel, st=st), st, (nv, NC, R * H),
                   dict(k=k, do=do, dh=dh, b=b, c=bc, a=a),
                   dict(dv=jax.ShapeDtypeStruct((R, TP, H, V), dt)))["dv"]
    else:
        dv, dh, dh0 = state_grads
    da = _call(functools.partial(_bwd_da_kernel, st=st), st, (1, NC, R * H),
               dict(do=do, v=v), dict(da=jax.ShapeDtypeStruct((R, TP, H, L), F32)))["da"]
    grid = (nk * (L // SUB), NC, R * H)
    part = jax.ShapeDtypeStruct((R, TP, H, K), F32)
    grad = jax.ShapeDtypeStruct((R, TP, H, K), dt)
    part_down = jax.ShapeDtypeStruct((R, TP + 1, H, K), F32)  # pk, stored one row down
    # the partials dq1, dk1 are written (and read) only by sub-chunks that take the walk
    outs = dict(dq=grad, dk=grad, p=part, pk=part_down, dq1=part, dk1=part)
    ins = dict(q=q, k=k, v=v, do=do, h=h, dh=dh, b=b, c=bc, da=da)
    r1 = _call(functools.partial(_bwd_dqk_kernel, st=st), st, (nk, NC, R * H), ins, outs)
    ins = dict(q=q, k=k, b=b, c=bc, da=da, dq1=r1["dq1"], dk1=r1["dk1"], p1=r1["p"],
               dq0=r1["dq"], dk0=r1["dk"])
    r2 = _call(functools.partial(_bwd_dqk_walk_kernel, st=st), st, grid, ins,
               dict(dq=grad, dk=grad, p=part), warps=SUB_WARPS,
               aliases={"p1": "p", "dq0": "dq", "dk0": "dk"})
    return r2["dq"], r2["dk"], dv, r2["p"], r1["pk"], dh0


# ----------------------------------------------------------------------------- custom_vjp


def _sums_kernel(g_ref, hi_ref, lo_ref, *, st: CoreStatic):
    """One chunk's inclusive in-chunk sums of the log-gates, compensated (``[L, BK]`` tile)."""
    r, h, rows, ks = _chunk_block(st)
    # log-gates floored (LOG_GATE_FLOOR: -inf, a zero gate, would make TwoSum NaN); here rather
    # than in the glue, where it was a pass of its own over the [B, T, H, K] gates. A positive
    # one (not a decay) becomes NaN: it reaches the state, whose final value then marks it
    # for the api's guard (GLA's mosaic backend; the pallas one's guard checks the gates).
    # The where tests g <= 0, false for NaN too: Triton lowers max to maxnumf, which would
    # turn a NaN gate into the floor
    g = g_ref[r, rows, h, ks]
    g = jnp.where(g <= 0, jnp.maximum(g, LOG_GATE_FLOOR), jnp.nan)
    hi, lo = compensated_cumsum(g, axis=0)
    hi_ref[r, rows, h, ks] = hi
    lo_ref[r, rows, h, ks] = lo.astype(lo_ref.dtype)


def _in_chunk_sums(g: Array, st: CoreStatic) -> tuple[Array, Array]:
    """The inclusive in-chunk sums of ``g [R, TP, H, K]`` as ``(hi float32, lo bfloat16)``.

    ``hi + lo`` carries the sum to ~2^-40 relative (:func:`compensated_cumsum`, one Pallas
    kernel; as an XLA associative scan it took ~1 ms at (8, 4096, 16, 128) on the H200, in
    ten fusions). Exponents that are differences ``b_i - b_j`` take
    ``(hi_i - hi_j) + (lo_i - lo_j)``: with ``hi`` alone, a difference of one step at
    log-gates near -20 carries the rounding of a sum near ``-20 L`` (``2e-5`` absolute at
    L = 32), which showed in the gate gradient (whose entries are all ~e^-20 there). ``lo``
    (at most half an ulp of ``hi``) needs no more than bfloat16's 8 bits, which halves its
    memory traffic.
    """
    R, TP, H, K = g.shape
    outs = dict(hi=jax.ShapeDtypeStruct((R, TP, H, K), F32),
                lo=jax.ShapeDtypeStruct((R, TP, H, K), jnp.bfloat16))
    res = _call(functools.partial(_sums_kernel, st=st), st, (K // st.block_k, st.n_chunks, R * H),
                dict(g=g.astype(F32)), outs)
    return res["hi"], res["lo"]


def _dg_kernel(p_ref, pk_ref, dg_ref, *, st: CoreStatic):
    """``dg_t = sum_{i >= t} p_i + sum_{j < t} pk_j`` within one chunk (``[L, BK]`` tile).

    ``pk_ref`` holds ``pk`` one row down (row ``t + 1`` of the buffer is ``pk_t``): the
    chunk's rows of it, first row zeroed, are the exclusive sum's terms, with no
    subtraction (``sum_{j <= t} - pk_t`` cancels: under strong decay the last row's ``pk``
    is O(1) while ``dg`` is ~e^-20).
    """
    r, h, rows, ks = _chunk_block(st)
    p = p_ref[r, rows, h, ks]
    tile = (st.chunk, st.block_k)
    before = jnp.where(_iota(tile, 0) == 0, 0.0, pk_ref[r, rows, h, ks])
    ones = jnp.ones(tile, F32)
    dg_ref[r, rows, h, ks] = (linear_scan(ones, p, axis=0, reverse=True)[1]
                              + linear_scan(ones, before, axis=0)[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gla_core(st: CoreStatic, q, k, v, g, h0, seq_info, flags):
    """GLA in the chunk layout; ``(o [R, TP, H, V], final [N, H, K, V] float32)``.

    Args:
        st: static description (``gate="vector"``). q, k: ``[R, TP, H, K]``. v:
        ``[R, TP, H, V]``. g: ``[R, TP, H, K]`` float32 log-gates. h0: ``[N, H, K, V]``
        float32 or None. seq_info, flags: as :func:`~linearnexus.kernels.common.pallas_chunk.chunk_core`.
    """
    return _core_fwd(st, q, k, v, g, h0, seq_info, flags)[0]


def _core_fwd(st, q, k, v, g, h0, seq_info, flags):
    b, bc = _in_chunk_sums(g, st)
    h0f = None if h0 is None else h0.astype(F32)
    o, a, h, final = gla_forward(st, q, k, v, b, bc, h0f, seq_info, flags)
    empty_final = jnp.zeros_like(final) if h0 is None else h0f
    final = jnp.where(_has_chunk(st, seq_info, flags)[:, None, None, None], final, empty_final)
    return (o, final), (q, k, v, b, bc, a, h0, seq_info, flags, h)


def _core_bwd(st, res, cts, state_grads=None):
    do, dfinal = cts
    h0, seq_info, flags = res[6], res[7], res[8]
    dq, dk, dv, p, pk, dh0 = gla_backward(st, res, do, dfinal, state_grads)
    # dg_t = sum_{i >= t} p_i + sum_{j < t} pk_j, within the chunk (module doc)
    dg = _call(functools.partial(_dg_kernel, st=st), st,
               (st.key_dim // st.block_k, st.n_chunks, st.rows * st.heads),
               dict(p=p, pk=pk), dict(dg=jax.ShapeDtypeStruct(p.shape, F32)))["dg"]
    if h0 is not None:  # a length-0 sequence passes its initial state straight through
        dh0 = jnp.where(_has_chunk(st, seq_info, flags)[:, None, None, None], dh0, dfinal)
        dh0 = dh0.astype(h0.dtype)
    else:
        dh0 = None
    return dq, dk, dv, dg, dh0, None, None


gla_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------- glue


def gla_pallas(q: Array, k: Array, v: Array, g: Array, *, scale: float,
               initial_state: Array | None = None, cu_seqlens: Array | None = None,
               chunk_size: int | None = None,
               config: TritonConfig | None = None) -> tuple[Array, Array]:
    """GLA through the Pallas kernels; arguments as :func:`gla_reference` plus ``chunk_size``
    (power of two >= 16) and ``config`` (launch-knob overrides; None fields use
    :func:`default_config`).

    Returns ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.
    """
    check_pallas_dtype("gla", q, k, v, g)
    heads, key_dim = q.shape[2], q.shape[3]
    value_dim = v.shape[3]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    cfg = _chunk_of(config, chunk_size)
    plan, kp, vp, h0, n_seqs = _prepare(q, k, v, initial_state, cu_seqlens, cfg.chunk)
    cfg = _resolve(cfg, rows=plan.rows, heads=heads, key_dim=kp, value_dim=vp)
    qc = _layout(_pad_last(q.astype(dtype), kp), plan)
    kc = _layout(_pad_last(k.astype(dtype), kp), plan)
    vc = _layout(_pad_last(v.astype(dtype), vp), plan)
    gc = _layout(_pad_last(g.astype(F32), kp), plan)  # floored in the sums kernel
    seq_info, flags = chunk_layout_info(plan)
    st = _static(cfg, gate="vector", delta=False, has_h0=h0 is not None, scale=scale, plan=plan,
                 heads=heads, key_dim=kp, value_dim=vp, n_seqs=n_seqs)
    o, final = gla_core(st, qc, kc, vc, gc, h0, seq_info, flags)
    o = _unlayout(o, plan)[..., :value_dim].astype(v.dtype)
    return o, final[:, :, :key_dim, :value_dim]
