"""Input checks shared by the linear-attention ops; every error names the argument."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from linearnexus.core.padding import validate_cu_seqlens
from linearnexus.core.types import Array, DType, is_float_dtype


def _shape(array: Array) -> tuple[int, ...]:
    return tuple(getattr(array, "shape", ()))


def check_float(name: str, array: Array) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``array`` has a float dtype."""
    if not hasattr(array, "dtype") or not is_float_dtype(array.dtype):
        raise TypeError(f"{name}: expected a float array (float16/bfloat16/float32/float64), "
                        f"got {getattr(array, 'dtype', type(array).__name__)}")


def check_qkv(q: Array, k: Array, v: Array) -> tuple[int, int, int, int, int]:
    """Check ``q, k: [B, T, H, K]`` and ``v: [B, T, H, V]``; return ``(B, T, H, K, V)``.

    Raises:
        ValueError: wrong rank, mismatched B / T / H / K, or ``T == 0``.
        TypeError: non-float arrays.
    """
    for name, array in (("q", q), ("k", k), ("v", v)):
        if getattr(array, "ndim", None) != 4:
            raise ValueError(f"{name}: expected rank 4 [B, T, H, {'V' if name == 'v' else 'K'}], "
                             f"got shape {_shape(array)}")
        check_float(name, array)
    batch, seq, heads, key_dim = q.shape
    if _shape(k) != _shape(q):
        raise ValueError(f"k: expected the shape of q {_shape(q)} [B, T, H, K], got {_shape(k)}")
    if _shape(v)[:3] != (batch, seq, heads):
        raise ValueError(f"v: expected shape ({batch}, {seq}, {heads}, V) [B, T, H, V] to match q, "
                         f"got {_shape(v)}")
    if seq == 0:
        raise ValueError("q: sequence length T must be >= 1, got T=0")
    return batch, seq, heads, key_dim, v.shape[3]


def check_array(name: str, array: Array | None, shape: tuple[int, ...], legend: str) -> None:
    """Raise naming ``name`` unless ``array`` is None or a float array of ``shape``."""
    if array is None:
        return
    if _shape(array) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} {legend}, got {_shape(array)}")
    check_float(name, array)


def check_initial_state(initial_state: Array | None, n_states: int, heads: int, key_dim: int,
                        value_dim: int) -> None:
    """``initial_state`` must be None or ``[N, H, K, V]`` (N = B, or sequences for varlen)."""
    check_array("initial_state", initial_state, (n_states, heads, key_dim, value_dim), "[N, H, K, V]")


def check_cu_seqlens(cu_seqlens: Array | None, batch: int, seq: int) -> int:
    """Validate packed-sequence offsets; return the state batch N (B when ``cu_seqlens`` is None).

    Raises:
        ValueError / TypeError naming ``cu_seqlens`` (B != 1, wrong rank, not starting at 0,
        not ending at T, decreasing; value checks only on concrete arrays).
    """
    if cu_seqlens is None:
        return batch
    validate_cu_seqlens(cu_seqlens, seq, batch=batch)
    return int(cu_seqlens.shape[0]) - 1


def resolve_scale(scale: float | None, key_dim: int) -> float:
    """``scale`` if given (any finite number), else the default ``K ** -0.5``."""
    if scale is None:
        return float(key_dim) ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    return float(scale)


def compute_dtype(*dtypes: DType) -> np.dtype:
    """The dtype ops compute in: float32, or float64 when any input is float64."""
    out = np.dtype("float32")
    for dtype in dtypes:
        out = jnp.promote_types(out, jnp.dtype(dtype))
    return np.dtype(out)
