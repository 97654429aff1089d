"""GLA's Mosaic GPU walk (``kernels/gla/mosaic.py``) without a GPU: it lowers for CUDA with
its Triton preparation and backward (every JAX the Mosaic kernels take), matches the per-step
reference in JAX 0.11's Mosaic GPU interpreter, and declines what it does not cover."""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import pytest

from linearnexus.kernels.common.gpu_lowering import lower_for_gpu
from linearnexus.kernels.common.mosaic_chunk import (
    SMEM_LIMIT,
    MosaicConfig,
    gpu_interpret,
    gpu_interpret_reason,
    mosaic_unavailable_reason,
)
from linearnexus.kernels.gla import mosaic as gla_mosaic_mod
from linearnexus.kernels.gla.api import BACKEND_ORDER, BACKENDS, gla
from linearnexus.kernels.gla.mosaic import gla_mosaic
from linearnexus.kernels.gla.reference import gla_reference

REASON = mosaic_unavailable_reason()
needs_mosaic = pytest.mark.skipif(REASON is not None, reason=REASON or "")
INTERPRET_REASON = REASON or gpu_interpret_reason()


@needs_mosaic
@pytest.mark.parametrize("shape,packed", [((2, 1000, 2, 128, 128), False),
                                          ((1, 300, 2, 40, 72), True)])
def test_gla_mosaic_lowers_forward_and_backward(shape, packed, monkeypatch):
    """The forward is one Mosaic GPU kernel after the Triton ``sums`` and ``fwd_a``; the
    gradient adds GLA's six Triton backward kernels and no Triton ``fwd_h`` / ``fwd_o``
    (the walk stores the chunk states); with the Mosaic state walk (opt-in) four Triton
    backward kernels and one more Mosaic kernel."""
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")  # Triton kernels, not interpret mode
    B, T, H, K, V = shape
    qk = jax.ShapeDtypeStruct((B, T, H, K), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((B, T, H, V), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((B, T, H, K), jnp.float32)
    n = 3 if packed else B
    s0 = None if packed else jax.ShapeDtypeStruct((n, H, K, V), jnp.float32)  # packed: none
    cu = jax.ShapeDtypeStruct((n + 1,), jnp.int32) if packed else None

    def fwd(q, k, v, g, s0, cu):
        return gla_mosaic(q, k, v, g, scale=0.1, initial_state=s0, cu_seqlens=cu,
                          check_device=False)

    def loss(q, k, v, g, s0, cu):
        o, final = fwd(q, k, v, g, s0, cu)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    text = lower_for_gpu(fwd, qk, qk, v, g, s0, cu)
    assert text.count("custom_call @mosaic_gpu") == 1 and text.count("xla.gpu.triton") == 2
    grad_text = lower_for_gpu(jax.value_and_grad(loss, argnums=(0, 1, 2, 3) + (() if packed
                                                                             else (4,))),
                              qk, qk, v, g, s0, cu)
    assert grad_text.count("custom_call @mosaic_gpu") == 1
    # sums, fwd_a; bwd_dh, bwd_da, bwd_dv, bwd_dqk, bwd_dqk_walk, dg
    assert grad_text.count("xla.gpu.triton") == 8
    # the state walk on Mosaic GPU (LINEARNEXUS_MOSAIC_GLA_BWD=1): bwd_dh and bwd_dv become
    # one Mosaic kernel, at value blocks of 64 and 32, with initial states (packed rows then
    # leave each sequence's dh0 at its opening chunk)
    monkeypatch.setenv(gla_mosaic_mod.BWD_WALK_ENV, "1")
    from linearnexus.kernels.common import mosaic_bwd

    h0 = jax.ShapeDtypeStruct((n, H, K, V), jnp.float32)
    for bv32 in ("0", "1"):
        monkeypatch.setenv(mosaic_bwd.STATE_SMALL_BV_ENV, bv32)
        walk_text = lower_for_gpu(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)),
                                  qk, qk, v, g, h0, cu)
        assert walk_text.count("custom_call @mosaic_gpu") == 2
        assert walk_text.count("xla.gpu.triton") == 6


