"""Pallas (Triton-lowered) GPU kernels for the Mamba-1 selective scan, forward and backward.

Same contract as :func:`~linearnexus.kernels.mamba.reference.selective_scan_reference`;
the public entry point is :func:`selective_scan_pallas`. On a CPU the same kernels run in
Pallas interpret mode (:func:`~linearnexus.kernels.common.pallas.interpret_mode`), which is
what the tests check.

Layout. The JAX glue puts every array in the kernels' layout: channels last and padded to
whole channel blocks, time padded to whole forward groups (``max(chunk, 32)`` steps), the
state transposed to ``[B, N, C]``::

    x, dt, z, y  [B, T', C']      a tile of steps x ``block_v`` channels is one load
    B, C         [B, T', N']      float32; a tile of steps x all states is one load
    A            [N', C']         float32
    state        [B, N', C']      float32

``N'`` is ``N`` rounded up to a power of two; padding is inert: padded steps and channels
have ``dt = 0`` (decay ``exp(0) = 1``, input ``0``; with the step size fused, padded steps are
masked to ``dt = 0`` in the kernels and padded channels stay inert through ``A = x = 0``),
padded state rows have ``A = B = C = 0``.

Forward. Grid ``(batch, channel blocks)``, ``num_warps`` warps (default one); a program owns
``block_v`` channels of one sequence, carries the ``[N', block_v]`` float32 state and walks
time in sub-tiles of
``FWD_TILE = 8`` steps, a group of four or more per loop iteration. A sub-tile is whole-tensor
math on ``[8, N', block_v]`` values whose time axis Triton keeps inside each thread: decays
``a_t = exp2(dt_t A)`` (one ``ex2.approx`` each), inputs ``b_t = dt_t x_t B_t`` with the
entering state folded into the first row, one
:func:`~linearnexus.kernels.common.pallas_scan.linear_scan` over time (one fma per state and
step in a thread), ``y_t = C_t . h_t`` as a fused multiply-add reduction
(:func:`~linearnexus.kernels.common.pallas_scan.dot_sum`). Each sub-tile's inputs are
reloaded, one group ahead, right after their last use (so the load lands in the same
registers and has a group of work to arrive). Every input is read once and ``y`` written
once; when differentiating, the state entering every ``chunk`` steps is stored too
("checkpoints", ``T'/chunk`` states).

Backward (``jax.custom_vjp``). Same grid, tiles of ``chunk`` steps walked last to first. A
tile recomputes its states from its checkpoint with the same scan, then gets the state
cotangents ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` from a reverse scan (``a_{t+1}`` from
``dt_next``, ``dt`` shifted one row by the glue), the cotangent carried from the tile after
it riding on the last row. ``a_t h_{t-1}`` is ``h_t - b_t``, so no shifted states are needed.
It writes ``dx``, ``ddt``, ``dz`` tiles; per-block partial sums over its channels for
``dB``/``dC`` (``[B, blocks * T', N']``); and per-sequence partials of ``dA``/``dD``; the
glue sums the partials (no atomics). ``d initial_state`` is the cotangent carried out of
the first tile.

Packed sequences (``cu_seqlens``, B == 1) use the shared chunk layout
(``kernels/common/chunking.py``) with the backward's tile as the chunk: every sequence starts
on a fresh ``chunk`` of the single row, its last one padded. A per-chunk word (owner
sequence, opens / closes it) tells the forward where to load the sequence's initial state
(``[N_seq * N', C']``) into the carry and store its final state, and the backward where to
put the final state's cotangent into the carry and store ``d initial_state``; a row mask
keeps padded steps at ``dt = 0`` when the step size is computed in the kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from linearnexus.core.types import Array, DType
from linearnexus.kernels.common.chunking import from_chunks, plan_chunks, to_chunks
from linearnexus.kernels.common.pallas import (
    TritonConfig,
    compiler_params,
    interpret_mode,
    named_pallas_call,
)
from linearnexus.kernels.common.pallas_scan import (
    dot_sum,
    exp2_approx,
    fma,
    linear_scan,
    log2_approx,
    rcp_approx,
)

__all__ = ["bwd_warps", "default_config", "memory_floor_bytes", "resolve_config", "selective_scan_pallas"]

_LOG2E = 1.4426950408889634
#: time steps per forward sub-tile (see default_config)
FWD_TILE = 8
#: dtypes the kernels load (math is float32 whatever the input dtype)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
#: warps of the backward kernel (None: the config's num_warps); a tuning hook for benchmarks
_BWD_NUM_WARPS: int | None = None

def default_config(batch: int, seq: int, channels: int, n_state: int) -> TritonConfig:
    """The heuristic launch config for a ``[batch, seq, channels]`` scan with ``n_state`` states.

    ``chunk`` is the backward's tile and checkpoint interval (the forward walks fixed 8-step
    sub-tiles, grouped by ``max(chunk, 32)`` steps); ``block_v`` channels per program.
    Measured on an H200 at B=8, T=4096, C=2048, N=16, bf16 (the op README's table): 16
    channels with 1 forward warp (8-step sub-tiles, 2 lanes x 8 registers of states per
    channel) gave the fastest forward, 0.57 ms; all 16 states in one thread (32 channels)
    0.73 ms, 4 states per thread with 4x the warps (8 channels) 1.13 ms. The backward keeps
    about four live ``[chunk, N', block_v]`` tiles and was fastest with 4 warps
    (``bwd_warps = 4 * num_warps``; 2 and 8 warps were 22% and 58% slower), bound by the
    cross-lane reductions over channels for ``dB``/``dC``. ``chunk`` also sets the checkpoint
    memory (``B * C * N' * 4 * T / chunk`` bytes).
    """
    del batch, seq, channels, n_state  # the defaults do not depend on them (yet)
    return TritonConfig(chunk=16, block_v=16, num_warps=1, num_stages=1)


def bwd_warps(num_warps: int) -> int:
    """Warps of the backward kernel for a forward config's ``num_warps`` (see default_config)."""
    return min(4 * num_warps, 16)


def resolve_config(config: TritonConfig | None, batch: int, seq: int, channels: int,
                   n_state: int) -> TritonConfig:
    """``config`` with its ``None`` fields filled by :func:`default_config`.

    Raises:
        TypeError: ``config`` is not a ``TritonConfig``.
        ValueError: ``block_k`` or ``par_block_k`` is set (the scan has no key dimension).
    """
    if config is None:
        config = TritonConfig()
    if not isinstance(config, TritonConfig):
        raise TypeError(f"config: expected TritonConfig or None, got {type(config).__name__}")
    if config.block_k is not None:
        raise ValueError(f"block_k: the selective scan has no key dimension; leave it None "
                         f"(channels per program is block_v), got {config.block_k}")
    if config.par_block_k is not None:
        raise ValueError(f"par_block_k: the selective scan has no key dimension; leave it None, "
                         f"got {config.par_block_k}")
    return config.merged(default_config(batch, seq, channels, n_state))


def memory_floor_bytes(B: int, T: int, D: int, N: int, dtype: DType, *,
                       dt_dtype: DType | None = None, with_z: bool = True,
                       with_skip: bool = True, with_initial_state: bool = True) -> int:
    """Bytes a forward selective scan must move at least: every input read once, outputs once.

    Reads ``x``, ``dt``, ``z`` (``[B, T, D]``), ``B``, ``C`` (``[B, T, N]``), ``A``
    (``[D, N]``), ``D`` (``[D]``) and the initial state (``[B, D, N]`` float32); writes
    ``y`` (``[B, T, D]``) and the final state (``[B, D, N]`` float32). Divide by the memory
    bandwidth for the memory-bound floor of the forward's run time.

    Args:
        B, T, D, N: batch, sequence length, channels (d_inner), state size (d_state).
        dtype: dtype of ``x``, ``z``, ``B``, ``C`` and ``y`` (A and D counted in it too).
        dt_dtype: dtype of ``dt`` (the Mamba block passes float32); default ``dtype``.
        with_z / with_skip / with_initial_state: count ``z`` / ``D`` / the initial state.
    """
    item = jnp.dtype(dtype).itemsize
    dt_item = jnp.dtype(dt_dtype or dtype).itemsize
    btd = B * T * D
    read = btd * (item + dt_item + (item if with_z else 0)) + 2 * B * T * N * item
    read += D * N * item + (D * item if with_skip else 0)
    read += B * D * N * 4 if with_initial_state else 0
    write = btd * item + B * D * N * 4
    return read + write


# ----------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static shape facts of one launch (hashable: keys the custom_vjp cache)."""

    batch: int
    seq_pad: int
    channels_pad: int
    n_pad: int
    chunk: int
    block_v: int
    num_warps: int
    bwd_num_warps: int
    num_stages: int
    has_d: bool
    has_z: bool
    has_bias: bool  # dt_bias added in the kernel
    softplus: bool  # softplus applied to the step in the kernel
    seq: int  # real sequence length (steps at or past it are padding; packed: seq_pad)
    interpret: bool
    packed: bool = False  # cu_seqlens: one row, sequences on chunk boundaries (module doc)

    @property
    def raw_dt(self) -> bool:
        """The kernels get the raw ``dt`` and compute the step size themselves."""
        return self.has_bias or self.softplus

    @property
    def fwd_group(self) -> int:
        """Time steps per forward loop iteration: whole chunks, at least ``4 * FWD_TILE``."""
        return max(self.chunk, 4 * FWD_TILE)

    @property
    def n_chunks(self) -> int:
        return self.seq_pad // self.chunk

    @property
    def n_blocks(self) -> int:
        return self.channels_pad // self.block_v


def _tile_rows(length: int, c):
    """Rows of tile ``c`` of ``length`` steps (``c`` a traced index or a Python int)."""
    start = c * length
    return pl.ds(start if isinstance(start, int) else pl.multiple_of(start, length), length)


def _tile_loader(length: int, *refs):
    """``load(c)``: tile ``c`` (``length`` steps) of each ref (``None`` refs give ``None``)."""

    def load(c):
        rows = _tile_rows(length, c)
        return tuple(None if r is None else r[rows, :] for r in refs)

    return load


def _f32(*arrays):
    return tuple(None if a is None else a.astype(jnp.float32) for a in arrays)


def _sigmoid(z, interpret: bool):
    """``sigmoid(z)`` from one ``ex2`` and one approximate reciprocal (no IEEE division)."""
    return rcp_approx(1.0 + exp2_approx(z * -_LOG2E, interpret=interpret), interpret=interpret)


def _silu(z, interpret: bool):
    return z * _sigmoid(z, interpret)


_LN2 = 0.6931471805599453


def _softplus(u, interpret: bool):
    """``log(1 + e^u)`` from one ``ex2`` and one ``lg2``; ``log1p`` by its series for small terms.

    Below ``e^{-|u|} = 0.03`` (``dt`` < ~0.03, Mamba's usual range) the degree-5 series is
    good to ~1e-9 relative, where ``lg2(1 + e)`` would carry the rounding of ``1 + e`` and
    ``lg2.approx``'s absolute error (~1e-4 relative at ``dt = 1e-3``).
    """
    e = exp2_approx(-jnp.abs(u) * _LOG2E, interpret=interpret)  # e^{-|u|} in (0, 1]
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0 - e * (0.25 - e * 0.2))))
    log1p = jnp.where(e < 0.03, series, log2_approx(1.0 + e, interpret=interpret) * _LN2)
    return jnp.maximum(u, 0.0) + log1p


