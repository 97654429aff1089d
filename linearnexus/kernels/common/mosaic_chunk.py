"""Pallas Mosaic GPU (Hopper, sm_90+) forward kernel of the chunked gated linear attention.

One program per (value block, head, batch row) walks the chunks of its row in order with the
state ``S [K, BV]`` (float32) held in registers as a warpgroup-matmul accumulator, so the
per-chunk states never go to HBM (the Triton ``pallas`` backend stores them between its
``fwd_h`` and ``fwd_o`` kernels). Per chunk of L tokens, with ``b`` the in-chunk inclusive
cumsum of log-gates (``pallas_chunk.py``'s module doc has the derivation)::

    A   = (q k^T) * Gamma,   Gamma_ij = exp(b_i - b_j) (j <= i), else 0      wgmma [L, L]
    o   = scale * [ e^{b} * (q S_c) + A v ]                                 wgmma x2 [L, BV]
    S_{c+1} = e^{b_L} S_c + k^T (e^{b_L - b} * v)                          wgmma [K, BV]

* q, k, v chunks arrive by TMA into swizzled SMEM through ``plgpu.emit_pipeline`` (two
  stages: the copies of chunk c+2 are issued as soon as chunk c is done with its slot); the
  output tile leaves by TMA from SMEM.
* ``q S_c`` takes ``S_c`` from SMEM in the input dtype (bf16, as FLA's stored states are);
  the carried state itself stays float32 in registers across the whole walk.
* ``A`` is the register (A) operand of its wgmma, as FlashAttention-3's ``P``; ``k^T`` is a
  transposed SMEM view (no copy); the decayed ``v`` rows are written back to SMEM once per
  chunk for the state update.
* Gates come in as three small float32 rows per head (``b``, ``e^{b_L - b}`` per token and
  ``e^{b_L}`` repeated K times per chunk) so that no scalar has to be read inside the kernel:
  every gate factor is a vector load in the layout its broadcast needs.

Scope (anything else raises ``NotImplementedError`` and the dispatcher moves on to the
Triton kernels): bfloat16 / float16 inputs (the wgmma of float32 operands is TF32, short of
the float32 thresholds), key dim padded to 64 or 128, value dim padded to a multiple of the
value block, batch rows (no ``cu_seqlens`` packing), no delta rule. The backward pass
reuses the Triton kernels of ``pallas_chunk.py`` after re-running their ``fwd_h`` for the
per-chunk states this kernel does not store (``mosaic_core``'s custom_vjp).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas_chunk import CoreStatic, _core_bwd, run_fwd_h

F32 = jnp.float32
#: input dtypes the wgmma path takes exactly (bf16 / f16 operands, float32 accumulation)
MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def mosaic_unavailable_reason() -> str | None:
    """Why the installed JAX cannot build these kernels, or None when it can.

    The kernels use ``plgpu.kernel``, ``emit_pipeline(init_carry=...)``, ``plgpu.load`` with
    a layout, ``Layout.WGMMA.reduce`` and transposed SMEM operands of ``wgmma``: JAX 0.10.2
    and 0.11.2 have all of them; an older Mosaic GPU module lacks some.
    """
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError as e:  # pragma: no cover - depends on the installed jaxlib
        return f"jax.experimental.pallas.mosaic_gpu is not importable ({e})"
    needed = ("kernel", "emit_pipeline", "load", "wgmma", "ACC", "Layout",
              "SMEM", "TilingTransform", "SwizzleTransform", "commit_smem", "copy_gmem_to_smem",
              "copy_smem_to_gmem", "wait_smem_to_gmem", "layout_cast", "broadcasted_iota")
    missing = [n for n in needed if not hasattr(plgpu, n)]
    if missing:
        return f"jax {jax.__version__}'s Mosaic GPU lacks {', '.join(missing)}"
    import inspect

    if "init_carry" not in inspect.signature(plgpu.emit_pipeline).parameters:
        return f"jax {jax.__version__}'s plgpu.emit_pipeline takes no init_carry"
    return None


#: JAX 0.11 deprecates ``plgpu.load(ref, idx)`` and ``plgpu.transpose_ref`` in favour of
#: ``plgpu.load(ref.at[idx])`` and ``ref.transpose``, which 0.10's Mosaic GPU lowers
#: differently or lacks; both spellings lower to the same kernel on their own version
_NEW_REF_API = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def _load(ref: Any, layout: Any) -> Array:
    """The whole of an SMEM ref as an array in ``layout``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.load(ref, layout=layout) if _NEW_REF_API else plgpu.load(ref, (), layout=layout)


