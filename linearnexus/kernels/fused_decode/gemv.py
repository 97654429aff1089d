"""One-row matmuls for batch-1 decoding: ``[1, D] @ [D, N]`` that read the weight once.

A batch-1 decode step is a chain of one-row projections. XLA:GPU rewrites a matmul whose
left side is one row as an elementwise multiply and a reduce when the weight has fewer than
~10M elements ("dot strength reduction"), and in the decode loop that became two kernels
per projection, the first writing the whole ``[D, N]`` product that the second reads back
(``docs/benchmarks.md``, "Fused one-token layer kernels"). This module computes such
products another way, chosen by ``LINEARNEXUS_DECODE_GEMV`` (read at trace time):

* ``"xla"``: ``lax.dot_general`` as every other call (XLA's rewrite);
* ``"pad"``: the row padded to :data:`PAD_ROWS` rows, so XLA keeps a matmul (cuBLAS or its
  own GEMM), then row 0;
* ``"pallas"``: a Pallas (Triton) kernel over ``W [D, N]``: program ``j`` owns ``BN``
  output columns and walks D in ``BK``-row tiles, accumulating in float32 (an earlier
  version with 64 programs of 64 columns was latency-bound; the heuristic here keeps
  ~1-3 programs per SM). A weight stored ``[N, D]`` (the tied embedding as the LM head)
  takes the transposed kernel: program ``j`` owns ``BN`` rows.

Only one-row calls on a GPU change (``one_row_ready``); batch > 1 and the CPU always take
XLA's matmul. The default is the mode measured fastest on the H200 (``DEFAULT_MODE``).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array, DType
from linearnexus.kernels.base import current_platform
from linearnexus.kernels.common.pallas import compiler_params, interpret_mode, with_reference_vjp

#: "xla" | "pad" | "pallas": how one-row matmuls run on a GPU (read at trace time)
GEMV_ENV = "LINEARNEXUS_DECODE_GEMV"
MODES = ("xla", "pad", "pallas")
DEFAULT_MODE = "xla"
#: rows the "pad" mode pads one row to
PAD_ROWS = 8
F32 = jnp.float32


def gemv_mode() -> str:
    """The mode ``LINEARNEXUS_DECODE_GEMV`` names (default :data:`DEFAULT_MODE`).

    Raises:
        ValueError: a value not in :data:`MODES`.
    """
    mode = os.environ.get(GEMV_ENV, DEFAULT_MODE)
    if mode not in MODES:
        raise ValueError(f"{GEMV_ENV}: expected one of {MODES}, got {mode!r}")
    return mode


def _compiles() -> bool:
    """A GPU, not interpret mode. Tests replace this to run the kernels interpreted."""
    return current_platform() == "gpu" and not interpret_mode()


def one_row_ready(x: Array) -> bool:
    """Whether a matmul of ``x [..., D]`` goes through :func:`one_row_matmul`: one row in
    all (``prod(x.shape[:-1]) == 1``), the kernels compile here, and the mode is not
    ``"xla"``."""
    rows = 1
    for n in x.shape[:-1]:
        rows *= n
    return rows == 1 and _compiles() and gemv_mode() != "xla"


def _pow2_at_most(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= min(n, cap):
        p *= 2
    return p


def blocks(depth: int, width: int, *, programs: int = 256) -> tuple[int, int]:
    """``(BK, BN)`` of the column kernel for ``[1, depth] @ [depth, width]``: ``BN`` the
    largest power of two in [8, 64] that still gives ``programs`` programs (8 when none
    does), ``BK`` so that one tile holds ~8192 weights (powers of two; the last tile of
    either axis is masked)."""
    bn = 8
    for b in (64, 32, 16):
        if -(-width // b) >= programs:
            bn = b
            break
    bk = _pow2_at_most(max(depth, 16), max(16, 8192 // bn))
    return bk, bn


def _cols_kernel(x_ref, w_ref, o_ref, *, depth: int, width: int, bk: int, bn: int):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    j = pl.program_id(0)
    cols = j * bn + jnp.arange(bn)

    def body(i, acc):
        rows = i * bk + jnp.arange(bk)
        mask = (rows[:, None] < depth) & (cols[None, :] < width)
        w = plt.load(w_ref.at[pl.ds(i * bk, bk), pl.ds(j * bn, bn)], mask=mask, other=0.0)
        x = plt.load(x_ref.at[pl.ds(0, 1), pl.ds(i * bk, bk)], mask=(rows < depth)[None],
                     other=0.0)[0]  # [1, BK] -> [BK]
        return acc + jnp.sum(x.astype(F32)[:, None] * w.astype(F32), axis=0)  # [BN]

    acc = jax.lax.fori_loop(0, pl.cdiv(depth, bk), body, jnp.zeros((bn,), F32))
    plt.store(o_ref.at[pl.ds(0, 1), pl.ds(j * bn, bn)], acc.astype(o_ref.dtype)[None],
              mask=(cols < width)[None])  # [BN] -> [1, BN]


def _rows_kernel(x_ref, wt_ref, o_ref, *, depth: int, width: int, bk: int, bn: int):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    j = pl.program_id(0)
    outs = j * bn + jnp.arange(bn)

    def body(i, acc):
        ks = i * bk + jnp.arange(bk)
        mask = (outs[:, None] < width) & (ks[None, :] < depth)
        w = plt.load(wt_ref.at[pl.ds(j * bn, bn), pl.ds(i * bk, bk)], mask=mask, other=0.0)
        x = plt.load(x_ref.at[pl.ds(0, 1), pl.ds(i * bk, bk)], mask=(ks < depth)[None],
                     other=0.0)[0]  # [1, BK] -> [BK]
        return acc + jnp.sum(w.astype(F32) * x.astype(F32)[None, :], axis=1)  # [BN]

    acc = jax.lax.fori_loop(0, pl.cdiv(depth, bk), body, jnp.zeros((bn,), F32))
    plt.store(o_ref.at[pl.ds(0, 1), pl.ds(j * bn, bn)], acc.astype(o_ref.dtype)[None],
              mask=(outs < width)[None])  # [BN] -> [1, BN]


def _pallas(x: Array, w: Array, transposed: bool, out_dtype: jnp.dtype) -> Array:
    """``x [1, D]`` times ``w [D, N]`` (or ``[N, D]`` transposed) -> ``[1, N]``."""
    from jax.experimental import pallas as pl

    depth = x.shape[1]
    width = w.shape[0] if transposed else w.shape[1]
    if transposed:  # BN rows of ~512 contiguous weights each per tile
        bk = _pow2_at_most(max(depth, 16), 512)
        bn = 8 if -(-width // 8) >= 256 else 4
        kernel = _rows_kernel
    else:
        bk, bn = blocks(depth, width)
        kernel = _cols_kernel
    return pl.pallas_call(
        functools.partial(kernel, depth=depth, width=width, bk=bk, bn=bn),
        out_shape=jax.ShapeDtypeStruct((1, width), out_dtype),
        grid=(pl.cdiv(width, bn),), interpret=interpret_mode(),
        compiler_params=compiler_params(4, 3), name="one_row_matmul")(x, w)


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
    rows = 1
    for n in lead:
        rows *= n
    if rows != 1:
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
        y = with_reference_vjp(
            lambda a, b: _pallas(a, b, transposed, out_dtype),
            lambda a, b: _reference(a, b, transposed, out_dtype, precision), x2, w)
    else:
        y = _reference(x2, w, transposed, out_dtype, precision)
    return y.reshape(*lead, width)  # [1, N] -> [..., N]
