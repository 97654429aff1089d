"""A batch-1 step's projections in ONE Mosaic GPU kernel whose weight stream never stops.

An experiment for issue 23 (batch-1 decoding within 2x of the weight-read time). The
persistent Triton kernel (``persistent_gemv.py``, ``kernels/fused_decode/persistent.py``)
lost to separate kernels on an H100: one resident program per SM keeps one weight tile in
flight, and every grid barrier drains the memory pipe (``docs/benchmarks.md``, "The
persistent layer kernel and counted loop blocks"). Weights never depend on activations, so
here every program streams its share of the WHOLE step's weights through a ring of
``stages`` shared-memory slots by TMA, in the order it will use them, across projection
boundaries: while a program waits at the grid barrier for the previous projection's
output, the copies of the next projection's first tiles are already in flight. Only the
arithmetic waits for activations.

The chain is ``gemv_gpu.py --bare``'s: per layer ``in`` (h -> y), ``o`` (y[:, :K_o] -> h),
``gu`` (h -> g), ``down`` (g[:, :K_down] -> h), the weights stacked ``[L, N, K]`` per kind,
transposed (``W^T``), K a multiple of :data:`BK` (the caller pads ``down``'s K with zero
columns). Activations travel as ``[8, W]`` rows (row 0 the batch row, the rest zero), as in
``kernels/fused_decode/mosaic_gemv.py``, whose arithmetic this reuses: per ``BK``-wide step
``acc [64, bn] += a [64, BK] @ W^T[bn, BK]^T``, ``a`` the 64-row window of an activation
buffer that holds step ``s``'s 8 rows at row ``8 s`` (rows past a window's first 8 only feed
output rows that are discarded).

Program ``p`` of ``P`` owns row tiles ``p, p + P, ...`` of ``bn`` rows (16, or up to
``max_bn``, where that still gives every program a tile, else 8). Its steps, in order, are
numbered ``g = 0, 1, ...`` over the layers, kinds, its tiles and their K steps; slot ``g mod
stages`` holds step ``g``'s weight tile, and the copy of step ``g + stages`` is issued as
soon as step ``g``'s wgmma is done (one wgmma stays in flight). Between projections the
programs meet at a grid barrier of GMEM semaphores (``pl.get_global``, which Pallas
zero-fills before each launch; release / acquire at GPU scope): by default every program
adds one to a count and waits until it reaches the barrier's total (one round trip through
L2, 132 pollers); ``barrier="two"``: program 0 alone waits for that total and then raises a
second count that the others wait on (two round trips, one poller of the first count).
Every program must be resident at once (one per SM; there is no cooperative launch and a
semaphore wait has no timeout): a GPU shared with another kernel, or one of fewer SMs than
``programs``, hangs instead of failing, so run it alone and under ``timeout``.

What should bound it (an estimate to check against the GPU's numbers, not a measurement):
the bytes (404.6 MB at ~2.7 TB/s on an H100: 0.15 ms) overlap the arithmetic, but each of
the 48 projections also pays a chain no ring can hide: the barrier (an L2 round trip after
the slowest program's last store), the activation's copy from L2, and the last tile's store
(together ~1.5-2.5 us: 0.07-0.12 ms a step), and each K step of a program costs a
barrier wait, a wgmma and the next copy's issue (~40 steps a layer a program). If the
chain dominates, fewer steps (wider tiles) and fewer grid-wide syncs are the levers, not
a deeper ring. Each step copies 8 activation rows where one is live (~6 MB of L2 reads a
projection over the grid); copying one row is refused by Mosaic GPU's lowering (a slice of
the wgmma operand's 8-row-tiled shared memory must be whole tiles).

JAX's Mosaic GPU interpreter (0.11) runs programs one after another and has no rule for
global semaphores, so the tests run it with ``programs=1`` (no barrier; the whole stream,
the ring's reuse across projections and layers, checked against XLA), check every
program's copy schedule (:func:`step_of`) against the order its loops consume the tiles for
all 132 programs at the benchmark's sizes, and lower the ``P``-program kernel for CUDA on the
CPU. ``gemv_gpu.py --bare --variants stream_*`` times it on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32
#: columns of K per step (one TMA copy of a weight tile; K must be a multiple)
BK = 256
#: rows of an activation (batch slots; only row 0 is the batch row in the bare chain)
ROWS = 8
WGMMA_M = 64
#: the kinds of projection of a layer, as (name, source buffer, sink buffer)
KINDS = (("in_t", "h", "y"), ("o_t", "y", "h"), ("gu_t", "h", "g"), ("down_t", "g", "h"))


@dataclasses.dataclass(frozen=True)
class _Kind:
    name: str
    src: str
    dst: str
    n: int  # output columns (rows of W^T)
    k: int  # contraction (a multiple of BK)
    bn: int  # rows of W^T per tile

    @property
    def steps(self) -> int:  # K steps per tile
        return self.k // BK

    @property
    def tiles(self) -> int:
        return self.n // self.bn


def _kinds(ws: dict[str, Any], programs: int, max_bn: int) -> tuple[_Kind, ...]:
    """Each kind's tile rows: the widest of ``max_bn``, ..., 16 that divides N and still gives
    every program a tile, else 8."""
    out = []
    for name, src, dst in KINDS:
        n, k = ws[name].shape[1:]
        bn = next((b for b in (32, 16) if b <= max_bn and n % b == 0 and n // b >= programs),
                  8)
        out.append(_Kind(name, src, dst, n, k, bn))
    return tuple(out)


def rounds(kind: _Kind, pid: Any, programs: int) -> Any:
    """Program ``pid``'s row tiles of a kind (``pid, pid + P, ...``): ``ceil((tiles - pid) /
    P)``, at least 0."""
    return jnp.maximum(jax.lax.div(kind.tiles - pid + programs - 1, programs), 0)


def step_of(g: Any, kinds: tuple[_Kind, ...], pid: Any, programs: int,
            layers: int) -> tuple[Any, Any, Any, Any, Any]:
    """What program ``pid``'s step ``g`` is, in the order its consumer walks them (layers,
    kinds, its tiles, their K steps): ``(valid, layer, kind index, round r, K step s)``; the
    tile is ``pid + r P``. ``valid`` is False past the program's last step."""
    steps = [rounds(kind, pid, programs) * kind.steps for kind in kinds]
    per_layer = sum(steps, jnp.int32(0))
    layer = jax.lax.div(g, jnp.maximum(per_layer, 1))
    rem = g - layer * per_layer
    kind_index, r, s, start = jnp.int32(0), jnp.int32(0), jnp.int32(0), jnp.int32(0)
    for i, (kind, count) in enumerate(zip(kinds, steps, strict=True)):
        here = (rem >= start) & (rem < start + count)
        r_i = jax.lax.div(rem - start, kind.steps)
        kind_index = jnp.where(here, i, kind_index)
        r = jnp.where(here, r_i, r)
        s = jnp.where(here, rem - start - r_i * kind.steps, s)
        start = start + count
    return g < per_layer * layers, layer, kind_index, r, s


