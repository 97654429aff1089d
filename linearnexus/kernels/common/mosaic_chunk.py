"""Pallas Mosaic GPU (Hopper, sm_90+) forward kernel of the chunked gated linear attention.

One program per (value block, head, batch row) walks the chunks of its row in order with the
state ``S [K, BV]`` (float32) held in registers as a warpgroup-matmul accumulator, so the
per-chunk states never go to HBM (the Triton ``pallas`` backend stores them between its
``fwd_h`` and ``fwd_o`` kernels). Per chunk of L tokens, with ``b`` the in-chunk inclusive
cumsum of log-gates (``pallas_chunk.py``'s module doc has the derivation)::

    A   = (q k^T) * Gamma,   Gamma_ij = exp(b_i - b_j) (j <= i), else 0      wgmma [L, L]
    o   = scale * [ e^{b} * (q S_c) + A v ]                                 wgmma x2 [L, BV]
    S_{c+1} = e^{b_L} S_c + k^T (e^{b_L - b} * v)                          wgmma [K, BV]

* q, k, v chunks arrive by TMA into swizzled SMEM through ``plgpu.emit_pipeline``
  (``stages`` deep: the copies of chunk c+stages go out when chunk c frees its slot); the
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
value block. Batch rows and rows of packed sequences (``cu_seqlens``: each sequence starts on
a fresh chunk; the walks read each chunk's sequence and open / close flags, load the
sequence's initial state where it opens and store its final state where it closes). The
delta rules run the same walk with ``core.delta`` set (``mosaic_delta.py``).

Finite outputs: the api's guard (``validation.run_guarded``) needs to know whether an input
was bad (non-finite, or a positive log-gate), and otherwise reads the whole output (a bad
input makes it non-finite) and the log-gates for it. The walk folds that into its state
instead. Non-finite ``k``, ``v``, gates or ``beta`` reach the state anyway; a positive
log-gate is made NaN in the glue (``floor_log_gate(mark_positive=True)``; GLA's ``sums``
kernel, where the floor's test also keeps a NaN gate NaN, which Triton's ``max`` would not),
so it does too; a non-finite ``q`` row reaches only its output and ``q S_c``'s row, so each
chunk adds ``(q S_c) * 0`` (0, or NaN in exactly those rows) to the decayed values of the
state update (simple_gla: summed over the row first, a ``[L]`` vector added to the decay
factors, so that no ``[L, BV]`` tile stays live in registers until the update; GLA's walk,
whose update reads ``v`` from its pipeline slot, carries the row sums and adds their total
to the final state). For finite rows that adds exactly zero; a non-finite row turns the
state NaN from that chunk on, so the final state of its sequence is NaN and the guard reads
only the final states (``MosaicKernel.final_marks_bad_inputs``). So the kernel called
directly (``linear_attention_mosaic``, ``delta_rule_mosaic``, not through the api) returns a
NaN final state, and NaN outputs in the later chunks, after a non-finite q (with
simple_gla's sequence split, ``seq_split``, the later chunks of that segment only: each
segment's final state is added to the returned one at zero weight, so the mark still reaches
it); through the api the guard's other path returns the reference's causal NaN. Overflow
from finite inputs differs from the plain check in two ways: a ``q S_c`` product past
float32's range marks the state (the guard's rerun then returns that state NaN), and an
output that overflows while the state stays finite passes the check where it failed before
(forward values the same either way; the gradient then comes from the backward instead of
being NaN).

Backward (``mosaic_core``'s custom_vjp): under a gradient the forward also stores every
chunk's entering state (``store_states``: the bf16 state tile of the ``q S_c`` matmul
becomes a pipeline output slot), and the Mosaic GPU kernels of ``mosaic_bwd.py`` run the
backward; ``MosaicConfig(backward="pallas")`` (the default where those do not fit shared
memory: V > 128, and chunks of 128 at K = V = 128) runs the Triton kernels of
``pallas_chunk.py`` instead, after re-running their ``fwd_h`` for the states.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
from typing import Any

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas_chunk import (
    CoreStatic,
    _core_bwd,
    _has_chunk,
    batch_layout_info,
    run_fwd_h,
)

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

    if "init_carry" not in inspect.signature(plgpu.emit_pipeline).parameters:
        return f"jax {jax.__version__}'s plgpu.emit_pipeline takes no init_carry"
    return None


def env_switch(name: str, default: bool) -> bool:
    """A Mosaic backend switch, read from the environment variable ``name`` at trace time:
    "1" on, "0" off, unset (or any other value) ``default``."""
    flag = os.environ.get(name, "")
    return flag == "1" or (default and flag != "0")


#: "0" launches the kernels' programs with the batch rows fastest (the order before
#: :func:`program_grid`); unset: :data:`SPLIT_MINOR`
SPLIT_MINOR_ENV = "LINEARNEXUS_MOSAIC_SPLIT_MINOR"
#: the programs that read the same q / k tiles (a head's value blocks, or its key blocks)
#: launched next to each other, so that they run in the same wave (:func:`program_grid`)
SPLIT_MINOR = True
#: the most blocks CUDA launches along a grid's y or z axis (x takes 2^31 - 1)
CUDA_GRID_YZ = 65535


def program_grid(split_name: str, split: int, *, heads: int, rows: int) -> dict[str, Any]:
    """``plgpu.kernel``'s ``grid`` and ``grid_names`` for a kernel whose programs are
    ``split`` blocks (axis ``split_name``: value or key blocks, or chunk parts with them) x
    ``heads`` x ``rows``; the kernels read their indices by name, so the order is the
    launch order alone.

    Pallas Mosaic GPU launches the grid row-major: its last axis is CUDA's x, the fastest.
    With the blocks first (the order before), the programs of one head's blocks lie
    ``heads * rows`` apart; where one program fills an SM (the walks that store states, the
    gradient's kernels: 141-209 KB of shared memory at (8, 4096, 16, 128)) their 256
    programs run in two waves, one block of every head in each, and the q / k tiles the two
    blocks share come from HBM twice. Nsight Compute's bytes on an H100 match that count
    for the gated rule's storing walk, reverse walk and ``dq / dk`` (1.35, 1.22, 1.62 GB
    against 1.34, 1.21, 1.61 computed with the shared tiles read twice), while simple_gla's
    plain walk (two programs per SM, one wave) moved its floor's bytes. With the blocks
    last the programs that share tiles run side by side (:data:`SPLIT_MINOR_ENV` "0":
    the order before). Rows go to CUDA's z axis then, which takes at most
    :data:`CUDA_GRID_YZ`; more rows keep the order before (rows on x)."""
    if env_switch(SPLIT_MINOR_ENV, SPLIT_MINOR) and rows <= CUDA_GRID_YZ:
        return {"grid": (rows, heads, split), "grid_names": ("r", "h", split_name)}
    return {"grid": (split, heads, rows), "grid_names": (split_name, "h", "r")}


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


#: the backward implementations a :class:`MosaicConfig` may name
BACKWARDS = ("mosaic", "pallas")


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tile and pipeline knobs of the Mosaic GPU kernels; None: the heuristic decides.

    Attributes:
        chunk: tokens per chunk L (64 or 128): the M and K size of the intra-chunk wgmmas.
        block_v: value columns per program (32, 64 or 128; the delta rules' walks 32 or 64,
            GLA's 64 or 128; 32: twice the programs of 64 where B * H * V / 64 leaves SMs
            idle, every wgmma operand tile then at a 64-byte swizzle); the state block is
            ``[K, block_v]`` float32 in registers (64 registers a thread at K = 128,
            block_v = 64).
        stages: TMA pipeline depth (chunks in flight, >= 1) of the forward.
        backward: ``"mosaic"`` (the Mosaic GPU backward kernels, ``mosaic_bwd.py``) or
            ``"pallas"`` (the Triton backward kernels after a Triton ``fwd_h`` recompute).
        bwd_stages: pipeline depth (>= 1) of the kernels that run under a gradient with the
            Mosaic backward: the forward that stores every chunk's state and the backward's
            reverse walk (``stages`` is the depth of the plain forward).
        dqk_stages: pipeline depth (>= 1) of the Mosaic backward's ``dq / dk`` kernel.
        fused_wy: the delta rules only: the plain forward (no gradient) forms
            ``vn = M^{-1} (beta v - beta e^b (k S_c))`` in the walk from the stored
            ``M^{-1}``, and the WY preparation writes only ``M^{-1}`` (no ``w``, ``u``);
            under a gradient the walk reads ``w``, ``u`` as without it
            (``mosaic_delta.py``), unless ``fused_grad``.
        fused_grad: the delta rules only (with ``fused_wy`` and ``backward="mosaic"``): the
            gradient from ``M^{-1}`` too: the forward under a gradient is the fused walk
            storing ``S_c`` and ``vn``, the reverse walk forms ``dy = M^{-T} dvn`` and takes
            ``k^T (beta e^b dy)`` off the state gradient, and the WY backward works from
            ``dy`` and ``vn`` (no ``w``, ``u``, no products by ``M^{-1}`` there).
        seq_split: simple_gla only (batch rows), the plain forward: cut each row's sequence
            into this many segments of whole chunks and walk them as rows of their own, so
            the grid has that many times the programs. A Triton kernel
            (``pallas_chunk.segment_states``) first walks every segment but the last from a
            zero state for its own state and summed log-gate, a few ``[K, V]`` steps give
            each segment's entering state, and the walk then starts every segment from it,
            so no output is corrected afterwards (``mosaic_ops.linear_attention_mosaic``).
            The gradient splits too unless ``seq_split_grad=False``. 1: one walk; None: the
            heuristic (``mosaic_ops.default_seq_split``).
        seq_split_grad: with ``seq_split``, whether the gradient splits too: the forward walks
            the segments storing their states, and the backward walks each segment from the
            state gradient leaving it (the segments' ``q, do`` sent to their starts by the
            same Triton kernel in reverse, joined by their decays; ``mosaic_ops``'s
            ``_split_backward``). False: one walk per row under a gradient (a
            ``custom_vjp``). None: ``mosaic_ops.SPLIT_GRAD`` (yes: 1.52 against 2.13 ms
            forward + backward at (2, 16384, 16, 128) on an H100).

    One stage leaves room in shared memory for two programs per SM, whose copies and
    dependent wgmma chains then overlap each other's (measured: faster for the plain forward
    at 256 programs, slower for the three kernels of the gradient; ``default_mosaic_config``).
    """

    chunk: int | None = None
    block_v: int | None = None
    stages: int | None = None
    backward: str | None = None
    bwd_stages: int | None = None
    dqk_stages: int | None = None
    fused_wy: bool | None = None
    fused_grad: bool | None = None
    seq_split: int | None = None
    seq_split_grad: bool | None = None

    def __post_init__(self) -> None:
        if self.chunk is not None and self.chunk not in (64, 128):
            raise ValueError(f"chunk: expected 64, 128 or None, got {self.chunk!r}")
        if self.block_v is not None and self.block_v not in (32, 64, 128):
            raise ValueError(f"block_v: expected 32, 64, 128 or None, got {self.block_v!r}")
        for name in ("stages", "bwd_stages", "dqk_stages", "seq_split"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name}: expected an int >= 1 or None, got {value!r}")
        if self.backward is not None and self.backward not in BACKWARDS:
            raise ValueError(f"backward: expected one of {BACKWARDS} or None, got {self.backward!r}")
        for name in ("fused_wy", "fused_grad", "seq_split_grad"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name}: expected a bool or None, got {value!r}")

    def merged(self, default: MosaicConfig) -> MosaicConfig:
        """This config with its None fields taken from ``default``."""
        return MosaicConfig(**{f.name: (getattr(self, f.name) if getattr(self, f.name) is not None
                                        else getattr(default, f.name))
                               for f in dataclasses.fields(self)})


