"""The ``pallas`` backend of every linear-attention op against the per-step reference.

On the CPU the Pallas kernels run in interpret mode (the same kernel code a GPU compiles
through Triton), so this file checks the kernels' math, their JAX glue (padding of head
dims that are not powers of two, packed-sequence layout, the delta rules' WY preparation)
and their gradients. Each op is run as ``backend="pallas", mode="chunk"`` and compared with
``backend="naive"``:

* float32 at one awkward batch shape (B=2, T=37, H=2, K=20, V=24, chunk 16: a ragged last
  chunk, head dims padded to 32), with an initial state: outputs, final state and the
  gradient of every input and of the initial state;
* packed sequences (traced ``cu_seqlens`` with empty and one-token sequences);
* bfloat16 inputs against the float32 reference on the same (upcast) values;
* log-gates near -20 per step (no NaN / inf, still exact);
* error messages and automatic dispatch (never pallas on the CPU).

Interpret mode compiles slowly: shapes are tiny and each (op, case) compiles one jitted
function (outputs and gradients together); the strong-decay case reuses the batch case's.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linearnexus.kernels.base import dispatch
from linearnexus.kernels.common.pallas import TritonConfig
from linearnexus.registry import KERNEL_REGISTRY
from tests.helpers.parity import assert_close, x64
from tests.op_specs import SPECS

# ops whose kernels are the shared Pallas chunk core (retention and ssd through simple_gla's)
PALLAS_OPS = ("simple_gla", "delta_rule", "gated_delta_rule", "retention", "ssd")


def _api(op: str):
    return importlib.import_module(f"linearnexus.kernels.{op}.api")


OPS = [*PALLAS_OPS, "gla"]

TOL = 1e-5  # float32 (conftest sets the highest matmul precision)
BF16_TOL, BF16_GRAD_TOL = 2e-2, 5e-2
BATCH = dict(B=2, T=37, H=2, K=20, V=24)  # ragged last chunk, K and V padded to 32
CHUNK = 16
CU_SEQLENS = np.array([0, 0, 1, 21, 21, 35], np.int32)  # lengths 0, 1, 20, 0, 14
PACKED = dict(B=1, T=int(CU_SEQLENS[-1]), H=2, K=20, V=24)
GATES = ("g", "dt", "A")  # stay float32 in the bfloat16 case
PALLAS = dict(backend="pallas", mode="chunk", chunk_size=CHUNK)


def _inputs(op, key, shape, *, n_states=None, decay="normal"):
    """``(names, arrays, h0, cot_o, cot_s)``: the op's inputs, an initial state and random
    cotangents for the output and the final state."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    B, T, H, K, V = (shape[d] for d in "BTHKV")
    made = SPECS[op].make(k1, B, T, H, K, V, decay)
    n = n_states or B
    h0 = jax.random.normal(k2, (n, H, K, V), jnp.float32)
    cot_o = jax.random.normal(k3, (B, T, H, V), jnp.float32)
    cot_s = jax.random.normal(k4, (n, H, K, V), jnp.float32)
    return list(made), tuple(made.values()), h0, cot_o, cot_s