def _step(plan: _Plan, raw, bias, first_row, valid, shift: int = 0):
    """The step size ``softplus(dt + dt_bias)`` (or ``dt + dt_bias``) of a ``[rows, bv]`` tile of
    raw ``dt``, zero on the padding steps (global row ``first_row + i + shift >= seq``; packed:
    where the ``[rows, 1]`` mask ``valid`` is 0).

    Returns ``(dt, u)``: the step and the pre-softplus ``u`` (for the backward's derivative).
    """
    u = raw + bias if plan.has_bias else raw
    dt = _softplus(u, plan.interpret) if plan.softplus else u
    return _mask_rows(plan, dt, first_row, valid, shift), u


def _mask_rows(plan: _Plan, v, first_row, valid, shift: int = 0):
    """``v`` (``[rows, bv]``) zeroed on the padding steps (see :func:`_step`)."""
    if plan.packed:
        return jnp.where(valid > 0.0, v, 0.0)
    if plan.seq < plan.seq_pad:  # padding steps must stay inert (decay 1, input 0)
        t = first_row + shift + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
        return jnp.where(t < plan.seq, v, 0.0)
    return v


def _chunk_word(meta_ref, k):
    """``(owner sequence, opens it, closes it)`` of chunk ``k`` (packed layouts)."""
    word = meta_ref[k]
    return word >> 2, (word & 1) == 1, (word & 2) == 2


