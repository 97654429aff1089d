"""Batch-1 decoding: a recurrent layer's input projection and its layer kernel in one
launch, each head's step done by whichever program finishes that head's columns last
(experimental; Mamba2 and the DeltaNet family).

A batch-1 decode step is a chain of small dependent kernels, and on an H100 each costs a few
microseconds beyond its bytes (``docs/benchmarks.md``, "Fused one-token kernels and where a
batch-1 decode step goes"). A Mamba2 layer runs three: ``in_proj`` with the pre-norm and the
short conv (``gemv.one_row_conv``), the layer kernel (``pallas.ssd_layer``: one program per
head), and ``out_proj`` with the gated norm. The persistent kernel
(``persistent.ssd_layer``) put all three in one launch with grid barriers between them and
was slower: one resident program per SM keeps too few loads in flight.

Here the first two share a launch without any barrier. The launch is ``in_proj``'s own grid
(thousands of small programs, as many loads in flight as the separate kernel). Each program
computes its output columns (and their conv step) exactly as ``one_row_conv``'s program
does, then, for every head those columns feed (head ``h`` reads ``z_h`` and ``x_h``, ``P``
columns each, its group's ``B`` and ``C``, ``N`` each, and ``dt_h``), adds their count to
the head's arrival counter in global memory (an acquire-release atomic at GPU scope, after a
CTA barrier so that every thread's stores precede it). The program whose addition completes
a head's count (``2P + 2N + 1``) has seen, through the atomic's acquire, every column the
head reads, and runs the layer kernel's program for that head (``pallas._ssd_kernel``, the
same body and rounding). No program waits for another: a head's step runs as soon as its
last column is written, overlapping the projection's remaining programs. The programs take
the column blocks in reverse order (``dt`` and ``B | C`` first), so that the last arrivals
are spread over the ``z`` blocks of different heads instead of landing on the few programs
that hold the ``dt`` columns.

The DeltaNet-family layers (:func:`delta_in_layer`) work the same way over their projection
row (q | k | v | beta | decay | output gate; the conv over q | k | v): head ``h`` reads
``q_h`` and ``k_h`` (``K`` each), ``v_h`` (``V``), its beta and decay logits, and its output
gate where the layer kernel applies the gate; its last program runs the layer kernel's
programs for all the head's value blocks in turn (``pallas._delta_kernel``). In reverse
order the last arrivals fall on the heads' ``q`` blocks.

A kernel's registers are those of its largest part, so the layer kernel's state tile sets
them for every projection program (compiled for sm_90: 72-128 a thread against the
separate projection kernel's 32) and fewer programs stay resident per SM. Two choices keep
the weight loads in flight: each program computes :data:`PROJ_ROWS` rows of ``W^T`` (8,
where the separate kernel computes 2), and a Mamba2 head's step runs in :func:`ssd_blocks`
value blocks in turn (4 of 16 columns at P = 64; its ``y`` then equals one block's to
float32 rounding, the state and cache exactly).

The counts go in with one masked vector atomic a program (each head's lane), so a program
of shared columns (Mamba2's ``B | C``, read by every head of their group) adds to all its
heads' counters in parallel instead of one atomic (and one fence) after another. The
counters are a zeroed float32 array per launch (aliased to an output; float32 because JAX
lowers a vector atomic add as a float add, and exact for these counts), ``H`` rounded up to
a power of two. Off a GPU
(Pallas interpret mode runs the programs one after another) the atomics and the counts are
the same, so the tests check the launch against the two separate kernels (bit for bit where
a head's step is one block).

Behind ``LINEARNEXUS_DECODE_ARRIVAL=1`` (read at trace time; off by default): not yet timed
on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas import (
    binary_switch,
    compiler_params,
    interpret_mode,
    named_pallas_call,
)
from linearnexus.kernels.fused_decode import gemv
from linearnexus.kernels.fused_decode.pallas import (
    DeltaLayerSpec,
    SsdLayerSpec,
    _delta_kernel,
    _ssd_kernel,
)

#: "1" runs batch-1 Mamba2 and DeltaNet-family layers' input projection and layer kernel as
#: one launch (read at trace time; default "0")
ARRIVAL_ENV = "LINEARNEXUS_DECODE_ARRIVAL"
F32 = jnp.float32


#: value blocks a Mamba2 head's step runs in, in turn, in the head's last program (at most:
#: blocks of at least 16 of the P columns): the launch's registers are its largest part's,
#: and every projection program pays them in occupancy
SSD_BLOCKS = 4
#: rows of ``W^T`` (output columns) a program of the launch computes by default, where the
#: separate projection kernel computes 2 (``gemv.tiles``). Compiled for sm_90 (Triton 3.6,
#: 4 warps) the launch holds 72-96 registers a thread against the separate kernel's 32
#: (the layer kernel's part sets them), so an SM keeps ~5-7 of its programs resident
#: instead of 16; 8 rows a program keep as many weight bytes in flight per SM as the
#: separate kernel does (5 x 16 KB against 16 x 4 KB). Not yet timed.
PROJ_ROWS = 8
#: the rows a program (a power of two, 2 to 32) in place of :data:`PROJ_ROWS` (read at trace
#: time): for timing one against another
ROWS_ENV = "LINEARNEXUS_ARRIVAL_ROWS"


def ssd_blocks(head_dim: int) -> int:
    """The value blocks (:data:`SSD_BLOCKS` at most) of a Mamba2 head of ``head_dim``
    columns: powers of two of at least 16 columns each."""
    blocks = SSD_BLOCKS
    while blocks > 1 and (head_dim % blocks or head_dim // blocks < 16
                          or (head_dim // blocks) & (head_dim // blocks - 1)):
        blocks //= 2
    return blocks


def proj_rows(conv_start: int, channels: int) -> int:
    """Rows of ``W^T`` a program: :data:`ROWS_ENV` or :data:`PROJ_ROWS`, halved (to 2 at
    least) until it divides the conv's start and channels, which no program may straddle.

    Raises:
        ValueError: a :data:`ROWS_ENV` value that is not a power of two in 2..32.
    """
    raw = os.environ.get(ROWS_ENV, "")
    rows = PROJ_ROWS
    if raw:
        if not raw.isdigit() or int(raw) not in (2, 4, 8, 16, 32):
            raise ValueError(f"{ROWS_ENV}: expected a power of two in 2..32, got {raw!r}")
        rows = int(raw)
    while rows > 2 and (conv_start % rows or channels % rows):
        rows //= 2
    return rows


def counter_slots(heads: int) -> int:
    """The arrival counters' length: ``heads`` rounded up to a power of two (the vector
    atomic's lanes; the slots past ``heads`` stay zero)."""
    return 1 << max(heads - 1, 0).bit_length()


