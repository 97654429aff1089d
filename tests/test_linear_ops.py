"""Every linear-attention op, every implementation, against its per-step reference.

Ops and implementations come from ``tests/op_specs.py``: the api's modes (chunked and
recurrent, backend "jax") and its kernels (backend "pallas", interpret mode on the CPU),
each compared with backend "naive" (the per-step truth). A new op adds a spec; a new
backend adds one line to ``IMPLEMENTATIONS`` there. Implementations with the "full" sweep
run every check below; those with the "small" sweep (kernels in interpret mode, slow to
compile) run the small-shape checks at the end of this file.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.parity import assert_close, x64
from tests.op_specs import IMPLEMENTATIONS, SPECS

OPS = sorted(SPECS)
TOL = 1e-4
FULL_IMPLS = sorted(n for n, impl in IMPLEMENTATIONS.items() if impl.sweep == "full")
SMALL_IMPLS = sorted(n for n, impl in IMPLEMENTATIONS.items() if impl.sweep == "small")
REFERENCE = dict(backend="naive")
CU_SEQLENS = np.array([0, 0, 1, 71, 71, 200, 201], np.int32)  # lengths 0, 1, 70, 0, 129, 1


@functools.cache
def _jitted(op: str, impl: str, packed: bool):
    """One compiled function per (op, implementation); shapes recompile as needed."""
    fn = SPECS[op].fn
    kwargs = IMPLEMENTATIONS[impl].kwargs

    def run(arrays, h0, cu_seqlens):
        return fn(*arrays, initial_state=h0, output_final_state=True,
                  cu_seqlens=cu_seqlens if packed else None, **kwargs)
    return jax.jit(run)


def _reference_eager(op, arrays, h0, cu_seqlens=None):
    return SPECS[op].fn(*arrays, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                        **REFERENCE)


@functools.cache
def _reference_jitted(op: str, packed: bool):
    # the naive backend loops over packed sequences in Python, so the offsets are a
    # compile-time constant here (CU_SEQLENS), not a traced argument
    cu = CU_SEQLENS if packed else None
    return jax.jit(lambda arrays, h0: _reference_eager(op, arrays, h0, cu))


def _reference(op, arrays, h0, cu_seqlens=None):
    return _reference_jitted(op, cu_seqlens is not None)(arrays, h0)


def _inputs(op, key, B, T, H, K, V, *, with_state, decay="normal", n_states=None):
    k1, k2 = jax.random.split(key)
    arrays = SPECS[op].make(k1, B, T, H, K, V, decay)
    h0 = (jax.random.normal(k2, (n_states or B, H, K, V), jnp.float32) if with_state else None)
    return tuple(arrays.values()), h0


# (T, head dim, initial state): every length in {1, 63, 64, 65, 1000}, every head dim in
# {32, 64, 100}, each with and without an initial state somewhere
CASES = [(1, 32, False), (63, 100, True), (64, 64, False), (65, 32, True), (1000, 64, True)]
SHORT_CASES = [(65, 32, True), (130, 100, False)]  # ops without a full sweep


def _sweep(cases, short=None):
    """Parametrise (op, seq, dim, with_state), the short list for ops without a full sweep."""
    short = SHORT_CASES if short is None else short
    return [(op, *case) for op in OPS for case in (cases if SPECS[op].full_sweep else short)]


@pytest.mark.parametrize("impl", FULL_IMPLS)
@pytest.mark.parametrize("op,seq,dim,with_state", _sweep(CASES))
def test_forward_matches_reference(op, impl, seq, dim, with_state, key):
    arrays, h0 = _inputs(op, key, 2, seq, 2, dim, dim, with_state=with_state)
    o_ref, s_ref = _reference(op, arrays, h0)
    o, s = _jitted(op, impl, False)(arrays, h0, None)
    assert o.shape == o_ref.shape and o.dtype == arrays[0].dtype
    assert s.shape == s_ref.shape and s.dtype == jnp.float32
    assert_close(o, o_ref, TOL, f"{op}/{impl} output")
    assert_close(s, s_ref, TOL, f"{op}/{impl} final state")


def _grads(fn, arrays, h0, cot_o, cot_s):
    def loss(arrays, h0):
        o, s = fn(arrays, h0)
        return jnp.sum(o * cot_o) + jnp.sum(s * cot_s)
    return jax.grad(loss, argnums=(0, 1))(arrays, h0)


# chunked form over several chunks at an awkward head dim and within one chunk (T < L: no
# loop across chunks); the recurrent form (a scan of the reference's own step) at one
# shorter shape
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl,seq,dim", [("chunk", 130, 100), ("chunk", 40, 32), ("recurrent", 63, 32)])
def test_gradients_match_reference(op, impl, seq, dim, key):
    """Gradients of a random cotangent on outputs and final state, for every input array
    (q, k, v, gates, beta) and the initial state."""
    k1, k2, k3 = jax.random.split(key, 3)
    arrays, h0 = _inputs(op, k1, 2, seq, 2, dim, dim, with_state=True)
    o_ref, s_ref = _reference(op, arrays, h0)
    cot_o = jax.random.normal(k2, o_ref.shape)
    cot_s = jax.random.normal(k3, s_ref.shape)
    ref = jax.jit(lambda a, h: _grads(lambda a, h: _reference_eager(op, a, h), a, h, cot_o, cot_s))(
        arrays, h0)
    run = _jitted(op, impl, False)
    got = jax.jit(lambda a, h: _grads(lambda a, h: run(a, h, None), a, h, cot_o, cot_s))(arrays, h0)
    names = list(SPECS[op].make(key, 1, 1, 1, 1, 1))
    for name, g, r in zip(names, got[0], ref[0], strict=True):
        assert_close(g, r, TOL, f"{op}/{impl} d{name}")
    assert_close(got[1], ref[1], TOL, f"{op}/{impl} d initial_state")


FULL_OPS = [op for op in OPS if SPECS[op].full_sweep]
PACKED_CASES = [(op, *case) for op in OPS for case in (
    [("chunk", True), ("chunk", False), ("recurrent", True)] if SPECS[op].full_sweep
    else [("chunk", True)])]


@pytest.mark.parametrize("op,impl,with_state", PACKED_CASES)
def test_packed_sequences_match_each_alone(op, impl, with_state, key):
    """cu_seqlens (traced under jit) gives each sequence its own result, lengths 0 and 1 too."""
    n = len(CU_SEQLENS) - 1
    arrays, h0 = _inputs(op, key, 1, int(CU_SEQLENS[-1]), 2, 32, 24, with_state=with_state,
                         n_states=n)
    cu = jnp.asarray(CU_SEQLENS)
    o_ref, s_ref = _reference(op, arrays, h0, cu)
    o, s = _jitted(op, impl, True)(arrays, h0, cu)
    assert s.shape == (n, 2, 32, 24)
    assert_close(o, o_ref, TOL, f"{op}/{impl} packed output")
    assert_close(s, s_ref, TOL, f"{op}/{impl} packed final states")
    # an empty sequence's final state is its initial state (or zeros)
    expect_empty = np.zeros((2, 32, 24)) if h0 is None else np.asarray(h0[0])
    np.testing.assert_allclose(np.asarray(s[0]), expect_empty, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_packed_gradients_match_reference(op, key):
    k1, k2 = jax.random.split(key)
    n = len(CU_SEQLENS) - 1
    arrays, h0 = _inputs(op, k1, 1, int(CU_SEQLENS[-1]), 2, 32, 24, with_state=True, n_states=n)
    cu = jnp.asarray(CU_SEQLENS)
    o_ref, s_ref = _reference(op, arrays, h0, cu)
    cot_o, cot_s = jax.random.normal(k2, o_ref.shape), jax.random.normal(k2, s_ref.shape)
    ref = jax.jit(lambda a, h: _grads(lambda a, h: _reference_eager(op, a, h, CU_SEQLENS), a, h, cot_o,
                                      cot_s))(arrays, h0)
    run = _jitted(op, "chunk", True)
    got = jax.jit(lambda a, h: _grads(lambda a, h: run(a, h, cu), a, h, cot_o, cot_s))(arrays, h0)
    for i, (g, r) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)):
        assert_close(g, r, TOL, f"{op} packed grad #{i}")


@pytest.mark.parametrize("op", FULL_OPS)
def test_token_by_token_decoding_equals_one_call(op, key):
    """Recurrent mode fed one token at a time, threading the state, equals one long call."""
    arrays, h0 = _inputs(op, key, 2, 9, 2, 16, 8, with_state=True)
    o_full, s_full = _reference(op, arrays, h0)
    step = _jitted(op, "recurrent", False)
    state, outs = h0, []
    for t in range(9):
        o_t, state = step(tuple(a[:, t:t + 1] if a.ndim >= 3 else a for a in arrays), state, None)
        outs.append(o_t)
    assert_close(jnp.concatenate(outs, axis=1), o_full, 1e-5, f"{op} decoded outputs")
    assert_close(state, s_full, 1e-5, f"{op} decoded state")


@pytest.mark.parametrize("op", FULL_OPS)
def test_float64_chunked_is_exact(op, key):
    """In float64 the chunked form equals the reference to rounding (catches small biases
    a float32 tolerance would hide)."""
    with x64():
        arrays, h0 = _inputs(op, key, 1, 70, 2, 12, 10, with_state=True)
        arrays = tuple(a.astype(jnp.float64) for a in arrays)
        h0 = h0.astype(jnp.float64)
        o_ref, s_ref = _reference_eager(op, arrays, h0)
        o, s = jax.jit(lambda a, h: SPECS[op].fn(*a, initial_state=h, output_final_state=True,
                                                 mode="chunk", chunk_size=16, backend="jax"))(arrays, h0)
        assert o.dtype == jnp.float64 and s.dtype == jnp.float64
        assert_close(o, o_ref, 1e-10, f"{op} float64 output")
        assert_close(s, s_ref, 1e-10, f"{op} float64 state")


@pytest.mark.parametrize("op", OPS)
def test_long_sequence_with_strong_decay_is_stable(op, key):
    """T = 16384 in float32 with log-gates near -20 per step: finite, and within tolerance."""
    decay = "strong" if SPECS[op].gated else "normal"
    arrays, h0 = _inputs(op, key, 1, 16384, 1, 16, 16, with_state=True, decay=decay)
    o_ref, s_ref = _reference(op, arrays, h0)
    o, s = _jitted(op, "chunk", False)(arrays, h0, None)
    assert np.all(np.isfinite(np.asarray(o))) and np.all(np.isfinite(np.asarray(s)))
    assert_close(o, o_ref, TOL, f"{op} long output")
    assert_close(s, s_ref, TOL, f"{op} long state")


@pytest.mark.parametrize("op", [op for op in OPS if SPECS[op].gated])
def test_gradients_under_strong_decay(op, key):
    """Log-gates near -20: the true gate gradients are tiny, so any cancellation between
    large cumulative sums (b_i - b_j) would swamp them; every gradient stays within 1e-4."""
    k1, k2 = jax.random.split(key)
    arrays, h0 = _inputs(op, k1, 1, 150, 2, 16, 16, with_state=True, decay="strong")
    o_ref, s_ref = _reference(op, arrays, h0)
    cot_o, cot_s = jax.random.normal(k2, o_ref.shape), jax.random.normal(k2, s_ref.shape)
    ref = jax.jit(lambda a, h: _grads(lambda a, h: _reference_eager(op, a, h), a, h, cot_o, cot_s))(
        arrays, h0)
    run = _jitted(op, "chunk", False)
    got = jax.jit(lambda a, h: _grads(lambda a, h: run(a, h, None), a, h, cot_o, cot_s))(arrays, h0)
    names = [*SPECS[op].make(key, 1, 1, 1, 1, 1), "initial_state"]
    for name, g, r in zip(names, jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        assert_close(g, r, TOL, f"{op} strong-decay d{name}")


def test_simple_gla_gate_gradient_of_a_strong_step_among_mild_ones(key):
    """A log-gate of -20 next to ones of -0.01 in the same chunk: its true gradient is ~1e-9
    against ~1 for its neighbours, so a sum that cancels the chunk's large terms would bury
    it (the written-out backward once did). Each element of dg within 1e-3 of float64."""
    from linearnexus.kernels.simple_gla.reference import simple_gla_reference

    ks = jax.random.split(key, 6)
    q, k = (jax.random.normal(kk, (1, 64, 2, 5)) for kk in ks[:2])
    v = jax.random.normal(ks[2], (1, 64, 2, 7))
    g = jnp.where(jax.random.uniform(ks[3], (1, 64, 2)) < 0.5, -20.0, -0.01)
    h0 = jax.random.normal(ks[4], (1, 2, 5, 7))
    cot = jax.random.normal(ks[5], (1, 64, 2, 7))

    def dg(fn, dtype):
        def loss(g):
            o, _ = fn(*(a.astype(dtype) for a in (q, k, v)), g, scale=0.4,
                      initial_state=h0.astype(dtype))
            return jnp.sum(o.astype(dtype) * cot.astype(dtype))
        return np.asarray(jax.grad(loss)(g.astype(dtype)), np.float64)

    with x64():
        want = dg(simple_gla_reference, jnp.float64)
    got = dg(lambda *a, **kw: SPECS["simple_gla"].fn(*a, **kw, output_final_state=True,
                                                      mode="chunk", backend="jax"), jnp.float32)
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
    assert np.max(rel[np.asarray(g) < -1]) < 1e-3, np.max(rel[np.asarray(g) < -1])


@pytest.mark.parametrize("op", OPS)
def test_bad_inputs_name_the_argument(op, key):
    """Every error names the argument: wrong rank or length for each input array, non-float
    input, initial state of the wrong shape, bad cu_seqlens, unknown backend or mode."""
    fn = SPECS[op].fn
    arrays = SPECS[op].make(key, 2, 5, 2, 4, 3)
    names, base = list(arrays), list(arrays.values())
    for i, name in enumerate(names):
        bad = list(base)
        bad[i] = base[i][..., None]  # one axis too many
        with pytest.raises(ValueError, match=f"^{name}: "):
            fn(*bad)
        if i > 0 and base[i].ndim >= 3:  # a sequence length that disagrees with the first input
            bad[i] = base[i][:, :4]
            with pytest.raises(ValueError, match=f"^{name}: "):
                fn(*bad)
    with pytest.raises(TypeError, match=f"^{names[0]}: expected a float"):
        fn(base[0].astype(jnp.int32), *base[1:])
    with pytest.raises(ValueError, match="initial_state"):
        fn(*base, initial_state=jnp.zeros((2, 2, 4, 4)))
    with pytest.raises(ValueError, match="cu_seqlens: requires batch size 1"):
        fn(*base, cu_seqlens=jnp.array([0, 5], jnp.int32))
    one = [a[:1] if a.ndim >= 3 else a for a in base]
    with pytest.raises(ValueError, match="cu_seqlens: must be non-decreasing"):
        fn(*one, cu_seqlens=jnp.array([0, 4, 2, 5], jnp.int32))
    with pytest.raises(ValueError, match="cu_seqlens: must start at 0 and end at T"):
        fn(*one, cu_seqlens=jnp.array([0, 4], jnp.int32))
    with pytest.raises(ValueError, match="initial_state"):  # one state per packed sequence
        fn(*one, cu_seqlens=jnp.array([0, 2, 5], jnp.int32), initial_state=jnp.zeros((1, 2, 4, 3)))
    with pytest.raises(ValueError, match="backend"):
        fn(*base, backend="cuda-magic")
    with pytest.raises(ValueError, match="mode"):
        fn(*base, mode="sideways")
    with pytest.raises(ValueError, match="chunk_size"):
        fn(*base, chunk_size=0)


# --- bad values: NaN stays causal, positive log-gates and invalid offsets never pass silently

BAD_T = 40  # inside the first chunk (64) of T = 65: a chunked form must not leak it backwards


def _mamba_inputs(key, B, T, C=6, N=4):
    ks = jax.random.split(key, 5)
    arrays = {"x": jax.random.normal(ks[0], (B, T, C)),
              "dt": jax.nn.softplus(jax.random.normal(ks[1], (B, T, C)) - 1.0),
              "A": -jnp.exp(jax.random.normal(ks[2], (C, N))),
              "B": jax.random.normal(ks[3], (B, T, N)), "C": jax.random.normal(ks[4], (B, T, N))}
    return tuple(arrays.values()), jax.random.normal(key, (B, C, N)), list(arrays)


@functools.cache
def _mamba_jitted(impl: str):
    from linearnexus.kernels.mamba import selective_scan

    kwargs = REFERENCE if impl == "naive" else IMPLEMENTATIONS[impl].kwargs

    def run(arrays, h0, cu_seqlens):
        return selective_scan(*arrays, initial_state=h0, output_final_state=True,
                              cu_seqlens=cu_seqlens, chunk_size=16, **kwargs)
    return jax.jit(run)


def _nan_case(op, key, impl):
    """``(run, arrays, h0, names, output-only input)`` at (B=2, T=65): the shapes the
    forward test compiles, so the jitted functions are reused."""
    if op == "mamba":
        arrays, h0, names = _mamba_inputs(key, 2, 65)
        return functools.partial(_mamba_jitted(impl), cu_seqlens=None), arrays, h0, names, "C"
    arrays, h0 = _inputs(op, key, 2, 65, 2, 32, 32, with_state=True)
    run = (functools.partial(_reference, op) if impl == "naive" else
           lambda a, h: _jitted(op, impl, False)(a, h, None))
    names = list(SPECS[op].make(key, 1, 1, 1, 1, 1))
    return run, arrays, h0, names, ("C" if op == "ssd" else "q")


@pytest.mark.parametrize("op", [*OPS, "mamba"])
def test_non_finite_inputs_stay_causal(op, key):
    """A NaN at step t of one row, in any per-step input, in every mode and in the
    reference: that row's outputs before t are those of the clean run, its outputs from t
    on (only at t for the query-side input, which writes no state) and its final state are
    NaN, and the other row is untouched. In chunk mode t sits mid-chunk."""
    for impl in ("chunk", "recurrent", "naive"):
        run, arrays, h0, names, output_only = _nan_case(op, key, impl)
        o_clean, s_clean = (np.asarray(a) for a in run(arrays, h0))
        for i, name in enumerate(names):
            if arrays[i].ndim < 3:
                continue  # per-head constants (A)
            bad = list(arrays)
            bad[i] = arrays[i].at[1, BAD_T].set(jnp.nan)
            o, s = (np.asarray(a) for a in run(tuple(bad), h0))
            where = f"{op}/{impl} NaN in {name}"
            np.testing.assert_allclose(o[0], o_clean[0], rtol=1e-6, atol=1e-6, err_msg=where)
            np.testing.assert_allclose(s[0], s_clean[0], rtol=1e-6, atol=1e-6, err_msg=where)
            np.testing.assert_allclose(o[1, :BAD_T], o_clean[1, :BAD_T], rtol=1e-6, atol=1e-6,
                                       err_msg=where)
            assert np.isnan(o[1, BAD_T]).any(), where
            if name == output_only:
                np.testing.assert_allclose(o[1, BAD_T + 1:], o_clean[1, BAD_T + 1:], rtol=1e-6,
                                           atol=1e-6, err_msg=where)
                np.testing.assert_allclose(s[1], s_clean[1], rtol=1e-6, atol=1e-6, err_msg=where)
            else:
                assert np.isnan(o[1, BAD_T:]).any(axis=tuple(range(1, o.ndim - 1))).all(), where
                assert np.isnan(s[1]).any(), where


GATED_OPS = [op for op in OPS if op != "ssd" and "g" in SPECS[op].make(jax.random.PRNGKey(0), 1, 1,
                                                                          1, 1, 1)]


@pytest.mark.parametrize("op", GATED_OPS)
def test_positive_log_gates_are_refused_or_nan(op, key):
    """g > 0 (a state that grows): a ValueError naming g when the values are concrete;
    under jit, NaN from that step on in that row (every mode), the rest untouched. g = -inf
    (a gate of 0) is valid and exact in chunk mode too."""
    arrays, h0 = _inputs(op, key, 2, 65, 2, 32, 32, with_state=True)
    names = list(SPECS[op].make(key, 1, 1, 1, 1, 1))
    gi = names.index("g")
    bad = list(arrays)
    bad[gi] = arrays[gi].at[1, BAD_T].set(50.0)
    with pytest.raises(ValueError, match=r"^g: log-gates must be <= 0 .* index \(1, 40"):
        SPECS[op].fn(*bad)
    for impl in ("chunk", "recurrent"):
        o_clean, _ = _jitted(op, impl, False)(arrays, h0, None)
        o, s = _jitted(op, impl, False)(tuple(bad), h0, None)
        assert_close(o[0], o_clean[0], 1e-6, f"{op}/{impl} clean row")
        assert_close(o[1, :BAD_T], o_clean[1, :BAD_T], 1e-6, f"{op}/{impl} before the gate")
        assert np.isnan(np.asarray(o[1, BAD_T:])).any(axis=(1, 2)).all()
        assert np.isnan(np.asarray(s[1])).all() and not np.isnan(np.asarray(s[0])).any()
    # g = -inf is a valid gate (exp(g) = 0: a hard reset): finite, and chunked == recurrent
    reset = list(arrays)
    reset[gi] = arrays[gi].at[1, BAD_T].set(-jnp.inf)
    o_chunk, s_chunk = _jitted(op, "chunk", False)(tuple(reset), h0, None)
    o_rec, s_rec = _jitted(op, "recurrent", False)(tuple(reset), h0, None)
    assert np.isfinite(np.asarray(o_chunk)).all() and np.isfinite(np.asarray(s_chunk)).all()
    assert_close(o_chunk, o_rec, TOL, f"{op} g=-inf output")
    assert_close(s_chunk, s_rec, TOL, f"{op} g=-inf state")


def test_ssd_positive_log_gate_names_dt_and_a(key):
    x, dt, A, B, C = SPECS["ssd"].make(key, 1, 5, 2, 4, 4).values()
    with pytest.raises(ValueError, match=r"^dt \* A: log-gates must be <= 0"):
        SPECS["ssd"].fn(x, dt, -A, B, C)


BAD_CU = jnp.array([3, 8, 1, 71, 71, 200, 240], jnp.int32)  # not from 0, decreasing, not to T


@pytest.mark.parametrize("op", [*OPS, "mamba"])
def test_invalid_traced_cu_seqlens_give_nan(op, key):
    """Invalid offsets under jit make every output and final state NaN (concrete ones
    raise: test_bad_inputs_name_the_argument); a Python list is taken as int32 offsets
    (checked at each distinct entry: the linear ops' shared one, ssd's and mamba's)."""
    n = len(CU_SEQLENS) - 1
    if op == "mamba":
        arrays, h0, _ = _mamba_inputs(key, 1, int(CU_SEQLENS[-1]))
        h0 = jnp.broadcast_to(h0, (n, *h0.shape[1:]))
        run = _mamba_jitted("chunk")
    else:
        arrays, h0 = _inputs(op, key, 1, int(CU_SEQLENS[-1]), 2, 32, 24, with_state=True,
                             n_states=n)
        run = _jitted(op, "chunk", True)
    o, s = run(arrays, h0, BAD_CU)
    assert np.isnan(np.asarray(o)).all() and np.isnan(np.asarray(s)).all()
    if op not in ("simple_gla", "ssd", "mamba"):  # the other ops share simple_gla's entry
        return
    o_arr, s_arr = run(arrays, h0, jnp.asarray(CU_SEQLENS))
    o_list, s_list = run(arrays, h0, CU_SEQLENS.tolist())  # traced ints in a list
    assert_close(o_list, o_arr, 0.0, f"{op} cu_seqlens list output")
    assert_close(s_list, s_arr, 0.0, f"{op} cu_seqlens list state")


def test_checkify_switch_reports_traced_bad_values(key):
    """Wrapped in checkify (the documented switch), the traced checks raise with the
    argument's name; unwrapped they cost nothing and the outputs are NaN."""
    from jax.experimental import checkify

    n = len(CU_SEQLENS) - 1
    arrays, h0 = _inputs("simple_gla", key, 1, int(CU_SEQLENS[-1]), 2, 32, 24, with_state=True,
                         n_states=n)
    checked = jax.jit(checkify.checkify(_jitted("simple_gla", "chunk", True),
                                        errors=checkify.user_checks))
    err, _ = checked(arrays, h0, BAD_CU)
    with pytest.raises(checkify.JaxRuntimeError, match="cu_seqlens: must start at 0, end at T=201"):
        err.throw()
    positive = (*arrays[:3], arrays[3].at[0, 5].set(1.0))
    err, _ = checked(positive, h0, jnp.asarray(CU_SEQLENS))
    with pytest.raises(checkify.JaxRuntimeError, match="g: log-gates must be <= 0"):
        err.throw()
    err, (o, _) = checked(arrays, h0, jnp.asarray(CU_SEQLENS))
    err.throw()  # clean inputs: no error
    assert np.isfinite(np.asarray(o)).all()


@pytest.mark.parametrize("op", ["simple_gla", "gated_delta_rule"])
def test_non_finite_inputs_stay_causal_in_pallas(op, key):
    """The pallas backend (interpret mode here) behind the same guard: a NaN in v at step t
    of one row, mid-chunk, leaves that row's earlier outputs as the clean run's."""
    arrays, h0 = _inputs(op, key, 2, 24, 2, 16, 16, with_state=True)
    run = jax.jit(lambda a, h: SPECS[op].fn(*a, initial_state=h, output_final_state=True,
                                            backend="pallas", mode="chunk", chunk_size=16))
    bad = list(arrays)
    bad[2] = arrays[2].at[1, 20].set(jnp.nan)  # v, in the second chunk (16..23)
    (o_clean, _), (o, s) = run(arrays, h0), run(tuple(bad), h0)
    assert_close(o[0], o_clean[0], 1e-6, f"{op} pallas clean row")
    assert_close(o[1, :20], o_clean[1, :20], 1e-6, f"{op} pallas before the NaN")
    assert np.isnan(np.asarray(o[1, 20:])).any(axis=(1, 2)).all() and np.isnan(np.asarray(s[1])).any()
# ---- the small-shape checks: every implementation with the "small" sweep ----------------
# Interpret mode compiles slowly: shapes are tiny and each (op, implementation, case)
# compiles one jitted function (outputs and gradients together), reused by the
# strong-decay and zero-gate cases.

SMALL_TOL = 1e-5  # float32 (conftest sets the highest matmul precision)
BF16_TOL, BF16_GRAD_TOL = 2e-2, 5e-2
BATCH = dict(B=2, T=37, H=2, K=20, V=24)  # ragged last chunk of 16, K and V padded to 32
SMALL_CU_SEQLENS = np.array([0, 0, 1, 21, 21, 35], np.int32)  # lengths 0, 1, 20, 0, 14
PACKED = dict(B=1, T=int(SMALL_CU_SEQLENS[-1]), H=2, K=20, V=24)
GATES = ("g", "dt", "A")  # stay float32 in the bfloat16 case
# the ops with kernels of their own: retention and ssd re-parametrise simple_gla's kernels
# (their argument mapping is covered by the batch case) and delta_rule runs
# gated_delta_rule's with the gate off; each left-out op would cost a compile per case
KERNEL_OPS = [op for op in OPS if SPECS[op].gated and SPECS[op].full_sweep]


def small_inputs(op, key, shape, *, n_states=None, decay="normal"):
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


def value_and_grads(fn, arrays, h0, cot_o, cot_s):
    """``(o, s, (d arrays, d h0))`` of ``sum(o * cot_o) + sum(s * cot_s)``."""
    def loss(arrays, h0):
        o, s = fn(arrays, h0)
        return jnp.sum(o.astype(jnp.float32) * cot_o) + jnp.sum(s * cot_s), (o, s)

    (_, (o, s)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(arrays, h0)
    return o, s, grads


@functools.cache
def small_run(op: str, impl: str, packed: bool):
    """Jitted ``(arrays, h0, cot_o, cot_s, cu_seqlens) -> (o, s, grads)``; cu_seqlens traced."""
    spec = IMPLEMENTATIONS[impl]
    kwargs = dict(spec.kwargs)
    if not packed and op in spec.wide_chunk_ops:
        kwargs["chunk_size"] = 2 * kwargs["chunk_size"]

    def run(arrays, h0, cot_o, cot_s, cu):
        def fn(a, h):
            return SPECS[op].fn(*a, initial_state=h, output_final_state=True,
                                cu_seqlens=cu if packed else None, **kwargs)
        return value_and_grads(fn, arrays, h0, cot_o, cot_s)
    return jax.jit(run)


@functools.cache
def small_reference(op: str, packed: bool):
    """The reference: it runs packed sequences one by one, so its cu_seqlens are a concrete
    constant (SMALL_CU_SEQLENS), never traced."""
    cu = SMALL_CU_SEQLENS if packed else None

    def run(arrays, h0, cot_o, cot_s):
        def fn(a, h):
            return SPECS[op].fn(*a, initial_state=h, output_final_state=True, cu_seqlens=cu,
                                **REFERENCE)
        return value_and_grads(fn, arrays, h0, cot_o, cot_s)
    return jax.jit(run)


def compare_all(op, names, got, ref, tol, grad_tol, what):
    """Output, final state, and the gradient of every input and of the initial state."""
    o, s, (d_arrays, d_h0) = got
    o_ref, s_ref, (r_arrays, r_h0) = ref
    assert o.shape == o_ref.shape and s.shape == s_ref.shape
    assert s.dtype == jnp.float32
    assert_close(o, o_ref, tol, f"{op} {what} output")
    assert_close(s, s_ref, tol, f"{op} {what} final state")
    for name, g, r in zip(names, d_arrays, r_arrays, strict=True):
        assert_close(g, r, grad_tol, f"{op} {what} d{name}")
    assert_close(d_h0, r_h0, grad_tol, f"{op} {what} d initial_state")


@pytest.mark.parametrize("impl", SMALL_IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_small_batch_matches_reference(op, impl, key):
    """float32, padded head dims, ragged last chunk, initial state: outputs and gradients."""
    names, arrays, h0, cot_o, cot_s = small_inputs(op, key, BATCH)
    got = small_run(op, impl, False)(arrays, h0, cot_o, cot_s, None)
    assert got[0].dtype == jnp.float32
    ref = small_reference(op, False)(arrays, h0, cot_o, cot_s)
    compare_all(op, names, got, ref, SMALL_TOL, SMALL_TOL, f"{impl} float32")


def _finite_and_close(op, impl, names, arrays, h0, cot_o, cot_s, what):
    """Batch-shape outputs and gradients (the batch case's compiled code): all finite, and
    as the reference's."""
    got = small_run(op, impl, False)(arrays, h0, cot_o, cot_s, None)
    for leaf in jax.tree.leaves(got):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), f"{op}: non-finite ({what})"
    ref = small_reference(op, False)(arrays, h0, cot_o, cot_s)
    compare_all(op, names, got, ref, SMALL_TOL, SMALL_TOL, f"{impl} {what}")


@pytest.mark.parametrize("impl", SMALL_IMPLS)
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_small_strong_decay_matches_reference(op, impl, key):
    """Log-gates in [-20, -19]: the state forgets almost everything each step; exp of large
    cumulative gate sums must neither overflow nor cancel (outputs and gradients)."""
    names, arrays, h0, cot_o, cot_s = small_inputs(op, key, BATCH, decay="strong")
    _finite_and_close(op, impl, names, arrays, h0, cot_o, cot_s, "strong-decay")


@pytest.mark.parametrize("impl", SMALL_IMPLS)
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_small_zero_gate_resets_the_state(op, impl, key):
    """A log-gate of -inf (gate exactly 0: the state is forgotten) at a few steps, one of them
    a chunk's first: outputs and gradients as the reference's, nothing NaN (the kernels'
    in-chunk sums would form -inf - -inf; the Pallas glue floors log-gates at
    LOG_GATE_FLOOR)."""
    names, arrays, h0, cot_o, cot_s = small_inputs(op, key, BATCH)
    gi = names.index("g")
    arrays = list(arrays)
    arrays[gi] = arrays[gi].at[:, jnp.array([5, 16, 30])].set(-jnp.inf)
    _finite_and_close(op, impl, names, tuple(arrays), h0, cot_o, cot_s, "zero-gate")


@pytest.mark.parametrize("impl", SMALL_IMPLS)
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_small_packed_matches_reference(op, impl, key):
    """Traced cu_seqlens under jit, sequences of lengths 0, 1, 20, 0, 14, each with its own
    initial state: outputs, final states and gradients (an empty sequence's final state is
    its initial state)."""
    n = len(SMALL_CU_SEQLENS) - 1
    names, arrays, h0, cot_o, cot_s = small_inputs(op, key, PACKED, n_states=n)
    got = small_run(op, impl, True)(arrays, h0, cot_o, cot_s, jnp.asarray(SMALL_CU_SEQLENS))
    ref = small_reference(op, True)(arrays, h0, cot_o, cot_s)
    assert got[1].shape == (n, PACKED["H"], PACKED["K"], PACKED["V"])
    compare_all(op, names, got, ref, SMALL_TOL, SMALL_TOL, f"{impl} packed")
    for empty in (0, 3):
        np.testing.assert_array_equal(np.asarray(got[1][empty]), np.asarray(h0[empty]),
                                      err_msg=f"{op}: empty sequence {empty} changed its state")


@pytest.mark.parametrize("impl", SMALL_IMPLS)
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_small_bfloat16_matches_float32_reference(op, impl, key):
    """bfloat16 inputs (gates float32) against the float32 reference on the same values.

    Tolerances are bfloat16's (8 mantissa bits, about 4e-3 per rounding) on tiny shapes:
    2e-2 for outputs and state, 5e-2 for gradients (rounded twice: cotangent path and
    inputs)."""
    names, arrays, h0, cot_o, cot_s = small_inputs(op, key, BATCH)
    low = tuple(a if name in GATES else a.astype(jnp.bfloat16)
                for name, a in zip(names, arrays, strict=True))
    got = small_run(op, impl, False)(low, h0, cot_o, cot_s, None)
    assert got[0].dtype == jnp.bfloat16  # v's dtype
    for name, a, g in zip(names, low, got[2][0], strict=True):
        assert g.dtype == a.dtype, f"{op}: d{name} is {g.dtype}, input {a.dtype}"
    ref = small_reference(op, False)(tuple(a.astype(jnp.float32) for a in low), h0, cot_o, cot_s)
    compare_all(op, names, got, ref, BF16_TOL, BF16_GRAD_TOL, f"{impl} bfloat16")


@pytest.mark.parametrize("op", ["simple_gla", "gated_delta_rule"])
def test_guard_settle_forms_agree(op, key, monkeypatch):
    """The guard's forms (``LINEARNEXUS_GUARD_SETTLE``: a cond, or a one-step while loop that
    passes the outputs through without a copy; ``LINEARNEXUS_GUARD_BACKWARD``: a where over
    the cotangents, or a cond between the backward and NaN gradients) give the same outputs,
    states and gradients on clean inputs, the same causal NaN after a NaN mid-chunk, NaN
    gradients after it, and NaN for invalid traced offsets; another value of either variable
    is refused, naming it."""
    from linearnexus.kernels.common.validation import GUARD_BACKWARD_ENV, GUARD_SETTLE_ENV

    fn, kwargs = SPECS[op].fn, IMPLEMENTATIONS["chunk"].kwargs
    arrays, h0 = _inputs(op, key, 1, 65, 2, 32, 24, with_state=True)
    bad = (arrays[0], arrays[1].at[0, BAD_T].set(jnp.nan), *arrays[2:])
    cu_bad = jnp.asarray([0, 70, 65], jnp.int32)
    h0_2 = jnp.concatenate([h0, h0])

    def loss(arrays, h0):
        o, s = fn(*arrays, initial_state=h0, output_final_state=True, **kwargs)
        return jnp.sum(o ** 2) + jnp.sum(s), (o, s)

    results = {}
    forms = (("cond", "where"), ("loop", "where"), ("cond", "cond"))
    for settle, backward in forms:
        monkeypatch.setenv(GUARD_SETTLE_ENV, settle)
        monkeypatch.setenv(GUARD_BACKWARD_ENV, backward)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))  # traced with the form
        run = jax.jit(lambda a, h, cu: fn(*a, initial_state=h, output_final_state=True,
                                          cu_seqlens=cu, **kwargs))
        results[settle, backward] = (grad(arrays, h0), run(bad, h0, None),
                                     run(arrays, h0_2, cu_bad), grad(bad, h0)[0])
    for form in forms[1:]:
        for got, want in zip(jax.tree.leaves(results[form]), jax.tree.leaves(results[forms[0]]),
                             strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(form))
    for form in forms:
        o_bad = np.asarray(results[form][1][0])
        assert (np.isnan(o_bad[0, BAD_T:]).any(axis=(1, 2)).all()
                and not np.isnan(o_bad[0, :BAD_T]).any()), form
        assert np.isnan(np.asarray(results[form][2][0])).all(), form
        for g in jax.tree.leaves(results[form][3]):  # every gradient after the NaN
            assert np.isnan(np.asarray(g)).all(), form
    monkeypatch.setenv(GUARD_SETTLE_ENV, "select")
    with pytest.raises(ValueError, match=GUARD_SETTLE_ENV):
        fn(*arrays, initial_state=h0, **kwargs)
    monkeypatch.setenv(GUARD_SETTLE_ENV, "cond")
    monkeypatch.setenv(GUARD_BACKWARD_ENV, "mask")
    with pytest.raises(ValueError, match=GUARD_BACKWARD_ENV):
        fn(*arrays, initial_state=h0, **kwargs)


