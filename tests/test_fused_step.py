"""The fused one-token step kernel (``kernels/common/pallas_step.py``, backend
``"pallas_step"``; interpret mode on the CPU) against the per-step reference, with the
input guard folded in, and its dispatch (picked for T == 1 only where compiled)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linearnexus.kernels.common import pallas_step
from linearnexus.kernels.common.backends import step_kernel
from linearnexus.kernels.delta_rule import delta_rule
from linearnexus.kernels.delta_rule.reference import delta_rule_step
from linearnexus.kernels.gated_delta_rule import gated_delta_rule
from linearnexus.kernels.gated_delta_rule.api import BACKEND_ORDER as GDN_ORDER
from linearnexus.kernels.gated_delta_rule.api import BACKENDS as GDN_BACKENDS
from linearnexus.kernels.gated_delta_rule.reference import gated_delta_rule_step
from linearnexus.kernels.gla import gla
from linearnexus.kernels.gla.reference import gla_step
from linearnexus.kernels.simple_gla import simple_gla
from linearnexus.kernels.simple_gla.reference import simple_gla_step


def _inputs(key, op, batch, heads, key_dim, value_dim, dtype):
    ks = jax.random.split(key, 7)
    q = jax.random.normal(ks[0], (batch, 1, heads, key_dim))
    k = jax.random.normal(ks[1], (batch, 1, heads, key_dim))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (batch, 1, heads, value_dim))
    g_scalar = -jax.nn.softplus(jax.random.normal(ks[3], (batch, 1, heads)))
    g_vector = -jax.nn.softplus(jax.random.normal(ks[4], (batch, 1, heads, key_dim)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[5], (batch, 1, heads)))
    h0 = jax.random.normal(ks[6], (batch, heads, key_dim, value_dim))
    gates = {"simple_gla": (g_scalar,), "gla": (g_vector,), "delta_rule": (beta,),
             "gated_delta_rule": (g_scalar, beta)}[op]
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype)), gates, h0


OPS = {"simple_gla": simple_gla, "gla": gla, "delta_rule": delta_rule,
       "gated_delta_rule": gated_delta_rule}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# (batch, heads, K, V, with initial state, dtype): head dims that are not powers of two
# (12 / 10, padded in the glue) and the real models' (64 / 128), batch 1 and > 1
CASES = [(1, 2, 12, 10, False, jnp.float32), (2, 1, 64, 128, True, jnp.bfloat16)]


STEPS = {"simple_gla": simple_gla_step, "gla": gla_step, "delta_rule": delta_rule_step,
         "gated_delta_rule": gated_delta_rule_step}


@pytest.mark.parametrize("op", sorted(OPS))
def test_fused_step_matches_reference(op, key):
    """Against the op's reference step (``reference.py``'s ``*_step``: the per-step truth's
    one-token update) in float32 on the same (rounded) inputs."""
    for batch, heads, key_dim, value_dim, with_state, dtype in CASES:
        (q, k, v), gates, h0 = _inputs(key, op, batch, heads, key_dim, value_dim, dtype)
        o, s = OPS[op](q, k, v, *gates, initial_state=h0 if with_state else None,
                       output_final_state=True, backend="pallas_step")
        start = h0 if with_state else jnp.zeros_like(h0)
        s_ref, o_ref = STEPS[op](start, *(x[:, 0].astype(jnp.float32) for x in (q, k, v, *gates)),
                                 scale=key_dim ** -0.5)
        tol = 1e-5 if dtype == jnp.float32 else 5e-3
        assert o.dtype == dtype and o.shape == (batch, 1, heads, value_dim)
        assert s.dtype == jnp.float32 and s.shape == (batch, heads, key_dim, value_dim)
        assert _rel(o[:, 0], o_ref) < tol, (op, batch, key_dim, _rel(o[:, 0], o_ref))
        assert _rel(s, s_ref) < tol, (op, batch, key_dim, _rel(s, s_ref))


def test_fused_step_marks_bad_inputs_as_the_guard_does(key):
    """Folded guard: a NaN in k marks that head's output and final state; a NaN in q that
    head's output only; a positive log-gate as a NaN; other heads are untouched and equal
    the reference."""
    (q, k, v), (g, beta), h0 = _inputs(key, "gated_delta_rule", 2, 3, 12, 10, jnp.float32)
    q = q.at[0, 0, 1, 3].set(jnp.nan)
    k = k.at[1, 0, 0, 2].set(jnp.nan)
    g = g.at[1, 0, 2].set(0.5)

    def run(backend, *args):  # jit: a traced positive gate is marked, a concrete one raises
        return gated_delta_rule(*args, initial_state=h0, output_final_state=True,
                                backend=backend, mode="recurrent")

    o, s = jax.jit(lambda *a: run("pallas_step", *a))(q, k, v, g, beta)
    o_ref, s_ref = jax.jit(lambda *a: run("jax", *a))(q, k, v, g, beta)
    o, s, o_ref, s_ref = map(np.asarray, (o, s, o_ref, s_ref))
    bad_o = {(0, 1), (1, 0), (1, 2)}
    bad_s = {(1, 0), (1, 2)}
    for b in range(2):
        for h in range(3):
            assert np.isnan(o[b, 0, h]).all() == ((b, h) in bad_o), (b, h)
            assert np.isnan(s[b, h]).all() == ((b, h) in bad_s), (b, h)
            if (b, h) not in bad_o:
                np.testing.assert_allclose(o[b, 0, h], o_ref[b, 0, h], rtol=1e-5, atol=1e-6)
            if (b, h) not in bad_s:
                np.testing.assert_allclose(s[b, h], s_ref[b, h], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.isnan(o), np.isnan(o_ref))
    np.testing.assert_array_equal(np.isnan(s), np.isnan(s_ref))


def test_fused_step_gradients_are_the_recurrent_forms(key):
    (q, k, v), (g,), h0 = _inputs(key, "simple_gla", 2, 2, 12, 10, jnp.float32)

    def loss(backend, q, k, v, g, h0):
        o, s = simple_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                          backend=backend, mode="recurrent")
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * s)

    grads = {b: jax.jit(jax.grad(lambda *a, b=b: loss(b, *a), argnums=(0, 1, 2, 3, 4)))(
        q, k, v, g, h0) for b in ("pallas_step", "jax")}
    got, want = grads["pallas_step"], grads["jax"]
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) < 1e-5


def test_fused_step_dispatch(monkeypatch, key):
    """Named ``pallas_step`` refuses T != 1; the automatic choice takes the fused step only
    where the kernels compile (a GPU), and ``LINEARNEXUS_FUSED_STEP=0`` turns it off."""
    (q, k, v), gates, _ = _inputs(key, "gated_delta_rule", 1, 2, 12, 10, jnp.float32)
    two = [jnp.concatenate([x, x], axis=1) for x in (q, k, v, *gates)]
    with pytest.raises(NotImplementedError, match="pallas_step.*T == 1"):
        gated_delta_rule(*two, backend="pallas_step", mode="recurrent")
    pallas = GDN_BACKENDS["pallas"]
    if pallas_step.interpret_mode():  # the CPU: the automatic choice is the pure-JAX form
        assert step_kernel(GDN_BACKENDS, GDN_ORDER, None, jnp.float32) is None
    monkeypatch.setattr(pallas_step, "interpret_mode", lambda: False)
    import linearnexus.kernels.common.pallas_ops as ops

    monkeypatch.setattr(ops, "interpret_mode", lambda: False)
    monkeypatch.setattr("linearnexus.kernels.common.backends.current_platform", lambda: "gpu")
    # gated_delta_rule tries mosaic first on a GPU (it runs the same fused step) unless
    # LINEARNEXUS_MOSAIC_GDN=0 keeps it out; then pallas does
    from linearnexus.kernels.common import mosaic_delta

    monkeypatch.setenv(mosaic_delta.OPT_IN_ENV, "0")
    assert step_kernel(GDN_BACKENDS, GDN_ORDER, None, jnp.bfloat16) is pallas
    monkeypatch.setenv(mosaic_delta.OPT_IN_ENV, "1")
    assert step_kernel(GDN_BACKENDS, GDN_ORDER, None, jnp.bfloat16) is GDN_BACKENDS["mosaic"]
    monkeypatch.delenv(mosaic_delta.OPT_IN_ENV)
    assert step_kernel(GDN_BACKENDS, GDN_ORDER, None, jnp.bfloat16) is (
        GDN_BACKENDS["mosaic"] if mosaic_delta.AUTOMATIC else pallas)
    assert step_kernel(GDN_BACKENDS, GDN_ORDER[1:], None, jnp.bfloat16) is pallas
    from linearnexus.kernels.simple_gla.api import BACKEND_ORDER, BACKENDS

    assert step_kernel(BACKENDS, BACKEND_ORDER, None, jnp.bfloat16) is BACKENDS["mosaic"]
    assert step_kernel(GDN_BACKENDS, GDN_ORDER, None, jnp.float64) is None
    assert step_kernel(GDN_BACKENDS, GDN_ORDER, "jax", jnp.bfloat16) is None
    monkeypatch.setenv(pallas_step.FUSED_STEP_ENV, "0")
    assert step_kernel(GDN_BACKENDS, GDN_ORDER, None, jnp.bfloat16) is None
    assert step_kernel(GDN_BACKENDS, GDN_ORDER, "pallas_step", jnp.bfloat16) is not None


@pytest.mark.parametrize("batch,channels,n_state,with_state,dtype",
                         [(1, 24, 12, False, jnp.float32), (2, 64, 16, True, jnp.bfloat16)])
def test_selective_scan_step_matches_reference(batch, channels, n_state, with_state, dtype, key):
    from linearnexus.kernels.mamba import selective_scan
    from linearnexus.kernels.mamba.reference import apply_skip_and_gate, selective_state_update

    ks = jax.random.split(key, 8)
    x = jax.random.normal(ks[0], (batch, 1, channels)).astype(dtype)
    dt = jax.random.normal(ks[1], (batch, 1, channels)).astype(dtype)
    A = -jnp.exp(jax.random.normal(ks[2], (channels, n_state)))
    B = jax.random.normal(ks[3], (batch, 1, n_state)).astype(dtype)
    C = jax.random.normal(ks[4], (batch, 1, n_state)).astype(dtype)
    D = jax.random.normal(ks[5], (channels,))
    z = jax.random.normal(ks[6], (batch, 1, channels)).astype(dtype)
    h0 = jax.random.normal(ks[7], (batch, channels, n_state)) if with_state else None
    bias = jnp.linspace(-1.0, 1.0, channels)
    kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True, initial_state=h0,
              output_final_state=True, mode="recurrent")
    y, s = selective_scan(x, dt, A, B, C, backend="pallas_step", **kw)
    # the reference step on the same (rounded) inputs in float32
    x32, z32 = x[:, 0].astype(jnp.float32), z[:, 0].astype(jnp.float32)
    step = jax.nn.softplus(dt[:, 0].astype(jnp.float32) + bias)
    start = h0 if with_state else jnp.zeros((batch, channels, n_state))
    s_ref, y_ref = selective_state_update(start, x32, step, A, B[:, 0].astype(jnp.float32),
                                          C[:, 0].astype(jnp.float32))
    y_ref = apply_skip_and_gate(y_ref, x32, D, z32)[:, None]
    tol = 1e-5 if dtype == jnp.float32 else 5e-3
    assert y.dtype == dtype and y.shape == (batch, 1, channels)
    assert s.shape == (batch, channels, n_state) and s.dtype == jnp.float32
    assert _rel(y, y_ref) < tol and _rel(s, s_ref) < tol
    with pytest.raises(NotImplementedError, match="T == 1"):
        selective_scan(*(jnp.concatenate([a, a], 1) for a in (x, dt)), A,
                       *(jnp.concatenate([a, a], 1) for a in (B, C)), backend="pallas_step")


@pytest.mark.parametrize("batch,channels,width,bias,dtype",
                         [(1, 24, 4, True, jnp.float32), (2, 512, 4, False, jnp.bfloat16),
                          (2, 40, 2, False, jnp.float32)])
def test_conv_step_matches_reference(batch, channels, width, bias, dtype, key):
    """The short conv's rolling-cache step: output and shifted cache as the pure-JAX conv's
    (channel counts with and without a power-of-two block: 24 and 40 are padded)."""
    from linearnexus.kernels.conv import conv_step

    ks = jax.random.split(key, 4)
    x = jax.random.normal(ks[0], (batch, 1, channels)).astype(dtype)
    cache = jax.random.normal(ks[1], (batch, width - 1, channels)).astype(dtype)
    weight = jax.random.normal(ks[2], (width, channels))
    b = jax.random.normal(ks[3], (channels,)) if bias else None
    y, new = conv_step(x, cache, weight, b, backend="pallas_step")
    y_ref, new_ref = conv_step(x.astype(jnp.float32), cache.astype(jnp.float32), weight, b,
                               backend="jax")
    tol = 1e-5 if dtype == jnp.float32 else 5e-3
    assert y.dtype == dtype and new.dtype == dtype and new.shape == cache.shape
    assert _rel(y, y_ref) < tol
    np.testing.assert_array_equal(np.asarray(new, np.float32), np.asarray(new_ref, np.float32))
    with pytest.raises(ValueError, match="cache: expected shape"):
        conv_step(x, jnp.concatenate([cache, cache], axis=1), weight, b)
