"""One-token calls with the projections fused into one matmul (``modules.common.fused_dense``)
against the same calls with a matmul per projection (``LINEARNEXUS_FUSED_DECODE=0``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus.modules.common import FUSED_DECODE_ENV, SwiGLU, fused_dense
from linearnexus.registry import LAYER_REGISTRY


def _both(monkeypatch, fn):
    """``fn()`` with the fused path, then with it off."""
    fused = fn()
    monkeypatch.setenv(FUSED_DECODE_ENV, "0")
    plain = fn()
    monkeypatch.delenv(FUSED_DECODE_ENV)
    return fused, plain


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,overrides,masked", [
    ("gated_deltanet", {}, False),
    ("gated_deltanet", {"use_short_conv": False, "use_output_gate": False,
                        "allow_neg_eigval": True}, True),
    ("deltanet", {"expand_v": 1.5}, True),
])
def test_one_token_block_matches_unfused(monkeypatch, name, overrides, masked):
    entry = LAYER_REGISTRY[name]
    block = entry.block(entry.config.tiny(**overrides), rngs=nnx.Rngs(1))
    zeros = jax.tree.leaves(block.init_state(3))
    keys = jax.random.split(jax.random.key(0), len(zeros))  # a non-zero state to start from
    state = jax.tree.unflatten(jax.tree.structure(block.init_state(3)), [
        0.3 * jax.random.normal(k, z.shape, z.dtype) for k, z in zip(keys, zeros, strict=True)])
    x = jax.random.normal(jax.random.key(1), (3, 1, 16))
    mask = jnp.array([[True], [False], [True]]) if masked else None  # a pad row stays inert
    fused, plain = _both(monkeypatch, lambda: block(x, state=state, mask=mask))
    _close(fused, plain)


def test_swiglu_one_token_matches_unfused(monkeypatch):
    mlp = SwiGLU(12, 20, use_bias=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 1, 12))
    fused, plain = _both(monkeypatch, lambda: mlp(x))
    _close(fused, plain)


def test_fused_dense_groups_and_errors():
    rngs = nnx.Rngs(0)
    lins = [nnx.Linear(6, w, use_bias=b, rngs=rngs) for w, b in ((3, False), (4, True), (2, False))]
    x = jax.random.normal(jax.random.key(3), (2, 6))
    first, rest = fused_dense(x, lins, groups=(2, 1))
    _close((first, rest), (jnp.concatenate([lins[0](x), lins[1](x)], -1), lins[2](x)))
    with pytest.raises(ValueError, match="groups"):
        fused_dense(x, lins, groups=(1, 1))
    with pytest.raises(ValueError, match="linears"):
        fused_dense(x, [lins[0], nnx.Linear(5, 2, rngs=rngs)])
    with pytest.raises(ValueError, match="linears"):
        fused_dense(x, [])
