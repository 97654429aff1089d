"""A recurrent layer's batch-1 input projection and layer kernel in one launch
(kernels/fused_decode/arrival.py; Mamba2 and the DeltaNet family), checked in interpret
mode against the two separate kernels: the programs run one after another there, with the
same atomics and counts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import linearnexus.kernels.fused_decode.api as layer_api
import linearnexus.kernels.fused_decode.gemv as gemv
from linearnexus.kernels.fused_decode import arrival as A
from linearnexus.kernels.fused_decode.pallas import DeltaLayerSpec, SsdLayerSpec
from linearnexus.models import LMModel, ModelConfig
from tests.helpers.decode import random_state

pytestmark = pytest.mark.usefixtures("cpu_dispatch")


def _fail(*_):
    pytest.fail("the layer kernel's reference is the backward pass only")


def _operands(dtype, *, groups: int = 1, d_per_channel: bool = False, norm: bool = True,
              seed: int = 0) -> dict:
    """Random operands of order one for a 4-head layer (P = N = 16) over D = 48."""
    spec = SsdLayerSpec(heads=4, head_dim=16, groups=groups, d_state=16, conv_width=None,
                        d_per_channel=d_per_channel, dt_limit=(0.0, 2.0) if groups > 1 else None)
    depth, channels = 48, spec.conv_channels
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    f32 = jnp.float32

    def rnd(shape, scale=1.0, dt=dtype):
        return (scale * jax.random.normal(next(keys), shape, f32)).astype(dt)

    return dict(x=rnd((1, depth)), norm1_scale=rnd((depth,), 0.2) + 1 if norm else None,
                norm1_eps=1e-5 if norm else None,
                w_in_t=rnd((spec.width, depth), depth ** -0.5), conv_cache=rnd((1, 3, channels)),
                conv_weight=rnd((4, channels), 0.5), conv_bias=rnd((channels,), 0.1),
                spec=spec, state=rnd((1, 4, 16, 16), 0.3, f32), a_log=rnd((4,), 0.5, f32),
                dt_bias=rnd((4,), 0.5, f32),
                d=rnd((4, 16) if d_per_channel else (4,), 1.0, f32))


@pytest.mark.parametrize("dtype,groups,d_per_channel,norm,state16", [
    ("float32", 1, False, True, False),
    ("bfloat16", 2, True, False, False),  # two groups of B | C, D per channel, no pre-norm
    ("float32", 1, False, True, True),  # a bf16 decode state, read and written as bf16
])
def test_one_launch_equals_the_separate_kernels(dtype, groups, d_per_channel, norm, state16):
    """The projection's programs and, in whichever program completes a head's columns, the
    layer kernel's program for that head: y, conv cache and state equal the two separate
    kernels' bit for bit (P = 16: one value block), the column blocks taken in either order,
    at 8 rows of the weight a program and at the separate kernel's 2."""
    ops = _operands(jnp.dtype(dtype), groups=groups, d_per_channel=d_per_channel, norm=norm)
    assert A.ssd_blocks(ops["spec"].head_dim) == 1
    if state16:
        ops["state"] = ops["state"].astype(jnp.bfloat16)
    want = A.ssd_in_layer_separate(**ops, layer_fallback=_fail)
    assert float(jnp.abs(want[0]).max()) > 0.05  # every head's output is there to compare
    tol = (1e-5 if dtype == "float32" else 1e-2) if jax.default_backend() == "gpu" else 0.0
    for reverse, rows in ((True, None), (False, None), (True, "2")):
        with pytest.MonkeyPatch.context() as mp:
            if rows:
                mp.setenv(A.ROWS_ENV, rows)
            got = A.ssd_in_layer(**ops, reverse=reverse)
        for name, a, b in zip(("y", "conv cache", "state"), got, want, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=tol, atol=tol,
                                       err_msg=f"{name}, reverse={reverse}, rows={rows}")