#: shared memory a block may use on sm_90 (227 KB), less a margin for barriers and alignment
SMEM_LIMIT = 232448 - 2048
#: shared memory Pallas reserves in a Mosaic GPU kernel that reduces across a warpgroup's
#: rows (``reduction_scratch_bytes``, 2 KB by default): the walks that sum q's row marks
REDUCTION_SCRATCH = 128 * 4 * 4


def smem_bytes(*, chunk: int, key_dim: int, block_v: int, stages: int, itemsize: int,
               store_states: bool = False, delta: bool = False, packed: bool = False,
               fused_wy: bool = False) -> int:
    """Shared memory one program of the forward kernel asks for: ``stages`` pipeline slots
    of the q, k, v, gate and output tiles (and of the per-chunk state tile when the states
    are stored for the backward), the bf16 state tile otherwise and the decayed-v tile. The
    float32 state staging tile (initial / final state) is scoped before and after the
    pipeline and reuses its space. ``delta`` (the delta rules): one more ``[L, K]`` pipeline
    slot (``w``) a stage and one more ``[L, BV]`` tile (``vn = u - w S_c``, the B operand of
    ``A vn``): scratch, or a pipeline output slot when the states are stored (``vn`` goes to
    HBM with them). ``packed``: a float32 ``[K, BV]`` tile that stages each sequence's initial
    and final state inside the pipeline. ``fused_wy`` (the delta rules' plain forward,
    :class:`MosaicConfig`): an ``[L, L]`` ``M^{-1}`` slot and a float32 ``beta`` row a stage
    instead of the ``[L, K]`` ``w`` slot. Without ``delta``, the reduction scratch the
    walk's row sums of q's marks take (:data:`REDUCTION_SCRATCH`)."""
    L, K, BV = chunk, key_dim, block_v
    state_tile = K * BV * itemsize
    vn_tile = L * BV * itemsize if delta else 0
    per_stage = ((3 if delta else 2) * L * K + 2 * L * BV) * itemsize + (2 * L + K) * 4
    if delta and fused_wy:
        per_stage += (L * L - L * K) * itemsize + L * 4
    per_stage += state_tile + vn_tile if store_states else 0
    scratch = L * BV * itemsize + (0 if store_states else state_tile + vn_tile)
    scratch += K * BV * 4 if packed else 0
    scratch += 0 if delta else REDUCTION_SCRATCH
    return scratch + max(stages * per_stage, K * BV * 4)


