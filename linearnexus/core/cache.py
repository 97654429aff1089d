"""Immutable pytree caches that blocks pass in and get back (no hidden mutable state)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array, DType


def _one_of(name: str, value: int | None, alias: str, alias_value: int | None) -> int:
    """The size given as ``name`` or as its keyword alias (exactly one of them)."""
    if value is not None and alias_value is not None:
        raise TypeError(f"{name} and {alias} name the same size: give one, got {value} and {alias_value}")
    if value is None and alias_value is None:
        raise TypeError(f"{name} (or {alias}) is required")
    return value if value is not None else alias_value


def _check_sizes(**sizes: int) -> None:
    for name, n in sizes.items():
        if n < 0:
            raise ValueError(f"{name}: expected a size >= 0, got {n}")


class ConvState(NamedTuple):
    """The last ``W - 1`` inputs of a causal depthwise conv.

    Attributes:
        buffer: ``[B, W-1, C]``, oldest first.
    """

    buffer: Array

    @classmethod
    def zeros(cls, batch_size: int | None = None, width: int | None = None,
              channels: int | None = None, dtype: DType = jnp.float32, *,
              batch: int | None = None, kernel_size: int | None = None) -> ConvState:
        """Empty history ``[B, W-1, C]`` for a conv of kernel width ``W`` over ``C`` channels.

        Either positional ``zeros(batch_size, width, channels)`` or keywords
        ``zeros(batch=B, kernel_size=W, channels=C)``.

        Raises:
            TypeError: a size given twice (``batch_size`` and ``batch``, ``width`` and
                ``kernel_size``) or missing.
            ValueError: a width below 1 or a negative size.
        """
        batch_size = _one_of("batch_size", batch_size, "batch", batch)
        width = _one_of("width", width, "kernel_size", kernel_size)
        if channels is None:
            raise TypeError("ConvState.zeros: channels is required")
        if width < 1:
            raise ValueError(f"width: expected >= 1, got {width}")
        _check_sizes(batch_size=batch_size, channels=channels)
        return cls(jnp.zeros((batch_size, width - 1, channels), dtype))

    def update(self, buffer: Array) -> ConvState:
        """A new state holding ``buffer`` (same shape required)."""
        if buffer.shape != self.buffer.shape:
            raise ValueError(f"buffer: expected shape {self.buffer.shape}, got {buffer.shape}")
        return ConvState(buffer.astype(self.buffer.dtype))


class RecurrentState(NamedTuple):
    """The recurrent state of a scan, kept in float32 (float64 under x64 tests; bfloat16 or
    float16 between decode steps when asked: :func:`cast_recurrent`).

    Attributes:
        state: ``[B, ...]``; ``[B, C, N]`` for the selective scan, ``[B, H, K, V]`` for
            linear attention.
    """

    state: Array

    @classmethod
    def zeros(cls, batch_size: int | None = None, *shape: int, dtype: DType = jnp.float32,
              batch: int | None = None, channels: int | None = None,
              state_size: int | None = None) -> RecurrentState:
        """A zero state ``[B, *shape]``.

        Either positional ``zeros(batch_size, *shape)`` (any trailing shape, e.g.
        ``H, K, V``) or, for the selective scan, keywords
        ``zeros(batch=B, channels=C, state_size=N)`` -> ``[B, C, N]``.

        Raises:
            TypeError: ``batch_size`` and ``batch`` both given or neither; ``channels`` /
                ``state_size`` mixed with a positional shape, or one without the other.
            ValueError: a negative size.
        """
        batch_size = _one_of("batch_size", batch_size, "batch", batch)
        if channels is not None or state_size is not None:
            if shape:
                raise TypeError("RecurrentState.zeros: give the state shape positionally or as "
                                f"channels= / state_size=, not both (got {shape} and keywords)")
            if channels is None or state_size is None:
                raise TypeError("RecurrentState.zeros: channels and state_size go together, got "
                                f"channels={channels}, state_size={state_size}")
            shape = (channels, state_size)
        _check_sizes(batch_size=batch_size, **{f"shape[{i}]": n for i, n in enumerate(shape)})
        return cls(jnp.zeros((batch_size, *shape), dtype))

    def update(self, state: Array) -> RecurrentState:
        """A new state holding ``state`` (e.g. a scan's final state), cast to this dtype.

        Raises:
            ValueError: ``state`` has another shape.
        """
        if state.shape != self.state.shape:
            raise ValueError(f"state: expected shape {self.state.shape}, got {state.shape}")
        return RecurrentState(state.astype(self.state.dtype))


#: the dtypes a recurrent state may be kept in between decode steps (:func:`cast_recurrent`)
RECURRENT_DTYPES = ("float32", "bfloat16", "float16")


def recurrent_dtype_name(dtype: object) -> str | None:
    """The name of ``dtype`` (a name, ``jnp.bfloat16``, ``np.dtype("float16")``...) if it is
    one of :data:`RECURRENT_DTYPES`, else None."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        return None
    return name if name in RECURRENT_DTYPES else None


def cast_recurrent(state: object, dtype: DType | str) -> object:
    """``state`` (any pytree of block states, e.g. a model's per-layer tuple) with every
    :class:`RecurrentState` array cast to ``dtype``; KV caches, conv buffers and offsets
    unchanged.

    A 16-bit recurrent state halves what a decode step reads and writes for it; blocks
    still update it in float32 and round the new state to its dtype once per step
    (:meth:`RecurrentState.update` keeps the stored dtype), so it drifts from the float32
    state by one rounding per step.

    Raises:
        ValueError: ``dtype`` is not one of :data:`RECURRENT_DTYPES`.
    """
    name = recurrent_dtype_name(dtype)
    if name is None:
        raise ValueError(f"dtype: expected one of {RECURRENT_DTYPES}, got {dtype!r}")
    target = jnp.dtype(name)

    def cast(leaf):
        if isinstance(leaf, RecurrentState):
            return RecurrentState(leaf.state.astype(target))
        return leaf

    return jax.tree.map(cast, state, is_leaf=lambda x: isinstance(x, RecurrentState))