def test_value_blocks_of_a_wide_head():
    """P = 64: the head's last program runs its step in 4 value blocks of 16 columns (fewer
    registers for the whole launch); y, cache and state equal one block's to float32
    rounding (1e-6), the state and cache exactly."""
    spec = SsdLayerSpec(heads=2, head_dim=64, groups=1, d_state=16, conv_width=None,
                        d_per_channel=True, dt_limit=None)
    assert A.ssd_blocks(64) == 4 and A.ssd_blocks(32) == 2 and A.ssd_blocks(24) == 1
    ops = _operands(jnp.float32, seed=4)
    channels = spec.conv_channels
    keys = iter(jax.random.split(jax.random.PRNGKey(9), 8))
    ops.update(spec=spec, w_in_t=jax.random.normal(next(keys), (spec.width, 48)) * 0.15,
               conv_cache=jax.random.normal(next(keys), (1, 3, channels)),
               conv_weight=jax.random.normal(next(keys), (4, channels)) * 0.5,
               conv_bias=jax.random.normal(next(keys), (channels,)) * 0.1,
               state=jax.random.normal(next(keys), (1, 2, 16, 64)) * 0.3,
               a_log=ops["a_log"][:2], dt_bias=ops["dt_bias"][:2],
               d=jax.random.normal(next(keys), (2, 64)))
    want = A.ssd_in_layer_separate(**ops, layer_fallback=_fail)
    got = A.ssd_in_layer(**ops)
    for name, a, b, tol in zip(("y", "conv cache", "state"), got, want, (1e-6, 0.0, 0.0),
                               strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol,
                                   err_msg=name)


def test_each_head_reads_its_columns():
    """``feeds``: head h reads z_h, x_h, its group's B and C and dt_h, and the per-head
    counts come to ``head_columns`` whatever the blocks' width."""
    spec = SsdLayerSpec(heads=4, head_dim=8, groups=2, d_state=4, conv_width=None,
                        d_per_channel=False, dt_limit=None)
    cols = jnp.arange(spec.width)  # z 0..31 | x 32..63 | B 64..71 | C 72..79 | dt 80..83
    for h in range(spec.heads):
        got = np.flatnonzero(np.asarray(A.feeds(cols, jnp.int32(h), spec)))
        g = h // 2
        want = np.concatenate([np.arange(8 * h, 8 * h + 8), np.arange(32 + 8 * h, 40 + 8 * h),
                               np.arange(64 + 4 * g, 68 + 4 * g), np.arange(72 + 4 * g, 76 + 4 * g),
                               [80 + h]])
        np.testing.assert_array_equal(got, want)
        assert len(got) == A.head_columns(spec)


def test_gradients_follow_the_separate_kernels():
    """Differentiated through the separate kernels (the layer kernel's own reference for
    its part): the same gradients as the separate path's for x, the weights and the
    state."""
    ops = _operands(jnp.float32, seed=3)
    spec = ops.pop("spec")
    eps = ops.pop("norm1_eps")
    ref = lambda *a: _layer_reference(spec, *a)  # noqa: E731

    def loss(fn, x, w, state):
        y, cache, final = fn(dict(ops, x=x, w_in_t=w, state=state))
        return jnp.sum(y ** 2) + jnp.sum(final * 0.5) + jnp.sum(cache ** 2)

    fused = lambda o: A.layer_call(o, spec=spec, norm1_eps=eps, layer_fallback=ref)  # noqa: E731
    separate = lambda o: A.ssd_in_layer_separate(**o, spec=spec, norm1_eps=eps,  # noqa: E731
                                                 layer_fallback=ref)
    args = (ops["x"], ops["w_in_t"], ops["state"])
    got = jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2))(*args)
    want = jax.grad(lambda *a: loss(separate, *a), argnums=(0, 1, 2))(*args)
    for a, b in zip(got, want, strict=True):
        assert float(jnp.abs(b).max()) > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def _layer_reference(spec, proj, cache, w, bias, state, a_log, dt_bias, d):
    """The layer kernel's math without a conv, for the gradient test: the Mamba2 block's own
    reference (``Mamba2._layer_reference``) on a throwaway block of the same sizes."""
    from linearnexus.modules.ssm.mamba2 import Mamba2Block, Mamba2Config

    block = Mamba2Block(Mamba2Config(d_model=48, d_state=spec.d_state, headdim=spec.head_dim,
                                     expand=2, ngroups=spec.groups), rngs=nnx.Rngs(0))
    return block._layer_reference(spec, proj, cache, w, bias, state, a_log, dt_bias, d)


