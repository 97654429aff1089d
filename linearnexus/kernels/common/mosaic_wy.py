"""The delta rules' WY backward on Mosaic GPU (Hopper, sm_90+), for the gradient from ``M^{-1}``.

In the gradient from ``M^{-1}`` (``MosaicConfig.fused_grad``, ``mosaic_delta.mosaic_delta_fused``)
the walk formed ``vn = M^{-1} y`` with ``y = beta (v - e^{b} (k S_c))``, and the reverse walk
leaves ``dy = M^{-T} dvn``. What is left of the gradient is per chunk, with ``A_ij = beta_i
e^{b_i - b_j} k_i . k_j`` (``i > j``) the strictly lower matrix whose ``(I + A)^{-1}`` is ``M^{-1}``::

    dA     = -dy vn^T  (strictly lower)                                         [L, L]
    G      = dA * e^{b_i - b_j},  Gb = beta_i G                                 [L, L]
    dks    = -dy S_c^T   (the cotangent of k S_c before its beta e^b row scale) [L, K]
    dk     = (Gb + Gb^T) k + beta e^{b} dks  (+ the core's dk)                  [L, K]
    dbeta  = rowsum(dy * v) + rowsum(G * kk) + e^{b} rowsum(dks * k)            [L]
    db     = rowsum(Gb * kk) - colsum(Gb * kk) + beta e^{b} rowsum(dks * k)     [L]

with ``kk = k k^T``; ``dg`` is the in-chunk suffix sum of ``db``, and ``dv = beta dy`` leaves
the reverse walk (``mosaic_bwd.run_state_grad(..., scaled_dy=True)``).
``pallas_wy.wy_fused_backward`` is the same gradient in Triton; this is a streaming kernel
in the layout of ``mosaic_bwd.run_dw``: grid ``[parts of the chunks x key blocks, heads,
rows]``, launched as ``(rows, heads, parts x key blocks)`` (``mosaic_chunk.program_grid``),
each program walking its chunks in a TMA pipeline with every product a warpgroup
wgmma. A program owns one key block of 64 (``dks``, ``dk``): the state's ``[64, V]`` rows
instead of all ``[K, V]`` keep two stages in shared memory at K = V = 128 (215,040 bytes),
and the ``[L, L]`` terms (``dA``, ``dA^T``, ``kk``) are formed again by each key block's
program (three wgmmas of 64 x 64 x K or V; the tiles they read were just read by the
neighbouring program, which the launch order runs beside it, so mostly from L2). The
transposes are products of their own (``vn dy^T`` for ``dA^T``): the column sums of
``Gb * kk`` are the row sums of ``Gb^T * kk`` (``kk`` is symmetric), so no array is
transposed in registers, as ``mosaic_bwd``'s ``dq / dk`` kernel forms ``dA^T``.

The per-token sums (``dbeta``, ``db``) leave each program as ``[NK, R, H, TP]`` float32
rows (the key-block-free terms from the first key block's program only) and XLA adds the
key blocks. Numerics match the Triton kernel's choices: 16-bit operands, float32
accumulation, ``Gb + Gb^T`` rounded to the inputs' dtype for its product with ``k``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common.mosaic_bwd import _bcast, chunk_parts
from linearnexus.kernels.common.mosaic_chunk import (
    SMEM_LIMIT,
    MosaicStatic,
    _load,
    _swizzled,
    _transposed,
    compiler_params,
    deepest_stages,
    interpret_kwargs,
    lowered_once,
    program_grid,
    wgmma_onto,
    wgmma_regs,
)

F32 = jnp.float32
#: key columns per program (``dks``, ``dk`` and the state's rows it reads)
WY_BLOCK_K = 64
#: programs the kernel aims for (two waves of an H100 / H200 at one program per SM)
WY_PROGRAMS = 264


def wy_smem_bytes(*, chunk: int, key_dim: int, value_dim: int, stages: int,
                  itemsize: int) -> int:
    """Shared memory of one program: per stage the ``k [L, K]``, ``v``, ``vn``, ``dy [L, V]``,
    the state's key block ``[64, V]``, k's key block, the core's ``dk`` and the ``dk`` out
    (``[L, 64]`` each), and four float32 rows (beta, b in; dbeta, db out)."""
    L, K, V, BK = chunk, key_dim, value_dim, min(key_dim, WY_BLOCK_K)
    return stages * ((L * K + 3 * L * V + BK * V + 3 * L * BK) * itemsize + 4 * L * 4)


def wy_mosaic_fits(*, chunk: int, key_dim: int, value_dim: int, itemsize: int = 2) -> bool:
    """Whether the kernel runs here: chunk 64 (wgmma's 64-row tiles), head dims multiples of
    64 (whole 128-byte swizzled tiles), and two pipeline stages in shared memory (V <= 128
    at K = 128)."""
    return (chunk == 64 and key_dim % WY_BLOCK_K == 0 and value_dim % 64 == 0
            and wy_smem_bytes(chunk=chunk, key_dim=key_dim, value_dim=value_dim, stages=2,
                              itemsize=itemsize) <= SMEM_LIMIT)


def wy_split(*, programs: int, n_chunks: int) -> int:
    """Into how many parts a (row, head, key block)'s chunks are cut, one program a part
    (``mosaic_bwd.chunk_parts`` towards :data:`WY_PROGRAMS`; on a small grid one part a
    chunk, every program then walking one chunk)."""
    return chunk_parts(programs=programs, n_chunks=n_chunks, target=WY_PROGRAMS)


def _wy_kernel(k_ref: Any, v_ref: Any, vn_ref: Any, dy_ref: Any, h_ref: Any, dk0_ref: Any,
               beta_ref: Any, b_ref: Any, dk_ref: Any, dbeta_ref: Any, db_ref: Any, *,
               st: MosaicStatic, dtype: Any, per: int, nk: int, stages: int) -> None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    L, K, V, BK = c.chunk, c.key_dim, c.value_dim, min(c.key_dim, WY_BLOCK_K)
    s, h, r = jax.lax.axis_index("s"), jax.lax.axis_index("h"), jax.lax.axis_index("r")
    ik, part = s % nk, s // nk  # neighbouring programs: the key blocks of the same chunks
    ks = pl.ds(ik * BK, BK)
    wgmma_layout = plgpu.Layout.WGMMA
    rows_layout, cols_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)
    row = plgpu.broadcasted_iota(jnp.int32, (L, L), 0, layout=wgmma_layout)
    col = plgpu.broadcasted_iota(jnp.int32, (L, L), 1, layout=wgmma_layout)
    below, above = row > col, col > row
    # the key-block-free terms of dbeta and db count once: from key block 0's program
    own = jnp.where(ik == 0, 1.0, 0.0).astype(F32)

    def body(_, k_smem, v_smem, vn_smem, dy_smem, s_smem, kb_smem, dk0_smem, beta_smem,
             b_smem, dk_smem, dbeta_smem, db_smem):
        def square(acc_da, acc_dat, acc_kk):
            plgpu.wgmma(acc_da, dy_smem, _transposed(vn_smem))  # [L, V] @ [V, L]: dy vn^T
            plgpu.wgmma(acc_dat, vn_smem, _transposed(dy_smem))  # [L, V] @ [V, L]: vn dy^T
            plgpu.wgmma(acc_kk, k_smem, _transposed(k_smem))  # [L, K] @ [K, L]: k k^T
            return acc_da[...], acc_dat[...], acc_kk[...]

        da, dat, kk = pl.run_scoped(square, plgpu.ACC((L, L), F32), plgpu.ACC((L, L), F32),
                                    plgpu.ACC((L, L), F32))
        b_row, b_col = _load(b_smem, rows_layout), _load(b_smem, cols_layout)  # [L] each
        beta_row, beta_col = _load(beta_smem, rows_layout), _load(beta_smem, cols_layout)
        diff = _bcast(b_row, (L, L), 0) - _bcast(b_col, (L, L), 1)  # b_i - b_j at [i, j]
        # G = dA e^{b_i - b_j} below the diagonal (dA = -dy vn^T), and G^T from vn dy^T;
        # masked before the exp: above the diagonal b_i - b_j > 0 could overflow
        g = jnp.where(below, -da * jnp.exp(jnp.where(below, diff, 0.0)), 0.0)
        gt = jnp.where(above, -dat * jnp.exp(jnp.where(above, -diff, 0.0)), 0.0)
        gb = g * _bcast(beta_row, (L, L), 0)  # beta_i G_ij
        gbt = gt * _bcast(beta_col, (L, L), 1)  # (Gb^T)_ij = beta_j G_ji
        dy_v = jnp.sum(_load(dy_smem, wgmma_layout).astype(F32)
                       * _load(v_smem, wgmma_layout).astype(F32), axis=1)  # [L]
        dbeta = dy_v + jnp.sum(g * kk, axis=1)
        # colsum(Gb * kk)_i = sum_l Gb_li kk_li = rowsum(Gb^T * kk)_i: kk is symmetric
        db = jnp.sum((gb - gbt) * kk, axis=1)

        def key_block(acc):
            plgpu.wgmma(acc, dy_smem, _transposed(s_smem))  # [L, V] @ [V, BK]: dy S_c^T
            return acc[...]

        dks = -pl.run_scoped(key_block, plgpu.ACC((L, BK), F32))  # [L, BK]
        eb = jnp.exp(b_row)
        scale = beta_row * eb
        rk = jnp.sum(dks * _load(kb_smem, wgmma_layout).astype(F32), axis=1)  # [L]
        init = (dks * _bcast(scale, (L, BK), 0)
                + _load(dk0_smem, wgmma_layout).astype(F32))

        def through_a(acc):
            wgmma_regs(acc, (gb + gbt).astype(dtype), kb_smem)  # registers [L, L] @ [L, BK]

        dk_smem[...] = wgmma_onto(init, through_a).astype(dtype)
        dbeta_smem[...] = dbeta * own + rk * eb
        db_smem[...] = db * own + rk * scale

    def tile(cols: int, state: bool = False) -> Any:  # a chunk's swizzled 2-D tile
        if state:  # the state's [BK, V] key block of chunk i
            return plgpu.BlockSpec((None, BK, cols), lambda i: (i, 0, 0),
                                   transforms=_swizzled(cols, dtype))
        return plgpu.BlockSpec((L, cols), lambda i: (i, 0), transforms=_swizzled(cols, dtype))

    row_spec = plgpu.BlockSpec((L,), lambda i: (i,))  # a chunk's float32 row
    # k, v, vn, dy, the state's key block, k's key block, the core's dk, beta, b
    in_specs = [tile(K), tile(V), tile(V), tile(V), tile(V, state=True), tile(BK), tile(BK),
                row_spec, row_spec]
    out_specs = [tile(BK), row_spec, row_spec]  # dk, dbeta, db
    rows = pl.ds(part * per * L, per * L)  # this program's chunks' tokens
    pipeline = plgpu.emit_pipeline(body, grid=(per,), in_specs=in_specs, out_specs=out_specs,
                                   max_concurrent_steps=stages)
    pipeline(k_ref.at[r, rows, h, :], v_ref.at[r, rows, h, :], vn_ref.at[r, rows, h, :],
             dy_ref.at[r, rows, h, :], h_ref.at[r, pl.ds(part * per, per), h, ks, :],
             k_ref.at[r, rows, h, ks], dk0_ref.at[r, rows, h, ks], beta_ref.at[r, h, rows],
             b_ref.at[r, h, rows], dk_ref.at[r, rows, h, ks], dbeta_ref.at[ik, r, h, rows],
             db_ref.at[ik, r, h, rows])


@lowered_once("stages")
def wy_fused_backward_mosaic(st: MosaicStatic, k: Array, v: Array, beta: Array, b: Array,
                             vn: Array, dy: Array, h: Array, dk_core: Array, *,
                             stages: int | None = None) -> tuple[Array, Array, Array]:
    """The WY part of the gradient from ``M^{-1}`` (module doc) on Mosaic GPU.

    Args:
        st: static description (``st.core``: rows, chunks, chunk 64, heads, head dims).
        k: ``[R, TP, H, K]`` and v: ``[R, TP, H, V]`` (bf16 / f16; TP = NC * 64).
        beta: ``[R, TP, H]``. b: ``[R, TP, H]`` float32, the in-chunk inclusive cumsum of
            the log-gates (zeros for the ungated rule; ``dg`` is then meaningless).
        vn, dy: ``[R, TP, H, V]`` the walk's ``vn`` and the reverse walk's ``dy``.
        h: ``[R, NC, H, K, V]`` the entering states (stored by the forward).
        dk_core: ``[R, TP, H, K]`` the core's ``dk``, added here.
        stages: pipeline depth; None: the deepest of 1 .. 3 that fits.

    Returns:
        ``(dk [R, TP, H, K] in k's dtype, dbeta [R, TP, H] in beta's, dg [R, TP, H]
        float32)``; ``dv = beta dy`` is not formed here.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    R, NC, L, H, K, V = c.rows, c.n_chunks, c.chunk, c.heads, c.key_dim, c.value_dim
    TP = NC * L
    dtype = k.dtype
    if not wy_mosaic_fits(chunk=L, key_dim=K, value_dim=V, itemsize=jnp.dtype(dtype).itemsize):
        raise NotImplementedError(f"st: the Mosaic WY backward takes chunk 64 and head dims "
                                  f"that are multiples of 64 fitting two stages, got chunk {L}, "
                                  f"K={K}, V={V}")
    for name, x, shape in (("k", k, (R, TP, H, K)), ("v", v, (R, TP, H, V)),
                           ("beta", beta, (R, TP, H)), ("b", b, (R, TP, H)),
                           ("vn", vn, (R, TP, H, V)), ("dy", dy, (R, TP, H, V)),
                           ("h", h, (R, NC, H, K, V)), ("dk_core", dk_core, (R, TP, H, K))):
        if x.shape != shape:
            raise ValueError(f"{name}: expected {shape}, got {x.shape}")
    nk = K // WY_BLOCK_K
    stages = stages or deepest_stages(lambda s: wy_smem_bytes(
        chunk=L, key_dim=K, value_dim=V, stages=s,
        itemsize=jnp.dtype(dtype).itemsize) <= SMEM_LIMIT, 3)
    split = wy_split(programs=R * H * nk, n_chunks=NC)
    rows_of = functools.partial(jnp.transpose, axes=(0, 2, 1))  # [R, TP, H] -> [R, H, TP]
    dk, dbeta, db = plgpu.kernel(
        functools.partial(_wy_kernel, st=st, dtype=dtype, per=NC // split, nk=nk,
                          stages=stages),
        out_type=(jax.ShapeDtypeStruct((R, TP, H, K), dtype),
                  jax.ShapeDtypeStruct((nk, R, H, TP), F32),
                  jax.ShapeDtypeStruct((nk, R, H, TP), F32)),
        **program_grid("s", split * nk, heads=H, rows=R),
        compiler_params=compiler_params(),
        **interpret_kwargs(),
    )(k, v.astype(dtype), vn.astype(dtype), dy.astype(dtype), h.astype(dtype),
      dk_core.astype(dtype), rows_of(beta.astype(F32)), rows_of(b.astype(F32)))
    dbeta = jnp.transpose(jnp.sum(dbeta, axis=0), (0, 2, 1))  # [NK, R, H, TP] -> [R, TP, H]
    db = jnp.sum(db, axis=0).reshape(R, H, NC, L)  # [NK, R, H, TP] -> [R, H, NC, L]
    # b is the in-chunk inclusive cumsum of g: dg is the in-chunk suffix sum of db
    dg = jax.lax.cumsum(db, axis=3, reverse=True).reshape(R, H, TP)  # -> [R, H, TP]
    return dk, dbeta.astype(beta.dtype), jnp.transpose(dg, (0, 2, 1))  # dg -> [R, TP, H]
