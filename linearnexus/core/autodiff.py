"""Written-out backward passes for the layers every LM runs, and the switch that turns them off.

On the CPU, XLA's code for autodiff's backward of a few everyday layers is slow: it fuses
the elementwise derivative of SwiGLU's ``silu`` into the transposing copy that feeds the
weight-gradient matmul (one strided loop recomputing ``exp`` per element), and it builds the
softmax attention's gradient through padded and transposed copies. Here those layers carry
a ``jax.custom_vjp`` whose backward is written out: the forward saves what the backward
needs (``sigmoid(gate)``, the attention probabilities) and the backward is the textbook
formula as plain matmuls and elementwise products. On the nanoGPT CPU recipe (gpt-small,
2-core CPU) this made a training step 1.33x faster on one device and 1.28x on two
(``docs/benchmarks.md``, CPU training round 5); the results equal autodiff's up to float
rounding (``tests/test_autodiff.py``). With a bfloat16 compute dtype SwiGLU's gate math
runs in float32 here (autodiff's path and one-token decoding run it in bfloat16), so the
two differ by about one bfloat16 ulp.

A ``custom_vjp`` has no forward-mode derivative: ``jax.jvp`` (and forward-over-reverse
Hessian-vector products) through a model fail on it. The written-out backwards are used
unless turned off, for the calls traced under :func:`autodiff_backward` or for a whole
process with ``LINEARNEXUS_WRITTEN_BACKWARD=0``; both are read at trace time, so a
function ``jax.jit`` traced before keeps what it was traced with (jit a fresh function
inside the block). This covers softmax attention and MLP stacks (GPT-style models); the
linear and SSM ops in chunk mode are reverse-mode only whatever the switch (their
``custom_vjp`` is the kernel's own backward): forward mode through them needs
``mode="recurrent"``.

    from linearnexus.core.autodiff import autodiff_backward

    with autodiff_backward():
        _, d_logits = jax.jvp(lambda p: nnx.merge(graphdef, p)(tokens)[0], (params,), (tangent,))
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array

__all__ = [
    "WRITTEN_BACKWARD_ENV",
    "autodiff_backward",
    "grouped_softmax_attention",
    "rotate_half_pairs",
    "swiglu",
    "written_backward_enabled",
]

#: set to "0" to differentiate every layer with autodiff (what :func:`autodiff_backward`
#: does for a block of code)
WRITTEN_BACKWARD_ENV = "LINEARNEXUS_WRITTEN_BACKWARD"

_FORCED_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("autodiff_only", default=False)


def written_backward_enabled() -> bool:
    """Whether layers use their written-out backward (read at trace time): True unless
    inside :func:`autodiff_backward` or with ``LINEARNEXUS_WRITTEN_BACKWARD=0``."""
    return not _FORCED_OFF.get() and os.environ.get(WRITTEN_BACKWARD_ENV, "1") != "0"


@contextlib.contextmanager
def autodiff_backward() -> Iterator[None]:
    """Trace the layers inside with autodiff's backward, which has forward-mode derivatives
    (``jax.jvp``), instead of their written-out one. Affects functions traced inside the
    block (a ``jax.jit`` compiled earlier keeps what it was traced with)."""
    token = _FORCED_OFF.set(True)
    try:
        yield
    finally:
        _FORCED_OFF.reset(token)


def _math_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for the low-precision floats, float64 for float64."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _tn(a: Array, b: Array) -> Array:
    """``a^T b`` for ``a: [N, I], b: [N, J]`` -> ``[I, J]`` (contract the token axis)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())))


# ---- SwiGLU ------------------------------------------------------------------------------


def swiglu(x: Array, w_gate: Array, w_up: Array, w_down: Array, dtype: jnp.dtype) -> Array:
    """``(silu(x W_gate) * (x W_up)) W_down`` with a written-out backward.

    Args:
        x: ``[N, D]`` (tokens flattened). w_gate, w_up: ``[D, F]``. w_down: ``[F, D]``.
        dtype: the compute dtype: ``x`` and the weights are cast to it for the matmuls (as
            ``nnx.Linear(dtype=...)`` does); the gate's elementwise math runs in float32
            (float64 for float64).

    Returns:
        ``[N, D]`` in ``dtype``. Gradients come back in each argument's own dtype (the casts
        here are differentiated by autodiff).
    """
    return _swiglu(*(a.astype(dtype) for a in (x, w_gate, w_up, w_down)))


@jax.custom_vjp
def _swiglu(x: Array, w_gate: Array, w_up: Array, w_down: Array) -> Array:
    return _swiglu_fwd(x, w_gate, w_up, w_down)[0]


