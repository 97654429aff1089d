"""Pallas kernels for the delta rules' per-chunk WY preparation, forward and backward.

Per chunk of L tokens (``kernels/common/delta.py`` has the derivation)::

    M = I + A,   A_ij = beta_i (k_i . k_j) exp(b_i - b_j)   for j < i (else 0)
    w = M^{-1} (beta e^b * k),   u = M^{-1} (beta * v)

``M`` is unit lower triangular. The forward kernel builds ``M^{-1}`` from 16 x 16 blocks:
each diagonal block is inverted exactly by a product of 4 factors (``a`` is nilpotent), the
blocks below by block substitution (exact float32 products: TF32 there was slower on an
H100). ``M^{-1}`` is written to a float32 scratch (where ``A`` was parked) and stored
(``[R, TP, H, L]``, in k's dtype: float32 for float32 inputs) for the backward; ``w`` and
``u`` are whole-chunk products with the stored copy read back as one ``[L, L]`` tile (16-bit
operands for 16-bit inputs, ``WyStatic.low_wu``). The backward then needs only whole-chunk
products::

    X = dw kbe^T + du vb^T  (kbe = beta e^b k, vb = beta v),   dA = -M^{-T} X M^{-T}

(strictly lower; ``w``, ``u`` and ``M^{-T} dw`` are never formed for it), and the chain rule
through ``A``, ``kbe`` and ``vb`` gives ``dk, dv, dbeta`` and the gradient of the in-chunk
cumulative log-gate ``b`` (turned into ``dg`` in JAX).

When the walk itself forms ``vn = M^{-1} y``, ``y = beta (v - e^b (k S_c))`` (the delta rules'
fused Mosaic gradient), its backward hands over ``dy = M^{-T} dvn`` and ``dks = -dy S_c^T``
(or the stored states ``S_c``, from which the kernel forms ``dks``) and
:func:`wy_fused_backward` needs no ``M^{-1}``: ``X = dvn y^T`` there, so ``dA = -dy vn^T``,
and ``M^{-T} du``, ``M^{-T} dw`` above are ``dy`` and ``dks``.

Pallas's Triton lowering cannot slice values, so sub-blocks are loaded from refs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas import compiler_params
from linearnexus.kernels.common.pallas_chunk import in_chunk_cumsum
from linearnexus.kernels.common.pallas_scan import exp_approx

F32 = jnp.float32
SUB = 16  # sub-block size of the in-kernel triangular inverse


@dataclasses.dataclass(frozen=True)
class WyStatic:
    """Static description of one preparation call (hashable)."""

    gated: bool
    rows: int
    n_chunks: int
    chunk: int
    heads: int
    key_dim: int
    value_dim: int
    exact: bool  # float32 inputs: exact float32 products (no TF32)
    num_warps: int
    interpret: bool
    # 16-bit inputs (float32 ones are exact throughout): w and u from M^{-1} rounded to the
    # inputs' dtype (the copy stored for the backward) times 16-bit operands, as FLA 0.6.0's
    # recompute_w_u, with u's error ~1.6x that of False (5.4e-3 vs 3.3e-3 of its largest
    # entry); False: the float32 M^{-1} (kept in the scratch) and operands on TF32. The
    # preparation 0.59 -> 0.43 ms at (8, 4096, 16, 128) bf16 on an H100 (FLA's 0.44),
    # benchmarks/wy_profile_gpu.py; its notes in docs/mosaic.md.
    low_wu: bool = True
    # with low_wu: the scaled operands (beta e^b k, beta v) as a 16-bit pair hi + lo, one more
    # product each. Their rounding, not M^{-1}'s, is most of low_wu's extra error (a float64
    # emulation: u's error 2.6e-3 of its largest entry from rounding them, 1.2e-4 from
    # rounding M^{-1}, before u's own rounding). Off: on an H100 the preparation took 0.450 ms
    # with it against 0.420 (u's error 3.3e-3 against 5.4e-3; benchmarks/wy_profile_gpu.py's
    # "split-x", 2026-12-05), and the Mosaic plain forward forms no w, u (minv_only)
    split_x: bool = False
    # M^{-1} only (stored in the inputs' dtype; no w, u): the delta rules' fused Mosaic
    # forward forms vn = M^{-1} (beta v - beta e^b k S_c) in its walk (wy_inverse)
    minv_only: bool = False
    # wy_fused_backward: dks = -dy S_c^T formed here from the stored entering states
    # ([R, NC, H, K, V], read in [64, 64] tiles) instead of read from the Mosaic dw kernel's
    # output: that kernel's read of dy and S_c, its write of dks and this kernel's read of it
    # (~0.67 GB at (8, 4096, 16, 128)) become this kernel's read of S_c (0.27 GB)
    dks_from_states: bool = False
    # M^{-1} by halves (16 -> 32 -> 64 rows: each level's lower-left block is
    # -inv(lower) A_21 inv(upper), two dependent products) instead of block substitution
    # (a chain of ~10 dependent products at L = 64); the same products in number. Aimed at
    # the latency-bound M^{-1} kernel (0.284 ms at 0.72 TB/s on an H200), measured 2% faster
    # alone on an H100 (0.2835 against 0.2900 ms, 4 warps): opt-in, benchmarks/wy_profile_gpu.py
    # times both
    inverse_halves: bool = False


def _dot(a, b, st: WyStatic, *, ta=False, tb=False, exact=False):
    if ta:
        a = a.T
    if tb:
        b = b.T
    precision = jax.lax.Precision.HIGHEST if (exact or st.exact) and a.dtype == F32 else None
    return jnp.dot(a, b, preferred_element_type=F32, precision=precision)


def _iota2(n):
    return (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0),
            jax.lax.broadcasted_iota(jnp.int32, (n, n), 1))


def _unit_lower_inverse(a, eye, st: WyStatic):
    """``(I + a)^{-1}`` for a strictly lower triangular ``[SUB, SUB]`` float32 ``a``.

    ``a`` is nilpotent (``a^16 = 0``), so ``(I + a)^{-1} = (I - a)(I + a^2)(I + a^4)(I + a^8)``:
    6 products with a dependency chain 4 deep. Row-by-row forward substitution needs 15
    dependent products; on the H200 the whole preparation took 0.60 ms this way against
    0.66 ms with substitution at (8, 4096, 16, 128) bf16.
    """
    p = eye - a
    a2 = _dot(a, a, st, exact=True)
    a4 = _dot(a2, a2, st, exact=True)
    p = _dot(p, eye + a2, st, exact=True)
    a8 = _dot(a4, a4, st, exact=True)
    p = _dot(p, eye + a4, st, exact=True)
    return _dot(p, eye + a8, st, exact=True)


def _inverse_by_halves(a: dict, eye, lo: int, n: int, st: WyStatic) -> dict:
    """``(I + A)^{-1}``'s ``[SUB, SUB]`` blocks on and below the diagonal for block rows and
    columns ``lo .. lo + n - 1`` (``n`` a power of two), from ``A``'s blocks ``a[i, j]``
    (``j <= i``): the two halves' inverses ``P`` (upper) and ``Q`` (lower), then the
    lower-left block ``-Q A_21 P`` as ``X = A_21 P`` and ``-Q X``, each a layer of
    independent block products."""
    if n == 1:
        return {(lo, lo): _unit_lower_inverse(a[lo, lo], eye, st)}
    h = n // 2
    out = {**_inverse_by_halves(a, eye, lo, h, st), **_inverse_by_halves(a, eye, lo + h, h, st)}
    upper, lower = range(lo, lo + h), range(lo + h, lo + n)
    # X_ij = sum_m A_im P_mj (P lower triangular: m >= j)
    x = {(i, j): sum(_dot(a[i, m], out[m, j], st, exact=True) for m in upper if m >= j)
         for i in lower for j in upper}
    for i in lower:  # -Q X (Q lower triangular: m <= i)
        for j in upper:
            out[i, j] = -sum(_dot(out[i, m], x[m, j], st, exact=True) for m in lower if m <= i)
    return out


def _barrier(st: WyStatic) -> None:
    """Make every thread's stores to global memory visible to the whole program's loads after
    it (``__syncthreads``); interpret mode runs a program in order and needs none."""
    if not st.interpret:
        plt.debug_barrier()


def _wy_fwd_kernel(*refs, st: WyStatic):
    if st.minv_only:  # (M^{-1} only: no v in, no w, u out)
        refs = refs[:1] + (None,) + refs[1:2 + st.gated] + (None, None) + refs[2 + st.gated:]
    if st.gated:
        k_ref, v_ref, beta_ref, b_ref, w_ref, u_ref, m_ref, *work = refs
    else:
        k_ref, v_ref, beta_ref, w_ref, u_ref, m_ref, *work = refs
        b_ref = None
    # work_ref: float32 [R, TP, H, L] scratch where A is parked and M^{-1} read back; for
    # float32 inputs that is m_ref itself, for 16-bit ones a buffer of its own (m_ref keeps
    # the inputs' dtype for the backward: a float32 M^{-1} there pushed the backward kernel
    # to twice the register spills and cost 0.03-0.06 ms of forward + backward on the H200)
    work_ref = work[0] if work else m_ref
    c, rh = pl.program_id(0), pl.program_id(1)
    r, h = rh // st.heads, rh % st.heads
    t0 = c * st.chunk
    nb = st.chunk // SUB
    row, col = _iota2(SUB)
    eye = (row == col).astype(F32)
    rows = pl.ds(t0, st.chunk)
    beta = beta_ref[r, rows, h].astype(F32)  # [L]
    b = b_ref[r, rows, h] if st.gated else None
    # A as one [L, L] product, parked in work_ref (M^{-1} overwrites it below) and read back
    # in 16 x 16 blocks: Pallas cannot slice values. (Ten 16-row products of K columns
    # instead: 252 registers against 160 in the full preparation; in the M^{-1}-only kernel
    # 0.402 ms against 0.284 at 4 warps on an H200, (8, 4096, 16, 128), 2026-12-06)
    k = k_ref[r, rows, h, :]
    full_row, full_col = _iota2(st.chunk)
    if st.gated:
        decay = exp_approx(jnp.where(full_row > full_col, b[:, None] - b[None, :], -jnp.inf))
    else:
        decay = jnp.where(full_row > full_col, 1.0, 0.0)
    work_ref[r, rows, h, :] = _dot(k, k, st, tb=True) * beta[:, None] * decay
    _barrier(st)
    a = {(i, j): work_ref[r, pl.ds(t0 + i * SUB, SUB), h, pl.ds(j * SUB, SUB)]
         for i in range(nb) for j in range(i + 1)}
    if st.inverse_halves:
        minv = _inverse_by_halves(a, eye, 0, nb, st)
    else:
        minv = {}
        for i in range(nb):
            minv[i, i] = _unit_lower_inverse(a[i, i], eye, st)
        # blocks below the diagonal: M^{-1}_ij = -M^{-1}_ii sum_{j <= m < i} A_im M^{-1}_mj
        for i in range(nb):
            for j in range(i):
                acc = jnp.zeros((SUB, SUB), F32)
                for m in range(j, i):
                    acc += _dot(a[i, m], minv[m, j], st, exact=True)
                minv[i, j] = -_dot(minv[i, i], acc, st, exact=True)
    # w and u read back the stored 16-bit M^{-1} (low) or the float32 one from the scratch,
    # which then replaces A there: every thread has used its blocks of A first
    low = (st.low_wu or st.minv_only) and bool(work)
    if not low:
        _barrier(st)
    for i in range(nb):
        for j in range(nb):
            blk = minv[i, j] if j <= i else jnp.zeros((SUB, SUB), F32)
            at = (r, pl.ds(t0 + i * SUB, SUB), h, pl.ds(j * SUB, SUB))
            if not low:  # (float32 inputs: the scratch is m_ref itself)
                work_ref[at] = blk
            if work:
                m_ref[at] = blk.astype(m_ref.dtype)
    if st.minv_only:
        return
    # w and u as whole-chunk products with M^{-1} read back as one [L, L] tile (16-row
    # products with M = 16 run on the small MMA shapes)
    _barrier(st)
    minv_all = m_ref[r, rows, h, :] if low else work_ref[r, rows, h, :]  # [L, L]
    scale = beta * exp_approx(b) if st.gated else beta
    for dim, src, dst, fac in ((st.key_dim, k_ref, w_ref, scale), (st.value_dim, v_ref, u_ref, beta)):
        blk = min(dim, 64)  # 64 columns: float32 operands of 256 columns overflow shared memory
        for j in range(dim // blk):
            cs = pl.ds(j * blk, blk)
            x = src[r, rows, h, cs].astype(F32) * fac[:, None]
            if not low:
                dst[r, rows, h, cs] = _dot(minv_all, x, st).astype(dst.dtype)
                continue
            hi = x.astype(minv_all.dtype)
            y = _dot(minv_all, hi, st)
            if st.split_x:  # x = hi + lo in the 16-bit dtype: its rounding leaves the product
                y = y + _dot(minv_all, (x - hi.astype(F32)).astype(minv_all.dtype), st)
            dst[r, rows, h, cs] = y.astype(dst.dtype)


def _bwd_chunk(refs, st: WyStatic):
    """Both backward kernels' refs and per-chunk rows: ``(refs, (r, rows, h), beta, b, eb,
    op)`` with ``refs`` = ``(k, v, beta, b, x1, x2, x3, dk0, dk, dv, dbeta, db)`` (``b``, ``db``
    None without a gate; ``x1..x3`` the kernel's own inputs). 16-bit inputs: the big products
    take operands in the inputs' dtype (float32 accumulation), as the forward's w / u are in
    that dtype anyway; float32 inputs keep float32 (exact) operands."""
    if st.gated:
        full = refs
    else:
        full = (*refs[:3], None, *refs[3:], None)
    c, rh = pl.program_id(0), pl.program_id(1)
    r, h = rh // st.heads, rh % st.heads
    rows = pl.ds(c * st.chunk, st.chunk)
    beta = full[2][r, rows, h].astype(F32)  # [L]
    b = full[3][r, rows, h] if st.gated else None
    eb = exp_approx(b) if st.gated else jnp.ones_like(beta)
    return full, (r, rows, h), beta, b, eb, F32 if st.exact else full[0].dtype


def _through_a(st: WyStatic, refs, at, da, kk, dbeta, beta, b, eb, op, drw_of) -> None:
    """The shared tail of both backward kernels: from ``dA`` (``[L, L]``, strictly lower
    once masked) and ``k k^T`` through ``A_ij = beta_i gam_ij k_i.k_j`` and the ``beta e^b k``
    operand (whose cotangent for key block ``ks`` is ``drw_of(ks)``, ``[L, bk]`` float32) to
    ``dk`` (plus the core's), ``dbeta`` and ``db``, written to their refs."""
    k_ref, dk0_ref, dk_ref, dbeta_ref, db_ref = refs[0], refs[7], refs[8], refs[10], refs[11]
    r, rows, h = at
    row, col = _iota2(st.chunk)
    # the decay factors of A, built only now to keep fewer [L, L] tiles live in the loops
    if st.gated:
        gam = exp_approx(jnp.where(row > col, b[:, None] - b[None, :], -jnp.inf))
    else:
        gam = jnp.where(row > col, 1.0, 0.0)
    g = da * gam  # zero on and above the diagonal
    gb = g * beta[:, None]
    dbeta += jnp.sum(g * kk, axis=1)
    # A_ij = beta_i gam_ij k_i.k_j: dk_i gets sum_j gb_ij k_j, dk_j gets sum_i gb_ij k_i
    sym = (gb + gb.T).astype(op)
    db = jnp.zeros((st.chunk,), F32)
    bk = min(st.key_dim, 64)
    for j in range(st.key_dim // bk):  # dk through A and through kbe
        ks = pl.ds(j * bk, bk)
        k = k_ref[r, rows, h, ks]
        drw = drw_of(ks)
        dk = _dot(sym, k.astype(op), st) + drw * (beta * eb)[:, None]
        dk_ref[r, rows, h, ks] = (dk + dk0_ref[r, rows, h, ks].astype(F32)).astype(dk_ref.dtype)
        rk = jnp.sum(drw * k.astype(F32), axis=1)
        dbeta += rk * eb
        db += rk * (beta * eb)
    dbeta_ref[r, rows, h] = dbeta
    if st.gated:
        p = gb * kk  # dA_ij * A_ij
        db_ref[r, rows, h] = jnp.sum(p, axis=1) - jnp.sum(p, axis=0) + db


def _wy_bwd_kernel(*refs, st: WyStatic):
    """One chunk's ``dk`` (added to the core's, ``dk0_ref``, whose buffer ``dk_ref`` reuses),
    ``dv``, ``dbeta`` (and ``db``, the gate's in-chunk share) from ``dw``, ``du``."""
    refs, at, beta, b, eb, op = _bwd_chunk(refs, st)
    k_ref, v_ref, _, _, m_ref, dw_ref, du_ref, _, _, dv_ref, _, _ = refs
    r, rows, h = at
    L = st.chunk
    minv = m_ref[r, rows, h, :].astype(op)  # [L, L] M^{-1}, stored in the operand dtype
    # head dims in blocks of <= 64 columns: whole 256-wide float32 operands overflow shared
    # memory (measured: 344 KB asked of 227 KB at K = V = 256)
    bk, bv = min(st.key_dim, 64), min(st.value_dim, 64)
    # With w = M^{-1} kbe and u = M^{-1} vb (kbe = beta e^b k, vb = beta v):
    #   dA = -(M^{-T} dw w^T + M^{-T} du u^T) = -M^{-T} X M^{-T},  X = dw kbe^T + du vb^T,
    # so w, u and M^{-T} dw never have to be formed for dA: X sums over head-dim blocks.
    x = jnp.zeros((L, L), F32)
    kk = jnp.zeros((L, L), F32)
    dbeta = jnp.zeros((L,), F32)
    for j in range(st.value_dim // bv):  # dv = beta M^{-T} du, dbeta's share, X's share
        vs = pl.ds(j * bv, bv)
        v = v_ref[r, rows, h, vs].astype(F32)
        du = du_ref[r, rows, h, vs].astype(op)
        x += _dot(du, (v * beta[:, None]).astype(op), st, tb=True)
        dru = _dot(minv, du, st, ta=True)  # M^{-T} du
        dv_ref[r, rows, h, vs] = (dru * beta[:, None]).astype(dv_ref.dtype)
        dbeta += jnp.sum(dru * v, axis=1)
    for j in range(st.key_dim // bk):  # X's share from w, and k k^T
        ks = pl.ds(j * bk, bk)
        k = k_ref[r, rows, h, ks]
        kbe = (k.astype(F32) * (beta * eb)[:, None]).astype(op)
        x += _dot(dw_ref[r, rows, h, ks].astype(op), kbe, st, tb=True)
        kk += _dot(k.astype(op), k.astype(op), st, tb=True)
    # two [L, L] products in float32 operands (TF32 on the GPU for bf16 inputs)
    minv32 = minv.astype(F32)
    da = -_dot(_dot(minv32, x, st, ta=True), minv32, st, tb=True)
    _through_a(st, refs, at, da, kk, dbeta, beta, b, eb, op,  # M^{-T} dw per key block
               lambda ks: _dot(minv, dw_ref[r, rows, h, ks].astype(op), st, ta=True))


def _wy_bwd_fused_kernel(*refs, st: WyStatic):
    """One chunk's ``dk`` (added to the core's), ``dv``, ``dbeta`` (and ``db``) when the walk
    formed ``vn = M^{-1} y``, ``y = beta (v - e^b k S_c)`` itself: from ``dy = M^{-T} dvn``
    and ``dks = -dy S_c^T`` (or the states it is formed from, ``st.dks_from_states``) and the
    stored ``vn``. No
    ``M^{-1}`` here: ``dA = -dy vn^T`` (strictly lower), which is :func:`_wy_bwd_kernel`'s
    ``-M^{-T} X M^{-T}`` with ``X = dvn y^T``, and its ``M^{-T} du``, ``M^{-T} dw`` are ``dy``
    and ``dks``."""
    refs, at, beta, b, eb, op = _bwd_chunk(refs, st)
    k_ref, v_ref, _, _, vn_ref, dy_ref, dks_ref, _, _, dv_ref, _, _ = refs
    r, rows, h = at
    L = st.chunk
    bk, bv = min(st.key_dim, 64), min(st.value_dim, 64)
    c = pl.program_id(0)

    def dks_of(ks):  # [L, bk] float32: -dy S_c^T's key block ks
        if not st.dks_from_states:
            return dks_ref[r, rows, h, ks].astype(F32)
        acc = jnp.zeros((L, bk), F32)  # (dks_ref holds the states [R, NC, H, K, V])
        for j in range(st.value_dim // bv):
            vs = pl.ds(j * bv, bv)
            # [L, bv] x [bk, bv]^T -> [L, bk]
            acc -= _dot(dy_ref[r, rows, h, vs].astype(op), dks_ref[r, c, h, ks, vs].astype(op),
                        st, tb=True)
        return acc

    da = jnp.zeros((L, L), F32)
    dbeta = jnp.zeros((L,), F32)
    for j in range(st.value_dim // bv):  # dv = beta dy, dbeta's share from v, dA = -dy vn^T
        vs = pl.ds(j * bv, bv)
        dy = dy_ref[r, rows, h, vs]
        dyf = dy.astype(F32)
        dv_ref[r, rows, h, vs] = (dyf * beta[:, None]).astype(dv_ref.dtype)
        dbeta += jnp.sum(dyf * v_ref[r, rows, h, vs].astype(F32), axis=1)
        da -= _dot(dy.astype(op), vn_ref[r, rows, h, vs].astype(op), st, tb=True)
    kk = jnp.zeros((L, L), F32)
    for j in range(st.key_dim // bk):
        k = k_ref[r, rows, h, pl.ds(j * bk, bk)].astype(op)
        kk += _dot(k, k, st, tb=True)
    _through_a(st, refs, at, da, kk, dbeta, beta, b, eb, op, dks_of)  # -dy S_c^T per key block


def _call(kernel, st, out_shape, *args, aliases=None):
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(st.n_chunks, st.rows * st.heads),
                          interpret=st.interpret, input_output_aliases=aliases or {},
                          compiler_params=compiler_params(st.num_warps, 1))(*args)


def _fwd(st: WyStatic, k, v, beta, g):
    R, TP, H = st.rows, st.n_chunks * st.chunk, st.heads
    m_dtype = F32 if st.exact else k.dtype
    outs = [jax.ShapeDtypeStruct((R, TP, H, st.key_dim), k.dtype),
            jax.ShapeDtypeStruct((R, TP, H, st.value_dim), k.dtype),
            jax.ShapeDtypeStruct((R, TP, H, st.chunk), m_dtype)]
    if not st.exact:  # the kernel's float32 scratch (see _wy_fwd_kernel)
        outs.append(jax.ShapeDtypeStruct((R, TP, H, st.chunk), F32))
    ins = [k, v, beta] + ([in_chunk_cumsum(g, st.chunk)] if st.gated else [])
    w, u, minv = _call(functools.partial(_wy_fwd_kernel, st=st), st, outs, *ins)[:3]
    return (w, u, k), (k, v, beta, g, minv)


def wy_inverse(st: WyStatic, k: Array, beta: Array, g: Array | None) -> Array:
    """``M^{-1}`` ``[R, TP, H, L]`` in k's dtype (chunk ``c``'s ``[L, L]`` block in rows
    ``c L .. c L + L - 1``, zero above the diagonal): the preparation without ``w`` and ``u``,
    for the delta rules' fused Mosaic forward and its gradient from ``M^{-1}`` (the kernel with
    ``minv_only``; no gradient of its own: that gradient's WY backward takes ``dy`` and needs
    no ``M^{-1}``, and the separate form's forward runs :func:`wy_prepare`). Arguments as
    :func:`wy_prepare`; 16-bit ``k`` only.
    """
    if st.exact:
        raise ValueError("st: wy_inverse takes 16-bit inputs (exact=False), got exact=True")
    st = dataclasses.replace(st, minv_only=True)
    R, TP, H = st.rows, st.n_chunks * st.chunk, st.heads
    outs = [jax.ShapeDtypeStruct((R, TP, H, st.chunk), k.dtype),
            jax.ShapeDtypeStruct((R, TP, H, st.chunk), F32)]  # A's float32 scratch
    ins = [k, beta] + ([in_chunk_cumsum(g, st.chunk)] if st.gated else [])
    return _call(functools.partial(_wy_fwd_kernel, st=st), st, outs, *ins)[0]


def wy_fused_backward(st: WyStatic, k: Array, v: Array, beta: Array, g: Array | None,
                      vn: Array, dy: Array, dks: Array | None, dk_core: Array, *,
                      states: Array | None = None
                      ) -> tuple[Array, Array, Array, Array | None]:
    """The WY part of the gradient when the walk formed ``vn = M^{-1} y`` with ``y = beta (v -
    e^b (k S_c))`` (the delta rules' fused Mosaic form, ``mosaic_delta.mosaic_delta_fused``).

    Args:
        st: as :func:`wy_prepare` (16-bit or float32 inputs). k ``[R, TP, H, K]``, v
            ``[R, TP, H, V]``, beta ``[R, TP, H]``, g ``[R, TP, H]`` float32 log-gates or None.
        vn: ``[R, TP, H, V]`` the walk's (stored under the gradient).
        dy: ``[R, TP, H, V]`` ``M^{-T} dvn``, the cotangent of ``y``.
        dks: ``[R, TP, H, K]`` ``-dy S_c^T`` per chunk, or None with ``states``.
        dk_core: ``[R, TP, H, K]`` the core's ``dk``, added in the kernel.
        states: ``[R, NC, H, K, V]`` the entering states ``S_c`` (the walk's, stored under
            the gradient), in place of ``dks``: the kernel forms ``-dy S_c^T`` itself
            (``WyStatic.dks_from_states``), in float32 from the 16-bit operands.

    Returns:
        ``(dk, dv, dbeta, dg)``: ``dk`` (the core's included) and ``dv`` in the inputs'
        dtypes, ``dbeta`` in beta's, ``dg`` float32 (None without a gate).
    """
    R, TP, H = st.rows, st.n_chunks * st.chunk, st.heads
    if (dks is None) == (states is None):
        raise ValueError(f"dks, states: expected exactly one of them, got dks "
                         f"{'None' if dks is None else dks.shape} and states "
                         f"{'None' if states is None else states.shape}")
    checks = [("vn", vn, (R, TP, H, st.value_dim)), ("dy", dy, (R, TP, H, st.value_dim)),
              ("dk_core", dk_core, (R, TP, H, st.key_dim))]
    if states is None:
        checks.append(("dks", dks, (R, TP, H, st.key_dim)))
    else:
        checks.append(("states", states, (R, st.n_chunks, H, st.key_dim, st.value_dim)))
    for name, x, shape in checks:
        if x.shape != shape:
            raise ValueError(f"{name}: expected {shape}, got {x.shape}")
    st = dataclasses.replace(st, dks_from_states=states is not None)
    third = dks if states is None else states.astype(k.dtype)
    return _run_bwd(_wy_bwd_fused_kernel, st, k, v, beta, g, (vn, dy, third), dk_core)


def _run_bwd(kernel, st: WyStatic, k, v, beta, g, own: tuple, dk_core):
    """Run a backward kernel (``own``: its three inputs after the gates) and finish:
    ``(dk, dv, dbeta, dg)``. dk, dv leave the kernel in the inputs' dtype (float32 copies
    cost ~0.25 ms of HBM traffic at (8, 4096, 16, 128)); dk is the sum with the core's dk
    (dk_core's buffer)."""
    R, TP, H = st.rows, st.n_chunks * st.chunk, st.heads
    outs = [jax.ShapeDtypeStruct((R, TP, H, st.key_dim), k.dtype),
            jax.ShapeDtypeStruct((R, TP, H, st.value_dim), v.dtype),
            jax.ShapeDtypeStruct((R, TP, H), F32)]
    ins = [k, v, beta]
    if st.gated:
        outs.append(jax.ShapeDtypeStruct((R, TP, H), F32))
        ins.append(in_chunk_cumsum(g, st.chunk))
    ins += [*own, dk_core.astype(k.dtype)]
    res = _call(functools.partial(kernel, st=st), st, outs, *ins, aliases={len(ins) - 1: 0})
    dk, dv, dbeta = res[0], res[1], res[2]
    dg = None
    if st.gated:  # b is the in-chunk inclusive cumsum of g: dg is the in-chunk suffix sum of db
        db = res[3].reshape(R, st.n_chunks, st.chunk, H)  # [R, TP, H] -> [R, NC, L, H]
        dg = jnp.flip(jnp.cumsum(jnp.flip(db, 2), axis=2), 2).reshape(R, TP, H)  # -> [R, TP, H]
    return dk.astype(k.dtype), dv.astype(v.dtype), dbeta.astype(beta.dtype), dg


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def wy_prepare(st: WyStatic, k: Array, v: Array, beta: Array,
               g: Array | None) -> tuple[Array, Array, Array]:
    """``(w [R, TP, H, K], u [R, TP, H, V], k)`` in k's dtype, from the chunk layout.

    k ``[R, TP, H, K]`` (L2-normalised rows), v ``[R, TP, H, V]``, beta ``[R, TP, H]``,
    g ``[R, TP, H]`` float32 log-gates or None.

    ``k`` comes back unchanged for the chunk core to use: its cotangent there (the core's
    ``dk``) then reaches this function's backward, whose kernel adds it to its own ``dk``
    in float32 and writes the sum once, instead of autodiff summing the two ``dk`` arrays
    in a pass of their own (0.09 ms of 3.08 at (2, 16384, 16, 128) on an H200).
    """
    return _fwd(st, k, v, beta, g)[0]


def _wy_fwd(st, k, v, beta, g):
    return _fwd(st, k, v, beta, g)


def _wy_bwd(st, res, cts):
    k, v, beta, g, minv = res
    dw, du, dk_core = cts
    return _run_bwd(_wy_bwd_kernel, st, k, v, beta, g, (minv, dw, du), dk_core)


wy_prepare.defvjp(_wy_fwd, _wy_bwd)