def _value_and_grads(fn, arrays, h0, cot_o, cot_s):
    """``(o, s, (d arrays, d h0))`` of ``sum(o * cot_o) + sum(s * cot_s)``."""
    def loss(arrays, h0):
        o, s = fn(arrays, h0)
        return jnp.sum(o.astype(jnp.float32) * cot_o) + jnp.sum(s * cot_s), (o, s)

    (_, (o, s)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(arrays, h0)
    return o, s, grads


@functools.cache
def _pallas(op: str, packed: bool):
    """Jitted ``(arrays, h0, cot_o, cot_s, cu_seqlens) -> (o, s, grads)``; cu_seqlens traced.

    The batch case of gated_delta_rule and gla runs chunks of 32 (two 16-token sub-blocks:
    the block substitution of the delta rules' WY kernel, GLA's off-diagonal sub-chunks);
    everything else chunks of 16 (interpret mode compiles the unrolled sub-blocks slowly).
    """
    wide = not packed and op in ("gated_delta_rule", "gla")
    kwargs = dict(PALLAS, chunk_size=2 * CHUNK if wide else CHUNK)

    def run(arrays, h0, cot_o, cot_s, cu):
        def fn(a, h):
            return SPECS[op].fn(*a, initial_state=h, output_final_state=True,
                                cu_seqlens=cu if packed else None, **kwargs)
        return _value_and_grads(fn, arrays, h0, cot_o, cot_s)
    return jax.jit(run)


@functools.cache
def _naive(op: str, packed: bool):
    """The reference: it runs packed sequences one by one, so its cu_seqlens are a concrete
    constant (CU_SEQLENS), never traced."""
    cu = CU_SEQLENS if packed else None

    def run(arrays, h0, cot_o, cot_s):
        def fn(a, h):
            return SPECS[op].fn(*a, initial_state=h, output_final_state=True, cu_seqlens=cu,
                                backend="naive")
        return _value_and_grads(fn, arrays, h0, cot_o, cot_s)
    return jax.jit(run)


def _compare(op, names, got, ref, tol, grad_tol, what):
    o, s, (d_arrays, d_h0) = got
    o_ref, s_ref, (r_arrays, r_h0) = ref
    assert o.shape == o_ref.shape and s.shape == s_ref.shape
    assert s.dtype == jnp.float32
    assert_close(o, o_ref, tol, f"{op} {what} output")
    assert_close(s, s_ref, tol, f"{op} {what} final state")
    for name, g, r in zip(names, d_arrays, r_arrays, strict=True):
        assert_close(g, r, grad_tol, f"{op} {what} d{name}")
    assert_close(d_h0, r_h0, grad_tol, f"{op} {what} d initial_state")


@pytest.mark.parametrize("op", OPS)
def test_batch_matches_reference(op, key):
    """float32, padded head dims, ragged last chunk, initial state: outputs and gradients."""
    names, arrays, h0, cot_o, cot_s = _inputs(op, key, BATCH)
    got = _pallas(op, False)(arrays, h0, cot_o, cot_s, None)
    assert got[0].dtype == jnp.float32
    ref = _naive(op, False)(arrays, h0, cot_o, cot_s)
    _compare(op, names, got, ref, TOL, TOL, "float32")


@pytest.mark.parametrize("op", ["simple_gla", "gated_delta_rule", "gla"])
def test_strong_decay_matches_reference(op, key):
    """Log-gates in [-20, -19]: the state forgets almost everything each step; exp of large
    cumulative gate sums must neither overflow nor cancel (outputs and gradients)."""
    names, arrays, h0, cot_o, cot_s = _inputs(op, key, BATCH, decay="strong")
    got = _pallas(op, False)(arrays, h0, cot_o, cot_s, None)  # the batch case's compiled code
    for leaf in jax.tree.leaves(got):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), f"{op}: non-finite under strong decay"
    ref = _naive(op, False)(arrays, h0, cot_o, cot_s)
    _compare(op, names, got, ref, TOL, TOL, "strong-decay")


@pytest.mark.parametrize("op", ["simple_gla", "gated_delta_rule", "gla"])
def test_zero_gate_resets_the_state(op, key):
    """A log-gate of -inf (gate exactly 0: the state is forgotten) at a few steps, one of them
    a chunk's first: outputs and gradients as the reference's, nothing NaN (the kernels'
    in-chunk sums would form -inf - -inf; the glue floors log-gates at LOG_GATE_FLOOR)."""
    names, arrays, h0, cot_o, cot_s = _inputs(op, key, BATCH)
    gi = names.index("g")
    arrays = list(arrays)
    arrays[gi] = arrays[gi].at[:, jnp.array([5, 16, 30])].set(-jnp.inf)
    arrays = tuple(arrays)
    got = _pallas(op, False)(arrays, h0, cot_o, cot_s, None)  # the batch case's compiled code
    for leaf in jax.tree.leaves(got):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), f"{op}: non-finite with a zero gate"
    ref = _naive(op, False)(arrays, h0, cot_o, cot_s)
    _compare(op, names, got, ref, TOL, TOL, "zero-gate")


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
        shape, chunk = dict(B=1, T=150, H=2, K=100, V=24), 64
    names, arrays, h0, cot_o, cot_s = _inputs("gla", key, shape)
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
        return _value_and_grads(fn, arrays, h0, cot_o, cot_s)

    got = jax.jit(functools.partial(run, backend="pallas", mode="chunk", chunk_size=chunk))(
        arrays, h0, cot_o, cot_s)
    ref = jax.jit(functools.partial(run, backend="naive"))(arrays, h0, cot_o, cot_s)
    _compare("gla", names, got, ref, TOL, TOL, f"mixed-decay ({across})")


