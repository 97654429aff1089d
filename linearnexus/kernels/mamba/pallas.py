"""Pallas (Triton-lowered) GPU kernels for the Mamba-1 selective scan, forward and backward.

Same contract as :func:`~linearnexus.kernels.mamba.reference.selective_scan_reference`;
the public entry point is :func:`selective_scan_pallas`. On a CPU the same kernels run in
Pallas interpret mode (:func:`~linearnexus.kernels.common.pallas.interpret_mode`), which is
what the tests check.

Layout. The JAX glue puts every array in the kernels' layout: channels last and padded to
whole channel blocks, time padded to whole tiles, the state transposed to ``[B, N, C]``::

    x, dt, z, y  [B, T', C']      a tile of ``chunk`` steps x ``block_v`` channels is one load
    B, C         [B, T', N']      a tile of ``chunk`` steps x all states is one load
    A            [N', C']         float32
    state        [B, N', C']      float32

``N'`` is ``N`` rounded up to a power of two; padding is inert: padded steps and channels
have ``dt = 0`` (decay ``exp(0) = 1``, input ``0``), padded state rows have ``A = B = C = 0``.

Forward. Grid ``(batch, channel blocks)``; a program owns ``block_v`` channels of one
sequence and walks time in tiles of ``chunk`` steps, carrying the ``[N', block_v]`` float32
state. A tile is whole-tensor math on ``[chunk, N', block_v]`` values: decays
``a_t = exp(dt_t A)`` and inputs ``b_t = dt_t x_t B_t``, then one
:func:`~linearnexus.kernels.common.pallas_scan.linear_scan` over the tile's time axis
(Triton's ``tt.scan`` with the affine combine) gives every ``h_t`` from the entering state,
and ``y_t = C_t . h_t`` is a reduction over states. No per-step loads, stores or loops: an
earlier per-step walk was bound by one DRAM round trip per step (4.6 ms at B=8, T=4096,
C=2048, N=16; this form 0.78 ms). The next tile's inputs are loaded a tile ahead (carried
through the loop). Every input is read once and ``y`` written once; when differentiating,
the state entering every tile is stored too ("checkpoints", ``T'/chunk`` states).

Backward (``jax.custom_vjp``). Same grid, tiles walked last to first. A tile recomputes its
states from its checkpoint with the same scan, then gets the state cotangents
``g_t = C_t dy_t + a_{t+1} g_{t+1}`` from a reverse scan (``a_{t+1}`` from ``dt`` shifted
one step by a 0/1 matrix product, exact in float32), entering with the cotangent carried
from the tile after it. ``a_t h_{t-1}`` is ``h_t - b_t``, so no shifted states are needed.
It writes ``dx``, ``ddt``, ``dz`` tiles; per-block partial sums over its channels for
``dB``/``dC`` (``[B, blocks * T', N']``); and per-sequence partials of ``dA``/``dD``; the
glue sums the partials (no atomics). ``d initial_state`` is the cotangent carried out of
the first tile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linearnexus.core.types import Array, DType
from linearnexus.kernels.common.pallas import TritonConfig, compiler_params, interpret_mode
from linearnexus.kernels.common.pallas_scan import linear_scan

__all__ = ["bwd_warps", "default_config", "memory_floor_bytes", "resolve_config", "selective_scan_pallas"]

_LOG2E = 1.4426950408889634
#: dtypes the kernels load (math is float32 whatever the input dtype)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
#: warps of the backward kernel (None: the config's num_warps); a tuning hook for benchmarks
_BWD_NUM_WARPS: int | None = None

def default_config(batch: int, seq: int, channels: int, n_state: int) -> TritonConfig:
    """The heuristic launch config for a ``[batch, seq, channels]`` scan with ``n_state`` states.

    A program owns ``block_v`` channels of one sequence and walks time in tiles of ``chunk``
    steps; every live tensor of a tile is ``[chunk, N', block_v]`` float32, so
    ``chunk * block_v`` bounds the registers. Measured on an H200 at B=8, T=4096, C=2048,
    N=16, bf16 (``docs/gpu_notes.md``): 16 x 16 tiles with 1 warp gave the fastest forward
    (0.78 ms; 2 warps 0.96, 4 warps 1.26; 32 channels 0.83-1.03) and the backward, which keeps
    about twice the live tiles, was fastest with 4 warps (``bwd_warps = 4 * num_warps``; 2 and
    8 warps were 20% and 50% slower). Both kernels are bound by L1/shared-memory traffic
    (Nsight Compute: L1 80%, DRAM 5-14%), which more warps do not relieve. ``chunk`` is also
    the backward's checkpoint interval (``B * C * N' * 4 * T / chunk`` bytes).
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
    interpret: bool

    @property
    def n_chunks(self) -> int:
        return self.seq_pad // self.chunk

    @property
    def n_blocks(self) -> int:
        return self.channels_pad // self.block_v