def test_guard_reads_only_the_final_state_where_the_kernel_marks_outputs(key):
    """A run that reports (a third return, True) that its final state is non-finite wherever
    its output is (the Mosaic GPU walks) has its output's finiteness left unread: a stand-in
    whose output leaks a bad q's NaN everywhere while its state stays finite is returned as
    it is, and without the report the same run is caught and settled causally (NaN at the
    bad step only). ``run_op`` reports the flag of the kernel that ran, in chunk mode only,
    after a backend that declined."""
    from linearnexus.kernels.common.backends import run_op
    from linearnexus.kernels.common.validation import run_guarded

    B, T, H, K, V = 1, 8, 1, 4, 4
    q = jax.random.normal(key, (B, T, H, K))
    bad = q.at[0, 3, 0, 0].set(jnp.nan)

    def leaky(marks):
        def run(q, k, v, *gates, initial_state, cu_seqlens):
            o = jnp.where(jnp.isnan(q).any(), jnp.nan, 1.0) * jnp.ones((B, T, H, V))
            return o, jnp.zeros((B, H, K, V)), marks  # the state never sees q
        return run

    for marks in (True, False):
        o, final = run_guarded(leaky(marks), bad, q, q, (), initial_state=None, cu_seqlens=None)
        nan_at = np.isnan(np.asarray(o)).any(axis=(2, 3))[0]  # [T]
        want = np.ones(T, bool) if marks else np.arange(T) == 3
        np.testing.assert_array_equal(nan_at, want, err_msg=f"marks={marks}")
        assert np.isfinite(np.asarray(final)).all()
        o, _ = run_guarded(leaky(marks), q, q, q, (), initial_state=None, cu_seqlens=None)
        np.testing.assert_array_equal(np.asarray(o), np.ones((B, T, H, V)))

    class Stand:
        def __init__(self, marks: bool, declines: bool) -> None:
            self.final_marks_bad_inputs, self.declines = marks, declines

        def supports(self, *, platform, dtype):
            return True

        def forward_chunk(self, q, k, v, *, initial_state, grid=None, **kwargs):
            if self.declines:
                raise NotImplementedError("stand-in declines")
            return v, jnp.zeros((B, H, K, V))

        forward_recurrent = forward_chunk

    def report(order, mode, **backends):
        got: list[bool] = []
        run_op("stand", backends, order, (q, q, q), initial_state=None, output_final_state=True,
               chunk_size=4, mode=mode, backend=None, dtype=q.dtype, report=got)
        return got

    assert report(("a", "b"), "chunk", a=Stand(True, True), b=Stand(False, False)) == [True, False]
    assert report(("a", "b"), "chunk", a=Stand(True, False), b=Stand(False, False)) == [True]
    assert report(("a",), "recurrent", a=Stand(True, False)) == [False]


