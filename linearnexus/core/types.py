"""Dimension legend and array aliases used in docstrings and shape comments.

Letters used across the code base::

    B  batch                    T  sequence length (time)
    D  model width (d_model)    C  channels of a conv / inner width (d_inner)
    H  heads                    K  key / query head dim
    V  value head dim           N  state size (SSM) or number of sequences (varlen)
    L  chunk length             W  conv kernel width
    R  low rank of a gate projection

States of linear-attention ops are ``[N, H, K, V]`` float32; the selective scan
state is ``[B, C, N]`` float32.
"""

from __future__ import annotations

from typing import TypeAlias

import jax
import numpy as np

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.Array | np.ndarray
DType: TypeAlias = np.dtype | type

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def is_float_dtype(dtype: DType) -> bool:
    """True for float16, bfloat16, float32 and float64 (the dtypes kernels accept)."""
    return np.dtype(dtype).name in FLOAT_DTYPES


def is_concrete(array: Array) -> bool:
    """True when ``array``'s values are known (not a tracer under ``jit``)."""
    try:
        np.asarray(array)
    except jax.errors.TracerArrayConversionError:
        return False
    return True


def state_dtype(dtype: DType) -> np.dtype:
    """The dtype a recurrent state is kept in: float32, or float64 for float64 inputs."""
    return np.dtype("float64") if np.dtype(dtype) == np.dtype("float64") else np.dtype("float32")
