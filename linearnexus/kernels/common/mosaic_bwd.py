"""Pallas Mosaic GPU (Hopper, sm_90+) backward kernels of the scalar-gated chunked linear
attention (``mosaic_chunk.py`` has the forward and the ``custom_vjp`` that calls these).

Per chunk c of L tokens, entering with state ``S_c`` and leaving with the state gradient
``dS_{c+1}`` (``dS_{NC} = dht``), with ``b`` the in-chunk inclusive cumsum of log-gates,
``Gamma_ij = exp(b_i - b_j)`` for ``j <= i`` (else 0) and ``s`` the scale::

    dS_c = e^{b_L} dS_{c+1} + q^T (s e^{b} * do)                               [K, V]
    dv   = (s (k q^T) * Gamma^T) do + e^{b_L - b} * (k dS_{c+1})               [L, V]
    dA   = s (do v^T) * Gamma                                                  [L, L]
    dq   = s e^{b} * (do S_c^T) + dA k                                         [L, K]
    dk   = e^{b_L - b} * (v dS_{c+1}^T) + dA^T q                               [L, K]

Two kernels, both walking the chunks of one row in a TMA pipeline (``plgpu.emit_pipeline``)
with every matmul a warpgroup ``wgmma``:

* ``state_grad`` (value blocks of 64, or 32 on small grids, x heads x rows, launched as
  ``(rows, heads, blocks)``: ``mosaic_chunk.program_grid``; chunks in reverse): the state gradient
  ``dS [K, BV]`` is a float32 wgmma accumulator that never leaves registers; per chunk it
  goes out once in bf16 (``dh [R, NC, H, K, V]``, read by the next kernel), ``dv`` is
  complete here (its contractions run over K and L, both whole in the program), and after
  the walk ``dS_0`` is the initial state's gradient. It is the forward kernel run
  backwards: the same four wgmmas, ``q`` in place of ``k`` and ``do`` in place of ``v``.
* ``dqk`` (key blocks of 64 times chunk parts on small grids, x heads x rows, launched as
  ``(rows, heads, parts x blocks)``; chunks in order): ``dq``, ``dk`` and the
  gate gradient's per-token terms from ``q, k, v, do``, the stored ``S_c`` (the forward's
  ``store_states``) and ``dS_{c+1}``. ``dA^T`` is a second small wgmma (``v do^T``) rather
  than a transpose of registers, as FlashAttention-3's backward forms ``dP^T``. Blocks of
  64 keys keep the whole ``[L, V]`` and ``[64, V]`` tiles of two stages in shared memory
  (V <= 128; ``mosaic_chunk.mosaic_backward_fits``).

For the delta rules the reverse walk also reads ``w`` (``dv`` is ``dvn``, and the state
gradient loses ``w^T dvn``), or with ``st.fused_grad`` ``M^{-1}`` and ``beta`` (``dv`` is
``dy = M^{-T} dvn``, and the state gradient loses ``k^T (beta e^b dy)``, the same term);
:func:`run_dw` forms ``-x S_c^T`` per chunk for ``x`` = ``dvn`` or ``dy``.

The gate gradient (``pallas_chunk.py``'s module doc derives it) is
``dg_t = sum_{i >= t} term_i + sum_{j < t} kdk_j + e^{b_L} <S_c, dS_{c+1}>`` within the
chunk, with ``term_i = s q_i . dq_i(state) + sum_{j < i} P_ij - sum_{l > i} P_li``,
``P_ij = dA_ij (q_i . k_j)``, ``kdk_j = k_j . dk_j(state)``: the grouping in which the
diagonal pairs, which cancel exactly, never appear (the ungrouped sum loses all precision
at strong decay). The kernel writes ``term``, ``kdk`` per token and ``<S_c, dS_{c+1}>`` per
key row (float32, ~1/64 of the gradient bytes); the in-chunk cumulative sums and the sum
over key rows are three small XLA ops on ``[R, H, TP]`` arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common.mosaic_chunk import (
    HOPPER_SMS,
    SMEM_LIMIT,
    MosaicStatic,
    _chunk_flags,
    _enter,
    _leave,
    _load,
    _state_out,
    _swizzled,
    _transposed,
    balances_waves,
    check_layout,
    check_wy_args,
    compiler_params,
    deepest_stages,
    env_switch,
    gate_rows,
    interpret_kwargs,
    lowered_once,
    operand_swizzle,
    program_grid,
    small_grid,
    state_grad_carry,
    wgmma_onto,
    wgmma_regs,
)

F32 = jnp.float32
#: key columns per ``dqk`` program
DQK_BLOCK_K = 64
#: value columns per ``state_grad`` program (the ``[K, 64]`` float32 state gradient is 64
#: registers a thread at K = 128; independent of the forward's ``block_v``)
STATE_BLOCK_V = 64


def state_smem_bytes(*, chunk: int, key_dim: int, block_v: int, stages: int, itemsize: int,
                     delta: bool = False, packed: bool = False, fused: bool = False,
                     scaled_dy: bool = False) -> int:
    """Shared memory of one ``state_grad`` program: per stage the q, k, do, gate, dv and dh
    tiles; the scaled-do tile; the scoped float32 staging tile of dht / dh0. ``delta``: one
    more ``[L, K]`` slot a stage (``w``) and the ``-dvn`` tile. ``fused`` (the delta rules'
    gradient from ``M^{-1}``): an ``[L, L]`` ``M^{-1}`` slot and a float32 ``beta`` row a
    stage in place of ``w``. ``packed``: the staging tile stays beside the pipeline (each
    sequence's dht / dh0 pass through it inside). ``scaled_dy``: one more ``[L, BV]`` output
    slot a stage (``beta dy``)."""
    L, K, BV = chunk, key_dim, block_v
    per_stage = ((3 if delta else 2) * L * K + 2 * L * BV + K * BV) * itemsize + (2 * L + K) * 4
    if delta and fused:
        per_stage += (L * L - L * K) * itemsize + L * 4
    per_stage += L * BV * itemsize if scaled_dy else 0
    scratch = (2 if delta else 1) * L * BV * itemsize + (K * BV * 4 if packed else 0)
    return scratch + max(stages * per_stage, K * BV * 4)


def dqk_smem_bytes(*, chunk: int, key_dim: int, value_dim: int, stages: int, itemsize: int) -> int:
    """Shared memory of one ``dqk`` program: per stage the q, k (64 keys), v, do, S_c, dS
    tiles, the gate rows, the dq, dk tiles and the float32 gate-gradient terms."""
    L, BK, V = chunk, min(key_dim, DQK_BLOCK_K), value_dim
    per_stage = (2 * L * BK + 2 * L * V + 2 * BK * V + 2 * L * BK) * itemsize + (4 * L + BK) * 4
    return stages * per_stage


def _bcast(x: Array, shape: tuple[int, int], dim: int) -> Array:
    return jax.lax.broadcast_in_dim(x, shape, [dim])


def _state_grad_kernel(*refs, st: MosaicStatic, dtype: Any, stages: int, block_v: int,
                       scaled_dy: bool = False) -> None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    delta = c.delta  # the delta rules: dv is dvn, and dS_c loses w^T dvn
    # the delta rules' gradient from M^{-1}: dv is dy = M^{-T} dvn, and dS_c loses
    # k^T (beta e^b dy) (= w^T dvn)
    fused = delta and st.fused_grad
    packed = c.packed  # a row of packed sequences: dht enters and dh0 leaves at their chunks
    refs = list(refs)
    bar = refs.pop()
    seq_smem = refs.pop() if packed else None
    ndv_smem = refs.pop() if delta else None
    doe_smem = refs.pop()
    dvb_ref = refs.pop() if scaled_dy else None  # beta dy, the delta rules' dv
    dv_ref, dh_ref, dh0_ref = refs[-3:]
    refs = refs[:-3]
    seq_ref, flag_ref = (refs.pop(-2), refs.pop()) if packed else (None, None)
    dht_ref = refs.pop()
    wy_refs = (refs.pop(-2), refs.pop()) if fused else (refs.pop(),) if delta else ()
    q_ref, k_ref, do_ref, b_ref, d_ref, e_ref = refs
    L, K, BV, NC = c.chunk, c.key_dim, block_v, c.n_chunks
    cap = operand_swizzle(BV, dtype)  # every wgmma operand at one swizzle (64 B at BV = 32)
    wgmma_layout = plgpu.Layout.WGMMA
    rows_layout, cols_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)
    iv, h, r = jax.lax.axis_index("v"), jax.lax.axis_index("h"), jax.lax.axis_index("r")
    vs = pl.ds(iv * BV, BV)
    ds0 = state_grad_carry(c, dht_ref, bar, r, h, vs, (K, BV))
    # [key j, query i]: Gamma^T keeps i >= j
    upper = (plgpu.broadcasted_iota(jnp.int32, (L, L), 1, layout=wgmma_layout)
             >= plgpu.broadcasted_iota(jnp.int32, (L, L), 0, layout=wgmma_layout))

    def body(idx, q_smem, k_smem, do_smem, b_smem, d_smem, e_smem, *rest):
        n_wy = len(wy_refs)
        wy_smem, rest = rest[:n_wy], rest[n_wy:]  # (w,) or (M^{-1}, beta) or ()
        dv_smem, dh_smem, *dvb_smem, ds = rest
        if packed:  # the chunk that closes a sequence enters with its final state's gradient
            seq, opens, closes = _chunk_flags(seq_ref, flag_ref, r, back(idx[0]))
            ds = _enter(ds, closes, seq_smem, dht_ref.at[seq, h, :, vs], bar)
        # dS_{c+1} in the input dtype: the k dS matmul reads it, and it goes out for dqk
        dh_smem[...] = ds.astype(dtype)
        plgpu.commit_smem()
        q_t = _transposed(q_smem)  # [K, L] view of the [L, K] tile

        def intra(acc_kq, acc_dv):
            plgpu.wgmma(acc_kq, k_smem, q_t)  # [L, K] @ [K, L]: k_j . q_i
            plgpu.wgmma(acc_dv, k_smem, dh_smem)  # [L, K] @ [K, BV]
            return acc_kq[...], acc_dv[...]

        kq, kds = pl.run_scoped(intra, plgpu.ACC((L, L), F32), plgpu.ACC((L, BV), F32))
        b_row = _load(b_smem, rows_layout)  # [L], per key row j
        b_col = _load(b_smem, cols_layout)  # [L], per query column i
        diff = _bcast(b_col, (L, L), 1) - _bcast(b_row, (L, L), 0)  # b_i - b_j at [j, i]
        # masked before the exp: below the diagonal b_i - b_j > 0 could overflow
        at = jnp.where(upper, kq * jnp.exp(jnp.where(upper, diff, 0.0)) * c.scale, 0.0)
        d_row = _load(d_smem, rows_layout)  # [L], e^{b_L - b}

        def intra_dv(acc_dv):
            wgmma_regs(acc_dv, at.astype(dtype), do_smem, cap)  # registers [L, L] @ [L, BV]

        dv = wgmma_onto(kds * _bcast(d_row, (L, BV), 0), intra_dv)  # dvn for the delta rules
        if fused:
            # dy = M^{-T} dvn (vn = M^{-1} y): dvn in the input dtype through the scratch tile
            # as the B operand of one more wgmma on the chain; dy goes out (the WY backward
            # and the dks kernel read it), and -(beta e^b dy) is the B operand of the state
            # update's k^T term (the Triton WY backward rounds dvn the same way)
            m_smem, beta_smem = wy_smem
            ndv_smem[...] = dv.astype(dtype)
            plgpu.commit_smem()

            def solve(acc_dy):
                plgpu.wgmma(acc_dy, _transposed(m_smem), ndv_smem)  # [L, L] @ [L, BV]
                return acc_dy[...]

            dy = pl.run_scoped(solve, plgpu.ACC((L, BV), F32))
            dv_smem[...] = dy.astype(dtype)
            beta_row = _load(beta_smem, rows_layout)  # [L]
            if scaled_dy:  # dv = beta dy (y = beta (v - ...)), for the Mosaic WY backward
                dvb_smem[0][...] = (dy * _bcast(beta_row, (L, BV), 0)).astype(dtype)
            ndv_smem[...] = (-dy * _bcast(beta_row * jnp.exp(b_row), (L, BV), 0)).astype(dtype)
        else:
            dv_smem[...] = dv.astype(dtype)
            if delta:  # -dvn in the input dtype, the B operand of the w^T dvn term below
                ndv_smem[...] = (-dv).astype(dtype)

        # dS_c = e^{b_L} dS_{c+1} + q^T (s e^{b} do): the decay goes on do's rows
        do = _load(do_smem, wgmma_layout).astype(F32)  # [L, BV]
        doe_smem[...] = (do * _bcast(jnp.exp(b_row) * c.scale, (L, BV), 0)).astype(dtype)
        plgpu.commit_smem()
        e_row = _load(e_smem, rows_layout)  # [K], e^{b_L} repeated

        def update(acc_s):
            plgpu.wgmma(acc_s, q_t, doe_smem)  # [K, L] @ [L, BV]
            if fused:  # dS_c -= k^T (beta e^b dy): y = beta (v - e^b k S_c)
                plgpu.wgmma(acc_s, _transposed(k_smem), ndv_smem)  # [K, L] @ [L, BV]
            elif delta:  # dS_c -= w^T dvn: vn = u - w S_c carries S_c into the chunk's values
                plgpu.wgmma(acc_s, _transposed(wy_smem[0]), ndv_smem)  # [K, L] @ [L, BV]

        ds = wgmma_onto(ds * _bcast(e_row, (K, BV), 0), update)
        if packed and c.has_h0:  # the chunk that opens a sequence leaves dS_c as its dh0
            _leave(ds, opens, seq_smem, dh0_ref.at[seq, h, :, vs])
        return ds

    def back(c):  # chunks in reverse
        return NC - 1 - c

    in_specs = [
        plgpu.BlockSpec((L, K), lambda c: (back(c), 0), transforms=_swizzled(K, dtype, cap)),  # q
        plgpu.BlockSpec((L, K), lambda c: (back(c), 0), transforms=_swizzled(K, dtype, cap)),  # k
        plgpu.BlockSpec((L, BV), lambda c: (back(c), 0),
                        transforms=_swizzled(BV, dtype, cap)),  # do
        plgpu.BlockSpec((L,), lambda c: (back(c),)),  # b
        plgpu.BlockSpec((L,), lambda c: (back(c),)),  # e^{b_L - b}
        plgpu.BlockSpec((K,), lambda c: (back(c),)),  # e^{b_L}, K copies per chunk
    ]
    ins = [q_ref.at[r, :, h, :], k_ref.at[r, :, h, :], do_ref.at[r, :, h, vs], b_ref.at[r, h],
           d_ref.at[r, h], e_ref.at[r, h]]
    if fused:  # M^{-1} [L, L] and beta [L] per chunk
        in_specs += [plgpu.BlockSpec((L, L), lambda c: (back(c), 0),
                                     transforms=_swizzled(L, dtype, cap)),
                     plgpu.BlockSpec((L,), lambda c: (back(c),))]
        ins += [wy_refs[0].at[r, :, h, :], wy_refs[1].at[r, h]]
    elif delta:  # w, [L, K] per chunk
        in_specs.append(plgpu.BlockSpec((L, K), lambda c: (back(c), 0),
                                        transforms=_swizzled(K, dtype, cap)))
        ins.append(wy_refs[0].at[r, :, h, :])
    out_specs = [
        plgpu.BlockSpec((L, BV), lambda c: (back(c), 0),
                        transforms=_swizzled(BV, dtype, cap)),  # dv
        plgpu.BlockSpec((None, K, BV), lambda c: (back(c), 0, 0),
                        transforms=_swizzled(BV, dtype, cap)),  # dS_{c+1}
    ]
    outs = [dv_ref.at[r, :, h, vs], dh_ref.at[r, :, h, :, vs]]
    if scaled_dy:  # beta dy
        out_specs.append(out_specs[0])
        outs.append(dvb_ref.at[r, :, h, vs])
    pipeline = plgpu.emit_pipeline(body, grid=(NC,), in_specs=in_specs, out_specs=out_specs,
                                   max_concurrent_steps=stages, init_carry=ds0)
    ds_first = pipeline(*ins, *outs)
    if not packed:
        _state_out(ds_first, dh0_ref.at[r, h, :, vs])


def _dqk_kernel(q_ref, k_ref, v_ref, do_ref, h_ref, dh_ref, b_ref, d_ref, dq_ref, dk_ref,
                term_ref, kdk_ref, sds_ref, *, st: MosaicStatic, dtype: Any,
                stages: int, per: int) -> None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    L, BK, V = c.chunk, min(c.key_dim, DQK_BLOCK_K), c.value_dim
    nk = c.key_dim // BK
    wgmma_layout = plgpu.Layout.WGMMA
    rows_layout, cols_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)
    s, h, r = jax.lax.axis_index("k"), jax.lax.axis_index("h"), jax.lax.axis_index("r")
    ik, part = s % nk, s // nk  # this program's key block and its share of the chunks
    ks = pl.ds(ik * BK, BK)
    chunks, rows = pl.ds(part * per, per), pl.ds(part * per * L, per * L)
    row = plgpu.broadcasted_iota(jnp.int32, (L, L), 0, layout=wgmma_layout)
    col = plgpu.broadcasted_iota(jnp.int32, (L, L), 1, layout=wgmma_layout)
    lower, upper = row >= col, col >= row

    def body(_, q_smem, k_smem, v_smem, do_smem, h_smem, dh_smem, b_smem, d_smem,
             dq_smem, dk_smem, term_smem, kdk_smem, sds_smem):
        b_row = _load(b_smem, rows_layout)  # [L]
        b_col = _load(b_smem, cols_layout)  # [L]
        diff = _bcast(b_row, (L, L), 0) - _bcast(b_col, (L, L), 1)  # b_i - b_j at [i, j]

        def dq_side(acc_qk, acc_da, acc_dq):
            plgpu.wgmma(acc_qk, q_smem, _transposed(k_smem))  # [L, BK] @ [BK, L]
            plgpu.wgmma(acc_da, do_smem, _transposed(v_smem))  # [L, V] @ [V, L]
            plgpu.wgmma(acc_dq, do_smem, _transposed(h_smem))  # [L, V] @ [V, BK]: do S_c^T
            return acc_qk[...], acc_da[...], acc_dq[...]

        qk, da, dqs = pl.run_scoped(dq_side, plgpu.ACC((L, L), F32), plgpu.ACC((L, L), F32),
                                    plgpu.ACC((L, BK), F32))
        da = jnp.where(lower, da * jnp.exp(jnp.where(lower, diff, 0.0)) * c.scale, 0.0)
        # P_ij = dA_ij (q_i . k_j), j < i; float32 (this K block's share of q_i . k_j)
        row_p = jnp.sum(jnp.where(row > col, da * qk, 0.0), axis=1)
        dqs = dqs * _bcast(jnp.exp(b_row), (L, BK), 0)
        q_dq = jnp.sum(_load(q_smem, wgmma_layout).astype(F32) * dqs, axis=1) * c.scale

        def dq_intra(acc):
            wgmma_regs(acc, da.astype(dtype), k_smem)  # registers [L, L] @ SMEM [L, BK]

        dq = wgmma_onto(dqs * c.scale, dq_intra)
        dq_smem[...] = dq.astype(dtype)

        def dk_side(acc_kq, acc_dat, acc_dk):
            plgpu.wgmma(acc_kq, k_smem, _transposed(q_smem))  # [L, BK] @ [BK, L]
            plgpu.wgmma(acc_dat, v_smem, _transposed(do_smem))  # [L, V] @ [V, L]: dA^T
            plgpu.wgmma(acc_dk, v_smem, _transposed(dh_smem))  # [L, V] @ [V, BK]: v dS^T
            return acc_kq[...], acc_dat[...], acc_dk[...]

        kq, dat, dks = pl.run_scoped(dk_side, plgpu.ACC((L, L), F32), plgpu.ACC((L, L), F32),
                                     plgpu.ACC((L, BK), F32))
        # [key j, query i]: -diff is b_i - b_j there
        dat = jnp.where(upper, dat * jnp.exp(jnp.where(upper, -diff, 0.0)) * c.scale, 0.0)
        col_p = jnp.sum(jnp.where(col > row, dat * kq, 0.0), axis=1)  # sum_{i > j} P_ij
        dks = dks * _bcast(_load(d_smem, rows_layout), (L, BK), 0)
        k_dk = jnp.sum(_load(k_smem, wgmma_layout).astype(F32) * dks, axis=1)

        def dk_intra(acc):
            wgmma_regs(acc, dat.astype(dtype), q_smem)  # registers [L, L] @ SMEM [L, BK]

        dk = wgmma_onto(dks, dk_intra)
        dk_smem[...] = dk.astype(dtype)
        term_smem[...] = q_dq + row_p - col_p
        kdk_smem[...] = k_dk
        s_c = _load(h_smem, wgmma_layout).astype(F32)  # [BK, V]
        ds = _load(dh_smem, wgmma_layout).astype(F32)
        sds_smem[...] = jnp.sum(s_c * ds, axis=1)  # [BK]: <S_c, dS_{c+1}> per key row

    key_tile = _swizzled(BK, dtype)
    value_tile = _swizzled(V, dtype)
    in_specs = [
        plgpu.BlockSpec((L, BK), lambda c: (c, 0), transforms=key_tile),  # q
        plgpu.BlockSpec((L, BK), lambda c: (c, 0), transforms=key_tile),  # k
        plgpu.BlockSpec((L, V), lambda c: (c, 0), transforms=value_tile),  # v
        plgpu.BlockSpec((L, V), lambda c: (c, 0), transforms=value_tile),  # do
        plgpu.BlockSpec((None, BK, V), lambda c: (c, 0, 0), transforms=value_tile),  # S_c
        plgpu.BlockSpec((None, BK, V), lambda c: (c, 0, 0), transforms=value_tile),  # dS_{c+1}
        plgpu.BlockSpec((L,), lambda c: (c,)),  # b
        plgpu.BlockSpec((L,), lambda c: (c,)),  # e^{b_L - b}
    ]
    out_specs = [
        plgpu.BlockSpec((L, BK), lambda c: (c, 0), transforms=key_tile),  # dq
        plgpu.BlockSpec((L, BK), lambda c: (c, 0), transforms=key_tile),  # dk
        plgpu.BlockSpec((L,), lambda c: (c,)),  # term
        plgpu.BlockSpec((L,), lambda c: (c,)),  # kdk
        plgpu.BlockSpec((None, BK), lambda c: (c, 0)),  # <S_c, dS_{c+1}> per key row
    ]
    pipeline = plgpu.emit_pipeline(body, grid=(per,), in_specs=in_specs, out_specs=out_specs,
                                   max_concurrent_steps=stages)
    pipeline(q_ref.at[r, rows, h, ks], k_ref.at[r, rows, h, ks], v_ref.at[r, rows, h, :],
             do_ref.at[r, rows, h, :], h_ref.at[r, chunks, h, ks, :],
             dh_ref.at[r, chunks, h, ks, :], b_ref.at[r, h, rows], d_ref.at[r, h, rows],
             dq_ref.at[r, rows, h, ks], dk_ref.at[r, rows, h, ks], term_ref.at[ik, r, h, rows],
             kdk_ref.at[ik, r, h, rows], sds_ref.at[r, h, chunks, ks])


#: "1" runs the reverse walk at value blocks of 32 where 64 would leave at least half the SMs
#: idle (:func:`state_block_v`); unset: :data:`STATE_SMALL_BV`
STATE_SMALL_BV_ENV = "LINEARNEXUS_MOSAIC_BWD_BV32"
#: on: at (2, 16384, 16, 128) the delta rules' reverse walk ran 64 programs (value blocks of
#: 64 x 16 heads x 2 rows) for 132 SMs, the forward walk 128 (its heuristic's blocks of 32
#: there); blocks of 32 give the same products per output column. On an H100 (bf16,
#: 2026-12-06, mosaic_config_gpu.py through the api) gated_delta_rule's forward + backward
#: there took 3.235 ms with it against 3.396 without, 2.788 with the dqk split too (3.396
#: neither), 2.567 with both and the Mosaic WY backward
STATE_SMALL_BV = True
#: the shortest walk (chunks) that takes value blocks of 32 on a small grid, as the forward
#: heuristics' (``default_mosaic_config``, ``mosaic_delta.default_delta_config``)
STATE_SMALL_MIN_CHUNKS = 8


def state_block_v(*, rows: int, heads: int, value_dim: int, n_chunks: int,
                  packed: bool = False) -> int:
    """The reverse walk's value block: :data:`STATE_BLOCK_V`, or 32 with
    :data:`STATE_SMALL_BV_ENV` on where blocks of 64 leave at least half the SMs idle
    (``mosaic_chunk.small_grid``: batch rows, value dims a multiple of 64) on a walk of >= 8
    chunks (as the forward heuristics: ``n_chunks``, chunk 64), or where 32
    fills the last wave better (``mosaic_chunk.balances_waves``; ``LINEARNEXUS_MOSAIC_WAVES=0``
    turns that off)."""
    if n_chunks < STATE_SMALL_MIN_CHUNKS:  # a short walk: as the forward heuristics, 64
        return min(value_dim, STATE_BLOCK_V)
    if env_switch(STATE_SMALL_BV_ENV, STATE_SMALL_BV) and small_grid(
            rows=rows, heads=heads, value_dim=value_dim, packed=packed):
        return 32
    if (not packed and value_dim % 64 == 0
            and balances_waves((value_dim // 64) * rows * heads)):  # a fuller last wave
        return 32
    return min(value_dim, STATE_BLOCK_V)


@lowered_once("scaled_dy")
def run_state_grad(st: MosaicStatic, q: Array, k: Array, do: Array, gates: tuple[Array, ...],
                   dfinal: Array, w: Array | None = None,
                   layout: tuple[Array, Array] | None = None, *, minv: Array | None = None,
                   beta: Array | None = None, scaled_dy: bool = False) -> tuple[Array, ...]:
    """The reverse walk: ``(dv [R, TP, H, V], dh [R, NC, H, K, V] (dS_{c+1} per chunk, in
    q's dtype), dh0 [N, H, K, V] float32)``; ``gates`` from ``mosaic_chunk.gate_rows``,
    ``dfinal [N, H, K, V]``. For the delta rules (``st.core.delta``) ``w [R, TP, H, K]`` is
    the WY form's and ``dv`` is the gradient of ``vn = u - w S_c`` (which is ``u``'s); with
    ``st.fused_grad`` ``minv [R, TP, H, L]`` (``pallas_wy.wy_inverse``) and ``beta [R, TP,
    H]`` replace ``w``, and ``dv`` is ``dy = M^{-T} dvn``, the gradient of ``y = beta (v -
    e^b k S_c)``. ``layout``: packed rows' ``(seq_info, flags)`` (``mosaic_forward``); ``dh0``
    then holds only the sequences that own a chunk, and only with an initial state.
    ``scaled_dy`` (with ``fused_grad``): a fourth output, ``dv = beta dy [R, TP, H, V]`` in
    q's dtype, the delta rules' value gradient (for ``mosaic_wy.wy_fused_backward_mosaic``,
    which does not form it)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    fused = c.delta and st.fused_grad
    check_wy_args(c.delta, fused, "fused_grad", w, minv, beta)
    if scaled_dy and not fused:
        raise ValueError(f"scaled_dy: beta dy exists only in the delta rules' gradient from "
                         f"M^{{-1}} (fused_grad), got delta={c.delta}, "
                         f"fused_grad={st.fused_grad}")
    R, NC, L, H, K, V = c.rows, c.n_chunks, c.chunk, c.heads, c.key_dim, c.value_dim
    dtype = q.dtype
    bv = state_block_v(rows=R, heads=H, value_dim=V, n_chunks=NC, packed=c.packed)
    stages = st.bwd_stages or deepest_stages(lambda s: state_smem_bytes(
        chunk=L, key_dim=K, block_v=bv, stages=s, itemsize=jnp.dtype(dtype).itemsize,
        delta=c.delta, packed=c.packed, fused=fused, scaled_dy=scaled_dy) <= SMEM_LIMIT, 3)
    check_layout(c, layout)
    tile = plgpu.SMEM((L, bv), dtype, transforms=_swizzled(bv, dtype, operand_swizzle(bv, dtype)))
    # the scaled-do tile, for the delta rules the -dvn tile, for packed rows the float32
    # staging tile of each sequence's dht / dh0
    scratch = [tile, tile] if c.delta else [tile]
    if fused:  # beta's rows as the gates', a chunk's tokens contiguous
        wy = (minv, jnp.transpose(beta.astype(F32), (0, 2, 1)))  # [R, TP, H] -> [R, H, TP]
    else:
        wy = () if w is None else (w,)
    if c.packed:
        scratch.append(plgpu.SMEM((K, bv), F32, transforms=_swizzled(bv, F32)))
    return plgpu.kernel(
        functools.partial(_state_grad_kernel, st=st, dtype=dtype, stages=stages, block_v=bv,
                          scaled_dy=scaled_dy),
        out_type=(jax.ShapeDtypeStruct((R, NC * L, H, V), dtype),
                  jax.ShapeDtypeStruct((R, NC, H, K, V), dtype),
                  jax.ShapeDtypeStruct((c.n_seqs if c.packed else R, H, K, V), F32),
                  *([jax.ShapeDtypeStruct((R, NC * L, H, V), dtype)] if scaled_dy else [])),
        scratch_types=(*scratch, plgpu.Barrier(num_barriers=1)),
        **program_grid("v", V // bv, heads=H, rows=R),
        compiler_params=compiler_params(),
        **interpret_kwargs(),
    )(q, k, do.astype(dtype), *gates, *wy, dfinal.astype(F32),
      *(() if layout is None else layout))


#: "1" shares each row's chunks between ``dq / dk`` programs where the grid would leave at
#: least half the SMs idle (:func:`dqk_split`), "0" keeps one program per key block, head and
#: row; unset: :data:`DQK_SPLIT`
DQK_SPLIT_ENV = "LINEARNEXUS_MOSAIC_DQK_SPLIT"
#: on: at (2, 16384, 16, 128) the kernel had 64 programs (2 key blocks x 16 heads x 2 rows)
#: for 132 SMs at one program per SM (196 KB of shared memory at two stages), each walking 256
#: chunks whose terms are independent of each other's (the split gives the same gradients
#: bit for bit: tests/test_mosaic_lowering.py). On an H100 (bf16, 2026-12-06, through the
#: api) gated_delta_rule's forward + backward there took 2.929 ms with it against 3.396
#: without; simple_gla's with one walk's gradient 1.539 with it and value blocks of 32
#: against 2.104
DQK_SPLIT = True


def dqk_split(*, programs: int, n_chunks: int) -> int:
    """How many programs share a (key block, head, row)'s chunks in :func:`run_dqk`: 1
    unless the split is on (:data:`DQK_SPLIT_ENV`) and ``programs`` leave at least half the
    SMs idle (:data:`mosaic_chunk.HOPPER_SMS`; at one program per SM, 128 programs are one
    wave and doubling them makes two), else the fewest (a divisor of ``n_chunks``) that fill
    them, each keeping >= 8 chunks (the pipeline's fill is one chunk of a program's walk).
    Past half the SMs, 2 where that fills the last wave better
    (:func:`mosaic_chunk.balances_waves`; ``LINEARNEXUS_MOSAIC_WAVES=0`` turns that off)."""
    if 2 * programs > HOPPER_SMS:
        # two parts where they fill the last wave better, e.g. 192 programs -> 384
        two = n_chunks % 2 == 0 and n_chunks >= 16 and balances_waves(programs)
        return 2 if two else 1
    if not env_switch(DQK_SPLIT_ENV, DQK_SPLIT):
        return 1
    best = 1
    for d in range(2, n_chunks // 8 + 1):
        if n_chunks % d == 0:
            best = d
            if d * programs >= HOPPER_SMS:
                break
    return best


@lowered_once()
def run_dqk(st: MosaicStatic, q: Array, k: Array, v: Array, do: Array, h: Array, dh: Array,
            gates: tuple[Array, ...]) -> tuple[Array, ...]:
    """``(dq, dk [R, TP, H, K], term, kdk [NK, R, H, TP], sds [R, H, NC, K])``: the
    gradients of q and k, and the gate gradient's per-token and per-key-row terms."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    R, NC, L, H, K, V = c.rows, c.n_chunks, c.chunk, c.heads, c.key_dim, c.value_dim
    TP, nk = NC * L, K // min(K, DQK_BLOCK_K)
    dtype = q.dtype
    stages = st.dqk_stages or deepest_stages(lambda s: dqk_smem_bytes(
        chunk=L, key_dim=K, value_dim=V, stages=s,
        itemsize=jnp.dtype(dtype).itemsize) <= SMEM_LIMIT, 3)
    split = dqk_split(programs=nk * H * R, n_chunks=NC)
    return plgpu.kernel(
        functools.partial(_dqk_kernel, st=st, dtype=dtype, stages=stages, per=NC // split),
        out_type=(jax.ShapeDtypeStruct((R, TP, H, K), dtype),
                  jax.ShapeDtypeStruct((R, TP, H, K), dtype),
                  jax.ShapeDtypeStruct((nk, R, H, TP), F32),
                  jax.ShapeDtypeStruct((nk, R, H, TP), F32),
                  jax.ShapeDtypeStruct((R, H, NC, K), F32)),
        **program_grid("k", nk * split, heads=H, rows=R),
        compiler_params=compiler_params(),
        **interpret_kwargs(),
    )(q, k, v, do.astype(dtype), h, dh, gates[0], gates[1])


#: "1" forms the delta rules' ``dw = -dvn S_c^T`` in the Mosaic kernel :func:`run_dw`, "0" in
#: one batched XLA matmul; unset: :data:`DW_KERNEL`
DW_KERNEL_ENV = "LINEARNEXUS_MOSAIC_DW_KERNEL"
#: the default of :data:`DW_KERNEL_ENV`: the kernel. On an H200 (bf16 (8, 4096, 16, 128),
#: 2026-12-05, benchmarks/mosaic_gdn_check.py): 0.132 ms alone against the XLA matmul's 0.370,
#: gated_delta_rule fwd+bwd 2.536 ms against 2.666 through the api
DW_KERNEL = True
#: programs the ``dw`` kernel aims for (two per SM of an H100 / H200)
DW_PROGRAMS = 264


def dw_smem_bytes(*, chunk: int, key_dim: int, value_dim: int, stages: int,
                  itemsize: int) -> int:
    """Shared memory of one ``dw`` program: per stage the ``dvn [L, V]``, ``S_c [K, V]`` and
    ``dw [L, K]`` tiles."""
    L, K, V = chunk, key_dim, value_dim
    return stages * (L * V + K * V + L * K) * itemsize


def chunk_parts(*, programs: int, n_chunks: int, target: int) -> int:
    """Into how many parts a streaming kernel cuts each walk's ``n_chunks`` chunks, one program
    a part, when ``programs`` walks run side by side: the fewest (a divisor of ``n_chunks``)
    that give ``target`` programs, else one part a chunk."""
    for d in range(1, n_chunks + 1):
        if n_chunks % d == 0 and d * programs >= target:
            return d
    return n_chunks


def dw_split(*, rows: int, heads: int, n_chunks: int) -> int:
    """How many programs share a (row, head)'s chunks in :func:`run_dw`
    (:func:`chunk_parts` towards :data:`DW_PROGRAMS`)."""
    return chunk_parts(programs=rows * heads, n_chunks=n_chunks, target=DW_PROGRAMS)


def _dw_kernel(dvn_ref: Any, h_ref: Any, dw_ref: Any, *, st: MosaicStatic, dtype: Any,
               per: int, stages: int) -> None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    L, K, V = c.chunk, c.key_dim, c.value_dim
    part, h, r = jax.lax.axis_index("s"), jax.lax.axis_index("h"), jax.lax.axis_index("r")

    def body(idx, dvn_smem, s_smem, dw_smem):
        def product(acc):
            plgpu.wgmma(acc, dvn_smem, _transposed(s_smem))  # [L, V] @ [V, K]
            return acc[...]

        dw_smem[...] = (-pl.run_scoped(product, plgpu.ACC((L, K), F32))).astype(dtype)

    rows = pl.ds(part * per * L, per * L)  # this program's chunks' tokens
    pipeline = plgpu.emit_pipeline(
        body, grid=(per,), max_concurrent_steps=stages,
        in_specs=[plgpu.BlockSpec((L, V), lambda i: (i, 0), transforms=_swizzled(V, dtype)),
                  plgpu.BlockSpec((None, K, V), lambda i: (i, 0, 0),
                                  transforms=_swizzled(V, dtype))],
        out_specs=[plgpu.BlockSpec((L, K), lambda i: (i, 0), transforms=_swizzled(K, dtype))])
    pipeline(dvn_ref.at[r, rows, h, :], h_ref.at[r, pl.ds(part * per, per), h, :, :],
             dw_ref.at[r, rows, h, :])


@lowered_once("stages")
def run_dw(st: MosaicStatic, dvn: Array, h: Array, stages: int | None = None) -> Array:
    """``dw = -dvn S_c^T`` per chunk, ``[R, TP, H, K]`` in dvn's dtype, from ``dvn [R, TP, H,
    V]`` and the stored entering states ``h [R, NC, H, K, V]``: a streaming Mosaic kernel
    (grid ``[parts of the chunks, heads, rows]``, one wgmma a chunk in a TMA pipeline) that
    reads each operand once in the layout it has. XLA's batched matmul of the same product
    transposes around it (``dvn`` has the chunk's tokens between its batch axes)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    R, NC, L, H, K, V = c.rows, c.n_chunks, c.chunk, c.heads, c.key_dim, c.value_dim
    dtype = dvn.dtype
    stages = stages or deepest_stages(lambda s: dw_smem_bytes(
        chunk=L, key_dim=K, value_dim=V, stages=s,
        itemsize=jnp.dtype(dtype).itemsize) <= SMEM_LIMIT, 3)
    split = dw_split(rows=R, heads=H, n_chunks=NC)
    return plgpu.kernel(
        functools.partial(_dw_kernel, st=st, dtype=dtype, per=NC // split, stages=stages),
        out_type=jax.ShapeDtypeStruct((R, NC * L, H, K), dtype),
        grid=(split, H, R),
        grid_names=("s", "h", "r"),
        compiler_params=compiler_params(),
        **interpret_kwargs(),
    )(dvn, h.astype(dtype))


def mosaic_backward(st: MosaicStatic, q: Array, k: Array, v: Array, b: Array, h: Array,
                    do: Array, dfinal: Array, layout: tuple[Array, Array] | None = None
                    ) -> tuple[Array, Array, Array, Array, Array]:
    """Gradients of the chunked core through the two Mosaic GPU kernels (module doc).

    Args:
        st: static description (chunk layout, batch rows or packed). q, k: ``[R, TP, H, K]``.
            v: ``[R, TP, H, V]`` (bf16 / f16). b: ``[R, TP, H]`` float32 in-chunk cumsum of
            the log-gates. h: ``[R, NC, H, K, V]`` every chunk's entering state (the
            forward's ``store_states``). do: ``[R, TP, H, V]``. dfinal: ``[N, H, K, V]``.
        layout: packed rows' ``(seq_info, flags)`` (``mosaic_forward``), else None.

    Returns:
        ``(dq, dk [R, TP, H, K], dv [R, TP, H, V] in q's dtype, dg [R, TP, H] float32,
        dh0 [N, H, K, V] float32)`` (packed: ``dh0`` only for sequences that own a chunk).
    """
    c = st.core
    gates = gate_rows(b, c.chunk, c.key_dim)
    dv, dh, dh0 = run_state_grad(st, q, k, do, gates, dfinal, layout=layout)
    dq, dk, term, kdk, sds = run_dqk(st, q, k, v, do, h, dh, gates)
    return dq, dk, dv, _gate_grad(st, gates, term, kdk, sds), dh0


def mosaic_delta_backward(st: MosaicStatic, q: Array, k: Array, w: Array, b: Array, h: Array,
                          vn: Array, do: Array, dfinal: Array,
                          layout: tuple[Array, Array] | None = None
                          ) -> tuple[Array, Array, Array, Array, Array, Array]:
    """Gradients of the delta rules' chunk core (``vn = u - w S_c`` in place of ``v``) through
    the two Mosaic GPU kernels.

    The reverse walk runs with ``w``: its ``dv`` is ``dvn = dv_intra + e^{b_L - b} (k dS_{c+1})``,
    the gradient of ``u``, and its state gradient takes ``- w^T dvn`` per chunk
    (``dS_c = e^{b_L} dS_{c+1} + q^T (s e^{b} do) - w^T dvn``). ``dq / dk`` and the gate terms
    are simple_gla's with ``vn`` (the forward's, stored) as the values: ``vn`` is what each
    chunk adds to the state, and the ``w S`` term moves with the entering state, so the gate
    gradient gains no term (``pallas_chunk.py``'s module doc). ``dw = -dvn S_c^T`` per chunk
    is a third Mosaic kernel (:func:`run_dw`; ``dq / dk`` has no shared memory left for the
    ``[L, V]`` tile of ``dvn`` at two stages), or with ``LINEARNEXUS_MOSAIC_DW_KERNEL=0`` one
    batched XLA matmul.

    Args:
        st: static description (``st.core.delta``). q, k, w: ``[R, TP, H, K]``. b:
            ``[R, TP, H]`` float32 in-chunk cumsum of the log-gates (zeros without a gate).
            h: ``[R, NC, H, K, V]`` the entering states and vn: ``[R, TP, H, V]`` (both from
            the forward that stores them). do: ``[R, TP, H, V]``. dfinal: ``[N, H, K, V]``.
        layout: packed rows' ``(seq_info, flags)`` (``mosaic_forward``), else None.

    Returns:
        ``(dq, dk, du, dw)`` in q's dtype (``[R, TP, H, K]``, ``du [R, TP, H, V]``),
        ``dg [R, TP, H]`` float32 and ``dh0 [N, H, K, V]`` float32.
    """
    c = st.core
    gates = gate_rows(b, c.chunk, c.key_dim)
    dvn, dh, dh0 = run_state_grad(st, q, k, do, gates, dfinal, w=w, layout=layout)
    dq, dk, term, kdk, sds = run_dqk(st, q, k, vn, do, h, dh, gates)
    dw = _minus_times_states(st, dvn, h)
    return dq, dk, dvn, dw, _gate_grad(st, gates, term, kdk, sds), dh0


def _minus_times_states(st: MosaicStatic, x: Array, h: Array) -> Array:
    """``-x S_c^T`` per chunk ``[R, TP, H, K]`` in x's dtype from ``x [R, TP, H, V]`` and the
    stored states ``h [R, NC, H, K, V]``: :func:`run_dw`, or with
    ``LINEARNEXUS_MOSAIC_DW_KERNEL=0`` one batched XLA matmul."""
    if env_switch(DW_KERNEL_ENV, DW_KERNEL):
        return run_dw(st, x, h)
    c = st.core
    R, NC, L, H, K, V = c.rows, c.n_chunks, c.chunk, c.heads, c.key_dim, c.value_dim
    xc = x.reshape(R, NC, L, H, V)  # [R, TP, H, V] -> [R, NC, L, H, V]
    # [R, NC, L, H, V] x [R, NC, H, K, V] -> [R, NC, L, H, K]: x S_c^T per chunk
    xs = jnp.einsum("rclhv,rchkv->rclhk", xc, h, preferred_element_type=F32)
    return (-xs).astype(x.dtype).reshape(R, NC * L, H, K)  # -> [R, TP, H, K]


def mosaic_delta_fused_backward(st: MosaicStatic, q: Array, k: Array, minv: Array,
                                beta: Array, b: Array, h: Array, vn: Array, do: Array,
                                dfinal: Array, layout: tuple[Array, Array] | None = None,
                                *, dks: bool = True, scaled_dy: bool = False
                                ) -> tuple[Array, Array, Array, Array | None, Array | None,
                                           Array, Array]:
    """The chunk core's share of the delta rules' gradient in the fused form
    (``st.fused_grad``: ``vn = M^{-1} y`` with ``y = beta (v - e^b k S_c)`` formed in the
    walk), through the same kernels as :func:`mosaic_delta_backward`.

    The reverse walk reads ``M^{-1}`` and ``beta`` in place of ``w``: per chunk ``dvn`` as
    there, then ``dy = M^{-T} dvn`` (one more wgmma; ``dy`` is its output), and the state
    gradient takes ``- k^T (beta e^b dy)`` (which is ``w^T dvn``). ``dq / dk`` and the gate
    terms are unchanged (``vn`` as the values); with ``dks`` the ``dw`` kernel forms
    ``dks = -dy S_c^T``, the cotangent of ``k S_c`` before its ``beta e^b`` row scale (else
    ``pallas_wy.wy_fused_backward`` forms it from the states). That function then turns
    ``dy``, ``dks`` (or the states) and ``vn`` into the WY part, or with ``scaled_dy``
    ``mosaic_wy.wy_fused_backward_mosaic`` does from ``dy`` and the states, the reverse walk
    writing ``dv = beta dy`` beside ``dy``.

    Args:
        st: static description (``st.core.delta``, ``st.fused_grad``). q, k: ``[R, TP, H,
            K]``. minv: ``[R, TP, H, L]`` (``pallas_wy.wy_inverse``). beta: ``[R, TP, H]``.
            b, h, vn, do, dfinal, layout: as :func:`mosaic_delta_backward`.
        dks: form ``dks`` (the ``dw`` kernel on ``dy``); False: None in its place, for a WY
            backward that forms it from the states (``pallas_wy.wy_fused_backward``'s
            ``states``).
        scaled_dy: the reverse walk also writes ``dv = beta dy``.

    Returns:
        ``(dq, dk, dy, dks, dv)`` in q's dtype (``dy``, ``dv`` ``[R, TP, H, V]``, the others
        ``[R, TP, H, K]``; ``dks`` None without ``dks``, ``dv`` None without
        ``scaled_dy``), ``dg [R, TP, H]`` float32 (the core's share) and ``dh0 [N, H, K, V]``
        float32.
    """
    c = st.core
    if not (c.delta and st.fused_grad and st.backward == "mosaic"):
        raise ValueError(f"st: expected the delta rules with fused_grad and the Mosaic backward, "
                         f"got delta={c.delta}, fused_grad={st.fused_grad}, "
                         f"backward={st.backward!r}")
    gates = gate_rows(b, c.chunk, c.key_dim)
    dy, dh, dh0, *dv = run_state_grad(st, q, k, do, gates, dfinal, layout=layout, minv=minv,
                                      beta=beta, scaled_dy=scaled_dy)
    dq, dk, term, kdk, sds = run_dqk(st, q, k, vn, do, h, dh, gates)
    dks_out = _minus_times_states(st, dy, h) if dks else None
    return (dq, dk, dy, dks_out, dv[0] if dv else None, _gate_grad(st, gates, term, kdk, sds),
            dh0)


def _gate_grad(st: MosaicStatic, gates: tuple[Array, ...], term: Array, kdk: Array,
               sds: Array) -> Array:
    """``dg [R, TP, H]`` float32 from ``dqk``'s per-token terms ``term, kdk [NK, R, H, TP]``
    and per-key-row ``sds [R, H, NC, K]`` (module doc)."""
    c = st.core
    R, NC, L, H = c.rows, c.n_chunks, c.chunk, c.heads
    # dg_t = sum_{i >= t} term_i + sum_{j < t} kdk_j + e^{b_L} <S_c, dS_{c+1}>, per chunk
    term = jnp.sum(term, axis=0).reshape(R, H, NC, L)  # [NK, R, H, TP] -> [R, H, NC, L]
    kdk = jnp.sum(kdk, axis=0).reshape(R, H, NC, L)
    after = jax.lax.cumsum(term, axis=3, reverse=True)
    before = jnp.pad(jnp.cumsum(kdk[..., :-1], axis=3), [(0, 0)] * 3 + [(1, 0)])
    b_last = gates[0].reshape(R, H, NC, L)[..., -1:]  # [R, H, TP] -> [R, H, NC, L] -> [.., 1]
    carried = jnp.exp(b_last) * jnp.sum(sds, axis=3, keepdims=True)  # [R, H, NC, 1]
    dg = (after + before + carried).reshape(R, H, NC * L)  # [R, H, NC, L] -> [R, H, TP]
    return jnp.transpose(dg, (0, 2, 1))  # [R, H, TP] -> [R, TP, H]
