"""What the softmax-attention blocks share: the slot cache, the call prologue and causal masking.

A *slot cache* (``KVCache``, ``MLACache``) is a NamedTuple of ``[B, S, ...]`` buffers
followed by ``lengths: [B]`` int32. It has a fixed size ``S = max_seq_len`` so decoding
never changes array shapes: slot ``s`` of row ``b`` holds the entry of absolute position
``s`` and ``lengths[b]`` says how many slots are filled. A call writes its valid tokens at
slots ``lengths[b] .. lengths[b] + n_valid[b] - 1``; slots past the new length stay zero.

Every block call is::

    xa, layout, cache = begin_call(x, state, mask, ...)   # validate, align, check capacity
    entries = ...                                          # block's own projections of xa
    new_state, keys, allowed = append_and_read(cache, entries, layout, fresh=state is None)
    y = ...                                                # block's own attention over keys
    return unlayout(y, layout), new_state
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from linearnexus.core.padding import TokenLayout, layout_tokens, zero_pads
from linearnexus.core.types import Array, DType
from linearnexus.modules.base import check_block_input, check_state_batch

# ---- the slot cache ----------------------------------------------------------------------


def empty_slots(batch_size: int, max_len: int, feature_shapes: Sequence[tuple[int, ...]],
                dtype: DType | str) -> tuple[Array, ...]:
    """Fields of an empty slot cache: one zero ``[B, S, *shape]`` buffer per feature shape,
    then ``lengths: [B]`` int32 zeros.

    Raises:
        ValueError: ``batch_size < 1`` or ``max_len < 1``.
    """
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
    dtype = jnp.dtype(dtype)
    buffers = tuple(jnp.zeros((batch_size, max_len, *shape), dtype) for shape in feature_shapes)
    return (*buffers, jnp.zeros((batch_size,), jnp.int32))


def bytes_per_token(numbers: int, config: Any, dtype: DType | str | None = None) -> int:
    """Cache bytes of ``numbers`` cached values per token: ``numbers * itemsize`` of ``dtype``
    (None = ``config.dtype``)."""
    return numbers * jnp.dtype(config.dtype if dtype is None else dtype).itemsize


def check_cache(state: Any, init_state: Callable[[int], Any], batch: int) -> None:
    """Check that ``state`` (a slot cache or None) has the type and shapes
    ``init_state(batch)`` would give (only shapes are traced, nothing is allocated).

    Raises:
        TypeError: ``state`` is not the block's cache type.
        ValueError: a field of the wrong shape, named ``state.<field>``.
    """
    if state is None:
        return
    template = jax.eval_shape(lambda: init_state(batch))
    if not isinstance(state, type(template)):
        raise TypeError(
            f"state: expected {type(template).__name__} or None, got {type(state).__name__}"
        )
    for name, leaf, want in zip(template._fields, state, template, strict=True):
        check_state_batch(f"state.{name}", leaf, want.shape)


def check_capacity(layout: TokenLayout, seq_len: int, max_len: int) -> None:
    """Raise ``ValueError`` when a call cannot fit in a cache of ``max_len`` slots.

    ``T > max_len`` is always checked; ``offset + n_valid > max_len`` only when those values
    are concrete (outside ``jit``). Under ``jit`` tokens past the end are dropped silently.
    """
    if seq_len > max_len:
        raise ValueError(
            f"x: sequence length T={seq_len} exceeds max_seq_len={max_len} (the cache size)"
        )
    try:
        total = np.asarray(layout.offset) + np.asarray(layout.n_valid)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if total.size and total.max() > max_len:
        row = int(total.argmax())
        raise ValueError(
            f"state: cache overflow in row {row}: {int(np.asarray(layout.offset)[row])} cached "
            f"+ {int(np.asarray(layout.n_valid)[row])} new tokens > max_seq_len={max_len}"
        )


def write_slots(buffer: Array, new: Array, layout: TokenLayout) -> Array:
    """Write aligned valid tokens ``new: [B, T, ...]`` into ``buffer: [B, S, ...]`` at their
    absolute positions; pads (and, under ``jit``, slots past ``S``) are dropped."""
    batch, slots = buffer.shape[:2]
    target = jnp.where(layout.valid, layout.positions, slots)  # [B, T]; pads -> out of range
    rows = jnp.arange(batch)[:, None]  # [B, 1]
    return buffer.at[rows, target].set(new.astype(buffer.dtype), mode="drop")


# ---- one call ----------------------------------------------------------------------------


def begin_call(x: Array, state: Any, mask: Array | None, *, d_model: int, max_len: int,
               dtype: DType, init_state: Callable[[int], Any]) -> tuple[Array, TokenLayout, Any]:
    """The prologue of a slot-cache attention call.

    Validates ``x: [B, T, D]``, ``mask`` and ``state``, starts from an empty cache when
    ``state`` is None, lays the tokens out (valid ones first, pads zeroed, positions from
    the cache lengths) and checks that they fit.

    Returns:
        ``(xa [B, T, D] in dtype, layout, cache)``.

    Raises:
        ValueError / TypeError: from :func:`check_block_input`, :func:`check_cache` and
            :func:`check_capacity`.
    """
    mask = check_block_input(x, d_model, mask)
    batch, seq, _ = x.shape
    check_cache(state, init_state, batch)
    cache = init_state(batch) if state is None else state
    xa, layout = layout_tokens(x.astype(dtype), mask, cache.lengths)
    check_capacity(layout, seq, max_len)
    return xa, layout, cache


def append_and_read(cache: Any, entries: Sequence[Array], layout: TokenLayout, *,
                    fresh: bool) -> tuple[Any, tuple[Array, ...], Array]:
    """Append this call's valid entries to the cache and return what its queries read.

    Args:
        cache: a slot cache with one buffer per entry.
        entries: ``[B, T, ...]`` per buffer (aligned tokens, e.g. rotated keys and values).
            Pads are zeroed with ``jnp.where`` before anything reads them, so a non-finite
            value at a pad cannot turn a valid output into NaN (``0 * NaN = NaN``).
        layout: the call's :class:`TokenLayout`.
        fresh: the caller passed ``state=None``: queries read only this call's tokens (a
            ``T``-long key axis) instead of the whole ``S``-long cache.

    Returns:
        ``(new_cache, keys, allowed)``: ``keys`` one ``[B, T or S, ...]`` array per buffer,
        in the cache dtype; ``allowed: [B, T, T or S]`` the causal mask
        (:func:`causal_allowed`).
    """
    *buffers, lengths = cache
    if len(entries) != len(buffers):
        raise ValueError(f"entries: expected {len(buffers)} arrays (one per cache buffer), "
                         f"got {len(entries)}")
    entries = [zero_pads(e, layout.valid) for e in entries]
    written = (write_slots(b, e, layout) for b, e in zip(buffers, entries, strict=True))
    new_cache = type(cache)(*written, lengths + layout.n_valid)
    if fresh:  # nothing cached: attend within this call only
        keys = tuple(e.astype(b.dtype) for b, e in zip(buffers, entries, strict=True))
        allowed = causal_allowed(layout, keys[0].shape[1], key_offset=layout.offset)
    else:
        keys = tuple(new_cache[:-1])
        allowed = causal_allowed(layout, keys[0].shape[1])
    return new_cache, keys, allowed


def causal_allowed(layout: TokenLayout, num_keys: int, key_offset: Array | None = None) -> Array:
    """``[B, T, S]`` bool: query i may read key s iff key position <= query position.

    Keys are either the cache (key s is absolute position s: ``key_offset=None``) or this
    call's own aligned tokens (key s is position ``offset + s``: pass ``layout.offset``).
    Empty cache slots and pads sit at positions past every valid query, so they are never
    read by one.
    """
    key_pos = jnp.arange(num_keys, dtype=jnp.int32)[None, :]  # [1, S]
    if key_offset is not None:
        key_pos = key_pos + key_offset[:, None]  # [B, S]
    return key_pos[:, None, :] <= layout.positions[:, :, None]  # [B, T, S]


def masked_softmax(scores: Array, allowed: Array) -> Array:
    """Softmax over the last axis of ``scores`` where ``allowed`` (broadcastable), else 0.

    Every query row must allow at least one key (the causal mask always allows the first).
    """
    big_neg = jnp.finfo(scores.dtype).min
    return jax.nn.softmax(jnp.where(allowed, scores, big_neg), axis=-1)