def _delta_operands(dtype, *, gated: bool, output_gate: bool, norm_out: bool,
                    value_blocks: int, seed: int = 0) -> dict:
    """Random operands for a 2-head DeltaNet-family layer (K = 16, V = 32) over D = 48."""
    spec = DeltaLayerSpec(heads=2, key_dim=16, value_dim=32, conv_width=None,
                          silu_without_conv=False, gated=gated, output_gate=output_gate,
                          allow_neg_eigval=not gated, qk_eps=1e-6, norm_eps=1e-5,
                          scale=0.25, norm_out=norm_out, value_blocks=value_blocks)
    depth, channels = 48, spec.qkv_width
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    f32 = jnp.float32

    def rnd(shape, scale=1.0, dt=dtype):
        return (scale * jax.random.normal(next(keys), shape, f32)).astype(dt)

    return dict(x=rnd((1, depth)), norm1_scale=rnd((depth,), 0.2) + 1, norm1_eps=1e-5,
                w_in_t=rnd((spec.width, depth), depth ** -0.5), conv_cache=rnd((1, 3, channels)),
                conv_weight=rnd((4, channels), 0.5), conv_bias=rnd((channels,), 0.1),
                spec=spec, state=rnd((1, 2, 16, 32), 0.3, f32),
                a_log=rnd((2,), 0.5, f32) if gated else None,
                dt_bias=rnd((2,), 0.5, f32) if gated else None,
                norm_scale=rnd((32,), 0.2, f32) + 1)


@pytest.mark.parametrize("dtype,gated,output_gate,norm_out,value_blocks,state16", [
    ("float32", True, True, False, 2, False),  # Gated DeltaNet as batch 1 runs it
    ("bfloat16", False, False, True, 1, False),  # DeltaNet, the norm in the layer kernel
    ("float32", True, True, True, 1, True),  # the gate's columns counted in; a bf16 state
])
def test_delta_one_launch_equals_the_separate_kernels(dtype, gated, output_gate, norm_out,
                                                      value_blocks, state16):
    """The DeltaNet family's input projection and layer kernel (its value blocks in turn in
    the head's last program): projection row, output, conv cache and state equal the two
    separate kernels' bit for bit, the column blocks taken in either order."""
    ops = _delta_operands(jnp.dtype(dtype), gated=gated, output_gate=output_gate,
                          norm_out=norm_out, value_blocks=value_blocks)
    if state16:
        ops["state"] = ops["state"].astype(jnp.bfloat16)
    want = A.delta_in_layer_separate(**ops, layer_fallback=_fail)
    assert float(jnp.abs(want[1].astype(jnp.float32)).max()) > 0.05
    tol = (1e-5 if dtype == "float32" else 1e-2) if jax.default_backend() == "gpu" else 0.0
    for reverse in (True, False):
        got = A.delta_in_layer(**ops, reverse=reverse)
        for name, a, b in zip(("proj", "y", "conv cache", "state"), got, want, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=tol, atol=tol, err_msg=f"{name}, reverse={reverse}")
    with pytest.raises(ValueError, match=r"state: expected shape \(1, 2, 16, 32\)"):
        A.delta_in_layer(**{**ops, "state": ops["state"][:, :1]})
    with pytest.raises(ValueError, match="spec: expected conv_width=None"):
        A.delta_in_layer(**{**ops, "spec": dataclasses.replace(ops["spec"], conv_width=4)})


def test_delta_heads_read_their_columns():
    """``feeds`` for the DeltaNet family: q_h, k_h, v_h, the beta and decay logits, and the
    output gate only where the layer kernel gates."""
    for norm_out, gate_cols in ((False, 0), (True, 32)):
        spec = DeltaLayerSpec(heads=2, key_dim=16, value_dim=32, conv_width=None,
                              silu_without_conv=False, gated=True, output_gate=True,
                              allow_neg_eigval=False, qk_eps=1e-6, norm_eps=1e-5, scale=0.25,
                              norm_out=norm_out)
        cols = jnp.arange(spec.width)  # q 0..31 | k 32..63 | v 64..127 | b 128.. | a 130.. | g 132..
        got = np.flatnonzero(np.asarray(A.feeds(cols, jnp.int32(1), spec)))
        want = np.concatenate([np.arange(16, 32), np.arange(48, 64), np.arange(96, 128), [129],
                               [131], np.arange(164, 164 + gate_cols)])
        np.testing.assert_array_equal(got, want)
        assert len(got) == A.head_columns(spec) == 16 + 16 + 32 + 2 + gate_cols