def _gla_inputs(seed: int, B: int, T: int, H: int, K: int, V: int, N: int, *,
                strong: bool = False):
    """``(q, k, v, g, s0, do, dht)``: bf16 q, k ``[B, T, H, K]`` and v ``[B, T, H, V]``,
    float32 log-gates ``[B, T, H, K]`` (half the key dims at -3 a step with ``strong``), ``N``
    initial states and final-state cotangents ``[N, H, K, V]``, output cotangents like v."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q, k, v = (jax.random.normal(kk, (B, T, H, d)).astype(jnp.bfloat16)
               for kk, d in zip(ks[:3], (K, K, V), strict=True))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, K)) + 2) / 4
    if strong:
        g = g.at[..., : K // 2].set(-3.0)
    s0 = jax.random.normal(ks[4], (N, H, K, V))
    do = jax.random.normal(ks[5], (B, T, H, V))
    dht = jax.random.normal(ks[6], (N, H, K, V))
    return q, k, v, g, s0, do, dht


@pytest.mark.skipif(INTERPRET_REASON is not None, reason=INTERPRET_REASON or "")
@pytest.mark.parametrize("case", ["dense", "packed", "strong-decay", "forward-odd-dims",
                                  "wide-values"])
def test_gla_mosaic_matches_reference_in_the_interpreter(case):
    """Forward and every gradient against the per-step reference (bf16 thresholds: outputs
    and states 5e-3, gradients 1e-2): two chunks, the last one padded, two rows, two heads
    and two value blocks (eight programs storing their states), no initial state
    (``dense``); four packed sequences of 70, 0, 30 and 64 tokens, each with its initial
    state (``packed``); half the key dims decaying by e^-3 a step, so ``fwd_a`` and the
    backward take their sub-chunk forms, with an initial state (``strong-decay``); the
    forward alone (the walk without its stored states) at head dims 40 x 72 and T = 63
    (``forward-odd-dims``); K = V = 128 in one value block of 128 (the heuristic's choice
    where that fills the GPU), with an initial state (``wide-values``)."""
    lens = (70, 0, 30, 64) if case == "packed" else None
    B, H, K, V = {"forward-odd-dims": (2, 2, 40, 72), "dense": (2, 2, 64, 128),
                  "wide-values": (1, 1, 128, 128)}.get(case, (1, 1, 64, 64))
    config = MosaicConfig(block_v=128) if case == "wide-values" else None
    with_h0 = case != "dense"
    T = sum(lens) if lens else 63 if case == "forward-odd-dims" else 100
    cu = jnp.array([0, *itertools.accumulate(lens)], jnp.int32) if lens else None
    N = len(lens) if lens else B
    q, k, v, g, s0, do, dht = _gla_inputs(7, B, T, H, K, V, N, strong=case == "strong-decay")

    def rel(a, b):
        return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))

    def mosaic(q, k, v, g, s0):
        return gla_mosaic(q, k, v, g, scale=K ** -0.5, initial_state=s0 if with_h0 else None,
                          cu_seqlens=cu, check_device=False, config=config)

    def reference(q, k, v, g, s0):
        return gla_reference(q, k, v, g, scale=K ** -0.5,
                             initial_state=s0 if with_h0 else None, cu_seqlens=cu)

    args = (q, k, v, g, s0)
    f32 = tuple(x.astype(jnp.float32) for x in args)
    if case == "forward-odd-dims":
        with gpu_interpret():
            o, final = mosaic(*args)
        with jax.default_matmul_precision("highest"):
            ro, rf = reference(*f32)
        errors = {"o": rel(o, ro), "final": rel(final, rf)}
        assert max(errors.values()) <= 5e-3, errors
        return

    def loss(fn, *args):
        o, final = fn(*args)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final * dht), (o, final)

    argnums = (1, 2, 3, 4, 5)
    with gpu_interpret():
        grads, (o, final) = jax.grad(loss, argnums, has_aux=True)(mosaic, *args)
    with jax.default_matmul_precision("highest"):
        ref_grads, (ro, rf) = jax.grad(loss, argnums, has_aux=True)(reference, *f32)
    errors = {"o": rel(o, ro), "final": rel(final, rf)}
    assert max(errors.values()) <= 5e-3, errors
    errors = {n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, ref_grads,
                                               strict=True) if with_h0 or n != "dh0"}
    assert max(errors.values()) <= 1e-2, errors


@pytest.mark.skipif(INTERPRET_REASON is not None, reason=INTERPRET_REASON or "")
@pytest.mark.parametrize("case", ["dense", "packed", "strong-decay", "wide", "value-blocks-32"])
def test_gla_mosaic_state_walk_gradient_in_the_interpreter(case, monkeypatch):
    """GLA's gradient with its state walk on Mosaic GPU (``LINEARNEXUS_MOSAIC_GLA_BWD=1``:
    ``gla_state_grad`` in place of the Triton ``bwd_dh`` and ``bwd_dv``) in JAX 0.11's
    Mosaic GPU interpreter: every gradient against the per-step reference (1e-2, bf16) and
    within 1.1x the Triton backward's error plus 1e-4 (the same roundings, in another
    order), outputs unchanged. Two rows, two heads, K = 64, V = 128 (two value
    blocks), T = 100, initial states (``dense``); four packed sequences of 70, 0, 30 and 64
    tokens with their initial states (``packed``); half the key dims decaying by e^-3 a step
    (``strong-decay``); K = V = 128, T = 130 (``wide``); the walk at value blocks of 32
    (``value-blocks-32``)."""
    from linearnexus.kernels.common import mosaic_bwd

    lens = (70, 0, 30, 64) if case == "packed" else None
    B, H, K, V = {"dense": (2, 2, 64, 128), "wide": (1, 1, 128, 128),
                  "value-blocks-32": (1, 1, 64, 128)}.get(case, (1, 1, 64, 64))
    T = sum(lens) if lens else 130 if case == "wide" else 100
    cu = jnp.array([0, *itertools.accumulate(lens)], jnp.int32) if lens else None
    N = len(lens) if lens else B
    if case == "value-blocks-32":  # the small-grid rule on a 2-chunk walk
        monkeypatch.setattr(mosaic_bwd, "STATE_SMALL_MIN_CHUNKS", 1)
        monkeypatch.setenv(mosaic_bwd.STATE_SMALL_BV_ENV, "1")
        assert mosaic_bwd.state_block_v(rows=B, heads=H, value_dim=V, n_chunks=2) == 32
    else:
        monkeypatch.setenv(mosaic_bwd.STATE_SMALL_BV_ENV, "0")
    q, k, v, g, s0, do, dht = _gla_inputs(11, B, T, H, K, V, N, strong=case == "strong-decay")
    walks = []
    original = gla_mosaic_mod.gla_state_grad

    def spy(*a, **kw):
        walks.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(gla_mosaic_mod, "gla_state_grad", spy)

    def rel(a, b):
        return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))

    def loss(fn, *args):
        o, final = fn(*args)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final * dht), (o, final)

    def mosaic(q, k, v, g, s0):
        return gla_mosaic(q, k, v, g, scale=K ** -0.5, initial_state=s0, cu_seqlens=cu,
                          check_device=False)

    args = (q, k, v, g, s0)
    argnums = (1, 2, 3, 4, 5)
    got = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(gla_mosaic_mod.BWD_WALK_ENV, flag)
        with gpu_interpret():
            got[flag] = jax.grad(loss, argnums, has_aux=True)(
                lambda *a: mosaic(*a), *args)
    assert len(walks) == 1  # the Mosaic walk ran with the switch on only
    with jax.default_matmul_precision("highest"):
        ref_grads, _ = jax.grad(loss, argnums, has_aux=True)(
            lambda q, k, v, g, s0: gla_reference(q, k, v, g, scale=K ** -0.5, initial_state=s0,
                                                 cu_seqlens=cu),
            *(x.astype(jnp.float32) for x in args))
    (grads, outs), (tri_grads, tri_outs) = got["1"], got["0"]
    for a, b in zip(outs, tri_outs, strict=True):  # the forward is the same either way
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) == 0.0
    for name, a, t, ref in zip(("dq", "dk", "dv", "dg", "dh0"), grads, tri_grads, ref_grads,
                               strict=True):
        err, tri_err = rel(a, ref), rel(t, ref)
        assert err <= 1e-2 and err <= 1.1 * tri_err + 1e-4, (name, err, tri_err)


def test_gla_mosaic_dispatch_and_declines_what_it_does_not_cover(monkeypatch):
    """Automatic dispatch takes GLA's mosaic backend first on a GPU for bf16 (float32 stays
    with pallas) unless LINEARNEXUS_MOSAIC_GLA=0; calls it does not cover raise
    NotImplementedError, configs it does not take a ValueError naming config; the
    heuristic's config always fits shared memory."""
    from linearnexus.kernels.base import dispatch

    def chosen(dtype):
        return dispatch("gla", BACKENDS, BACKEND_ORDER, lambda k: k.name, backend=None,
                        dtype=dtype, platform="gpu")

    assert BACKEND_ORDER[0] == "mosaic"
    monkeypatch.setenv(gla_mosaic_mod.OPT_IN_ENV, "0")
    assert chosen(jnp.bfloat16) == "pallas"
    assert BACKENDS["mosaic"].by_name_dtypes  # the feature table: by name only
    for flag in ("1", ""):  # on, and the default
        monkeypatch.setenv(gla_mosaic_mod.OPT_IN_ENV, flag)
        assert chosen(jnp.bfloat16) == "mosaic" and chosen(jnp.float32) == "pallas"
        assert BACKENDS["mosaic"].by_name_dtypes is None
    q = jnp.ones((1, 8, 1, 64), jnp.bfloat16)
    g = -jnp.ones((1, 8, 1, 64), jnp.float32)
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="compute capability"):
            gla(q, q, q, g, backend="mosaic", mode="chunk")
    with pytest.raises(NotImplementedError, match="chunk_size 128"):
        gla_mosaic(q, q, q, g, scale=1.0, chunk_size=128, check_device=False)
    with pytest.raises(NotImplementedError, match="float32"):
        gla_mosaic(q.astype(jnp.float32), q, q, g, scale=1.0, check_device=False)
    with pytest.raises(NotImplementedError, match="key dim"):
        wide = jnp.ones((1, 8, 1, 256), jnp.bfloat16)
        gla_mosaic(wide, wide, q, -jnp.ones(wide.shape, jnp.float32), scale=1.0,
                   check_device=False)
    q128 = jnp.ones((1, 8, 1, 128), jnp.bfloat16)
    g128 = -jnp.ones(q128.shape, jnp.float32)
    for config, match in ((MosaicConfig(backward="mosaic"), "backward='mosaic'"),
                          (MosaicConfig(dqk_stages=2), "dqk_stages"),
                          (MosaicConfig(stages=4), "stages=4"),
                          (MosaicConfig(bwd_stages=3), "bwd_stages=3")):
        with pytest.raises(ValueError, match=f"config.*{re.escape(match)}"):
            gla_mosaic(q128, q128, q128, g128, scale=1.0, config=config, check_device=False)
    # a call's own block_v: the heuristic sizes the stages for it (no refusal of a depth the
    # caller never asked for)
    jax.eval_shape(lambda q, g: gla_mosaic(q, q, q, g, scale=1.0, check_device=False,
                                           config=MosaicConfig(block_v=128)),
                   jnp.ones((1, 640, 1, 128), jnp.bfloat16), -jnp.ones((1, 640, 1, 128)))
    for K, V, n_chunks, packed in itertools.product((64, 128), (64, 128, 256), (1, 64),
                                                    (False, True)):
        cfg = gla_mosaic_mod.default_gla_config(rows=8, heads=16, key_dim=K, value_dim=V,
                                                n_chunks=n_chunks, packed=packed)
        gla_mosaic_mod.check_gla_config(cfg, key_dim=K, value_dim=V, packed=packed)
        assert gla_mosaic_mod.gla_smem_bytes(key_dim=K, block_v=cfg.block_v, stages=cfg.stages,
                                             packed=packed) <= SMEM_LIMIT
    # every config the check accepts fits shared memory in both walks: the plain forward at
    # its stages, and under a gradient (storing the states) at the depth the walk resolves
    for K, block_v, stages, packed in itertools.product((64, 128), (64, 128), (1, 2, 3, 4),
                                                        (False, True)):
        cfg = MosaicConfig(chunk=64, block_v=block_v, stages=stages, backward="pallas")
        try:
            gla_mosaic_mod.check_gla_config(cfg, key_dim=K, value_dim=128, packed=packed)
        except ValueError:
            continue
        depth = gla_mosaic_mod.gradient_stages(cfg, key_dim=K, packed=packed)
        assert gla_mosaic_mod.gla_smem_bytes(key_dim=K, block_v=block_v, stages=depth,
                                             store_states=True, packed=packed) <= SMEM_LIMIT
    # K = 128, block_v = 128, packed: one stage storing the states fits (two do not)
    assert gla_mosaic_mod.gradient_stages(MosaicConfig(block_v=128), key_dim=128,
                                          packed=True) == 1
    # the heuristic's choices (measured on an H100): value blocks of 128 where that still
    # fills ~the SMs, else 64; the storing walk at one stage unless the grid leaves more
    # than half the SMs free, then at two
    pick = functools.partial(gla_mosaic_mod.default_gla_config, key_dim=128, value_dim=128,
                             n_chunks=64)
    assert (pick(rows=8, heads=16).block_v, pick(rows=8, heads=16).stages) == (128, 2)
    assert pick(rows=2, heads=16).block_v == 64 and pick(rows=8, heads=16).bwd_stages == 1
    assert pick(rows=2, heads=16).bwd_stages == 2  # 64 programs for 132 SMs
    assert pick(rows=2, heads=16, packed=True).bwd_stages in (1, 2)
    for rows, heads in ((1, 1), (2, 16), (4, 16), (8, 16), (1, 96)):
        for packed in (False, True):
            cfg = pick(rows=rows, heads=heads, packed=packed)
            gla_mosaic_mod.check_gla_config(cfg, key_dim=128, value_dim=128, packed=packed)
    assert pick(rows=1, heads=16, value_dim=64).block_v == 64
    assert pick(rows=8, heads=16, key_dim=64).block_v == 64  # K = 64: not timed at 128
    assert pick(rows=8, heads=16, stages=3).block_v == 64  # three stages fit only at 64