def _swiglu_fwd(x, w_gate, w_up, w_down):
    mt = _math_dtype(x.dtype)
    gate = (x @ w_gate).astype(mt)  # [N, D] @ [D, F] -> [N, F]
    up = (x @ w_up).astype(mt)
    sig = jax.nn.sigmoid(gate)
    hidden = (gate * sig * up).astype(x.dtype)  # silu(gate) * up
    out = hidden @ w_down  # [N, F] @ [F, D] -> [N, D]
    return out, (x, w_gate, w_up, w_down, gate, up, sig, hidden)


def _swiglu_bwd(res, d_out):
    x, w_gate, w_up, w_down, gate, up, sig, hidden = res
    dtype, mt = x.dtype, _math_dtype(x.dtype)
    d_out = d_out.astype(dtype)
    d_wd = _tn(hidden, d_out)  # [F, D]
    d_hidden = (d_out @ w_down.T).astype(mt)  # [N, D] @ [D, F] -> [N, F]
    d_up = (d_hidden * gate * sig).astype(dtype)
    # d silu(g) / dg = sig + g sig (1 - sig)
    d_gate = (d_hidden * up * sig * (1 + gate * (1 - sig))).astype(dtype)
    d_x = d_gate @ w_gate.T + d_up @ w_up.T  # [N, F] @ [F, D] -> [N, D]
    return d_x, _tn(x, d_gate), _tn(x, d_up), d_wd


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# ---- rotary embedding --------------------------------------------------------------------


def rotate_half_pairs(x: Array, cos: Array, sin: Array) -> Array:
    """RoPE's rotation of the half-split pairs ``(x1, x2)`` of the first ``2 R`` features,
    with a written-out backward (the rotation by the opposite angle).

    Args:
        x: ``[..., K]`` in the math dtype. cos, sin: ``[..., R]`` broadcastable against
            ``x[..., :R]``, ``2 R <= K``; constants: no gradient flows to them
            (``stop_gradient``; RoPE's come from integer positions).

    Returns:
        ``[x1 cos - x2 sin, x2 cos + x1 sin, x[..., 2R:]]`` concatenated, ``[..., K]``.
    """
    return _rotate_pairs(x, jax.lax.stop_gradient(cos), jax.lax.stop_gradient(sin))


@jax.custom_vjp
def _rotate_pairs(x: Array, cos: Array, sin: Array) -> Array:
    return _rotate(x, cos, sin)


def _rotate(x, cos, sin):
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def _rotate_fwd(x, cos, sin):
    return _rotate(x, cos, sin), (cos, sin)


def _rotate_bwd(res, d_out):
    cos, sin = res
    return _rotate(d_out, cos, -sin), None, None


_rotate_pairs.defvjp(_rotate_fwd, _rotate_bwd)


# ---- softmax attention -------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def grouped_softmax_attention(q: Array, k: Array, v: Array, allowed: Array,
                              scale: float) -> Array:
    """Masked softmax attention of grouped queries with a written-out backward.

    Args:
        q: ``[B, T, Hkv, G, K]`` in the math dtype (G query heads per key/value head).
        k: ``[B, S, Hkv, K]``, v: ``[B, S, Hkv, V]`` in the math dtype.
        allowed: ``[B, T, S]`` bool, every query row allowing at least one key.
        scale: multiplies the scores.

    Returns:
        ``[B, T, Hkv, G, V]`` in the math dtype. The backward saves the probabilities
        ``[B, Hkv, G, T, S]`` and forms ``dS = P * (dP - rowsum(dP * P))``.
    """
    return _attention_fwd(q, k, v, allowed, scale)[0]


def _attention_fwd(q, k, v, allowed, scale):
    scores = jnp.einsum("btngk,bsnk->bngts", q, k) * scale  # [B, Hkv, G, T, S]
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bngts,bsnv->btngv", probs, v)  # [B, T, Hkv, G, V]
    return out, (q, k, v, probs, allowed)


def _attention_bwd(scale, res, d_out):
    q, k, v, probs, allowed = res
    d_v = jnp.einsum("bngts,btngv->bsnv", probs, d_out)  # [B, S, Hkv, V]
    d_probs = jnp.einsum("btngv,bsnv->bngts", d_out, v)  # [B, Hkv, G, T, S]
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    d_q = jnp.einsum("bngts,bsnk->btngk", d_scores, k) * scale  # [B, T, Hkv, G, K]
    d_k = jnp.einsum("bngts,btngk->bsnk", d_scores, q) * scale  # [B, S, Hkv, K]
    return d_q, d_k, d_v, None


grouped_softmax_attention.defvjp(_attention_fwd, _attention_bwd)
