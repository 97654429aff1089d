"""Public entry point of the short conv's one-token step and its backends.

``conv_step`` is what a block's short conv runs while decoding (``T == 1``): the output
``act(bias + sum_w weight[w] * [cache | x][w])`` and the cache shifted by one token. On a
GPU it is one Pallas kernel (``step.py``) that reads the ``[W-1, C]`` cache once and
writes it once; elsewhere (and with ``LINEARNEXUS_FUSED_STEP=0``) the pure-JAX conv of
``core/conv.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linearnexus.core.conv import depthwise_conv1d_causal
from linearnexus.core.types import Array
from linearnexus.kernels.base import current_platform
from linearnexus.kernels.common.pallas import interpret_mode
from linearnexus.kernels.common.pallas_step import fused_step_enabled

BACKENDS = ("pallas_step", "jax")
_ACTIVATIONS = {"silu": jax.nn.silu, None: lambda y: y}
_FUSED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def conv_step(x: Array, cache: Array, weight: Array, bias: Array | None = None, *,
              activation: str | None = "silu", backend: str | None = None) -> tuple[Array, Array]:
    """One token of the causal depthwise conv with its rolling cache.

    Args:
        x: ``[B, 1, C]`` float. cache: ``[B, W-1, C]``, the previous ``W - 1`` inputs,
            oldest first (W >= 2). weight: ``[W, C]`` (``weight[-1]`` multiplies ``x``).
        bias: ``[C]`` or None. activation: ``"silu"`` or None.
        backend: ``"pallas_step"`` (the fused kernel; interpret mode off a GPU), ``"jax"``
            (``core.conv``), or None: the fused kernel on a GPU, else ``"jax"``.

    Returns:
        ``(y [B, 1, C] in x's dtype, new_cache [B, W-1, C] in x's dtype)``; ``y`` is summed in
        the promoted dtype of x and weight (float32 in the kernel).

    Raises:
        ValueError: bad shapes, an unknown ``backend`` or ``activation``.
        NotImplementedError: ``backend="pallas_step"`` with float64 inputs.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected 'silu' or None, got {activation!r}")
    if x.ndim != 3 or x.shape[1] != 1:
        raise ValueError(f"x: expected [B, 1, C] (one token), got shape {x.shape}")
    batch, _, channels = x.shape
    width = weight.shape[0]
    if width < 2 or weight.shape != (width, channels):
        raise ValueError(f"weight: expected [W >= 2, {channels}], got shape {weight.shape}")
    if cache.shape != (batch, width - 1, channels):
        raise ValueError(f"cache: expected shape {(batch, width - 1, channels)} [B, W-1, C], "
                         f"got {cache.shape}")
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend: conv_step has no backend {backend!r}; choose one of "
                         f"{list(BACKENDS)}")
    if backend is None:
        fused = (current_platform() == "gpu" and not interpret_mode() and fused_step_enabled()
                 and all(jnp.dtype(a.dtype) in _FUSED_DTYPES
                         for a in (x, cache, weight) if a is not None))
        backend = "pallas_step" if fused else "jax"
    if backend == "pallas_step":
        from linearnexus.kernels.conv.step import conv_step_pallas

        return conv_step_pallas(x, cache, weight, bias, activation=activation)
    y, new_cache = depthwise_conv1d_causal(x, weight, bias, cache.astype(x.dtype))
    return _ACTIVATIONS[activation](y).astype(x.dtype), new_cache
