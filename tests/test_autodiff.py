"""The written-out backward passes (core/autodiff.py) against autodiff's, and their switch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus.core import autodiff
from linearnexus.core.autodiff import (
    WRITTEN_BACKWARD_ENV,
    autodiff_backward,
    grouped_softmax_attention,
    rotate_half_pairs,
    swiglu,
    written_backward_enabled,
)
from linearnexus.models import ModelConfig, create_model
from linearnexus.modules.attention.causal import AttentionBlock, AttentionConfig
from linearnexus.modules.attention.common import masked_softmax
from linearnexus.modules.common import RotaryEmbedding, SwiGLU
from tests.helpers.parity import assert_trees_close


@pytest.fixture
def rng(key) -> np.random.Generator:
    return np.random.default_rng(np.asarray(key))


def randn(rng, *shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _grads(fn, args, cotangent):
    """Output and the gradient of ``sum(fn(*args) * cotangent)`` w.r.t. every argument."""
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)


@pytest.mark.parametrize("n", [1, 63, 65])
def test_swiglu_matches_autodiff(rng, n):
    d, f = 24, 40  # not powers of two
    x, wg, wu, wd = randn(rng, n, d), randn(rng, d, f, scale=0.3), randn(rng, d, f, scale=0.3), \
        randn(rng, f, d, scale=0.3)

    def plain(x, wg, wu, wd):
        return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd

    dy = randn(rng, n, d)
    want, want_g = _grads(plain, (x, wg, wu, wd), dy)
    got, got_g = _grads(lambda *a: swiglu(*a, jnp.dtype(jnp.float32)), (x, wg, wu, wd), dy)
    assert_trees_close((got, got_g), (want, want_g), 1e-6, "swiglu")


def test_swiglu_in_bfloat16_returns_gradients_in_each_arguments_dtype(rng):
    x, wg, wu, wd = randn(rng, 33, 16), randn(rng, 16, 40, scale=0.3), \
        randn(rng, 16, 40, scale=0.3), randn(rng, 40, 16, scale=0.3)
    dy = randn(rng, 33, 16)
    bf = jnp.dtype(jnp.bfloat16)

    def plain(x, wg, wu, wd):
        x, wg, wu, wd = (a.astype(bf) for a in (x, wg, wu, wd))
        return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd

    want, want_g = _grads(plain, (x, wg, wu, wd), dy.astype(bf))
    got, got_g = _grads(lambda *a: swiglu(*a, bf), (x, wg, wu, wd), dy.astype(bf))
    assert got.dtype == bf and all(g.dtype == jnp.float32 for g in got_g)
    assert_trees_close((got, got_g), (want, want_g), 2e-2, "swiglu bf16")


@pytest.mark.parametrize("rotary_dim,head_dim", [(40, 40), (24, 40), (2, 6)])
def test_rope_rotation_matches_autodiff(rng, rotary_dim, head_dim):
    rope = RotaryEmbedding(head_dim, rotary_dim=rotary_dim)
    x = randn(rng, 2, 65, 3, head_dim)
    positions = jnp.asarray(rng.integers(0, 500, (2, 65)), jnp.int32)
    dy = randn(rng, 2, 65, 3, head_dim)
    got, got_g = _grads(lambda x: rope.apply(x, positions), (x,), dy)
    with autodiff_backward():
        want, want_g = _grads(lambda x: rope.apply(x, positions), (x,), dy)
    assert_trees_close((got, got_g), (want, want_g), 1e-6, "rope")
    # the rotation's backward is the rotation by the opposite angle: norms are kept
    np.testing.assert_allclose(jnp.linalg.norm(got_g[0]), jnp.linalg.norm(dy), rtol=1e-5)


@pytest.mark.parametrize("t,s,groups", [(1, 1, 1), (63, 63, 3), (65, 80, 2)])
def test_attention_matches_autodiff(rng, t, s, groups):
    b, hkv, k, v = 2, 2, 40, 24
    q = randn(rng, b, t, hkv, groups, k)
    keys, vals = randn(rng, b, s, hkv, k), randn(rng, b, s, hkv, v)
    # causal with an offset, and the first row's last keys masked out (as empty cache slots)
    qpos = jnp.arange(t)[None, :] + (s - t)
    allowed = jnp.arange(s)[None, None, :] <= qpos[:, :, None]  # [1, T, S]
    allowed = jnp.broadcast_to(allowed, (b, t, s)).at[0, :, s - 1:].set(t == 1 and s == 1)
    scale = k ** -0.5
    dy = randn(rng, b, t, hkv, groups, v)

    def plain(q, keys, vals):
        scores = jnp.einsum("btngk,bsnk->bngts", q, keys) * scale
        probs = masked_softmax(scores, allowed[:, None, None])
        return jnp.einsum("bngts,bsnv->btngv", probs, vals)

    want, want_g = _grads(plain, (q, keys, vals), dy)
    got, got_g = _grads(lambda *a: grouped_softmax_attention(*a, allowed, scale),
                        (q, keys, vals), dy)
    assert_trees_close((got, got_g), (want, want_g), 1e-6, "attention")
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in got_g)


def _block_grads(block, x, dy):
    graphdef, params = nnx.split(block)

    def loss(p, x):
        y = nnx.merge(graphdef, p)(x)
        y = y[0] if isinstance(y, tuple) else y
        return jnp.sum(y * dy)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_attention_block_and_mlp_gradients_equal_autodiffs(rng, heads, kv_heads):
    attn = AttentionBlock(AttentionConfig(d_model=30, n_heads=heads, n_kv_heads=kv_heads,
                                          head_dim=10, max_seq_len=128), rngs=nnx.Rngs(0))
    mlp = SwiGLU(30, 52, rngs=nnx.Rngs(1))
    for block in (attn, mlp):
        x, dy = randn(rng, 2, 63, 30), randn(rng, 2, 63, 30)
        got = _block_grads(block, x, dy)
        with autodiff_backward():
            want = _block_grads(block, x, dy)
        assert_trees_close(got, want, 1e-6, type(block).__name__)


def test_the_switch_turns_written_backwards_off_for_jvp(rng, monkeypatch):
    """Forward mode works under ``autodiff_backward()`` (and with the env switch); the
    written-out backward is the default and has none."""
    cfg = ModelConfig(vocab_size=17, d_model=16, n_layers=1, block_pattern=("attention",),
                      block_options={"attention": {"n_heads": 2}}, max_seq_len=32)
    model = create_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(rng.integers(0, 17, (1, 9)), jnp.int32)

    def logits(p):
        return nnx.merge(graphdef, p)(tokens)[0]

    tangent = jax.tree.map(jnp.ones_like, params)
    assert written_backward_enabled()
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(logits, (params,), (tangent,))
    with autodiff_backward():
        assert not written_backward_enabled()
        _, from_jvp = jax.jvp(logits, (params,), (tangent,))
    assert written_backward_enabled()  # restored on exit
    monkeypatch.setenv(WRITTEN_BACKWARD_ENV, "0")
    assert not autodiff.written_backward_enabled()
    _, again = jax.jvp(logits, (params,), (tangent,))
    np.testing.assert_allclose(again, from_jvp, rtol=1e-6)
    # <J t, w> = <t, J^T w>: autodiff's forward mode against the written-out reverse mode
    monkeypatch.delenv(WRITTEN_BACKWARD_ENV)
    w = randn(rng, *from_jvp.shape)
    _, vjp = jax.vjp(logits, params)
    (pullback,) = vjp(w)
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(tangent), jax.tree.leaves(pullback),
                                             strict=True))
    np.testing.assert_allclose(dot, jnp.vdot(from_jvp, w), rtol=1e-4)


def test_a_traced_scale_and_rope_angles_are_handled(rng):
    """A traced attention scale takes autodiff's path (the written one keeps it static); the
    rotation's angles are constants: no gradient reaches them."""
    from linearnexus.modules.attention.causal import grouped_attention

    q, k, v = randn(rng, 1, 5, 4, 8), randn(rng, 1, 5, 2, 8), randn(rng, 1, 5, 2, 8)
    allowed = jnp.tril(jnp.ones((5, 5), bool))[None]
    at_traced = jax.jit(lambda s: grouped_attention(q, k, v, allowed, s))(jnp.float32(0.3))
    np.testing.assert_allclose(at_traced, grouped_attention(q, k, v, allowed, 0.3), atol=1e-6)
    x, cos, sin = randn(rng, 3, 8), randn(rng, 3, 4), randn(rng, 3, 4)
    d_cos, d_sin = jax.grad(lambda c, s: jnp.sum(rotate_half_pairs(x, c, s)), (0, 1))(cos, sin)
    assert not np.any(np.asarray(d_cos)) and not np.any(np.asarray(d_sin))
