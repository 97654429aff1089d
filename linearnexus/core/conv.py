"""Causal depthwise 1-D convolution with a cache, shared by every block with a short conv."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linearnexus.core.padding import segment_ids_from_cu_seqlens, validate_cu_seqlens
from linearnexus.core.types import Array, is_float_dtype


def _check_inputs_weight_bias(inputs: Array, weight: Array, bias: Array | None) -> int:
    """Validate ``inputs [B, T, C]``, ``weight [W, C]`` and ``bias [C]``; return ``W``."""
    if inputs.ndim != 3:
        raise ValueError(f"inputs: expected rank 3 [B, T, C], got shape {inputs.shape}")
    if not is_float_dtype(inputs.dtype):
        raise TypeError(f"inputs: expected a float dtype, got {inputs.dtype}")
    if weight.ndim != 2:
        raise ValueError(f"weight: expected rank 2 [W, C], got shape {weight.shape}")
    channels = inputs.shape[2]
    if weight.shape[0] < 1 or weight.shape[1] != channels:
        raise ValueError(f"weight: expected [W, {channels}] to match inputs' C, got {weight.shape}")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias: expected shape ({channels},), got {bias.shape}")
    return weight.shape[0]


def _shifted_sum_math(ext: Array, weight: Array) -> Array:
    """``out[b, t, c] = sum_w weight[w, c] * ext[b, t + w, c]``: ``ext [B, W-1+T, C]``,
    ``weight [W, C]`` -> ``[B, T, C]`` in their promoted dtype.

    The backward pass is written out (``_shifted_sum_bwd``). Autodiff gave the input
    gradient as W zero-padded copies of ``g * weight[w]`` summed, and XLA:CPU fused that sum
    into the transposing copy that feeds the projection's weight-gradient matmul, a loop
    that read W arrays with a stride per element: a Gated DeltaNet block's training step
    was ~5% slower with it (docs/benchmarks.md, "CPU training speed, round 4"). A
    ``custom_vjp`` has no forward-mode derivative, so callers opt in
    (``written_backward``) where theirs is reverse-mode only anyway.
    """
    width = weight.shape[0]
    seq = ext.shape[1] - width + 1
    dtype = jnp.promote_types(ext.dtype, weight.dtype)
    out = ext[:, :seq].astype(dtype) * weight[0].astype(dtype)
    for w in range(1, width):  # W is 2..4 in practice: W shifted multiply-adds beat a conv call
        out = out + ext[:, w : w + seq].astype(dtype) * weight[w].astype(dtype)
    return out


def _shifted_sum_fwd(ext: Array, weight: Array) -> tuple[Array, tuple[Array, Array]]:
    return _shifted_sum_math(ext, weight), (ext, weight)


def _shifted_sum_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    ext, weight = res
    width, span = weight.shape[0], ext.shape[1]
    seq = span - width + 1
    gw = g.astype(jnp.promote_types(g.dtype, weight.dtype))
    # d_ext[s] = sum_w g[s - w] weight[w] over 0 <= s - w < T: with g padded by W-1 zeros on
    # both sides, g[s - w] sits at padded[s + W-1 - w]
    padded = jnp.pad(gw, [(0, 0), (width - 1, width - 1), (0, 0)])  # [B, T + 2(W-1), C]
    d_ext = padded[:, width - 1 : width - 1 + span] * weight[0]
    for w in range(1, width):
        lo = width - 1 - w
        d_ext = d_ext + padded[:, lo : lo + span] * weight[w]
    d_weight = jnp.stack([jnp.sum(gw * ext[:, w : w + seq], axis=(0, 1))
                          for w in range(width)])  # [W, C]
    d_ext = d_ext.astype(ext.dtype)
    if jax.default_backend() == "cpu":
        # materialised in [B, W-1+T, C] order: see _shifted_sum_math (a fusion barrier, not math)
        d_ext = jax.lax.optimization_barrier(d_ext)
    return d_ext, d_weight.astype(weight.dtype)


_shifted_sum = jax.custom_vjp(_shifted_sum_math)
_shifted_sum.defvjp(_shifted_sum_fwd, _shifted_sum_bwd)


def depthwise_conv1d_causal(
    inputs: Array,
    weight: Array,
    bias: Array | None = None,
    cache: Array | None = None,
    *,
    lengths: Array | None = None,
    written_backward: bool = False,
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
        written_backward: differentiate through a written-out backward pass (faster
            training on the CPU) instead of autodiff's; it has no forward-mode derivative
            (``jax.jvp``), so the default keeps autodiff. The linear blocks ask for it in
            chunk mode, whose ops are reverse-mode only already.

    Returns:
        ``(out [B, T, C], new_cache [B, W-1, C])``; ``out`` has the promoted dtype of
        inputs and weight, the cache the dtype of ``inputs``.

    Raises:
        ValueError / TypeError: on wrong ranks, channel counts, cache shape or dtypes.
    """
    width = _check_inputs_weight_bias(inputs, weight, bias)
    batch, seq, channels = inputs.shape
    if cache is None:
        cache = jnp.zeros((batch, width - 1, channels), inputs.dtype)
    elif cache.shape != (batch, width - 1, channels):
        raise ValueError(
            f"cache: expected shape {(batch, width - 1, channels)} [B, W-1, C], got {cache.shape}"
        )
    ext = jnp.concatenate([cache.astype(inputs.dtype), inputs], axis=1)  # [B, W-1+T, C]
    dtype = jnp.promote_types(inputs.dtype, weight.dtype)
    if written_backward:
        out = _shifted_sum(ext, weight)  # [B, T, C]
    else:
        out = _shifted_sum_math(ext, weight)  # the same sum, differentiated by autodiff
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