def test_gla_kernels_lower_to_triton_for_a_gpu(monkeypatch):
    """GLA's ten kernels (forward and backward) build valid Triton IR: lowered for CUDA on
    this CPU, which also runs the Triton rules of the compensated and affine scans."""
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    names, arrays, _, _, _ = _inputs("gla", jax.random.key(0), dict(B=1, T=100, H=2, K=64, V=64))
    args = [jax.ShapeDtypeStruct(a.shape, jnp.bfloat16 if n != "g" else a.dtype)
            for n, a in zip(names, arrays, strict=True)]

    def loss(*a):
        o, _ = SPECS["gla"].fn(*a, **PALLAS)
        return jnp.sum(o.astype(jnp.float32))

    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    text = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 10


@pytest.mark.parametrize("op", ["delta_rule", "gated_delta_rule"])
def test_delta_rules_lower_to_triton_without_a_dk_sum(op, monkeypatch):
    """The delta rules' kernels build valid Triton IR (lowered for CUDA on this CPU), and the
    two parts of ``dk`` (the core's and the WY preparation's) are summed inside the WY
    backward kernel: no XLA add of two ``dk``-shaped arrays is left in the program."""
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    names, arrays, _, _, _ = _inputs(op, jax.random.key(0), dict(B=1, T=128, H=2, K=64, V=64))
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype if n in GATES else jnp.bfloat16)
            for n, a in zip(names, arrays, strict=True)]

    def loss(*a):
        o, _ = SPECS[op].fn(*a, **PALLAS)
        return jnp.sum(o.astype(jnp.float32))

    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    text = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 7
    dk_adds = [line for line in text.splitlines()
               if "stablehlo.add" in line and "x2x64xbf16>" in line]
    assert not dk_adds, dk_adds


# retention and ssd run simple_gla's kernels and packed glue (their own code, the argument
# mapping, is covered by the batch case), and delta_rule gated_delta_rule's with the gate
# off: the packed case skips them (suite time)
PACKED_OPS = [op for op in OPS if op not in ("retention", "ssd", "delta_rule")]


@pytest.mark.parametrize("op", PACKED_OPS)
def test_packed_matches_reference(op, key):
    """Traced cu_seqlens under jit, sequences of lengths 0, 1, 20, 0, 14, each with its own
    initial state: outputs, final states and gradients (an empty sequence's final state is
    its initial state)."""
    n = len(CU_SEQLENS) - 1
    names, arrays, h0, cot_o, cot_s = _inputs(op, key, PACKED, n_states=n)
    got = _pallas(op, True)(arrays, h0, cot_o, cot_s, jnp.asarray(CU_SEQLENS))
    ref = _naive(op, True)(arrays, h0, cot_o, cot_s)
    assert got[1].shape == (n, PACKED["H"], PACKED["K"], PACKED["V"])
    _compare(op, names, got, ref, TOL, TOL, "packed")
    for empty in (0, 3):
        np.testing.assert_array_equal(np.asarray(got[1][empty]), np.asarray(h0[empty]),
                                      err_msg=f"{op}: empty sequence {empty} changed its state")


# retention and ssd left out: in bfloat16 they add no kernel path of their own (retention is
# simple_gla's bfloat16 call with a fixed gate; ssd's v = x * dt is promoted to float32, so its
# kernels run in float32) and each costs a compile (~2 s of this file's budget)
# delta_rule shares every kernel with gated_delta_rule (the gate off): one of them suffices
BF16_OPS = [op for op in OPS if op not in ("retention", "ssd", "delta_rule")]


