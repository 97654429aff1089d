"""Batch-1 Mamba2 decoding: the input projection and the layer kernel in one launch, the
layer's work done by whichever program finishes a head's columns last (experimental).

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

The counters are a zeroed ``[H]`` int32 array per launch (aliased to an output). Off a GPU
(Pallas interpret mode runs the programs one after another) the atomics and the counts are
the same, so the tests check the launch against the two separate kernels bit for bit.

Behind ``LINEARNEXUS_DECODE_ARRIVAL=1`` (read at trace time; off by default): not yet timed
on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
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
from linearnexus.kernels.fused_decode.pallas import SsdLayerSpec, _ssd_kernel

#: "1" runs batch-1 Mamba2 layers' ``in_proj`` and layer kernel as one launch (read at trace
#: time; default "0")
ARRIVAL_ENV = "LINEARNEXUS_DECODE_ARRIVAL"
F32 = jnp.float32


def arrival_enabled() -> bool:
    """Whether ``LINEARNEXUS_DECODE_ARRIVAL`` asks for the one-launch projection and layer.

    Raises:
        ValueError: a value other than "0" / "1" (or unset).
    """
    return binary_switch(ARRIVAL_ENV)


def head_columns(sp: SsdLayerSpec) -> int:
    """Columns of the projection row one head's step reads: ``z_h`` and ``x_h`` (``P``
    each), its group's ``B`` and ``C`` (``N`` each) and ``dt_h``."""
    return 2 * sp.head_dim + 2 * sp.d_state + 1


def feeds(cols: Array, h: Array, sp: SsdLayerSpec) -> Array:
    """``[BN]`` bool: which of the projection columns ``cols`` (``z | x | B | C | dt``) head
    ``h``'s step reads."""
    e, p, n = sp.inner, sp.head_dim, sp.d_state
    g = h // (sp.heads // sp.groups)
    b0 = 2 * e + g * n  # the group's B
    c0 = 2 * e + sp.groups * n + g * n  # the group's C
    dt = 2 * e + 2 * sp.groups * n + h
    return (((cols >= h * p) & (cols < (h + 1) * p))
            | ((cols >= e + h * p) & (cols < e + (h + 1) * p))
            | ((cols >= b0) & (cols < b0 + n)) | ((cols >= c0) & (cols < c0 + n))
            | (cols == dt))


@dataclasses.dataclass(frozen=True)
class Statics:
    """The launch's static parts: the projection's (as ``one_row_conv`` builds them), the
    layer kernel's spec (no conv) and the block order."""

    proj: Any  # gemv._Static: pre-norm, in_proj, short conv over x | B | C
    layer: SsdLayerSpec
    reverse: bool


def _kernel(*, x_ref, n1_ref, w_in_ref, cache_ref, cw_ref, cb_ref, h0_ref, a_log_ref,
            dt_bias_ref, d_ref, count0_ref, proj_ref, y_ref, new_cache_ref, final_ref,
            counter_ref, st: Statics):
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
    need = head_columns(st.layer)
    zero = jnp.int32(0)

    def head(h, carry):
        count = jnp.sum(jnp.where(live & feeds(cols, h, st.layer), 1, 0)).astype(jnp.int32)

        @pl.when(count > 0)
        def _():
            before = plt.atomic_add(counter_ref, (h,), count)

            @pl.when(before + count == need)  # this program wrote the head's last column
            def _():
                _ssd_kernel(proj_ref=proj_ref, cache_ref=None, w_ref=None, bias_ref=None,
                            h0_ref=h0_ref, a_log_ref=a_log_ref, dt_bias_ref=dt_bias_ref,
                            d_ref=d_ref, y_ref=y_ref, new_cache_ref=None, final_ref=final_ref,
                            sp=st.layer, ids=(zero, h))

        return carry

    jax.lax.fori_loop(0, st.layer.heads, head, 0)


