"""Padding masks, packing (unpad / pad) and ``cu_seqlens`` helpers.

Two ways to run padded batches:

* **Packing**: ``compute_unpadded_indices`` + ``unpad`` turn ``[B, T, ...]`` with a mask
  into ``[total, ...]`` plus ``cu_seqlens`` for ops that take varlen input; ``pad``
  scatters results back.
* **Left alignment**: ``align_valid_left`` moves each row's valid tokens to the front
  (keeping their order), so any mask (left, right or scattered padding) becomes right
  padding; ``restore_alignment`` undoes it. Blocks use it through :func:`layout_tokens`
  (align, zero the pads, give each valid token its absolute position) and
  :func:`unlayout` (zero pad outputs, put tokens back), so pads never touch a state, a
  conv cache or a KV cache, and never reach a valid output.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from linearnexus.core.types import Array


def validate_mask(mask: Array, batch: int, seq: int, *, name: str = "mask") -> Array:
    """Check a ``[B, T]`` padding mask (True / 1 = valid token) and return it as bool.

    A bool mask is always fine. An int or float mask must hold only 0 and 1: concrete
    values are checked (a 0.5, 2 or NaN would otherwise be cast to True silently); traced
    ones (under ``jit``) are cast, with a ``jax.experimental.checkify`` debug check that
    runs when the caller wraps the step in ``checkify.checkify`` (no cost otherwise).

    Raises:
        ValueError: wrong shape, or a concrete non-bool mask with values other than 0 / 1.
        TypeError: a dtype other than bool, int or float.
    """
    mask = jnp.asarray(mask)
    if mask.shape != (batch, seq):
        raise ValueError(f"{name}: expected shape ({batch}, {seq}) [B, T], got {mask.shape}")
    if jnp.issubdtype(mask.dtype, jnp.bool_):
        return mask
    if not (jnp.issubdtype(mask.dtype, jnp.integer) or jnp.issubdtype(mask.dtype, jnp.floating)):
        raise TypeError(f"{name}: expected a bool, int or float dtype, got {mask.dtype}")
    if isinstance(mask, jax.core.Tracer):
        binary = jnp.all((mask == 0) | (mask == 1))
        checkify.check(binary, f"{name}: expected 0 / 1 values (or a bool mask)", debug=True)
        return mask.astype(bool)
    # numpy, not jnp: inside a jit trace a jnp op on a concrete (closed-over) mask is staged
    # out and gives a tracer that cannot be tested with bool()
    values = np.asarray(mask)
    if not np.all((values == 0) | (values == 1)):
        bad = values[(values != 0) & (values != 1)]  # NaN compares unequal to both
        raise ValueError(f"{name}: expected a bool mask or 0 / 1 values, got {values.dtype} "
                         f"values such as {bad[:3].tolist()}")
    return mask.astype(bool)


def compute_unpadded_indices(mask: Array, total: int | None = None) -> tuple[Array, Array]:
    """Flat positions of the valid tokens and the ``cu_seqlens`` of each row.

    Args:
        mask: ``[B, T]`` bool, True at valid tokens.
        total: static number of output slots. ``None`` needs a concrete (non-traced) mask
            and uses the exact count. Under ``jit`` pass a static bound (e.g. ``B * T``):
            unused slots get the index ``B * T``, which :func:`unpad` reads as zeros and
            :func:`pad` drops.

    Returns:
        ``(indices [total] int32, cu_seqlens [B+1] int32)`` with ``indices`` in row-major
        order of ``mask.reshape(-1)``.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask: expected rank 2 [B, T], got shape {mask.shape}")
    flat = jnp.asarray(mask).reshape(-1).astype(bool)
    if total is None:
        total = int(np.asarray(flat).sum())
    fill = flat.shape[0]
    (indices,) = jnp.nonzero(flat, size=total, fill_value=fill)
    lens = jnp.asarray(mask).astype(jnp.int32).sum(axis=1)
    cu_seqlens = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(lens).astype(jnp.int32)])
    return indices.astype(jnp.int32), cu_seqlens


def unpad(x: Array, indices: Array) -> Array:
    """Gather valid tokens: ``[B, T, ...]`` -> ``[total, ...]`` (out-of-range slots -> 0)."""
    flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # [B, T, ...] -> [B*T, ...]
    return jnp.take(flat, indices, axis=0, mode="fill", fill_value=0)


def pad(x_flat: Array, indices: Array, batch: int, seq: int) -> Array:
    """Scatter ``[total, ...]`` back to ``[B, T, ...]`` with zeros at padded positions."""
    if x_flat.shape[0] != indices.shape[0]:
        raise ValueError(
            f"x_flat: expected leading dim {indices.shape[0]} (len(indices)), got {x_flat.shape[0]}"
        )
    out = jnp.zeros((batch * seq, *x_flat.shape[1:]), x_flat.dtype)
    out = out.at[indices].set(x_flat, mode="drop")
    return out.reshape(batch, seq, *x_flat.shape[1:])  # [B*T, ...] -> [B, T, ...]


def align_valid_left(x: Array, mask: Array) -> tuple[Array, Array, Array]:
    """Move each row's valid tokens to the front, in order; pads go to the end.

    Args:
        x: ``[B, T, ...]``.
        mask: ``[B, T]`` bool.

    Returns:
        ``(x_aligned [B, T, ...], perm [B, T] int32, lengths [B] int32)``: ``x_aligned[b, i]
        = x[b, perm[b, i]]``; the first ``lengths[b]`` entries of row b are its valid tokens.
    """
    mask = mask.astype(bool)
    # a stable sort of "is pad" keeps the valid tokens' order
    perm = jnp.argsort(~mask, axis=1, stable=True).astype(jnp.int32)
    lengths = mask.sum(axis=1).astype(jnp.int32)
    return take_time(x, perm), perm, lengths


