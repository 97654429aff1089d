"""Pallas (Triton-lowered) GPU kernels for the Mamba-1 selective scan, forward and backward.

Same contract as :func:`~linearnexus.kernels.mamba.reference.selective_scan_reference`;
the public entry point is :func:`selective_scan_pallas`. On a CPU the same kernels run in
Pallas interpret mode (:func:`~linearnexus.kernels.common.pallas.interpret_mode`), which is
what the tests check.

Layout. The JAX glue puts every array in the kernels' layout: channels last and padded to
whole channel blocks, time padded to whole tiles, the state transposed to ``[B, N, C]``
(state index as rows, channels as columns) and ``B``/``C`` transposed to ``[B, N, T]``::

    x, dt, z, y  [B, T', C']      rows of one time step are contiguous over channels
    B, C         [B, N', T']      one step's column B[:, t] is an [N', 1] load
    A            [N', C']         float32
    state        [B, N', C']      float32

``N'`` is ``N`` rounded up to a power of two; padding is inert: padded steps and channels
have ``dt = 0`` (decay ``exp(0) = 1``, input ``0``), padded state rows have ``A = B = C = 0``.

Forward. Grid ``(batch, channel blocks)``; a program owns ``block_v`` channels of one
sequence and keeps their ``[N', block_v]`` float32 state in registers. It walks time in
tiles of ``chunk`` steps (a ``fori_loop`` over tiles, the steps of a tile unrolled so the
loads of later steps issue ahead of the recurrence), and per step loads one coalesced row
of ``x``, ``dt``, ``z`` (``block_v`` contiguous channels), one column of ``B`` and ``C``,
updates the state and writes one row of ``y``. Every input is read once and ``y`` written
once. When differentiating, it also stores the state at the start of every tile
("checkpoints", ``T'/chunk`` states).

Backward (``jax.custom_vjp``). Same grid, tiles walked last to first. For a tile, the
program reloads its checkpoint, recomputes the tile's states forward into a per-program
scratch buffer (``chunk`` states of ``[N', block_v]``, an extra kernel output that stays in
L1/L2), then walks the tile backward reading ``h_{t-1}`` from the scratch, carrying the
state cotangent ``g`` (``g_t = a_{t+1} g_{t+1} + C_t dy_t``). It writes ``dx``, ``ddt``,
``dz`` rows; per-block partial sums over its channels for ``dB``/``dC`` columns
(``[B, blocks, N', T']``); and per-sequence partials of ``dA``/``dD``; the glue sums the
partials (no atomics). ``d initial_state`` is the carried ``g`` after the first step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linearnexus.core.types import Array, DType
from linearnexus.kernels.common.pallas import TritonConfig, compiler_params, interpret_mode

__all__ = ["default_config", "memory_floor_bytes", "resolve_config", "selective_scan_pallas"]

_LOG2E = 1.4426950408889634
#: dtypes the kernels load (math is float32 whatever the input dtype)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
#: below this many one-warp programs at 32 channels each, use 16 channels per program so that
#: the GPU holds more warps in flight (about 8 per SM of a 132-SM H200); see README
_TARGET_PROGRAMS = 1024
#: tests set this to check the unrolled (compiled-path) tile loop in interpret mode too
_FORCE_UNROLL: bool | None = None


def default_config(batch: int, seq: int, channels: int, n_state: int) -> TritonConfig:
    """The heuristic launch config for a ``[batch, seq, channels]`` scan with ``n_state`` states.

    * ``block_v`` (channels per program): 32, or 16 when ``batch * channels / 32`` programs
      would leave the GPU short of warps (under 1024). With one warp per program, 32
      channels put one channel (all its ``N`` states) in each thread, so the ``C . h``
      reduction needs no shuffles; 16 doubles the programs at one shuffle per step.
    * ``num_warps`` 1: the state is ``N' x block_v`` floats; one warp covers it with
      ``N'`` (or ``N'/2``) registers per thread, and parallelism comes from programs.
    * ``chunk`` 16: steps unrolled per tile and the checkpoint interval of the backward
      (checkpoint memory ``B * C * N * 4 * T / 16`` bytes, backward scratch
      ``16 * N' * block_v`` floats per program, small enough for L1).
    * ``num_stages`` 2: lets Triton prefetch the next tile's loads.
    """
    del seq, n_state  # the defaults do not depend on them (yet)
    block_v = 32 if batch * max(channels // 32, 1) >= _TARGET_PROGRAMS else 16
    return TritonConfig(chunk=16, block_v=block_v, num_warps=1, num_stages=2)


def resolve_config(config: TritonConfig | None, batch: int, seq: int, channels: int,
                   n_state: int) -> TritonConfig:
    """``config`` with its ``None`` fields filled by :func:`default_config`.

    Raises:
        TypeError: ``config`` is not a ``TritonConfig``.
        ValueError: ``block_k`` is set (the scan has no key dimension).
    """
    if config is None:
        config = TritonConfig()
    if not isinstance(config, TritonConfig):
        raise TypeError(f"config: expected TritonConfig or None, got {type(config).__name__}")
    if config.block_k is not None:
        raise ValueError(f"block_k: the selective scan has no key dimension; leave it None "
                         f"(channels per program is block_v), got {config.block_k}")
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
    num_stages: int
    has_d: bool
    has_z: bool
    interpret: bool
    unroll: bool  # steps of a tile as straight-line code (GPU) or a fori_loop (interpret)

    @property
    def n_chunks(self) -> int:
        return self.seq_pad // self.chunk

    @property
    def n_blocks(self) -> int:
        return self.channels_pad // self.block_v


def _row(ref, t):  # one time step of a [T', block_v] tile, as float32 [1, block_v]
    return ref[pl.ds(t, 1), :].astype(jnp.float32)


def _col(ref, t):  # one time step of a [N', T'] tile, as float32 [N', 1]
    return ref[:, pl.ds(t, 1)].astype(jnp.float32)


def _steps(plan: _Plan, body, carry, *, reverse: bool = False):
    """``carry = body(i, carry)`` for the ``chunk`` steps of a tile (``i`` descending if reverse).

    Compiled, the steps are unrolled (static ``i``) so the loads of later steps issue ahead of
    the recurrence; in interpret mode they are a ``fori_loop`` (same body, traced ``i``),
    which XLA compiles ~10x faster on the CPU.
    """
    L = plan.chunk
    if plan.unroll:
        for i in (reversed(range(L)) if reverse else range(L)):
            carry = body(i, carry)
        return carry
    return jax.lax.fori_loop(0, L, lambda j, c: body(L - 1 - j if reverse else j, c), carry)


def _fwd_kernel(*refs, plan: _Plan, save: bool):
    it = iter(refs)
    x_ref, dt_ref, a_ref, b_ref, c_ref, h0_ref = (next(it) for _ in range(6))
    d_ref = next(it) if plan.has_d else None
    z_ref = next(it) if plan.has_z else None
    y_ref, hT_ref = next(it), next(it)
    ck_ref = next(it) if save else None
    L, N = plan.chunk, plan.n_pad

    a2 = a_ref[...].astype(jnp.float32) * _LOG2E  # [N', bv]: exp(dt A) = exp2(dt A log2 e)
    d_row = d_ref[...].astype(jnp.float32) if plan.has_d else None  # [1, bv]

    def tile(c, h):
        if save:
            ck_ref[pl.ds(pl.multiple_of(c * N, N), N), :] = h

        def step(i, h):
            t = c * L + i
            x_t, dt_t = _row(x_ref, t), _row(dt_ref, t)
            h = jnp.exp2(dt_t * a2) * h + (dt_t * x_t) * _col(b_ref, t)
            y = jnp.sum(_col(c_ref, t) * h, axis=0, keepdims=True)  # [1, bv]
            if plan.has_d:
                y = y + d_row * x_t
            if plan.has_z:
                z_t = _row(z_ref, t)
                y = y * (z_t * jax.nn.sigmoid(z_t))
            y_ref[pl.ds(t, 1), :] = y.astype(y_ref.dtype)
            return h

        return _steps(plan, step, h)

    h = jax.lax.fori_loop(0, plan.n_chunks, tile, h0_ref[...].astype(jnp.float32))
    hT_ref[...] = h


def _barrier(plan: _Plan) -> None:
    # orders the scratch writes / reads of the program's threads on a GPU; interpret mode
    # runs a program sequentially and has no rule for it
    if not plan.interpret:
        from jax.experimental.pallas import triton as pl_triton

        pl_triton.debug_barrier()


def _bwd_kernel(*refs, plan: _Plan):
    it = iter(refs)
    x_ref, dt_ref, a_ref, b_ref, c_ref, ck_ref, dy_ref, dhT_ref = (next(it) for _ in range(8))
    d_ref = next(it) if plan.has_d else None
    z_ref = next(it) if plan.has_z else None
    dx_ref, ddt_ref, db_ref, dc_ref, da_ref, dh0_ref = (next(it) for _ in range(6))
    dd_ref = next(it) if plan.has_d else None
    dz_ref = next(it) if plan.has_z else None
    s_ref = next(it)  # scratch: the tile's states h_{t-1}, [L * N', bv]
    L, N = plan.chunk, plan.n_pad

    a_nat = a_ref[...].astype(jnp.float32)  # [N', bv]
    a2 = a_nat * _LOG2E
    d_row = d_ref[...].astype(jnp.float32) if plan.has_d else None

    def tile(k, carry):
        c = plan.n_chunks - 1 - k
        t0 = c * L

        def recompute(i, h):  # slot i of the scratch holds h_{t0+i-1}
            s_ref[pl.ds(i * N, N), :] = h
            x_t, dt_t = _row(x_ref, t0 + i), _row(dt_ref, t0 + i)
            return jnp.exp2(dt_t * a2) * h + (dt_t * x_t) * _col(b_ref, t0 + i)

        def step(i, carry):
            g_next, da_acc, dd_acc = carry
            t = t0 + i
            h_prev = s_ref[pl.ds(i * N, N), :]
            x_t, dt_t, dy_t = _row(x_ref, t), _row(dt_ref, t), _row(dy_ref, t)
            b_t, c_t = _col(b_ref, t), _col(c_ref, t)
            a = jnp.exp2(dt_t * a2)  # [N', bv]
            dtx = dt_t * x_t
            h = a * h_prev + dtx * b_t
            if plan.has_z:
                z_t = _row(z_ref, t)
                sig = jax.nn.sigmoid(z_t)
                y_pre = jnp.sum(c_t * h, axis=0, keepdims=True)
                if plan.has_d:
                    y_pre = y_pre + d_row * x_t
                dz = dy_t * y_pre * sig * (1.0 + z_t * (1.0 - sig))
                dz_ref[pl.ds(t, 1), :] = dz.astype(dz_ref.dtype)
                dy_t = dy_t * (z_t * sig)  # now the cotangent of y before the gate
            g = g_next + c_t * dy_t  # cotangent of h_t, [N', bv]
            dc_ref[:, pl.ds(t, 1)] = jnp.sum(h * dy_t, axis=1, keepdims=True)
            db_ref[:, pl.ds(t, 1)] = jnp.sum(g * dtx, axis=1, keepdims=True)
            gb = jnp.sum(g * b_t, axis=0, keepdims=True)  # [1, bv]
            g_decay = g * h_prev * a  # cotangent of (dt A) per state
            da_acc = da_acc + g_decay * dt_t
            ddt = x_t * gb + jnp.sum(g_decay * a_nat, axis=0, keepdims=True)
            dx = dt_t * gb
            if plan.has_d:
                dx = dx + dy_t * d_row
                dd_acc = dd_acc + dy_t * x_t
            ddt_ref[pl.ds(t, 1), :] = ddt.astype(ddt_ref.dtype)
            dx_ref[pl.ds(t, 1), :] = dx.astype(dx_ref.dtype)
            return a * g, da_acc, dd_acc

        _barrier(plan)  # the previous tile's reads of the scratch are done
        # (the last recomputed state, h_{t0+L-1}, is unused: dead code once compiled)
        _steps(plan, recompute, ck_ref[pl.ds(pl.multiple_of(c * N, N), N), :])
        _barrier(plan)
        return _steps(plan, step, carry, reverse=True)

    bv = plan.block_v
    init = (dhT_ref[...].astype(jnp.float32), jnp.zeros((N, bv), jnp.float32),
            jnp.zeros((1, bv), jnp.float32))
    g, da_acc, dd_acc = jax.lax.fori_loop(0, plan.n_chunks, tile, init)
    dh0_ref[...] = g
    da_ref[...] = da_acc
    if plan.has_d:
        dd_ref[...] = dd_acc


# ----------------------------------------------------------------------------- launches


def _specs(plan: _Plan):
    """BlockSpecs of the kernel-layout arrays, by kind."""
    T, N, bv, L = plan.seq_pad, plan.n_pad, plan.block_v, plan.chunk
    return {
        "row": pl.BlockSpec((None, T, bv), lambda b, j: (b, 0, j)),  # [B, T', C']
        "col": pl.BlockSpec((None, N, T), lambda b, j: (b, 0, 0)),  # [B, N', T']
        "a": pl.BlockSpec((N, bv), lambda b, j: (0, j)),  # [N', C']
        "d": pl.BlockSpec((1, bv), lambda b, j: (0, j)),  # [1, C']
        "state": pl.BlockSpec((None, N, bv), lambda b, j: (b, 0, j)),  # [B, N', C']
        "ckpt": pl.BlockSpec((None, plan.n_chunks * N, bv), lambda b, j: (b, 0, j)),
        "partial_col": pl.BlockSpec((None, N, T), lambda b, j: (b, j, 0)),  # [B, blocks*N', T']
        "skip_partial": pl.BlockSpec((None, 1, bv), lambda b, j: (b, 0, j)),  # [B, 1, C']
        "scratch": pl.BlockSpec((None, L * N, bv), lambda b, j: (b, 0, j)),
    }


def _call(kernel, plan: _Plan, in_specs, out_specs, out_shape, name: str):
    return pl.pallas_call(
        kernel,
        grid=(plan.batch, plan.n_blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=plan.interpret,
        compiler_params=None if plan.interpret else compiler_params(plan.num_warps,
                                                                     plan.num_stages),
        name=name,
    )


def _forward(plan: _Plan, save: bool, x, dt, a, b, c, h0, d, z):
    sp = _specs(plan)
    f32 = jnp.float32
    state = jax.ShapeDtypeStruct((plan.batch, plan.n_pad, plan.channels_pad), f32)
    ins = [x, dt, a, b, c, h0] + ([d] if plan.has_d else []) + ([z] if plan.has_z else [])
    in_specs = [sp["row"], sp["row"], sp["a"], sp["col"], sp["col"], sp["state"]]
    in_specs += ([sp["d"]] if plan.has_d else []) + ([sp["row"]] if plan.has_z else [])
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), state]
    out_specs = [sp["row"], sp["state"]]
    if save:
        out_shape.append(jax.ShapeDtypeStruct(
            (plan.batch, plan.n_chunks * plan.n_pad, plan.channels_pad), f32))
        out_specs.append(sp["ckpt"])
    kernel = functools.partial(_fwd_kernel, plan=plan, save=save)
    outs = _call(kernel, plan, in_specs, out_specs, out_shape, "mamba_selective_scan_fwd")(*ins)
    return tuple(outs)


def _backward(plan: _Plan, x, dt, a, b, c, ck, d, z, dy, dhT):
    sp = _specs(plan)
    f32 = jnp.float32
    Bn, T, Cp, N = plan.batch, plan.seq_pad, plan.channels_pad, plan.n_pad
    ins = [x, dt, a, b, c, ck, dy, dhT] + ([d] if plan.has_d else []) + ([z] if plan.has_z else [])
    in_specs = [sp["row"], sp["row"], sp["a"], sp["col"], sp["col"], sp["ckpt"], sp["row"],
                sp["state"]]
    in_specs += ([sp["d"]] if plan.has_d else []) + ([sp["row"]] if plan.has_z else [])
    sds = jax.ShapeDtypeStruct
    out_shape = [sds(x.shape, x.dtype), sds(dt.shape, dt.dtype),
                 sds((Bn, plan.n_blocks * N, T), f32), sds((Bn, plan.n_blocks * N, T), f32),
                 sds((Bn, N, Cp), f32), sds((Bn, N, Cp), f32)]
    out_specs = [sp["row"], sp["row"], sp["partial_col"], sp["partial_col"], sp["state"],
                 sp["state"]]
    if plan.has_d:
        out_shape.append(sds((Bn, 1, Cp), f32))
        out_specs.append(sp["skip_partial"])
    if plan.has_z:
        out_shape.append(sds(z.shape, z.dtype))
        out_specs.append(sp["row"])
    out_shape.append(sds((Bn, plan.chunk * N, Cp), f32))  # scratch, discarded
    out_specs.append(sp["scratch"])
    kernel = functools.partial(_bwd_kernel, plan=plan)
    outs = list(_call(kernel, plan, in_specs, out_specs, out_shape,
                      "mamba_selective_scan_bwd")(*ins))
    dx, ddt, db_part, dc_part, da_part, dh0 = outs[:6]
    rest = outs[6:-1]
    dd = rest.pop(0) if plan.has_d else None
    dz = rest.pop(0) if plan.has_z else None
    db = db_part.reshape(Bn, plan.n_blocks, N, T).sum(axis=1)
    dc = dc_part.reshape(Bn, plan.n_blocks, N, T).sum(axis=1)
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
                 block_v=bv, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                 has_d=D is not None, has_z=z is not None, interpret=interpret,
                 unroll=not interpret if _FORCE_UNROLL is None else _FORCE_UNROLL)
    dT, dC, dN = seq_pad - seq, ch_pad - channels, n_pad - n_state

    def rows(a):  # [B, T, C] -> [B, T', C'], zeros padded (dt = 0: inert steps)
        return jnp.pad(a, ((0, 0), (0, dT), (0, dC))) if dT or dC else a

    def cols(a):  # [B, T, N] -> [B, N', T']
        return jnp.pad(jnp.swapaxes(a, 1, 2), ((0, 0), (0, dN), (0, dT)))

    a_k = jnp.pad(A.astype(jnp.float32).T, ((0, dN), (0, dC)))  # [N', C']
    h0 = (jnp.zeros((batch, n_pad, ch_pad), jnp.float32) if initial_state is None else
          jnp.pad(jnp.swapaxes(initial_state.astype(jnp.float32), 1, 2), ((0, 0), (0, dN), (0, dC))))
    d_k = None if D is None else jnp.pad(D, (0, dC))[None, :]  # [1, C']
    z_k = None if z is None else rows(z)
    y, hT = _scan_fn(plan)(rows(x), rows(dt), a_k, cols(B), cols(C), h0, d_k, z_k)
    y = y[:, :seq, :channels] if dT or dC else y
    final_state = jnp.swapaxes(hT[:, :n_state, :channels], 1, 2)  # [B, N', C'] -> [B, C, N]
    return y, final_state