def _transposed(ref: Any) -> Any:
    """A transposed view of a 2-D SMEM ref (no copy), for a wgmma operand."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return ref.transpose((1, 0)) if _NEW_REF_API else plgpu.transpose_ref(ref, (1, 0))


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tile and pipeline knobs of the Mosaic GPU forward kernel; None: the heuristic decides.

    Attributes:
        chunk: tokens per chunk L (64 or 128): the M and K size of the intra-chunk wgmmas.
        block_v: value columns per program (64 or 128); the state block is ``[K, block_v]``
            float32 in registers (64 registers a thread at K = 128, block_v = 64).
        stages: TMA pipeline depth (chunks in flight, >= 2).
    """

    chunk: int | None = None
    block_v: int | None = None
    stages: int | None = None

    def __post_init__(self) -> None:
        if self.chunk is not None and self.chunk not in (64, 128):
            raise ValueError(f"chunk: expected 64, 128 or None, got {self.chunk!r}")
        if self.block_v is not None and self.block_v not in (64, 128):
            raise ValueError(f"block_v: expected 64, 128 or None, got {self.block_v!r}")
        if self.stages is not None and (isinstance(self.stages, bool)
                                        or not isinstance(self.stages, int) or self.stages < 2):
            raise ValueError(f"stages: expected an int >= 2 or None, got {self.stages!r}")

    def merged(self, default: MosaicConfig) -> MosaicConfig:
        """This config with its None fields taken from ``default``."""
        return MosaicConfig(**{f.name: (getattr(self, f.name) if getattr(self, f.name) is not None
                                        else getattr(default, f.name))
                               for f in dataclasses.fields(self)})


#: shared memory a block may use on sm_90 (227 KB), less a margin for barriers and alignment
SMEM_LIMIT = 232448 - 2048


def smem_bytes(*, chunk: int, key_dim: int, block_v: int, stages: int, itemsize: int) -> int:
    """Shared memory one program of the forward kernel asks for: ``stages`` pipeline slots
    of the q, k, v, gate and output tiles, the bf16 state tile, the decayed-v tile and the
    float32 state staging tile (within 1 KB of what Mosaic GPU reported when lowering)."""
    L, K, BV = chunk, key_dim, block_v
    per_stage = (2 * L * K + 2 * L * BV) * itemsize + (2 * L + K) * 4
    return stages * per_stage + (K * BV + L * BV) * itemsize + K * BV * 4