def _kernel(h0_ref, in_ref, o_ref, gu_ref, dn_ref, h_ref, y_ref, g_ref, ring, a_smem, w_bar,
            x_bar, *o_bufs, tile_rows: tuple[int, ...], kinds: tuple[_Kind, ...],
            layers: int, programs: int, stages: int, barrier: str) -> None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from linearnexus.kernels.common import mosaic_chunk

    weights = dict(zip([k.name for k in kinds], (in_ref, o_ref, gu_ref, dn_ref), strict=True))
    bufs = {"h": h_ref, "y": y_ref, "g": g_ref}
    pid = jax.lax.axis_index("p")
    P = programs

    def issue(g) -> None:
        """The TMA copy of step ``g``'s weight tile into slot ``g mod stages`` (none past
        the last step)."""
        valid, layer, index, r, s = step_of(g, kinds, pid, P, layers)
        slot = jax.lax.rem(g, stages)
        for i, kind in enumerate(kinds):
            @pl.when(valid & (index == i))
            def _(kind=kind) -> None:
                j = pid + r * P  # the tile
                plgpu.copy_gmem_to_smem(
                    weights[kind.name].at[layer, pl.ds(j * kind.bn, kind.bn),
                                          pl.ds(s * BK, BK)],
                    ring.at[slot, pl.ds(0, kind.bn)], w_bar.at[slot])

    # the ring's first fill (weights need no activations); a loop, not 4 x stages copy sites
    jax.lax.fori_loop(0, stages, lambda g0, c: (issue(g0), c)[1], 0)

    gpu = dict(memory_scope="gpu")  # release / acquire at GPU scope, not the system's
    if P > 1:
        # Pallas zero-fills kernel-scoped GMEM scratch before every launch, semaphores too
        count = pl.get_global(plgpu.SemaphoreType.REGULAR)
        if barrier == "two":
            go = pl.get_global(plgpu.SemaphoreType.REGULAR)

    def grid_barrier(index) -> None:
        """Barrier ``index`` (0, 1, ... in program order, traced): every program has
        signalled ``index + 1`` times, and the counts only grow within a launch."""
        if P == 1:
            return
        plgpu.semaphore_signal(count, 1, **gpu)
        if barrier == "one":
            plgpu.semaphore_wait(count, (index + 1) * P, decrement=False, **gpu)
            return

        @pl.when(pid == 0)
        def _() -> None:  # program 0 collects every signal, then releases all at once
            plgpu.semaphore_wait(count, (index + 1) * P, decrement=False, **gpu)
            plgpu.semaphore_signal(go, 1, **gpu)

        plgpu.semaphore_wait(go, index + 1, decrement=False, **gpu)

    def projection(layer, g, kind: _Kind, first: bool):
        src = bufs[kind.src]
        if kind.src == "h":  # layer 0's input projection reads the kernel's input
            src = h0_ref if first else h_ref
        mine = rounds(kind, pid, P)

        @pl.when(mine > 0)  # (a program with no tile of this kind needs no activation)
        def _() -> None:
            for s in range(kind.steps):  # the activation, step s's 8 rows at row 8 s
                plgpu.copy_gmem_to_smem(src.at[:, pl.ds(s * BK, BK)],
                                        a_smem.at[pl.ds(s * ROWS, ROWS)], x_bar.at[s])
            for s in range(kind.steps):
                plgpu.barrier_wait(x_bar.at[s])

        o_smem = o_bufs[tile_rows.index(kind.bn)]  # [64, bn]

        def tile(r, g):
            j = pid + r * P

            def walk(acc_ref):
                def step(s, c):
                    gs = g + s
                    slot = jax.lax.rem(gs, stages)
                    plgpu.barrier_wait(w_bar.at[slot])
                    window = a_smem.at[pl.ds(pl.multiple_of(s * ROWS, ROWS), WGMMA_M)]
                    plgpu.wgmma(acc_ref, window,
                                mosaic_chunk._transposed(ring.at[slot, pl.ds(0, kind.bn)]))
                    plgpu.wgmma_wait(1)  # the step before is done: its slot takes a copy

                    @pl.when(s > 0)
                    def _() -> None:
                        issue(gs - 1 + stages)

                    return c

                jax.lax.fori_loop(0, kind.steps, step, 0)
                plgpu.wgmma_wait(0)
                issue(g + kind.steps - 1 + stages)  # the last step's slot
                return acc_ref[...]

            acc = pl.run_scoped(walk, plgpu.ACC((WGMMA_M, kind.bn), F32))
            # the previous tile's store has read o_smem (it ran beside this tile's steps)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_smem[...] = acc.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, ROWS)],
                                    bufs[kind.dst].at[:, pl.ds(j * kind.bn, kind.bn)])
            return g + kind.steps

        g = jax.lax.fori_loop(0, mine, tile, g)
        plgpu.wait_smem_to_gmem(0)  # every row tile written before the barrier's signal
        return g

    def layer_body(layer, g):
        for i, kind in enumerate(kinds):
            index = layer * len(kinds) + i - 1  # barriers before this projection, minus one
            if i == 0:
                @pl.when(layer > 0)
                def _(index=index) -> None:
                    grid_barrier(index)

                def first_layer(g, kind=kind):
                    return projection(layer, g, kind, True)

                def later_layer(g, kind=kind):
                    return projection(layer, g, kind, False)

                g = jax.lax.cond(layer == 0, first_layer, later_layer, g)
            else:
                grid_barrier(index)
                g = projection(layer, g, kind, False)
        return g

    jax.lax.fori_loop(0, layers, layer_body, jnp.int32(0))


