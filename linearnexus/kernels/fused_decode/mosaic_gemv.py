"""Few-row matmuls on Hopper through Mosaic GPU, with programmatic dependent launch (PDL).

Batch-1 decoding is a chain of one-row projections, each reading its weight once; on an
H100 the step is ~3x the time to read the weights, and most of the gap is per kernel: the
launch, the first loads' latency from HBM and the drain of a short grid, paid 60 times a
GDN step (``docs/benchmarks.md``, "Batch-1 decode on an H100"). The Triton-lowered kernels
of ``gemv.py`` cannot overlap one kernel with the next. Mosaic GPU can: a kernel that uses
``griddepcontrol`` is launched with programmatic stream serialization, so it may start
while the kernel before it still runs. This kernel issues its first weight copies (weights
never depend on the step), signals that the next kernel may launch, and only then waits
for the previous kernel's output (``griddepcontrol.wait``) and reads the activation.

Layout. Activations travel between these kernels as ``[ROWS, D]`` (``ROWS`` = 8 batch slots,
unused ones zero), weights as the transposed table ``W^T [N, K]`` (``gemv.py``'s decode
layout). Program ``j`` owns ``bn`` output columns. Per ``bk``-wide step of K it copies (TMA)
the ``[bn, bk]`` weight tile and the ``[ROWS, bk]`` activation tile into a ring of
``stages`` slots, and multiplies ``acc [64, bn] += a [64, bk] @ W^T[bn, bk]^T`` (wgmma's M
is 64). Rows ``0..ROWS-1`` of ``acc`` are the output and depend on rows ``0..ROWS-1`` of
``a`` alone, so the other 56 rows of ``a`` may hold anything: slot ``s``'s ``a`` is rows
``[8 s, 8 s + 64)`` of one ``[8 stages + 56, bk]`` buffer, its own activation rows
followed by the next slots' (and rows never written). The ring then costs ``8 stages + 56``
activation rows instead of ``64 stages``, which leaves shared memory for a deep weight
ring: the bytes in flight that a program needs to read at the HBM rate. A wgmma may read
those other rows while a copy writes them; only rows its output discards. An activation
wider than K is read in its first K columns, so a kernel can consume a slice of the
previous kernel's output (a fused projection's first part) with no XLA op between. Each
step's wgmma is left in flight while the next step's starts (``wgmma_wait(1)``); the slot
of the step before then takes its next copies. (JAX's Mosaic GPU interpreter, which the
tests run, does not model wgmma's asynchrony: that ordering is argued in the code, and
timed only on a GPU.)

Status: an experimental kernel for measuring whether PDL closes the per-kernel gap; the
models' decode path does not call it (``docs/generation.md``, "One-row matmuls").
``benchmarks/gemv_gpu.py --bare`` times it against the Triton kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common import mosaic_chunk

F32 = jnp.float32
#: batch slots of the activation between kernels (rows beyond the batch are zero)
ROWS = 8
#: wgmma's fixed M: the activation tile is padded to this many rows in shared memory
WGMMA_M = 64
#: shared memory one program may use, leaving room for a second (the next kernel's, under
#: PDL) on the same SM (228 KB per SM on Hopper)
SMEM_BUDGET = 100 * 1024
#: weight bytes one program keeps in flight by default: at ~3 TB/s over 132 SMs and ~1 us
#: from HBM, an SM must have ~23 KB requested to read at the full rate
IN_FLIGHT = 32 * 1024
#: the deepest ring (Mosaic GPU allocates at most 32 barriers in a group)
MAX_STAGES = 32
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class GemvTiles:
    """Tiles of :func:`few_row_matmul`: ``bn`` output columns per program (a multiple of 8,
    at most 256), ``bk`` columns of K per step (a multiple of 64), ``stages`` slots of the
    copy ring (>= 1)."""

    bn: int
    bk: int
    stages: int

    @property
    def a_rows(self) -> int:
        """Rows of the activation buffer: each slot's ``ROWS`` and the 56 more that the last
        slot's 64-row wgmma operand spans (module doc)."""
        return ROWS * self.stages + WGMMA_M - ROWS

    def smem_bytes(self, itemsize: int = 2) -> int:
        """Shared memory of one program: the activation buffer, the weight ring and the
        ``[64, bn]`` output tile."""
        return (self.a_rows * self.bk + self.stages * self.bn * self.bk
                + WGMMA_M * self.bn) * itemsize