def test_bad_operands_are_refused():
    """A spec with a conv or value blocks, a batch of 2, a weight of the wrong shape and a
    pre-norm scale without its eps are refused by name; so is a bad switch value."""
    ops = _operands(jnp.float32)
    spec = ops["spec"]
    with pytest.raises(ValueError, match="spec: expected conv_width=None"):
        A.ssd_in_layer(**{**ops, "spec": dataclasses.replace(spec, conv_width=4)})
    with pytest.raises(ValueError, match="spec: expected conv_width=None and value_blocks=1"):
        A.ssd_in_layer(**{**ops, "spec": dataclasses.replace(spec, value_blocks=2)})
    with pytest.raises(ValueError, match=r"x: expected \[1, D\], got shape \(2, 48\)"):
        A.ssd_in_layer(**{**ops, "x": jnp.concatenate([ops["x"]] * 2)})
    with pytest.raises(ValueError, match=r"w_in_t: expected shape \(164, 48\)"):
        A.ssd_in_layer(**{**ops, "w_in_t": ops["w_in_t"][:-1]})
    with pytest.raises(ValueError, match="norm1_scale, norm1_eps: expected both or neither"):
        A.ssd_in_layer(**{**ops, "norm1_eps": None})


def test_rows_a_program(monkeypatch):
    """8 rows of the weight a program by default, or LINEARNEXUS_ARRIVAL_ROWS, halved until
    they divide the conv's start and channels; a bad value is refused by name."""
    monkeypatch.delenv(A.ROWS_ENV, raising=False)
    assert A.proj_rows(2048, 2176) == 8 and A.proj_rows(0, 4096) == 8
    assert A.proj_rows(2052, 2176) == 4 and A.proj_rows(2050, 2176) == 2
    monkeypatch.setenv(A.ROWS_ENV, "32")
    assert A.proj_rows(2048, 2176) == 32 and A.proj_rows(2048, 2160) == 16
    monkeypatch.setenv(A.ROWS_ENV, "3")
    with pytest.raises(ValueError, match="LINEARNEXUS_ARRIVAL_ROWS: expected a power of two"):
        A.proj_rows(2048, 2176)


def test_switch(monkeypatch):
    monkeypatch.delenv(A.ARRIVAL_ENV, raising=False)
    assert not A.arrival_enabled()
    monkeypatch.setenv(A.ARRIVAL_ENV, "1")
    assert A.arrival_enabled()
    monkeypatch.setenv(A.ARRIVAL_ENV, "on")
    with pytest.raises(ValueError, match="LINEARNEXUS_DECODE_ARRIVAL: expected '0' or '1'"):
        A.arrival_enabled()


@pytest.mark.parametrize("pattern,mlp,kernel,tol", [
    # P = 64: a Mamba2 head's step runs in value blocks (A.ssd_blocks), whose sums round
    # apart from one block's by an ulp
    ("mamba2", False, "ssd_in_layer", 1e-5),
    ("gated_deltanet", True, "delta_in_layer", 0.0),
])
def test_model_decode_step_and_generation_through_one_launch(monkeypatch, pattern, mlp,
                                                             kernel, tol):
    """A Mamba2 LM and a Gated DeltaNet LM with an MLP at batch 1, the kernels picked as on
    a GPU (interpreted): one launch per layer for the input projection and the layer kernel
    (then ``out_proj`` / ``o_proj`` as before); logits and states equal the separate
    kernels' (Mamba2 to 1e-5, GDN exactly; 1e-5 on a GPU), and greedy generation gives the
    same tokens."""
    from linearnexus.generate import SamplingConfig, generate

    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, block_pattern=(pattern,),
                      mlp=mlp, tie_embeddings=True)
    model = LMModel(cfg, rngs=nnx.Rngs(0))
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setattr(layer_api, "_compiles", lambda: True)
    launches = []
    real = getattr(A, kernel)
    monkeypatch.setattr(A, kernel, lambda *a, **k: launches.append(1) or real(*a, **k))
    state, tokens = random_state(model, 5), jnp.array([[7]], jnp.int32)

    def step():
        return jax.jit(lambda: model(tokens, state=state, mode="recurrent"))()

    monkeypatch.setenv(A.ARRIVAL_ENV, "0")
    want = step()
    assert not launches
    monkeypatch.setenv(A.ARRIVAL_ENV, "1")
    got = step()
    assert len(launches) == cfg.n_layers
    tol = max(tol, 1e-5 if jax.default_backend() == "gpu" else 0.0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)
    sampler = SamplingConfig(temperature=0.0, max_new_tokens=6)
    on = generate(model, [[3, 14, 15, 9]], sampler)
    monkeypatch.setenv(A.ARRIVAL_ENV, "0")
    assert on == generate(model, [[3, 14, 15, 9]], sampler) and len(on[0]) == 6
