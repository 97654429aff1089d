"""A persistent one-row matmul chain: a whole decode step's projections in ONE kernel.

An experiment for issue 23 (batch-1 decoding within 2x of the weight-read time). A batch-1
step today is ~60 dependent kernels, each paying its launch, the latency of its first
loads from HBM and the drain of its grid; the projections alone run at ~1.8x their bytes'
time as separate Triton kernels (``benchmarks/gemv_gpu.py --bare``, ``lib``). Here one
Pallas (Triton) kernel of ``P`` programs (one per SM: all resident at once) runs the bare
chain's 4 projections x L layers, and the programs meet at a **grid barrier** between
projections: a counter in global memory that each program increments (an
``atomic_add``, acquire-release at GPU scope, after a CTA barrier so that every thread's
stores precede it) and then polls until all ``P`` have arrived. With ``prefetch`` each
program loads its first weight tile of the next projection *before* it waits (weights do
not depend on the previous projection), so the HBM stays busy while the slowest program
finishes: what programmatic dependent launch would give separate kernels.

Layout: ``W^T [L, N, K]`` stacked per projection kind (contiguous rows); program ``p``
owns row tiles ``p, p + P, p + 2P, ...`` of ``bn`` rows and reads each in ``BK``-wide
column chunks (float32 sums, the result rounded to the activation dtype); activations
travel through ``[1, W]`` buffers in global memory (volatile loads: never a stale L1 line
of an earlier layer).

The barrier is the library's (``kernels/fused_decode/persistent.py``, whose persistent
layer kernel grew from this experiment). A poll that spins ``SPIN_LIMIT`` times (programs
not all resident) sets the counter's ``RELEASE`` bit, which frees every later barrier at
once; :func:`persistent_chain` returns the counter's final value, and the benchmark
reports a run whose counter is not ``P x phases`` as failed (wrong results, no hang).

Off a GPU (Pallas interpret mode, where programs run one after another) ``virtual=True``
runs the ``P`` programs' work in turn inside each phase, without barriers: the same tile
and index arithmetic, checked against XLA in ``tests/test_toolbox.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from linearnexus.kernels.fused_decode.persistent import arrive, wait

F32 = jnp.float32
BK = 1024  # columns per chunk of a row tile (a power of two; the last chunk masked)

# the bare chain's projections per layer, as (weight name, source buffer, sink buffer):
# in: h -> y, o: y[:, :K] -> h, gu: h -> g, down: g[:, :K] -> h (benchmarks/gemv_gpu.py)
PHASES = (("in_t", "h", "y"), ("o_t", "y", "h"), ("gu_t", "h", "g"), ("down_t", "g", "h"))


def _chunks(k: int) -> list[tuple[int, int, int]]:
    """``(start, width, first)`` per column chunk of a length-``k`` contraction: ``width``
    is a power of two (``BK``, or the largest below ``k``), and the last chunk starts at
    ``k - width`` (static slices must stay in bounds), masked to its columns ``>= first``
    (the ones no earlier chunk covered)."""
    width = BK if k >= BK else 1 << (k.bit_length() - 1)
    return [(min(c * width, k - width), width, c * width) for c in range(pl.cdiv(k, width))]


def _load(ref, *, fresh: bool = False, **kw):
    """``plt.load``; ``fresh``: a volatile load (``ld.volatile``: coherent, never an L1
    line, for data other programs wrote). Not ``.cg``: JAX 0.10-0.11's Triton lowering
    accepts the name ".cg" and then looks up "cg", so every cache modifier fails."""
    return plt.load(ref, volatile=fresh, **kw)


def _kernel(h0_ref, count0_ref, *refs, dims, programs: int, bn: int, layers: int,
            prefetch: bool, virtual: bool):
    """``refs``: the four stacked weights (PHASES order), then the outputs: counter, and
    the ``h``, ``y``, ``g`` buffers (``h`` aliased to ``h0``)."""
    del h0_ref, count0_ref  # aliased to the counter and h outputs, read through them
    weights = dict(zip([name for name, _, _ in PHASES], refs[:4], strict=True))
    counter_ref = refs[4]
    bufs = {"h": refs[5], "y": refs[6], "g": refs[7]}

    def first_tile(pid, phase: int, layer):
        """The weight chunks of program ``pid``'s first row tile in ``phase``:
        ``[chunks] x [bn, BK]`` (bf16, masked past N and K)."""
        name, _, _ = PHASES[phase]
        n, k = dims[name]
        rows = pid * bn + jnp.arange(bn)
        out = []
        for start, width, first in _chunks(k):
            mask = (rows[:, None] < n) & (start + jnp.arange(width) >= first)[None, :]
            out.append(_load(weights[name].at[layer, pl.ds(pid * bn, bn), pl.ds(start, width)],
                             mask=mask, other=0.0))  # [bn, width]
        return tuple(out)

    def work(pid, phase: int, layer, pre):
        """Program ``pid``'s row tiles of ``phase``: sink[t] = W^T[t] . source (float32)."""
        name, src, dst = PHASES[phase]
        n, k = dims[name]
        chunks = _chunks(k)
        x = []
        for start, width, first in chunks:  # the source row, from L2 (other programs wrote it)
            cols = start + jnp.arange(width)
            x.append(_load(bufs[src].at[pl.ds(0, 1), pl.ds(start, width)], fresh=True,
                           mask=(cols >= first)[None], other=0.0)[0].astype(F32))  # [width]
        for j in range(pl.cdiv(pl.cdiv(n, bn), programs)):  # round j: tile pid + j P
            t = pid + j * programs
            rows = t * bn + jnp.arange(bn)
            acc = jnp.zeros((bn,), F32)
            for c, (start, width, first) in enumerate(chunks):
                if j == 0 and pre is not None:
                    w = pre[c]
                else:
                    cols = start + jnp.arange(width)
                    mask = (rows[:, None] < n) & (cols >= first)[None, :]
                    w = _load(weights[name].at[layer, pl.ds(t * bn, bn), pl.ds(start, width)],
                              mask=mask, other=0.0)  # [bn, width]
                acc = acc + jnp.sum(w.astype(F32) * x[c][None, :], axis=1)  # [bn]
            out = bufs[dst]
            plt.store(out.at[pl.ds(0, 1), pl.ds(t * bn, bn)],
                      acc.astype(out.dtype)[None], mask=(rows < n)[None])

    if virtual:  # programs in turn (interpret mode): no barriers
        def layer_body(layer, carry):
            for phase in range(len(PHASES)):
                def one(pid, c, phase=phase):
                    work(pid, phase, layer, first_tile(pid, phase, layer) if prefetch else None)
                    return c
                jax.lax.fori_loop(0, programs, one, 0)
            return carry

        jax.lax.fori_loop(0, layers, layer_body, 0)
        return

    pid = pl.program_id(0)
    n_phases = len(PHASES)

    def layer_body(layer, pre):
        for phase in range(n_phases):
            work(pid, phase, layer, pre)
            arrive(counter_ref)
            step = layer * n_phases + phase + 1  # phases finished by every program after this
            nxt_phase, nxt_layer = (phase + 1) % n_phases, layer + (phase + 1) // n_phases
            pre = (first_tile(pid, nxt_phase, jnp.minimum(nxt_layer, layers - 1))
                   if prefetch else None)  # issued before the wait: weights need no inputs
            wait(counter_ref, step * programs)
        return pre

    pre = first_tile(pid, 0, 0) if prefetch else None
    if prefetch:
        jax.lax.fori_loop(0, layers, layer_body, pre)
    else:
        def no_pre(layer, c):
            layer_body(layer, None)
            return c
        jax.lax.fori_loop(0, layers, no_pre, 0)


