"""The linear-attention ops and their implementations, for the shared op suite.

Each :class:`OpSpec` names the op's api function and makes its positional arrays. A new
op adds one spec here and is run through every check in ``tests/test_linear_ops.py``.
Keys are L2-normalised for the delta rules (their recurrence assumes ``||k|| = 1``).

Each :class:`Implementation` is one way of running every op (api keyword arguments); a new
backend adds one line to :data:`IMPLEMENTATIONS` and the suite checks it against the
per-step reference (``backend="naive"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from linearnexus.registry import OP_REGISTRY


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op: ``make(key, B, T, H, K, V, decay)`` -> ordered ``{name: array}`` of the
    positional inputs (``decay`` = "normal" or "strong": log-gates near -20 per step)."""

    name: str
    make: Callable[..., dict[str, jax.Array]]
    gated: bool = True  # whether "strong" decay means anything for this op
    # False for an op that only re-parametrises another op's kernels (retention, ssd on
    # simple_gla): it gets the checks of its own code (argument mapping, gradients, packing,
    # errors) but not the full shape sweep its kernels already get
    full_sweep: bool = True

    @property
    def fn(self) -> Callable[..., tuple[jax.Array, jax.Array | None]]:
        return OP_REGISTRY[self.name]


def _qkv(key, B, T, H, K, V, *, normalize_k=False):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, T, H, K), jnp.float32)
    k = jax.random.normal(kk, (B, T, H, K), jnp.float32)
    if normalize_k:
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    else:
        k = k * K ** -0.5
    v = jax.random.normal(kv, (B, T, H, V), jnp.float32)
    return q, k, v


def _log_gate(key, shape, decay):
    if decay == "strong":  # log-gates in [-20, -19]: the state forgets almost everything each step
        return -19.0 - jax.random.uniform(key, shape, jnp.float32)
    return jax.nn.log_sigmoid(jax.random.normal(key, shape, jnp.float32) + 2.0)


def make_simple_gla(key, B, T, H, K, V, decay="normal"):
    k1, k2 = jax.random.split(key)
    q, k, v = _qkv(k1, B, T, H, K, V)
    return {"q": q, "k": k, "v": v, "g": _log_gate(k2, (B, T, H), decay)}


def make_retention(key, B, T, H, K, V, decay="normal"):
    q, k, v = _qkv(key, B, T, H, K, V)
    return {"q": q, "k": k, "v": v}


def make_ssd(key, B, T, H, K, V, decay="normal"):
    """x [B, T, H, P=V]; B, C [B, T, G, N=K] with G = H // 2 groups (heads share them)."""
    ks = jax.random.split(key, 5)
    groups = max(1, H // 2)
    x = jax.random.normal(ks[0], (B, T, H, V), jnp.float32)
    if decay == "strong":  # dt * A in about [-21, -19]
        dt = 1.0 + 0.05 * jax.random.uniform(ks[1], (B, T, H), jnp.float32)
        A = -19.0 - jax.random.uniform(ks[2], (H,), jnp.float32)
    else:
        dt = jax.nn.softplus(jax.random.normal(ks[1], (B, T, H), jnp.float32) - 2.0)
        A = -jnp.exp(jax.random.uniform(ks[2], (H,), jnp.float32, 0.0, 1.5))
    b = jax.random.normal(ks[3], (B, T, groups, K), jnp.float32) * K ** -0.5
    c = jax.random.normal(ks[4], (B, T, groups, K), jnp.float32)
    return {"x": x, "dt": dt, "A": A, "B": b, "C": c}


SPECS: dict[str, OpSpec] = {
    "simple_gla": OpSpec("simple_gla", make_simple_gla),
    "retention": OpSpec("retention", make_retention, gated=False, full_sweep=False),
    "ssd": OpSpec("ssd", make_ssd, full_sweep=False),
}


def make_delta_rule(key, B, T, H, K, V, decay="normal"):
    k1, k2 = jax.random.split(key)
    q, k, v = _qkv(k1, B, T, H, K, V, normalize_k=True)
    return {"q": q, "k": k, "v": v, "beta": jax.nn.sigmoid(jax.random.normal(k2, (B, T, H)))}


def make_gated_delta_rule(key, B, T, H, K, V, decay="normal"):
    k1, k2, k3 = jax.random.split(key, 3)
    q, k, v = _qkv(k1, B, T, H, K, V, normalize_k=True)
    return {"q": q, "k": k, "v": v, "g": _log_gate(k2, (B, T, H), decay),
            "beta": jax.nn.sigmoid(jax.random.normal(k3, (B, T, H)))}


SPECS["delta_rule"] = OpSpec("delta_rule", make_delta_rule, gated=False)
SPECS["gated_delta_rule"] = OpSpec("gated_delta_rule", make_gated_delta_rule)


def make_gla(key, B, T, H, K, V, decay="normal"):
    k1, k2 = jax.random.split(key)
    q, k, v = _qkv(k1, B, T, H, K, V)
    return {"q": q, "k": k, "v": v, "g": _log_gate(k2, (B, T, H, K), decay)}


SPECS["gla"] = OpSpec("gla", make_gla)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One implementation of every op, checked against the reference by the suite.

    Attributes:
        kwargs: the api keyword arguments that select it.
        sweep: "full": every check at every shape (T up to 16384, head dims 32 / 64 / 100);
            "small": the small-shape checks only (one awkward batch shape with every
            gradient, packed sequences, log-gates near -20, zero gates, bfloat16 inputs),
            for kernels that run in Pallas interpret mode on the CPU, where each compile
            takes seconds.
        wide_chunk_ops: ops whose small batch case runs chunks of twice ``chunk_size``, so
            that kernels which cut a chunk into 16-token sub-blocks (the delta rules' WY
            substitution, GLA's sub-chunks) run more than one.
    """

    kwargs: dict
    sweep: str = "full"
    wide_chunk_ops: tuple[str, ...] = ()


IMPLEMENTATIONS: dict[str, Implementation] = {
    "chunk": Implementation(dict(mode="chunk", backend="jax")),
    "recurrent": Implementation(dict(mode="recurrent", backend="jax")),
    "pallas": Implementation(dict(mode="chunk", backend="pallas", chunk_size=16), sweep="small",
                             wide_chunk_ops=("gated_delta_rule", "gla")),
}