def arrival_enabled() -> bool:
    """Whether ``LINEARNEXUS_DECODE_ARRIVAL`` asks for the one-launch projection and layer.

    Raises:
        ValueError: a value other than "0" / "1" (or unset).
    """
    return binary_switch(ARRIVAL_ENV)


def head_columns(sp: SsdLayerSpec | DeltaLayerSpec) -> int:
    """Columns of the projection row one head's step reads. Mamba2: ``z_h`` and ``x_h``
    (``P`` each), its group's ``B`` and ``C`` (``N`` each) and ``dt_h``. DeltaNet family:
    ``q_h`` and ``k_h`` (``K`` each), ``v_h`` (``V``), the beta logit, the decay logit
    (gated) and the output gate (``V``) where the layer kernel gates (``norm_out``)."""
    if isinstance(sp, SsdLayerSpec):
        return 2 * sp.head_dim + 2 * sp.d_state + 1
    gate = sp.value_dim if sp.norm_out and sp.output_gate else 0
    return 2 * sp.key_dim + sp.value_dim + 1 + int(sp.gated) + gate


def feeds(cols: Array, h: Array, sp: SsdLayerSpec | DeltaLayerSpec) -> Array:
    """``[BN]`` bool: which of the projection columns ``cols`` head ``h``'s step reads
    (:func:`head_columns`)."""
    def within(start, size):
        return (cols >= start) & (cols < start + size)

    if isinstance(sp, DeltaLayerSpec):
        nh, kd, vd, at = sp.heads, sp.key_dim, sp.value_dim, sp.qkv_width
        out = (within(h * kd, kd) | within(nh * kd + h * kd, kd)
               | within(2 * nh * kd + h * vd, vd) | (cols == at + h))
        if sp.gated:
            out = out | (cols == at + nh + h)
        if sp.norm_out and sp.output_gate:
            out = out | within(sp.gate_offset + h * vd, vd)
        return out
    e, p, n = sp.inner, sp.head_dim, sp.d_state
    # lax.div, not //: floor division's sign fix-up on a traced int32 fails in the Triton
    # lowering (docs/gpu_notes.md); h >= 0
    g = jax.lax.div(jnp.asarray(h, jnp.int32), jnp.int32(sp.heads // sp.groups))
    return (within(h * p, p) | within(e + h * p, p)
            | within(2 * e + g * n, n) | within(2 * e + sp.groups * n + g * n, n)
            | (cols == 2 * e + 2 * sp.groups * n + h))


@dataclasses.dataclass(frozen=True)
class Statics:
    """The launch's static parts: the projection's (as ``one_row_conv`` builds them), the
    layer kernel's spec (no conv) and the block order."""

    proj: Any  # gemv._Static: pre-norm, the input projection, short conv
    layer: SsdLayerSpec | DeltaLayerSpec
    reverse: bool


def _kernel(*, x_ref, n1_ref, w_in_ref, cache_ref, cw_ref, cb_ref, h0_ref, a_log_ref,
            dt_bias_ref, d_ref, scale_ref, count0_ref, proj_ref, y_ref, new_cache_ref,
            final_ref, counter_ref, st: Statics):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    del count0_ref  # aliased to counter_ref
    blocks = pl.cdiv(st.proj.width, st.proj.block_n)
    j = pl.program_id(0)
    blk = blocks - 1 - j if st.reverse else j
    gemv._kernel(x_ref=x_ref, add_ref=None, scale_ref=n1_ref, gate_ref=None, w_ref=w_in_ref,
                 res_ref=None, res_add_ref=None, cache_ref=cache_ref, cw_ref=cw_ref,
                 cb_ref=cb_ref, y_ref=proj_ref, new_cache_ref=new_cache_ref, st=st.proj,
                 j=blk)
    if not interpret_mode():  # (the interpreter runs a program as one thread)
        plt.debug_barrier()  # every thread's stores of the columns precede the release below
    cols = blk * st.proj.block_n + jnp.arange(st.proj.block_n)  # [BN]
    live = cols < st.proj.width
    sp = st.layer
    need = head_columns(sp)
    zero = jnp.int32(0)

    def step(h):  # the layer kernel's programs for head h, its value blocks in turn
        def block(vb, carry):
            if isinstance(sp, SsdLayerSpec):
                _ssd_kernel(proj_ref=proj_ref, cache_ref=None, w_ref=None, bias_ref=None,
                            h0_ref=h0_ref, a_log_ref=a_log_ref, dt_bias_ref=dt_bias_ref,
                            d_ref=d_ref, y_ref=y_ref, new_cache_ref=None, final_ref=final_ref,
                            sp=sp, ids=(zero, h, vb))
            else:
                _delta_kernel(proj_ref=proj_ref, cache_ref=None, w_ref=None, bias_ref=None,
                              h0_ref=h0_ref, a_log_ref=a_log_ref, dt_bias_ref=dt_bias_ref,
                              scale_ref=scale_ref, y_ref=y_ref, new_cache_ref=None,
                              final_ref=final_ref, sp=sp, ids=(zero, h, vb))
            return carry

        jax.lax.fori_loop(0, sp.value_blocks, block, 0)

    # every head's count of this program's columns at once, and one masked vector atomic
    # for them all: a program of shared columns (Mamba2's B | C feed every head of their
    # group) then adds to all its heads' counters in parallel lanes, not one after another
    slots = counter_slots(sp.heads)
    hs = jnp.arange(slots)  # [HS]
    fed = (feeds(cols[None, :], hs[:, None], sp) & live[None, :]
           & (hs < sp.heads)[:, None])  # [HS, BN]
    # float32 counts, exact for these small integers: JAX 0.10 / 0.11 lower an atomic add of
    # an integer *vector* as a float add (their Triton rule tests the value's type, a tensor,
    # for an integer type), so the counters are float32 and the add is a float add on purpose
    counts = jnp.sum(fed.astype(F32), axis=1)  # [HS]
    # only the lanes with columns to count touch memory (the interpreter has no masked
    # atomics: it adds the zeros, which changes no counter, and no zero lane is read below)
    before = plt.atomic_add(counter_ref, (pl.ds(0, slots),), counts,
                            mask=None if interpret_mode() else counts > 0)
    done = (counts > 0) & (before + counts == need)  # [HS]: this program wrote the last column

    def head(h, carry):
        @pl.when(jnp.sum(jnp.where(hs == h, done, False).astype(jnp.int32)) > 0)
        def _():
            step(h)

        return carry

    jax.lax.fori_loop(0, sp.heads, head, 0)


def _launch(inputs: dict[str, Any], *, sp: SsdLayerSpec | DeltaLayerSpec,
            norm1_eps: float | None, conv_start: int, out_width: int, out_dtype: Any,
            reverse: bool, name: str) -> dict[str, Array]:
    """The launch over ``inputs`` (the kernel's operands by name, without the counters):
    ``{"proj", "y", "new_cache", "final"}``."""
    x, w_in_t, conv_cache, state = inputs["x"], inputs["w_in"], inputs["cache"], inputs["h0"]
    dtype = jnp.dtype(w_in_t.dtype)
    bk, _ = gemv.tiles(x.shape[-1])  # the separate kernel's contraction tiles
    st = Statics(proj=gemv.static_for(x.shape[-1], sp.width, conv_cache, inputs["cw"],
                                      glu=False,
                                      norm_eps=None if norm1_eps is None else float(norm1_eps),
                                      out_dtype=dtype, conv_start=conv_start,
                                      blocks=(bk, proj_rows(conv_start, conv_cache.shape[2]))),
                 layer=sp, reverse=reverse)
    if conv_start % st.proj.block_n or conv_cache.shape[2] % st.proj.block_n:
        raise ValueError(f"spec: the conv's start {conv_start} and channels "
                         f"{conv_cache.shape[2]} must be multiples of the projection's "
                         f"{st.proj.block_n} columns a program")
    return named_pallas_call(
        functools.partial(_kernel, st=st),
        inputs={**inputs, "count0": jnp.zeros((counter_slots(sp.heads),), F32)},
        outputs={"proj": jax.ShapeDtypeStruct((1, sp.width), dtype),
                 "y": jax.ShapeDtypeStruct((1, out_width), out_dtype),
                 "new_cache": jax.ShapeDtypeStruct(conv_cache.shape, conv_cache.dtype),
                 "final": jax.ShapeDtypeStruct(state.shape, state.dtype),
                 "counter": jax.ShapeDtypeStruct((counter_slots(sp.heads),), F32)},
        aliases={"cache": "new_cache", "h0": "final", "count0": "counter"},
        grid=(-(-sp.width // st.proj.block_n),), interpret=interpret_mode(),
        compiler_params=None if interpret_mode() else compiler_params(4, 3), name=name)


def _check(x: Array, norm1_scale: Array | None, norm1_eps: float | None,
           shapes: tuple[tuple[str, Array, tuple[int, ...]], ...]) -> None:
    if x.ndim != 2 or x.shape[0] != 1:
        raise ValueError(f"x: expected [1, D], got shape {tuple(x.shape)}")
    if (norm1_scale is None) != (norm1_eps is None):
        raise ValueError("norm1_scale, norm1_eps: expected both or neither, got "
                         f"{'a scale' if norm1_eps is None else 'an eps'} alone")
    for name, arr, shape in shapes:
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(arr.shape)}")


def ssd_in_layer(x: Array, *, norm1_scale: Array | None, norm1_eps: float | None,
                 w_in_t: Array, conv_cache: Array, conv_weight: Array,
                 conv_bias: Array | None, spec: SsdLayerSpec, state: Array, a_log: Array,
                 dt_bias: Array, d: Array, reverse: bool = True
                 ) -> tuple[Array, Array, Array]:
    """One batch-1 token from the pre-norm through Mamba2's layer kernel in one launch:
    ``ssd(conv(norm1(x) W_in))``, what ``gemv.one_row_conv`` then ``api.ssd_layer_step``
    compute (:func:`ssd_in_layer_separate`): in interpret mode bit for bit where a head's
    step is one block (:func:`ssd_blocks`), else ``y`` to float32 rounding.

    Args:
        x: ``[1, D]`` in ``w_in_t``'s dtype; norm1_scale ``[D]`` and norm1_eps (the
            pre-norm), or both None.
        w_in_t: ``[F, D]``, F = ``2E + 2GN + H`` (z | x | B | C | dt rows).
        conv_cache: ``[1, W - 1, C]`` over x | B | C (``C = E + 2GN``, from column E on);
            conv_weight ``[W, C]``; conv_bias ``[C]`` or None.
        spec: the layer kernel's spec without a conv (``conv_width=None``), one value block.
        state: ``[1, H, N, P]`` (float32, or a 16-bit decode state as it is); a_log,
            dt_bias ``[H]``; d ``[H]`` or ``[H, P]``.
        reverse: the programs take the column blocks last first (the default; see the
            module docstring).

    Returns:
        ``(y * silu(z) [1, E] float32, new conv cache, new state)``, the last two in place.

    Raises:
        ValueError: a spec with a conv or value blocks, a batch other than 1, or operands
            whose shapes disagree (named).
    """
    if spec.conv_width is not None or spec.value_blocks != 1:
        raise ValueError(f"spec: expected conv_width=None and value_blocks=1 (the conv in "
                         f"in_proj, one program a head), got {spec}")
    depth = x.shape[-1]
    _check(x, norm1_scale, norm1_eps, (
        ("w_in_t", w_in_t, (spec.width, depth)),
        ("state", state, (1, spec.heads, spec.d_state, spec.head_dim)),
        ("conv_cache", conv_cache, (1, conv_cache.shape[1], spec.conv_channels))))
    blocks = ssd_blocks(spec.head_dim)
    out = _launch({"x": x, "n1": norm1_scale, "w_in": w_in_t, "cache": conv_cache,
                   "cw": conv_weight, "cb": conv_bias, "h0": state, "a_log": a_log,
                   "dt_bias": dt_bias, "d": d, "scale": None},
                  sp=dataclasses.replace(spec, value_blocks=blocks), norm1_eps=norm1_eps,
                  conv_start=spec.inner, out_width=spec.inner, out_dtype=F32,
                  reverse=reverse, name="ssd_in_layer")
    return out["y"], out["new_cache"], out["final"]


def ssd_in_layer_separate(x: Array, *, norm1_scale: Array | None, norm1_eps: float | None,
                          w_in_t: Array, conv_cache: Array, conv_weight: Array,
                          conv_bias: Array | None, spec: SsdLayerSpec, state: Array,
                          a_log: Array, dt_bias: Array, d: Array,
                          layer_fallback: Callable[..., Any]) -> tuple[Array, Array, Array]:
    """:func:`ssd_in_layer` as the two separate kernels (its backward pass, and what the
    tests hold it to); ``layer_fallback``: the layer kernel's reference."""
    from linearnexus.kernels.fused_decode.api import ssd_layer_step

    proj, cache = gemv.one_row_conv(x, w_in_t, conv_cache, conv_weight, conv_bias,
                                    conv_start=spec.inner, transposed=True,
                                    norm_scale=norm1_scale, norm_eps=norm1_eps)  # [1, F]
    y, _, final = ssd_layer_step(spec, proj, None, None, None, state, a_log, dt_bias, d,
                                 fallback=layer_fallback)  # [1, E] float32
    return y, cache, final


def delta_in_layer(x: Array, *, norm1_scale: Array | None, norm1_eps: float | None,
                   w_in_t: Array, conv_cache: Array, conv_weight: Array,
                   conv_bias: Array | None, spec: DeltaLayerSpec, state: Array,
                   a_log: Array | None, dt_bias: Array | None, norm_scale: Array,
                   reverse: bool = True) -> tuple[Array, Array, Array, Array]:
    """One batch-1 token from the pre-norm through a DeltaNet-family layer kernel in one
    launch: what ``gemv.one_row_conv`` (the conv over q | k | v) then
    ``api.delta_layer_step`` compute (:func:`delta_in_layer_separate`), bit for bit in
    interpret mode.

    Args:
        x: ``[1, D]``; norm1_scale ``[D]`` and norm1_eps, or both None.
        w_in_t: ``[F, D]`` (q | k | v | beta | decay | output gate rows, ``spec.width``).
        conv_cache: ``[1, W - 1, 2HK + HV]``; conv_weight ``[W, 2HK + HV]``; conv_bias or
            None.
        spec: the layer kernel's spec without a conv (``conv_width=None``); its value
            blocks run in turn in the head's last program.
        state: ``[1, H, K, V]``; a_log, dt_bias ``[H]`` (gated) or None; norm_scale ``[V]``.
        reverse: the programs take the column blocks last first.

    Returns:
        ``(proj [1, F], y [1, H*V] in proj's dtype, new conv cache, new state)``: ``y`` as
        ``delta_layer_step`` gives it (``o`` without the norm when ``spec.norm_out`` is
        False), ``proj`` for ``o_proj``'s gate.

    Raises:
        ValueError: a spec with a conv, a batch other than 1, or operands whose shapes
            disagree (named).
    """
    if spec.conv_width is not None:
        raise ValueError(f"spec: expected conv_width=None (the conv in the input "
                         f"projection), got {spec}")
    depth = x.shape[-1]
    _check(x, norm1_scale, norm1_eps, (
        ("w_in_t", w_in_t, (spec.width, depth)),
        ("state", state, (1, spec.heads, spec.key_dim, spec.value_dim)),
        ("conv_cache", conv_cache, (1, conv_cache.shape[1], spec.qkv_width))))
    out = _launch({"x": x, "n1": norm1_scale, "w_in": w_in_t, "cache": conv_cache,
                   "cw": conv_weight, "cb": conv_bias, "h0": state, "a_log": a_log,
                   "dt_bias": dt_bias, "d": None, "scale": norm_scale},
                  sp=spec, norm1_eps=norm1_eps, conv_start=0,
                  out_width=spec.heads * spec.value_dim, out_dtype=w_in_t.dtype,
                  reverse=reverse, name="delta_in_layer")
    return out["proj"], out["y"], out["new_cache"], out["final"]


def delta_in_layer_separate(x: Array, *, norm1_scale: Array | None, norm1_eps: float | None,
                            w_in_t: Array, conv_cache: Array, conv_weight: Array,
                            conv_bias: Array | None, spec: DeltaLayerSpec, state: Array,
                            a_log: Array | None, dt_bias: Array | None, norm_scale: Array,
                            layer_fallback: Callable[..., Any]
                            ) -> tuple[Array, Array, Array, Array]:
    """:func:`delta_in_layer` as the two separate kernels (its backward pass, and what the
    tests hold it to)."""
    from linearnexus.kernels.fused_decode.api import delta_layer_step

    proj, cache = gemv.one_row_conv(x, w_in_t, conv_cache, conv_weight, conv_bias,
                                    conv_start=0, transposed=True, norm_scale=norm1_scale,
                                    norm_eps=norm1_eps)  # [1, F]
    y, _, final = delta_layer_step(spec, proj, None, None, None, state, a_log, dt_bias,
                                   norm_scale, fallback=layer_fallback)  # [1, H*V]
    return proj, y, cache, final


def layer_call(operands: dict[str, Any], *, spec: SsdLayerSpec | DeltaLayerSpec,
               norm1_eps: float | None, layer_fallback: Callable[..., Any]) -> tuple:
    """:func:`ssd_in_layer` or :func:`delta_in_layer` (by the spec's kind) on ``operands``
    (its array arguments by name), differentiated as the separate kernels
    (:func:`ssd_in_layer_separate`, :func:`delta_in_layer_separate`)."""
    from linearnexus.kernels.common.pallas import with_reference_vjp

    ssd = isinstance(spec, SsdLayerSpec)
    kernel = ssd_in_layer if ssd else delta_in_layer
    separate = ssd_in_layer_separate if ssd else delta_in_layer_separate
    names = tuple(operands)

    def fused(*a):
        return kernel(**dict(zip(names, a, strict=True)), spec=spec, norm1_eps=norm1_eps)

    def reference(*a):
        return separate(**dict(zip(names, a, strict=True)), spec=spec, norm1_eps=norm1_eps,
                        layer_fallback=layer_fallback)

    return with_reference_vjp(fused, reference, *operands.values())


__all__ = ["ARRIVAL_ENV", "Statics", "arrival_enabled", "delta_in_layer",
           "delta_in_layer_separate", "feeds", "head_columns", "layer_call", "ssd_in_layer",
           "ssd_in_layer_separate"]