def persistent_chain(h, ws: dict, *, programs: int, bn: int = 8, warps: int = 4,
                     prefetch: bool = True, virtual: bool = False):
    """The bare chain (``gemv_gpu.bare_chain``) over every layer in one kernel.

    Args:
        h: ``[1, D]`` activation (bf16).
        ws: ``{"in_t": [L, N_in, D], "o_t": [L, D, K_o], "gu_t": [L, N_gu, D],
            "down_t": [L, D, K_down]}`` stacked transposed weights; ``o`` reads the first
            ``K_o`` columns of ``in``'s output, ``down`` the first ``K_down`` of ``gu``'s.
        programs: the grid (one program per SM on a GPU: they must all be resident);
            with ``virtual`` the number of programs run in turn.
        bn: rows of ``W^T`` per tile; warps: per program; prefetch: load the next phase's
            first tile before each barrier's wait.

    Returns:
        ``(h [1, D], counter [1] int32)``: the counter is ``programs * 4 * L`` on a healthy
        run (barriers do not count in ``virtual`` mode: 0 there).
    """
    from linearnexus.kernels.common.pallas import compiler_params

    names = [name for name, _, _ in PHASES]
    layers = ws["in_t"].shape[0]
    dims = {name: tuple(ws[name].shape[1:]) for name in names}
    widths = {"h": h.shape[1], "y": dims["in_t"][0], "g": dims["gu_t"][0]}
    expect = {"in_t": ("h", "y"), "o_t": ("y", "h"), "gu_t": ("h", "g"), "down_t": ("g", "h")}
    for name, (src, dst) in expect.items():
        n, k = dims[name]
        if k > widths[src] or n != widths[dst] or ws[name].shape[0] != layers:
            raise ValueError(f"ws[{name!r}]: expected [L={layers}, {widths[dst]}, <= "
                             f"{widths[src]}], got {list(ws[name].shape)}")
    kernel = functools.partial(_kernel, dims=dims, programs=programs, bn=bn, layers=layers,
                               prefetch=prefetch, virtual=virtual)
    count0 = jnp.zeros((1,), jnp.int32)
    outs = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct(h.shape, h.dtype),
                   jax.ShapeDtypeStruct((1, widths["y"]), h.dtype),
                   jax.ShapeDtypeStruct((1, widths["g"]), h.dtype)),
        grid=(1 if virtual else programs,),
        input_output_aliases={0: 1, 1: 0},  # h0 -> the h buffer, zeros -> the counter
        interpret=virtual and jax.default_backend() != "gpu",
        compiler_params=compiler_params(warps, 1),
    )(h, count0, *(ws[name] for name in names))
    counter, h_out, _, _ = outs
    return h_out, counter