def test_floor_log_gate_marks_positive_gates_where_asked():
    """The glue's floor: -inf and anything below LOG_GATE_FLOOR raised to it, NaN kept; with
    ``mark_positive`` (the Mosaic backends, whose final states then mark the bad gate for
    the guard) a positive log-gate, +inf included, becomes NaN, and NaN stays NaN without
    relying on max's NaN rule; 0 is a valid gate (no decay)."""
    from linearnexus.kernels.common.pallas_ops import LOG_GATE_FLOOR, floor_log_gate

    g = jnp.array([-jnp.inf, 2 * LOG_GATE_FLOOR, -1.0, 0.0, 0.5, jnp.inf, jnp.nan])
    floor = LOG_GATE_FLOOR
    np.testing.assert_array_equal(np.asarray(floor_log_gate(g)),
                                  np.array([floor, floor, -1, 0, 0.5, np.inf, np.nan], np.float32))
    np.testing.assert_array_equal(np.asarray(floor_log_gate(g, mark_positive=True)),
                                  np.array([floor, floor, -1, 0, np.nan, np.nan, np.nan],
                                           np.float32))
    # the gradient: the mark is a constant, so a valid gate's is the plain floor's, and the
    # api guard's NaN cotangent after bad inputs reaches every entry, the bad gates' too (a
    # where would have given them a finite zero)
    _, plain_vjp = jax.vjp(floor_log_gate, g)
    _, marked_vjp = jax.vjp(lambda x: floor_log_gate(x, mark_positive=True), g)
    ones = jnp.ones_like(g)
    np.testing.assert_array_equal(np.asarray(marked_vjp(ones)[0])[:4],
                                  np.asarray(plain_vjp(ones)[0])[:4])
    np.testing.assert_array_equal(np.asarray(marked_vjp(ones)[0])[:4], [0, 0, 1, 1])
    assert np.isnan(np.asarray(marked_vjp(ones * jnp.nan)[0])).all()