def _tile_rows(plan: _Plan, c):
    """Rows of tile ``c`` (a traced index, or a Python int)."""
    start = c * plan.chunk
    return pl.ds(start if isinstance(start, int) else pl.multiple_of(start, plan.chunk), plan.chunk)


def _tile_loader(plan: _Plan, *refs):
    """``load(c)``: tile ``c`` of each ref (``None`` refs give ``None``), in its stored dtype."""

    def load(c):
        rows = _tile_rows(plan, c)
        return tuple(None if r is None else r[rows, :] for r in refs)

    return load


def _f32(*arrays):
    return tuple(None if a is None else a.astype(jnp.float32) for a in arrays)


def _row_of(x, index: int):
    """``x[index]`` of an ``[L, ...]`` value (Triton cannot slice values: a masked sum)."""
    t = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(t == index, x, 0.0), axis=0)


def _fwd_kernel(*refs, plan: _Plan, save: bool):
    it = iter(refs)
    x_ref, dt_ref, a_ref, b_ref, c_ref, h0_ref = (next(it) for _ in range(6))
    d_ref = next(it) if plan.has_d else None
    z_ref = next(it) if plan.has_z else None
    y_ref, hT_ref = next(it), next(it)
    ck_ref = next(it) if save else None
    N = plan.n_pad
    load = _tile_loader(plan, x_ref, dt_ref, b_ref, c_ref, z_ref)

    a2 = a_ref[...].astype(jnp.float32) * _LOG2E  # [N', bv]: exp(dt A) = exp2(dt A log2 e)
    d_row = d_ref[...].astype(jnp.float32) if plan.has_d else None  # [1, bv]

    def tile(c, carry):
        h, cur = carry  # h: state entering the tile [N', bv]; cur: this tile's raw inputs
        nxt = load(jnp.minimum(c + 1, plan.n_chunks - 1))  # issued a tile ahead
        if save:
            ck_ref[pl.ds(pl.multiple_of(c * N, N), N), :] = h
        x, dt, bm, cm, z = _f32(*cur)  # [L, bv] x3, [L, N'] x2
        decay = jnp.exp2(dt[:, None, :] * a2[None])  # [L, N', bv]
        drive = (dt * x)[:, None, :] * bm[:, :, None]
        prod, acc = linear_scan(decay, drive, axis=0)
        hs = prod * h[None] + acc  # h_t for the L steps
        y = jnp.sum(cm[:, :, None] * hs, axis=1)  # [L, bv]
        if plan.has_d:
            y = y + d_row * x
        if plan.has_z:
            y = y * (z * jax.nn.sigmoid(z))
        y_ref[_tile_rows(plan, c), :] = y.astype(y_ref.dtype)
        return _row_of(hs, plan.chunk - 1), nxt

    h, _ = jax.lax.fori_loop(0, plan.n_chunks, tile, (h0_ref[...].astype(jnp.float32), load(0)))
    hT_ref[...] = h


