"""What the Pallas backends of the linear-attention ops need beyond the shared op suite.

The suite (``tests/test_linear_ops.py``, the "pallas" line of ``tests/op_specs.py``) checks
every op's kernels in interpret mode against the per-step reference: outputs, final state
and every gradient at an awkward batch shape, packed sequences, strong decay, zero gates and
bfloat16 inputs. Here: what only the kernels have (GLA's choice between its factored and
walked forms, lowering for CUDA on the CPU, float16 in the WY preparation, launch knobs,
errors and automatic dispatch).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linearnexus.kernels.base import dispatch
from linearnexus.kernels.common.gpu_lowering import lower_for_gpu
from linearnexus.kernels.common.pallas import TritonConfig
from linearnexus.kernels.common.pallas_ops import _chunk_of
from linearnexus.registry import KERNEL_REGISTRY
from tests.helpers.parity import x64
from tests.helpers.wy import fused_wy_case
from tests.op_specs import IMPLEMENTATIONS, SPECS
from tests.test_linear_ops import (
    BATCH,
    BF16_GRAD_TOL,
    BF16_TOL,
    GATES,
    SMALL_TOL,
    compare_all,
    small_inputs,
    small_reference,
    small_run,
    value_and_grads,
)

OPS = sorted(SPECS)
CHUNK = IMPLEMENTATIONS["pallas"].kwargs["chunk_size"]
PALLAS = IMPLEMENTATIONS["pallas"].kwargs
TOL = SMALL_TOL


def _api(op: str):
    return importlib.import_module(f"linearnexus.kernels.{op}.api")


@pytest.mark.parametrize("across", ["time", "key_dims"])
def test_gla_mixed_decay_takes_each_form(key, across):
    """GLA's kernels choose per chunk / sub-chunk (and, in the backward, per K block) between
    the factored product and the exact walk; log-gates near -20 on some spans, mild elsewhere,
    so the whole-chunk product, the sub-chunk product and the walk all run in one call, the
    backward's walk completing partials beside finished sub-chunks.

    * ``time``: chunk 32 (two sub-chunks); strong on chunks 0, 3 and the first sub-chunk of
      chunks 1, 4.
    * ``key_dims``: chunk 64 (four sub-chunks), K = 100 (two K blocks of 64); strong only in
      key dims >= 64, on chunk 1 and the first sub-chunk of chunk 0: the two K blocks of a
      chunk decide differently.
    """
    if across == "time":
        shape, chunk = dict(B=1, T=150, H=2, K=20, V=24), 2 * CHUNK
    else:
        shape, chunk = dict(B=1, T=100, H=2, K=100, V=24), 64  # a ragged second chunk
    names, arrays, h0, cot_o, cot_s = small_inputs("gla", key, shape)
    t = np.arange(shape["T"])[None, :, None, None]
    c, row = t // chunk, t % chunk
    if across == "time":
        strong = (c % 3 == 0) | ((c % 3 == 1) & (row < 16))
    else:
        strong = (np.arange(shape["K"]) >= 64) & ((c == 1) | ((c == 0) & (row < 16)))
    g = jnp.where(strong, -19.0 - jax.random.uniform(key, arrays[3].shape), arrays[3])
    arrays = (*arrays[:3], g)

    def run(arrays, h0, cot_o, cot_s, backend, **kw):
        def fn(a, h):
            return SPECS["gla"].fn(*a, initial_state=h, output_final_state=True, backend=backend, **kw)
        return value_and_grads(fn, arrays, h0, cot_o, cot_s)

    got = jax.jit(functools.partial(run, backend="pallas", mode="chunk", chunk_size=chunk))(
        arrays, h0, cot_o, cot_s)
    ref = jax.jit(functools.partial(run, backend="naive"))(arrays, h0, cot_o, cot_s)
    compare_all("gla", names, got, ref, TOL, TOL, f"mixed-decay ({across})")


def test_gla_kernels_lower_to_triton_for_a_gpu(monkeypatch):
    """GLA's ten kernels (forward and backward) build valid Triton IR: lowered for CUDA on
    this CPU, which also runs the Triton rules of the compensated and affine scans."""
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    names, arrays, _, _, _ = small_inputs("gla", jax.random.key(0), dict(B=1, T=100, H=2, K=64, V=64))
    args = [jax.ShapeDtypeStruct(a.shape, jnp.bfloat16 if n != "g" else a.dtype)
            for n, a in zip(names, arrays, strict=True)]

    def loss(*a):
        o, _ = SPECS["gla"].fn(*a, **PALLAS)
        return jnp.sum(o.astype(jnp.float32))

    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    text = lower_for_gpu(grad, *args)
    assert text.count("__gpu$xla.gpu.triton") == 10


@pytest.mark.parametrize("op", ["delta_rule", "gated_delta_rule"])
def test_delta_rules_lower_to_triton_without_a_dk_sum(op, monkeypatch):
    """The delta rules' kernels build valid Triton IR (lowered for CUDA on this CPU), and the
    two parts of ``dk`` (the core's and the WY preparation's) are summed inside the WY
    backward kernel: no XLA add of two ``dk``-shaped arrays is left in the program."""
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    names, arrays, _, _, _ = small_inputs(op, jax.random.key(0), dict(B=1, T=128, H=2, K=64, V=64))
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype if n in GATES else jnp.bfloat16)
            for n, a in zip(names, arrays, strict=True)]

    def loss(*a):
        o, _ = SPECS[op].fn(*a, **PALLAS)
        return jnp.sum(o.astype(jnp.float32))

    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    text = lower_for_gpu(grad, *args)
    assert text.count("__gpu$xla.gpu.triton") == 7
    dk_adds = [line for line in text.splitlines()
               if "stablehlo.add" in line and "x2x64xbf16>" in line]
    assert not dk_adds, dk_adds


@pytest.mark.parametrize("op", ["delta_rule"])
def test_float16_matches_float32_reference(op, key):
    """float16 inputs: the WY preparation's backward takes its matmul operands (and keeps
    ``M^{-1}``) in the inputs' 16-bit dtype, float16 here, not bfloat16. float16 keeps 11
    bits, so bfloat16's tolerances hold with room to spare."""
    names, arrays, h0, cot_o, cot_s = small_inputs(op, key, BATCH)
    low = tuple(a if name in GATES else a.astype(jnp.float16)
                for name, a in zip(names, arrays, strict=True))
    got = small_run(op, "pallas", False)(low, h0, cot_o, cot_s, None)
    assert got[0].dtype == jnp.float16
    ref = small_reference(op, False)(tuple(a.astype(jnp.float32) for a in low), h0, cot_o, cot_s)
    compare_all(op, names, got, ref, BF16_TOL / 4, BF16_GRAD_TOL / 4, "float16")


