"""Public entry points of the fused one-token layer steps (``pallas.py``) and when they run.

A block calls :func:`layer_kernel_ready` when it decodes one token (no mask, no packed
sequences) and, when it says yes, runs its whole recurrent part through
:func:`delta_layer_step` / :func:`ssd_layer_step` with its own unfused path as
``fallback``: the fallback's VJP is the kernel's backward pass (decoding never needs it;
the op stays differentiable for anyone who does). Otherwise the block runs that unfused
path (the fused projection, the fused conv and state steps of ``kernels/conv`` and
``kernels/common/pallas_step.py``, XLA for the rest).

Switches: ``LINEARNEXUS_FUSED_LAYER=0`` (read at trace time) turns these kernels off;
``LINEARNEXUS_FUSED_STEP=0`` and ``LINEARNEXUS_FUSED_DECODE=0`` turn them off too (they
build on both); a block's ``kernel_backend="jax"`` / ``"naive"`` never uses them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax.numpy as jnp

from linearnexus.core.types import Array, DType
from linearnexus.kernels.base import current_platform
from linearnexus.kernels.common.pallas import interpret_mode, with_reference_vjp
from linearnexus.kernels.common.pallas_step import fused_step_enabled
from linearnexus.kernels.fused_decode.pallas import (
    MAX_TILE,
    DeltaLayerSpec,
    SsdLayerSpec,
    delta_layer,
    ssd_layer,
)

#: set to "0" to run one-token layer steps as separate kernels (conv, gates, step, norm)
FUSED_LAYER_ENV = "LINEARNEXUS_FUSED_LAYER"

#: the compute dtypes the kernels take, and the recurrent-state dtypes they read and write
#: as they are (16-bit decode states: ``generate.Decoder(state_dtype=...)``); any other
#: float state is computed as float32
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def kept_state_dtype(state: Array) -> Array:
    """``state`` as the layer kernels take it: float32, bfloat16 and float16 as they are
    (the kernels update in float32 and round the new state to that dtype once), anything
    else (float64 under x64 tests) as float32."""
    return state if jnp.dtype(state.dtype) in _DTYPES else state.astype(jnp.float32)


def _kept_state(state: Array, fallback: Callable[..., tuple[Array, Array | None, Array]]
                ) -> tuple[Array, Callable[..., tuple[Array, Array | None, Array]]]:
    """``(kept_state_dtype(state), fallback with its new state cast to that dtype)``: the
    kernel's and the reference's outputs must agree in dtype for the VJP."""
    kept = kept_state_dtype(state)
    dtype = kept.dtype

    def reference(*args):
        y, cache, final = fallback(*args)
        return y, cache, final.astype(dtype)

    return kept, reference


def _compiles() -> bool:
    """The kernels compile here (a GPU, not interpret mode). Tests replace this to run the
    automatic choice through the interpreter."""
    return current_platform() == "gpu" and not interpret_mode()


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _fits(spec: DeltaLayerSpec | SsdLayerSpec) -> bool:
    if isinstance(spec, DeltaLayerSpec):
        dims = (spec.key_dim, spec.value_dim)
        conv = spec.conv_width is None or spec.conv_width >= 2
    else:
        dims = (spec.d_state, spec.head_dim)
        conv = spec.conv_width is None or spec.conv_width >= 2
    return conv and all(_pow2(d) for d in dims) and dims[0] * dims[1] <= MAX_TILE


def layer_kernel_ready(spec: DeltaLayerSpec | SsdLayerSpec, dtype: DType,
                       backend: str | None) -> bool:
    """Whether a one-token call of a layer with ``spec`` runs the fused layer kernel.

    True when the kernels compile (a GPU), none of ``LINEARNEXUS_FUSED_LAYER``,
    ``LINEARNEXUS_FUSED_STEP`` is "0", the block's op ``backend`` is automatic (None) or
    ``"pallas"``, ``dtype`` is float32 / bfloat16 / float16, and the head sizes are powers
    of two with ``K * V <= 16384``. The caller checks ``LINEARNEXUS_FUSED_DECODE`` (it
    owns the fused projection the kernel reads).
    """
    return (backend in (None, "pallas") and _compiles() and fused_step_enabled()
            and os.environ.get(FUSED_LAYER_ENV, "1") != "0"
            and jnp.dtype(dtype) in _DTYPES and _fits(spec))


def _check(name: str, array: Array | None, shape: tuple[int, ...], legend: str) -> None:
    if array is None:
        raise ValueError(f"{name}: expected an array of shape {shape} {legend}, got None")
    if tuple(array.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} {legend}, got {tuple(array.shape)}")


def _start(spec: DeltaLayerSpec | SsdLayerSpec, proj: Array, dims: str) -> int:
    """Refuse a spec the kernel does not take, check ``proj [B, F]``; return B."""
    if not _fits(spec):
        raise NotImplementedError(
            f"the fused layer step takes power-of-two head sizes whose state tile has at most "
            f"{MAX_TILE} elements and a conv of width >= 2, got {dims}, W={spec.conv_width}")
    batch = proj.shape[0]
    _check("proj", proj, (batch, spec.width), "[B, F]")
    return batch


def _check_conv(batch: int, width: int, channels: int, cache: Array | None,
                weight: Array | None, bias: Array | None) -> None:
    _check("conv_cache", cache, (batch, width - 1, channels), "[B, W-1, C]")
    _check("conv_weight", weight, (width, channels), "[W, C]")
    if bias is not None:
        _check("conv_bias", bias, (channels,), "[C]")


def delta_layer_step(spec: DeltaLayerSpec, proj: Array, conv_cache: Array | None,
                     conv_weight: Array | None, conv_bias: Array | None, state: Array,
                     a_log: Array | None, dt_bias: Array | None, norm_scale: Array, *,
                     fallback: Callable[..., tuple[Array, Array | None, Array]]
                     ) -> tuple[Array, Array | None, Array]:
    """One token of a DeltaNet / Gated DeltaNet layer between its two projections.

    Args:
        spec: the layer's static sizes and switches (:class:`DeltaLayerSpec`).
        proj: ``[B, F]`` the fused input projection's row (q | k | v | beta logits | decay
            logits | output gate), in the compute dtype.
        conv_cache: ``[B, W-1, 2HK + HV]`` or None without a short conv; conv_weight
            ``[W, 2HK + HV]``; conv_bias ``[2HK + HV]`` or None.
        state: ``[B, H, K, V]`` recurrent state: float32, or bfloat16 / float16 (a 16-bit
            decode state: read and written in that dtype, updated in float32).
        a_log, dt_bias: ``[H]`` (Gated DeltaNet) or None. norm_scale: ``[V]``.
        fallback: the same function of the same arguments, unfused (the block's own
            path): its VJP is the backward pass.

    Returns:
        ``(y [B, H*V] in proj's dtype, new_cache, new_state [B, H, K, V] in the state's
        dtype)``;
        ``y`` is the output norm (and gate), ``o_proj``'s input (the op's output ``o``
        when ``spec.norm_out`` is False).

    Raises:
        ValueError: an argument of the wrong shape, naming it.
        NotImplementedError: a spec the kernel does not take (head sizes not powers of
            two, a state tile over 16384, a conv narrower than 2, ``value_blocks`` that
            does not split V into power-of-two blocks, or ``value_blocks > 1`` with
            ``norm_out`` or a conv).
    """
    batch = _start(spec, proj, f"K={spec.key_dim}, V={spec.value_dim}")
    h, kd, vd = spec.heads, spec.key_dim, spec.value_dim
    blocks = spec.value_blocks
    if blocks < 1 or vd % blocks or not _pow2(vd // blocks):
        raise NotImplementedError(f"spec.value_blocks: expected a divisor of V={vd} leaving a "
                                  f"power of two, got {blocks}")
    if blocks > 1 and (spec.norm_out or spec.conv_width is not None):
        raise NotImplementedError("spec.value_blocks > 1 needs norm_out=False and no conv (the "
                                  "norm spans V; each head's q / k conv cache has one writer)")
    if spec.conv_width is not None:
        _check_conv(batch, spec.conv_width, spec.qkv_width, conv_cache, conv_weight, conv_bias)
    _check("state", state, (batch, h, kd, vd), "[B, H, K, V]")
    if spec.gated:
        _check("a_log", a_log, (h,), "[H]")
        _check("dt_bias", dt_bias, (h,), "[H]")
    _check("norm_scale", norm_scale, (vd,), "[V]")
    state, reference = _kept_state(state, fallback)
    args = (proj, conv_cache, conv_weight, conv_bias, state, a_log, dt_bias, norm_scale)
    return with_reference_vjp(lambda *a: delta_layer(spec, *a), reference, *args)


def ssd_layer_step(spec: SsdLayerSpec, proj: Array, conv_cache: Array | None,
                   conv_weight: Array | None, conv_bias: Array | None, state: Array,
                   a_log: Array, dt_bias: Array, d: Array, *,
                   fallback: Callable[..., tuple[Array, Array | None, Array]]
                   ) -> tuple[Array, Array | None, Array]:
    """One token of a Mamba2 layer between ``in_proj`` and the gated norm.

    Args:
        spec: :class:`SsdLayerSpec`.
        proj: ``[B, 2E + 2GN + H]`` ``in_proj``'s row (z | x | B | C | dt), compute dtype;
            with ``spec.conv_width`` None, x | B | C after the conv and its silu.
        conv_cache: ``[B, W-1, E + 2GN]``; conv_weight ``[W, E + 2GN]``; conv_bias
            ``[E + 2GN]`` or None. All three None when ``spec.conv_width`` is None.
        state: ``[B, H, N, P]``, float32 or bfloat16 / float16 (as
            :func:`delta_layer_step`). a_log, dt_bias: ``[H]``. d: ``[H]`` or ``[H, P]``.
        fallback: the same function, unfused: its VJP is the backward pass.

    Returns:
        ``(y * silu(z) [B, E] float32, new_cache (None without a conv), new_state
        [B, H, N, P] in the state's dtype)``, with ``y`` the SSD output plus the ``D``
        skip, rounded to the compute dtype.

    Raises:
        ValueError: an argument of the wrong shape. NotImplementedError: a spec the kernel
            does not take (``value_blocks`` that does not split P into power-of-two
            blocks among them).
    """
    batch = _start(spec, proj, f"N={spec.d_state}, P={spec.head_dim}")
    h, c = spec.heads, spec.conv_channels
    blocks = spec.value_blocks
    if blocks < 1 or spec.head_dim % blocks or not _pow2(spec.head_dim // blocks):
        raise NotImplementedError(f"spec.value_blocks: expected a divisor of P={spec.head_dim} "
                                  f"leaving a power of two, got {blocks}")
    if spec.conv_width is not None:
        _check_conv(batch, spec.conv_width, c, conv_cache, conv_weight, conv_bias)
    elif any(a is not None for a in (conv_cache, conv_weight, conv_bias)):
        raise ValueError("conv_cache, conv_weight, conv_bias: expected None with "
                         "spec.conv_width None (the row arrives after the conv), got arrays")
    _check("state", state, (batch, h, spec.d_state, spec.head_dim), "[B, H, N, P]")
    _check("a_log", a_log, (h,), "[H]")
    _check("dt_bias", dt_bias, (h,), "[H]")
    _check("d", d, (h, spec.head_dim) if spec.d_per_channel else (h,), "(D)")
    state, reference = _kept_state(state, fallback)
    args = (proj, conv_cache, conv_weight, conv_bias, state, a_log, dt_bias, d)
    return with_reference_vjp(lambda *a: ssd_layer(spec, *a), reference, *args)