def _bwd_kernel(*refs, plan: _Plan):
    it = iter(refs)
    x_ref, dt_ref, a_ref, b_ref, c_ref, ck_ref, dy_ref, dhT_ref = (next(it) for _ in range(8))
    d_ref = next(it) if plan.has_d else None
    z_ref = next(it) if plan.has_z else None
    dx_ref, ddt_ref, db_ref, dc_ref, da_ref, dh0_ref = (next(it) for _ in range(6))
    dd_ref = next(it) if plan.has_d else None
    dz_ref = next(it) if plan.has_z else None
    L, N, bv = plan.chunk, plan.n_pad, plan.block_v
    load = _tile_loader(plan, x_ref, dt_ref, b_ref, c_ref, z_ref, dy_ref)

    a_nat = a_ref[...].astype(jnp.float32)  # [N', bv]
    a2 = a_nat * _LOG2E
    d_row = d_ref[...].astype(jnp.float32) if plan.has_d else None
    # next-step shift as a product: (S @ u)_t = u_{t+1}, 0 on the last row (exact in float32)
    rr, cc = (jax.lax.broadcasted_iota(jnp.int32, (L, L), i) for i in (0, 1))
    shift = (cc == rr + 1).astype(jnp.float32)

    def ckpt(c):
        return ck_ref[pl.ds(c * N if isinstance(c, int) else pl.multiple_of(c * N, N), N), :]

    def tile(k, carry):
        g_in, da_acc, dd_acc, (h0, cur) = carry  # g_in: a_{t0+L} g_{t0+L} (dhT for the last)
        c = plan.n_chunks - 1 - k
        nxt_c = jnp.maximum(c - 1, 0)
        nxt = (ckpt(nxt_c), load(nxt_c))  # issued a tile ahead
        x, dt, bm, cm, z, dy = _f32(*cur)
        rows = _tile_rows(plan, c)
        # recompute the tile's states h_t from its checkpoint
        decay = jnp.exp2(dt[:, None, :] * a2[None])  # a_t, [L, N', bv]
        dtx = dt * x
        drive = dtx[:, None, :] * bm[:, :, None]  # b_t
        prod, acc = linear_scan(decay, drive, axis=0)
        hs = prod * h0[None] + acc
        if plan.has_z:
            sig = jax.nn.sigmoid(z)
            y_pre = jnp.sum(cm[:, :, None] * hs, axis=1)
            if plan.has_d:
                y_pre = y_pre + d_row * x
            dz = dy * y_pre * sig * (1.0 + z * (1.0 - sig))
            dz_ref[rows, :] = dz.astype(dz_ref.dtype)
            dy = dy * (z * sig)  # the cotangent of y before the gate
        # g_t = C_t dy_t + a_{t+1} g_{t+1}: a reverse scan with the decays shifted one step
        dt_next = jnp.dot(shift, dt, precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
        decay_next = jnp.exp2(dt_next[:, None, :] * a2[None])  # 1 on the last row
        gprod, gacc = linear_scan(decay_next, cm[:, :, None] * dy[:, None, :], axis=0,
                                  reverse=True)
        g = gacc + gprod * g_in[None]  # [L, N', bv]
        dc_ref[rows, :] = jnp.sum(hs * dy[:, None, :], axis=2)  # [L, N'] partial over channels
        db_ref[rows, :] = jnp.sum(g * dtx[:, None, :], axis=2)
        gb = jnp.sum(g * bm[:, :, None], axis=1)  # [L, bv]
        g_decay = g * (hs - drive)  # g_t * a_t h_{t-1}: cotangent of (dt A) per state
        da_acc = da_acc + jnp.sum(g_decay * dt[:, None, :], axis=0)
        ddt = x * gb + jnp.sum(g_decay * a_nat[None], axis=1)
        dx = dt * gb
        if plan.has_d:
            dx = dx + dy * d_row
            dd_acc = dd_acc + jnp.sum(dy * x, axis=0, keepdims=True)
        ddt_ref[rows, :] = ddt.astype(ddt_ref.dtype)
        dx_ref[rows, :] = dx.astype(dx_ref.dtype)
        return _row_of(decay * g, 0), da_acc, dd_acc, nxt

    last = plan.n_chunks - 1
    init = (dhT_ref[...].astype(jnp.float32), jnp.zeros((N, bv), jnp.float32),
            jnp.zeros((1, bv), jnp.float32), (ckpt(last), load(last)))
    g, da_acc, dd_acc, _ = jax.lax.fori_loop(0, plan.n_chunks, tile, init)
    dh0_ref[...] = g
    da_ref[...] = da_acc
    if plan.has_d:
        dd_ref[...] = dd_acc


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
    }


