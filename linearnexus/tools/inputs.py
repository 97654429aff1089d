"""Random inputs for every registered op and block, shared by the smoke check and benchmarks.

An op's inputs are built from one size tuple ``(B, T, H, K, V)``:

* the linear-attention ops take ``q, k [B, T, H, K]``, ``v [B, T, H, V]`` and their gates;
* ``ssd`` takes ``x [B, T, H, P=V]``, ``dt [B, T, H]``, ``A [H]``, ``B, C [B, T, G, N=K]``
  with ``G = max(1, H // 2)`` groups;
* ``mamba`` (the selective scan) takes ``x, dt [B, T, C]`` with ``C = H * V`` channels,
  ``A [C, N]`` and ``B, C [B, T, N]`` with ``N = min(K, 16)`` (Mamba's usual state size).

Gates are mild (log-gates near ``log_sigmoid(3)``), keys are L2-normalised for the delta
rules (their recurrence assumes ``||k|| = 1``), step sizes are ``softplus`` of a normal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from linearnexus.registry import LAYER_REGISTRY, OP_REGISTRY

Sizes = tuple[int, int, int, int, int]  # (B, T, H, K, V)


def _qkv(ks: jax.Array, B: int, T: int, H: int, K: int, V: int, dtype: Any, *, unit_k: bool):
    q = jax.random.normal(ks[0], (B, T, H, K), dtype)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True) if unit_k else k * K ** -0.5
    v = jax.random.normal(ks[2], (B, T, H, V), dtype)
    return q, k.astype(dtype), v


def _log_gate(key: jax.Array, shape: tuple[int, ...], dtype: Any, spread: float = 1.0) -> jax.Array:
    return (jax.nn.log_sigmoid(jax.random.normal(key, shape) + 3.0) / spread).astype(dtype)


def make_op_inputs(op: str, key: jax.Array, sizes: Sizes, dtype: Any = jnp.float32
                   ) -> tuple[jax.Array, ...]:
    """Random positional inputs of ``OP_REGISTRY[op]`` at ``sizes = (B, T, H, K, V)``.

    Raises:
        KeyError: ``op`` has no recipe here (a new op adds one).
    """
    B, T, H, K, V = sizes
    ks = jax.random.split(key, 6)
    if op == "mamba":
        C, N = H * V, min(K, 16)
        x = jax.random.normal(ks[0], (B, T, C), dtype)
        dt = jax.nn.softplus(jax.random.normal(ks[1], (B, T, C)) - 3.0).astype(dtype)
        A = -jnp.exp(jax.random.uniform(ks[2], (C, N), minval=0.0, maxval=1.5))  # [C, N]
        return (x, dt, A, jax.random.normal(ks[3], (B, T, N), dtype),
                jax.random.normal(ks[4], (B, T, N), dtype))
    if op == "ssd":
        G = max(1, H // 2)
        x = jax.random.normal(ks[0], (B, T, H, V), dtype)
        dt = jax.nn.softplus(jax.random.normal(ks[1], (B, T, H)) - 2.0).astype(dtype)
        A = -jnp.exp(jax.random.uniform(ks[2], (H,), minval=0.0, maxval=1.5))
        b = (jax.random.normal(ks[3], (B, T, G, K)) * K ** -0.5).astype(dtype)
        return x, dt, A, b, jax.random.normal(ks[4], (B, T, G, K), dtype)
    unit_k = op in ("delta_rule", "gated_delta_rule")
    q, k, v = _qkv(ks, B, T, H, K, V, dtype, unit_k=unit_k)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))).astype(dtype)
    recipes: dict[str, Callable[[], tuple[jax.Array, ...]]] = {
        "simple_gla": lambda: (q, k, v, _log_gate(ks[3], (B, T, H), dtype)),
        "gla": lambda: (q, k, v, _log_gate(ks[3], (B, T, H, K), dtype, spread=4.0)),
        "delta_rule": lambda: (q, k, v, beta),
        "gated_delta_rule": lambda: (q, k, v, _log_gate(ks[3], (B, T, H), dtype), beta),
        "retention": lambda: (q, k, v),
    }
    if op not in recipes:
        raise KeyError(f"op: no input recipe for {op!r}; known: {sorted([*recipes, 'mamba', 'ssd'])}")
    return recipes[op]()


def ops() -> list[str]:
    """Every registered op name."""
    return sorted(OP_REGISTRY)


def build_block(name: str, *, d_model: int | None = None, seed: int = 0, **overrides: Any):
    """``(block, config)`` for ``LAYER_REGISTRY[name]``: its ``tiny()`` config, or its default
    config at ``d_model`` when given."""
    from flax import nnx

    layer_cls, config_cls = LAYER_REGISTRY[name]
    if d_model is None:
        config = config_cls.tiny(**overrides)
    else:
        config = config_cls(d_model=d_model, **overrides)
    return layer_cls(config, rngs=nnx.Rngs(seed)), config
