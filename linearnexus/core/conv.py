"""Causal depthwise 1-D convolution with a cache, shared by every block with a short conv."""

from __future__ import annotations

import jax.numpy as jnp

from linearnexus.core.types import Array, is_float_dtype


def depthwise_conv1d_causal(
    inputs: Array,
    weight: Array,
    bias: Array | None = None,
    cache: Array | None = None,
    *,
    lengths: Array | None = None,
) -> tuple[Array, Array]:
    """Causal depthwise conv: ``out[b, t, c] = bias[c] + sum_w weight[w, c] * x[b, t-W+1+w, c]``.

    Positions before the start of ``inputs`` come from ``cache`` (zeros when None), so
    running a sequence in pieces while threading the cache equals running it whole.

    Args:
        inputs: ``[B, T, C]`` float.
        weight: ``[W, C]``; ``weight[-1]`` multiplies the current token.
        bias: optional ``[C]``.
        cache: optional ``[B, W-1, C]``, the previous ``W-1`` inputs, oldest first.
        lengths: optional ``[B]`` int, the number of valid tokens at the start of each row
            (rows padded on the right). The returned cache then holds the last ``W-1``
            valid inputs instead of the last ``W-1`` positions.

    Returns:
        ``(out [B, T, C], new_cache [B, W-1, C])``; ``out`` has the promoted dtype of
        inputs and weight, the cache the dtype of ``inputs``.

    Raises:
        ValueError / TypeError: on wrong ranks, channel counts, cache shape or dtypes.
    """
    if inputs.ndim != 3:
        raise ValueError(f"inputs: expected rank 3 [B, T, C], got shape {inputs.shape}")
    if not is_float_dtype(inputs.dtype):
        raise TypeError(f"inputs: expected a float dtype, got {inputs.dtype}")
    if weight.ndim != 2:
        raise ValueError(f"weight: expected rank 2 [W, C], got shape {weight.shape}")
    batch, seq, channels = inputs.shape
    width = weight.shape[0]
    if weight.shape[1] != channels:
        raise ValueError(f"weight: expected [W, {channels}] to match inputs' C, got {weight.shape}")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias: expected shape ({channels},), got {bias.shape}")
    if cache is None:
        cache = jnp.zeros((batch, width - 1, channels), inputs.dtype)
    elif cache.shape != (batch, width - 1, channels):
        raise ValueError(
            f"cache: expected shape {(batch, width - 1, channels)} [B, W-1, C], got {cache.shape}"
        )
    ext = jnp.concatenate([cache.astype(inputs.dtype), inputs], axis=1)  # [B, W-1+T, C]
    dtype = jnp.promote_types(inputs.dtype, weight.dtype)
    out = jnp.zeros((batch, seq, channels), dtype)
    for w in range(width):  # W is 2..4 in practice: W shifted multiply-adds beat a conv call
        out = out + ext[:, w : w + seq].astype(dtype) * weight[w].astype(dtype)
    if bias is not None:
        out = out + bias.astype(dtype)
    if width == 1:
        new_cache = ext[:, :0]
    elif lengths is None:
        new_cache = ext[:, seq:]
    else:
        # token t sits at ext[:, t + W - 1]; the last W-1 valid ones are ext[:, len : len + W-1]
        idx = jnp.asarray(lengths, jnp.int32)[:, None] + jnp.arange(width - 1)[None, :]
        new_cache = jnp.take_along_axis(ext, idx[:, :, None], axis=1)
    return out, new_cache
