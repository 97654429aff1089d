"""Context-parallel ops (``linearnexus.parallel.context``) equal the single-device op.

Outputs, final states and the gradient of every input (initial state included), float32 at
1e-5, for every chunked op, on a mesh whose ``context`` axis cuts the sequence into slices
of 4 tokens: packed sequences (``cu_seqlens``) cross several device boundaries, and a
batched case splits the batch over ``data`` at the same time. Head sizes are not powers of
two; chunk sizes do not divide the slices, so chunks straddle nothing by construction.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linearnexus.kernels.delta_rule import delta_rule
from linearnexus.kernels.gated_delta_rule import gated_delta_rule
from linearnexus.kernels.gla import gla
from linearnexus.kernels.mamba import selective_scan
from linearnexus.kernels.retention import retention
from linearnexus.kernels.simple_gla import simple_gla
from linearnexus.kernels.ssd import ssd
from linearnexus.parallel import make_mesh
from linearnexus.parallel.context import collective_bytes, context_parallel, summary_bytes
from tests.helpers.parity import assert_close

T = 32
CU = np.array([0, 3, 13, 29, 32], np.int32)  # 4 sequences; slices of 4 tokens on context=8
H, K, V = 2, 5, 6


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _linear_case(name: str, rng, batch: int, n_states: int):
    q, k, v = _normal(rng, batch, T, H, K), _normal(rng, batch, T, H, K), _normal(rng, batch, T, H, V)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # the delta rules expect unit keys
    g_head = jnp.asarray(-0.3 * rng.random((batch, T, H)), jnp.float32)
    g_key = jnp.asarray(-0.3 * rng.random((batch, T, H, K)), jnp.float32)
    beta = jnp.asarray(rng.random((batch, T, H)), jnp.float32)
    s0 = _normal(rng, n_states, H, K, V)
    ops = {
        "simple_gla": (lambda q, k, v, g, s, **kw: simple_gla(q, k, v, g, initial_state=s, **kw),
                       (q, k, v, g_head, s0)),
        "gla": (lambda q, k, v, g, s, **kw: gla(q, k, v, g, initial_state=s, **kw),
                (q, k, v, g_key, s0)),
        "delta_rule": (lambda q, k, v, b, s, **kw: delta_rule(q, k, v, b, initial_state=s, **kw),
                       (q, k, v, beta, s0)),
        "gated_delta_rule": (
            lambda q, k, v, g, b, s, **kw: gated_delta_rule(q, k, v, g, b, initial_state=s, **kw),
            (q, k, v, g_head, beta, s0)),
        "retention": (lambda q, k, v, s, **kw: retention(q, k, v, initial_state=s, **kw),
                      (q, k, v, s0)),
    }
    return ops[name]


def _ssd_case(rng, batch: int, n_states: int):
    groups, n, p = 1, 3, 6
    args = (_normal(rng, batch, T, H, p), _normal(rng, batch, T, H),
            -jnp.asarray(rng.random(H) + 0.5, jnp.float32), _normal(rng, batch, T, groups, n),
            _normal(rng, batch, T, groups, n), _normal(rng, H), _normal(rng, n_states, H, n, p))

    def fn(x, dt, A, B, C, D, s, **kw):
        return ssd(x, dt, A, B, C, D=D, dt_softplus=True, initial_state=s, **kw)
    return fn, args


def _scan_case(rng, batch: int, n_states: int):
    c, n = 6, 3
    args = (_normal(rng, batch, T, c), _normal(rng, batch, T, c),
            -jnp.asarray(rng.random((c, n)) + 0.5, jnp.float32), _normal(rng, batch, T, n),
            _normal(rng, batch, T, n), _normal(rng, c), _normal(rng, batch, T, c), _normal(rng, c),
            _normal(rng, n_states, c, n))

    def fn(x, dt, A, B, C, D, z, dt_bias, s, **kw):
        return selective_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                              initial_state=s, **kw)
    return fn, args


def _case(name: str, rng, batch: int, n_states: int):
    if name == "ssd":
        return _ssd_case(rng, batch, n_states)
    if name == "selective_scan":
        return _scan_case(rng, batch, n_states)
    return _linear_case(name, rng, batch, n_states)


def _value_and_grads(fn, args, cu, weights, mesh=None):
    """(o, final, grads of every input) of ``sum(o * w_o) + sum(final * w_s)``; a fresh
    jitted function each call, traced inside ``context_parallel`` when a mesh is given."""
    def loss(*a):
        o, s = fn(*a, output_final_state=True, cu_seqlens=cu, chunk_size=3)
        return jnp.sum(o * weights[0]) + jnp.sum(s * weights[1]), (o, s)

    run = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))
    if mesh is None:
        (_, (o, s)), grads = run(*args)
    else:
        with context_parallel(mesh):
            (_, (o, s)), grads = run(*args)
    return o, s, grads


OPS = ("simple_gla", "gla", "delta_rule", "gated_delta_rule", "retention", "ssd",
       "selective_scan")


@pytest.mark.parametrize("layout", ["packed", "batched"])
@pytest.mark.parametrize("name", OPS)
def test_context_parallel_op_equals_one_device(name, layout):
    rng = np.random.default_rng(zlib.crc32(f"{name}-{layout}".encode()))
    if layout == "packed":  # B = 1, sequences crossing the 4-token slices of context=8
        mesh, batch, cu, n_states = make_mesh("context=8"), 1, jnp.asarray(CU), len(CU) - 1
    else:  # batch over data, sequence over context
        mesh, batch, cu, n_states = make_mesh("data=2,context=4"), 2, None, 2
    fn, args = _case(name, rng, batch, n_states)
    shapes = jax.eval_shape(lambda *a: fn(*a, output_final_state=True, cu_seqlens=cu), *args)
    weights = (_normal(rng, *shapes[0].shape), _normal(rng, *shapes[1].shape))
    o_ref, s_ref, g_ref = _value_and_grads(fn, args, cu, weights)
    o_cp, s_cp, g_cp = _value_and_grads(fn, args, cu, weights, mesh)
    assert_close(o_cp, o_ref, 1e-5, f"{name} output")
    assert_close(s_cp, s_ref, 1e-5, f"{name} final state")
    for i, (a, b) in enumerate(zip(g_cp, g_ref, strict=True)):
        assert_close(a, b, 1e-5, f"{name} gradient of input {i}")


def test_op_hook_leaves_unsplittable_lengths_alone():
    """A length the context axis does not divide runs unsplit (same result)."""
    rng = np.random.default_rng(1)
    q, k, v = _normal(rng, 1, 5, H, K), _normal(rng, 1, 5, H, K), _normal(rng, 1, 5, H, V)
    ref = jax.jit(lambda *a: simple_gla(*a))(q, k, v)[0]
    with context_parallel(make_mesh("context=8")):
        out = jax.jit(lambda *a: simple_gla(*a))(q, k, v)[0]
    assert_close(out, ref, 1e-6, "unsplit output")


def test_communication_does_not_grow_with_length():
    """The compiled program's collectives move the same bytes at T = 32 and T = 128, and
    the summary all-gather carries what ``summary_bytes`` says (P summaries received)."""
    mesh = make_mesh("context=8")
    fn, args = _case("gla", np.random.default_rng(2), 1, 4)
    sizes = []
    for reps in (1, 4):
        big = tuple(jnp.concatenate([a] * reps, 1) if a.ndim == 4 and a.shape[1] == T else a
                    for a in args)
        cu = jnp.asarray(CU * reps)
        with context_parallel(mesh):
            hlo = jax.jit(lambda *a, cu=cu: fn(*a, output_final_state=True, cu_seqlens=cu)
                          ).lower(*big).compile().as_text()
        sizes.append(collective_bytes(hlo))
    assert sizes[0] == sizes[1]
    # all-gather results hold all P summaries (M and B), the device's own included
    per_device = summary_bytes("gla", parts=8, n_states=4, heads=H, key_dim=K, value_dim=V)
    assert sizes[0]["all-gather"] == per_device * 8 // 7
