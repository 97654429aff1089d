"""GLA's ``mosaic`` backend: a Mosaic GPU (Hopper, sm_90+) chunk walk for a log-gate per key
dimension, between GLA's Triton preparation and its Triton backward.

Per chunk of L = 64 tokens, entering with the state ``S_c [K, V]`` (float32 registers), with
``b`` the compensated in-chunk inclusive sum of the log-gates (a vector over K per token)::

    o       = scale [ (q e^{b}) S_c + A v ]          A_ij = sum_k q_ik k_jk e^{b_ik - b_jk}
    S_{c+1} = diag(e^{b_L}) S_c + (k e^{b_L - b})^T v

The decay of ``A`` differs per key dimension, so it is not one ``[L, L]`` mask on ``q k^T``
as in simple GLA (``mosaic_chunk.py``). The parts that need that care stay in GLA's Triton
kernels (``gla/pallas.py``), run once per chunk in parallel:

* ``sums``: the compensated in-chunk sums ``b = hi + lo``;
* ``fwd_a``: ``A`` (float32, one factored matmul per chunk or by sub-chunks where the decay
  is strong), and here also the walk's decayed operands in the input dtype: ``q e^{b}`` and
  ``k e^{b_L - b}`` (both factors <= 1, so bf16 keeps their relative precision; the Triton
  ``fwd_o`` / ``fwd_h`` round them the same way).

The Mosaic GPU kernel then replaces Triton's ``fwd_h`` and ``fwd_o`` (which store every
chunk's state to HBM and read it back) with one walk per (value block, head, row), the state
never leaving registers. Per chunk: the bf16 state tile to SMEM; ``wgmma`` ``(q e^b) S_c``;
``A`` (in the input dtype, as ``fwd_o`` rounds it: the plain forward's ``fwd_a`` stores it so,
the gradient's in float32 for the backward) as the register operand of
``o += A v``; ``S = e^{b_L} S + (k e^{b_L - b})^T v`` with a transposed SMEM view of the
decayed keys, and ``e^{b_L}`` a float32 row per chunk.

Backward: GLA's Triton backward (``gla/pallas.py``: ``bwd_dh``, ``bwd_da``, ``bwd_dv``,
``bwd_dqk`` and its walk, ``dg``), fed by the residuals it expects; under a gradient the walk
stores every chunk's entering state (the bf16 tile of the ``(q e^b) S_c`` matmul becomes a
pipeline output slot, as simple_gla's ``store_states``), so Triton's ``fwd_h`` is not re-run.
With :data:`BWD_WALK_ENV` (opt-in until timed) ``bwd_dh`` and ``bwd_dv`` are one Mosaic GPU
reverse walk instead (:func:`gla_state_grad`).

Scope: bf16 / f16, chunk 64, key dims padded to 64 or 128, batch rows and packed sequences
(``cu_seqlens``). Anything else raises ``NotImplementedError`` and the dispatcher moves on to
``pallas``. Checked in JAX 0.11's Mosaic GPU interpreter on the CPU
(``tests/test_mosaic_gla.py``), lowered for CUDA in CI, and on an H100 (2026-12-05,
``kernels_gpu.py``, bf16: dense and packed, T = 63 / 1000, D = 64 / 128, worst 3.0e-3;
float16 only in the interpreter). Timed there
at (8, 4096, 16, 128) and (2, 16384, 16, 128): forward 0.78x / 0.76x the Triton kernels'
time, forward + backward 0.97x / 0.92x (docs/benchmarks.md); with :func:`default_gla_config`'s
value blocks of 128 and one-stage storing walk, 1.425 / 4.863 ms at the first shape against
pallas's 1.876 / 5.342 in the same run. So automatic dispatch takes it first on sm_90;
``LINEARNEXUS_MOSAIC_GLA=0`` (:data:`OPT_IN_ENV`) keeps it out.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common.mosaic_chunk import (
    HOPPER_SMS,
    REDUCTION_SCRATCH,
    SMEM_LIMIT,
    MosaicConfig,
    MosaicStatic,
    _chunk_flags,
    _enter,
    _leave,
    _load,
    _state_out,
    _swizzled,
    _transposed,
    check_layout,
    compiler_params,
    deepest_stages,
    env_switch,
    initial_carry,
    interpret_kwargs,
    lowered_once,
    operand_swizzle,
    pass_empty,
    program_grid,
    state_grad_carry,
    triton_layout,
    wgmma_onto,
    wgmma_regs,
)
from linearnexus.kernels.common.mosaic_ops import (
    _chunk_inputs,
    _n_seqs,
    _packed_layout,
    check_mosaic_call,
    decline_unless_packed_fits,
)
from linearnexus.kernels.common.pallas import TritonConfig
from linearnexus.kernels.common.pallas_ops import _layout, _pad_last, _static, _unlayout
from linearnexus.kernels.gla import pallas as gla_pallas

F32 = jnp.float32
#: the chunk the kernel takes: the float32 ``A`` tile is ``[L, L]`` (16 KB a pipeline slot at
#: 64; 64 KB at 128, which leaves no room for a second stage)
CHUNK = 64
#: "0" keeps GLA's mosaic backend out of automatic dispatch ("1" puts it in when
#: :data:`AUTOMATIC` is off); by name it always runs
OPT_IN_ENV = "LINEARNEXUS_MOSAIC_GLA"
#: automatic without the variable: yes. Checked on an H100 and faster than the Triton
#: kernels there at K = 128 (forward 0.76-0.78x, forward + backward 0.92-0.97x, bf16,
#: (8, 4096, 16, 128) and (2, 16384, 16, 128), 2026-12-05); K = 64 not timed yet
AUTOMATIC = True
#: "1": GLA's gradient walks its state gradient on Mosaic GPU (:func:`gla_state_grad`: the
#: Triton ``bwd_dh`` and ``bwd_dv`` as one walk), "0" the Triton kernels; unset:
#: :data:`BWD_WALK`
BWD_WALK_ENV = "LINEARNEXUS_MOSAIC_GLA_BWD"
#: off until timed on a GPU: checked against the Triton backward in JAX 0.11's Mosaic GPU
#: interpreter (tests/test_mosaic_gla.py) and lowered for CUDA on 0.10 and 0.11
BWD_WALK = False
#: the feature table's note on the backend
MOSAIC_STATUS = ("sm_90+, batches and packed sequences: Triton preparation (A, decayed q / k), "
                 "Mosaic GPU forward walk, Triton backward; checked on an H100; "
                 "LINEARNEXUS_MOSAIC_GLA=0 keeps it out of automatic dispatch")


def gla_opted_in() -> bool:
    """Whether automatic dispatch may pick GLA's Mosaic kernel (:data:`OPT_IN_ENV`)."""
    return env_switch(OPT_IN_ENV, AUTOMATIC)


