"""Shared pieces of linear blocks: ShortConv, GatedRMSNorm, l2_normalize and the call runtime."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus.core.cache import ConvState, RecurrentState
from linearnexus.core.mode import KernelMode
from linearnexus.modules.common import GatedRMSNorm, ShortConv, l2_normalize
from linearnexus.modules.linear.runtime import (
    LinearState,
    SequenceCall,
    begin_call,
    check_linear_state,
    end_call,
    inert,
    zeros_linear_state,
)
from linearnexus.optim import muon_mask
from tests.helpers.parity import assert_close, x64

# ---- l2_normalize, GatedRMSNorm ------------------------------------------------------------


def _silu(x):
    return x / (1 + np.exp(-x))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_l2_normalize_matches_numpy_and_keeps_dtype():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).sum(-1, keepdims=True) + 1e-6)
    assert_close(l2_normalize(jnp.asarray(x)), want, 1e-6, "l2 norm")
    want1 = x / np.sqrt((x.astype(np.float64) ** 2).sum(1, keepdims=True) + 1e-3)
    assert_close(l2_normalize(jnp.asarray(x), eps=1e-3, axis=1), want1, 1e-6, "l2 norm axis=1")
    y = l2_normalize(jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    assert not np.any(np.asarray(l2_normalize(jnp.zeros((3, 4)))))  # zeros stay zeros, no NaN


def _gated_rmsnorm_np(x, g, scale, eps, norm_before_gate, act, group):
    x, g = x.astype(np.float64), g.astype(np.float64)
    a = act(g)
    v = x if norm_before_gate else x * a
    vg = v.reshape(*v.shape[:-1], -1, group)
    y = (vg / np.sqrt((vg**2).mean(-1, keepdims=True) + eps)).reshape(v.shape) * scale
    return y * a if norm_before_gate else y


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("activation, act", [("silu", _silu), ("sigmoid", _sigmoid)])
@pytest.mark.parametrize("group_size", [None, 3])
def test_gated_rmsnorm_matches_numpy(norm_before_gate, activation, act, group_size):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 4, 6)).astype(np.float32)
    g = rng.standard_normal((2, 5, 4, 6)).astype(np.float32)
    norm = GatedRMSNorm(6, eps=1e-5, norm_before_gate=norm_before_gate, activation=activation,
                        group_size=group_size)
    assert np.all(np.asarray(norm.scale[...]) == 1)
    scale = rng.standard_normal(6).astype(np.float32)
    norm.scale[...] = jnp.asarray(scale)
    want = _gated_rmsnorm_np(x, g, scale, 1e-5, norm_before_gate, act, group_size or 6)
    out = norm(jnp.asarray(x), jnp.asarray(g))
    assert out.dtype == jnp.float32
    assert_close(out, want, 1e-6, "gated rmsnorm")


def test_gated_rmsnorm_groups_normalise_separately_and_dtypes():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    x[:, 4:] *= 100.0  # group 2 is 100x larger: a whole-width norm would crush group 1
    g = rng.standard_normal((3, 8)).astype(np.float32)
    grouped = GatedRMSNorm(8, group_size=4, norm_before_gate=True)
    whole = GatedRMSNorm(8, norm_before_gate=True)
    per_group = [GatedRMSNorm(4)(jnp.asarray(x[:, i:i + 4]), jnp.asarray(g[:, i:i + 4])) for i in (0, 4)]
    assert_close(grouped(jnp.asarray(x), jnp.asarray(g)), jnp.concatenate(per_group, -1), 1e-6,
                 "group_size = two norms side by side")
    assert_close(whole(jnp.asarray(x), jnp.asarray(g)),
                 _gated_rmsnorm_np(x, g, 1.0, 1e-5, True, _silu, 8), 1e-6, "whole width")
    out = GatedRMSNorm(8, dtype=jnp.bfloat16)(jnp.asarray(x), jnp.asarray(g))
    assert out.dtype == jnp.bfloat16
    assert GatedRMSNorm(8)(jnp.asarray(x, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)).dtype == jnp.bfloat16


def test_gated_rmsnorm_errors():
    with pytest.raises(ValueError, match="group_size: must be >= 1 and divide dim=6"):
        GatedRMSNorm(6, group_size=4)
    with pytest.raises(ValueError, match="activation: expected one of"):
        GatedRMSNorm(6, activation="relu")
    with pytest.raises(ValueError, match="eps: must be > 0"):
        GatedRMSNorm(6, eps=0.0)
    norm = GatedRMSNorm(6)
    with pytest.raises(ValueError, match="x: expected last axis 6"):
        norm(jnp.ones((2, 5)), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"gate: expected shape \(2, 6\)"):
        norm(jnp.ones((2, 6)), jnp.ones((1, 6)))


# ---- ShortConv ---------------------------------------------------------------------------


def _conv_np(x, w, b, cache, silu):
    ext = np.concatenate([cache, x], axis=1).astype(np.float64)
    W = w.shape[0]
    out = np.stack([(ext[:, t:t + W] * w).sum(1) for t in range(x.shape[1])], axis=1)
    out = out + (0 if b is None else b)
    return _silu(out) if silu else out


def test_short_conv_params_names_init_and_values():
    conv = ShortConv(6, 3, bias=True, rngs=nnx.Rngs(0))
    names = {str(path[-1]) for path, _ in nnx.to_flat_state(nnx.state(conv, nnx.Param))}
    assert names == {"conv_weight", "conv_bias"}

    class _Holder(nnx.Module):  # a block nesting the conv next to a Muon-eligible projection
        def __init__(self):
            self.proj = nnx.Linear(6, 6, use_bias=False, rngs=nnx.Rngs(0))
            self.qkv_conv = conv

    muon = nnx.to_pure_dict(muon_mask(nnx.state(_Holder(), nnx.Param)))
    assert muon["proj"]["kernel"] is True and muon["qkv_conv"]["conv_weight"] is False
    w = np.asarray(conv.conv_weight[...])
    assert w.shape == (3, 6) and np.abs(w).max() <= 3 ** -0.5 and np.abs(w).std() > 0
    assert ShortConv(6, rngs=nnx.Rngs(0)).conv_bias is None
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 6)).astype(np.float32)
    cache = rng.standard_normal((2, 2, 6)).astype(np.float32)
    y, new_cache = conv(jnp.asarray(x), jnp.asarray(cache))
    want = _conv_np(x, w, np.asarray(conv.conv_bias[...]), cache, silu=True)
    assert_close(y, want, 1e-6, "short conv")
    np.testing.assert_array_equal(np.asarray(new_cache), x[:, -2:])
    lin = ShortConv(6, 3, activation=None, rngs=nnx.Rngs(1))
    y, _ = lin(jnp.asarray(x))
    assert_close(y, _conv_np(x, np.asarray(lin.conv_weight[...]), None, np.zeros_like(cache), False),
                 1e-6, "short conv, no activation, no cache")


@pytest.mark.parametrize("width", [1, 4])
def test_short_conv_pieces_equal_whole(width):
    conv = ShortConv(5, width, bias=True, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 11, 5)), jnp.float32)
    cache = jnp.asarray(rng.standard_normal((2, width - 1, 5)), jnp.float32)
    whole, whole_cache = conv(x, cache)
    pieces, c = [], cache
    for lo, hi in ((0, 1), (1, 3), (3, 10), (10, 11)):
        y, c = conv(x[:, lo:hi], c)
        pieces.append(y)
    assert_close(jnp.concatenate(pieces, 1), whole, 1e-6, "pieces vs whole")
    np.testing.assert_array_equal(np.asarray(c), np.asarray(whole_cache))


def test_short_conv_lengths_and_cu_seqlens():
    conv = ShortConv(4, 4, bias=True, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(5)
    lens = [3, 0, 1, 6, 2]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    x = jnp.asarray(rng.standard_normal((1, int(cu[-1]), 4)), jnp.float32)
    cache = jnp.asarray(rng.standard_normal((len(lens), 3, 4)), jnp.float32)
    y, new_cache = jax.jit(lambda x, c, cu: conv(x, c, cu_seqlens=cu))(x, cache, jnp.asarray(cu))
    for n in range(len(lens)):
        yn, cn = conv(x[:, cu[n]:cu[n + 1]], cache[n:n + 1])
        if lens[n]:
            assert_close(y[:, cu[n]:cu[n + 1]], yn, 1e-6, f"sequence {n}")
        assert_close(new_cache[n:n + 1], cn, 1e-6, f"cache {n}")
    # lengths: right-padded rows keep the last valid inputs in the cache
    xb = jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32)
    _, cache_l = conv(xb, lengths=jnp.array([6, 2]))
    np.testing.assert_array_equal(np.asarray(cache_l[1, 1:]), np.asarray(xb[1, :2]))
    with pytest.raises(ValueError, match="lengths and cu_seqlens"):
        conv(x, lengths=jnp.array([1]), cu_seqlens=jnp.asarray(cu))
    with pytest.raises(ValueError, match=r"x: expected \[B, T, C=4\]"):
        conv(jnp.ones((1, 3, 5)))
    with pytest.raises(ValueError, match=r"cache: expected shape"):
        conv(x, cache[:2], cu_seqlens=jnp.asarray(cu))


def test_short_conv_bf16_compute_with_f32_params():
    conv = ShortConv(4, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(4))
    x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 5, 4)), jnp.float32)
    y, c = conv(x)
    assert y.dtype == jnp.bfloat16 and c.dtype == jnp.bfloat16
    assert conv.conv_weight[...].dtype == jnp.float32


# ---- call runtime ------------------------------------------------------------------------

_MASKS = {
    "right": [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]],
    "left": [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]],
    "scattered": [[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]],
}


@pytest.mark.parametrize("kind", sorted(_MASKS))
def test_begin_end_call_round_trip(kind):
    mask = np.asarray(_MASKS[kind], bool)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 6, 3)).astype(np.float32)
    x[~mask] = np.nan  # pads must never reach the aligned tokens
    xa, call = begin_call(jnp.asarray(x), 3, mask=jnp.asarray(mask), dtype=jnp.bfloat16)
    assert xa.dtype == jnp.bfloat16 and call.n_states == 2 and call.cu_seqlens is None
    assert call.mode is KernelMode.RECURRENT  # T = 6 < 64
    np.testing.assert_array_equal(np.asarray(call.lengths), mask.sum(1))
    for b in range(2):
        n = int(mask[b].sum())
        np.testing.assert_array_equal(np.asarray(xa[b, :n], np.float32),
                                      np.asarray(jnp.asarray(x[b][mask[b]], jnp.bfloat16), np.float32))
        assert not np.any(np.asarray(xa[b, n:], np.float32))
    gate = jnp.asarray(rng.standard_normal((2, 6, 2, 2)), jnp.float32)
    g = np.asarray(inert(gate, call))
    assert not np.any(g[~np.asarray(call.layout.valid)])
    np.testing.assert_array_equal(g[np.asarray(call.layout.valid)],
                                  np.asarray(gate)[np.asarray(call.layout.valid)])
    y = jnp.where(call.layout.valid[..., None], xa.astype(jnp.float32) * 2, jnp.nan)  # NaN at pads
    back = np.asarray(end_call(y, call))
    x_bf16 = np.asarray(jnp.asarray(np.nan_to_num(x), jnp.bfloat16), np.float32)
    want = np.where(mask[..., None], 2 * x_bf16, 0)
    np.testing.assert_array_equal(back, want)


def test_begin_call_without_mask_and_with_cu_seqlens():
    x = jnp.asarray(np.random.default_rng(8).standard_normal((1, 70, 4)), jnp.float32)
    xa, call = begin_call(x, 4, dtype=jnp.float32)
    assert xa is x or np.array_equal(np.asarray(xa), np.asarray(x))
    assert call == SequenceCall(None, None, None, 1, KernelMode.CHUNK)
    y = x * 3
    assert inert(y, call) is y and end_call(y, call) is y
    cu = jnp.array([0, 1, 1, 70], jnp.int32)
    _, call = begin_call(x, 4, cu_seqlens=cu, mode="recurrent", dtype=jnp.float32)
    assert call.n_states == 3 and call.mode is KernelMode.RECURRENT and call.cu_seqlens.dtype == jnp.int32
    # the mode threshold looks at T (all packed tokens), not the sequences' lengths
    _, call = begin_call(x, 4, cu_seqlens=cu, dtype=jnp.float32)
    assert call.mode is KernelMode.CHUNK


def test_begin_call_errors():
    x = jnp.ones((2, 5, 4))
    with pytest.raises(ValueError, match="mask and cu_seqlens"):
        begin_call(x[:1], 4, mask=jnp.ones((1, 5), bool), cu_seqlens=jnp.array([0, 5]), dtype=jnp.float32)
    with pytest.raises(ValueError, match="cu_seqlens: requires batch size 1"):
        begin_call(x, 4, cu_seqlens=jnp.array([0, 5]), dtype=jnp.float32)
    with pytest.raises(ValueError, match="cu_seqlens: must start at 0 and end at T=5"):
        begin_call(x[:1], 4, cu_seqlens=jnp.array([0, 4]), dtype=jnp.float32)
    with pytest.raises(ValueError, match="x: expected hidden size D=3"):
        begin_call(x, 3, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 5\)"):
        begin_call(x, 4, mask=jnp.ones((2, 4), bool), dtype=jnp.float32)
    with pytest.raises(ValueError, match="mode must be one of"):
        begin_call(x, 4, mode="fast", dtype=jnp.float32)


def test_linear_state_zeros_and_checks():
    dims = dict(conv_width=4, conv_channels=10, heads=2, key_dim=3, value_dim=5)
    state = zeros_linear_state(2, dtype=jnp.bfloat16, **dims)
    assert state.conv.buffer.shape == (2, 3, 10) and state.conv.buffer.dtype == jnp.bfloat16
    assert state.recurrent.state.shape == (2, 2, 3, 5) and state.recurrent.state.dtype == jnp.float32
    assert len(jax.tree.leaves(state)) == 2
    no_conv = zeros_linear_state(2, dtype=jnp.float32, **{**dims, "conv_width": None})
    assert no_conv.conv is None and len(jax.tree.leaves(no_conv)) == 1

    _, call = begin_call(jnp.ones((2, 3, 4)), 4, dtype=jnp.float32)
    check_linear_state(state, call, **dims)
    check_linear_state(no_conv, call, **{**dims, "conv_width": None})
    with pytest.raises(ValueError, match=r"state.conv: expected shape \(2, 3, 10\)"):
        check_linear_state(state._replace(conv=ConvState.zeros(1, 4, 10)), call, **dims)
    with pytest.raises(ValueError, match=r"state.conv: expected a ConvState of shape \(2, 3, 10\)"):
        check_linear_state(no_conv, call, **dims)
    with pytest.raises(ValueError, match="state.conv: expected None"):
        check_linear_state(state, call, **{**dims, "conv_width": None})
    with pytest.raises(ValueError, match=r"state.recurrent: expected shape \(2, 2, 3, 5\)"):
        check_linear_state(state._replace(recurrent=RecurrentState.zeros(2, 2, 5, 3)), call, **dims)
    with pytest.raises(TypeError, match="state: expected a LinearState"):
        check_linear_state((state.conv, state.recurrent), call, **dims)
    # with cu_seqlens the state batch is N
    _, call = begin_call(jnp.ones((1, 3, 4)), 4, cu_seqlens=jnp.array([0, 1, 3, 3]), dtype=jnp.float32)
    check_linear_state(zeros_linear_state(3, dtype=jnp.float32, **dims), call, **dims)
    with pytest.raises(ValueError, match=r"state.recurrent: expected shape \(3, 2, 3, 5\)"):
        check_linear_state(LinearState(ConvState.zeros(3, 4, 10), RecurrentState.zeros(1, 2, 3, 5)),
                           call, **dims)
    with x64():  # a float64 block keeps a float64 state
        state64 = zeros_linear_state(1, dtype="float64", **dims)
        assert state64.recurrent.state.dtype == jnp.float64 and state64.conv.buffer.dtype == jnp.float64


def test_short_conv_split_call_equals_the_whole_conv_split():
    conv = ShortConv(7, 3, bias=True, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(4)
    lengths = jnp.asarray([5, 3])
    for seq, cache in ((5, None), (5, rng.standard_normal((2, 2, 7)).astype(np.float32)),
                       (1, rng.standard_normal((2, 2, 7)).astype(np.float32))):
        x = rng.standard_normal((2, seq, 7)).astype(np.float32)
        lens = lengths if seq == 5 else None
        y, new_cache = conv(jnp.asarray(x), cache, lengths=lens)
        parts, part_cache = conv.split_call([x[..., :2], x[..., 2:5], x[..., 5:]], cache,
                                            lengths=lens)
        np.testing.assert_allclose(np.concatenate(parts, -1), y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(part_cache, new_cache, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="parts"):
        conv.split_call([x[..., :2]], None)