def _call(kernel, plan: _Plan, in_specs, out_specs, out_shape, name: str, warps: int):
    return pl.pallas_call(
        kernel,
        grid=(plan.batch, plan.n_blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=plan.interpret,
        compiler_params=None if plan.interpret else compiler_params(warps, plan.num_stages),
        name=name,
    )


def _forward(plan: _Plan, save: bool, x, dt, a, b, c, h0, d, z):
    sp = _specs(plan)
    f32 = jnp.float32
    state = jax.ShapeDtypeStruct((plan.batch, plan.n_pad, plan.channels_pad), f32)
    ins = [x, dt, a, b, c, h0] + ([d] if plan.has_d else []) + ([z] if plan.has_z else [])
    in_specs = [sp["row"], sp["row"], sp["a"], sp["bc"], sp["bc"], sp["state"]]
    in_specs += ([sp["d"]] if plan.has_d else []) + ([sp["row"]] if plan.has_z else [])
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), state]
    out_specs = [sp["row"], sp["state"]]
    if save:
        out_shape.append(jax.ShapeDtypeStruct(
            (plan.batch, plan.n_chunks * plan.n_pad, plan.channels_pad), f32))
        out_specs.append(sp["ckpt"])
    kernel = functools.partial(_fwd_kernel, plan=plan, save=save)
    outs = _call(kernel, plan, in_specs, out_specs, out_shape, "mamba_selective_scan_fwd",
                 plan.num_warps)(*ins)
    return tuple(outs)


def _backward(plan: _Plan, x, dt, a, b, c, ck, d, z, dy, dhT):
    sp = _specs(plan)
    f32 = jnp.float32
    Bn, T, Cp, N = plan.batch, plan.seq_pad, plan.channels_pad, plan.n_pad
    ins = [x, dt, a, b, c, ck, dy, dhT] + ([d] if plan.has_d else []) + ([z] if plan.has_z else [])
    in_specs = [sp["row"], sp["row"], sp["a"], sp["bc"], sp["bc"], sp["ckpt"], sp["row"],
                sp["state"]]
    in_specs += ([sp["d"]] if plan.has_d else []) + ([sp["row"]] if plan.has_z else [])
    sds = jax.ShapeDtypeStruct
    out_shape = [sds(x.shape, x.dtype), sds(dt.shape, dt.dtype),
                 sds((Bn, plan.n_blocks * T, N), f32), sds((Bn, plan.n_blocks * T, N), f32),
                 sds((Bn, N, Cp), f32), sds((Bn, N, Cp), f32)]
    out_specs = [sp["row"], sp["row"], sp["partial_bc"], sp["partial_bc"], sp["state"],
                 sp["state"]]
    if plan.has_d:
        out_shape.append(sds((Bn, 1, Cp), f32))
        out_specs.append(sp["skip_partial"])
    if plan.has_z:
        out_shape.append(sds(z.shape, z.dtype))
        out_specs.append(sp["row"])
    kernel = functools.partial(_bwd_kernel, plan=plan)
    outs = list(_call(kernel, plan, in_specs, out_specs, out_shape,
                      "mamba_selective_scan_bwd", plan.bwd_num_warps)(*ins))
    dx, ddt, db_part, dc_part, da_part, dh0 = outs[:6]
    rest = outs[6:]
    dd = rest.pop(0) if plan.has_d else None
    dz = rest.pop(0) if plan.has_z else None
    db = db_part.reshape(Bn, plan.n_blocks, T, N).sum(axis=1)
    dc = dc_part.reshape(Bn, plan.n_blocks, T, N).sum(axis=1)
    da = da_part.sum(axis=0)
    dd = None if dd is None else dd.sum(axis=0)
    return dx, ddt, da, db, dc, dh0, dd, dz