def gla_smem_bytes(*, key_dim: int, block_v: int, stages: int, itemsize: int = 2,
                   store_states: bool = False, packed: bool = False) -> int:
    """Shared memory one program of the walk asks for: ``stages`` pipeline slots of the
    decayed q and k (``[L, K]``), v and o (``[L, BV]``), ``A`` (``[L, L]``: float32 storing
    the states, else in the inputs' dtype), the
    ``e^{b_L}`` row (``[K]`` float32) and, storing the states, the state tile; otherwise one
    bf16 state tile as scratch. ``packed``: the float32 ``[K, BV]`` staging tile of each
    sequence's initial and final state. The initial / final state of batch rows goes through
    a scoped float32 tile before and after the pipeline, in its space."""
    L, K, BV = CHUNK, key_dim, block_v
    state_tile = K * BV * itemsize
    # A: float32 under a gradient (the Triton backward reads it), else in the inputs' dtype
    # (the walk rounds it to that dtype for its wgmma either way)
    per_stage = (2 * L * K + 2 * L * BV) * itemsize + L * L * (4 if store_states else itemsize)
    per_stage += K * 4
    per_stage += state_tile if store_states else 0
    scratch = (0 if store_states else state_tile) + (K * BV * 4 if packed else 0)
    scratch += REDUCTION_SCRATCH  # the row sums of q's marks (the api's guard)
    return scratch + max(stages * per_stage, K * BV * 4)


