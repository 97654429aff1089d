"""Gate projections and transforms shared by the gated blocks (all log-space gates)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array


def low_rank_gate(x: Array, w_down: Array, w_up: Array, bias: Array | None = None) -> Array:
    """Low-rank gate logits ``(x @ w_down) @ w_up + bias``.

    Args:
        x: ``[..., D]``. w_down: ``[D, R]``. w_up: ``[R, O]``. bias: optional ``[O]``.

    Returns:
        ``[..., O]`` logits (apply a transform such as :func:`log_sigmoid_gate`).
    """
    if w_down.shape[0] != x.shape[-1]:
        raise ValueError(f"w_down: expected [{x.shape[-1]}, R], got {w_down.shape}")
    if w_up.shape[0] != w_down.shape[1]:
        raise ValueError(f"w_up: expected [{w_down.shape[1]}, O], got {w_up.shape}")
    out = (x @ w_down) @ w_up
    return out if bias is None else out + bias


def log_sigmoid_gate(logits: Array, normalizer: float = 16.0) -> Array:
    """GLA's gate: ``log_sigmoid(logits) / normalizer`` (<= 0, so decay ``exp(g)`` <= 1)."""
    if normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return jax.nn.log_sigmoid(logits) / normalizer


def clamp_log_gate(g: Array, min_value: float = -20.0) -> Array:
    """Clamp log-gates to ``[min_value, 0]`` to bound per-step decay (keeps exps finite)."""
    return jnp.clip(g, min_value, 0.0)


def softplus_decay(a: Array, a_log: Array, dt_bias: Array | None = None) -> Array:
    """Mamba2 / Gated DeltaNet decay ``-exp(A_log) * softplus(a + dt_bias)`` (log-space, <= 0)."""
    dtype = jnp.promote_types(a.dtype, jnp.float32)  # float32, or float64 under x64
    a = a.astype(dtype)
    if dt_bias is not None:
        a = a + dt_bias.astype(dtype)
    return -jnp.exp(a_log.astype(dtype)) * jax.nn.softplus(a)


def inverse_softplus(y: Array) -> Array:
    """``x`` with ``softplus(x) == y`` for ``y > 0`` (stable: ``y + log(-expm1(-y))``)."""
    return y + jnp.log(-jnp.expm1(-y))


def sample_dt_bias(
    key: Array,
    shape: tuple[int, ...],
    dt_min: float = 1e-3,
    dt_max: float = 0.1,
    floor: float = 1e-4,
    dtype=jnp.float32,
) -> Array:
    """Bias whose softplus is log-uniform in ``[dt_min, dt_max]`` (Mamba's dt init).

    Raises:
        ValueError: unless ``0 < dt_min <= dt_max``.
    """
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt_min/dt_max: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return inverse_softplus(dt).astype(dtype)


def retention_log_decay(num_heads: int) -> Array:
    """RetNet's fixed per-head log decay ``log(1 - 2^(-5-h))``, ``[H]`` float32."""
    h = jnp.arange(num_heads, dtype=jnp.float32)
    return jnp.log1p(-jnp.exp2(-5.0 - h))