def test_triton_config_rejects_bad_knobs():
    with pytest.raises(ValueError, match="block_v"):
        TritonConfig(block_v=24)
    with pytest.raises(ValueError, match="num_warps"):
        TritonConfig(num_warps=3)
    with pytest.raises(ValueError, match="par_block_k"):
        TritonConfig(par_block_k=24)


def test_lower_for_gpu_rejects_a_device_kind_it_cannot_target():
    # the abstract device is only for NVIDIA kinds; a typo must not lower for the wrong chip
    with pytest.raises(ValueError, match="device_kind: expected a jax NVIDIA device kind"):
        lower_for_gpu(jnp.sin, jax.ShapeDtypeStruct((4,), jnp.float32), device_kind="H200")


def test_par_block_k_override_matches_reference(key):
    """``TritonConfig.par_block_k`` (the parallel core kernels' K block) set through the
    backend's config: two K blocks of 16 (K = 20 pads to 32) still match the reference; a
    block that does not divide K, and the knob on GLA (which has no such kernels), are
    ValueErrors naming it."""
    op = "gated_delta_rule"
    names, arrays, h0, cot_o, cot_s = small_inputs(op, key, BATCH)
    kernel = _api(op).BACKENDS["pallas"]

    def fn(a, h):
        return SPECS[op].fn(*a, initial_state=h, output_final_state=True, **PALLAS)

    old = kernel.config
    try:
        kernel.config = TritonConfig(par_block_k=16)
        got = jax.jit(lambda *x: value_and_grads(fn, *x))(arrays, h0, cot_o, cot_s)
        kernel.config = TritonConfig(par_block_k=64)
        with pytest.raises(ValueError, match="par_block_k=64"):
            fn(arrays, h0)
    finally:
        kernel.config = old
    ref = small_reference(op, False)(arrays, h0, cot_o, cot_s)
    compare_all(op, names, got, ref, TOL, TOL, "par_block_k=16")
    gla_kernel = _api("gla").BACKENDS["pallas"]
    _, gla_arrays, gla_h0, _, _ = small_inputs("gla", key, BATCH)
    old = gla_kernel.config
    try:
        gla_kernel.config = TritonConfig(par_block_k=16)
        with pytest.raises(ValueError, match="par_block_k"):
            SPECS["gla"].fn(*gla_arrays, initial_state=gla_h0, **PALLAS)
    finally:
        gla_kernel.config = old


