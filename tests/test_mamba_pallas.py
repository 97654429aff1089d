"""What the Pallas selective-scan kernels need beyond the op suite (interpret mode on the CPU).

The suite (``tests/test_mamba_kernel.py``, its ``SMALL_IMPLEMENTATIONS`` line for "pallas")
checks outputs, final state and every gradient against the reference in float32 and
bfloat16. Here: other tiles and launch knobs, the step size computed inside the kernels,
packed sequences through the kernel's own layout, the kernels' math primitives, lowering
for CUDA on the CPU, and the Mamba block on this backend. Shapes are tiny: interpret mode
is slow, and compiling dominates this file's run time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus.kernels.base import GridConfig
from linearnexus.kernels.common.gpu_lowering import lower_for_gpu
from linearnexus.kernels.common.pallas import TritonConfig
from linearnexus.kernels.mamba import pallas as mamba_pallas
from linearnexus.kernels.mamba import selective_scan
from linearnexus.kernels.mamba.api import BACKENDS
from linearnexus.kernels.mamba.pallas import (
    default_config,
    memory_floor_bytes,
    resolve_config,
    selective_scan_pallas,
)
from linearnexus.kernels.mamba.reference import selective_scan_reference
from linearnexus.modules.ssm.mamba import MambaBlock, MambaConfig
from tests.helpers.parity import assert_close, jit_block, x64
from tests.test_mamba_kernel import small_check
from tests.test_mamba_kernel import small_inputs as make_inputs

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "initial_state")


def check(inputs, key, tol, config=None):
    """``selective_scan_pallas`` with ``config`` against the reference (:func:`small_check`)."""
    def fn(*a, **kw):
        return selective_scan_pallas(*a, config=config, **kw)
    small_check(fn, inputs, key, tol)


def test_without_skip_and_gate_other_tiles(key):
    # no D, no z, no initial state; 32-step tiles, 40 channels in 3 blocks, T = 45
    inputs = make_inputs(key, seq=45, channels=40, n=3)
    inputs["D"] = inputs["z"] = inputs["initial_state"] = None
    check(inputs, key, 1e-4, TritonConfig(chunk=32, block_v=16))


def test_recurrent_mode_and_dispatch(key):
    # recurrent mode delegates to the per-step reference
    inputs = make_inputs(key, seq=2, channels=16, n=4)
    args = [inputs[k] for k in NAMES[:5]]
    y_rec, _ = selective_scan(*args, mode="recurrent", backend="pallas")
    assert_close(y_rec, selective_scan_reference(*args)[0], 1e-6, "recurrent")
    kernel = BACKENDS["pallas"]
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        assert kernel.supports(platform="gpu", dtype=dtype)
        assert not kernel.supports(platform="cpu", dtype=dtype)
        assert not kernel.supports(platform="tpu", dtype=dtype)
    assert not kernel.supports(platform="gpu", dtype=jnp.float64)


def test_bad_config_names_the_field(key):
    with pytest.raises(ValueError, match=r"block_v: expected a power of two >= 16"):
        TritonConfig(block_v=24)
    with pytest.raises(ValueError, match=r"chunk: expected a power of two >= 16"):
        TritonConfig(chunk=8)
    with pytest.raises(ValueError, match=r"block_k: the selective scan has no key dimension"):
        resolve_config(TritonConfig(block_k=16), 2, 8, 16, 4)
    with pytest.raises(ValueError, match=r"par_block_k: the selective scan has no key dimension"):
        resolve_config(TritonConfig(par_block_k=16), 2, 8, 16, 4)
    with pytest.raises(TypeError, match=r"config: expected TritonConfig"):
        resolve_config({"block_v": 16}, 2, 8, 16, 4)
    inputs = make_inputs(key, seq=8, channels=16, n=4)
    args = [inputs[k] for k in NAMES[:5]]
    with pytest.raises(ValueError, match=r"grid.block_c: .* power of two >= 16"):
        selective_scan(*args, mode="chunk", backend="pallas", grid=GridConfig(block_c=24))
    with x64():
        with pytest.raises(NotImplementedError, match=r"x: the Pallas selective scan takes"):
            selective_scan_pallas(*(a.astype(jnp.float64) for a in args))


def test_default_config_and_memory_floor():
    for cfg in (default_config(1, 128, 64, 16), default_config(8, 4096, 4096, 16)):
        assert (cfg.chunk, cfg.block_v, cfg.num_warps, cfg.num_stages) == (16, 16, 1, 1)
    assert [mamba_pallas.bwd_warps(w) for w in (1, 2, 4, 8)] == [4, 8, 16, 16]
    assert resolve_config(TritonConfig(chunk=64), 1, 128, 64, 16).chunk == 64
    # B=1, T=2, D=4, N=2 in float32: x, dt, z, y 8 floats each; B, C 4 each; A 8; D 4;
    # initial + final state 8 each
    assert memory_floor_bytes(1, 2, 4, 2, jnp.float32) == 4 * (4 * 8 + 2 * 4 + 8 + 4 + 2 * 8)


def test_mamba_block_with_pallas_backend():
    cfg = MambaConfig.tiny(kernel_backend="pallas")  # d_inner 32, d_state 4
    block = MambaBlock(cfg, rngs=nnx.Rngs(0))
    ref = MambaBlock(MambaConfig.tiny(kernel_backend="jax"), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 19, 16)), jnp.float32)
    y, state = jit_block(block, "chunk")(x)
    y_ref, state_ref = jit_block(ref, "chunk")(x)
    assert_close(y, y_ref, 1e-4, "block output")
    assert_close(state.ssm.state, state_ref.ssm.state, 1e-4, "block ssm state")


def test_masked_mamba_block_gradients_with_pallas_backend():
    # a padded batch through the block (step size 0 on pads) with the Pallas backend: output,
    # state and every parameter's gradient against the jax backend, all finite
    cfg = MambaConfig.tiny(kernel_backend="pallas")
    block = MambaBlock(cfg, rngs=nnx.Rngs(0))
    ref = MambaBlock(MambaConfig.tiny(kernel_backend="jax"), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 21, 16)), jnp.float32)
    mask = jnp.asarray(np.arange(21)[None, :] < np.array([[21], [13]]))
    w = jnp.asarray(rng.standard_normal((2, 21, 16)), jnp.float32)

    def loss(b):
        y, st = b(x, mask=mask, mode="chunk")
        return jnp.sum(y * w) + jnp.sum(st.ssm.state), (y, st.ssm.state)

    def run(b):
        return nnx.jit(nnx.grad(loss, has_aux=True))(b)

    (g, (y, h)), (g_ref, (y_ref, h_ref)) = run(block), run(ref)
    assert_close(y, y_ref, 1e-4, "masked block output")
    assert_close(h, h_ref, 1e-4, "masked block state")
    flat, flat_ref = nnx.to_flat_state(g), nnx.to_flat_state(g_ref)
    assert len(flat) == len(flat_ref) > 5
    for (k, v), (_, v_ref) in zip(flat, flat_ref, strict=True):
        assert np.isfinite(np.asarray(v[...])).all(), k
        assert_close(v[...], v_ref[...], 1e-4, f"d{k}")


@pytest.mark.parametrize("reverse, flip", [(False, False), (True, False), (True, True)])
def test_linear_scan_matches_a_loop_inside_a_kernel(reverse, flip):
    # the affine scan primitive the kernels use, run inside a Pallas kernel (interpret mode;
    # flip only changes the Triton lowering, which test_kernels_lower_to_triton_for_a_gpu builds)
    from jax.experimental import pallas as pl

    from linearnexus.kernels.common.pallas_scan import linear_scan

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0.0, 1.0, (16, 4, 8)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((16, 4, 8)), jnp.float32)

    def kernel(a_ref, b_ref, pa_ref, pb_ref):
        pa, pb = linear_scan(a_ref[...], b_ref[...], axis=0, reverse=reverse, flip=flip)
        pa_ref[...], pb_ref[...] = pa, pb

    shape = jax.ShapeDtypeStruct(a.shape, jnp.float32)
    pa, pb = pl.pallas_call(kernel, out_shape=(shape, shape), interpret=True)(a, b)
    order = range(15, -1, -1) if reverse else range(16)
    prod, acc = np.ones((4, 8)), np.zeros((4, 8))
    want_a, want_b = np.zeros((16, 4, 8)), np.zeros((16, 4, 8))
    for t in order:
        prod, acc = prod * np.asarray(a[t]), np.asarray(a[t]) * acc + np.asarray(b[t])
        want_a[t], want_b[t] = prod, acc
    np.testing.assert_allclose(pa, want_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pb, want_b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="a, b: expected one shape"):
        linear_scan(a, b[:8])
    with pytest.raises(ValueError, match="flip: the scanned axis must have a power-of-two"):
        linear_scan(a[:12], b[:12], axis=0, reverse=True, flip=True)


def test_compensated_cumsum_inside_a_kernel():
    # GLA's in-chunk log-decay sums: hi + lo carries the prefix sums far beyond float32
    from jax.experimental import pallas as pl

    from linearnexus.kernels.common.pallas_scan import compensated_cumsum

    rng = np.random.default_rng(2)
    x = jnp.asarray(-19.0 - rng.uniform(0.0, 1.0, (64, 32)), jnp.float32)  # strong decay

    def kernel(x_ref, hi_ref, lo_ref):
        hi_ref[...], lo_ref[...] = compensated_cumsum(x_ref[...], axis=0)

    shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    hi, lo = pl.pallas_call(kernel, out_shape=(shape, shape), interpret=True)(x)
    exact = np.cumsum(np.asarray(x, np.float64), axis=0)
    got = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    plain = np.asarray(jnp.cumsum(x, axis=0), np.float64)
    assert np.max(np.abs(got - exact)) < 1e-9 * np.max(np.abs(exact))
    assert np.max(np.abs(plain - exact)) > 1e3 * np.max(np.abs(got - exact))  # float32 alone
    np.testing.assert_allclose(hi, exact, rtol=1e-6)  # hi is the rounded sum
    with pytest.raises(ValueError, match="x: expected float32"):
        compensated_cumsum(x.astype(jnp.bfloat16))


def test_kernel_math_primitives_inside_a_kernel():
    # fma, dot_sum (every axis) and the approximate exp2 / reciprocal the kernels use, run
    # inside a Pallas kernel in interpret mode, against plain numpy
    from jax.experimental import pallas as pl

    from linearnexus.kernels.common.pallas_scan import dot_sum, exp2_approx, fma, rcp_approx

    rng = np.random.default_rng(1)
    u, v, w = (jnp.asarray(rng.standard_normal((8, 4, 16)), jnp.float32) for _ in range(3))

    def kernel(u_ref, v_ref, w_ref, f_ref, s0_ref, s1_ref, s2_ref, e_ref, r_ref):
        a, b, c = u_ref[...], v_ref[...], w_ref[...]
        f_ref[...] = fma(a, b, c)
        s0_ref[...], s1_ref[...], s2_ref[...] = (dot_sum(a, b, axis=k) for k in (0, 1, 2))
        e_ref[...] = exp2_approx(-jnp.abs(a), interpret=True)
        r_ref[...] = rcp_approx(1.0 + jnp.abs(b), interpret=True)

    shapes = [u.shape, (4, 16), (8, 16), (8, 4), u.shape, u.shape]  # fma, 3 sums, exp2, rcp
    out = pl.pallas_call(kernel, out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes],
                         interpret=True)(u, v, w)
    un, vn, wn = (np.asarray(t) for t in (u, v, w))
    np.testing.assert_allclose(out[0], un * vn + wn, rtol=1e-6, atol=1e-6)
    for k in range(3):
        np.testing.assert_allclose(out[1 + k], (un * vn).sum(axis=k), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[4], np.exp2(-np.abs(un)), rtol=1e-6)
    np.testing.assert_allclose(out[5], 1.0 / (1.0 + np.abs(vn)), rtol=1e-6)
    # a length-1 axis (d_state = 1) never reaches the Triton combine: plain product there
    np.testing.assert_allclose(dot_sum(u[:, :1], v[:, :1], axis=1), (un * vn)[:, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="a, b, c: expected one shape"):
        fma(u, v, w[:4])
    with pytest.raises(ValueError, match="u, v: expected one shape"):
        dot_sum(u, v[:4], axis=0)


def test_kernels_lower_to_triton_for_a_gpu(monkeypatch):
    # the Triton rules of the primitives above (fma, the fused reduction, inline PTX) and both
    # kernels build valid Triton IR: lower the forward and backward for CUDA on this CPU
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    inputs = make_inputs(jax.random.key(0), seq=50, channels=40, n=16, dtype=jnp.bfloat16)
    args = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in inputs.values()]
    args.append(jax.ShapeDtypeStruct((40,), jnp.float32))  # dt_bias (softplus in the kernels)

    def loss(x, dt, A, B, C, D, z, h0, bias):
        y, h = selective_scan_pallas(x, dt, A, B, C, D=D, z=z, initial_state=h0, dt_bias=bias,
                                     dt_softplus=True)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    grad = jax.grad(loss, argnums=tuple(range(9)))
    text = lower_for_gpu(grad, *args)
    assert text.count("__gpu$xla.gpu.triton") == 2  # the saving forward and the backward


@pytest.mark.parametrize("bias, softplus", [(True, True), (False, True), (True, False)])
def test_step_size_inside_the_kernel(key, bias, softplus):
    # dt_bias / softplus applied inside the kernels (raw dt in, no float32 dt pass) against the
    # reference given the same raw inputs through the api: outputs, final state and the
    # gradients of raw dt and dt_bias. T = 45 pads 19 steps, which must stay inert
    inputs = make_inputs(key, seq=45, channels=40, n=3)
    rng = np.random.default_rng(3)
    inputs["dt"] = jnp.asarray(rng.normal(-3.0, 2.0, (2, 45, 40)), jnp.float32)  # raw
    inputs["dt_bias"] = jnp.asarray(rng.normal(0.0, 1.0, (40,)), jnp.float32) if bias else None
    if not softplus:  # dt + dt_bias is the step itself: keep it positive
        inputs["dt"] = jnp.abs(inputs["dt"]) * 0.05
        inputs["dt_bias"] = jnp.abs(inputs["dt_bias"]) * 0.05
    names = [k for k, v in inputs.items() if v is not None]

    def run(backend):
        def f(arrays):
            kw = {k: arrays.get(k) for k in ("D", "z", "initial_state", "dt_bias")}
            return selective_scan(arrays["x"], arrays["dt"], arrays["A"], arrays["B"],
                                  arrays["C"], **kw, dt_softplus=softplus,
                                  output_final_state=True, mode="chunk", backend=backend)

        @jax.jit
        def go(arrays):
            (y, h), vjp = jax.vjp(f, arrays)
            u = jax.random.normal(key, y.shape, y.dtype)
            return y, h, vjp((u, jnp.ones_like(h)))[0]

        return go({k: inputs[k] for k in names})

    got, want = run("pallas"), run("naive")
    assert_close(got[0], want[0], 1e-4, "output")
    assert_close(got[1], want[1], 1e-4, "final state")
    for name in names:
        assert_close(got[2][name], want[2][name], 1e-4, f"d{name}")


# packed sequences: an empty one, one ending exactly on a 16-step tile (16 + 16), one
# shorter than a tile and a long one
CU = (0, 16, 16, 32, 37, 70)


@pytest.mark.parametrize("case", ["softplus-bias", "plain-chunk32", "bf16-bias-only"])
def test_packed_sequences(key, case):
    # cu_seqlens through the api with traced offsets, against the reference running each
    # sequence alone: y, every sequence's final state (an empty one keeps its initial state)
    # and the gradient of every input. The step size fused in the kernels (raw dt +
    # dt_bias, softplus or not) or given (plain); 16- and 32-step tiles
    dtype = jnp.bfloat16 if case.startswith("bf16") else jnp.float32
    channels = 40 if case == "plain-chunk32" else 20
    inputs = make_inputs(key, batch=1, seq=CU[-1], channels=channels, n=3, dtype=dtype)
    rng = np.random.default_rng(5)
    inputs["initial_state"] = jnp.asarray(rng.standard_normal((len(CU) - 1, channels, 3)),
                                          jnp.float32)
    softplus = case == "softplus-bias"
    if case != "plain-chunk32":
        raw = rng.normal(-2.0, 1.5, (1, CU[-1], channels)) if softplus else \
            np.abs(rng.normal(0.0, 0.05, (1, CU[-1], channels)))
        inputs["dt"] = jnp.asarray(raw, jnp.float32).astype(dtype)
        inputs["dt_bias"] = jnp.asarray(np.abs(rng.normal(0.0, 0.5, (channels,))), jnp.float32)
    else:
        inputs["D"] = inputs["z"] = None
    names = [k for k, v in inputs.items() if v is not None]
    grid = GridConfig(chunk_size=16, block_c=16) if case != "plain-chunk32" else None
    config = TritonConfig(chunk=32) if case == "plain-chunk32" else None

    def run(backend, cu):
        def f(arrays):
            kw = {k: arrays.get(k) for k in ("D", "z", "initial_state", "dt_bias")}
            if backend == "pallas":
                kw.pop("dt_bias")
                return selective_scan_pallas(
                    arrays["x"], arrays["dt"], arrays["A"], arrays["B"], arrays["C"], **kw,
                    dt_bias=arrays.get("dt_bias"), dt_softplus=softplus, cu_seqlens=cu,
                    config=config)
            return selective_scan(arrays["x"], arrays["dt"], arrays["A"], arrays["B"],
                                  arrays["C"], **kw, dt_softplus=softplus, cu_seqlens=cu,
                                  output_final_state=True, mode="chunk", backend=backend,
                                  grid=grid)

        (y, h), vjp = jax.vjp(f, {k: inputs[k] for k in names})
        u = jax.random.normal(key, y.shape, jnp.float32).astype(y.dtype)
        v = jax.random.normal(jax.random.fold_in(key, 1), h.shape, h.dtype)
        return y, h, vjp((u, v))[0]

    cu = jnp.asarray(CU, jnp.int32)
    got = jax.jit(lambda c: run("pallas", c))(cu)
    want = run("naive", cu)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
    assert got[1].shape == (len(CU) - 1, channels, 3)
    assert_close(got[0], want[0], tol, "y")
    assert_close(got[1], want[1], tol, "final states")
    np.testing.assert_allclose(np.asarray(got[1][1]), np.asarray(inputs["initial_state"][1]))
    for name in names:
        assert got[2][name].dtype == inputs[name].dtype, name
        assert np.isfinite(np.asarray(got[2][name], np.float32)).all(), name
        assert_close(got[2][name], want[2][name], tol, f"d{name}")


def test_packed_kernels_lower_to_triton_for_a_gpu(monkeypatch):
    # the packed forward and backward (chunk words, masked state stores, row masks) build
    # valid Triton IR for CUDA on this CPU
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    inputs = make_inputs(jax.random.key(0), batch=1, seq=70, channels=40, n=16,
                         dtype=jnp.bfloat16)
    inputs["initial_state"] = jnp.zeros((len(CU) - 1, 40, 16), jnp.float32)
    args = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in inputs.values()]
    args.append(jax.ShapeDtypeStruct((40,), jnp.float32))
    cu = jnp.asarray(CU, jnp.int32)

    def loss(x, dt, A, B, C, D, z, h0, bias):
        y, h = selective_scan_pallas(x, dt, A, B, C, D=D, z=z, initial_state=h0, dt_bias=bias,
                                     dt_softplus=True, cu_seqlens=cu)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    grad = jax.grad(loss, argnums=tuple(range(9)))
    text = lower_for_gpu(grad, *args)
    assert text.count("__gpu$xla.gpu.triton") == 2