def mosaic_backward_fits(*, chunk: int, key_dim: int, value_dim: int, block_v: int,
                         itemsize: int = 2, packed: bool = False, delta: bool = False) -> bool:
    """Whether the Mosaic backward kernels (``mosaic_bwd.py``) and the forward that stores
    the states (at value block ``block_v``) fit shared memory at 2 stages: the ``dq / dk``
    kernel holds whole ``[L, V]`` and ``[64, V]`` tiles, so V <= 128. ``delta``: the delta
    rules' kernels (the ``w`` slots and the ``-dvn`` tile of the reverse walk, the ``vn``
    slots of the storing forward)."""
    from linearnexus.kernels.common import mosaic_bwd

    return (mosaic_bwd.state_smem_bytes(chunk=chunk, key_dim=key_dim,
                                        block_v=min(value_dim, mosaic_bwd.STATE_BLOCK_V),
                                        stages=2, itemsize=itemsize, delta=delta,
                                        packed=packed) <= SMEM_LIMIT
            and mosaic_bwd.dqk_smem_bytes(chunk=chunk, key_dim=key_dim, value_dim=value_dim,
                                          stages=2, itemsize=itemsize) <= SMEM_LIMIT
            and smem_bytes(chunk=chunk, key_dim=key_dim, block_v=block_v, stages=2,
                           itemsize=itemsize, store_states=True, delta=delta,
                           packed=packed) <= SMEM_LIMIT)


def deepest_stages(fits, most: int = 4) -> int:
    """The most pipeline stages in ``1..most`` for which ``fits(stages)`` holds (1 if none:
    the kernel's own shared-memory check then names what is over)."""
    return max([s for s in range(1, most + 1) if fits(s)], default=1)


#: streaming multiprocessors of the H100 SXM / H200 (the heuristic's wave arithmetic)
HOPPER_SMS = 132