@functools.cache
def _scan_fn(plan: _Plan):
    """The custom_vjp selective scan over kernel-layout arrays, for one static plan."""

    @jax.custom_vjp
    def scan(x, dt, a, b, c, h0, d, z):
        y, hT = _forward(plan, False, x, dt, a, b, c, h0, d, z)
        return y, hT

    def fwd(x, dt, a, b, c, h0, d, z):
        y, hT, ck = _forward(plan, True, x, dt, a, b, c, h0, d, z)
        return (y, hT), (x, dt, a, b, c, ck, d, z)

    def bwd(res, cts):
        x, dt, a, b, c, ck, d, z = res
        dy, dhT = cts
        dx, ddt, da, db, dc, dh0, dd, dz = _backward(plan, x, dt, a, b, c, ck, d, z,
                                                     dy.astype(x.dtype), dhT.astype(jnp.float32))
        return (dx, ddt, da.astype(a.dtype), db.astype(b.dtype), dc.astype(c.dtype), dh0,
                None if d is None else dd.astype(d.dtype), dz)

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
    config: TritonConfig | None = None,
) -> tuple[Array, Array]:
    """Mamba-1 selective scan with the Pallas kernels (differentiable: custom_vjp).

    ``h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t``, ``y_t = C_t . h_t + D x_t``, then
    ``y_t *= silu(z_t)`` when ``z`` is given. Inputs are not validated here (the api does).

    Args:
        x, dt: ``[B, T, C]`` (dt already positive, after any softplus).
        A: ``[C, N]``. B, C: ``[B, T, N]``. D: ``[C]`` or None. z: ``[B, T, C]`` or None.
        initial_state: ``[B, C, N]`` or None (zeros).
        config: launch knobs; ``None`` fields come from :func:`default_config`.
            ``chunk`` = time steps per tile (and checkpoint interval of the backward),
            ``block_v`` = channels per program.

    Returns:
        ``(y [B, T, C] in x's dtype, final_state [B, C, N] float32)``.

    Raises:
        NotImplementedError: an input dtype other than float32 / bfloat16 / float16.
        ValueError / TypeError: a bad ``config``.
    """
    _check_dtypes(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, initial_state=initial_state)
    batch, seq, channels = x.shape
    n_state = A.shape[1]
    cfg = resolve_config(config, batch, seq, channels, n_state)
    interpret = interpret_mode()
    L, bv = cfg.chunk, cfg.block_v
    seq_pad = -(-seq // L) * L
    ch_pad = -(-channels // bv) * bv
    n_pad = 1 << max(n_state - 1, 0).bit_length()
    plan = _Plan(batch=batch, seq_pad=seq_pad, channels_pad=ch_pad, n_pad=n_pad, chunk=L,
                 block_v=bv, num_warps=cfg.num_warps,
                 bwd_num_warps=_BWD_NUM_WARPS or bwd_warps(cfg.num_warps), num_stages=cfg.num_stages,
                 has_d=D is not None, has_z=z is not None, interpret=interpret)
    dT, dC, dN = seq_pad - seq, ch_pad - channels, n_pad - n_state

    def rows(a):  # [B, T, C] -> [B, T', C'], zeros padded (dt = 0: inert steps)
        return jnp.pad(a, ((0, 0), (0, dT), (0, dC))) if dT or dC else a

    def bc(a):  # [B, T, N] -> [B, T', N']
        return jnp.pad(a, ((0, 0), (0, dT), (0, dN))) if dT or dN else a

    a_k = jnp.pad(A.astype(jnp.float32).T, ((0, dN), (0, dC)))  # [N', C']
    h0 = (jnp.zeros((batch, n_pad, ch_pad), jnp.float32) if initial_state is None else
          jnp.pad(jnp.swapaxes(initial_state.astype(jnp.float32), 1, 2), ((0, 0), (0, dN), (0, dC))))
    d_k = None if D is None else jnp.pad(D, (0, dC))[None, :]  # [1, C']
    z_k = None if z is None else rows(z)
    y, hT = _scan_fn(plan)(rows(x), rows(dt), a_k, bc(B), bc(C), h0, d_k, z_k)
    y = y[:, :seq, :channels] if dT or dC else y
    final_state = jnp.swapaxes(hT[:, :n_state, :channels], 1, 2)  # [B, N', C'] -> [B, C, N]
    return y, final_state
