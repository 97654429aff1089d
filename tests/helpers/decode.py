"""Helpers shared by the decode kernel tests."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def random_state(model: Any, seed: int) -> Any:
    """A batch-1 decode state of ``model`` with random values in every float leaf (a wrong
    offset into it would show), integer leaves as ``init_state`` gives them."""
    zeros = model.init_state(1)
    leaves, tree = jax.tree.flatten(zeros)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [
        leaf if not jnp.issubdtype(leaf.dtype, jnp.floating)
        else (0.3 * jax.random.normal(k, leaf.shape)).astype(leaf.dtype)
        for k, leaf in zip(keys, leaves, strict=True)])