@pytest.mark.parametrize("marks", [True, False])
def test_api_guard_follows_the_backend_that_marks_outputs(marks, key, monkeypatch):
    """Through simple_gla's api: a backend whose ``final_marks_bad_inputs`` is set has its
    output's finiteness left unread by the guard, in the forward and under ``jax.grad``
    (where the fast run is traced inside ``jax.vjp``). A stand-in that leaks a bad q's NaN
    into every output while its state stays finite is returned as it is and its gradient
    stays finite; unmarked, the guard catches it (the bad step's output NaN only, every
    gradient NaN). The shipped mosaic backends mark (their walks do), the Triton ones not."""
    from linearnexus.kernels.delta_rule.api import BACKENDS as DELTA
    from linearnexus.kernels.gated_delta_rule.api import BACKENDS as GATED
    from linearnexus.kernels.gla.api import BACKENDS as GLA
    from linearnexus.kernels.simple_gla.api import BACKENDS, simple_gla

    assert all(b["mosaic"].final_marks_bad_inputs for b in (BACKENDS, DELTA, GATED, GLA))
    assert not any(getattr(b["pallas"], "final_marks_bad_inputs", False)
                   for b in (BACKENDS, DELTA, GATED, GLA))

    class Leaky:
        final_marks_bad_inputs = marks

        def supports(self, *, platform, dtype):
            return True

        def forward_chunk(self, q, k, v, g, *, initial_state, grid=None, **kwargs):
            leak = jnp.where(jnp.isnan(q).any(), jnp.nan, 0.0)  # every output, not the state
            return v + leak, jnp.zeros((v.shape[0], v.shape[2], q.shape[3], v.shape[3]))

        forward_recurrent = forward_chunk

    monkeypatch.setitem(BACKENDS, "leaky", Leaky())
    B, T, H, K = 1, 8, 1, 4
    q = jax.random.normal(key, (B, T, H, K))
    bad = q.at[0, 3, 0, 0].set(jnp.nan)
    g = -jnp.ones((B, T, H))

    def run(q, v):
        return simple_gla(q, v, v, g, backend="leaky", mode="chunk")[0]

    o = np.asarray(run(bad, q))
    nan_at = np.isnan(o).any(axis=(2, 3))[0]
    np.testing.assert_array_equal(nan_at, np.ones(T, bool) if marks else np.arange(T) == 3)

    def loss(v):  # the finite outputs' sum: its gradient is NaN only if the guard NaNs it
        o = run(bad, v)
        return jnp.sum(jnp.where(jnp.isnan(o), 0.0, o))

    dv = np.asarray(jax.grad(loss)(q))
    assert np.isfinite(dv).all() == marks and (np.isnan(dv).all() or marks)