@pytest.mark.parametrize("op", OPS)
def test_pallas_errors(op, key):
    """A chunk size that is not a power of two >= 16 is a ValueError naming chunk_size;
    float64 (no Triton kernel) a NotImplementedError naming the pallas backend."""
    _, arrays, _, _, _ = small_inputs(op, key, BATCH)
    fn = SPECS[op].fn
    with pytest.raises(ValueError, match="chunk_size"):
        fn(*arrays, backend="pallas", mode="chunk", chunk_size=24)
    with x64():
        wide = tuple(a.astype(jnp.float64) for a in arrays)
        with pytest.raises(NotImplementedError, match="pallas"):
            fn(*wide, backend="pallas", mode="chunk", chunk_size=16)


@pytest.mark.parametrize("op", OPS)
def test_dispatch_never_picks_pallas_on_cpu(op):
    """Automatic choice takes the pallas backend on a GPU only (float32 / bfloat16 /
    float16), so on the CPU backend=None runs the pure-JAX backend."""
    api = _api(op)
    # retention and ssd run through simple_gla's backends and preference order
    order = getattr(api, "BACKEND_ORDER", _api("simple_gla").BACKEND_ORDER)
    kernel = api.BACKENDS["pallas"]
    assert KERNEL_REGISTRY[f"{op}:pallas"] is kernel
    assert not kernel.supports(platform="cpu", dtype=jnp.float32)
    assert not kernel.supports(platform="gpu", dtype=jnp.float64)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        assert kernel.supports(platform="gpu", dtype=dtype)

    def chosen(platform, dtype=jnp.float32):
        return dispatch(op, api.BACKENDS, order, lambda k: k.name, backend=None, dtype=dtype,
                        platform=platform)

    assert chosen("cpu") == "jax"
    assert chosen("cpu", jnp.bfloat16) == "jax"
    assert chosen("gpu") == "pallas"
    assert chosen("gpu", jnp.float64) == "jax"
    assert jax.default_backend() != "cpu" or chosen(None) == "jax"

    def untileable_chunk(kernel):  # what the pallas backend does with chunk_size=8
        if kernel.name == "pallas":
            _chunk_of(None, 8)
        return kernel.name

    # a chunk size the Triton kernels cannot tile: automatic dispatch moves on to jax (the
    # named backend raises a ValueError naming chunk_size, test above)
    assert dispatch(op, api.BACKENDS, order, untileable_chunk, backend=None,
                    dtype=jnp.float32, platform="gpu") == "jax"