def _seq_rows(owner, n: int):
    """Rows of sequence ``owner``'s ``[N', bv]`` block in a ``[N_seq * N', bv]`` state ref."""
    return pl.ds(pl.multiple_of(owner * n, n), n)


def _fwd_kernel(*, x_ref, dt_ref, a_ref, b_ref, c_ref, h0_ref, d_ref, z_ref, bias_ref, meta_ref,
                valid_ref, y_ref, hT_ref, ck_ref, plan: _Plan, save: bool):
    N, S, bv = plan.n_pad, FWD_TILE, plan.block_v
    bias = bias_ref[...].astype(jnp.float32) if plan.has_bias else None  # [1, bv]
    per_group = plan.fwd_group // S  # sub-tiles per loop iteration
    load = _tile_loader(S, x_ref, dt_ref, b_ref, c_ref, z_ref, valid_ref)
    n_sub = plan.seq_pad // S

    a2 = a_ref[...].astype(jnp.float32) * _LOG2E  # [N', bv]: exp(dt A) = exp2(dt A log2 e)
    d_row = d_ref[...].astype(jnp.float32) if plan.has_d else None  # [1, bv]
    t_idx = jax.lax.broadcasted_iota(jnp.int32, (S, N, bv), 0)

    def sub_tile(s, h, cur):
        """Steps ``[s S, (s+1) S)`` entering with state ``h``: writes y, returns the leaving state."""
        x, dt, bm, cm, z, valid = _f32(*cur)  # [S, bv] x3, [S, N'] x2, [S, 1]
        if plan.raw_dt:
            dt, _ = _step(plan, dt, bias, s * S, valid)
        decay = exp2_approx(dt[:, None, :] * a2[None], interpret=plan.interpret)  # [S, N', bv]
        drive = (dt * x)[:, None, :] * bm[:, :, None]
        # the entering state rides on the first step's input: h_0 = a_0 h + b_0 (the select is
        # static per register once the time axis sits in a thread, so rows > 0 cost nothing)
        drive = jnp.where(t_idx == 0, fma(decay, jnp.broadcast_to(h[None], decay.shape), drive),
                          drive)
        _, hs = linear_scan(decay, drive, axis=0)  # h_t for the S steps
        y = dot_sum(jnp.broadcast_to(cm[:, :, None], hs.shape), hs, axis=1)  # [S, bv]
        if plan.has_d:
            y = y + d_row * x
        if plan.has_z:
            y = y * _silu(z, plan.interpret)
        y_ref[_tile_rows(S, s), :] = y.astype(y_ref.dtype)
        return jnp.sum(jnp.where(t_idx == S - 1, hs, -0.0), axis=0)  # -0.0: the adds fold away

    def group(g, carry):
        h, tiles = carry
        nxt = []
        for u in range(per_group):
            s = g * per_group + u
            if (u * S) % plan.chunk == 0:  # a backward tile (packed: chunk) starts here
                k = (g * plan.fwd_group + u * S) // plan.chunk
                if plan.packed:  # a sequence opening here enters with its initial state
                    owner, opens, closes = _chunk_word(meta_ref, k)
                    h = jnp.where(opens, h0_ref[_seq_rows(owner, N), :].astype(jnp.float32), h)
                if save:  # the state entering every backward tile
                    ck_ref[pl.ds(pl.multiple_of(k * N, N), N), :] = h
            h = sub_tile(s, h, tiles[u])
            if plan.packed and ((u + 1) * S) % plan.chunk == 0:  # a sequence closing here
                plt.store(hT_ref.at[_seq_rows(owner, N), :], h,
                          mask=jnp.broadcast_to(closes, h.shape))
            # this sub-tile's slot refills with the one a group ahead, issued after the slot's
            # last use so the load lands in the same registers (no loop-carried copies that
            # would wait on it) and has a whole group to arrive
            nxt.append(load(jnp.minimum(s + per_group, n_sub - 1)))
        return h, tuple(nxt)

    h_start = (jnp.zeros((N, bv), jnp.float32) if plan.packed
               else h0_ref[...].astype(jnp.float32))
    init = (h_start, tuple(load(u) for u in range(per_group)))
    h, _ = jax.lax.fori_loop(0, plan.seq_pad // plan.fwd_group, group, init)
    if not plan.packed:
        hT_ref[...] = h


def _bwd_kernel(*, x_ref, dt_ref, dtn_ref, a_ref, b_ref, c_ref, ck_ref, dy_ref, dhT_ref, d_ref,
                z_ref, bias_ref, meta_ref, valid_ref, valn_ref, dx_ref, ddt_ref, db_ref, dc_ref,
                da_ref, dh0_ref, dd_ref, dz_ref, dbias_ref, plan: _Plan):
    bias = bias_ref[...].astype(jnp.float32) if plan.has_bias else None
    L, N, bv = plan.chunk, plan.n_pad, plan.block_v
    load = _tile_loader(L, x_ref, dt_ref, dtn_ref, b_ref, c_ref, z_ref, dy_ref, valid_ref, valn_ref)
    interp = plan.interpret

    a_nat = a_ref[...].astype(jnp.float32)  # [N', bv]
    a2 = a_nat * _LOG2E
    d_row = d_ref[...].astype(jnp.float32) if plan.has_d else None
    t_idx = jax.lax.broadcasted_iota(jnp.int32, (L, N, bv), 0)

    def full(v):  # broadcast a [L, bv] / [L, N'] / [N', bv] operand to the tile's shape
        return jnp.broadcast_to(v, (L, N, bv))

    def ckpt(c):
        return ck_ref[pl.ds(c * N if isinstance(c, int) else pl.multiple_of(c * N, N), N), :]

    def tile(k, carry):
        g_in, da_acc, dd_acc, dbias_acc, (h0, cur) = carry  # g_in: a_{t0+L} g_{t0+L}
        c = plan.n_chunks - 1 - k
        nxt_c = jnp.maximum(c - 1, 0)
        nxt = (ckpt(nxt_c), load(nxt_c))  # issued a tile ahead
        x, dt, dt_next, bm, cm, z, dy, valid, valid_next = _f32(*cur)
        rows = _tile_rows(L, c)
        if plan.packed:  # a sequence closing here: its final state's cotangent enters
            owner, opens, closes = _chunk_word(meta_ref, c)
            g_in = jnp.where(closes, dhT_ref[_seq_rows(owner, N), :].astype(jnp.float32), g_in)
        if plan.raw_dt:
            dt, u = _step(plan, dt, bias, c * L, valid)
            dt_next, _ = _step(plan, dt_next, bias, c * L, valid_next, shift=1)
        # recompute the tile's states h_t from its checkpoint (entering state folded into row 0)
        decay = exp2_approx(dt[:, None, :] * a2[None], interpret=interp)  # a_t, [L, N', bv]
        dtx = dt * x
        drive = dtx[:, None, :] * bm[:, :, None]  # b_t
        _, hs = linear_scan(decay, jnp.where(t_idx == 0, fma(decay, full(h0[None]), drive), drive),
                            axis=0)
        if plan.has_z:
            sig = _sigmoid(z, interp)
            y_pre = jnp.sum(cm[:, :, None] * hs, axis=1)
            if plan.has_d:
                y_pre = y_pre + d_row * x
            dz = dy * y_pre * sig * (1.0 + z * (1.0 - sig))
            dz_ref[rows, :] = dz.astype(dz_ref.dtype)
            dy = dy * (z * sig)  # the cotangent of y before the gate
        # g_t = C_t dy_t + a_{t+1} g_{t+1}: a reverse scan with the decays one step ahead (dt_next
        # is dt shifted one row by the glue); the carried a_{t0+L} g_{t0+L} rides on the last row
        decay_next = exp2_approx(dt_next[:, None, :] * a2[None], interpret=interp)
        c_dy = cm[:, :, None] * dy[:, None, :]
        # flip: time sits in each thread, where Triton's reverse scan would shuffle every value
        _, g = linear_scan(decay_next, jnp.where(t_idx == L - 1, c_dy + full(g_in[None]), c_dy),
                           axis=0, reverse=True, flip=True)  # [L, N', bv]
        # reductions across lanes shuffle every operand, so they stay plain sums of products
        # (dot_sum would shuffle both factors); the time-axis ones are in-thread and fused
        dc_ref[rows, :] = jnp.sum(hs * dy[:, None, :], axis=2)  # [L, N'] partial over channels
        db_ref[rows, :] = jnp.sum(g * dtx[:, None, :], axis=2)
        gb = jnp.sum(g * bm[:, :, None], axis=1)  # [L, bv]
        g_decay = g * (hs - drive)  # g_t * a_t h_{t-1}: cotangent of (dt A) per state
        da_acc = da_acc + dot_sum(g_decay, full(dt[:, None, :]), axis=0)
        ddt = x * gb + jnp.sum(g_decay * a_nat[None], axis=1)
        dx = dt * gb
        if plan.has_d:
            dx = dx + dy * d_row
            dd_acc = dd_acc + jnp.sum(dy * x, axis=0, keepdims=True)
        if plan.raw_dt:  # through the step size to the raw dt (padding rows have dt = 0 ...)
            if plan.softplus:  # d softplus(u) / du = sigmoid(u)
                ddt = ddt * _sigmoid(u, interp)
            ddt = _mask_rows(plan, ddt, c * L, valid)  # ... and no gradient)
            if plan.has_bias:
                dbias_acc = dbias_acc + jnp.sum(ddt, axis=0, keepdims=True)
        ddt_ref[rows, :] = ddt.astype(ddt_ref.dtype)
        dx_ref[rows, :] = dx.astype(dx_ref.dtype)
        g_out = jnp.sum(jnp.where(t_idx == 0, decay * g, -0.0), axis=0)  # a_{t0} g_{t0}
        if plan.packed:  # a sequence opening here: the cotangent of its initial state
            plt.store(dh0_ref.at[_seq_rows(owner, N), :], g_out,
                      mask=jnp.broadcast_to(opens, g_out.shape))
        return g_out, da_acc, dd_acc, dbias_acc, nxt

    last = plan.n_chunks - 1
    g_start = (jnp.zeros((N, bv), jnp.float32) if plan.packed
               else dhT_ref[...].astype(jnp.float32))
    init = (g_start, jnp.zeros((N, bv), jnp.float32),
            jnp.zeros((1, bv), jnp.float32), jnp.zeros((1, bv), jnp.float32),
            (ckpt(last), load(last)))
    g, da_acc, dd_acc, dbias_acc, _ = jax.lax.fori_loop(0, plan.n_chunks, tile, init)
    if not plan.packed:
        dh0_ref[...] = g
    da_ref[...] = da_acc
    if plan.has_d:
        dd_ref[...] = dd_acc
    if plan.has_bias:
        dbias_ref[...] = dbias_acc


# ----------------------------------------------------------------------------- launches


def _specs(plan: _Plan):
    """BlockSpecs of the kernel-layout arrays, by kind."""
    T, N, bv = plan.seq_pad, plan.n_pad, plan.block_v
    return {
        "row": pl.BlockSpec((None, T, bv), lambda b, j: (b, 0, j)),  # [B, T', C']
        "bc": pl.BlockSpec((None, T, N), lambda b, j: (b, 0, 0)),  # [B, T', N']
        "a": pl.BlockSpec((N, bv), lambda b, j: (0, j)),  # [N', C']
        "d": pl.BlockSpec((1, bv), lambda b, j: (0, j)),  # [1, C']
        "state": pl.BlockSpec((None, N, bv), lambda b, j: (b, 0, j)),  # [B, N', C']
        "ckpt": pl.BlockSpec((None, plan.n_chunks * N, bv), lambda b, j: (b, 0, j)),
        "partial_bc": pl.BlockSpec((None, T, N), lambda b, j: (b, j, 0)),  # [B, blocks*T', N']
        "skip_partial": pl.BlockSpec((None, 1, bv), lambda b, j: (b, 0, j)),  # [B, 1, C']
        "col": pl.BlockSpec((None, T, 1), lambda b, j: (b, 0, 0)),  # [1, T', 1] row mask
        "meta": pl.BlockSpec((None, plan.n_chunks), lambda b, j: (b, 0)),  # [1, T'/chunk]
    }


def _state_spec(plan: _Plan, state: Array):
    """The spec of a ``[B, N', C']`` state (packed: ``[1, N_seq * N', C']``, every sequence's)."""
    return pl.BlockSpec((None, state.shape[1], plan.block_v), lambda b, j: (b, 0, j))


def _call(kernel, plan: _Plan, inputs, outputs, specs, name: str, warps: int):
    """One launch, operands by name (:func:`named_pallas_call`); ``specs``: name -> BlockSpec."""
    return named_pallas_call(
        kernel, inputs=inputs, outputs=outputs, in_specs=specs, out_specs=specs,
        grid=(plan.batch, plan.n_blocks),
        interpret=plan.interpret,
        compiler_params=None if plan.interpret else compiler_params(warps, plan.num_stages),
        name=name,
    )


def _optional_inputs(plan: _Plan, d, z, bias, meta, valid, valid_next=None):
    """The inputs a launch may lack: skip ``d``, gate ``z``, ``dt_bias``, and the packed
    layout's chunk words and row masks (the masks only where the kernel computes the step)."""
    masks = plan.packed and plan.raw_dt
    return dict(d=d if plan.has_d else None, z=z if plan.has_z else None,
                bias=bias if plan.has_bias else None, meta=meta if plan.packed else None,
                valid=valid if masks else None, valn=valid_next if masks else None)


def _operand_specs(plan: _Plan, h0) -> dict:
    """BlockSpec of every operand of both kernels, by name."""
    sp = _specs(plan)
    state = _state_spec(plan, h0)
    return dict(x=sp["row"], dt=sp["row"], dtn=sp["row"], a=sp["a"], b=sp["bc"], c=sp["bc"],
                h0=state, dhT=state, hT=state, dh0=state, ck=sp["ckpt"], dy=sp["row"],
                d=sp["d"], z=sp["row"], bias=sp["d"], meta=sp["meta"], valid=sp["col"],
                valn=sp["col"], y=sp["row"], dx=sp["row"], ddt=sp["row"], db=sp["partial_bc"],
                dc=sp["partial_bc"], da=sp["state"], dd=sp["skip_partial"], dz=sp["row"],
                dbias=sp["skip_partial"])


def _forward(plan: _Plan, save: bool, x, dt, a, b, c, h0, d, z, bias, meta, valid):
    f32 = jnp.float32
    ins = dict(x=x, dt=dt, a=a, b=b, c=c, h0=h0, **_optional_inputs(plan, d, z, bias, meta, valid))
    del ins["valn"]
    ck = jax.ShapeDtypeStruct((plan.batch, plan.n_chunks * plan.n_pad, plan.channels_pad), f32)
    outs = dict(y=jax.ShapeDtypeStruct(x.shape, x.dtype), hT=jax.ShapeDtypeStruct(h0.shape, f32),
                ck=ck if save else None)
    kernel = functools.partial(_fwd_kernel, plan=plan, save=save)
    res = _call(kernel, plan, ins, outs, _operand_specs(plan, h0), "mamba_selective_scan_fwd",
                plan.num_warps)
    return (res["y"], res["hT"], res["ck"]) if save else (res["y"], res["hT"])


def _shift_up(a):
    """``a[:, t + 1]`` at row ``t`` of a ``[B, T', F]`` array (0 past the end)."""
    return jnp.pad(a[:, 1:], ((0, 0), (0, 1), (0, 0)))


def _backward(plan: _Plan, x, dt, a, b, c, ck, d, z, bias, meta, valid, dy, dhT):
    f32 = jnp.float32
    Bn, T, Cp, N = plan.batch, plan.seq_pad, plan.channels_pad, plan.n_pad
    dt_next = _shift_up(dt)  # dt_{t+1}
    ins = dict(x=x, dt=dt, dtn=dt_next, a=a, b=b, c=c, ck=ck, dy=dy, dhT=dhT,
               **_optional_inputs(plan, d, z, bias, meta, valid,
                                  None if valid is None else _shift_up(valid)))
    sds = jax.ShapeDtypeStruct
    skip = sds((Bn, 1, Cp), f32)
    outs = dict(dx=sds(x.shape, x.dtype), ddt=sds(dt.shape, dt.dtype),
                db=sds((Bn, plan.n_blocks * T, N), f32), dc=sds((Bn, plan.n_blocks * T, N), f32),
                da=sds((Bn, N, Cp), f32), dh0=sds(dhT.shape, f32),
                dd=skip if plan.has_d else None, dz=sds(z.shape, z.dtype) if plan.has_z else None,
                dbias=skip if plan.has_bias else None)
    kernel = functools.partial(_bwd_kernel, plan=plan)
    res = _call(kernel, plan, ins, outs, _operand_specs(plan, dhT), "mamba_selective_scan_bwd",
                plan.bwd_num_warps)
    dx, ddt, db_part, dc_part, da_part, dh0 = (res[n] for n in ("dx", "ddt", "db", "dc", "da", "dh0"))
    dd, dz = res["dd"], res["dz"]
    dbias = res["dbias"].sum(axis=0) if plan.has_bias else None  # [1, C']
    db = db_part.reshape(Bn, plan.n_blocks, T, N).sum(axis=1)
    dc = dc_part.reshape(Bn, plan.n_blocks, T, N).sum(axis=1)
    da = da_part.sum(axis=0)
    dd = None if dd is None else dd.sum(axis=0)
    return dx, ddt, da, db, dc, dh0, dd, dz, dbias


def _opened_rows(plan: _Plan, meta, rows: int):
    """``[1, N_seq * N', 1]``: True on the state rows of sequences some chunk opens (packed);
    the kernels never touch an empty sequence's rows, so the glue fills them."""
    n_seqs = rows // plan.n_pad
    opened = jnp.zeros((n_seqs,), jnp.int32).at[meta[0] >> 2].max(meta[0] & 1)
    return jnp.repeat(opened > 0, plan.n_pad)[None, :, None]


@functools.cache
def _scan_fn(plan: _Plan):
    """The custom_vjp selective scan over kernel-layout arrays, for one static plan.

    ``meta`` / ``valid``: the packed layout's chunk words and row mask (None for batch rows).
    """

    def final_state(hT, h0, meta):  # an empty packed sequence ends as it started
        return jnp.where(_opened_rows(plan, meta, h0.shape[1]), hT, h0) if plan.packed else hT

    @jax.custom_vjp
    def scan(x, dt, a, b, c, h0, d, z, bias, meta, valid):
        y, hT = _forward(plan, False, x, dt, a, b, c, h0, d, z, bias, meta, valid)
        return y, final_state(hT, h0, meta)

    def fwd(x, dt, a, b, c, h0, d, z, bias, meta, valid):
        y, hT, ck = _forward(plan, True, x, dt, a, b, c, h0, d, z, bias, meta, valid)
        return (y, final_state(hT, h0, meta)), (x, dt, a, b, c, ck, d, z, bias, meta, valid)

    def bwd(res, cts):
        x, dt, a, b, c, ck, d, z, bias, meta, valid = res
        dy, dhT = cts
        dhT = dhT.astype(jnp.float32)
        dx, ddt, da, db, dc, dh0, dd, dz, dbias = _backward(
            plan, x, dt, a, b, c, ck, d, z, bias, meta, valid, dy.astype(x.dtype), dhT)
        if plan.packed:  # an empty sequence passes its final state's cotangent through
            dh0 = jnp.where(_opened_rows(plan, meta, dhT.shape[1]), dh0, dhT)
        return (dx, ddt, da.astype(a.dtype), db.astype(b.dtype), dc.astype(c.dtype), dh0,
                None if d is None else dd.astype(d.dtype), dz,
                None if bias is None else dbias.astype(bias.dtype), None, None)

    scan.defvjp(fwd, bwd)
    return scan


def _check_dtypes(**arrays: Array | None) -> None:
    for name, arr in arrays.items():
        if arr is not None and jnp.dtype(arr.dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
            raise NotImplementedError(
                f"{name}: the Pallas selective scan takes float32, bfloat16 or float16, got "
                f"{arr.dtype}; use backend='jax' or 'naive'")


def selective_scan_pallas(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    D: Array | None = None,
    z: Array | None = None,
    initial_state: Array | None = None,
    cu_seqlens: Array | None = None,
    dt_bias: Array | None = None,
    dt_softplus: bool = False,
    config: TritonConfig | None = None,
) -> tuple[Array, Array]:
    """Mamba-1 selective scan with the Pallas kernels (differentiable: custom_vjp).

    ``h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t``, ``y_t = C_t . h_t + D x_t``, then
    ``y_t *= silu(z_t)`` when ``z`` is given. With ``dt_softplus`` the step is
    ``softplus(dt + dt_bias)``, else ``dt + dt_bias``, computed in float32 inside the kernels
    (no float32 ``dt`` written to memory). Inputs are not validated here (the api does).

    Args:
        x, dt: ``[B, T, C]`` (``dt`` raw when ``dt_bias`` / ``dt_softplus`` are given, else
            the step itself).
        A: ``[C, N]``. B, C: ``[B, T, N]``. D: ``[C]`` or None. z: ``[B, T, C]`` or None.
        initial_state: ``[B, C, N]`` (``[N_seq, C, N]`` with ``cu_seqlens``) or None (zeros).
        cu_seqlens: ``[N_seq + 1]`` int offsets of packed sequences (B == 1; may be traced)
            or None.
        dt_bias: ``[C]`` or None. dt_softplus: apply softplus to ``dt + dt_bias``.
        config: launch knobs; ``None`` fields come from :func:`default_config`.
            ``chunk`` = the backward's time tile and checkpoint interval (the forward walks
            fixed 8-step sub-tiles in groups of ``max(chunk, 32)`` steps),
            ``block_v`` = channels per program.

    Returns:
        ``(y [B, T, C] in x's dtype, final_state [B or N_seq, C, N] float32)``.

    Raises:
        NotImplementedError: an input dtype other than float32 / bfloat16 / float16.
        ValueError / TypeError: a bad ``config``.
    """
    _check_dtypes(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, initial_state=initial_state,
                  dt_bias=dt_bias)
    batch, seq, channels = x.shape
    n_state = A.shape[1]
    cfg = resolve_config(config, batch, seq, channels, n_state)
    interpret = interpret_mode()
    L, bv = cfg.chunk, cfg.block_v
    group = max(L, 4 * FWD_TILE)  # _Plan.fwd_group: the forward walks whole groups
    packed = cu_seqlens is not None
    # packed: every sequence on a fresh chunk of one row (to_chunks), slots past a sequence
    # and the group padding are zeros
    layout = plan_chunks(batch, seq, L, cu_seqlens) if packed else None
    length = layout.n_chunks * L if packed else seq  # rows before the group padding
    seq_pad = -(-length // group) * group
    ch_pad = -(-channels // bv) * bv
    n_pad = 1 << max(n_state - 1, 0).bit_length()
    plan = _Plan(batch=batch, seq_pad=seq_pad, channels_pad=ch_pad, n_pad=n_pad, chunk=L,
                 block_v=bv, num_warps=cfg.num_warps,
                 bwd_num_warps=_BWD_NUM_WARPS or bwd_warps(cfg.num_warps), num_stages=cfg.num_stages,
                 has_d=D is not None, has_z=z is not None, has_bias=dt_bias is not None,
                 softplus=bool(dt_softplus), seq=seq_pad if packed else seq, interpret=interpret,
                 packed=packed)
    dT, dC, dN = seq_pad - length, ch_pad - channels, n_pad - n_state

    def gather(a):  # packed: [1, T, F] -> [1, NC * L, F] in the chunk layout
        return to_chunks(a, layout).reshape(1, length, a.shape[-1]) if packed else a

    def rows(a):  # [B, T, C] -> [B, T', C'], zeros padded (dt = 0: inert steps)
        a = gather(a)
        return jnp.pad(a, ((0, 0), (0, dT), (0, dC))) if dT or dC else a

    def bc(a):  # [B, T, N] -> [B, T', N']
        a = gather(a)
        return jnp.pad(a, ((0, 0), (0, dT), (0, dN))) if dT or dN else a

    a_k = jnp.pad(A.astype(jnp.float32).T, ((0, dN), (0, dC)))  # [N', C']
    n_states = cu_seqlens.shape[0] - 1 if packed else batch
    h0 = (jnp.zeros((n_states, n_pad, ch_pad), jnp.float32) if initial_state is None else
          jnp.pad(jnp.swapaxes(initial_state.astype(jnp.float32), 1, 2), ((0, 0), (0, dN), (0, dC))))
    meta = valid = None
    if packed:
        h0 = h0.reshape(1, n_states * n_pad, ch_pad)  # every sequence's [N', C'] block
        n_chunks = seq_pad // L
        owner = jnp.pad(layout.seq_of_chunk, (0, n_chunks - layout.n_chunks))
        opens = jnp.pad(layout.reset, (0, n_chunks - layout.n_chunks))
        k = jnp.arange(n_chunks, dtype=jnp.int32)
        closes = k == layout.last_chunk[owner]  # -1 for an empty sequence: never
        meta = (owner * 4 + opens.astype(jnp.int32) + 2 * closes.astype(jnp.int32))[None]
        if dt_bias is not None or dt_softplus:  # the kernels' row mask for the step size
            valid = jnp.pad((layout.src < seq).astype(jnp.float32), (0, dT))[None, :, None]
    d_k = None if D is None else jnp.pad(D, (0, dC))[None, :]  # [1, C']
    z_k = None if z is None else rows(z)
    bias_k = None if dt_bias is None else jnp.pad(dt_bias, (0, dC))[None, :]  # [1, C']
    # B and C go in as float32: every program broadcasts them over its channels through shared
    # memory, and converting after the broadcast cost two extra instructions per state element
    y, hT = _scan_fn(plan)(rows(x), rows(dt), a_k, bc(B).astype(jnp.float32),
                           bc(C).astype(jnp.float32), h0, d_k, z_k, bias_k, meta, valid)
    if packed:
        y = from_chunks(y[:, :length, :channels].reshape(1, layout.n_chunks, L, channels), layout)
        hT = hT.reshape(n_states, n_pad, ch_pad)
    else:
        y = y[:, :seq, :channels] if dT or dC else y
    final_state = jnp.swapaxes(hT[:, :n_state, :channels], 1, 2)  # [., N', C'] -> [., C, N]
    return y, final_state
