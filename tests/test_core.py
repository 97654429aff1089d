"""Core runtime: config, conv, padding, gating, mode, caches, cheap import."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linearnexus.core import gating
from linearnexus.core.cache import ConvState, RecurrentState
from linearnexus.core.config import ConfigBase, ConfigError, field
from linearnexus.core.conv import depthwise_conv1d_causal, depthwise_conv1d_varlen
from linearnexus.core.mode import KernelMode, as_mode, select_mode
from linearnexus.core.padding import (
    align_valid_left,
    compute_unpadded_indices,
    layout_tokens,
    pad,
    restore_alignment,
    segment_ids_from_cu_seqlens,
    unlayout,
    unpad,
    validate_cu_seqlens,
)
from tests.helpers.parity import assert_close

# ---- config ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Inner(ConfigBase):
    width: int = field(4, gt=0)


@dataclasses.dataclass
class _Cfg(ConfigBase):
    d_model: int = field(64, gt=0)
    dropout: float = field(0.0, ge=0.0, lt=1.0)
    kind: str = field("a", choices=("a", "b"))
    pattern: tuple[str, ...] = ("x", "y")
    rank: int | None = None
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_config_round_trips_dict_and_yaml(tmp_path):
    cfg = _Cfg(d_model=32, dropout=0.1, kind="b", pattern=("m", "a"), rank=3, inner=_Inner(8))
    assert _Cfg.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    cfg.save_yaml(path)
    assert _Cfg.load_yaml(path) == cfg
    assert _Cfg.from_dict({"pattern": ["p"], "inner": {"width": 2}}).pattern == ("p",)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"d_modle": 3}, r"unknown field\(s\) for _Cfg: d_modle \(did you mean 'd_model'\?\)"),
        ({"d_model": 0}, r"d_model: expected a value > 0, got 0"),
        ({"d_model": 2.5}, r"d_model: expected int, got float"),
        ({"d_model": True}, r"d_model: expected int"),
        ({"dropout": 1.0}, r"dropout: expected a value < 1.0"),
        ({"kind": "c"}, r"kind: expected one of \['a', 'b'\], got 'c'"),
        ({"pattern": "abc"}, r"pattern: expected a sequence"),
        ({"rank": "3"}, r"rank: expected int \| NoneType"),
        ({"inner": {"width": -1}}, r"inner.width: expected a value > 0"),
        ({"inner": {"wdth": 1}}, r"inner.wdth"),
    ],
)
def test_config_errors_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        _Cfg.from_dict(data)


def test_config_replace_validates():
    cfg = _Cfg()
    assert cfg.replace(d_model=8).d_model == 8
    with pytest.raises(ConfigError, match="d_model"):
        cfg.replace(d_model=-1)


# ---- conv --------------------------------------------------------------------------------


def _conv_reference(x, w, b, cache):
    """Direct per-position sum in numpy float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    W = w.shape[0]
    ext = np.concatenate([np.asarray(cache, np.float64), x], axis=1)
    out = np.zeros_like(x)
    for t in range(x.shape[1]):
        out[:, t] = (ext[:, t : t + W] * w[None]).sum(1)
    return out + (0 if b is None else np.asarray(b))


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("seq", [1, 3, 17])
def test_conv_matches_direct_sum_and_pieces_equal_whole(width, seq):
    rng = np.random.default_rng(width * 100 + seq)
    x = rng.standard_normal((2, seq, 5)).astype(np.float32)
    w = rng.standard_normal((width, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    cache = rng.standard_normal((2, width - 1, 5)).astype(np.float32)
    out, new_cache = depthwise_conv1d_causal(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b),
                                             jnp.asarray(cache))
    assert_close(out, _conv_reference(x, w, b, cache), 1e-6, "conv output")
    # in pieces: token by token with the cache threaded
    c = jnp.asarray(cache)
    pieces = []
    for t in range(seq):
        o, c = depthwise_conv1d_causal(jnp.asarray(x[:, t : t + 1]), jnp.asarray(w), jnp.asarray(b), c)
        pieces.append(o)
    assert_close(jnp.concatenate(pieces, 1), out, 1e-6, "conv pieces")
    np.testing.assert_array_equal(np.asarray(c), np.asarray(new_cache))
    # the written-out backward against autodiff of the direct sum
    d_out = jnp.asarray(rng.standard_normal(out.shape).astype(np.float32))
    d_cache = jnp.asarray(rng.standard_normal(new_cache.shape).astype(np.float32))

    def direct(x, w, b, cache):
        ext = jnp.concatenate([cache, x], axis=1)
        y = sum(ext[:, k : k + seq] * w[k] for k in range(width)) + b
        return y, ext[:, seq:]

    def grads(fn):
        def loss(*args):
            y, new = fn(*args)
            return jnp.sum(y * d_out) + jnp.sum(new * d_cache)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(*map(jnp.asarray, (x, w, b, cache)))

    written = functools.partial(depthwise_conv1d_causal, written_backward=True)
    for name, g, r in zip(("inputs", "weight", "bias", "cache"), grads(written), grads(direct),
                          strict=True):
        assert_close(g, r, 1e-5, f"conv grad {name}")
    # the default keeps forward mode
    tangents = tuple(jnp.ones_like(jnp.asarray(a)) for a in (x, w, b, cache))
    _, got = jax.jvp(lambda *a: depthwise_conv1d_causal(*a)[0], tuple(map(jnp.asarray, (x, w, b, cache))),
                     tangents)
    _, want = jax.jvp(lambda *a: direct(*a)[0], tuple(map(jnp.asarray, (x, w, b, cache))), tangents)
    assert_close(got, want, 1e-5, "conv jvp")


def test_conv_cache_with_lengths_takes_last_valid_inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    _, cache = depthwise_conv1d_causal(x, w, lengths=jnp.array([6, 2]))
    np.testing.assert_array_equal(np.asarray(cache[0]), np.asarray(x[0, 3:6]))
    # row 1 has 2 valid tokens: the cache is [zero, x0, x1]
    np.testing.assert_array_equal(np.asarray(cache[1, 1:]), np.asarray(x[1, :2]))
    assert not np.any(np.asarray(cache[1, 0]))


def test_conv_errors():
    x = jnp.zeros((2, 5, 3))
    with pytest.raises(ValueError, match=r"inputs: expected rank 3"):
        depthwise_conv1d_causal(x[0], jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"weight: expected \[W, 3\]"):
        depthwise_conv1d_causal(x, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"cache: expected shape \(2, 3, 3\)"):
        depthwise_conv1d_causal(x, jnp.zeros((4, 3)), cache=jnp.zeros((2, 2, 3)))
    with pytest.raises(TypeError, match=r"inputs: expected a float dtype"):
        depthwise_conv1d_causal(x.astype(jnp.int32), jnp.zeros((4, 3)))


def _conv_per_sequence(x, w, b, cache, cu):
    """Varlen conv by running :func:`depthwise_conv1d_causal` on each sequence alone."""
    outs, caches = [], []
    for n in range(len(cu) - 1):
        piece = x[:, cu[n] : cu[n + 1]]
        o, c = depthwise_conv1d_causal(piece, w, b, cache[n : n + 1])
        outs.append(o)
        caches.append(c)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(caches, axis=0)


# sequences of length 0, 1, shorter than W-1, longer than W, a trailing empty one
_VARLEN_LENS = [[3, 0, 1, 2, 7, 0], [1], [0, 5], [9, 1, 1]]


# every width with the richest packing, every packing with the widest (or width-2) filter
@pytest.mark.parametrize("width,lens", [(1, _VARLEN_LENS[0]), (2, _VARLEN_LENS[0]),
                                        (4, _VARLEN_LENS[0]), (4, _VARLEN_LENS[1]),
                                        (4, _VARLEN_LENS[2]), (2, _VARLEN_LENS[3])])
def test_conv_varlen_equals_per_sequence(width, lens):
    rng = np.random.default_rng(width * 10 + len(lens))
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total, n, c = int(cu[-1]), len(lens), 5
    x = jnp.asarray(rng.standard_normal((1, total, c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((width, c)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(c), jnp.float32)
    cache = jnp.asarray(rng.standard_normal((n, width - 1, c)), jnp.float32)
    ref_out, ref_cache = _conv_per_sequence(x, w, b, cache, cu)
    out, new_cache = depthwise_conv1d_varlen(x, w, b, cache, cu_seqlens=jnp.asarray(cu))
    assert out.shape == (1, total, c) and new_cache.shape == (n, width - 1, c)
    assert_close(out, ref_out, 1e-6, "varlen conv output")
    assert_close(new_cache, ref_cache, 1e-6, "varlen conv cache")
    # cu_seqlens traced under jit
    run = jax.jit(lambda x, w, b, cache, cu: depthwise_conv1d_varlen(x, w, b, cache, cu_seqlens=cu))
    out_j, cache_j = run(x, w, b, cache, jnp.asarray(cu))
    assert_close(out_j, ref_out, 1e-6, "varlen conv output (jit)")
    assert_close(cache_j, ref_cache, 1e-6, "varlen conv cache (jit)")
    # no cache: every sequence starts from zeros
    out0, _ = depthwise_conv1d_varlen(x, w, cu_seqlens=jnp.asarray(cu))
    ref0, _ = _conv_per_sequence(x, w, None, jnp.zeros_like(cache), cu)
    assert_close(out0, ref0, 1e-6, "varlen conv output (no cache)")


def test_conv_varlen_gradients_match_per_sequence():
    rng = np.random.default_rng(7)
    lens, width, c = [2, 0, 5, 1], 4, 3
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    x = jnp.asarray(rng.standard_normal((1, int(cu[-1]), c)))
    w = jnp.asarray(rng.standard_normal((width, c)))
    b = jnp.asarray(rng.standard_normal(c))
    cache = jnp.asarray(rng.standard_normal((len(lens), width - 1, c)))
    d_out = jnp.asarray(rng.standard_normal(x.shape))
    d_cache = jnp.asarray(rng.standard_normal(cache.shape))

    def loss(fn):
        def f(x, w, b, cache):
            out, new_cache = fn(x, w, b, cache)
            return jnp.sum(out * d_out) + jnp.sum(new_cache * d_cache)
        return jax.grad(f, argnums=(0, 1, 2, 3))

    got = jax.jit(loss(lambda *a: depthwise_conv1d_varlen(*a, cu_seqlens=jnp.asarray(cu))))(
        x, w, b, cache)
    want = loss(lambda *a: _conv_per_sequence(*a, cu))(x, w, b, cache)
    for name, g, r in zip(("inputs", "weight", "bias", "cache"), got, want, strict=True):
        assert_close(g, r, 1e-6, f"grad {name}")


def test_conv_varlen_errors():
    x = jnp.zeros((1, 5, 3))
    w = jnp.zeros((4, 3))
    cu = jnp.array([0, 2, 5], jnp.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens: requires batch size 1"):
        depthwise_conv1d_varlen(jnp.zeros((2, 5, 3)), w, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"cu_seqlens: must start at 0 and end at T=5"):
        depthwise_conv1d_varlen(x, w, cu_seqlens=jnp.array([0, 2, 4], jnp.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens: must be non-decreasing"):
        depthwise_conv1d_varlen(x, w, cu_seqlens=jnp.array([0, 3, 2, 5], jnp.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected shape \[N\+1\]"):
        depthwise_conv1d_varlen(x, w, cu_seqlens=jnp.array([5], jnp.int32))
    with pytest.raises(TypeError, match=r"cu_seqlens: expected an integer dtype"):
        depthwise_conv1d_varlen(x, w, cu_seqlens=cu.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"cache: expected shape \(2, 3, 3\) \[N, W-1, C\]"):
        depthwise_conv1d_varlen(x, w, cache=jnp.zeros((1, 3, 3)), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"weight: expected \[W, 3\]"):
        depthwise_conv1d_varlen(x, jnp.zeros((4, 2)), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"bias: expected shape \(3,\)"):
        depthwise_conv1d_varlen(x, w, jnp.zeros(2), cu_seqlens=cu)


# ---- padding -----------------------------------------------------------------------------


def test_unpad_pad_round_trip_and_cu_seqlens():
    rng = np.random.default_rng(1)
    mask = jnp.asarray(rng.random((3, 7)) > 0.4)
    x = jnp.asarray(rng.standard_normal((3, 7, 2)), jnp.float32)
    idx, cu = compute_unpadded_indices(mask)
    flat = unpad(x, idx)
    assert flat.shape == (int(mask.sum()), 2)
    np.testing.assert_array_equal(np.asarray(cu), np.concatenate([[0], np.cumsum(mask.sum(1))]))
    back = pad(flat, idx, 3, 7)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(jnp.where(mask[..., None], x, 0)))


def test_unpad_pad_under_jit_with_static_bound():
    rng = np.random.default_rng(2)
    mask = jnp.asarray(rng.random((2, 5)) > 0.5)
    x = jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)

    @jax.jit
    def round_trip(x, mask):
        idx, _ = compute_unpadded_indices(mask, total=10)
        return pad(unpad(x, idx), idx, 2, 5)

    np.testing.assert_array_equal(np.asarray(round_trip(x, mask)), np.asarray(jnp.where(mask, x, 0)))


def test_align_valid_left_round_trip():
    rng = np.random.default_rng(3)
    mask = jnp.asarray(rng.random((4, 9)) > 0.5)
    x = jnp.asarray(rng.standard_normal((4, 9, 2)), jnp.float32)
    aligned, perm, lengths = align_valid_left(x, mask)
    for b in range(4):
        n = int(lengths[b])
        np.testing.assert_array_equal(np.asarray(aligned[b, :n]), np.asarray(x[b][np.asarray(mask[b])]))
    np.testing.assert_array_equal(np.asarray(restore_alignment(aligned, perm)), np.asarray(x))


def test_layout_tokens_positions_zeroed_pads_and_unlayout():
    rng = np.random.default_rng(4)
    mask = np.asarray([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
    x = rng.standard_normal((3, 5, 2)).astype(np.float32)
    x[~mask] = np.nan  # a non-finite pad must not survive the layout
    offset = jnp.asarray([4, 0, 7], jnp.int32)
    xa, layout = layout_tokens(jnp.asarray(x), jnp.asarray(mask), offset)
    np.testing.assert_array_equal(np.asarray(layout.n_valid), [3, 5, 1])
    np.testing.assert_array_equal(np.asarray(layout.positions[0]), [4, 5, 6, 7, 8])
    np.testing.assert_array_equal(np.asarray(layout.valid), np.arange(5) < [[3], [5], [1]])
    for b in range(3):
        n = int(layout.n_valid[b])
        np.testing.assert_array_equal(np.asarray(xa[b, :n]), x[b][mask[b]])
        assert not np.any(np.asarray(xa[b, n:]))  # pads are zeros, not NaN
    y = jnp.where(layout.valid[..., None], xa * 2, jnp.nan)  # a block's NaN at pads
    back = np.asarray(unlayout(y, layout))
    np.testing.assert_array_equal(back, np.where(mask[..., None], 2 * np.nan_to_num(x), 0))
    # no mask: nothing moves, positions start at 0
    xa, layout = layout_tokens(jnp.asarray(x), None)
    assert layout.perm is None and unlayout(xa, layout) is xa
    np.testing.assert_array_equal(np.asarray(layout.positions), np.broadcast_to(np.arange(5), (3, 5)))


def test_cu_seqlens_checks_and_segment_ids():
    cu = jnp.array([0, 2, 2, 5], jnp.int32)
    validate_cu_seqlens(cu, 5, batch=1)
    np.testing.assert_array_equal(np.asarray(segment_ids_from_cu_seqlens(cu, 5)), [0, 0, 2, 2, 2])
    with pytest.raises(ValueError, match="cu_seqlens: requires batch size 1"):
        validate_cu_seqlens(cu, 5, batch=2)
    with pytest.raises(ValueError, match="non-decreasing"):
        validate_cu_seqlens(jnp.array([0, 3, 2, 5], jnp.int32), 5, batch=1)
    with pytest.raises(ValueError, match="end at T=6"):
        validate_cu_seqlens(cu, 6, batch=1)
    with pytest.raises(TypeError, match="integer"):
        validate_cu_seqlens(cu.astype(jnp.float32), 5, batch=1)


# ---- gating, mode, caches ----------------------------------------------------------------


def test_gates():
    x = jnp.linspace(-30, 30, 101)
    g = gating.log_sigmoid_gate(x, 16.0)
    assert bool(jnp.all(g <= 0)) and bool(jnp.all(jnp.isfinite(g)))
    assert float(gating.clamp_log_gate(jnp.array(-50.0))) == -20.0
    y = jnp.array([1e-4, 0.01, 0.5, 3.0])
    assert_close(jax.nn.softplus(gating.inverse_softplus(y)), y, 1e-5, "inverse softplus")
    dt = jax.nn.softplus(gating.sample_dt_bias(jax.random.PRNGKey(0), (1000,)))
    assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    # log-uniform: the median of log(dt) sits near the middle of [log 1e-3, log 0.1]
    assert abs(float(jnp.median(jnp.log(dt))) - np.log(1e-2)) < 0.3
    decay = gating.retention_log_decay(4)
    assert_close(decay, np.log(1 - 2.0 ** (-5 - np.arange(4))), 1e-6, "retention decay")
    w_down, w_up = jnp.ones((6, 2)), jnp.ones((2, 3))
    assert gating.low_rank_gate(jnp.ones((4, 6)), w_down, w_up).shape == (4, 3)
    with pytest.raises(ValueError, match="w_up"):
        gating.low_rank_gate(jnp.ones((4, 6)), w_down, jnp.ones((3, 3)))


def test_select_mode():
    assert select_mode(1) is KernelMode.RECURRENT
    assert select_mode(63) is KernelMode.RECURRENT
    assert select_mode(64) is KernelMode.CHUNK
    assert select_mode(5, threshold=4) is KernelMode.CHUNK
    assert as_mode("CHUNK") is KernelMode.CHUNK
    with pytest.raises(ValueError, match="mode must be one of"):
        as_mode("fast")
    with pytest.raises(ValueError, match="seq_len"):
        select_mode(-1)


def test_caches_are_pytrees_and_update_checks_shape():
    conv = ConvState.zeros(2, 4, 3)
    rec = RecurrentState.zeros(2, 3, 5)
    assert conv.buffer.shape == (2, 3, 3) and rec.state.dtype == jnp.float32
    leaves = jax.tree.leaves((conv, rec))
    assert len(leaves) == 2
    with pytest.raises(ValueError, match="buffer: expected shape"):
        conv.update(jnp.zeros((2, 2, 3)))
    assert rec.update(jnp.ones((2, 3, 5))).state.sum() == 30


def test_import_is_cheap():
    code = ("import sys, linearnexus, linearnexus.registry; "
            "bad = [m for m in ('flax', 'optax', 'orbax', 'linearnexus.kernels.mamba') if m in sys.modules];"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_checks_on_closed_over_concrete_values_work_under_jit():
    """Gates and masks closed over by a jitted function are concrete, but jnp ops on them
    inside the trace are staged out: the value checks must not call bool() on those."""
    from linearnexus.core.padding import validate_mask
    from linearnexus.kernels.simple_gla import simple_gla

    rng = np.random.default_rng(0)
    mask = jnp.asarray(rng.integers(0, 2, (2, 8)).astype(np.float32))
    assert int(jax.jit(lambda: validate_mask(mask, 2, 8).sum())()) == int(mask.sum())
    q = jnp.asarray(rng.standard_normal((1, 9, 2, 5)), jnp.float32)
    g = -jnp.asarray(rng.random((1, 9, 2)), jnp.float32)
    eager = simple_gla(q, q, q, g)[0]
    traced = jax.jit(lambda q: simple_gla(q, q, q, g)[0])(q)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(eager), rtol=1e-5, atol=1e-6)
    bad = g.at[0, 3, 1].set(0.5)
    with pytest.raises(ValueError, match="g: log-gates must be <= 0"):
        jax.jit(lambda q: simple_gla(q, q, q, bad)[0])(q)