def streaming_chain(h: Any, ws: dict[str, Any], *, programs: int, stages: int = 12,
                    barrier: str = "one", max_bn: int = 16) -> Any:
    """The bare chain over every layer in one kernel (module doc).

    Args:
        h: ``[8, D]`` bf16 activation (row 0 the batch row).
        ws: ``{"in_t": [L, N_in, D], "o_t": [L, D, K_o], "gu_t": [L, N_gu, D],
            "down_t": [L, D, K_down]}`` stacked transposed bf16 weights, every K a multiple
            of :data:`BK` and every N of 64 (:func:`prepare` pads them); ``o`` reads the
            first ``K_o`` columns of ``in``'s output, ``down`` the first ``K_down`` of
            ``gu``'s.
        programs: the grid (at most one per SM on a GPU: all must be resident for the
            barriers); 1 under the Mosaic GPU interpreter.
        stages: slots of the weight ring.
        max_bn: the widest row tile (16 or 32; 8 where fewer tiles than programs): wider
            tiles mean fewer K steps a program but a less even share of the rows.
        barrier: the grid barrier: "one" (every program adds one to a count and waits for
            the total this barrier completes: one round trip through L2) or "two" (program
            0 waits for that total, then raises a second count the others wait on: two
            round trips, one poller of the first count).

    Returns:
        ``[8, D]``: ``h`` after the chain.

    Raises:
        ValueError: shapes outside the above, before any work.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from linearnexus.kernels.common import mosaic_chunk

    layers = ws["in_t"].shape[0]
    d = h.shape[1]
    if max_bn not in (16, 32):
        raise ValueError(f"max_bn: expected 16 or 32, got {max_bn}")
    kinds = _kinds(ws, programs, max_bn)
    widths = {"h": d, "y": ws["in_t"].shape[1], "g": ws["gu_t"].shape[1]}
    for kind in kinds:
        w = ws[kind.name]
        if (w.ndim != 3 or w.shape[0] != layers or kind.k % BK or kind.n % 64
                or kind.k > widths[kind.src] or kind.n != widths[kind.dst]):
            raise ValueError(f"ws[{kind.name!r}]: expected [L={layers}, {widths[kind.dst]} (a "
                             f"multiple of 64), K <= {widths[kind.src]}, a multiple of {BK}], "
                             f"got {list(w.shape)}")
    if h.ndim != 2 or h.shape[0] != ROWS or d % BK:
        raise ValueError(f"h: expected [{ROWS}, D] with D a multiple of {BK}, got "
                         f"{list(h.shape)}")
    if barrier not in ("one", "two"):
        raise ValueError(f"barrier: expected 'one' or 'two', got {barrier!r}")
    max_steps = max(kind.steps for kind in kinds)
    if not 2 <= stages <= 32 or max_steps > 32:
        raise ValueError(f"stages: expected 2..32 (and K <= 32 * {BK}), got {stages}")
    dtype = h.dtype
    swz = mosaic_chunk._swizzled(BK, dtype)
    tile_rows = tuple(sorted({kind.bn for kind in kinds}))  # one output tile buffer each
    scratch = (plgpu.SMEM((stages, max(tile_rows), BK), dtype, transforms=swz),
               plgpu.SMEM((ROWS * max_steps + WGMMA_M - ROWS, BK), dtype, transforms=swz),
               plgpu.Barrier(num_arrivals=1, num_barriers=stages),
               plgpu.Barrier(num_arrivals=1, num_barriers=max_steps),
               *(plgpu.SMEM((WGMMA_M, b), dtype) for b in tile_rows))
    kernel = functools.partial(_kernel, kinds=kinds, layers=layers, programs=programs,
                               stages=stages, barrier=barrier, tile_rows=tile_rows)
    out = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((ROWS, widths["h"]), dtype),
                  jax.ShapeDtypeStruct((ROWS, widths["y"]), dtype),
                  jax.ShapeDtypeStruct((ROWS, widths["g"]), dtype)),
        scratch_types=scratch, grid=(programs,), grid_names=("p",),
        compiler_params=mosaic_chunk.compiler_params(),
        **mosaic_chunk.interpret_kwargs())(h, *(ws[name] for name, _, _ in KINDS))
    return out[0]


def prepare(h: Any, ws: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """``gemv_gpu.py --bare``'s operands in :func:`streaming_chain`'s form, built once:
    ``h [1, D]`` as ``[8, Dp]`` rows, the per-layer ``W^T`` stacked ``[L, N, K]``, zero-padded
    where the kernel needs it: D to a multiple of :data:`BK` (``Dp``), every K to a multiple
    of :data:`BK`, every N to a multiple of 64 (TMA reads the activations in 64-column
    tiles of the whole buffer; ``in``'s and ``gu``'s N at least as wide as
    ``o``'s and ``down``'s padded K). At the benchmark's size only ``down``'s K grows (2752
    -> 2816: 0.5% more weight bytes in all)."""
    d = h.shape[1]
    dp = -(-d // BK) * BK

    def padded(w, n_to, k_to):  # [L, N, K] zero-padded to [L, n_to, k_to]
        return jnp.pad(w, ((0, 0), (0, n_to - w.shape[1]), (0, k_to - w.shape[2])))

    def up(x, m):
        return -(-x // m) * m

    stacked = {name: jnp.stack([w[name] for w in ws]) for name, _, _ in KINDS}  # L x [N, K]
    k_o, k_down = up(stacked["o_t"].shape[2], BK), up(stacked["down_t"].shape[2], BK)
    # y and g at least as wide as o's and down's padded K (their extra columns are zero)
    n_in = max(up(stacked["in_t"].shape[1], 64), k_o)
    n_gu = max(up(stacked["gu_t"].shape[1], 64), k_down)
    out = {"in_t": padded(stacked["in_t"], n_in, dp), "o_t": padded(stacked["o_t"], dp, k_o),
           "gu_t": padded(stacked["gu_t"], n_gu, dp),
           "down_t": padded(stacked["down_t"], dp, k_down)}
    h8 = jnp.zeros((ROWS, dp), h.dtype).at[:1, :d].set(h)  # [8, Dp]
    return h8, out
