"""The call runtime every linear-attention block shares: state, input checks, masks, varlen.

A block's ``__call__`` reads::

    x, call = begin_call(x, cfg.d_model, mask=mask, cu_seqlens=cu_seqlens, mode=mode,
                         mode_threshold=cfg.mode_threshold, dtype=dtype)
    if state is None:
        state = zeros_linear_state(call.n_states, ...)
    else:
        check_linear_state(state, call, ...)
    ... q, k, v, gates from x; the short conv gets ``lengths=call.lengths`` or
    ``cu_seqlens=call.cu_seqlens``; k, v, gates and beta go through ``inert(..., call)`` ...
    y = end_call(out_proj(o), call)

:class:`modules.linear.base.LinearAttentionBlock` writes this once for the q / k / v
blocks (GLA, Simple GLA, RetNet, DeltaNet, Gated DeltaNet); Mamba2 uses it directly.

With a mask, :func:`begin_call` moves each row's valid tokens to the front and zeroes
the pads (:func:`core.padding.layout_tokens`), so every padding pattern becomes right
padding. :func:`inert` then zeroes pads in whatever feeds the state (a zero key / value
writes nothing; a zero log-gate or beta decays nothing), and :func:`end_call` zeroes the
pad outputs and puts tokens back in place. No mechanism math lives here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from linearnexus.core.cache import ConvState, RecurrentState
from linearnexus.core.mode import KernelMode
from linearnexus.core.padding import (
    TokenLayout,
    layout_tokens,
    unlayout,
    validate_cu_seqlens,
    zero_pads,
)
from linearnexus.core.types import Array, DType, state_dtype
from linearnexus.kernels.base import resolve_mode
from linearnexus.modules.base import check_block_input

__all__ = [
    "LinearState",
    "SequenceCall",
    "begin_call",
    "check_linear_state",
    "end_call",
    "inert",
    "zeros_linear_state",
]


class LinearState(NamedTuple):
    """Decoding state of a linear-attention block (a pytree, passed in and returned).

    Attributes:
        conv: the short conv's last ``W - 1`` inputs, ``buffer [B, W-1, C]`` in the compute
            dtype, or None for a block without a short conv. One buffer covers every
            channel the block convolves (q, k and v convs concatenate: depthwise).
        recurrent: the ``[B, H, K, V]`` state, float32 (float64 when the block computes
            in float64: :func:`core.types.state_dtype`; 16-bit between decode steps with
            ``generate.Decoder(state_dtype=...)``, kept so by every update).

    ``B`` is the number of sequences: the batch, or ``N`` with ``cu_seqlens``.
    """

    conv: ConvState | None
    recurrent: RecurrentState


def zeros_linear_state(batch: int, *, conv_width: int | None, conv_channels: int, heads: int,
                       key_dim: int, value_dim: int, dtype: DType | str) -> LinearState:
    """A zero :class:`LinearState`.

    Args:
        batch: number of sequences (B, or N with ``cu_seqlens``).
        conv_width: the short conv's W, or None for no conv (``conv`` is then None).
        conv_channels: channels C of the short conv (ignored when ``conv_width`` is None).
        heads, key_dim, value_dim: H, K, V of the recurrent state.
        dtype: the block's compute dtype: the conv buffer's dtype; the recurrent state
            is ``state_dtype(dtype)`` (float32, float64 for float64).

    Raises:
        ValueError: ``batch < 1`` or a non-positive size.
    """
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    for name, value in (("heads", heads), ("key_dim", key_dim), ("value_dim", value_dim)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    dtype = jnp.dtype(dtype)
    conv = None
    if conv_width is not None:
        if conv_channels < 1:
            raise ValueError(f"conv_channels: must be >= 1, got {conv_channels}")
        conv = ConvState.zeros(batch, conv_width, conv_channels, dtype)
    recurrent = RecurrentState.zeros(batch, heads, key_dim, value_dim, dtype=state_dtype(dtype))
    return LinearState(conv=conv, recurrent=recurrent)


class SequenceCall(NamedTuple):
    """What a block needs to know about one call, from :func:`begin_call`.

    Attributes:
        layout: the :class:`core.padding.TokenLayout` when a mask was given (valid tokens
            moved to the front), else None (nothing moved).
        lengths: ``[B]`` int32 valid tokens per row when a mask was given, else None; pass
            it to the short conv so its cache keeps the last valid inputs.
        cu_seqlens: ``[N+1]`` int32 when the call packs ``N`` sequences (``B == 1``), else
            None; pass it to the conv and the op.
        n_states: the state batch: ``B``, or ``N`` with ``cu_seqlens``.
        mode: the resolved :class:`KernelMode`.
    """

    layout: TokenLayout | None
    lengths: Array | None
    cu_seqlens: Array | None
    n_states: int
    mode: KernelMode


def begin_call(x: Array, d_model: int, *, mask: Array | None = None,
               cu_seqlens: Array | None = None, mode: KernelMode | str | None = None,
               mode_threshold: int = 64, dtype: DType | str) -> tuple[Array, SequenceCall]:
    """Validate a block's inputs and lay its tokens out.

    Args:
        x: ``[B, T, D]`` float, ``D == d_model``.
        d_model: the block's width D.
        mask: optional ``[B, T]`` padding mask (True = valid), any padding pattern.
        cu_seqlens: optional ``[N+1]`` int: ``x`` (``B == 1``) packs ``N`` sequences.
        mode: CHUNK, RECURRENT, their string values, or None: recurrent when
            ``T < mode_threshold`` (T counts every packed token with ``cu_seqlens``).
        mode_threshold: see ``mode``.
        dtype: the block's compute dtype; ``x`` is cast to it.

    Returns:
        ``(x_aligned [B, T, D] in dtype, call)``. With a mask, row b's valid tokens are
        ``x_aligned[b, :call.lengths[b]]`` in order and the pads are zeros.

    Raises:
        ValueError: bad ``x`` or ``mask`` (see :func:`modules.base.check_block_input`),
            both ``mask`` and ``cu_seqlens``, a bad ``cu_seqlens`` or ``B != 1`` with it,
            an unknown ``mode``. TypeError: non-float ``x``, non-integer ``cu_seqlens``.
    """
    valid = check_block_input(x, d_model, mask)
    batch, seq = x.shape[:2]
    if valid is not None and cu_seqlens is not None:
        raise ValueError("mask and cu_seqlens: pass at most one (packed sequences carry no pads)")
    n_states = batch
    if cu_seqlens is not None:
        cu_seqlens = jnp.asarray(cu_seqlens)
        validate_cu_seqlens(cu_seqlens, seq, batch=batch)
        cu_seqlens = cu_seqlens.astype(jnp.int32)
        n_states = cu_seqlens.shape[0] - 1
    run_mode = resolve_mode(mode, seq, mode_threshold)
    x = x.astype(dtype)
    layout = lengths = None
    if valid is not None:
        x, layout = layout_tokens(x, valid)
        lengths = layout.n_valid
    return x, SequenceCall(layout, lengths, cu_seqlens, n_states, run_mode)


def check_linear_state(state: LinearState, call: SequenceCall, *, conv_width: int | None,
                       conv_channels: int, heads: int, key_dim: int, value_dim: int) -> None:
    """Check a caller's state against the block and the call (state batch = ``call.n_states``).

    Raises:
        TypeError: ``state`` is not a :class:`LinearState`.
        ValueError: naming ``state.conv`` or ``state.recurrent`` with the expected shape.
    """
    if not isinstance(state, LinearState):
        raise TypeError(f"state: expected a LinearState, got {type(state).__name__}")
    n = call.n_states
    if conv_width is None:
        if state.conv is not None:
            raise ValueError("state.conv: expected None (this block has no short conv)")
    else:
        expected = (n, conv_width - 1, conv_channels)
        if state.conv is None:
            raise ValueError(f"state.conv: expected a ConvState of shape {expected}, got None")
        if tuple(state.conv.buffer.shape) != expected:
            raise ValueError(
                f"state.conv: expected shape {expected} [B, W-1, C], got {tuple(state.conv.buffer.shape)}")
    expected = (n, heads, key_dim, value_dim)
    if tuple(state.recurrent.state.shape) != expected:
        raise ValueError(
            f"state.recurrent: expected shape {expected} [B, H, K, V], "
            f"got {tuple(state.recurrent.state.shape)}")


def inert(array: Array, call: SequenceCall) -> Array:
    """Zero ``array [B, T, ...]`` at pad positions (a ``jnp.where``) when the call had a mask.

    Use on k, v, log-gates and beta so pads neither decay nor write the state. Identity
    without a mask.
    """
    if call.layout is None:
        return array
    return zero_pads(array, call.layout.valid)


def end_call(y: Array, call: SequenceCall) -> Array:
    """Undo :func:`begin_call`'s layout on ``y [B, T, ...]``: pads -> 0, tokens put back."""
    if call.layout is None:
        return y
    return unlayout(y, call.layout)