@pytest.mark.parametrize("low_wu,split_x,halves", [(True, False, False), (True, True, False),
                                                   (False, False, False), (True, False, True)])
@pytest.mark.parametrize("gated", [True, False])
def test_wy_preparation_forms_match_a_float64_solve(low_wu, split_x, halves, gated):
    """The WY preparation's ``w = M^{-1} (beta e^b k)`` and ``u = M^{-1} (beta v)`` from bf16
    inputs (interpreted), with the 16-bit ``M^{-1}`` and operands (``low_wu``, the default),
    with the operands as a 16-bit hi + lo pair (``split_x``) and with the float32 ones,
    against per-chunk float64 triangular solves: within bf16 rounding of the largest entry
    (``low_wu`` alone rounds the operands once more: 1e-2, else 6e-3). Three chunks, K = 64,
    V = 32, two heads, strong and weak gates; ``halves``: ``M^{-1}`` by halves."""
    from linearnexus.kernels.common.pallas_wy import WyStatic, wy_prepare

    R, NC, L, H, K, V = 1, 3, 64, 2, 64, 32
    ks = jax.random.split(jax.random.key(11 + gated), 4)
    k = jax.random.normal(ks[0], (R, NC * L, H, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[1], (R, NC * L, H, V)).astype(jnp.bfloat16)
    beta = jax.nn.sigmoid(jax.random.normal(ks[2], (R, NC * L, H))).astype(jnp.bfloat16)
    g = jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], (R, NC * L, H))) if gated else None
    st = WyStatic(gated=gated, rows=R, n_chunks=NC, chunk=L, heads=H, key_dim=K, value_dim=V,
                  exact=False, num_warps=4, interpret=True, low_wu=low_wu, split_x=split_x,
                  inverse_halves=halves)
    w, u, k_out = jax.jit(lambda *a: wy_prepare(st, *a))(k, v, beta, g)
    assert np.array_equal(np.asarray(k_out, np.float32), np.asarray(k, np.float32))

    def chunks(x):  # [R, NC * L, H, *] -> [R, H, NC, L, *] in float64
        x = np.asarray(x, np.float64).reshape(R, NC, L, H, *x.shape[3:])
        return np.moveaxis(x, 3, 1)

    kc, vc, bc = chunks(k), chunks(v), chunks(beta)
    b = np.cumsum(chunks(g), axis=-1) if gated else np.zeros_like(bc)
    low = np.tril(np.ones((L, L), bool), -1)
    decay = np.where(low, np.exp(np.where(low, b[..., :, None] - b[..., None, :], 0.0)), 0.0)
    m = np.eye(L) + bc[..., :, None] * np.einsum("rhcik,rhcjk->rhcij", kc, kc) * decay
    w_ref = np.linalg.solve(m, (bc * np.exp(b))[..., None] * kc)  # [R, H, NC, L, K]
    u_ref = np.linalg.solve(m, bc[..., None] * vc)  # [R, H, NC, L, V]
    tol = 1e-2 if low_wu and not split_x else 6e-3
    for got, ref in ((w, w_ref), (u, u_ref)):
        err = np.max(np.abs(chunks(got) - ref)) / np.max(np.abs(ref))
        assert err <= tol, err