def take_time(x: Array, perm: Array) -> Array:
    """``out[b, i] = x[b, perm[b, i]]`` for ``x: [B, T, ...]``."""
    idx = perm.reshape(perm.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def restore_alignment(x_aligned: Array, perm: Array) -> Array:
    """Inverse of :func:`align_valid_left` for ``x_aligned: [B, T, ...]``."""
    inverse = jnp.argsort(perm, axis=1).astype(jnp.int32)
    return take_time(x_aligned, inverse)


def lengths_to_mask(lengths: Array, seq: int) -> Array:
    """``[B]`` lengths -> ``[B, T]`` bool mask of right-padded rows."""
    return jnp.arange(seq)[None, :] < jnp.asarray(lengths)[:, None]


class TokenLayout(NamedTuple):
    """Where each token of a block call sits after :func:`layout_tokens`.

    A pytree (arrays and ``None`` only), so it can cross ``jit`` boundaries.

    Attributes:
        perm: ``[B, T]`` int32 permutation from :func:`align_valid_left`, or None when the
            call had no mask (every token valid, nothing moved).
        valid: ``[B, T]`` bool, True for aligned token ``i < n_valid[b]``.
        n_valid: ``[B]`` int32 valid tokens per row.
        offset: ``[B]`` int32 tokens already seen before this call (a KV cache's lengths;
            zeros when the block has no positions).
        positions: ``[B, T]`` int32 absolute position ``offset[b] + i`` of aligned token i
            (also its KV-cache slot). Positions of pads are past every valid one.
    """

    perm: Array | None
    valid: Array
    n_valid: Array
    offset: Array
    positions: Array


def layout_tokens(x: Array, mask: Array | None,
                  offset: Array | None = None) -> tuple[Array, TokenLayout]:
    """Compact each row's valid tokens to the front, zero the pads, give tokens positions.

    Pads are zeroed with ``jnp.where`` (not a multiplication), so a non-finite value at a
    padded position (a NaN embedding, an ``inf``) cannot reach any valid output.

    Args:
        x: ``[B, T, ...]``.
        mask: ``[B, T]`` bool (True = valid) or None (all valid: ``x`` is returned as is).
        offset: ``[B]`` int tokens before this call (None = zeros).

    Returns:
        ``(x_aligned [B, T, ...], layout)``: the first ``layout.n_valid[b]`` entries of row b
        of ``x_aligned`` are its valid tokens in order, the rest are zeros.
    """
    batch, seq = x.shape[:2]
    offset = jnp.zeros((batch,), jnp.int32) if offset is None else offset.astype(jnp.int32)
    if mask is None:
        perm = None
        n_valid = jnp.full((batch,), seq, jnp.int32)
        valid = jnp.ones((batch, seq), bool)
    else:
        x, perm, n_valid = align_valid_left(x, mask)
        valid = lengths_to_mask(n_valid, seq)  # [B, T]
        x = zero_pads(x, valid)
    positions = offset[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]  # [B, T]
    return x, TokenLayout(perm, valid, n_valid, offset, positions)


def unlayout(y: Array, layout: TokenLayout) -> Array:
    """Undo :func:`layout_tokens` on an output ``y: [B, T, ...]``: pads -> 0, tokens put back.

    Pads are zeroed with ``jnp.where``, so whatever a block computed there (even NaN) is
    dropped. With no mask (``layout.perm is None``) ``y`` is returned unchanged.
    """
    if layout.perm is None:
        return y
    return restore_alignment(zero_pads(y, layout.valid), layout.perm)


def zero_pads(x: Array, valid: Array) -> Array:
    """``x: [B, T, ...]`` with zeros where ``valid: [B, T]`` is False.

    A ``jnp.where``, not a multiplication: ``0 * NaN`` is NaN, so multiplying by the mask
    would let a non-finite pad through.
    """
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, 0)


def validate_cu_seqlens(cu_seqlens: Array, total: int, *, batch: int) -> None:
    """Check ``cu_seqlens`` (int, ``[N+1]``, starts at 0, non-decreasing, ends at ``total``).

    Value checks run only on concrete arrays (not under ``jit``).

    Raises:
        ValueError / TypeError naming ``cu_seqlens``.
    """
    if batch != 1:
        raise ValueError(f"cu_seqlens: requires batch size 1 (packed sequences), got B={batch}")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected shape [N+1] with N >= 1, got {cu_seqlens.shape}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise TypeError(f"cu_seqlens: expected an integer dtype, got {cu_seqlens.dtype}")
    try:
        values = np.asarray(cu_seqlens)
    except Exception:  # traced: value checks are skipped under jit
        return
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"cu_seqlens: must start at 0 and end at T={total}, got {values.tolist()}")
    if np.any(np.diff(values) < 0):
        raise ValueError(f"cu_seqlens: must be non-decreasing, got {values.tolist()}")


def segment_ids_from_cu_seqlens(cu_seqlens: Array, total: int) -> Array:
    """``[N+1]`` cu_seqlens -> ``[total]`` int32 sequence id of each packed token."""
    positions = jnp.arange(total)
    return (jnp.searchsorted(cu_seqlens, positions, side="right") - 1).astype(jnp.int32)
