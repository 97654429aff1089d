"""One-row matmuls for batch-1 decoding: ``[1, D] @ [D, N]`` that read the weight once.

A batch-1 decode step is a chain of one-row projections. XLA:GPU rewrites a matmul whose
left side is one row as an elementwise multiply and a reduce when the weight has fewer than
~10M elements ("dot strength reduction"), and in the decode loop that became two kernels
per projection, the first writing the whole ``[D, N]`` product that the second reads back
(``docs/benchmarks.md``, "One-row matmuls"). This module computes such products another
way, chosen by ``LINEARNEXUS_DECODE_GEMV`` (read at trace time):

* ``"xla"``: ``lax.dot_general`` as every other call (XLA's rewrite);
* ``"pad"``: the row padded to :data:`PAD_ROWS` rows, so XLA keeps a matmul (cuBLAS or its
  own GEMM), then row 0;
* ``"table"``: XLA's matmul over the transposed decode table ``W^T [N, D]`` (below), no
  kernels of this module: XLA's multiply + reduce then reduces along contiguous rows, which
  on an H100 read a chain of the GDN LM's projections alone at 1.4x the weight-read time
  against 1.8x for the ``"pallas"`` kernel (whose chain there had XLA slices between), but
  1.9x against 1.8x with the layer's norms and sums between them, which ``"pallas"`` folds
  into its kernels (``docs/benchmarks.md``, "A Mosaic GPU few-row matmul"); in the models
  it gained nothing (H100, batch 1: GDN 0.448 against 0.446 ms a step, Mamba2 0.303 against
  0.262);
* ``"pallas"``: a Pallas (Triton) kernel over the weight stored transposed, ``W^T [N, D]``:
  program ``j`` owns ``BN`` rows of it (output columns) and reads them in contiguous
  ``BK``-wide tiles, accumulating in float32. :func:`one_row_fused` folds a pre-norm
  layer's work around the matmul into the same kernel (RMSNorm and residual sum before,
  SwiGLU and residual sum after). The transposed weights come from the decode weight table
  (``modules.common.decode_weights``); a ``[D, N]`` weight is transposed in the trace
  (hoisted out of an on-device decode loop by XLA). On the H200 the ``[D, N]`` layout read
  in column tiles was 1.8x slower (32-byte rows per tile), hence the transposed layout.

Only one-row calls on a GPU change (``one_row_ready``); batch > 1 and the CPU take XLA's
matmul, except that ``LINEARNEXUS_DECODE_ROWS=N`` (:data:`ROWS_ENV`, opt-in: slower than
XLA's matmuls on an H100) sends fused calls (:func:`fused_ready`: norms, conv, SwiGLU and
residual sums around the projection) of up to ``N <= 64`` rows to ``_rows_kernel``, the same
kernel with tensor-core tiles. The default is the mode measured fastest on the H200
(``DEFAULT_MODE``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array, DType
from linearnexus.kernels.base import current_platform
from linearnexus.kernels.common.pallas import (
    compiler_params,
    interpret_mode,
    named_pallas_call,
    with_reference_vjp,
)

#: "xla" | "pad" | "table" | "pallas": how one-row matmuls run on a GPU (read at trace time)
GEMV_ENV = "LINEARNEXUS_DECODE_GEMV"
MODES = ("xla", "pad", "table", "pallas")
DEFAULT_MODE = "pallas"
#: rows the "pad" mode pads one row to
PAD_ROWS = 8
#: most input rows the fused kernels (:func:`one_row_fused`, :func:`one_row_conv`,
#: :func:`one_row_group_norm`) take: ``x [R, D]`` with ``1 <= R <= MAX_ROWS``
MAX_ROWS = 64
#: the largest batch whose one-token calls take the fused kernels in the ``"pallas"`` mode
#: (read at trace time; 1 .. MAX_ROWS): above 1, batch 2 .. N decoding folds its norms,
#: conv, SwiGLU and residual sums into the projections as batch 1 does
ROWS_ENV = "LINEARNEXUS_DECODE_ROWS"
#: batch 1 only: on an H100 (2026-12-07) the several-row kernels took 1.1-4.8x XLA's time per
#: projection and batch-64 decoding 28-32% longer (docs/benchmarks.md, "Several-row kernels")
DEFAULT_ROWS = 1
F32 = jnp.float32
#: how XLA's matmuls of batch > 1 decode steps read a projection's weight when the decode
#: table holds it transposed (read at trace time): ``"auto"`` (``W^T [N, D]`` for
#: projections wider than deep, ``N > D``; the parameter ``W [D, N]`` otherwise), ``"kn"``
#: (always ``W``, as ``nnx.Linear`` does), ``"nk"`` (always ``W^T``)
BATCH_LAYOUT_ENV = "LINEARNEXUS_DECODE_BATCH_LAYOUT"
BATCH_LAYOUTS = ("auto", "kn", "nk")


def gemv_mode() -> str:
    """The mode ``LINEARNEXUS_DECODE_GEMV`` names (default :data:`DEFAULT_MODE`).

    Raises:
        ValueError: a value not in :data:`MODES`.
    """
    mode = os.environ.get(GEMV_ENV, DEFAULT_MODE)
    if mode not in MODES:
        raise ValueError(f"{GEMV_ENV}: expected one of {MODES}, got {mode!r}")
    return mode


def batch_transposed(depth: int, width: int) -> bool:
    """Whether a batch > 1 decode step's matmul ``[R, depth] @ [depth, width]`` reads the
    decode table's ``W^T [width, depth]`` (:data:`BATCH_LAYOUT_ENV`). ``"auto"`` takes
    ``W^T`` for ``width > depth``: on an H100 at 64 rows with cold weights XLA's matmul over
    ``W^T`` took 7.3 us against 12.7 over ``W`` for Mamba2's ``in_proj`` (1024 -> 4256) and
    5.3 against 4.7 for its ``out_proj`` (2048 -> 1024) (``docs/benchmarks.md``, "Batch 64:
    the projections' weight layout").

    Raises:
        ValueError: a value not in :data:`BATCH_LAYOUTS`.
    """
    mode = os.environ.get(BATCH_LAYOUT_ENV, "auto")
    if mode not in BATCH_LAYOUTS:
        raise ValueError(f"{BATCH_LAYOUT_ENV}: expected one of {BATCH_LAYOUTS}, got {mode!r}")
    return mode == "nk" or (mode == "auto" and width > depth)


def _compiles() -> bool:
    """A GPU, not interpret mode. Tests replace this to run the kernels interpreted."""
    return current_platform() == "gpu" and not interpret_mode()


def transposed_weights() -> bool:
    """Whether decode weight tables store kernels transposed (``[N, D]``, the layout the
    ``"pallas"`` kernels read): modes ``"pallas"`` and ``"table"`` where the kernels
    compile."""
    return gemv_mode() in ("pallas", "table") and _compiles()


def one_row_ready(x: Array) -> bool:
    """Whether a matmul of ``x [..., D]`` goes through :func:`one_row_matmul`: one row in
    all (``prod(x.shape[:-1]) == 1``), the kernels compile here, and the mode is not
    ``"xla"``."""
    return math.prod(x.shape[:-1]) == 1 and _compiles() and gemv_mode() != "xla"


def fused_rows() -> int:
    """The largest batch the fused kernels take (:data:`ROWS_ENV`, default
    :data:`DEFAULT_ROWS`).

    Raises:
        ValueError: a value that is not an integer in ``1 .. MAX_ROWS``.
    """
    raw = os.environ.get(ROWS_ENV, "")
    if not raw:
        return DEFAULT_ROWS
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_ROWS:
        raise ValueError(f"{ROWS_ENV}: expected an integer in 1..{MAX_ROWS}, got {raw!r}")
    return int(raw)


def fused_ready(x: Array) -> bool:
    """Whether the fused kernels (:func:`one_row_fused` and the like) run for ``x [..., D]``:
    1 to :func:`fused_rows` rows in all, the kernels compile here, and the mode is
    ``"pallas"`` (the other modes keep the layer's ops in XLA)."""
    return (1 <= math.prod(x.shape[:-1]) <= fused_rows() and _compiles()
            and gemv_mode() == "pallas")


def _pow2_at_most(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= min(n, cap):
        p *= 2
    return p


def tiles(depth: int, rows: int = 1) -> tuple[int, int]:
    """``(BK, BN)`` for a ``[N, depth]`` transposed weight and ``rows`` input rows.

    One row: ``BN = 2`` rows of the weight per program and ``BK`` up to 1024 contiguous
    weights per row (a power of two; the last tile is masked), the best of those timed on
    the H200 (``benchmarks/gemv_gpu.py``). Several rows (a tensor-core product per tile):
    ``BN = 32`` weight rows a program (16 where ``depth < 512``: small layers keep more
    programs) and ``BK`` up to 128 (the ``[rows, BK]`` input tile is held in registers)."""
    if rows <= 1:
        return _pow2_at_most(max(depth, 16), 1024), 2
    return _pow2_at_most(max(depth, 16), 128), 32 if depth >= 512 else 16


def padded_rows(rows: int) -> int:
    """The row count of the kernels' tiles for ``rows`` input rows: 1 for one row, else the
    next power of two of at least 16 (a tensor-core product's smallest side)."""
    return 1 if rows <= 1 else max(16, 1 << (rows - 1).bit_length())


def _row(ref, start: Array, size: int, limit: int) -> Array:
    """``ref[0, start:start + size]`` of a ``[1, L]`` operand as float32, zero from index
    ``limit`` on (the masked last tile)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    valid = start + jnp.arange(size) < limit
    return plt.load(ref.at[pl.ds(0, 1), pl.ds(start, size)], mask=valid[None],
                    other=0.0)[0].astype(F32)  # [1, size] -> [size]


@dataclasses.dataclass(frozen=True)
class _Static:
    depth: int  # D, the contraction
    width: int  # N, output columns
    block_k: int
    block_n: int
    glu: bool  # W^T = [W_gate^T ; W_up^T] ([2N, D]): out = silu(x W_gate) * (x W_up)
    norm_eps: float | None  # an RMSNorm prologue with this epsilon
    out_dtype: jnp.dtype  # also the dtype every intermediate sum is rounded to
    group: int | None = None  # an RMSNorm prologue per group of this many features
    gate_offset: int | None = None  # and a silu gate read from gate_ref at this offset
    conv_width: int | None = None  # a causal conv (+ silu) epilogue over W taps
    conv_start: int = 0  # the first output column the conv covers (a multiple of BN)
    conv_channels: int = 0  # how many columns it covers (a multiple of BN)
    rows: int = 1  # input rows (> 1: _rows_kernel, tensor-core products)


def _conv_epilogue(y: Array, j: Array, rnd, *, cache_ref, cw_ref, cb_ref, new_cache_ref,
                   st: _Static, live: Array | None = None) -> Array:
    """The short conv's one-token step on this program's columns when they are conv
    channels: ``silu(bias + sum_w cw[w] * window[w])`` with the window the cache rows and
    ``y``, rounded to the output dtype; the cache shifted by one token in place (each
    channel belongs to one program, so no other program reads it). ``y`` is ``[BN]`` (one
    row) or ``[RP, BN]`` with ``live [RP]`` the rows that exist (masked loads and stores)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    bn, width = st.block_n, st.conv_width
    channel = j * bn - st.conv_start
    inside = (channel >= 0) & (channel < st.conv_channels)  # all BN columns or none
    span = pl.ds(jnp.clip(channel, 0, st.conv_channels - bn), bn)  # in bounds either way
    if live is None:
        window = [cache_ref[0, i, span].astype(F32) for i in range(width - 1)] + [y]
    else:  # (the tap as an int32 array: the interpreter's masked load takes no Python int)
        rows = pl.ds(0, live.shape[0])
        window = [plt.load(cache_ref.at[rows, jnp.int32(i), span], mask=live[:, None],
                           other=0.0).astype(F32) for i in range(width - 1)] + [y]
    acc = (cb_ref[span].astype(F32) if cb_ref is not None else jnp.zeros((bn,), F32))
    for i, value in enumerate(window):  # W is 2..4: unrolled multiply-adds
        acc = acc + cw_ref[i, span].astype(F32) * value
    conv = rnd(acc * jax.nn.sigmoid(acc))

    @pl.when(inside)
    def _():
        for i in range(width - 1):
            value = window[i + 1].astype(new_cache_ref.dtype)
            if live is None:
                new_cache_ref[0, i, span] = value
            else:
                plt.store(new_cache_ref.at[rows, jnp.int32(i), span], value,
                          mask=live[:, None])

    return jnp.where(inside, conv, y)


def _group_prologue(xk: Array, k0: Array, rnd, *, scale_ref, gate_ref, st: _Static,
                    load=None) -> Array:
    """``rmsnorm(x_g) * scale (* silu(gate_g))`` per group ``g`` of ``st.group`` features of
    the tile ``xk`` (``[BK]``, or ``[RP, BK]`` with ``load`` the kernel's masked tile load;
    default :func:`_row`; a whole number of groups a row: the tile width is a multiple of
    the group), rounded once to the output dtype, as the layers' per-head output norm
    computes it."""
    from jax.experimental import pallas as pl

    size, bk = st.group, st.block_k
    groups = xk.size // size
    xg = xk.reshape(groups, size)  # [(RP,) BK] -> [(RP) BK / G, G]
    inv = jax.lax.rsqrt(jnp.mean(xg * xg, axis=1, keepdims=True) + st.norm_eps)
    y = xg * inv * scale_ref[pl.ds(0, size)].astype(F32)[None, :]
    if gate_ref is not None:
        gate = (load or _row)(gate_ref, st.gate_offset + k0, bk, st.gate_offset + st.depth)
        gate = gate.reshape(groups, size)  # [(RP,) BK] -> [(RP) BK / G, G]
        y = y * (gate * jax.nn.sigmoid(gate))
    return rnd(y.reshape(xk.shape))  # [(RP) BK / G, G] -> [(RP,) BK]


def _epilogue(ys: list[Array], res: Array | None, res_add: Array | None, rnd, *,
              glu: bool) -> Array:
    """The matmul's outputs (rounded) to the kernel's: ``silu(gate) * up`` with ``glu``
    (each op rounded as XLA rounds it), then ``(res + res_add) + y`` where given."""
    if glu:
        gate, up = ys
        y = rnd(rnd(gate * rnd(jax.nn.sigmoid(gate))) * up)
    else:
        y = ys[0]
    if res is not None:
        if res_add is not None:
            res = rnd(res + res_add)
        y = rnd(res + y)
    return y


def _kernel(*, x_ref, add_ref, scale_ref, gate_ref, w_ref, res_ref, res_add_ref, cache_ref,
            cw_ref, cb_ref, y_ref, new_cache_ref, st: _Static, j: Array | None = None):
    """Program ``j``: output columns ``[j BN, (j + 1) BN)`` = rows of ``W^T``, the
    contraction read in ``BK``-wide tiles (float32 sums). Prologue ``x (+ add)
    (-> rmsnorm * scale)``, epilogue ``glu`` and ``(res + res_add) + y``, or the short
    conv's step (:func:`_conv_epilogue`), each rounded to the output dtype where the layers
    round. ``j``: the program, given by a kernel that runs this one's programs itself
    (``persistent.py``); default ``pl.program_id(0)``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    j = pl.program_id(0) if j is None else j
    bk, bn, depth, width = st.block_k, st.block_n, st.depth, st.width
    outs = j * bn + jnp.arange(bn)
    n_tiles = pl.cdiv(depth, bk)

    def rnd(v):
        return v.astype(st.out_dtype).astype(F32)

    def x_in(k0):  # the prologue's input: x, or x + add rounded as the residual stream is
        xk = _row(x_ref, k0, bk, depth)  # [BK]
        return xk if add_ref is None else rnd(xk + _row(add_ref, k0, bk, depth))

    inv = None
    if st.norm_eps is not None and st.group is None:  # RMSNorm over the whole row first
        squares = jax.lax.fori_loop(0, n_tiles, lambda i, a: a + jnp.sum(jnp.square(
            x_in(pl.multiple_of(i * bk, bk)))), jnp.zeros((), F32))
        inv = jax.lax.rsqrt(squares / depth + st.norm_eps)

    starts = [j * bn] + ([width + j * bn] if st.glu else [])

    def body(i, acc):
        k0 = pl.multiple_of(i * bk, bk)
        ks = k0 + jnp.arange(bk)
        xk = x_in(k0)  # [BK]
        if st.group is not None:
            xk = _group_prologue(xk, k0, rnd, scale_ref=scale_ref, gate_ref=gate_ref, st=st)
        if inv is not None:
            scale = plt.load(scale_ref.at[pl.ds(k0, bk)], mask=ks < depth, other=0.0)
            xk = rnd(xk * inv * scale.astype(F32))
        mask = (outs[:, None] < width) & (ks[None, :] < depth)
        return tuple(a + jnp.sum(plt.load(w_ref.at[pl.ds(c, bn), pl.ds(k0, bk)], mask=mask,
                                          other=0.0).astype(F32) * xk[None, :], axis=1)
                     for a, c in zip(acc, starts, strict=True))  # [BN, BK] -> [BN] each

    acc = jax.lax.fori_loop(0, n_tiles, body, tuple(jnp.zeros((bn,), F32) for _ in starts))
    ys = [rnd(a) for a in acc]  # the matmul's output, in the output dtype
    y = _epilogue(ys, None if res_ref is None else _row(res_ref, j * bn, bn, width),  # [BN]
                  None if res_add_ref is None else _row(res_add_ref, j * bn, bn, width),
                  rnd, glu=st.glu)
    if st.conv_width is not None:
        y = _conv_epilogue(y, j, rnd, cache_ref=cache_ref, cw_ref=cw_ref, cb_ref=cb_ref,
                           new_cache_ref=new_cache_ref, st=st)
    plt.store(y_ref.at[pl.ds(0, 1), pl.ds(j * bn, bn)], y.astype(y_ref.dtype)[None],
              mask=(outs < width)[None])  # [BN] -> [1, BN]


def _rows_kernel(*, x_ref, add_ref, scale_ref, gate_ref, w_ref, res_ref, res_add_ref,
                 cache_ref, cw_ref, cb_ref, y_ref, new_cache_ref, st: _Static):
    """:func:`_kernel` for ``st.rows`` input rows (batch 2 .. :data:`MAX_ROWS` decoding):
    program ``j`` owns output columns ``[j BN, (j + 1) BN)``, its ``[BN, BK]`` weight tiles
    multiplied with the ``[RP, BK]`` input tile on the tensor cores (``RP`` =
    :func:`padded_rows`, rows past ``st.rows`` masked to zero and never stored), float32
    sums. The prologue and epilogue are :func:`_kernel`'s per row, rounded at the same
    places, but for a whole-row RMSNorm, whose ``1 / rms`` scales the product's rows (see
    ``body``); the matmul's operands are the compute dtype, as XLA's matmul takes them."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    j = pl.program_id(0)
    bk, bn, depth, width = st.block_k, st.block_n, st.depth, st.width
    rp = padded_rows(st.rows)
    live = jnp.arange(rp) < st.rows  # [RP]
    outs = j * bn + jnp.arange(bn)
    n_tiles = pl.cdiv(depth, bk)
    exact = st.out_dtype == jnp.dtype(F32)  # float32 weights: full-precision products

    def rnd(v):
        return v.astype(st.out_dtype).astype(F32)

    def tile(ref, start, size, limit):  # [RP, size] of a [R, L] operand, float32, masked
        cols = start + jnp.arange(size)
        return plt.load(ref.at[pl.ds(0, rp), pl.ds(start, size)],
                        mask=live[:, None] & (cols < limit)[None, :], other=0.0).astype(F32)

    def x_in(k0):
        xk = tile(x_ref, k0, bk, depth)  # [RP, BK]
        return xk if add_ref is None else rnd(xk + tile(add_ref, k0, bk, depth))

    # A whole-row RMSNorm is applied after the product: rmsnorm(x) W = inv * ((x * scale) W)
    # with inv each row's 1 / rms, summed from the same tiles the product reads, so the
    # kernel reads its input once (its [R, D] input is re-read by every program, which for
    # 64 rows is no longer small). ``x * scale`` is what is rounded to the compute dtype
    # (the layers round the normalised row): the same one rounding of each operand, at
    # another scale.
    whole_norm = st.norm_eps is not None and st.group is None
    starts = [j * bn] + ([width + j * bn] if st.glu else [])

    def body(i, carry):
        acc, squares = carry
        k0 = pl.multiple_of(i * bk, bk)
        ks = k0 + jnp.arange(bk)
        xk = x_in(k0)  # [RP, BK]
        if whole_norm:
            squares = squares + jnp.sum(xk * xk, axis=1)  # [RP]
            scale = plt.load(scale_ref.at[pl.ds(k0, bk)], mask=ks < depth, other=0.0)
            xk = rnd(xk * scale.astype(F32)[None, :])
        if st.group is not None:  # per-group RMSNorm (and silu gate) of each row
            xk = _group_prologue(xk, k0, rnd, scale_ref=scale_ref, gate_ref=gate_ref, st=st,
                                 load=tile)
        xk = xk.astype(st.out_dtype)  # exact: every prologue value is rounded to it
        mask = (outs[:, None] < width) & (ks[None, :] < depth)
        return tuple(
            a + jnp.dot(xk, plt.load(w_ref.at[pl.ds(c, bn), pl.ds(k0, bk)], mask=mask,
                                     other=0.0).T,
                        preferred_element_type=F32,
                        precision=jax.lax.Precision.HIGHEST if exact else None)
            for a, c in zip(acc, starts, strict=True)), squares  # [RP, BK] x [BK, BN] -> [RP, BN]

    acc, squares = jax.lax.fori_loop(
        0, n_tiles, body, (tuple(jnp.zeros((rp, bn), F32) for _ in starts),
                           jnp.zeros((rp,), F32)))
    if whole_norm:
        inv = jax.lax.rsqrt(squares / depth + st.norm_eps)  # [RP]
        acc = tuple(a * inv[:, None] for a in acc)
    ys = [rnd(a) for a in acc]  # [RP, BN] each, the matmul's output in the output dtype
    y = _epilogue(ys, None if res_ref is None else tile(res_ref, j * bn, bn, width),
                  None if res_add_ref is None else tile(res_add_ref, j * bn, bn, width),
                  rnd, glu=st.glu)  # [RP, BN]
    if st.conv_width is not None:  # the short conv's step on these columns, per row
        y = _conv_epilogue(y, j, rnd, cache_ref=cache_ref, cw_ref=cw_ref, cb_ref=cb_ref,
                           new_cache_ref=new_cache_ref, st=st, live=live)
    plt.store(y_ref.at[pl.ds(0, rp), pl.ds(j * bn, bn)], y.astype(y_ref.dtype),
              mask=live[:, None] & (outs < width)[None, :])


def _launch(x: Array, wt: Array, add: Array | None, scale: Array | None,
            res: Array | None, res_add: Array | None, *, glu: bool,
            norm_eps: float | None, out_dtype: jnp.dtype,
            blocks: tuple[int, int] | None = None, warps: int = 4) -> Array:
    """The kernel: ``x [R, D]``, ``wt [N, D]`` (``[2N, D]`` with glu) -> ``[R, N]``;
    ``blocks`` ``(BK, BN)`` (powers of two) in place of :func:`tiles`' (the benchmark's
    sweep)."""
    return _launch_any(x, wt, add, scale, res, res_add, None, None, None, glu=glu,
                       norm_eps=norm_eps, out_dtype=out_dtype, blocks=blocks, warps=warps)[0]


def static_for(depth: int, rows: int, cache: Array | None, conv_weight: Array | None, *,
               glu: bool, norm_eps: float | None, out_dtype: jnp.dtype, conv_start: int = 0,
               group: int | None = None, gate_offset: int | None = None,
               blocks: tuple[int, int] | None = None, x_rows: int = 1) -> _Static:
    """What is static in a launch over ``W^T [rows, depth]`` (``rows = 2N`` with ``glu``)
    for ``x_rows`` input rows: the tiles (:func:`tiles`, or ``blocks``) and the prologue /
    epilogue. Shared by :func:`_launch_any` and the persistent layer kernel, so both run
    one computation."""
    bk, bn = blocks or tiles(depth, x_rows)
    conv = {} if cache is None else dict(conv_width=conv_weight.shape[0],
                                         conv_start=conv_start, conv_channels=cache.shape[2])
    return _Static(depth=depth, width=rows // (2 if glu else 1), block_k=bk, block_n=bn,
                   glu=glu, norm_eps=norm_eps, out_dtype=jnp.dtype(out_dtype), group=group,
                   gate_offset=gate_offset, rows=x_rows, **conv)


def _launch_any(x: Array, wt: Array, add: Array | None, scale: Array | None,
                res: Array | None, res_add: Array | None, cache: Array | None,
                conv_weight: Array | None, conv_bias: Array | None, *, glu: bool,
                norm_eps: float | None, out_dtype: jnp.dtype, conv_start: int = 0,
                group: int | None = None, gate: Array | None = None, gate_offset: int = 0,
                blocks: tuple[int, int] | None = None,
                warps: int = 4) -> tuple[Array, Array | None]:
    """The kernel with every operand (``x [R, D]``, R = 1 or several rows); returns
    ``(y [R, N], new cache or None)``."""
    from jax.experimental import pallas as pl

    st = static_for(x.shape[1], wt.shape[0], cache, conv_weight, glu=glu, norm_eps=norm_eps,
                    out_dtype=out_dtype, conv_start=conv_start, group=group,
                    gate_offset=None if gate is None else gate_offset, blocks=blocks,
                    x_rows=x.shape[0])
    width, bn = st.width, st.block_n
    out = named_pallas_call(
        functools.partial(_kernel if st.rows == 1 else _rows_kernel, st=st),
        inputs={"x": x, "add": add, "scale": scale, "gate": gate, "w": wt, "res": res,
                "res_add": res_add, "cache": cache, "cw": conv_weight, "cb": conv_bias},
        outputs={"y": jax.ShapeDtypeStruct((st.rows, width), out_dtype),
                 "new_cache": None if cache is None else jax.ShapeDtypeStruct(
                     cache.shape, cache.dtype)},
        aliases={} if cache is None else {"cache": "new_cache"},
        grid=(pl.cdiv(width, bn),), interpret=interpret_mode(),
        compiler_params=compiler_params(warps, 3),
        name="one_row_matmul" if st.rows == 1 else "few_rows_matmul")
    return out["y"], out["new_cache"]


def _reference(x: Array, w: Array, transposed: bool, out_dtype: jnp.dtype,
               precision=None) -> Array:
    dims = (((1,), (1 if transposed else 0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, precision=precision,
                               preferred_element_type=out_dtype)  # [R, D] x W -> [R, N]


def one_row_matmul(x: Array, w: Array, *, transposed: bool = False,
                   out_dtype: DType | None = None, precision=None) -> Array:
    """``x [..., D] @ w [D, N]`` (``w [N, D]`` with ``transposed``) for one row in all.

    The caller has promoted ``x`` and ``w`` to the compute dtype and checked
    :func:`one_row_ready`; the mode (:func:`gemv_mode`) picks how. Products accumulate in
    float32 in every mode and are rounded once to ``out_dtype`` (default: the promoted
    dtype of ``x`` and ``w``), as XLA's matmul does. Differentiable (the kernel's backward
    pass is the matmul's).

    Returns:
        ``[..., N]`` in ``out_dtype``.

    Raises:
        ValueError: more than one row, or ``w`` whose contracting axis is not D.
    """
    lead, depth = x.shape[:-1], x.shape[-1]
    if math.prod(lead) != 1:
        raise ValueError(f"x: expected one row (prod of leading axes 1), got shape {x.shape}")
    k_axis = 1 if transposed else 0
    if w.ndim != 2 or w.shape[k_axis] != depth:
        want = "[N, D]" if transposed else "[D, N]"
        raise ValueError(f"w: expected {want} with D={depth}, got shape {tuple(w.shape)}")
    out_dtype = jnp.dtype(out_dtype or jnp.promote_types(x.dtype, w.dtype))
    width = w.shape[1 - k_axis]
    x2 = x.reshape(1, depth)  # [..., D] -> [1, D]
    mode = gemv_mode()
    if mode == "pad":
        xp = jnp.pad(x2, ((0, PAD_ROWS - 1), (0, 0)))  # [1, D] -> [PAD_ROWS, D]
        y = _reference(xp, w, transposed, out_dtype, precision)[:1]  # [PAD_ROWS, N] -> [1, N]
    elif mode == "pallas":
        wt = w if transposed else w.T  # [N, D]
        y = with_reference_vjp(
            lambda a, b: _launch(a, b, None, None, None, None, glu=False, norm_eps=None,
                                 out_dtype=out_dtype),
            lambda a, b: _reference(a, b, True, out_dtype, precision), x2, wt)
    else:
        y = _reference(x2, w, transposed, out_dtype, precision)
    return y.reshape(*lead, width)  # [1, N] -> [..., N]


def _fused_reference(x: Array, w: Array, add: Array | None, scale: Array | None,
                     res: Array | None, res_add: Array | None, *, transposed: bool,
                     glu: bool, norm_eps: float | None, out_dtype: jnp.dtype) -> Array:
    """:func:`one_row_fused`'s math in XLA, op by op as the layers compute it (its
    backward pass)."""
    if add is not None:
        x = x + add
    if norm_eps is not None:
        xf = x.astype(F32)
        inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + norm_eps)
        x = (xf * inv * scale.astype(F32)).astype(out_dtype)
    y = _reference(x, w, transposed, out_dtype)  # [1, N] or [1, 2N]
    if glu:
        gate, up = jnp.split(y, 2, axis=-1)  # [1, 2N] -> 2 x [1, N]
        y = jax.nn.silu(gate) * up
    if res is not None:
        y = (res if res_add is None else res + res_add) + y
    return y


def one_row_fused(x: Array, w: Array, *, transposed: bool = False, glu: bool = False,
                  add: Array | None = None, norm_scale: Array | None = None,
                  norm_eps: float | None = None, residual: Array | None = None,
                  residual_add: Array | None = None) -> Array:
    """A one-row (or few-row) matmul with a pre-norm layer's work around it, in one Pallas
    kernel.

    ``y = x' @ w`` (``w [D, N]``, or ``[N, D]`` stored transposed: the kernel reads that
    layout, and a ``[D, N]`` weight is transposed first) with the prologue
    ``x' = rmsnorm(x + add) * norm_scale`` (each part optional) and the epilogue
    ``silu(y_gate) * y_up`` (``glu``: ``w = [W_gate | W_up]``) then
    ``(residual + residual_add) + y``; every sum is rounded to ``w``'s dtype (the compute
    dtype) where the layers round it, so for one row it matches them to the matmul's
    summation order. ``x`` may be float32 with a norm prologue and no ``add`` (Mamba2's
    gated-norm input): the normalised row is rounded to ``w``'s dtype. A GPU path
    (``fused_ready``: mode ``"pallas"``); differentiable (as the XLA ops).

    Several rows (``R > 1``: batch-``R`` decoding) run a tensor-core form of the kernel
    (``_rows_kernel``) with the same prologue and epilogue per row, but for the RMSNorm,
    whose ``1 / rms`` scales the product (``x * norm_scale`` is what is rounded to ``w``'s
    dtype): one rounding of each operand, not at the layers' place.

    Args:
        x: ``[R, D]``, ``1 <= R <=`` :data:`MAX_ROWS`, in ``w``'s dtype (another float
            dtype with ``norm_scale`` and no ``add``); add: ``[R, D]`` or None.
        w: ``[D, N]`` (``[D, 2N]`` with ``glu``); ``[N, D]`` (``[2N, D]``) with
            ``transposed``.
        norm_scale: ``[D]`` (with ``norm_eps``) or None.
        residual, residual_add: ``[R, N]`` or None.

    Returns:
        ``[R, N]`` in ``w``'s dtype.

    Raises:
        ValueError: an operand of the wrong shape or dtype, naming it.
    """
    depth = x.shape[-1]
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x: expected [R, D] with 1 <= R <= {MAX_ROWS}, got shape "
                         f"{tuple(x.shape)}")
    rows = x.shape[0]
    k_axis = 1 if transposed else 0
    if w.ndim != 2 or w.shape[k_axis] != depth or (glu and w.shape[1 - k_axis] % 2):
        want = (("[2N, D]" if glu else "[N, D]") if transposed
                else ("[D, 2N]" if glu else "[D, N]"))
        raise ValueError(f"w: expected {want} with D={depth}, got shape {tuple(w.shape)}")
    width = w.shape[1 - k_axis] // (2 if glu else 1)
    for name, arr, shape in (("add", add, (rows, depth)), ("norm_scale", norm_scale, (depth,)),
                             ("residual", residual, (rows, width)),
                             ("residual_add", residual_add, (rows, width))):
        if arr is not None and tuple(arr.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(arr.shape)}")
    if (norm_scale is None) != (norm_eps is None):
        raise ValueError("norm_scale and norm_eps: expected both or neither, got "
                         f"{'norm_scale' if norm_eps is None else 'norm_eps'} alone")
    if residual_add is not None and residual is None:
        raise ValueError("residual_add: expected with residual, got it alone")
    if x.dtype != w.dtype and (norm_scale is None or add is not None):
        raise ValueError(f"x: expected dtype {w.dtype} (w's), got {x.dtype}; another dtype "
                         "only with a norm prologue (which casts it) and no add")
    for name, arr in (("add", add), ("residual", residual), ("residual_add", residual_add)):
        if arr is not None and arr.dtype != w.dtype:
            raise ValueError(f"{name}: expected dtype {w.dtype} (w's), got {arr.dtype}")
    kw = dict(glu=glu, norm_eps=None if norm_eps is None else float(norm_eps),
              out_dtype=w.dtype)
    wt = w if transposed else w.T  # [N, D] (or [2N, D])
    return with_reference_vjp(functools.partial(_launch, **kw),
                              functools.partial(_fused_reference, transposed=True, **kw),
                              x, wt, add, norm_scale, residual, residual_add)


def _row_and_weight(x: Array, w: Array, transposed: bool) -> tuple[int, int]:
    """``(D, N)`` of a fused call: ``x [R, D]`` (``1 <= R <= MAX_ROWS``) and ``w [D, N]``
    (``[N, D]`` with ``transposed``), checked, naming the bad argument."""
    depth = x.shape[-1]
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x: expected [R, D] with 1 <= R <= {MAX_ROWS}, got shape "
                         f"{tuple(x.shape)}")
    k_axis = 1 if transposed else 0
    if w.ndim != 2 or w.shape[k_axis] != depth:
        want = "[N, D]" if transposed else "[D, N]"
        raise ValueError(f"w: expected {want} with D={depth}, got shape {tuple(w.shape)}")
    return depth, w.shape[1 - k_axis]


def _conv_reference(x: Array, wt: Array, scale: Array | None, cache: Array,
                    conv_weight: Array, conv_bias: Array | None, *, norm_eps: float | None,
                    out_dtype: jnp.dtype, conv_start: int) -> tuple[Array, Array]:
    """:func:`one_row_conv`'s math in XLA (its backward pass)."""
    y = _fused_reference(x, wt, None, scale, None, None, transposed=True, glu=False,
                         norm_eps=norm_eps, out_dtype=out_dtype)  # [R, N]
    channels = cache.shape[2]
    window = jnp.concatenate([cache, y[:, None, conv_start:conv_start + channels]],
                             axis=1).astype(cache.dtype)  # [R, W-1, C] + [R, 1, C] -> [R, W, C]
    acc = jnp.sum(conv_weight.astype(F32) * window.astype(F32), axis=1)  # [R, W, C] -> [R, C]
    if conv_bias is not None:
        acc = acc + conv_bias.astype(F32)
    conv = (acc * jax.nn.sigmoid(acc)).astype(out_dtype)  # [R, C]
    y = y.at[:, conv_start:conv_start + channels].set(conv)
    return y, window[:, 1:]  # [R, W-1, C]


def one_row_conv(x: Array, w: Array, conv_cache: Array, conv_weight: Array,
                 conv_bias: Array | None = None, *, conv_start: int = 0,
                 transposed: bool = False, norm_scale: Array | None = None,
                 norm_eps: float | None = None) -> tuple[Array, Array]:
    """A one-row (or few-row) matmul whose output columns ``[conv_start, conv_start + C)``
    then take the short conv's one-token step, in one Pallas kernel (a recurrent layer's
    input projection at batch 1 .. :data:`MAX_ROWS`: q | k | v or Mamba2's x | B | C go
    through the conv, the other columns, gates and the like, come out as the matmul gives
    them).

    ``y = x' @ w`` with the optional RMSNorm prologue of :func:`one_row_fused`; then for
    each conv channel ``c``: ``silu(bias_c + sum_i conv_weight[i, c] * window[i, c])``
    with ``window = [conv_cache[r, :, c], y_rc]`` per row ``r`` (float32 sums, rounded to
    ``w``'s dtype once, as the layers' one-token conv step), and the cache shifted by one
    token: each channel's new cache is written in place by the one program that owns the
    column.

    Args:
        x: ``[R, D]`` (as :func:`one_row_fused`); w: ``[D, N]`` or ``[N, D]`` with
            ``transposed``.
        conv_cache: ``[R, W-1, C]`` in ``w``'s dtype; conv_weight ``[W, C]``; conv_bias
            ``[C]`` or None; ``W >= 2``.
        conv_start: the first conv column; ``conv_start`` and ``C`` multiples of the
            kernel's output columns per program (``tiles(D, R)[1]``: 2 for one row, 16 or 32
            for several), never split between the conv and the rest, and
            ``conv_start + C <= N``.
        norm_scale, norm_eps: an RMSNorm prologue, or None.

    Returns:
        ``(y [R, N] in w's dtype, new_cache [R, W-1, C])``.

    Raises:
        ValueError: an operand of the wrong shape or dtype, or conv columns that do not
            fit, naming the argument.
    """
    depth, width = _row_and_weight(x, w, transposed)
    rows = x.shape[0]
    if conv_cache.ndim != 3 or conv_cache.shape[0] != rows or conv_cache.shape[1] < 1:
        raise ValueError(f"conv_cache: expected [R, W-1, C] with R={rows} (x's rows) and "
                         f"W >= 2, got shape {tuple(conv_cache.shape)}")
    taps, channels = conv_cache.shape[1] + 1, conv_cache.shape[2]
    if tuple(conv_weight.shape) != (taps, channels):
        raise ValueError(f"conv_weight: expected shape {(taps, channels)} [W, C] (from "
                         f"conv_cache), got {tuple(conv_weight.shape)}")
    if conv_bias is not None and tuple(conv_bias.shape) != (channels,):
        raise ValueError(f"conv_bias: expected shape {(channels,)}, got "
                         f"{tuple(conv_bias.shape)}")
    bn = tiles(depth, rows)[1]
    if conv_start < 0 or conv_start % bn or channels % bn or conv_start + channels > width:
        raise ValueError(f"conv_start: expected a multiple of {bn} with conv_start + C <= N "
                         f"and C a multiple of {bn}, got conv_start={conv_start}, "
                         f"C={channels}, N={width}")
    if conv_cache.dtype != w.dtype:
        raise ValueError(f"conv_cache: expected dtype {w.dtype} (w's), got {conv_cache.dtype}")
    if norm_scale is not None and tuple(norm_scale.shape) != (depth,):
        raise ValueError(f"norm_scale: expected shape {(depth,)}, got "
                         f"{tuple(norm_scale.shape)}")
    if (norm_scale is None) != (norm_eps is None):
        raise ValueError("norm_scale and norm_eps: expected both or neither")
    if x.dtype != w.dtype and norm_scale is None:
        raise ValueError(f"x: expected dtype {w.dtype} (w's), got {x.dtype}; another dtype "
                         "only with a norm prologue (which casts it)")
    kw = dict(norm_eps=None if norm_eps is None else float(norm_eps), out_dtype=w.dtype)
    wt = w if transposed else w.T  # [N, D]

    def kernel(x, wt, scale, cache, cw, cb):
        return _launch_any(x, wt, None, scale, None, None, cache, cw, cb, glu=False,
                           conv_start=conv_start, **kw)

    return with_reference_vjp(
        kernel, functools.partial(_conv_reference, conv_start=conv_start, **kw),
        x, wt, norm_scale, conv_cache, conv_weight, conv_bias)


def _group_reference(x: Array, wt: Array, scale: Array, gate: Array | None, *, group: int,
                     norm_eps: float, gate_offset: int, out_dtype: jnp.dtype) -> Array:
    """:func:`one_row_group_norm`'s math in XLA (its backward pass)."""
    rows, depth = x.shape
    groups = rows * depth // group
    xf = x.astype(F32).reshape(groups, group)  # [R, D] -> [R D / G, G]
    inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + norm_eps)
    y = xf * inv * scale.astype(F32)
    if gate is not None:
        gf = gate[:, gate_offset:gate_offset + depth].astype(F32).reshape(
            groups, group)  # [R, D] -> [R D / G, G]
        y = y * jax.nn.silu(gf)
    xn = y.reshape(rows, depth).astype(out_dtype)  # [R D / G, G] -> [R, D]
    return _reference(xn, wt, True, out_dtype)