def default_tiles(n: int, k: int, *, programs: int = 132) -> GemvTiles:
    """Tiles for ``W^T [n, k]``: the widest ``bn`` in (64, 32, 16, 8) dividing ``n`` that
    still gives at least ``programs`` programs (else 8), the
    widest ``bk`` in (256, 128, 64) dividing ``k``, and enough stages for
    :data:`IN_FLIGHT` weight bytes per program (at least 2, at most :data:`MAX_STAGES` and
    the number of steps), fewer where :data:`SMEM_BUDGET` is short."""
    dividing = [b for b in (64, 32, 16, 8) if n % b == 0]
    if not dividing:
        raise ValueError(f"wt: expected a row count that is a multiple of 8, got {n}")
    bn = next((b for b in dividing if n // b >= programs), dividing[-1])
    bk = next((b for b in (256, 128, 64) if k % b == 0), None)
    if bk is None:
        raise ValueError(f"wt: expected a column count (K) that is a multiple of 64, got {k}")
    want = max(2, -(-IN_FLIGHT // (bn * bk * 2)))
    stages = min(want, MAX_STAGES, k // bk)
    while stages > 1 and GemvTiles(bn, bk, stages).smem_bytes() > SMEM_BUDGET:
        stages -= 1
    return GemvTiles(bn, bk, stages)


def _check_shapes(x: Array, wt: Array) -> None:
    if wt.ndim != 2 or wt.shape[0] % 8 or wt.shape[1] % 64 or not wt.shape[1]:
        raise ValueError(f"wt: expected [N, K] with N a multiple of 8 and K a positive "
                         f"multiple of 64, got shape {tuple(wt.shape)}")
    n, k = wt.shape
    if x.ndim != 2 or x.shape[0] != ROWS or x.shape[1] < k:
        raise ValueError(f"x: expected [{ROWS}, >= {k}] (batch slots, at least wt's K "
                         f"columns), got shape {x.shape}")
    if x.shape[1] % 64:  # TMA reads x in 64-column tiles of the whole array
        raise ValueError(f"x: expected a width that is a multiple of 64, got {x.shape[1]}")


def _check(x: Array, wt: Array, tiles: GemvTiles) -> None:
    n, k = wt.shape
    if jnp.dtype(x.dtype) not in _DTYPES or x.dtype != wt.dtype:
        raise ValueError(f"x, wt: expected the same 16-bit dtype (bfloat16 or float16), got "
                         f"{x.dtype} and {wt.dtype}")
    if tiles.bn % 8 or not 8 <= tiles.bn <= 256 or n % tiles.bn:
        raise ValueError(f"tiles.bn: expected a multiple of 8 in [8, 256] dividing N={n}, "
                         f"got {tiles.bn}")
    if tiles.bk % 64 or k % tiles.bk:
        raise ValueError(f"tiles.bk: expected a multiple of 64 dividing K={k}, got {tiles.bk}")
    if not 1 <= tiles.stages <= MAX_STAGES:  # (Mosaic GPU: at most 32 barriers a group)
        raise ValueError(f"tiles.stages: expected 1 to {MAX_STAGES}, got {tiles.stages}")


def _kernel(x_gmem: Any, w_gmem: Any, o_gmem: Any, a_smem: Any, w_smem: Any, o_smem: Any,
            w_bar: Any, x_bar: Any, *, tiles: GemvTiles, steps: int, pdl: bool) -> None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bn, bk, stages = tiles.bn, tiles.bk, tiles.stages
    j = jax.lax.axis_index("n")
    # PDL's two instructions order launches; the interpreter has no rule for them and runs
    # kernels one after another anyway
    pdl = pdl and not mosaic_chunk._INTERPRETING

    def w_copy(i: Any, slot: Any) -> None:
        plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(j * bn, bn), pl.ds(i * bk, bk)],
                                w_smem.at[slot], w_bar.at[slot])

    def first_row(slot: Any) -> Any:  # slot s's activation rows start at 8 s
        return slot * ROWS if isinstance(slot, int) else pl.multiple_of(slot * ROWS, ROWS)

    def x_copy(i: Any, slot: Any) -> None:
        plgpu.copy_gmem_to_smem(x_gmem.at[:, pl.ds(i * bk, bk)],
                                a_smem.at[pl.ds(first_row(slot), ROWS)],
                                x_bar.at[slot])

    first = min(stages, steps)
    for s in range(first):  # the weights do not depend on the step: copy before the wait
        w_copy(s, s)
    if pdl:
        plgpu.griddepcontrol_launch_dependents()
        plgpu.griddepcontrol_wait()  # the previous kernel's output is complete from here
    for s in range(first):
        x_copy(s, s)

    lag = 1 if stages > 1 else 0  # wgmma groups left in flight at the end of a step

    def walk(acc_ref: Any) -> Array:
        def step(i: Any, carry: None) -> None:
            slot = jax.lax.rem(i, stages)
            plgpu.barrier_wait(w_bar.at[slot])
            plgpu.barrier_wait(x_bar.at[slot])
            # [64, bk] @ [bk, bn] -> [64, bn], left in flight: waiting for all but this one
            # (lag 1) means the previous step's wgmma is done, so its slot takes the copies
            # of step i - 1 + stages while this one runs; one slot has nothing to overlap
            rows = pl.ds(first_row(slot), WGMMA_M)  # this slot's 64-row operand
            plgpu.wgmma(acc_ref, a_smem.at[rows], mosaic_chunk._transposed(w_smem.at[slot]))
            plgpu.wgmma_wait(lag)
            ahead = i - lag + stages

            @pl.when((i >= lag) & (ahead < steps))
            def _() -> None:
                free = jax.lax.rem(i - lag, stages)
                w_copy(ahead, free)
                x_copy(ahead, free)

            return carry

        jax.lax.fori_loop(0, steps, step, None)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    # the accumulator starts at zero ([64, bn] float32, wgmma's register layout)
    acc = pl.run_scoped(walk, plgpu.ACC((WGMMA_M, bn), F32))
    o_smem[...] = acc.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, ROWS)], o_gmem.at[:, pl.ds(j * bn, bn)])
    plgpu.wait_smem_to_gmem(0)