def depthwise_conv1d_varlen(
    inputs: Array,
    weight: Array,
    bias: Array | None = None,
    cache: Array | None = None,
    *,
    cu_seqlens: Array,
) -> tuple[Array, Array]:
    """:func:`depthwise_conv1d_causal` over ``N`` sequences packed into one row.

    Sequence ``n`` holds tokens ``cu_seqlens[n] : cu_seqlens[n+1]`` of ``inputs[0]`` and is
    convolved on its own: a tap that would reach before its start reads ``cache[n]``,
    never the previous sequence's tokens. So the result equals running
    :func:`depthwise_conv1d_causal` on each sequence with its own cache.

    Jit-safe with a traced ``cu_seqlens`` (``N`` comes from its static shape): every tap
    is one gather from ``concat(cache.reshape(N*(W-1), C), inputs[0])``.

    Args:
        inputs: ``[1, T, C]`` float, ``N`` packed sequences.
        weight: ``[W, C]``; ``weight[-1]`` multiplies the current token.
        bias: optional ``[C]``.
        cache: optional ``[N, W-1, C]``, each sequence's previous ``W-1`` inputs, oldest
            first (zeros when None).
        cu_seqlens: ``[N+1]`` int: starts at 0, non-decreasing, ends at ``T``. Sequences
            may be empty. Values are checked only when concrete (not under ``jit``).

    Returns:
        ``(out [1, T, C], new_cache [N, W-1, C])``. ``new_cache[n]`` holds the last ``W-1``
        inputs of sequence ``n`` (drawing on ``cache[n]`` when it is shorter than ``W-1``;
        ``cache[n]`` unchanged when it is empty). ``out`` has the promoted dtype of inputs
        and weight, the cache the dtype of ``inputs``.

    Raises:
        ValueError / TypeError: naming ``inputs``, ``weight``, ``bias``, ``cache`` or
            ``cu_seqlens`` (``B != 1``, wrong rank or dtype, bad values when concrete).
    """
    width = _check_inputs_weight_bias(inputs, weight, bias)
    batch, seq, channels = inputs.shape
    cu_seqlens = jnp.asarray(cu_seqlens)
    validate_cu_seqlens(cu_seqlens, seq, batch=batch)
    n_seq = cu_seqlens.shape[0] - 1
    hist = width - 1
    if cache is None:
        cache = jnp.zeros((n_seq, hist, channels), inputs.dtype)
    elif cache.shape != (n_seq, hist, channels):
        raise ValueError(
            f"cache: expected shape {(n_seq, hist, channels)} [N, W-1, C] with N = "
            f"len(cu_seqlens) - 1, got {cache.shape}"
        )
    cu = cu_seqlens.astype(jnp.int32)
    x = inputs[0]  # [1, T, C] -> [T, C]
    # rows 0 .. N*(W-1)-1 are the caches, row N*(W-1) + t is token t
    table = jnp.concatenate([cache.astype(inputs.dtype).reshape(n_seq * hist, channels), x])
    base = n_seq * hist
    # clip: a malformed traced cu_seqlens gives wrong values, never an out-of-range gather
    seg = jnp.clip(segment_ids_from_cu_seqlens(cu, seq), 0, n_seq - 1)  # [T]
    tok = jnp.arange(seq, dtype=jnp.int32)
    local = tok - cu[seg]  # [T] position of each token inside its sequence

    dtype = jnp.promote_types(inputs.dtype, weight.dtype)
    out = jnp.zeros((seq, channels), dtype)
    for w in range(width):  # tap w reads local position local - (W-1) + w
        back = local - hist + w
        idx = jnp.where(back >= 0, base + tok - hist + w, seg * hist + local + w)  # [T]
        idx = jnp.clip(idx, 0, table.shape[0] - 1)
        out = out + table[idx].astype(dtype) * weight[w].astype(dtype)
    if bias is not None:
        out = out + bias.astype(dtype)

    lens = cu[1:] - cu[:-1]  # [N]
    seq_ids = jnp.arange(n_seq, dtype=jnp.int32)[:, None]  # [N, 1]
    j = jnp.arange(hist, dtype=jnp.int32)[None, :]  # [1, W-1]
    # cache slot j of sequence n is its local position len - (W-1) + j
    from_tokens = base + cu[1:, None] - hist + j
    from_cache = seq_ids * hist + lens[:, None] + j
    cache_idx = jnp.where(lens[:, None] - hist + j >= 0, from_tokens, from_cache)  # [N, W-1]
    cache_idx = jnp.clip(cache_idx, 0, table.shape[0] - 1)
    new_cache = table[cache_idx]  # [N, W-1] -> [N, W-1, C]
    return out[None], new_cache


def depthwise_conv1d(
    inputs: Array,
    weight: Array,
    bias: Array | None = None,
    cache: Array | None = None,
    *,
    lengths: Array | None = None,
    cu_seqlens: Array | None = None,
    written_backward: bool = False,
) -> tuple[Array, Array]:
    """The block-level entry: :func:`depthwise_conv1d_varlen` for packed sequences
    (``cu_seqlens``), else :func:`depthwise_conv1d_causal` (batch rows, ``lengths`` valid
    tokens each when given; ``written_backward`` as there). Same arguments and results as
    those two.

    Raises:
        ValueError: both ``lengths`` and ``cu_seqlens``; otherwise as the function called.
    """
    if cu_seqlens is None:
        return depthwise_conv1d_causal(inputs, weight, bias, cache, lengths=lengths,
                                       written_backward=written_backward)
    if lengths is not None:
        raise ValueError("lengths and cu_seqlens: pass at most one of them")
    return depthwise_conv1d_varlen(inputs, weight, bias, cache, cu_seqlens=cu_seqlens)
