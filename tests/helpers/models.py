"""Helpers for tests that run whole ``LMModel``s."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def compiled_model(model: Any) -> Callable[..., tuple[jax.Array, Any]]:
    """``run(tokens, state=None, mode=None) -> (logits, state)``: ``model`` under one
    ``jax.jit`` per shape and mode. Eager calls dispatch every op on its own, several times
    slower for step-by-step decoding."""
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, static_argnames="mode")
    def run(params, tokens, state, mode):
        return nnx.merge(graphdef, params)(tokens, state=state, mode=mode)

    return lambda tokens, state=None, mode=None: run(params, jnp.asarray(tokens), state, mode)
