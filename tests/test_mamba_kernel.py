"""The selective-scan op: every implementation against the per-step reference.

``IMPLEMENTATIONS`` lists each way the op can run in pure JAX; a new one adds one line
there and inherits every check below. A backend whose kernels run in Pallas interpret mode
on the CPU (seconds per compile) adds one line to ``SMALL_IMPLEMENTATIONS`` instead and
gets the small-shape checks at the end of this file.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linearnexus.kernels.mamba import selective_scan
from linearnexus.kernels.mamba.api import jax_backend
from linearnexus.kernels.mamba.reference import selective_scan_reference
from linearnexus.registry import KERNEL_REGISTRY, kernels_for
from tests.helpers.parity import assert_close, x64


def _chunk(form):
    def run(x, dt, A, B, C, D, z, h0, chunk_size):
        y, h = selective_scan(x, dt, A, B, C, D=D, z=z, initial_state=h0, output_final_state=True,
                              mode="chunk", chunk_size=chunk_size, backend="jax")
        return y, h
    if form is None:
        return run

    kernel = jax_backend(chunk_form=form)
    from linearnexus.kernels.base import GridConfig

    def run_form(x, dt, A, B, C, D, z, h0, chunk_size):
        return kernel.forward_chunk(x, dt, A, B, C, D=D, z=z, initial_state=h0,
                                    grid=GridConfig(chunk_size=chunk_size))
    return run_form


def _recurrent(x, dt, A, B, C, D, z, h0, chunk_size):
    return selective_scan(x, dt, A, B, C, D=D, z=z, initial_state=h0, output_final_state=True,
                          mode="recurrent", backend="jax")


IMPLEMENTATIONS = {
    "chunk-auto": _chunk(None),
    "chunk-scan": _chunk("scan"),
    "chunk-assoc": _chunk("assoc"),
    "recurrent": _recurrent,
}
# compiled once per shape and shared by every test (compiles dominate this file's time)
JITTED = {name: jax.jit(fn, static_argnums=8) for name, fn in IMPLEMENTATIONS.items()}
REFERENCE = jax.jit(lambda x, dt, A, B, C, D, z, h0: selective_scan_reference(
    x, dt, A, B, C, D=D, z=z, initial_state=h0))


def make_inputs(key, batch=2, seq=65, channels=12, n=5, dtype=jnp.float32, strong_decay=False):
    ks = jax.random.split(key, 8)
    x = jax.random.normal(ks[0], (batch, seq, channels), dtype)
    scale = 4.0 if strong_decay else 0.0
    dt = jax.nn.softplus(jax.random.normal(ks[1], (batch, seq, channels)) + scale - 1.0).astype(dtype)
    A = -jnp.exp(jax.random.normal(ks[2], (channels, n))).astype(dtype)
    if strong_decay:
        A = A * 5.0
    B = jax.random.normal(ks[3], (batch, seq, n), dtype)
    C = jax.random.normal(ks[4], (batch, seq, n), dtype)
    D = jax.random.normal(ks[5], (channels,), dtype)
    z = jax.random.normal(ks[6], (batch, seq, channels), dtype)
    h0 = jax.random.normal(ks[7], (batch, channels, n), jnp.float32)
    return x, dt, A, B, C, D, z, h0


_STEP = jax.jit(lambda *a: selective_scan(*a[:5], D=a[5], z=a[6], initial_state=a[7],
                                          output_final_state=True, mode="recurrent"))


def token_by_token(x, dt, A, B, C, D, z, h0):
    """Recurrent mode called once per token, the state threaded through every call."""
    h = h0 if h0 is not None else jnp.zeros((x.shape[0], x.shape[2], A.shape[1]), jnp.float32)
    ys = []
    for t in range(x.shape[1]):
        s = slice(t, t + 1)
        y, h = _STEP(x[:, s], dt[:, s], A, B[:, s], C[:, s], D, z[:, s], h)
        ys.append(y)
    return jnp.concatenate(ys, axis=1), h


def test_registry_lists_backends():
    assert set(kernels_for("mamba")) == {"jax", "naive", "pallas", "pallas_step"}
    assert KERNEL_REGISTRY["mamba:jax"].supports(platform="cpu", dtype=jnp.float32)


# (T, initial state): every length once, half of them from a state (T = 1 with a state is a
# decode step); chunk sizes 8 and 64 below make 64 both a multiple and a single chunk
SEQ_CASES = [(1, True), (7, False), (63, True), (64, False), (65, True), (257, False)]


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("seq,with_state", SEQ_CASES)
def test_forward_matches_reference(impl, seq, with_state, key):
    x, dt, A, B, C, D, z, h0 = make_inputs(key, seq=seq)
    h0 = h0 if with_state else None
    y_ref, h_ref = REFERENCE(x, dt, A, B, C, D, z, h0)
    for chunk_size in ((16,) if impl == "recurrent" else (8, 64)):
        y, h = JITTED[impl](x, dt, A, B, C, D, z, h0, chunk_size)
        assert_close(y, y_ref, 1e-5, f"{impl} L={chunk_size} output")
        assert_close(h, h_ref, 1e-5, f"{impl} L={chunk_size} final state")


@pytest.mark.parametrize("seq,with_state", [(seq, not state) for seq, state in SEQ_CASES])
def test_chunk_equals_token_by_token(seq, with_state, key):
    x, dt, A, B, C, D, z, h0 = make_inputs(key, seq=seq)
    h0 = h0 if with_state else None
    y_tok, h_tok = token_by_token(x, dt, A, B, C, D, z, h0)
    for chunk_size in (5, 16):
        for form in ("chunk-scan", "chunk-assoc"):
            y, h = JITTED[form](x, dt, A, B, C, D, z, h0, chunk_size)
            assert_close(y, y_tok, 1e-5, f"{form} L={chunk_size} vs token-by-token output")
            assert_close(h, h_tok, 1e-5, f"{form} L={chunk_size} vs token-by-token state")


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("split", [1, 16, 40])
def test_prefix_then_continuation(impl, split, key):
    x, dt, A, B, C, D, z, h0 = make_inputs(key, seq=65)
    run = functools.partial(JITTED[impl], chunk_size=16)
    y_all, h_all = run(x, dt, A, B, C, D, z, h0)
    a, b = slice(0, split), slice(split, None)
    y1, h1 = run(x[:, a], dt[:, a], A, B[:, a], C[:, a], D, z[:, a], h0)
    y2, h2 = run(x[:, b], dt[:, b], A, B[:, b], C[:, b], D, z[:, b], h1)
    assert_close(jnp.concatenate([y1, y2], 1), y_all, 1e-5, "output")
    assert_close(h2, h_all, 1e-5, "state")


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_gradients_match_reference(impl, key):
    args = make_inputs(key, seq=37)
    cot_y = jax.random.normal(jax.random.fold_in(key, 1), args[0].shape)
    cot_h = jax.random.normal(jax.random.fold_in(key, 2), args[7].shape)
    names = ("x", "dt", "A", "B", "C", "D", "z", "initial_state")

    def loss(fn, *a):
        y, h = fn(*a)
        return jnp.sum(y * cot_y) + jnp.sum(h * cot_h)

    ref = jax.grad(lambda *a: loss(lambda *b: selective_scan_reference(
        *b[:5], D=b[5], z=b[6], initial_state=b[7]), *a), argnums=tuple(range(8)))(*args)
    got = jax.grad(lambda *a: loss(lambda *b: IMPLEMENTATIONS[impl](*b, 8), *a),
                   argnums=tuple(range(8)))(*args)
    for name, g, r in zip(names, got, ref, strict=True):
        assert_close(g, r, 1e-4, f"{impl} d{name}")


def test_chunked_float64_is_exact_to_roundoff(key):
    with x64():
        args = make_inputs(key, seq=100, dtype=jnp.float64)
        args = args[:7] + (args[7].astype(jnp.float64),)
        y_ref, h_ref = selective_scan_reference(*args[:5], D=args[5], z=args[6], initial_state=args[7])
        for form in ("chunk-scan", "chunk-assoc"):
            y, h = IMPLEMENTATIONS[form](*args, 16)
            assert y.dtype == jnp.float64 and h.dtype == jnp.float64
            assert_close(y, y_ref, 1e-12, f"{form} float64 output")
            assert_close(h, h_ref, 1e-12, f"{form} float64 state")


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_strong_decay_long_sequence_is_finite(impl, key):
    args = make_inputs(key, batch=1, seq=4096, channels=8, n=4, strong_decay=True)
    y_ref, h_ref = REFERENCE(*args)
    y, h = JITTED[impl](*args, 64)
    assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(h)).all()
    assert_close(y, y_ref, 1e-5, "strong-decay output")


def test_bfloat16_inputs_keep_float32_state(key):
    args = make_inputs(key, seq=33)
    y32, h32 = selective_scan_reference(*args[:5], D=args[5], z=args[6], initial_state=args[7])
    bf = [a.astype(jnp.bfloat16) for a in args[:7]]
    y, h = selective_scan(*bf[:5], D=bf[5], z=bf[6], initial_state=args[7],
                          output_final_state=True, mode="chunk")
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    assert_close(y, y32, 3e-2, "bf16 output")


def test_dt_bias_and_softplus(key):
    x, dt, A, B, C, D, z, h0 = make_inputs(key, seq=20)
    raw = jax.random.normal(jax.random.fold_in(key, 3), dt.shape)
    bias = jax.random.normal(jax.random.fold_in(key, 4), (dt.shape[-1],))
    y, h = selective_scan(x, raw, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True,
                          initial_state=h0, output_final_state=True)
    y_ref, h_ref = selective_scan_reference(x, jax.nn.softplus(raw + bias), A, B, C, D=D, z=z,
                                            initial_state=h0)
    assert_close(y, y_ref, 1e-5, "output")
    assert_close(h, h_ref, 1e-5, "state")


def test_final_state_only_when_asked(key):
    x, dt, A, B, C, D, z, h0 = make_inputs(key, seq=5)
    _, h = selective_scan(x, dt, A, B, C)
    assert h is None


def test_bad_inputs_name_the_argument(key):
    x, dt, A, B, C, D, z, h0 = make_inputs(key, seq=9)
    with pytest.raises(ValueError, match=r"x: expected rank 3"):
        selective_scan(x[0], dt, A, B, C)
    with pytest.raises(ValueError, match=r"dt: expected shape \(2, 9, 12\)"):
        selective_scan(x, dt[:, :4], A, B, C)
    with pytest.raises(ValueError, match=r"A: expected shape \(12, N\)"):
        selective_scan(x, dt, A[:3], B, C)
    with pytest.raises(ValueError, match=r"B: expected shape"):
        selective_scan(x, dt, A, B[..., :2], C)
    with pytest.raises(ValueError, match=r"initial_state: expected shape \(2, 12, 5\)"):
        selective_scan(x, dt, A, B, C, initial_state=h0[:1])
    with pytest.raises(ValueError, match=r"T must be >= 1"):
        selective_scan(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0])
    with pytest.raises(TypeError, match=r"x: expected a float dtype"):
        selective_scan(x.astype(jnp.int32), dt, A, B, C)
    with pytest.raises(ValueError, match=r"chunk_size"):
        selective_scan(x, dt, A, B, C, chunk_size=0, mode="chunk")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        selective_scan(x, dt, A, B, C, mode="parallel")
    with pytest.raises(ValueError, match=r"backend: mamba has no backend 'triton'"):
        selective_scan(x, dt, A, B, C, backend="triton")


# packed sequences: an empty one, one ending on a 16-step chunk boundary (16 + 16), one that
# is shorter than a chunk and a long one
CU = (0, 16, 16, 32, 37, 70)


def packed_inputs(key, dtype=jnp.float32):
    x, dt, A, B, C, D, z, _ = make_inputs(key, batch=1, seq=CU[-1], dtype=dtype)
    h0 = jax.random.normal(jax.random.fold_in(key, 9), (len(CU) - 1, x.shape[2], A.shape[1]))
    return x, dt, A, B, C, D, z, h0


def packed_outputs_and_grads(fn, arrays, key):
    (y, h), vjp = jax.vjp(fn, *arrays)
    u = jax.random.normal(key, y.shape, y.dtype)
    v = jax.random.normal(jax.random.fold_in(key, 1), h.shape, h.dtype)
    return y, h, vjp((u, v))


@functools.cache
def _packed_reference(key_data: tuple[int, ...]):
    key = jax.random.wrap_key_data(jnp.asarray(key_data, jnp.uint32))

    @jax.jit  # the offsets are concrete here: the reference runs each sequence alone
    def ref(*a):
        x, dt, A, B, C, D, z, h0 = a
        return selective_scan_reference(x, dt, A, B, C, D=D, z=z, initial_state=h0,
                                        cu_seqlens=np.asarray(CU, np.int32))

    return packed_outputs_and_grads(ref, packed_inputs(key), key)


def packed_reference(key):
    """(y, final states, grads) of the reference on :func:`packed_inputs` (cached per key)."""
    return _packed_reference(tuple(np.asarray(jax.random.key_data(key)).tolist()))


@pytest.mark.parametrize("impl", ["chunk-scan", "chunk-assoc", "recurrent", "naive"])
def test_packed_sequences_match_running_each_alone(impl, key):
    # the reference with concrete offsets runs each sequence on its own (its definition of
    # cu_seqlens); the jax forms, and the reference itself, run them packed with traced
    # offsets (under jit), forward and backward
    key = jax.random.key(11)  # one set of inputs for every form: the reference runs once
    arrays = packed_inputs(key)
    cu = jnp.asarray(CU, jnp.int32)
    kernel = (jax_backend(chunk_form=impl.removeprefix("chunk-")) if impl.startswith("chunk")
              else None)
    from linearnexus.kernels.base import GridConfig

    @jax.jit
    def packed(cu_traced, *a):
        x, dt, A, B, C, D, z, h0 = a
        if kernel is None:  # recurrent mode; the naive backend's chunk mode (one packed scan)
            y, h = selective_scan(x, dt, A, B, C, D=D, z=z, initial_state=h0, cu_seqlens=cu_traced,
                                  output_final_state=True,
                                  mode="chunk" if impl == "naive" else "recurrent",
                                  backend="naive" if impl == "naive" else "jax")
            return y, h
        return kernel.forward_chunk(x, dt, A, B, C, D=D, z=z, initial_state=h0,
                                    cu_seqlens=cu_traced, grid=GridConfig(chunk_size=16))

    got = packed_outputs_and_grads(functools.partial(packed, cu), arrays, key)
    want = packed_reference(key)
    assert got[1].shape == (len(CU) - 1, 12, 5)
    assert_close(got[0], want[0], 1e-5, "y")
    assert_close(got[1], want[1], 1e-5, "final states")
    np.testing.assert_array_equal(np.asarray(got[1][1]), np.asarray(arrays[7][1]))  # empty
    for name, g, w in zip("x dt A B C D z h0".split(), got[2], want[2], strict=True):
        assert np.isfinite(np.asarray(g)).all(), name
        assert_close(g, w, 1e-5, f"d{name}")


def test_packed_sequences_bad_inputs_name_the_argument(key):
    x, dt, A, B, C, D, z, h0 = packed_inputs(key)
    cu = jnp.asarray(CU, jnp.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens: requires batch size 1"):
        two = jnp.concatenate([x, x])
        selective_scan(two, jnp.concatenate([dt, dt]), A, jnp.concatenate([B, B]),
                       jnp.concatenate([C, C]), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"initial_state: expected shape \(5, 12, 5\) \[N_seq"):
        selective_scan(x, dt, A, B, C, initial_state=h0[:1], cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"cu_seqlens: must start at 0 and end at T=70"):
        selective_scan(x, dt, A, B, C, cu_seqlens=jnp.asarray([0, 10, 60], jnp.int32))
    with pytest.raises(TypeError, match=r"cu_seqlens: expected an integer dtype"):
        selective_scan(x, dt, A, B, C, cu_seqlens=jnp.asarray([0.0, 70.0]))


# ---- the small-shape checks: backends whose kernels run in interpret mode ----------------

SMALL_IMPLEMENTATIONS = {"pallas": dict(mode="chunk", backend="pallas")}


def small_inputs(key, batch=2, seq=37, channels=24, n=5, dtype=jnp.float32):
    """``{name: array}`` of the op's inputs (None-able ones included)."""
    # numpy draws (seeded from the test's key): eager jax.random ops would compile per shape
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))

    def normal(*shape, dt=dtype):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dt)

    dt = jnp.log1p(jnp.exp(normal(batch, seq, channels, dt=jnp.float32) - 1.0))  # softplus
    return {"x": normal(batch, seq, channels), "dt": dt.astype(dtype),
            "A": -jnp.exp(normal(channels, n, dt=jnp.float32)).astype(dtype),
            "B": normal(batch, seq, n), "C": normal(batch, seq, n), "D": normal(channels),
            "z": normal(batch, seq, channels),
            "initial_state": normal(batch, channels, n, dt=jnp.float32)}


