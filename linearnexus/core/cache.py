"""Immutable pytree caches that blocks pass in and get back (no hidden mutable state)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from linearnexus.core.types import Array, DType


class ConvState(NamedTuple):
    """The last ``W - 1`` inputs of a causal depthwise conv.

    Attributes:
        buffer: ``[B, W-1, C]``, oldest first.
    """

    buffer: Array

    @classmethod
    def zeros(cls, batch_size: int, width: int, channels: int, dtype: DType = jnp.float32) -> ConvState:
        """Empty history for a conv of kernel ``width`` over ``channels`` channels."""
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        return cls(jnp.zeros((batch_size, width - 1, channels), dtype))

    def update(self, buffer: Array) -> ConvState:
        """A new state holding ``buffer`` (same shape required)."""
        if buffer.shape != self.buffer.shape:
            raise ValueError(f"buffer: expected shape {self.buffer.shape}, got {buffer.shape}")
        return ConvState(buffer.astype(self.buffer.dtype))


class RecurrentState(NamedTuple):
    """The recurrent state of a scan, kept in float32 (float64 under x64 tests).

    Attributes:
        state: ``[B, ...]``; ``[B, C, N]`` for the selective scan, ``[B, H, K, V]`` for
            linear attention.
    """

    state: Array

    @classmethod
    def zeros(cls, batch_size: int, *shape: int, dtype: DType = jnp.float32) -> RecurrentState:
        return cls(jnp.zeros((batch_size, *shape), dtype))

    def update(self, state: Array) -> RecurrentState:
        if state.shape != self.state.shape:
            raise ValueError(f"state: expected shape {self.state.shape}, got {state.shape}")
        return RecurrentState(state.astype(self.state.dtype))