def small_grid(*, rows: int, heads: int, value_dim: int, chunk: int = 64,
               packed: bool = False) -> bool:
    """Whether one walk at value blocks of 64 leaves at least half the SMs idle (batch rows,
    chunk 64, ``value_dim`` the padded value dim, a multiple of 64): where the heuristics
    take value blocks of 32 (``default_mosaic_config``, ``mosaic_delta.default_delta_config``)
    and simple_gla's plain forward splits its rows (``mosaic_ops.default_seq_split``)."""
    return (chunk == 64 and not packed and value_dim % 64 == 0
            and 2 * (value_dim // 64) * rows * heads <= HOPPER_SMS)


#: "0": the shared backward kernels no longer double their programs (the reverse walk's
#: value blocks of 32, ``dq / dk`` in two chunk parts) where that fills the last wave much
#: better (:func:`balances_waves`), beyond :func:`small_grid`'s cases; unset: :data:`WAVES`
WAVES_ENV = "LINEARNEXUS_MOSAIC_WAVES"
#: on: the case it is for is (1, 8192, 96, 128), whose walks run 192 programs for 132 SMs at
#: one program per SM (value blocks of 64): a second wave of 60. Measured there on an H100
#: (2026-12-06, through the api, twice each): simple_gla forward + backward 2.37 / 2.34 ms
#: off against 2.26 / 2.25 on (its forward does not take the rule). The delta rules'
#: forward walks do not take it: at value blocks of 32 the gated rule's forward went from
#: 1.15 to 1.32 ms there.
WAVES = True


def wave_fill(programs: int, per_sm: int = 1) -> float:
    """The share of the SMs' program slots that ``programs`` use over their waves
    (``per_sm`` programs resident on each of :data:`HOPPER_SMS`): 1.0 when the last wave is
    full, e.g. 192 programs at one per SM fill 0.73 (two waves, the second of 60)."""
    slots = HOPPER_SMS * per_sm
    return programs / (-(-programs // slots) * slots)


def balances_waves(programs: int, *, per_sm: int = 1, gain: float = 0.1) -> bool:
    """Whether twice ``programs`` would fill the waves at least ``gain`` better
    (:func:`wave_fill`), with :data:`WAVES_ENV` on. Off, or where more programs fill no
    better (256 of 264 slots at (8, 4096, 16, 128)), False."""
    return (env_switch(WAVES_ENV, WAVES)
            and wave_fill(2 * programs, per_sm) >= wave_fill(programs, per_sm) + gain)


def default_mosaic_config(*, rows: int, heads: int, key_dim: int, value_dim: int,
                          n_chunks: int, itemsize: int = 2, chunk: int = 64,
                          packed: bool = False, block_v: int | None = None) -> MosaicConfig:
    """The heuristic at chunk ``chunk`` (64 unless the call asks for 128): value blocks of
    64 (at V = 128 two programs per head, which the H200's 132 SMs need at B * H = 128),
    128 only when that still leaves >= 2 programs per SM and fits shared memory, 32 where
    blocks of 64 would leave at least half the SMs idle on a walk of >= 8 chunks (chunk 64,
    batch rows: at (2, 16384, 16, 128) bf16 on an H200, 2026-12-06, forward 0.575 ms against
    0.601 at 64, forward + backward 2.263 against 2.376; at (8, 4096, 16, 128), 256
    programs, 32 was slower: 0.568 against 0.367). The plain
    forward: one pipeline stage when there are more
    programs than SMs (two programs then share each SM, in one wave, and overlap each
    other's dependent chains), else 3 stages when they fit and the walk is longer than a few
    chunks, else 2. The gradient's kernels (``bwd_stages``, ``dqk_stages``): None, the
    deepest that fit. The Mosaic backward wherever it fits shared memory (V <= 128).
    ``block_v`` given (a call's own): the stages and backward are sized for it.

    Measured on an H200 (bf16, (8, 4096, 16, 128): 256 programs, 2026-12-04, kernels alone):
    plain forward 1 stage 0.241 ms, 3 stages 0.257 ms (0.309 / 0.335 ms through the api);
    the forward storing the states 3 stages 0.307 ms, 1 stage 0.332 ms; the reverse walk
    3 stages 0.303 ms, 1 stage 0.318 ms; ``dq / dk`` 2 stages 0.515 ms, 1 stage 0.671 ms."""
    def fits(block: int, stages: int) -> bool:
        return smem_bytes(chunk=chunk, key_dim=key_dim, block_v=block, stages=stages,
                          itemsize=itemsize, packed=packed) <= SMEM_LIMIT

    if block_v is None:
        block_v = 64
        if (value_dim % 128 == 0 and (value_dim // 128) * rows * heads >= 264
                and fits(128, 2)):
            block_v = 128
        elif n_chunks >= 8 and small_grid(rows=rows, heads=heads, value_dim=value_dim,
                                          chunk=chunk, packed=packed):
            block_v = 32  # at most half the SMs busy at 64: twice the programs
        block_v = min(block_v, value_dim)
    stages = 3 if n_chunks >= 8 and fits(block_v, 3) else 2
    if n_chunks >= 8 and (value_dim // block_v) * rows * heads > HOPPER_SMS:
        stages = 1
    while stages > 1 and not fits(block_v, stages):  # chunk 128: fewer slots fit
        stages -= 1
    backward = "mosaic" if mosaic_backward_fits(chunk=chunk, key_dim=key_dim,
                                                value_dim=value_dim, block_v=block_v,
                                                itemsize=itemsize, packed=packed) else "pallas"
    return MosaicConfig(chunk=chunk, block_v=block_v, stages=stages, backward=backward)


@dataclasses.dataclass(frozen=True)
class MosaicStatic:
    """The static description of one forward call (hashable; keys the compiled kernel).

    Attributes:
        core: the Triton core's description of the same call (shapes R, NC, L, H, K, V,
            scale, whether an initial state is given); the backward runs on it.
        block_v, stages: the Mosaic kernel's value block and pipeline depth.
        backward: ``"mosaic"`` or ``"pallas"`` (:class:`MosaicConfig`).
        bwd_stages, dqk_stages: the gradient's pipeline depths (:class:`MosaicConfig`); None:
            the most that fit (up to 3).
        fused_wy: the delta rules' walk forms ``vn`` from ``M^{-1}`` (:class:`MosaicConfig`).
        fused_grad: the delta rules' gradient from ``M^{-1}`` too (:class:`MosaicConfig`).
    """

    core: CoreStatic
    block_v: int
    stages: int
    backward: str = "pallas"
    bwd_stages: int | None = None
    dqk_stages: int | None = None
    fused_wy: bool = False
    fused_grad: bool = False


def _swizzled(cols: int, dtype: Any, cap: int = 128) -> tuple[Any, ...]:
    """SMEM transforms for a ``[rows, cols]`` tile that a wgmma reads: 8-row tiles of one
    swizzle span (the widest that the row's bytes allow, at most ``cap`` bytes), swizzled
    (the bank-conflict-free layout the tensor cores expect)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = min(plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8), cap)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def operand_swizzle(block_v: int, dtype: Any) -> int:
    """The swizzle (bytes) of every wgmma operand tile of the forward walk at value block
    ``block_v``: a wgmma takes its two SMEM operands at one swizzle, and a ``[rows,
    block_v]`` tile's rows hold ``block_v * itemsize`` bytes (64 at ``block_v = 32`` in
    bf16, which caps q's and k's tiles to 64 too; 128 otherwise)."""
    return min(128, block_v * jnp.dtype(dtype).itemsize)


def _state_in(gmem: Any, bar: Any, shape: tuple[int, int]) -> Array:
    """A float32 ``[rows, cols]`` state block from HBM into registers (WGMMA layout), staged
    through a scoped SMEM tile whose space the pipeline that follows reuses."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def scoped(f32_smem):
        plgpu.copy_gmem_to_smem(gmem, f32_smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        return _load(f32_smem, plgpu.Layout.WGMMA)

    return pl.run_scoped(scoped, plgpu.SMEM(shape, F32, transforms=_swizzled(shape[1], F32)))


def check_layout(core: Any, layout: tuple[Array, Array] | None) -> None:
    """Raise ``ValueError`` naming ``layout`` unless it is ``(seq_info, flags)`` exactly when
    ``core`` describes packed rows."""
    if core.packed != (layout is not None):
        raise ValueError(f"layout: expected {'(seq_info, flags)' if core.packed else 'None'} "
                         f"for packed={core.packed}")


def state_grad_carry(core: Any, dht_ref: Any, bar: Any, r: Any, h: Any, vs: Any,
                     shape: tuple[int, int]) -> Array:
    """The float32 state gradient a reverse walk starts from (WGMMA layout): batch row
    ``r``'s final-state gradient block ``dht_ref[r, h, :, vs]``, or zeros for packed rows
    (each sequence's enters at the chunk that closes it, :func:`_enter`)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if core.packed:
        return plgpu.layout_cast(jnp.zeros(shape, F32), plgpu.Layout.WGMMA)
    return _state_in(dht_ref.at[r, h, :, vs], bar, shape)


def initial_carry(core: CoreStatic, h0_ref: Any, bar: Any, r: Any, h: Any, vs: Any,
                  shape: tuple[int, int]) -> Array:
    """The float32 state a forward walk starts from (WGMMA layout): batch row ``r``'s initial
    state block ``h0_ref[r, h, :, vs]`` when the call has one, else zeros (packed rows too:
    each sequence's initial state enters at the chunk that opens it, :func:`_enter`)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if core.has_h0 and not core.packed:
        return _state_in(h0_ref.at[r, h, :, vs], bar, shape)
    return plgpu.layout_cast(jnp.zeros(shape, F32), plgpu.Layout.WGMMA)


def _state_out(state: Array, gmem: Any) -> None:
    """Store a float32 register state block (WGMMA layout) to HBM through a scoped SMEM tile."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def scoped(f32_smem):
        f32_smem[...] = state
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(f32_smem, gmem)
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, plgpu.SMEM(state.shape, F32, transforms=_swizzled(state.shape[1], F32)))


#: set by :func:`gpu_interpret` only (its ``InterpretGPUParams``): the forward kernel then
#: runs in JAX's Mosaic GPU interpreter and avoids what that cannot run
_INTERPRETING: Any = False


#: "0": every call of a Mosaic kernel traces and lowers it anew (see :func:`lowered_once`)
LOWER_ONCE_ENV = "LINEARNEXUS_MOSAIC_LOWER_ONCE"


def _trace_key() -> tuple[tuple[str, str], ...]:
    """What a Mosaic kernel's trace depends on beyond its static description and its
    inputs' shapes: the ``LINEARNEXUS_*`` switches set in the environment (read at trace
    time)."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("LINEARNEXUS_")))


def lowered_once(*static_argnames: str) -> Any:
    """Decorator for a function ``fn(st, *arrays, **kwargs)`` that runs Mosaic kernels: calls
    with the same static description ``st`` (hashable), the same ``static_argnames`` values,
    input shapes and dtypes and the same switches trace ``fn`` once per process and lower it
    once per program (a nested ``jax.jit``, which XLA inlines; its outputs are unchanged).
    Under :func:`gpu_interpret` every call runs ``fn`` itself: the interpreter's callbacks
    dispatch JAX computations of their own, and a kernel in a computation dispatched ahead
    of the caller's next one deadlocked XLA:CPU's in-order queue in a test.

    Pallas lowers each call site of a kernel anew, and Mosaic GPU's lowering is Python: a
    ~211M Gated DeltaNet LM's loss and gradient lowered its 5 distinct Mosaic kernels once
    per layer, ~1.5 s a layer on a 2-core CPU (docs/benchmarks.md, "The wave balance in the
    backward"), and on JAX 0.11 each copy had a ``kernel_hash`` of its own (its symbol
    carries a per-program counter, ``anonymous_0``, ``anonymous_1``, ...), so jaxlib
    compiled every copy on the GPU (60 compiles for 12 layers). Module constants that a
    kernel reads at trace time (``WY_PROGRAMS``, ``STATE_SMALL_MIN_CHUNKS``, ...) are read at
    the first trace of a description in a process: after changing one, call the returned
    function's ``clear_cache()`` (:func:`clear_lowering_caches` clears them all).
    ``LINEARNEXUS_MOSAIC_LOWER_ONCE=0`` traces every call.
    """

    def wrap(fn: Any) -> Any:
        signature = inspect.signature(fn)
        first = next(iter(signature.parameters))

        @functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=static_argnames)
        def traced(key: tuple[Any, ...], st: Any, **kwargs: Any) -> Any:
            del key  # keys the trace only
            return fn(st, **kwargs)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if _INTERPRETING or not env_switch(LOWER_ONCE_ENV, True):
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)  # every argument by name: a static one
            named = dict(bound.arguments)  # passed by position stays static
            st = named.pop(first)
            return traced(_trace_key(), st, **named)

        call.clear_cache = traced.clear_cache
        _LOWERED_ONCE.append(call)
        return call

    return wrap


_LOWERED_ONCE: list[Any] = []


def clear_lowering_caches() -> None:
    """Forget every trace :func:`lowered_once` kept (after a module constant that a Mosaic
    kernel reads at trace time changed)."""
    for call in _LOWERED_ONCE:
        call.clear_cache()


def interpret_kwargs() -> dict[str, Any]:
    """``plgpu.kernel``'s ``interpret=`` under :func:`gpu_interpret`, else nothing: passed to
    each Mosaic kernel, because a global interpret switch would also hand the Triton kernels
    around them (the WY preparation) to the Mosaic GPU interpreter."""
    return {"interpret": _INTERPRETING} if _INTERPRETING else {}


def wgmma_onto(init: Array, issue: Any) -> Array:
    """``init`` plus the products ``issue(acc)`` adds to a float32 wgmma accumulator.

    On the GPU the accumulator starts as ``init`` (``run_state``: no extra registers or
    adds). Under :func:`gpu_interpret` it starts at zero and ``init`` is added after (the
    interpreter has no rule for ``run_state``'s discharged wgmma); the float32 sums differ
    by rounding only."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not _INTERPRETING:
        return pl.run_state(issue)(plgpu.ACC.init(init))

    def scoped(acc):
        issue(acc)
        return acc[...]

    return init + pl.run_scoped(scoped, plgpu.ACC(init.shape, F32))


def wgmma_regs(acc: Any, a: Array, b: Any, cap: int = 128) -> None:
    """``acc += a @ b`` with ``a`` in registers (wgmma's A operand; FlashAttention-3's ``P``).
    Under :func:`gpu_interpret` ``a`` goes through a scoped SMEM tile first (swizzled at most
    ``cap`` bytes, ``b``'s swizzle): the interpreter takes SMEM operands only."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not _INTERPRETING:
        plgpu.wgmma(acc, a, b)
        return

    def scoped(a_smem):
        a_smem[...] = a
        plgpu.commit_smem()
        plgpu.wgmma(acc, a_smem, b)

    pl.run_scoped(scoped, plgpu.SMEM(a.shape, a.dtype,
                                     transforms=_swizzled(a.shape[1], a.dtype, cap)))


def _forward_kernel(*refs, st: MosaicStatic, dtype: Any, store_states: bool) -> None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    delta = c.delta  # the delta rules: v is u (WY form), w corrects it by the entering state
    # the delta rules' fused form: v is v itself, and M^{-1}, beta replace w (u never formed)
    fused = delta and st.fused_wy
    packed = c.packed  # a row of packed sequences, each starting on a fresh chunk
    n_wy = 2 if fused else int(delta)  # (M^{-1}, beta) or (w,) or nothing
    n_in = 7 + n_wy + 2 * packed
    q_ref, k_ref, v_ref, b_ref, d_ref, e_ref, h0_ref = refs[:7]
    wy_refs = refs[7:7 + n_wy]
    seq_ref, flag_ref = refs[7 + n_wy:9 + n_wy] if packed else (None, None)
    o_ref, final_ref = refs[n_in:n_in + 2]
    # packed: a float32 [K, BV] tile that stages a sequence's initial and final states
    seq_smem, refs = (refs[-2], refs[:-2] + refs[-1:]) if packed else (None, refs)
    vn_smem = vn_ref = None
    if store_states and delta:  # the states and vn go out through pipeline slots
        h_ref, vn_ref, vd_smem, bar = refs[n_in + 2:]
        s_scratch = None
    elif store_states:  # the states go out through the pipeline's slots, not a scratch tile
        h_ref, vd_smem, bar = refs[n_in + 2:]
        s_scratch = None
    elif delta:
        h_ref = None
        s_scratch, vn_smem, vd_smem, bar = refs[n_in + 2:]
    else:
        h_ref = None
        s_scratch, vd_smem, bar = refs[n_in + 2:]
    L, K, BV = c.chunk, c.key_dim, st.block_v
    wgmma_layout = plgpu.Layout.WGMMA
    rows_layout, cols_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)
    iv, h, r = jax.lax.axis_index("v"), jax.lax.axis_index("h"), jax.lax.axis_index("r")
    vs = pl.ds(iv * BV, BV)
    cap = operand_swizzle(BV, dtype)

    state0 = initial_carry(c, h0_ref, bar, r, h, vs, (K, BV))

    causal = (plgpu.broadcasted_iota(jnp.int32, (L, L), 0, layout=wgmma_layout)
              >= plgpu.broadcasted_iota(jnp.int32, (L, L), 1, layout=wgmma_layout))

    def body(idx, q_smem, k_smem, v_smem, b_smem, d_smem, e_smem, *rest):
        wy_smem, rest = rest[:n_wy], rest[n_wy:]  # (w,) or (M^{-1}, beta) or ()
        o_smem, rest = rest[0], rest[1:]
        s_smem, rest = (rest[0], rest[1:]) if store_states else (s_scratch, rest)
        vn_tile, rest = (rest[0], rest[1:]) if store_states and delta else (vn_smem, rest)
        state = rest[0]
        if packed:  # a chunk that opens a sequence enters with its initial state
            seq, opens, closes = _chunk_flags(seq_ref, flag_ref, r, idx[0])
            state = _enter(state, opens, seq_smem, None if not c.has_h0 else
                           h0_ref.at[seq, h, :, vs], bar)
        # S_c in the input dtype for the q S_c matmul (and, stored, for the backward); the
        # float32 carry stays in registers
        s_smem[...] = state.astype(dtype)
        plgpu.commit_smem()
        k_t = _transposed(k_smem)  # [K, L] view of the [L, K] tile
        av_smem = v_smem  # the B operand of A v (vn for the delta rules)
        b_row = _load(b_smem, rows_layout)  # [L], one per query row
        eb_row = jnp.exp(b_row)  # [L], e^{b}

        if delta:
            # the three products of S_c (and q k^T) issued together: w S_c (fused: k S_c) is
            # on the chain (vn needs it), q k^T and q S_c overlap it
            def intra3(acc_qk, acc_o, acc_ws):
                plgpu.wgmma(acc_ws, k_smem if fused else wy_smem[0], s_smem)  # [L, K] @ [K, BV]
                plgpu.wgmma(acc_qk, q_smem, k_t)  # [L, K] @ [K, L]
                plgpu.wgmma(acc_o, q_smem, s_smem)  # [L, K] @ [K, BV]
                return acc_qk[...], acc_o[...], acc_ws[...]

            qk, qs, ws = pl.run_scoped(intra3, plgpu.ACC((L, L), F32), plgpu.ACC((L, BV), F32),
                                       plgpu.ACC((L, BV), F32))
            if fused:
                # vn = M^{-1} y, y = beta (v - e^b (k S_c)) (= u - w S_c with w, u's products
                # by M^{-1} taken after the subtraction): y goes through the decayed tile
                # (free until vn is known) as the B operand of one more wgmma on the chain
                m_smem, beta_smem = wy_smem
                beta_row = _load(beta_smem, rows_layout)  # [L]
                v_in = _load(v_smem, wgmma_layout).astype(F32)  # [L, BV]
                y = (v_in - ws * jax.lax.broadcast_in_dim(eb_row, (L, BV), [0])
                     ) * jax.lax.broadcast_in_dim(beta_row, (L, BV), [0])
                vd_smem[...] = y.astype(dtype)
                plgpu.commit_smem()

                def solve(acc_vn):
                    plgpu.wgmma(acc_vn, m_smem, vd_smem)  # [L, L] @ [L, BV]
                    return acc_vn[...]

                vn = pl.run_scoped(solve, plgpu.ACC((L, BV), F32))
            else:
                # vn = u - w S_c: the values the chunk actually writes; in the input dtype as
                # the B operand of A vn, and decayed by e^{b_L - b} for the state update (the
                # Triton fwd_h rounds both the same way)
                vn = _load(v_smem, wgmma_layout).astype(F32) - ws  # [L, BV]
            d_row = _load(d_smem, rows_layout)  # [L]
            vn_tile[...] = vn.astype(dtype)
            # + qs * 0: the state carries q's finiteness (0, or NaN in a non-finite q row;
            # module doc, "Finite outputs"); qs is live here anyway
            vd_smem[...] = (vn * jax.lax.broadcast_in_dim(d_row, (L, BV), [0])
                            + qs * 0.0).astype(dtype)
            plgpu.commit_smem()
            av_smem = vn_tile
        else:
            def intra(acc_qk, acc_o):
                plgpu.wgmma(acc_qk, q_smem, k_t)  # [L, K] @ [K, L]
                plgpu.wgmma(acc_o, q_smem, s_smem)  # [L, K] @ [K, BV]
                return acc_qk[...], acc_o[...]

            qk, qs = pl.run_scoped(intra, plgpu.ACC((L, L), F32), plgpu.ACC((L, BV), F32))
            # q's finiteness for the state (module doc, "Finite outputs"): 0 per row, NaN in
            # a non-finite q row; a [L] row vector, so no tile lives on to the state update
            q_bad = jnp.sum(qs * 0.0, axis=1)  # [L]
        b_col = _load(b_smem, cols_layout)  # [L], one per key column
        diff = (jax.lax.broadcast_in_dim(b_row, (L, L), [0])
                - jax.lax.broadcast_in_dim(b_col, (L, L), [1]))
        # masked before the exp: above the diagonal b_i - b_j > 0 could overflow
        a = jnp.where(causal, qk * jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
        o_inter = qs * jax.lax.broadcast_in_dim(eb_row, (L, BV), [0])

        def inner(acc_o):
            wgmma_regs(acc_o, a.astype(dtype), av_smem, cap)  # registers [L, L] @ SMEM [L, BV]

        o = wgmma_onto(o_inter, inner)
        o_smem[...] = (o * c.scale).astype(dtype)

        # state update: S e^{b_L} + k^T (e^{b_L - b} v); the decay goes on v's rows (the
        # delta rules wrote e^{b_L - b} vn above)
        if not delta:
            d_row = _load(d_smem, rows_layout)  # [L]
            v = _load(v_smem, wgmma_layout).astype(F32)  # [L, BV]
            vd_smem[...] = (v * jax.lax.broadcast_in_dim(d_row + q_bad, (L, BV), [0])
                            ).astype(dtype)
            plgpu.commit_smem()
        e_row = _load(e_smem, rows_layout)  # [K], e^{b_L} repeated

        def update(acc_s):
            plgpu.wgmma(acc_s, k_t, vd_smem)  # [K, L] @ [L, BV]

        decayed = state * jax.lax.broadcast_in_dim(e_row, (K, BV), [0])
        state = wgmma_onto(decayed, update)
        if packed:  # a chunk that closes a sequence leaves its final state
            _leave(state, closes, seq_smem, final_ref.at[seq, h, :, vs])
        return state

    in_specs = [
        plgpu.BlockSpec((L, K), lambda c: (c, 0), transforms=_swizzled(K, dtype, cap)),  # q
        plgpu.BlockSpec((L, K), lambda c: (c, 0), transforms=_swizzled(K, dtype, cap)),  # k
        plgpu.BlockSpec((L, BV), lambda c: (c, 0), transforms=_swizzled(BV, dtype, cap)),  # v
        plgpu.BlockSpec((L,), lambda c: (c,)),  # b
        plgpu.BlockSpec((L,), lambda c: (c,)),  # e^{b_L - b}
        plgpu.BlockSpec((K,), lambda c: (c,)),  # e^{b_L}, K copies per chunk
    ]
    ins = [q_ref.at[r, :, h, :], k_ref.at[r, :, h, :], v_ref.at[r, :, h, vs], b_ref.at[r, h],
           d_ref.at[r, h], e_ref.at[r, h]]
    if fused:  # M^{-1} [L, L] and beta [L] per chunk
        in_specs += [plgpu.BlockSpec((L, L), lambda c: (c, 0),
                                     transforms=_swizzled(L, dtype, cap)),
                     plgpu.BlockSpec((L,), lambda c: (c,))]
        ins += [wy_refs[0].at[r, :, h, :], wy_refs[1].at[r, h]]
    elif delta:  # w, [L, K] per chunk
        in_specs.append(plgpu.BlockSpec((L, K), lambda c: (c, 0),
                                        transforms=_swizzled(K, dtype, cap)))
        ins.append(wy_refs[0].at[r, :, h, :])
    out_specs = [plgpu.BlockSpec((L, BV), lambda c: (c, 0), transforms=_swizzled(BV, dtype, cap))]
    outs = [o_ref.at[r, :, h, vs]]
    if store_states:  # S_c of every chunk, [NC, K, BV] of h [R, NC, H, K, V]
        out_specs.append(plgpu.BlockSpec((None, K, BV), lambda c: (c, 0, 0),
                                         transforms=_swizzled(BV, dtype, cap)))
        outs.append(h_ref.at[r, :, h, :, vs])
    if store_states and delta:  # vn of every chunk, [TP, BV] of vn [R, TP, H, V]
        out_specs.append(plgpu.BlockSpec((L, BV), lambda c: (c, 0),
                                         transforms=_swizzled(BV, dtype, cap)))
        outs.append(vn_ref.at[r, :, h, vs])
    pipeline = plgpu.emit_pipeline(body, grid=(c.n_chunks,), in_specs=in_specs,
                                   out_specs=out_specs, max_concurrent_steps=st.stages,
                                   init_carry=state0)
    final = pipeline(*ins, *outs)
    if not packed:
        _state_out(final, final_ref.at[r, h, :, vs])


def _chunk_flags(seq_ref: Any, flag_ref: Any, r: Any, c: Any) -> tuple[Any, Any, Any]:
    """``(sequence, opens, closes)`` of chunk ``c`` of row ``r`` from the packed layout's
    ``[R, NC]`` int32 rows (``pallas_chunk.chunk_layout_info``: bit 0 opens, bit 1 closes),
    scalar loads from HBM."""
    flag = flag_ref[r, c]
    return seq_ref[r, c], (flag & 1) != 0, (flag & 2) != 0


def _enter(state: Array, opens: Any, f32_smem: Any, gmem: Any, bar: Any) -> Array:
    """``state``, or where ``opens`` the state a sequence enters with: ``gmem`` (a float32
    ``[rows, cols]`` HBM block, staged through ``f32_smem``), or zeros when ``gmem`` is None.
    A conditional (uniform over the warpgroup): the other chunks neither copy nor read the
    tile."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if gmem is None:
        return jnp.where(opens, 0.0, state)

    def load():
        plgpu.copy_gmem_to_smem(gmem, f32_smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        return _load(f32_smem, plgpu.Layout.WGMMA)

    return jax.lax.cond(opens, load, lambda: state)


def _leave(state: Array, closes: Any, f32_smem: Any, gmem: Any,
           mark: Array | None = None) -> None:
    """Where ``closes``, store the float32 register ``state`` to ``gmem`` through
    ``f32_smem`` (waited for: the next sequence's state may reuse the tile); with ``mark``
    (a vector of zeros or NaN), ``state`` plus its sum (summed only where the chunk closes)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @pl.when(closes)
    def _():
        f32_smem[...] = state if mark is None else state + jnp.sum(mark)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(f32_smem, gmem)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gate_rows(b: Array, chunk: int, key_dim: int) -> tuple[Array, Array, Array]:
    """The gate rows the kernels read, from ``b [R, TP, H]`` (in-chunk inclusive cumsum):
    ``(b [R, H, TP], e^{b_L - b} [R, H, TP], e^{b_L} [R, H, NC * K])`` float32, a chunk's
    values contiguous and ``e^{b_L}`` repeated K times per chunk."""
    R, TP, H = b.shape
    NC = TP // chunk
    bh = jnp.transpose(b, (0, 2, 1))  # [R, TP, H] -> [R, H, TP]: a chunk's gates contiguous
    bc = bh.reshape(R, H, NC, chunk)  # [R, H, TP] -> [R, H, NC, L]
    b_last = bc[..., -1:]  # [R, H, NC, 1]
    decay = jnp.exp(b_last - bc).reshape(R, H, TP)  # e^{b_L - b}, <= 1
    e_last = jnp.broadcast_to(jnp.exp(b_last), (R, H, NC, key_dim)).reshape(R, H, NC * key_dim)
    return bh, decay, e_last


def check_wy_args(delta: bool, fused: bool, knob: str, w: Array | None, minv: Array | None,
                  beta: Array | None) -> None:
    """Raise ``ValueError`` unless the delta rules' WY inputs match the form: ``w`` for the
    separate one, ``minv`` and ``beta`` for the fused one (``knob`` names its switch), none
    for the other ops."""
    if (delta and not fused) != (w is not None):
        raise ValueError(f"w: expected {'[R, TP, H, K]' if delta and not fused else 'None'} "
                         f"for delta={delta}, {knob}={fused}, "
                         f"got {None if w is None else w.shape}")
    if fused != (minv is not None and beta is not None):
        raise ValueError(f"minv, beta: expected both for {knob}={fused}, got "
                         f"{None if minv is None else minv.shape}, "
                         f"{None if beta is None else beta.shape}")


@lowered_once("store_states")
def mosaic_forward(st: MosaicStatic, q: Array, k: Array, v: Array, b: Array,
                   h0: Array | None, *, store_states: bool = False, w: Array | None = None,
                   layout: tuple[Array, Array] | None = None,
                   minv: Array | None = None, beta: Array | None = None
                   ) -> tuple[Array, Array] | tuple[Array, Array, Array]:
    """Run the forward kernel in the chunk layout.

    Args:
        st: static description. q, k: ``[R, TP, H, K]``. v: ``[R, TP, H, V]`` (bf16 / f16,
            TP = NC * L, K in (64, 128), V a multiple of ``st.block_v``); for the delta rules
            (``st.core.delta``) the WY form's ``u``.
        b: ``[R, TP, H]`` float32 in-chunk inclusive cumsum of the log-gates.
        h0: ``[R, H, K, V]`` float32 or None.
        store_states: also return every chunk's entering state (for the backward), and for
            the delta rules every chunk's ``vn``.
        w: ``[R, TP, H, K]`` the WY form's ``w`` (the delta rules only, else None).
        minv, beta: with ``st.fused_wy`` (the delta rules; under a gradient only with
            ``st.fused_grad``) instead of ``w``:
            ``M^{-1}`` ``[R, TP, H, L]`` in q's dtype (``pallas_wy.wy_inverse``) and
            ``beta`` ``[R, TP, H]``; ``v`` is then the values themselves, not ``u``.
        layout: ``(seq_info, flags)`` ``[R, NC]`` int32 (``pallas_chunk.chunk_layout_info``)
            when ``st.core.packed``: each chunk's sequence and whether it opens / closes it;
            ``h0`` and the final states are then ``[N, H, K, V]`` (N sequences). The final
            state of a sequence that owns no chunk is never written (the caller's).

    Returns:
        ``(o [R, TP, H, V] in q's dtype, final [R or N, H, K, V] float32)``, and with
        ``store_states`` a third ``h [R, NC, H, K, V]`` in q's dtype (``S_c`` per chunk) and
        for the delta rules a fourth ``vn [R, TP, H, V]`` in q's dtype (``u - w S_c``).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    c = st.core
    R, NC, L, H, K, V = c.rows, c.n_chunks, c.chunk, c.heads, c.key_dim, c.value_dim
    if st.fused_wy and (not c.delta or (store_states and not st.fused_grad)):
        raise ValueError("st: fused_wy is the delta rules' forward only, and stores the states "
                         f"only with fused_grad (delta={c.delta}, store_states={store_states}, "
                         f"fused_grad={st.fused_grad})")
    fused = st.fused_wy
    check_wy_args(c.delta, fused, "fused_wy", w, minv, beta)
    check_layout(c, layout)
    dtype = q.dtype
    bh, decay, e_last = gate_rows(b, L, K)
    if h0 is None:
        h0 = jnp.zeros((1, 1, K, V), F32)  # never read (core.has_h0 False); keeps one signature
    stages = st.stages
    if store_states:  # the forward under a gradient: the backward's depth (the state slots
        # take shared memory: by default as many stages as still fit, up to 3)
        stages = st.bwd_stages or deepest_stages(lambda s: smem_bytes(
            chunk=L, key_dim=K, block_v=st.block_v, stages=s, itemsize=jnp.dtype(dtype).itemsize,
            store_states=True, delta=c.delta, packed=c.packed, fused_wy=fused) <= SMEM_LIMIT, 3)
    kernel = functools.partial(_forward_kernel, st=dataclasses.replace(st, stages=stages),
                               dtype=dtype, store_states=store_states)
    out_type = [jax.ShapeDtypeStruct((R, NC * L, H, V), dtype),
                jax.ShapeDtypeStruct((c.n_seqs if c.packed else R, H, K, V), F32)]
    cap = operand_swizzle(st.block_v, dtype)
    scratch = [plgpu.SMEM((L, st.block_v), dtype, transforms=_swizzled(st.block_v, dtype, cap)),
               plgpu.Barrier(num_barriers=1)]
    if c.packed:  # the sequences' initial / final state staging tile, before the barrier
        scratch.insert(-1, plgpu.SMEM((K, st.block_v), F32, transforms=_swizzled(st.block_v, F32)))
    if store_states:
        out_type.append(jax.ShapeDtypeStruct((R, NC, H, K, V), dtype))
        if c.delta:
            out_type.append(jax.ShapeDtypeStruct((R, NC * L, H, V), dtype))
    else:
        scratch.insert(0, plgpu.SMEM((K, st.block_v), dtype,
                                     transforms=_swizzled(st.block_v, dtype, cap)))
        if c.delta:  # vn, the B operand of A vn (after the state tile, before the decayed one)
            scratch.insert(1, plgpu.SMEM((L, st.block_v), dtype,
                                         transforms=_swizzled(st.block_v, dtype, cap)))
    f = plgpu.kernel(
        kernel,
        out_type=tuple(out_type),
        scratch_types=tuple(scratch),
        **program_grid("v", V // st.block_v, heads=H, rows=R),
        compiler_params=compiler_params(),
        **interpret_kwargs(),
    )
    if fused:  # beta's rows as the gates', a chunk's values contiguous
        wy = (minv, jnp.transpose(beta.astype(F32), (0, 2, 1)))  # [R, TP, H] -> [R, H, TP]
    else:
        wy = () if w is None else (w,)
    return f(q, k, v, bh, decay, e_last, h0, *wy, *(() if layout is None else layout))


def compiler_params() -> Any:
    """Mosaic GPU compiler parameters of every kernel here.

    Lane semantics (per-thread arrays with explicit layouts, as written here): JAX 0.10's
    default; 0.11 defaults to Warpgroup semantics, whose layout inference found no solution
    for the forward kernel on the H200 (and searched for minutes first)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.CompilerParams(approx_math=True,
                                lowering_semantics=plgpu.LoweringSemantics.Lane)


def pass_empty(st: MosaicStatic, layout: tuple[Array, Array] | None, value: Array,
               through: Array | None) -> Array:
    """``value [N, H, K, V]`` with the rows of sequences that own no chunk replaced by
    ``through`` (zeros when None); ``value`` itself for batch rows. A length-0 packed
    sequence owns no chunk, so the kernels never write its final state or its initial
    state's gradient: it passes its initial state (its final-state cotangent) through."""
    if not st.core.packed:
        return value
    keep = _has_chunk(st.core, *layout)[:, None, None, None]
    return jnp.where(keep, value, jnp.zeros_like(value) if through is None else through)


def triton_layout(core: CoreStatic, layout: tuple[Array, Array] | None) -> tuple[Array, Array]:
    """``(seq_info, flags)`` for the Triton kernels: the packed layout's, or batch rows'."""
    return layout if core.packed else batch_layout_info(core.rows, core.n_chunks)


def _fwd_rule(st: MosaicStatic, q, k, v, g, h0, layout):
    from linearnexus.kernels.common.pallas_chunk import in_chunk_cumsum

    b = in_chunk_cumsum(g, st.core.chunk)
    h0f = None if h0 is None else h0.astype(F32)
    if st.backward == "mosaic":  # the Mosaic backward reads every chunk's entering state
        o, final, h = mosaic_forward(st, q, k, v, b, h0f, store_states=True, layout=layout)
    else:
        (o, final), h = mosaic_forward(st, q, k, v, b, h0f, layout=layout), None
    final = pass_empty(st, layout, final, h0f)
    return (o, final), (q, k, v, b, h0, h, layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mosaic_core(st: MosaicStatic, q, k, v, g, h0, layout=None):
    """Scalar-gated linear attention in the chunk layout on Mosaic GPU.

    Args:
        st: the static description (its ``core``: rows, scalar gate, packed or not; its
            ``backward``: which backward kernels the gradient runs).
        q, k: ``[R, TP, H, K]``. v: ``[R, TP, H, V]``. g: ``[R, TP, H]`` float32 log-gates.
        h0: ``[N, H, K, V]`` or None (N = R for batch rows).
        layout: ``(seq_info, flags)`` ``[R, NC]`` int32 for packed rows
            (``pallas_chunk.chunk_layout_info``), else None.

    Returns:
        ``(o [R, TP, H, V], final [N, H, K, V] float32)``.
    """
    return _fwd_rule(dataclasses.replace(st, backward="pallas"), q, k, v, g, h0, layout)[0]


def _bwd_rule(st: MosaicStatic, res, cts):
    q, k, v, b, h0, h, layout = res
    core = st.core
    if st.backward == "mosaic":
        from linearnexus.kernels.common.mosaic_bwd import mosaic_backward

        do, dfinal = cts
        dq, dk, dv, dg, dh0 = mosaic_backward(st, q, k, v, b, h, do, dfinal, layout=layout)
        if h0 is not None:
            dh0 = pass_empty(st, layout, dh0, dfinal.astype(F32)).astype(h0.dtype)
        return dq, dk, dv, dg, None if h0 is None else dh0, None
    seq_info, flags = triton_layout(core, layout)
    h0f = None if h0 is None else h0.astype(F32)
    # the Triton backward needs every chunk's entering state, which the fused forward kept
    # in registers only: one more Triton fwd_h walk recomputes them
    h, _, final = run_fwd_h(core, k, v, None, b, h0f, seq_info, flags)
    full = (q, k, v, None, b, h0, seq_info, flags, h, None, final)
    dq, dk, dv, _, dg, dh0, _, _ = _core_bwd(core, full, cts)
    return dq, dk, dv, dg, dh0, None


mosaic_core.defvjp(_fwd_rule, _bwd_rule)


def gpu_interpret_reason() -> str | None:
    """Why :func:`gpu_interpret` cannot run here (None: it can): it needs JAX's Mosaic GPU
    interpreter as in JAX 0.11 (``InterpretGPUParams``; 0.10.2's stops on an assertion in
    its layout handling for this kernel)."""
    if not _NEW_REF_API:
        return f"jax {jax.__version__}: the Mosaic GPU interpreter runs these kernels from 0.11"
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: F401
    except ImportError as e:
        return f"jax {jax.__version__} has no Mosaic GPU interpreter ({e})"
    return None


@contextlib.contextmanager
def gpu_interpret(detect_races: bool = False):
    """Run the Mosaic GPU kernels traced inside on the CPU, through JAX's Mosaic GPU
    interpreter (a private API of JAX 0.11: ``jax._src.pallas.mosaic_gpu.interpret``, which
    simulates shared memory, TMA copies, barriers and wgmma), for numerics without a GPU.
    Slow: small shapes only. The kernels differ from the GPU's in two places
    (:func:`wgmma_onto`, :func:`wgmma_regs`), and the interpreter's SMEM -> GMEM copy is
    wrapped to take emit_pipeline's predicate. ``detect_races``: the interpreter's
    happens-before race detector (it prints each race;
    ``jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call.get_races()`` says whether
    any was found)."""
    global _INTERPRETING
    import numpy as np
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    copy_out = gpu_callbacks.copy_smem_to_gmem

    def predicated_copy_out(*, token, predicate, **kwargs):
        # JAX 0.11's interpreter raises on any predicated SMEM -> GMEM copy, which
        # emit_pipeline issues for its output slots (a copy only when the block changes):
        # here a false predicate skips the copy and a true one runs it, as on the GPU
        if predicate is not None and not bool(np.asarray(predicate)):
            return token
        return copy_out(token=token, predicate=None, **kwargs)

    previous, _INTERPRETING = _INTERPRETING, InterpretGPUParams(detect_races=detect_races)
    gpu_callbacks.copy_smem_to_gmem = predicated_copy_out
    try:
        yield
    finally:
        _INTERPRETING = previous
        gpu_callbacks.copy_smem_to_gmem = copy_out