def outputs_and_grads(fn, inputs, key):
    """``(y, final_state, grads)``; grads of ``<y, u> + <h, v>`` for random ``u, v``."""
    names = [k for k, v in inputs.items() if v is not None]

    def run(arrays):
        kw = {k: arrays.get(k) for k in ("D", "z", "initial_state")}
        return fn(arrays["x"], arrays["dt"], arrays["A"], arrays["B"], arrays["C"], **kw)

    @jax.jit
    def go(arrays):
        (y, h), vjp = jax.vjp(run, arrays)
        ku, kv = jax.random.split(key)
        u = jax.random.normal(ku, y.shape, jnp.float32).astype(y.dtype)
        v = jax.random.normal(kv, h.shape, h.dtype)
        return y, h, vjp((u, v))[0]

    return go({k: inputs[k] for k in names})


def small_check(fn, inputs, key, tol):
    """``fn`` (the op's positional arrays and D, z, initial_state as keywords -> (y, h))
    against the reference: output, final state and every input's gradient, dtypes kept."""
    got = outputs_and_grads(fn, inputs, key)
    ref = outputs_and_grads(selective_scan_reference, inputs, key)
    assert got[0].dtype == inputs["x"].dtype
    assert got[1].dtype == jnp.float32
    assert_close(got[0], ref[0], tol, "output")
    assert_close(got[1], ref[1], tol, "final state")
    for name in ref[2]:
        assert got[2][name].dtype == inputs[name].dtype, name
        assert_close(got[2][name], ref[2][name], tol, f"d{name}")


def _small(impl):
    def run(*args, **kw):
        return selective_scan(*args, **kw, output_final_state=True, **SMALL_IMPLEMENTATIONS[impl])
    return run


@pytest.mark.parametrize("impl", sorted(SMALL_IMPLEMENTATIONS))
def test_small_float32_matches_reference(impl, key):
    # T = 37: 3 tiles of 16, the last one padded; 24 channels: 2 blocks of 16, one padded;
    # N = 5 padded to 8 (for the Pallas kernels' layout)
    small_check(_small(impl), small_inputs(key), key, 1e-4)


@pytest.mark.parametrize("impl", sorted(SMALL_IMPLEMENTATIONS))
def test_small_bfloat16_inputs(impl, key):
    # bfloat16 everywhere but A (float32, as the Mamba block passes it)
    inputs = small_inputs(key, seq=21, channels=16, n=4, dtype=jnp.bfloat16)
    inputs["A"] = inputs["A"].astype(jnp.float32)
    small_check(_small(impl), inputs, key, 1e-2)
