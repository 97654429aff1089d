"""The short conv's one-token step in one Pallas (Triton) kernel.

Per row ``b`` and channel block: load the ``W - 1`` cached inputs and the new one (each a
``[BC]`` vector, so the cache's odd row count never becomes a block shape), form
``act(bias + sum_w weight[w] * window[w])`` in float32, and write the cache shifted by one
token, in place (the cache buffer is aliased to the new one). The channel block is the
largest power of two <= 256 dividing C (no copies around the launch); C without a power-of-two
divisor >= 16 is zero-padded in the glue. Differentiable through the pure-JAX conv's VJP.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linearnexus.core.conv import depthwise_conv1d_causal
from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas import (
    compiler_params,
    interpret_mode,
    named_pallas_call,
    pad_axis,
    with_reference_vjp,
)

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Static:
    width: int
    channels: int
    block_c: int
    has_bias: bool
    silu: bool


def _kernel(*, x_ref, cache_ref, w_ref, bias_ref, y_ref, new_cache_ref, st: _Static):
    b, j = pl.program_id(0), pl.program_id(1)
    span = pl.ds(j * st.block_c, st.block_c)

    def load(ref):
        return ref[...].astype(F32)

    window = [load(cache_ref.at[b, i, span]) for i in range(st.width - 1)]
    x = load(x_ref.at[b, 0, span])
    window.append(x)
    acc = load(bias_ref.at[span]) if st.has_bias else jnp.zeros((st.block_c,), F32)
    for i, value in enumerate(window):  # W is 2..4: unrolled multiply-adds
        acc = acc + load(w_ref.at[i, span]) * value
    if st.silu:
        acc = acc / (1.0 + jnp.exp(-acc))
    y_ref[b, 0, span] = acc.astype(y_ref.dtype)
    for i in range(st.width - 1):  # every cache row was read above: safe in place
        new_cache_ref[b, i, span] = window[i + 1].astype(new_cache_ref.dtype)


def _launch(x, cache, weight, bias, silu):
    batch, _, channels = x.shape
    block = 256
    while block > 16 and channels % block:
        block //= 2
    c_pad = -(-channels // block) * block
    x, cache, weight, bias = (pad_axis(a, -1, c_pad) for a in (x, cache, weight, bias))
    st = _Static(width=weight.shape[0], channels=c_pad, block_c=block,
                 has_bias=bias is not None, silu=silu)
    interpret = interpret_mode()
    out = named_pallas_call(
        functools.partial(_kernel, st=st),
        inputs={"x": x, "cache": cache, "w": weight, "bias": bias},
        outputs={"y": jax.ShapeDtypeStruct(x.shape, x.dtype),
                 "new_cache": jax.ShapeDtypeStruct(cache.shape, x.dtype)},
        aliases={"cache": "new_cache"},
        grid=(batch, c_pad // block), interpret=interpret,
        compiler_params=None if interpret else compiler_params(4 if block >= 256 else 2, 1),
        name="short_conv_step")
    return out["y"][..., :channels], out["new_cache"][..., :channels]


def conv_step_pallas(x: Array, cache: Array, weight: Array, bias: Array | None, *,
                     activation: str | None) -> tuple[Array, Array]:
    """:func:`linearnexus.kernels.conv.conv_step` through the kernel (shapes checked there).

    Raises:
        NotImplementedError: float64 inputs.
    """
    for a in (x, cache, weight, bias):
        if a is not None and jnp.dtype(a.dtype) == jnp.float64:
            raise NotImplementedError("the fused conv step takes float32 / bfloat16 / float16, "
                                      "got float64: use backend='jax'")
    cache = cache.astype(x.dtype)

    def reference(x, cache, weight, bias):
        y, new_cache = depthwise_conv1d_causal(x, weight, bias, cache)
        y = y.astype(F32)
        y = jax.nn.silu(y) if activation == "silu" else y
        return y.astype(x.dtype), new_cache

    def kernel(x, cache, weight, bias):
        return _launch(x, cache, weight, bias, activation == "silu")

    return with_reference_vjp(kernel, reference, x, cache, weight, bias)