def one_row_group_norm(x: Array, w: Array, *, group: int, norm_scale: Array, norm_eps: float,
                       gate: Array | None = None, gate_offset: int = 0,
                       transposed: bool = False) -> Array:
    """``y = x' @ w`` for one row (or a few) with a per-group RMSNorm and a silu gate in the
    kernel's prologue: ``x'_g = rmsnorm(x_g) * norm_scale * silu(gate_g)`` for each group ``g`` of
    ``group`` consecutive features (a linear-attention layer's per-head output norm and
    gate before ``o_proj``, FLA's FusedRMSNormGated), rounded once to ``w``'s dtype.

    Args:
        x: ``[R, D]`` (``1 <= R <=`` :data:`MAX_ROWS`) with ``D`` a multiple of ``group``
            (the op's output, heads side by side); w: ``[D, N]`` or ``[N, D]`` with
            ``transposed``.
        group: features per group, a power of two of at most the kernel's tile width.
        norm_scale: ``[group]`` (shared by the groups); norm_eps: the norm's epsilon.
        gate: None, or ``[R, F]`` rows holding the gate's ``D`` values from
            ``gate_offset`` on (the input projection's rows: no slice is made).

    Returns:
        ``[R, N]`` in ``w``'s dtype.

    Raises:
        ValueError: an operand of the wrong shape or dtype, or a group the tiles do not
            hold whole, naming the argument.
    """
    depth, _ = _row_and_weight(x, w, transposed)
    rows = x.shape[0]
    bk = tiles(depth, rows)[0]
    if group < 1 or group & (group - 1) or group > bk or depth % group:
        raise ValueError(f"group: expected a power of two <= {bk} dividing D={depth}, "
                         f"got {group}")
    if tuple(norm_scale.shape) != (group,):
        raise ValueError(f"norm_scale: expected shape {(group,)}, got "
                         f"{tuple(norm_scale.shape)}")
    if gate is not None and (gate.ndim != 2 or gate.shape[0] != rows or gate_offset < 0
                             or gate_offset + depth > gate.shape[1]):
        raise ValueError(f"gate: expected [R, F] rows (R={rows}) holding D={depth} values "
                         f"from gate_offset={gate_offset}, got shape {tuple(gate.shape)}")
    for name, arr in (("x", x), ("gate", gate)):
        if arr is not None and arr.dtype != w.dtype:
            raise ValueError(f"{name}: expected dtype {w.dtype} (w's), got {arr.dtype}")
    kw = dict(group=group, norm_eps=float(norm_eps), gate_offset=gate_offset,
              out_dtype=w.dtype)
    wt = w if transposed else w.T  # [N, D]

    def kernel(x, wt, scale, gate):
        return _launch_any(x, wt, None, scale, None, None, None, None, None, glu=False,
                           norm_eps=kw["norm_eps"], out_dtype=w.dtype, group=group, gate=gate,
                           gate_offset=gate_offset)[0]

    return with_reference_vjp(kernel, functools.partial(_group_reference, **kw), x, wt,
                              norm_scale, gate)