@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_wy_inverse_matches_a_float64_inverse(gated, halves):
    """``wy_inverse`` (``M^{-1}`` alone, bf16, interpreted), by block substitution and by
    halves (``WyStatic.inverse_halves``), against the float64 inverse of ``M = I + A`` per
    chunk: within bf16 rounding of the largest entry, zero above the diagonal, the two forms
    within float32 rounding of each other before their bf16 store. Three chunks, K = 48 (not
    a power of two), two heads, strong and weak gates; chunks of 32 too (two blocks)."""
    import dataclasses

    from linearnexus.kernels.common.pallas_wy import WyStatic, wy_inverse

    R, NC, L, H, K = 1, 3, 64, 2, 48
    ks = jax.random.split(jax.random.key(21 + gated), 3)
    k = jax.random.normal(ks[0], (R, NC * L, H, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    beta = jax.nn.sigmoid(jax.random.normal(ks[1], (R, NC * L, H))).astype(jnp.bfloat16)
    g = jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[2], (R, NC * L, H))) if gated else None
    st = WyStatic(gated=gated, rows=R, n_chunks=NC, chunk=L, heads=H, key_dim=K, value_dim=K,
                  exact=False, num_warps=4, interpret=True, inverse_halves=halves)
    minv = jax.jit(lambda *a: wy_inverse(st, *a))(k, beta, g)
    assert minv.shape == (R, NC * L, H, L) and minv.dtype == jnp.bfloat16
    other = jax.jit(lambda *a: wy_inverse(dataclasses.replace(st, inverse_halves=not halves),
                                          *a))(k, beta, g)
    # the two forms sum the same products in another order; bf16 stores: one ulp at most
    np.testing.assert_allclose(np.asarray(minv, np.float32), np.asarray(other, np.float32),
                               rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(minv))))
    if halves:  # chunks of 32: two blocks, one level
        st32 = dataclasses.replace(st, n_chunks=NC * 2, chunk=32)
        got32 = np.asarray(jax.jit(lambda *a: wy_inverse(st32, *a))(k, beta, g), np.float64)
        sub = dataclasses.replace(st32, inverse_halves=False)
        want32 = np.asarray(jax.jit(lambda *a: wy_inverse(sub, *a))(k, beta, g), np.float64)
        assert np.max(np.abs(got32 - want32)) <= 1e-2 * np.max(np.abs(want32))

    def chunks(x):  # [R, NC * L, H, *] -> [R, H, NC, L, *] in float64
        x = np.asarray(x, np.float64).reshape(R, NC, L, H, *x.shape[3:])
        return np.moveaxis(x, 3, 1)

    kc, bc = chunks(k), chunks(beta)
    b = np.cumsum(chunks(g), axis=-1) if gated else np.zeros_like(bc)
    low = np.tril(np.ones((L, L), bool), -1)
    decay = np.where(low, np.exp(np.where(low, b[..., :, None] - b[..., None, :], 0.0)), 0.0)
    # [R, H, NC, L, K] x [R, H, NC, L, K] -> [R, H, NC, L, L]: k_i . k_j per chunk
    m = np.eye(L) + bc[..., :, None] * np.einsum("rhcik,rhcjk->rhcij", kc, kc) * decay
    ref = np.linalg.inv(m)  # [R, H, NC, L, L]
    got = chunks(minv)
    assert np.all(got[..., ~np.tril(np.ones((L, L), bool))] == 0)
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err <= 6e-3, err