def default_mosaic_config(*, rows: int, heads: int, key_dim: int, value_dim: int,
                          n_chunks: int, itemsize: int = 2) -> MosaicConfig:
    """The heuristic: chunk 64; value blocks of 64 (at V = 128 two programs per head, which
    the H200's 132 SMs need at B * H = 128), 128 only when that still leaves >= 2 programs
    per SM and fits shared memory; 3 pipeline stages when they fit and the walk is longer
    than a few chunks, else 2.

    Measured on an H200 (bf16, (8, 4096, 16, 128), forward, 2026-12-04): 3 stages 0.337 ms,
    2 stages 0.347 ms (block_v 128 does not fit shared memory at K = 128)."""
    block_v = 64
    if (value_dim % 128 == 0 and (value_dim // 128) * rows * heads >= 264
            and smem_bytes(chunk=64, key_dim=key_dim, block_v=128, stages=2,
                           itemsize=itemsize) <= SMEM_LIMIT):
        block_v = 128
    block_v = min(block_v, value_dim)
    stages = 2
    if n_chunks >= 8 and smem_bytes(chunk=64, key_dim=key_dim, block_v=block_v, stages=3,
                                      itemsize=itemsize) <= SMEM_LIMIT:
        stages = 3
    return MosaicConfig(chunk=64, block_v=block_v, stages=stages)


@dataclasses.dataclass(frozen=True)
class MosaicStatic:
    """The static description of one forward call (hashable; keys the compiled kernel).

    Attributes:
        core: the Triton core's description of the same call (shapes R, NC, L, H, K, V,
            scale, whether an initial state is given); the backward runs on it.
        block_v, stages: the Mosaic kernel's value block and pipeline depth.
    """

    core: CoreStatic
    block_v: int
    stages: int


def _swizzled(cols: int, dtype: Any) -> tuple[Any, ...]:
    """SMEM transforms for a ``[rows, cols]`` tile that a wgmma reads: 8-row tiles of one
    swizzle span, swizzled (the bank-conflict-free layout the tensor cores expect)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def _forward_kernel(q_ref, k_ref, v_ref, b_ref, d_ref, e_ref, h0_ref, o_ref, final_ref,
                    s_smem, vd_smem, f32_smem, bar, *, st: MosaicStatic, dtype: Any) -> None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    L, K, BV = c.chunk, c.key_dim, st.block_v
    wgmma_layout = plgpu.Layout.WGMMA
    rows_layout, cols_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)
    iv, h, r = jax.lax.axis_index("v"), jax.lax.axis_index("h"), jax.lax.axis_index("r")
    vs = pl.ds(iv * BV, BV)

    # f32_smem stages the float32 initial / final state between HBM (TMA) and registers
    if c.has_h0:
        plgpu.copy_gmem_to_smem(h0_ref.at[r, h, :, vs], f32_smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        state0 = _load(f32_smem, wgmma_layout)
    else:
        state0 = plgpu.layout_cast(jnp.zeros((K, BV), F32), wgmma_layout)

    causal = (plgpu.broadcasted_iota(jnp.int32, (L, L), 0, layout=wgmma_layout)
              >= plgpu.broadcasted_iota(jnp.int32, (L, L), 1, layout=wgmma_layout))

    def body(_, q_smem, k_smem, v_smem, b_smem, d_smem, e_smem, o_smem, state):
        # S_c in the input dtype for the q S_c matmul; the float32 carry stays in registers
        s_smem[...] = state.astype(dtype)
        plgpu.commit_smem()
        k_t = _transposed(k_smem)  # [K, L] view of the [L, K] tile

        def intra(acc_qk, acc_o):
            plgpu.wgmma(acc_qk, q_smem, k_t)  # [L, K] @ [K, L]
            plgpu.wgmma(acc_o, q_smem, s_smem)  # [L, K] @ [K, BV]
            return acc_qk[...], acc_o[...]

        qk, qs = pl.run_scoped(intra, plgpu.ACC((L, L), F32), plgpu.ACC((L, BV), F32))
        b_row = _load(b_smem, rows_layout)  # [L], one per query row
        b_col = _load(b_smem, cols_layout)  # [L], one per key column
        diff = (jax.lax.broadcast_in_dim(b_row, (L, L), [0])
                - jax.lax.broadcast_in_dim(b_col, (L, L), [1]))
        # masked before the exp: above the diagonal b_i - b_j > 0 could overflow
        a = jnp.where(causal, qk * jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
        o_inter = qs * jax.lax.broadcast_in_dim(jnp.exp(b_row), (L, BV), [0])

        def inner(acc_o):
            plgpu.wgmma(acc_o, a.astype(dtype), v_smem)  # registers [L, L] @ SMEM [L, BV]

        o = pl.run_state(inner)(plgpu.ACC.init(o_inter))
        o_smem[...] = (o * c.scale).astype(dtype)

        # state update: S e^{b_L} + k^T (e^{b_L - b} v); the decay goes on v's rows
        d_row = _load(d_smem, rows_layout)  # [L]
        v = _load(v_smem, wgmma_layout).astype(F32)  # [L, BV]
        vd_smem[...] = (v * jax.lax.broadcast_in_dim(d_row, (L, BV), [0])).astype(dtype)
        plgpu.commit_smem()
        e_row = _load(e_smem, rows_layout)  # [K], e^{b_L} repeated

        def update(acc_s):
            plgpu.wgmma(acc_s, k_t, vd_smem)  # [K, L] @ [L, BV]

        decayed = state * jax.lax.broadcast_in_dim(e_row, (K, BV), [0])
        return pl.run_state(update)(plgpu.ACC.init(decayed))

    in_specs = [
        plgpu.BlockSpec((L, K), lambda c: (c, 0), transforms=_swizzled(K, dtype)),  # q
        plgpu.BlockSpec((L, K), lambda c: (c, 0), transforms=_swizzled(K, dtype)),  # k
        plgpu.BlockSpec((L, BV), lambda c: (c, 0), transforms=_swizzled(BV, dtype)),  # v
        plgpu.BlockSpec((L,), lambda c: (c,)),  # b
        plgpu.BlockSpec((L,), lambda c: (c,)),  # e^{b_L - b}
        plgpu.BlockSpec((K,), lambda c: (c,)),  # e^{b_L}, K copies per chunk
    ]
    out_specs = [plgpu.BlockSpec((L, BV), lambda c: (c, 0), transforms=_swizzled(BV, dtype))]
    pipeline = plgpu.emit_pipeline(body, grid=(c.n_chunks,), in_specs=in_specs,
                                   out_specs=out_specs, max_concurrent_steps=st.stages,
                                   init_carry=state0)
    final = pipeline(q_ref.at[r, :, h, :], k_ref.at[r, :, h, :], v_ref.at[r, :, h, vs],
                     b_ref.at[r, h], d_ref.at[r, h], e_ref.at[r, h], o_ref.at[r, :, h, vs])

    f32_smem[...] = final
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(f32_smem, final_ref.at[r, h, :, vs])
    plgpu.wait_smem_to_gmem(0)


def mosaic_forward(st: MosaicStatic, q: Array, k: Array, v: Array, b: Array,
                   h0: Array | None) -> tuple[Array, Array]:
    """Run the forward kernel in the chunk layout.

    Args:
        st: static description. q, k: ``[R, TP, H, K]``. v: ``[R, TP, H, V]`` (bf16 / f16,
            TP = NC * L, K in (64, 128), V a multiple of ``st.block_v``).
        b: ``[R, TP, H]`` float32 in-chunk inclusive cumsum of the log-gates.
        h0: ``[R, H, K, V]`` float32 or None.

    Returns:
        ``(o [R, TP, H, V] in q's dtype, final [R, H, K, V] float32)``.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    R, NC, L, H, K, V = c.rows, c.n_chunks, c.chunk, c.heads, c.key_dim, c.value_dim
    dtype = q.dtype
    bh = jnp.transpose(b, (0, 2, 1))  # [R, TP, H] -> [R, H, TP]: a chunk's gates contiguous
    bc = bh.reshape(R, H, NC, L)  # [R, H, TP] -> [R, H, NC, L]
    b_last = bc[..., -1:]  # [R, H, NC, 1]
    decay = jnp.exp(b_last - bc).reshape(R, H, NC * L)  # e^{b_L - b}, <= 1
    e_last = jnp.broadcast_to(jnp.exp(b_last), (R, H, NC, K)).reshape(R, H, NC * K)
    if h0 is None:
        h0 = jnp.zeros((1, 1, K, V), F32)  # never read (core.has_h0 False); keeps one signature
    kernel = functools.partial(_forward_kernel, st=st, dtype=dtype)
    f = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((R, NC * L, H, V), dtype),
                  jax.ShapeDtypeStruct((R, H, K, V), F32)),
        scratch_types=(plgpu.SMEM((K, st.block_v), dtype, transforms=_swizzled(st.block_v, dtype)),
                       plgpu.SMEM((L, st.block_v), dtype, transforms=_swizzled(st.block_v, dtype)),
                       plgpu.SMEM((K, st.block_v), F32, transforms=_swizzled(st.block_v, F32)),
                       plgpu.Barrier(num_barriers=1)),
        grid=(V // st.block_v, H, R),
        grid_names=("v", "h", "r"),
        # Lane semantics (per-thread arrays with explicit layouts, as written here): JAX 0.10's
        # default; 0.11 defaults to Warpgroup semantics, whose layout inference found no
        # solution for this kernel on the H200 (and searched for minutes first)
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
    )
    return f(q, k, v, bh, decay, e_last, h0)


def _fwd_rule(st: MosaicStatic, q, k, v, g, h0):
    from linearnexus.kernels.common.pallas_chunk import in_chunk_cumsum

    b = in_chunk_cumsum(g, st.core.chunk)
    h0f = None if h0 is None else h0.astype(F32)
    o, final = mosaic_forward(st, q, k, v, b, h0f)
    return (o, final), (q, k, v, b, h0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mosaic_core(st: MosaicStatic, q, k, v, g, h0):
    """Scalar-gated linear attention in the chunk layout, forward on Mosaic GPU.

    Args:
        st: the static description (its ``core``: batch rows, scalar gate).
        q, k: ``[R, TP, H, K]``. v: ``[R, TP, H, V]``. g: ``[R, TP, H]`` float32 log-gates.
        h0: ``[R, H, K, V]`` or None.

    Returns:
        ``(o [R, TP, H, V], final [R, H, K, V] float32)``.
    """
    return _fwd_rule(st, q, k, v, g, h0)[0]


def _bwd_rule(st: MosaicStatic, res, cts):
    q, k, v, b, h0 = res
    core = st.core
    R, NC = core.rows, core.n_chunks
    seq_info = jnp.broadcast_to(jnp.arange(R, dtype=jnp.int32)[:, None], (R, NC))
    chunk_ids = jnp.arange(NC)
    flags = (jnp.where(chunk_ids == 0, 1, 0) | jnp.where(chunk_ids == NC - 1, 2, 0)).astype(jnp.int32)
    flags = jnp.broadcast_to(flags[None], (R, NC))
    h0f = None if h0 is None else h0.astype(F32)
    # the Triton backward needs every chunk's entering state, which the fused forward kept
    # in registers only: one more Triton fwd_h walk recomputes them
    h, _, final = run_fwd_h(core, k, v, None, b, h0f, seq_info, flags)
    full = (q, k, v, None, b, h0, seq_info, flags, h, None, final)
    dq, dk, dv, _, dg, dh0, _, _ = _core_bwd(core, full, cts)
    return dq, dk, dv, dg, dh0


mosaic_core.defvjp(_fwd_rule, _bwd_rule)