def default_gla_config(*, rows: int, heads: int, key_dim: int, value_dim: int, n_chunks: int,
                       itemsize: int = 2, packed: bool = False, block_v: int | None = None,
                       stages: int | None = None) -> MosaicConfig:
    """The heuristic: chunk 64, the Triton backward, and, from the walk timed alone on an H100
    at (8, 4096, 16, 128) (``benchmarks/gla_profile_gpu.py``, 2026-12-05: block_v 64 at 1 / 2
    / 3 stages 0.265 / 0.389 / 0.388 ms, block_v 128 at 1 / 2 stages 0.256 / 0.244; storing
    the states 0.409 / 0.515 at block_v 64, 0.350 / 0.361 at 128):

    * value blocks of 128 at K = 128 when a block of 128 still gives nearly one program per
      SM (``V / 128 * rows * heads >= 0.9 * 132``: each program then loads q, k and ``A``
      once, not once per value block of 64), else of 64 (more programs: a long walk on few
      heads needs them, unmeasured; K = 64 is not timed);
    * stages of the plain forward: one when the grid has more programs than SMs and the walk
      is long (two programs then share each SM and overlap each other's dependent chains),
      else the deepest of 3 that fits (2 for walks of fewer than 8 chunks);
    * ``bwd_stages`` (the forward that stores the states under a gradient): one where the
      grid has at least half as many programs as SMs (timed above at 256 and 128 programs),
      else two where they fit: with fewer programs no second one shares an SM to hide the
      chain, and at (2, 16384, 16, 128) (64 programs of block_v 64) forward + backward took
      5.218 ms with the two-stage storing walk against 5.642 at one stage, the plain
      forward unchanged (1.511 / 1.516 ms; H100, 2026-12-05, pallas 5.658 / 5.675 in the
      same runs).

    ``block_v`` given (a call's own): the stages are sized for it; ``stages`` given: value
    blocks of 128 only where that depth fits them."""
    def fits(depth: int, bv: int | None = None) -> bool:
        return gla_smem_bytes(key_dim=key_dim, block_v=bv or block_v, stages=depth,
                              itemsize=itemsize, packed=packed) <= SMEM_LIMIT

    if block_v is None:
        wide = (key_dim == 128 and value_dim % 128 == 0
                and (value_dim // 128) * rows * heads >= 0.9 * HOPPER_SMS
                and (stages is None or fits(stages, 128)))
        block_v = 128 if wide else min(64, value_dim)

    depth = 3 if n_chunks >= 8 and fits(3) else 2 if fits(2) else 1
    programs = (value_dim // block_v) * rows * heads
    if n_chunks >= 8 and programs > HOPPER_SMS:
        depth = 1
    store_fits = gla_smem_bytes(key_dim=key_dim, block_v=block_v, stages=2, itemsize=itemsize,
                                store_states=True, packed=packed) <= SMEM_LIMIT
    bwd = 2 if 2 * programs < HOPPER_SMS and store_fits else 1
    return MosaicConfig(chunk=CHUNK, block_v=block_v, stages=depth, backward="pallas",
                        bwd_stages=bwd)


def gradient_stages(cfg: MosaicConfig, *, key_dim: int, itemsize: int = 2,
                    packed: bool = False) -> int:
    """The pipeline depth of the walk under a gradient (it stores the chunk states):
    ``cfg.bwd_stages``, else the deepest of 1-3 that fits shared memory."""
    return cfg.bwd_stages or deepest_stages(lambda s: gla_smem_bytes(
        key_dim=key_dim, block_v=cfg.block_v, stages=s, itemsize=itemsize, store_states=True,
        packed=packed) <= SMEM_LIMIT, 3)


def check_gla_config(cfg: MosaicConfig, *, key_dim: int, value_dim: int,
                     packed: bool = False) -> None:
    """Raise ``ValueError`` naming ``config`` for knobs GLA's kernel does not take (``cfg``
    resolved: no None field but ``bwd_stages`` / ``dqk_stages``)."""
    if cfg.backward != "pallas":
        raise ValueError(f"config: backward={cfg.backward!r}: GLA's mosaic backend runs the "
                         "Triton backward (backward='pallas'; its state walk on Mosaic GPU is "
                         "LINEARNEXUS_MOSAIC_GLA_BWD=1)")
    if cfg.dqk_stages is not None:
        raise ValueError("config: dqk_stages sets a Mosaic backward kernel, which GLA's mosaic "
                         "backend does not run; leave it None")
    if cfg.seq_split not in (None, 1) or cfg.seq_split_grad:
        raise ValueError(f"config: seq_split={cfg.seq_split} (seq_split_grad="
                         f"{cfg.seq_split_grad}) is simple_gla's; GLA's mosaic "
                         "backend walks each sequence whole: leave it None")
    for knob in ("fused_wy", "fused_grad"):
        if getattr(cfg, knob):
            raise ValueError(f"config: {knob}=True is a knob of the delta rules' kernel (the WY "
                             "products in the walk); GLA has no WY form: leave it None")
    if cfg.block_v not in (64, 128) or value_dim % cfg.block_v:
        raise ValueError(f"config: block_v={cfg.block_v} must be 64 or 128 and divide the padded "
                         f"value dim {value_dim}")
    # the gradient's depth as the walk will resolve it (bwd_stages, else the deepest that
    # fits, down to one stage, which must fit too)
    depths = (("stages", cfg.stages, False),
              ("bwd_stages", gradient_stages(cfg, key_dim=key_dim, packed=packed), True))
    for name, stages, stored in depths:
        if stages is None:
            continue
        need = gla_smem_bytes(key_dim=key_dim, block_v=cfg.block_v, stages=stages,
                              store_states=stored, packed=packed)
        if need > SMEM_LIMIT:
            what = (f"{name}={stages}" if name == "stages" or cfg.bwd_stages else
                    f"the walk under a gradient (storing the states) at {stages} stage(s)")
            raise ValueError(f"config: {what}, block_v={cfg.block_v} at K={key_dim} "
                             f"needs {need} bytes of shared memory, over the {SMEM_LIMIT} a "
                             "block may use; use fewer stages or block_v=64")


def _walk_kernel(*refs, st: MosaicStatic, dtype: Any, store_states: bool) -> None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    packed = c.packed
    n_in = 6 + 2 * packed
    qe_ref, ke_ref, v_ref, a_ref, e_ref, h0_ref = refs[:6]
    seq_ref, flag_ref = refs[6:8] if packed else (None, None)
    o_ref, final_ref = refs[n_in:n_in + 2]
    rest = refs[n_in + 2:]
    h_ref, rest = (rest[0], rest[1:]) if store_states else (None, rest)
    s_scratch, rest = (None, rest) if store_states else (rest[0], rest[1:])
    seq_smem, rest = (rest[0], rest[1:]) if packed else (None, rest)
    (bar,) = rest
    L, K, BV = c.chunk, c.key_dim, st.block_v
    wgmma_layout = plgpu.Layout.WGMMA
    rows_layout = wgmma_layout.reduce(1)
    iv, h, r = jax.lax.axis_index("v"), jax.lax.axis_index("h"), jax.lax.axis_index("r")
    vs = pl.ds(iv * BV, BV)

    state0 = initial_carry(c, h0_ref, bar, r, h, vs, (K, BV))
    # q's finiteness, carried and added to the final state (the api's guard reads only that:
    # mosaic_chunk's "Finite outputs"); the state update's B operand is v itself, so the
    # [L] row sums travel in the carry rather than into the update as in mosaic_chunk. Not
    # reset where a packed sequence opens: the sequences after a bad q row end NaN too (the
    # guard reruns the whole call after any bad input either way)
    mark0 = plgpu.layout_cast(jnp.zeros((L,), F32), rows_layout)

    def body(idx, qe_smem, ke_smem, v_smem, a_smem, e_smem, o_smem, *rest):
        s_smem, carry = (rest[0], rest[1]) if store_states else (s_scratch, rest[0])
        state, mark = carry
        if packed:  # a chunk that opens a sequence enters with its initial state
            seq, opens, closes = _chunk_flags(seq_ref, flag_ref, r, idx[0])
            state = _enter(state, opens, seq_smem,
                           h0_ref.at[seq, h, :, vs] if c.has_h0 else None, bar)
        # S_c in the input dtype for the (q e^b) S_c matmul (and, stored, for the backward);
        # the float32 carry stays in registers
        s_smem[...] = state.astype(dtype)
        plgpu.commit_smem()

        def inter(acc):
            plgpu.wgmma(acc, qe_smem, s_smem)  # [L, K] @ [K, BV]
            return acc[...]

        qs = pl.run_scoped(inter, plgpu.ACC((L, BV), F32))
        mark = mark + jnp.sum(qs * 0.0, axis=1)  # [L]: 0, or NaN after a non-finite q row
        # A in the input dtype as the register operand of A v (Triton's fwd_o rounds it so;
        # the plain forward's fwd_a stores it rounded so)
        a = _load(a_smem, wgmma_layout).astype(dtype)  # [L, L]

        def intra(acc):
            wgmma_regs(acc, a, v_smem)  # registers [L, L] @ SMEM [L, BV]

        o = wgmma_onto(qs, intra)
        o_smem[...] = (o * c.scale).astype(dtype)

        # S e^{b_L} (a decay per state row) + (k e^{b_L - b})^T v
        e_row = _load(e_smem, rows_layout)  # [K]

        def update(acc):
            plgpu.wgmma(acc, _transposed(ke_smem), v_smem)  # [K, L] @ [L, BV]

        state = wgmma_onto(state * jax.lax.broadcast_in_dim(e_row, (K, BV), [0]), update)
        if packed:  # a chunk that closes a sequence leaves its final state
            _leave(state, closes, seq_smem, final_ref.at[seq, h, :, vs], mark)
        return state, mark

    in_specs = [
        plgpu.BlockSpec((L, K), lambda i: (i, 0), transforms=_swizzled(K, dtype)),  # q e^b
        plgpu.BlockSpec((L, K), lambda i: (i, 0), transforms=_swizzled(K, dtype)),  # k e^{bL-b}
        plgpu.BlockSpec((L, BV), lambda i: (i, 0), transforms=_swizzled(BV, dtype)),  # v
        plgpu.BlockSpec((L, L), lambda i: (i, 0), transforms=_swizzled(L, a_ref.dtype)),  # A
        plgpu.BlockSpec((K,), lambda i: (i,)),  # e^{b_L}
    ]
    ins = [qe_ref.at[r, :, h, :], ke_ref.at[r, :, h, :], v_ref.at[r, :, h, vs],
           a_ref.at[r, :, h, :], e_ref.at[r, h]]
    out_specs = [plgpu.BlockSpec((L, BV), lambda i: (i, 0), transforms=_swizzled(BV, dtype))]
    outs = [o_ref.at[r, :, h, vs]]
    if store_states:  # S_c of every chunk, [NC, K, BV] of h [R, NC, H, K, V]
        out_specs.append(plgpu.BlockSpec((None, K, BV), lambda i: (i, 0, 0),
                                         transforms=_swizzled(BV, dtype)))
        outs.append(h_ref.at[r, :, h, :, vs])
    pipeline = plgpu.emit_pipeline(body, grid=(c.n_chunks,), in_specs=in_specs,
                                   out_specs=out_specs, max_concurrent_steps=st.stages,
                                   init_carry=(state0, mark0))
    final, mark = pipeline(*ins, *outs)
    if not packed:
        _state_out(final + jnp.sum(mark), final_ref.at[r, h, :, vs])


@lowered_once("store_states")
def gla_walk(st: MosaicStatic, qe: Array, ke: Array, v: Array, a: Array, e_last: Array,
             h0: Array | None, *, store_states: bool = False,
             layout: tuple[Array, Array] | None = None
             ) -> tuple[Array, Array] | tuple[Array, Array, Array]:
    """Run the walk in the chunk layout.

    Args:
        st: static description (``st.core``: GLA's Triton core, ``gate="vector"``).
        qe, ke: ``[R, TP, H, K]`` ``q e^{b}`` and ``k e^{b_L - b}`` (bf16 / f16). v:
            ``[R, TP, H, V]``. a: ``[R, TP, H, L]`` (``fwd_a``): float32 with
            ``store_states`` (the backward's residual), else float32 or the inputs' dtype.
        e_last: ``[R, H, NC * K]`` float32, ``e^{b_L}`` of each chunk.
        h0: ``[N, H, K, V]`` float32 or None.
        store_states: also return every chunk's entering state.
        layout: ``(seq_info, flags)`` ``[R, NC]`` int32 for packed rows, else None.

    Returns:
        ``(o [R, TP, H, V] in qe's dtype, final [R or N, H, K, V] float32)``, and with
        ``store_states`` a third ``h [R, NC, H, K, V]`` in qe's dtype.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    R, NC, L, H, K, V = c.rows, c.n_chunks, c.chunk, c.heads, c.key_dim, c.value_dim
    check_layout(c, layout)
    dtype = qe.dtype
    if h0 is None:
        h0 = jnp.zeros((1, 1, K, V), F32)  # never read (core.has_h0 False); keeps one signature
    stages = st.stages
    if store_states:  # under a gradient: the state slots take shared memory
        stages = gradient_stages(MosaicConfig(block_v=st.block_v, bwd_stages=st.bwd_stages),
                                 key_dim=K, itemsize=jnp.dtype(dtype).itemsize,
                                 packed=c.packed)
    kernel = functools.partial(_walk_kernel, st=dataclasses.replace(st, stages=stages),
                               dtype=dtype, store_states=store_states)
    out_type = [jax.ShapeDtypeStruct((R, NC * L, H, V), dtype),
                jax.ShapeDtypeStruct((c.n_seqs if c.packed else R, H, K, V), F32)]
    scratch = []
    if store_states:
        out_type.append(jax.ShapeDtypeStruct((R, NC, H, K, V), dtype))
    else:
        scratch.append(plgpu.SMEM((K, st.block_v), dtype, transforms=_swizzled(st.block_v, dtype)))
    if c.packed:
        scratch.append(plgpu.SMEM((K, st.block_v), F32, transforms=_swizzled(st.block_v, F32)))
    scratch.append(plgpu.Barrier(num_barriers=1))
    f = plgpu.kernel(kernel, out_type=tuple(out_type), scratch_types=tuple(scratch),
                     **program_grid("v", V // st.block_v, heads=H, rows=R),
                     compiler_params=compiler_params(), **interpret_kwargs())
    return f(qe, ke, v, a, e_last, h0, *(() if layout is None else layout))


def state_grad_smem(*, key_dim: int, block_v: int, stages: int, itemsize: int = 2,
                    packed: bool = False) -> int:
    """Shared memory of one :func:`gla_state_grad` program: per stage the ``q e^b``, ``k
    e^{b_L - b}`` ``[L, K]`` tiles, ``do`` and ``dv`` ``[L, BV]``, ``dS`` ``[K, BV]`` in the
    inputs' dtype, ``A`` ``[L, L]`` float32 and the ``e^{b_L}`` row; the 16-bit ``A s``
    tile; for packed rows the float32 staging tile beside the pipeline (the scoped tile of
    ``dht`` / ``dh0`` otherwise reuses the pipeline's space)."""
    L, K, BV = CHUNK, key_dim, block_v
    per_stage = (2 * L * K + 2 * L * BV + K * BV) * itemsize + L * L * 4 + K * 4
    scratch = L * L * itemsize + (K * BV * 4 if packed else 0)
    return scratch + max(stages * per_stage, K * BV * 4)


def _state_grad_kernel(*refs, st: MosaicStatic, dtype: Any, stages: int, block_v: int) -> None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    packed = c.packed
    refs = list(refs)
    bar = refs.pop()
    seq_smem = refs.pop() if packed else None
    a16_smem = refs.pop()
    dv_ref, dh_ref, dh0_ref = refs[-3:]
    refs = refs[:-3]
    seq_ref, flag_ref = (refs.pop(-2), refs.pop()) if packed else (None, None)
    qe_ref, ke_ref, do_ref, a_ref, e_ref, dht_ref = refs
    L, K, BV, NC = c.chunk, c.key_dim, block_v, c.n_chunks
    cap = operand_swizzle(BV, dtype)  # every wgmma operand at one swizzle (64 B at BV = 32)
    wgmma_layout = plgpu.Layout.WGMMA
    rows_layout = wgmma_layout.reduce(1)
    iv, h, r = jax.lax.axis_index("v"), jax.lax.axis_index("h"), jax.lax.axis_index("r")
    vs = pl.ds(iv * BV, BV)
    ds0 = state_grad_carry(c, dht_ref, bar, r, h, vs, (K, BV))

    def back(i):  # chunks in reverse
        return NC - 1 - i

    def body(idx, qe_smem, ke_smem, do_smem, a_smem, e_smem, dv_smem, dh_smem, ds):
        if packed:  # the chunk that closes a sequence enters with its final state's gradient
            seq, opens, closes = _chunk_flags(seq_ref, flag_ref, r, back(idx[0]))
            ds = _enter(ds, closes, seq_smem, dht_ref.at[seq, h, :, vs], bar)
        # dS_{c+1} in the input dtype: out for bwd_dqk (Triton's bwd_dh stores it so) and the
        # B operand of (k e^{b_L - b}) dS; A s in the input dtype, as Triton's bwd_dv rounds it
        dh_smem[...] = ds.astype(dtype)
        a16_smem[...] = (_load(a_smem, wgmma_layout) * c.scale).astype(dtype)  # [L, L]
        plgpu.commit_smem()

        def values(acc):
            plgpu.wgmma(acc, ke_smem, dh_smem)  # [L, K] @ [K, BV]
            plgpu.wgmma(acc, _transposed(a16_smem), do_smem)  # [L, L] @ [L, BV]: (A s)^T do
            return acc[...]

        dv = pl.run_scoped(values, plgpu.ACC((L, BV), F32))
        dv_smem[...] = dv.astype(dtype)
        e_row = _load(e_smem, rows_layout)  # [K], e^{b_L}

        def update(acc):  # dS_c = s (e^{b_L} dS_{c+1} / s + (q e^b)^T do)
            plgpu.wgmma(acc, _transposed(qe_smem), do_smem)  # [K, L] @ [L, BV]

        # the scale as two float32 factors rather than on a rounded copy of do (Triton's
        # bwd_dh scales the float32 product)
        decay = jax.lax.broadcast_in_dim(e_row * (1.0 / c.scale), (K, BV), [0])
        ds = wgmma_onto(ds * decay, update) * c.scale
        if packed and c.has_h0:  # the chunk that opens a sequence leaves dS_c as its dh0
            _leave(ds, opens, seq_smem, dh0_ref.at[seq, h, :, vs])
        return ds

    key_tile = _swizzled(K, dtype, cap)
    value_tile = _swizzled(BV, dtype, cap)
    in_specs = [
        plgpu.BlockSpec((L, K), lambda i: (back(i), 0), transforms=key_tile),  # q e^b
        plgpu.BlockSpec((L, K), lambda i: (back(i), 0), transforms=key_tile),  # k e^{b_L - b}
        plgpu.BlockSpec((L, BV), lambda i: (back(i), 0), transforms=value_tile),  # do
        plgpu.BlockSpec((L, L), lambda i: (back(i), 0), transforms=_swizzled(L, F32)),  # A
        plgpu.BlockSpec((K,), lambda i: (back(i),)),  # e^{b_L}
    ]
    out_specs = [
        plgpu.BlockSpec((L, BV), lambda i: (back(i), 0), transforms=value_tile),  # dv
        plgpu.BlockSpec((None, K, BV), lambda i: (back(i), 0, 0), transforms=value_tile),  # dh
    ]
    pipeline = plgpu.emit_pipeline(body, grid=(NC,), in_specs=in_specs, out_specs=out_specs,
                                   max_concurrent_steps=stages, init_carry=ds0)
    ds_first = pipeline(qe_ref.at[r, :, h, :], ke_ref.at[r, :, h, :], do_ref.at[r, :, h, vs],
                        a_ref.at[r, :, h, :], e_ref.at[r, h], dv_ref.at[r, :, h, vs],
                        dh_ref.at[r, :, h, :, vs])
    if not packed:
        _state_out(ds_first, dh0_ref.at[r, h, :, vs])


def state_grad_block_v(st: MosaicStatic) -> int:
    """The walk's value block: the shared reverse walk's (``mosaic_bwd.state_block_v``)."""
    from linearnexus.kernels.common.mosaic_bwd import state_block_v

    c = st.core
    return state_block_v(rows=c.rows, heads=c.heads, value_dim=c.value_dim,
                         n_chunks=c.n_chunks, packed=c.packed)


def state_grad_fits(st: MosaicStatic, itemsize: int = 2) -> bool:
    """Whether :func:`gla_state_grad` runs this call: value dims a multiple of its block, and
    one pipeline stage fitting shared memory."""
    bv = state_grad_block_v(st)
    return st.core.value_dim % bv == 0 and state_grad_smem(
        key_dim=st.core.key_dim, block_v=bv, stages=1, itemsize=itemsize,
        packed=st.core.packed) <= SMEM_LIMIT


@lowered_once()
def gla_state_grad(st: MosaicStatic, qe: Array, ke: Array, do: Array, a: Array,
                   e_last: Array, dfinal: Array, layout: tuple[Array, Array] | None = None
                   ) -> tuple[Array, Array, Array]:
    """GLA's reverse walk on Mosaic GPU: the state gradient carried in registers from chunk to
    chunk (``dS_c = e^{b_L} dS_{c+1} + s (q e^b)^T do``) and the value gradient
    (``dv = (k e^{b_L - b}) dS_{c+1} + (A s)^T do``, complete here), the Triton ``bwd_dh``
    and ``bwd_dv`` in one pass, rounding at the same points (``dS_{c+1}`` and ``A s`` to
    qe's dtype). Packed rows without an initial state leave ``dh0`` unwritten (no caller
    reads it).

    Args:
        st: static description (``st.core``: GLA's Triton core). qe, ke: ``[R, TP, H, K]``
            ``q e^{b}`` and ``k e^{b_L - b}`` (``fwd_a``'s, bf16 / f16). do: ``[R, TP, H, V]``.
            a: ``[R, TP, H, L]`` float32 (``fwd_a``). e_last: ``[R, H, NC * K]`` float32.
            dfinal: ``[N, H, K, V]``, the final state's gradient.
        layout: ``(seq_info, flags)`` for packed rows, else None.

    Returns:
        ``(dv [R, TP, H, V], dh [R, NC, H, K, V] (dS_{c+1} per chunk), both in qe's dtype,
        dh0 [R or N, H, K, V] float32)``; packed: ``dh0`` holds only the sequences that own
        a chunk, and only with an initial state.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    R, NC, L, H, K, V = c.rows, c.n_chunks, c.chunk, c.heads, c.key_dim, c.value_dim
    check_layout(c, layout)
    dtype = qe.dtype
    bv = state_grad_block_v(st)
    stages = deepest_stages(lambda s: state_grad_smem(
        key_dim=K, block_v=bv, stages=s, itemsize=jnp.dtype(dtype).itemsize,
        packed=c.packed) <= SMEM_LIMIT, 3)
    cap = operand_swizzle(bv, dtype)
    scratch = [plgpu.SMEM((L, L), dtype, transforms=_swizzled(L, dtype, cap))]  # A s
    if c.packed:
        scratch.append(plgpu.SMEM((K, bv), F32, transforms=_swizzled(bv, F32)))
    return plgpu.kernel(
        functools.partial(_state_grad_kernel, st=st, dtype=dtype, stages=stages, block_v=bv),
        out_type=(jax.ShapeDtypeStruct((R, NC * L, H, V), dtype),
                  jax.ShapeDtypeStruct((R, NC, H, K, V), dtype),
                  jax.ShapeDtypeStruct((c.n_seqs if c.packed else R, H, K, V), F32)),
        scratch_types=(*scratch, plgpu.Barrier(num_barriers=1)),
        **program_grid("v", V // bv, heads=H, rows=R),
        compiler_params=compiler_params(),
        **interpret_kwargs(),
    )(qe, ke, do.astype(dtype), a, e_last, dfinal.astype(F32),
      *(() if layout is None else layout))


def _decay_rows(b: Array, chunk: int) -> Array:
    """``e^{b_L}`` per chunk as the walk reads it, ``[R, H, NC * K]`` float32, from each
    chunk's last row of ``b [R, TP, H, K]`` (hi)."""
    R, TP, H, K = b.shape
    last = b.reshape(R, TP // chunk, chunk, H, K)[:, :, -1]  # [R, TP, H, K] -> [R, NC, H, K]
    return jnp.exp(jnp.transpose(last, (0, 2, 1, 3))).reshape(R, H, -1)  # [R, H, NC * K]


def _forward(st: MosaicStatic, q, k, v, g, h0, layout, *, store_states: bool):
    core = st.core
    # sums and fwd_a as two Triton kernels: one fused (the sums kept in registers, stored
    # only where read) was 2x slower on an H100, 2026-12-05 (docs/mosaic.md)
    b, bc = gla_pallas._in_chunk_sums(g, core)
    # the plain forward stores A as the walk uses it, in the inputs' dtype (half the bytes
    # of float32, the same rounding); under a gradient float32, which the backward reads
    a, qe, ke = gla_pallas.run_fwd_a(core, q, k, b, bc, decayed=True,
                                     a_dtype=F32 if store_states else q.dtype)
    h0f = None if h0 is None else h0.astype(F32)
    out = gla_walk(st, qe, ke, v, a, _decay_rows(b, core.chunk), h0f, store_states=store_states,
                   layout=layout)
    final = pass_empty(st, layout, out[1], h0f)
    return out[0], final, (out[2] if store_states else None), (b, bc, a, h0f, qe, ke)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gla_mosaic_core(st: MosaicStatic, q: Array, k: Array, v: Array, g: Array, h0: Array | None,
                    layout: tuple[Array, Array] | None = None) -> tuple[Array, Array]:
    """GLA in the chunk layout: Triton preparation, Mosaic GPU walk, Triton backward (its
    state walk on Mosaic GPU with :data:`BWD_WALK_ENV`).

    Args:
        st: static description. q, k: ``[R, TP, H, K]``. v: ``[R, TP, H, V]`` (bf16 / f16).
        g: ``[R, TP, H, K]`` float32 log-gates. h0: ``[N, H, K, V]`` or None.
        layout: ``(seq_info, flags)`` ``[R, NC]`` int32 for packed rows, else None.

    Returns:
        ``(o [R, TP, H, V], final [N, H, K, V] float32)``.
    """
    o, final, _, _ = _forward(st, q, k, v, g, h0, layout, store_states=False)
    return o, final


def _walks_gradient(st: MosaicStatic) -> bool:
    """Whether the gradient's state walk runs on Mosaic GPU (:data:`BWD_WALK_ENV`, where it
    fits, and where the walk's ``1 / scale`` factor is a normal float32: not at scale 0)."""
    return (env_switch(BWD_WALK_ENV, BWD_WALK) and 2.0 ** -60 < abs(st.core.scale) < 2.0 ** 60
            and state_grad_fits(st))


def _fwd_rule(st: MosaicStatic, q, k, v, g, h0, layout):
    # under a gradient the walk also stores every chunk's entering state: the one residual
    # of the Triton backward that the walk does not otherwise leave in HBM; with the Mosaic
    # state walk also fwd_a's decayed q and k, which it reads
    o, final, h, (b, bc, a, _, qe, ke) = _forward(st, q, k, v, g, h0, layout,
                                                  store_states=True)
    seq_info, flags = triton_layout(st.core, layout)
    decayed = (qe, ke) if _walks_gradient(st) else None
    return (o, final), ((q, k, v, b, bc, a, h0, seq_info, flags, h), decayed)


def _bwd_rule(st: MosaicStatic, res, cts):
    res, decayed = res
    state_grads = None
    if decayed is not None:  # dh, dh0 and dv from the Mosaic walk; the rest in Triton
        qe, ke = decayed
        b, a = res[3], res[5]
        layout = (res[7], res[8]) if st.core.packed else None
        do, dfinal = cts
        state_grads = gla_state_grad(st, qe, ke, do, a, _decay_rows(b, st.core.chunk),
                                     dfinal, layout)
    dq, dk, dv, dg, dh0, _, _ = gla_pallas._core_bwd(st.core, res, cts, state_grads=state_grads)
    return dq, dk, dv, dg, dh0, None


gla_mosaic_core.defvjp(_fwd_rule, _bwd_rule)


@dataclasses.dataclass(frozen=True)
class _BatchPlan:
    """The fields ``pallas_ops._static`` reads of a ``chunking.ChunkPlan``: batch rows."""

    rows: int
    n_chunks: int
    chunk: int
    packed: bool = False


def batch_core(rows: int, n_chunks: int, heads: int, key_dim: int, value_dim: int, *,
               interpret: bool = False) -> Any:
    """GLA's Triton core description (``CoreStatic``) of batch rows already in the chunk
    layout (``n_chunks`` chunks of :data:`CHUNK`, head dims padded), no initial state: for
    calling the kernels alone (benchmarks, tests)."""
    plan = _BatchPlan(rows=rows, n_chunks=n_chunks, chunk=CHUNK)
    tcfg = gla_pallas._resolve(TritonConfig(chunk=CHUNK), rows=rows, heads=heads,
                               key_dim=key_dim, value_dim=value_dim)
    core = _static(tcfg, gate="vector", delta=False, has_h0=False, scale=key_dim ** -0.5,
                   plan=plan, heads=heads, key_dim=key_dim, value_dim=value_dim, n_seqs=rows)
    return dataclasses.replace(core, interpret=True) if interpret else core


def gla_mosaic(q: Array, k: Array, v: Array, g: Array, *, scale: float,
               initial_state: Array | None = None, cu_seqlens: Array | None = None,
               chunk_size: int | None = None, config: MosaicConfig | None = None,
               check_device: bool = True) -> tuple[Array, Array]:
    """GLA with the Mosaic GPU walk; arguments as :func:`gla_reference` plus ``chunk_size``
    (64), ``config`` (:class:`MosaicConfig`: ``block_v``, ``stages``, ``bwd_stages``;
    ``backward`` "pallas" only) and ``check_device`` (False skips the sm_90 check, to lower
    for CUDA on a machine without a GPU).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.

    Raises:
        NotImplementedError: float32 inputs, key dims > 128, chunk sizes other than 64, no
            sm_90 GPU or a JAX without the Mosaic GPU APIs used, packed sequences with
            ``LINEARNEXUS_MOSAIC_PACKED=0`` or with a config that fits batch rows but not
            beside the packed staging tile (dispatch runs ``pallas``).
        ValueError: a config the kernel does not take (names ``config``).
    """
    cfg = config or MosaicConfig()
    chunk = cfg.chunk or chunk_size or CHUNK
    check_mosaic_call(q, k, v, chunk=chunk, check_device=check_device, cu_seqlens=cu_seqlens)
    if chunk != CHUNK:
        raise NotImplementedError(f"mosaic backend: chunk_size {chunk}: GLA's walk takes chunks "
                                  f"of {CHUNK} (its float32 [L, L] A tile at 128 leaves no room "
                                  "for a second pipeline stage)")
    heads, key_dim = q.shape[2:]
    value_dim = v.shape[3]
    # q, k, v in the chunk layout [R, NC * L, H, D], head dims zero-padded to 64 / 128
    _, kp, vp, plan, h0, (qc, kc, vc) = _chunk_inputs(q, k, v, initial_state, chunk, cu_seqlens)
    cfg = cfg.merged(default_gla_config(rows=plan.rows, heads=heads, key_dim=kp, value_dim=vp,
                                        n_chunks=plan.n_chunks, packed=plan.packed,
                                        block_v=cfg.block_v, stages=cfg.stages))
    check_gla_config(cfg, key_dim=kp, value_dim=vp)
    if plan.packed:
        decline_unless_packed_fits(
            lambda: check_gla_config(cfg, key_dim=kp, value_dim=vp, packed=True),
            key_dim=kp, block_v=cfg.block_v)
    gc = _layout(_pad_last(g.astype(F32), kp), plan)  # floored in the Triton sums kernel
    tcfg = gla_pallas._resolve(TritonConfig(chunk=chunk), rows=plan.rows, heads=heads,
                               key_dim=kp, value_dim=vp)
    core = _static(tcfg, gate="vector", delta=False, has_h0=h0 is not None, scale=scale,
                   plan=plan, heads=heads, key_dim=kp, value_dim=vp, n_seqs=_n_seqs(q, cu_seqlens))
    st = MosaicStatic(core=core, block_v=cfg.block_v, stages=cfg.stages, backward="pallas",
                      bwd_stages=cfg.bwd_stages)
    o, final = gla_mosaic_core(st, qc, kc, vc, gc, h0, _packed_layout(plan))
    o = _unlayout(o, plan)[..., :value_dim].astype(v.dtype)
    return o, final[:, :, :key_dim, :value_dim]