@pytest.mark.parametrize("from_states", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
def test_wy_fused_backward_matches_autodiff(dtype, gated, from_states):
    """``pallas_wy.wy_fused_backward`` (interpreted): the gradient of ``vn = M^{-1} beta (v -
    e^b (k S_c))`` in k, v, beta and g from ``dy = M^{-T} dvn``, ``dks = -dy S_c^T`` (or,
    ``from_states``, the states ``S_c``, the kernel forming ``dks``) and vn (what the fused
    Mosaic backward hands it), against autodiff of the plain-JAX form with the entering
    states held fixed, plus a core ``dk`` passed through. Two chunks, two heads, K = 128
    (two 64-wide blocks) and V = 32 gated, K = 32 and V = 128 ungated (the ops pad head dims
    to powers of two); float32 exact, bf16 within its rounding. Both or neither of ``dks``
    and ``states`` is refused, naming them."""
    from linearnexus.kernels.common.pallas_wy import WyStatic, wy_fused_backward

    R, NC, L, H = 1, 2, 64, 2
    K, V = (128, 32) if gated else (32, 128)
    case = fused_wy_case(21 + gated, R, NC, H, K, V, gated, dtype, L)
    st = WyStatic(gated=gated, rows=R, n_chunks=NC, chunk=L, heads=H, key_dim=K, value_dim=V,
                  exact=dtype == jnp.float32, num_warps=4, interpret=True)
    args = tuple(case[n] if n in ("beta", "g") else case[n].astype(dtype)
                 for n in ("k", "v", "beta", "g", "vn", "dy"))
    dks, dk_core, states = (case[n].astype(dtype) for n in ("dks", "dk_core", "states"))
    if from_states:
        got = jax.jit(lambda *a: wy_fused_backward(st, *a, None, dk_core, states=states))(*args)
        with pytest.raises(ValueError, match="dks, states"):
            wy_fused_backward(st, *args, dks, dk_core, states=states)
        with pytest.raises(ValueError, match="dks, states"):
            wy_fused_backward(st, *args, None, dk_core)
    else:
        got = jax.jit(lambda *a: wy_fused_backward(st, *a))(*args, dks, dk_core)
    tol = 2e-6 if dtype == jnp.float32 else 8e-3  # (measured: 4.8e-7; 4.2e-3, dv)
    want = case["want"]
    for name, a, b in (("dk", got[0], want[0]), ("dv", got[1], want[1]),
                       ("dbeta", got[2], want[2])) + ((("dg", got[3], want[3]),) if gated else ()):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = np.max(np.abs(a - b)) / np.max(np.abs(b))
        assert err <= tol, (name, err)
    if not gated:
        assert got[3] is None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gla_fwd_a_decayed_operands(dtype):
    """GLA's ``fwd_a`` (interpreted) with the Mosaic walk's decayed operands: ``q e^{b}`` and
    ``k e^{b_L - b}`` equal the plain formula (``b`` the in-chunk sums) within the operands'
    rounding, both on the one-matmul path (formed from the factored product's operands) and
    on the sub-chunk path of a chunk whose decay is past ``DIAG_DENSE_MAX`` (head 1 decays by
    e^-3 a step), and ``A`` is the one ``fwd_a`` writes without them. Two chunks, K = 128
    (two key blocks), two heads."""
    from linearnexus.kernels.gla import mosaic as gla_mosaic
    from linearnexus.kernels.gla import pallas as gla_pallas

    R, NC, L, H, K = 1, 2, 64, 2, 128
    core = gla_mosaic.batch_core(R, NC, H, K, 64, interpret=True)
    ks = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(ks[0], (R, NC * L, H, K)).astype(dtype)
    k = jax.random.normal(ks[1], (R, NC * L, H, K)).astype(dtype)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[2], (R, NC * L, H, K))) / 16
    g = g.at[:, :, 1].set(-3.0)  # head 1: 189 nats over a chunk, the sub-chunk path
    b, bc = gla_pallas._in_chunk_sums(g, core)
    a, qe, ke = jax.jit(lambda *x: gla_pallas.run_fwd_a(core, *x, decayed=True))(q, k, b, bc)
    a_plain = jax.jit(lambda *x: gla_pallas.run_fwd_a(core, *x)[0])(q, k, b, bc)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a_plain))
    bs = b.astype(jnp.float32) + bc.astype(jnp.float32)
    b_last = bs.reshape(R, NC, L, H, K)[:, :, -1:]  # [R, TP, H, K] -> [R, NC, 1, H, K]
    want_q = q.astype(jnp.float32) * jnp.exp(bs)
    want_k = k.astype(jnp.float32) * jnp.exp(b_last - bs.reshape(R, NC, L, H, K)).reshape(
        R, NC * L, H, K)  # [R, NC, L, H, K] -> [R, TP, H, K]
    tol = 1e-5 if dtype == jnp.float32 else 2 ** -8
    for got, want in ((qe, want_q), (ke, want_k)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=tol,
                                   atol=1e-30)
