"""Every registered block through the same checks, with no per-block code.

A new block registered in ``linearnexus.registry.LAYER_REGISTRY`` with a ``Config.tiny()``
is picked up here automatically.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus.core.padding import validate_mask
from linearnexus.modules.base import Block
from linearnexus.modules.linear.runtime import begin_call
from linearnexus.registry import LAYER_REGISTRY
from tests.helpers.parity import (
    assert_chunk_recurrent_parity,
    assert_close,
    assert_grads_match_finite_differences,
    assert_mask_behavior,
    assert_pads_are_inert,
    assert_prefix_continuation,
    assert_trees_close,
    jit_block,
    padding_mask,
    row_of,
    x64,
)

LAYERS = sorted(LAYER_REGISTRY)
MODES = ["chunk", "recurrent"]


def build(name: str, **overrides):
    entry = LAYER_REGISTRY[name]
    config = entry.config.tiny(**overrides)
    return entry.block(config, rngs=nnx.Rngs(0)), config


def inputs(key, config, batch: int, seq: int) -> jax.Array:
    dtype = jnp.dtype(config.dtype)
    return jax.random.normal(key, (batch, seq, config.d_model), jnp.float32).astype(dtype)


def test_every_entry_resolves_to_a_block_and_its_config():
    """The registry's import paths resolve (a typo would only fail when the block is used),
    and each config class builds the block it is registered with."""
    assert LAYERS, "no registered blocks: every parametrised test below would be skipped"
    for name in LAYERS:
        layer_cls, config_cls = LAYER_REGISTRY[name]
        assert inspect.isclass(layer_cls) and inspect.isclass(config_cls), name
        assert callable(getattr(config_cls, "tiny", None)), f"{name}: {config_cls.__name__}.tiny"


@pytest.mark.parametrize("name", LAYERS)
def test_follows_block_protocol(name, key):
    block, config = build(name)
    assert isinstance(block, Block)
    x = inputs(key, config, 2, 5)
    y, state = block(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    fresh = block.init_state(2)
    assert jax.tree.structure(fresh) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(state), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert not np.any(np.asarray(a))  # init_state is zeros


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("mode", MODES)
def test_no_state_equals_an_explicit_zero_state(name, mode, key):
    """Called without a state, a block may take its op's zero-state paths: outputs, the new
    state and the gradients equal those of a call given ``init_state`` (the zeros)."""
    block, config = build(name)
    graphdef, params = nnx.split(block)
    x = inputs(key, config, 2, 13)
    cot = jax.random.normal(jax.random.fold_in(key, 1), x.shape, jnp.float32)

    def run(p, x, with_state):
        blk = nnx.merge(graphdef, p)
        state = blk.init_state(2) if with_state else None
        y, new_state = blk(x, state=state, mode=mode)
        return jnp.sum(y.astype(jnp.float32) * cot), (y, new_state)

    results = [jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True),
                       static_argnums=2)(params, x, s) for s in (False, True)]
    (_, (y0, state0)), grads0 = results[0]
    (_, (y1, state1)), grads1 = results[1]
    assert_trees_close((y0, state0, grads0), (y1, state1, grads1), 1e-6, f"{name}[{mode}]")


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("seq", [1, 13])
def test_chunk_vs_recurrent(name, seq, key):
    block, config = build(name)
    k1, k2 = jax.random.split(key)
    x = inputs(k1, config, 2, seq)
    # a non-zero initial state: the state after a random prefix
    _, prefix_state = jit_block(block, None)(inputs(k2, config, 2, 5))
    assert_chunk_recurrent_parity(block, x, tol=1e-5)
    assert_chunk_recurrent_parity(block, x, state=prefix_state, tol=1e-5)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("mode", MODES)
def test_prefix_then_continuation(name, mode, key):
    block, config = build(name)
    x = inputs(key, config, 2, 19)
    assert_prefix_continuation(block, x, split=6, mode=mode, tol=1e-5)


# Row sides per mode: (left, scattered, right) in chunk mode, (right, scattered, left) in
# recurrent mode, so each mode meets every padding side, the one-token row among them
MASK_SIDES = {"chunk": ["left", "scattered", "right"], "recurrent": ["right", "scattered", "left"]}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("mode", MODES)
def test_padding_mask_with_carried_state(name, mode, key):
    """A masked call continuing from a non-zero state (a prefix run): each row equals its
    valid tokens alone from that row's state, whatever side its pads are on. (Masks
    without a carried state are checked by the next test and by the models' padded-prompt
    batching tests.)"""
    block, config = build(name)
    k1, k2 = jax.random.split(key)
    _, prefix_state = jit_block(block, mode)(inputs(k2, config, 3, 5))
    x = inputs(k1, config, 3, 11)
    assert_mask_behavior(block, x, [9, 4, 1], side=MASK_SIDES[mode], mode=mode,
                         state=prefix_state, tol=1e-5)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_pads_never_reach_valid_outputs(name, mode, key):
    """NaN / inf at padded positions (e.g. a NaN embedding) leave valid outputs and the
    state bit-identical to a clean run, with no state and with a carried one."""
    block, config = build(name)
    k1, k2 = jax.random.split(key)
    x = inputs(k1, config, 3, 11)
    mask = np.concatenate([padding_mask([7], 11, "left"), padding_mask([4], 11, "right"),
                           padding_mask([5], 11, "scattered")])
    assert_pads_are_inert(block, x, mask, mode=mode)
    _, prefix_state = jit_block(block, mode)(inputs(k2, config, 3, 5))
    assert_pads_are_inert(block, x, mask, mode=mode, state=prefix_state)


# (mode, seq): recurrent is a per-token scan, so a shorter sequence keeps the test fast
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("mode,seq", [("chunk", 9), ("recurrent", 5)])
def test_gradients_match_finite_differences(name, mode, seq, key):
    with x64():
        block, config = build(name, dtype="float64", param_dtype="float64")
        graphdef, params = nnx.split(block, nnx.Param)
        k1, k2, k3 = jax.random.split(key, 3)
        x = inputs(k1, config, 2, seq)
        cot = jax.random.normal(k2, x.shape, jnp.float64)

        def loss(tree):
            p, xx = tree
            y, state = nnx.merge(graphdef, p)(xx, mode=mode)
            # the final state enters the loss too, so its gradient path is checked
            s = sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(state)
                    if jnp.issubdtype(leaf.dtype, jnp.floating))
            return jnp.sum(y * cot) + s

        assert_grads_match_finite_differences(loss, (params, x), key=k3, rtol=1e-5)


def takes_cu_seqlens(block) -> bool:
    return "cu_seqlens" in inspect.signature(type(block).__call__).parameters


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("mode", MODES)
def test_packed_sequences_match_each_alone(name, mode, key):
    """``cu_seqlens`` packing (B == 1, sequences of length 5, 1, 0 and 7, offsets traced
    under jit): each sequence's outputs and state equal running it alone from its own
    carried state; an empty sequence keeps its state."""
    block, config = build(name)
    if not takes_cu_seqlens(block):
        pytest.skip(f"{name} takes no cu_seqlens")
    lengths = [5, 1, 0, 7]
    k1, k2 = jax.random.split(key)
    x = inputs(k1, config, 1, sum(lengths))
    cu = jnp.asarray(np.cumsum([0, *lengths]), jnp.int32)
    _, prefix = jit_block(block, mode)(inputs(k2, config, len(lengths), 3))
    graphdef, params = nnx.split(block)

    @jax.jit
    def packed(params, x, state, cu):
        return nnx.merge(graphdef, params)(x, state=state, cu_seqlens=cu, mode=mode)

    y, state = packed(params, x, prefix, cu)
    assert y.shape == x.shape
    run = jit_block(block, mode)
    for n, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        if hi == lo:
            assert_trees_close(row_of(state, n), row_of(prefix, n), 0.0, f"empty sequence {n} state")
            continue
        y_n, s_n = run(x[:, lo:hi], row_of(prefix, n))
        assert_close(y[:, lo:hi], y_n, 1e-5, f"sequence {n} output")
        assert_trees_close(row_of(state, n), s_n, 1e-5, f"sequence {n} state")


@pytest.mark.parametrize("name", LAYERS)
def test_bad_inputs_are_named(name, key):
    block, config = build(name)
    d = config.d_model
    with pytest.raises(ValueError, match="x: expected rank 3"):
        block(jnp.ones((2, d)))
    with pytest.raises(ValueError, match="hidden size"):
        block(jnp.ones((2, 3, d + 1)))
    with pytest.raises(ValueError, match="T must be >= 1"):
        block(jnp.ones((2, 0, d)))
    with pytest.raises(TypeError, match="float"):
        block(jnp.ones((2, 3, d), jnp.int32))
    with pytest.raises(ValueError, match="mask"):
        block(jnp.ones((2, 3, d)), mask=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="mode"):
        block(jnp.ones((2, 3, d)), mode="sideways")
    if takes_cu_seqlens(block):
        with pytest.raises(ValueError, match="cu_seqlens"):
            block(jnp.ones((2, 3, d)), cu_seqlens=jnp.array([0, 3], jnp.int32))
        with pytest.raises(ValueError, match="mask and cu_seqlens"):
            block(jnp.ones((1, 3, d)), mask=jnp.ones((1, 3), bool),
                  cu_seqlens=jnp.array([0, 3], jnp.int32))



@functools.cache
def _state_types() -> dict[type, object]:
    """One ``init_state(2)`` of each state type among the registered blocks (blocks built
    abstractly: ``init_state`` reads only the config)."""
    def state(name):
        entry = LAYER_REGISTRY[name]
        block = nnx.eval_shape(lambda: entry.block(entry.config.tiny(), rngs=nnx.Rngs(0)))
        return block.init_state(2)
    return {type(s): s for s in map(state, LAYERS)}


@pytest.mark.parametrize("name", LAYERS)
def test_foreign_state_and_bad_masks_are_refused(name, key):
    """Another block's state is a TypeError naming ``state``; a mask that is not binary
    (0.5, 2, NaN) is a ValueError naming ``mask``. Both are raised before any work."""
    block, config = build(name)
    x = inputs(key, config, 2, 3)
    own = type(block.init_state(2))
    foreign = [s for t, s in _state_types().items() if t is not own]
    assert foreign, "every registered block has the same state type"
    for state in foreign:
        with pytest.raises(TypeError, match="^state: expected"):
            block(x, state=state)
    for bad in (0.5, 2.0, np.nan):
        with pytest.raises(ValueError, match="^mask: expected a bool mask or 0 / 1"):
            block(x, mask=jnp.ones((2, 3)).at[1, 2].set(bad))


def test_binary_masks_and_cu_seqlens_lists_are_accepted(key):
    """0 / 1 int or float masks are the bool mask; ``cu_seqlens`` may be a Python list (the
    entry every block with ``cu_seqlens`` shares converts and checks it; the ops' own list
    handling is in test_linear_ops)."""
    binary = np.array([[1, 1, 0], [1, 0, 1]])
    for mask in (binary, binary.astype(np.float32)):
        np.testing.assert_array_equal(validate_mask(mask, 2, 3), binary.astype(bool))
    x = jax.random.normal(key, (1, 3, 4))
    _, call = begin_call(x, 4, cu_seqlens=[0, 1, 3], dtype=jnp.float32)
    assert call.cu_seqlens.dtype == jnp.int32 and call.n_states == 2
    np.testing.assert_array_equal(call.cu_seqlens, [0, 1, 3])
    with pytest.raises(ValueError, match="cu_seqlens: must be non-decreasing"):
        begin_call(x, 4, cu_seqlens=[0, 2, 1, 3], dtype=jnp.float32)