def ssd_in_layer(x: Array, *, norm1_scale: Array | None, norm1_eps: float | None,
                 w_in_t: Array, conv_cache: Array, conv_weight: Array,
                 conv_bias: Array | None, spec: SsdLayerSpec, state: Array, a_log: Array,
                 dt_bias: Array, d: Array, reverse: bool = True
                 ) -> tuple[Array, Array, Array]:
    """One batch-1 token from the pre-norm through Mamba2's layer kernel in one launch:
    ``ssd(conv(norm1(x) W_in))``, what ``gemv.one_row_conv`` then ``api.ssd_layer_step``
    compute (:func:`ssd_in_layer_separate`), bit for bit in interpret mode.

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
    if x.ndim != 2 or x.shape[0] != 1:
        raise ValueError(f"x: expected [1, D], got shape {tuple(x.shape)}")
    if (norm1_scale is None) != (norm1_eps is None):
        raise ValueError("norm1_scale, norm1_eps: expected both or neither, got "
                         f"{'a scale' if norm1_eps is None else 'an eps'} alone")
    for name, arr, shape in (("w_in_t", w_in_t, (spec.width, depth)),
                             ("state", state, (1, spec.heads, spec.d_state, spec.head_dim)),
                             ("conv_cache", conv_cache, (1, conv_cache.shape[1],
                                                         spec.conv_channels))):
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(arr.shape)}")
    dtype = jnp.dtype(w_in_t.dtype)
    st = Statics(proj=gemv.static_for(depth, spec.width, conv_cache, conv_weight, glu=False,
                                      norm_eps=None if norm1_eps is None else float(norm1_eps),
                                      out_dtype=dtype, conv_start=spec.inner),
                 layer=spec, reverse=reverse)
    if spec.inner % st.proj.block_n or spec.conv_channels % st.proj.block_n:
        raise ValueError(f"spec: E={spec.inner} and C={spec.conv_channels} must be multiples "
                         f"of the projection's {st.proj.block_n} columns a program")
    out = named_pallas_call(
        functools.partial(_kernel, st=st),
        inputs={"x": x, "n1": norm1_scale, "w_in": w_in_t, "cache": conv_cache,
                "cw": conv_weight, "cb": conv_bias, "h0": state, "a_log": a_log,
                "dt_bias": dt_bias, "d": d, "count0": jnp.zeros((spec.heads,), jnp.int32)},
        outputs={"proj": jax.ShapeDtypeStruct((1, spec.width), dtype),
                 "y": jax.ShapeDtypeStruct((1, spec.inner), F32),
                 "new_cache": jax.ShapeDtypeStruct(conv_cache.shape, conv_cache.dtype),
                 "final": jax.ShapeDtypeStruct(state.shape, state.dtype),
                 "counter": jax.ShapeDtypeStruct((spec.heads,), jnp.int32)},
        aliases={"cache": "new_cache", "h0": "final", "count0": "counter"},
        grid=(-(-spec.width // st.proj.block_n),), interpret=interpret_mode(),
        compiler_params=None if interpret_mode() else compiler_params(4, 3),
        name="ssd_in_layer")
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


def layer_call(operands: dict[str, Any], *, spec: SsdLayerSpec, norm1_eps: float | None,
               layer_fallback: Callable[..., Any]) -> tuple[Array, Array, Array]:
    """:func:`ssd_in_layer` on ``operands`` (its array arguments by name), differentiated
    as :func:`ssd_in_layer_separate`."""
    from linearnexus.kernels.common.pallas import with_reference_vjp

    names = tuple(operands)

    def fused(*a):
        return ssd_in_layer(**dict(zip(names, a, strict=True)), spec=spec, norm1_eps=norm1_eps)

    def reference(*a):
        return ssd_in_layer_separate(**dict(zip(names, a, strict=True)), spec=spec,
                                     norm1_eps=norm1_eps, layer_fallback=layer_fallback)

    return with_reference_vjp(fused, reference, *operands.values())


__all__ = ["ARRIVAL_ENV", "Statics", "arrival_enabled", "feeds", "head_columns", "layer_call",
           "ssd_in_layer", "ssd_in_layer_separate"]