@pytest.mark.parametrize("op", BF16_OPS)
def test_bfloat16_matches_float32_reference(op, key):
    """bfloat16 inputs (gates float32) against the float32 reference on the same values.

    Tolerances are bfloat16's (8 mantissa bits, about 4e-3 per rounding) on tiny shapes:
    2e-2 for outputs and state, 5e-2 for gradients (rounded twice: cotangent path and
    inputs)."""
    names, arrays, h0, cot_o, cot_s = _inputs(op, key, BATCH)
    low = tuple(a if name in GATES else a.astype(jnp.bfloat16)
                for name, a in zip(names, arrays, strict=True))
    got = _pallas(op, False)(low, h0, cot_o, cot_s, None)
    assert got[0].dtype == jnp.bfloat16  # v's dtype
    for name, a, g in zip(names, low, got[2][0], strict=True):
        assert g.dtype == a.dtype, f"{op}: d{name} is {g.dtype}, input {a.dtype}"
    ref = _naive(op, False)(tuple(a.astype(jnp.float32) for a in low), h0, cot_o, cot_s)
    _compare(op, names, got, ref, BF16_TOL, BF16_GRAD_TOL, "bfloat16")


@pytest.mark.parametrize("op", ["delta_rule"])
def test_float16_matches_float32_reference(op, key):
    """float16 inputs: the WY preparation's backward takes its matmul operands (and keeps
    ``M^{-1}``) in the inputs' 16-bit dtype, float16 here, not bfloat16. float16 keeps 11
    bits, so bfloat16's tolerances hold with room to spare."""
    names, arrays, h0, cot_o, cot_s = _inputs(op, key, BATCH)
    low = tuple(a if name in GATES else a.astype(jnp.float16)
                for name, a in zip(names, arrays, strict=True))
    got = _pallas(op, False)(low, h0, cot_o, cot_s, None)
    assert got[0].dtype == jnp.float16
    ref = _naive(op, False)(tuple(a.astype(jnp.float32) for a in low), h0, cot_o, cot_s)
    _compare(op, names, got, ref, BF16_TOL / 4, BF16_GRAD_TOL / 4, "float16")


def test_triton_config_rejects_bad_knobs():
    with pytest.raises(ValueError, match="block_v"):
        TritonConfig(block_v=24)
    with pytest.raises(ValueError, match="num_warps"):
        TritonConfig(num_warps=3)
    with pytest.raises(ValueError, match="par_block_k"):
        TritonConfig(par_block_k=24)


def test_par_block_k_override_matches_reference(key):
    """``TritonConfig.par_block_k`` (the parallel core kernels' K block) set through the
    backend's config: two K blocks of 16 (K = 20 pads to 32) still match the reference; a
    block that does not divide K, and the knob on GLA (which has no such kernels), are
    ValueErrors naming it."""
    op = "gated_delta_rule"
    names, arrays, h0, cot_o, cot_s = _inputs(op, key, BATCH)
    kernel = _api(op).BACKENDS["pallas"]

    def fn(a, h):
        return SPECS[op].fn(*a, initial_state=h, output_final_state=True, **PALLAS)

    old = kernel.config
    try:
        kernel.config = TritonConfig(par_block_k=16)
        got = jax.jit(lambda *x: _value_and_grads(fn, *x))(arrays, h0, cot_o, cot_s)
        kernel.config = TritonConfig(par_block_k=64)
        with pytest.raises(ValueError, match="par_block_k=64"):
            fn(arrays, h0)
    finally:
        kernel.config = old
    _compare(op, names, got, _naive(op, False)(arrays, h0, cot_o, cot_s), TOL, TOL, "par_block_k=16")
    gla_kernel = _api("gla").BACKENDS["pallas"]
    _, gla_arrays, gla_h0, _, _ = _inputs("gla", key, BATCH)
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
    _, arrays, _, _, _ = _inputs(op, key, BATCH)
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