def few_row_matmul(x: Array, wt: Array, *, tiles: GemvTiles | None = None,
                   pdl: bool = True) -> Array:
    """``x[:, :K] @ wt^T`` on one Hopper GPU (Mosaic GPU), for up to :data:`ROWS` rows.

    Args:
        x: ``[ROWS, >= K]`` bfloat16 or float16 activation (batch slots; unused rows zero).
        wt: ``[N, K]`` weight, transposed (same dtype); N a multiple of 8, K of 64.
        tiles: the kernel's tiles (:func:`default_tiles` when None).
        pdl: launch with programmatic dependent launch (module doc): the weight copies of
            the first ``stages`` steps start before the previous kernel finishes, and a
            chain of such kernels can run ahead by more than one, so ``wt`` must not be
            written by any earlier kernel that may still be running (weights of a decode
            loop never are); ``x`` is read, and the output written, only after the kernel
            just before has finished.

    Returns:
        ``[ROWS, N]`` in ``x``'s dtype (float32 accumulation).

    Raises:
        ValueError: shapes, dtypes or tiles outside the above, before any work.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _check_shapes(x, wt)
    n, k = wt.shape
    tiles = default_tiles(n, k) if tiles is None else tiles
    _check(x, wt, tiles)
    swizzled = mosaic_chunk._swizzled(tiles.bk, x.dtype)
    scratch = (plgpu.SMEM((tiles.a_rows, tiles.bk), x.dtype, transforms=swizzled),
               plgpu.SMEM((tiles.stages, tiles.bn, tiles.bk), x.dtype, transforms=swizzled),
               plgpu.SMEM((WGMMA_M, tiles.bn), x.dtype),
               plgpu.Barrier(num_arrivals=1, num_barriers=tiles.stages),
               plgpu.Barrier(num_arrivals=1, num_barriers=tiles.stages))
    kernel = functools.partial(_kernel, tiles=tiles, steps=k // tiles.bk, pdl=pdl)
    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((ROWS, n), x.dtype),
                        scratch_types=scratch, grid=(n // tiles.bn,), grid_names=("n",),
                        compiler_params=mosaic_chunk.compiler_params(),
                        **mosaic_chunk.interpret_kwargs())(x, wt)
