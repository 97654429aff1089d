"""The Mosaic GPU kernels lower for CUDA on a machine without a GPU (CI's check of them).

Numerics need an sm_90 GPU (benchmarks/kernels_gpu.py --backends mosaic, docs/mosaic.md);
here each kernel is traced and lowered to the Mosaic GPU dialect with
``kernels.common.gpu_lowering.lower_for_gpu`` (``lowering_platforms=("cuda",)`` under an
abstract H200, which JAX 0.11 needs for the Triton backward), which runs the whole Pallas
Mosaic GPU lowering (layouts, wgmma shapes, shared-memory budget) short of PTX. Skips, with
the reason, when the installed JAX's Mosaic GPU lacks an API the kernels use.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linearnexus.kernels.common import mosaic_bwd, mosaic_delta, mosaic_ops
from linearnexus.kernels.common.gpu_lowering import lower_for_gpu
from linearnexus.kernels.common.mosaic_chunk import (
    LOWER_ONCE_ENV,
    SMEM_LIMIT,
    MosaicConfig,
    MosaicStatic,
    default_mosaic_config,
    gpu_interpret,
    gpu_interpret_reason,
    mosaic_backward_fits,
    mosaic_unavailable_reason,
    smem_bytes,
)
from linearnexus.kernels.common.mosaic_ops import (
    PACKED_ENV,
    default_seq_split,
    delta_rule_mosaic,
    linear_attention_mosaic,
)
from linearnexus.kernels.gated_delta_rule.reference import gated_delta_rule_reference
from linearnexus.kernels.simple_gla.api import BACKENDS, simple_gla
from linearnexus.kernels.simple_gla.reference import simple_gla_reference

REASON = mosaic_unavailable_reason()
needs_mosaic = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def _lower(fn, *specs):
    # under an abstract H200: JAX 0.11's Triton lowering (the backward) asks for the device
    return lower_for_gpu(fn, *specs)


def _specs(B, T, H, K, V, h0):
    qk = jax.ShapeDtypeStruct((B, T, H, K), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((B, T, H, V), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((B, T, H), jnp.float32)
    s0 = jax.ShapeDtypeStruct((B, H, K, V), jnp.float32) if h0 else None
    return qk, qk, v, g, s0


@needs_mosaic
@pytest.mark.parametrize("shape,h0,config", [
    # T not a multiple of the chunk, the benchmark's K = V; the default: Mosaic backward
    ((2, 1000, 2, 128, 128), True, None),
    # odd head dims, padded; the Triton backward
    ((1, 63, 3, 40, 72), False, MosaicConfig(block_v=64, stages=3, backward="pallas")),
    # one pipeline stage in all three kernels, K = V = 64
    ((1, 130, 2, 64, 64), True, MosaicConfig(stages=1, bwd_stages=1, dqk_stages=1)),
    # chunks of 128 with few programs: the heuristic's stages fit shared memory (no error)
    ((1, 1100, 2, 128, 128), True, MosaicConfig(chunk=128)),
    # value blocks of 32 (every wgmma operand at a 64-byte swizzle), the Mosaic backward
    ((2, 1000, 2, 128, 128), True, MosaicConfig(block_v=32)),
    # each row walked as four segments from their entering states (four times the rows)
    ((2, 1000, 2, 128, 128), True, MosaicConfig(seq_split=4)),
    # a walk of 128 chunks on 4 programs: the heuristic splits the walk in two, and its
    # gradient
    ((1, 8192, 2, 64, 64), False, None),
    # the gradient split too: the segments' states forward and their gradients in reverse
    ((2, 1000, 2, 128, 128), True, MosaicConfig(seq_split=2, seq_split_grad=True)),
    # the split forward with one walk's gradient
    ((2, 1000, 2, 128, 128), True, MosaicConfig(seq_split=2, seq_split_grad=False)),
])
def test_simple_gla_mosaic_lowers_forward_and_backward(shape, h0, config, monkeypatch):
    """Forward (the Mosaic GPU kernel) and its gradient lower for CUDA: with the Mosaic
    backward, three Mosaic GPU kernels (forward storing the chunk states, the reverse walk,
    dq / dk) and no Triton; with ``backward="pallas"``, the Triton backward kernels. A
    sequence split (asked, or the heuristic's on a long walk of few programs) adds the
    Triton kernel of the segments' states to the plain forward, and that kernel and its
    reverse to the gradient (the segments' own backward), unless ``seq_split_grad=False``
    (then the whole walk runs under a gradient)."""
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")  # Triton kernels, not interpret mode
    monkeypatch.delenv(mosaic_ops.SPLIT_GRAD_ENV, raising=False)

    def fwd(q, k, v, g, s0):
        return linear_attention_mosaic(q, k, v, g, scale=0.1, initial_state=s0, config=config,
                                       check_device=False)

    def loss(q, k, v, g, s0):
        o, final = fwd(q, k, v, g, s0)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    specs = _specs(*shape, h0)
    text = _lower(fwd, *specs)
    assert text.count("custom_call @mosaic_gpu") == 1
    B, T, H, K, V = shape
    chunk = (config.chunk if config is not None else None) or 64
    split = (config.seq_split if config is not None and config.seq_split is not None
             else default_seq_split(rows=B, heads=H, value_dim=V, n_chunks=-(-T // chunk),
                                    chunk=chunk,
                                    block_v=None if config is None else config.block_v))
    assert ("xla.gpu.triton" in text) == (split > 1)
    grad_text = _lower(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4) if h0 else (0, 1, 2, 3)),
                       *specs)
    # at chunk 128, K = V = 128 the Mosaic backward does not fit: the heuristic picks Triton
    if config is not None and (config.backward == "pallas" or config.chunk == 128):
        assert grad_text.count("custom_call @mosaic_gpu") == 1 and "xla.gpu.triton" in grad_text
    elif split > 1 and (config is None or config.seq_split_grad is not False):
        # the Mosaic forward storing states, reverse walk and dq / dk; two Triton kernels
        # (the segments' states, forward and reverse)
        assert grad_text.count("custom_call @mosaic_gpu") == 3
        assert grad_text.count("xla.gpu.triton") == 2
    else:
        assert grad_text.count("custom_call @mosaic_gpu") == 3
        assert "xla.gpu.triton" not in grad_text


@needs_mosaic
def test_each_distinct_kernel_lowers_once_per_program(monkeypatch):
    """Two layers' worth of calls (same description, same shapes) hold each Mosaic kernel
    once in the lowered program (``mosaic_chunk.lowered_once``: a nested jit, called twice);
    a call of other shapes adds its own; ``LINEARNEXUS_MOSAIC_LOWER_ONCE=0`` lowers every call
    site (on JAX 0.11 with a different ``kernel_hash`` each, which jaxlib compiles apart). A
    switch set in the environment retraces (the reverse walk's value block follows
    ``LINEARNEXUS_MOSAIC_BWD_BV32``), and setting it back reuses the first trace."""
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    q, k, v, g, _ = _specs(1, 1000, 2, 64, 64, False)

    def layer(x, k, v, g):
        o, _ = linear_attention_mosaic(x, k, v, g, scale=0.1, check_device=False)
        return o

    def loss(q, k, v, g, n_layers, other=False):
        x = q
        for _ in range(n_layers):
            x = layer(x, k, v, g)
        if other:  # other shapes: kernels of their own
            x = x + layer(x[:, :500], k[:, :500], v[:, :500], g[:, :500]).sum()
        # squared: every layer's output is live under the gradient (a dead one would give
        # that layer's forward a jaxpr of its own)
        return jnp.sum(jnp.square(x.astype(jnp.float32)))

    def kernels(text):
        hashes = re.findall(r'custom_call @mosaic_gpu\w*\(.*?kernel_hash = "(.*?)"', text)
        return len(hashes), len(set(hashes))

    grad = functools.partial(jax.grad, argnums=(0, 1, 2, 3))
    one = kernels(_lower(grad(functools.partial(loss, n_layers=1)), q, k, v, g))
    two = kernels(_lower(grad(functools.partial(loss, n_layers=2)), q, k, v, g))
    assert one == (3, 3) and two == (3, 3)  # forward storing states, reverse walk, dq / dk
    assert kernels(_lower(grad(functools.partial(loss, n_layers=2, other=True)), q, k, v, g)) \
        == (6, 6)
    monkeypatch.setenv(LOWER_ONCE_ENV, "0")
    # every call site its own copy; on JAX 0.11 each copy also hashes differently, so jaxlib
    # would compile each one (on 0.10 the copies share a hash)
    calls, distinct = kernels(_lower(grad(functools.partial(loss, n_layers=2)), q, k, v, g))
    assert calls == 6 and distinct in (3, 6)
    monkeypatch.delenv(LOWER_ONCE_ENV)

    picked = []  # the reverse walk's value block, each time run_state_grad is traced
    choose = mosaic_bwd.state_block_v
    monkeypatch.setattr(mosaic_bwd, "state_block_v",
                        lambda **kw: picked.append(choose(**kw)) or picked[-1])
    for flag in ("1", "0", "1"):  # blocks of 32 on this small grid, 64, then the first trace
        monkeypatch.setenv(mosaic_bwd.STATE_SMALL_BV_ENV, flag)
        assert kernels(_lower(grad(functools.partial(loss, n_layers=2)), q, k, v, g)) \
            == (3, 3)
    assert picked == [32, 64]


@needs_mosaic
@pytest.mark.parametrize("op,h0,config", [
    ("simple_gla", True, None),  # the Mosaic backward
    ("simple_gla", False, MosaicConfig(backward="pallas")),
    ("gated_delta_rule", True, MosaicConfig(backward="mosaic")),
    ("delta_rule", False, None),  # the heuristic's backward (Mosaic: V <= 128)
    ("delta_rule", True, MosaicConfig(backward="pallas")),  # the Triton backward
    ("gated_delta_rule", True, MosaicConfig(fused_grad=True)),  # the gradient from M^{-1}
])
def test_packed_sequences_lower_forward_and_backward(op, h0, config, monkeypatch):
    """Packed sequences (``cu_seqlens``, traced) lower for CUDA through the Mosaic kernels:
    each chunk's sequence and open / close flags are read in the kernels, which load the
    sequence's initial state (its final state's gradient) at the chunk that opens (closes)
    it and store the final state (dh0) there; the same kernel counts as batch rows."""
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    monkeypatch.delenv(PACKED_ENV, raising=False)  # packed runs on the Mosaic kernels by default
    monkeypatch.delenv(mosaic_delta.FUSED_GRAD_ENV, raising=False)
    monkeypatch.delenv(mosaic_delta.WY_MOSAIC_ENV, raising=False)
    N, T, H, K, V = 3, 300, 2, 64, 64
    qk = jax.ShapeDtypeStruct((1, T, H, K), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, T, H, V), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((1, T, H), jnp.float32)
    beta = jax.ShapeDtypeStruct((1, T, H), jnp.bfloat16)
    s0 = jax.ShapeDtypeStruct((N, H, K, V), jnp.float32) if h0 else None
    cu = jax.ShapeDtypeStruct((N + 1,), jnp.int32)
    specs = (qk, qk, v, g, beta, s0, cu)

    def fwd(q, k, v, g, beta, s0, cu):
        if op == "simple_gla":
            return linear_attention_mosaic(q, k, v, g, scale=0.1, initial_state=s0, cu_seqlens=cu,
                                           config=config, check_device=False)
        return delta_rule_mosaic(q, k, v, beta, g if op == "gated_delta_rule" else None,
                                 scale=0.1, initial_state=s0, cu_seqlens=cu, config=config,
                                 check_device=False)

    def loss(*args):
        o, final = fwd(*args)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    assert _lower(fwd, *specs).count("custom_call @mosaic_gpu") == 1
    argnums = tuple(i for i, s in enumerate(specs[:-1]) if s is not None)
    grad_text = _lower(jax.value_and_grad(loss, argnums=argnums), *specs)
    bwd_mosaic = (config.backward if config is not None and config.backward else "mosaic"
                  if op == "simple_gla" else mosaic_delta.DEFAULT_BACKWARD) == "mosaic"
    fused_grad = op != "simple_gla" and _resolved_fused_grad(config, bwd_mosaic)
    wy_mosaic = int(fused_grad and mosaic_delta.WY_MOSAIC)  # the WY backward on Mosaic GPU
    # the delta rules' Mosaic backward: a third kernel for dw (mosaic_bwd.DW_KERNEL), except
    # where the gradient from M^{-1} forms it in the WY backward (mosaic_delta.DKS_IN_WY)
    dw = int(op != "simple_gla" and mosaic_bwd.DW_KERNEL and not (
        fused_grad and (mosaic_delta.DKS_IN_WY or wy_mosaic)))
    assert grad_text.count("custom_call @mosaic_gpu") == (3 + dw + wy_mosaic if bwd_mosaic
                                                         else 1)
    # the delta rules' Triton WY forward and backward (the backward unless on Mosaic GPU)
    wy = 0 if op == "simple_gla" else 2 - wy_mosaic
    triton_bwd = 0 if bwd_mosaic else (4 if op == "simple_gla" else 3)  # (fwd_h +) dv, dh, dqk
    assert grad_text.count("xla.gpu.triton") == wy + triton_bwd
    # the gradient from M^{-1}: its WY backward is the one that takes dy (named in the text)
    assert ("_wy_bwd_fused_kernel" in grad_text) == (fused_grad and not wy_mosaic)


@needs_mosaic
def test_seq_split_is_refused_where_it_does_not_apply():
    """``MosaicConfig(seq_split=n)`` (simple_gla, batch rows; its lowering is a case of
    ``test_simple_gla_mosaic_lowers_forward_and_backward``) is refused naming ``config``
    for packed sequences, more segments than chunks (under a gradient too, where the whole
    walk runs), and the delta rules' and GLA's kernels; ``seq_split`` must be an int >= 1."""
    from linearnexus.kernels.gla.mosaic import gla_mosaic

    with pytest.raises(ValueError, match="seq_split"):
        MosaicConfig(seq_split=0)
    x = jnp.ones((1, 200, 1, 64), jnp.bfloat16)
    gz = jnp.zeros((1, 200, 1))
    for split in (8, 3):  # 4 chunks: 3 segments of 2 leave the last empty, 4 of 1 do not
        with pytest.raises(ValueError, match=f"config: seq_split={split} at T=200 .* splits "
                                             "that keep one here: 1, 2, 4$"):
            linear_attention_mosaic(x, x, x, gz, scale=1.0, config=MosaicConfig(seq_split=split),
                                    check_device=False)
    with pytest.raises(ValueError, match="config: seq_split=8 at T=200"):  # under a gradient too
        jax.grad(lambda q: jnp.sum(linear_attention_mosaic(
            q, x, x, gz, scale=1.0, config=MosaicConfig(seq_split=8),
            check_device=False)[0].astype(jnp.float32)))(x)
    for config, cu in ((MosaicConfig(seq_split=1, seq_split_grad=True), None),
                       (MosaicConfig(seq_split_grad=True), jnp.array([0, 50, 200]))):
        with pytest.raises(ValueError, match="config: seq_split_grad=True splits the gradient"):
            linear_attention_mosaic(x, x, x, gz, scale=1.0, cu_seqlens=cu, config=config,
                                    check_device=False)
    with pytest.raises(ValueError, match="config: seq_split=2 cuts batch rows"):
        linear_attention_mosaic(x, x, x, gz, scale=1.0, cu_seqlens=jnp.array([0, 50, 200]),
                                config=MosaicConfig(seq_split=2), check_device=False)
    with pytest.raises(ValueError, match=r"config: seq_split=2 \(seq_split_grad=None\) is "
                                         "simple_gla's"):
        delta_rule_mosaic(x, x, x, gz.astype(jnp.bfloat16), -jnp.ones((1, 200, 1)), scale=1.0,
                          config=MosaicConfig(seq_split=2), check_device=False)
    with pytest.raises(ValueError, match=r"config: seq_split=None \(seq_split_grad=True\) is "
                                         "simple_gla's"):
        gla_mosaic(x, x, x, -jnp.ones((1, 200, 1, 64)), scale=1.0,
                   config=MosaicConfig(seq_split_grad=True), check_device=False)
    with pytest.raises(ValueError, match="seq_split_grad: expected a bool"):
        MosaicConfig(seq_split_grad=1)


@pytest.mark.skipif(gpu_interpret_reason() is not None, reason=gpu_interpret_reason() or "")
@pytest.mark.parametrize("B,T,split,with_h0,gated,pieces,grad_split", [
    (1, 300, 2, True, 1.0, None, False), (2, 300, 3, False, 1.0, None, True),
    (1, 65, 2, True, None, None, True), (1, 1000, 4, True, 1.0, 2, True),
    (1, 300, 2, True, 1.0, None, True), (1, 512, 4, True, 0.01, None, True)])
def test_seq_split_in_the_interpreter(B, T, split, with_h0, gated, pieces, grad_split,
                                      monkeypatch):
    """simple_gla with its rows cut into segments (``seq_split``) in JAX 0.11's Mosaic GPU
    interpreter: the plain forward's outputs and final states against the per-step reference
    at the GPU thresholds and within 10% of one walk's error (the segments' own states come
    from bf16 operands, as the walk's do); under a gradient the whole walk runs, so every
    gradient equals one walk's bit for bit (and is checked against the reference too), or
    with ``seq_split_grad`` each segment's backward walks from the state gradient leaving it
    (every gradient against the reference, within 1.5x one walk's error). T = 300 in two
    segments of three chunks (the last padded) and in three of two, 65 (two chunks) in two
    without a gate, 1000 in four with each segment's state walked in two pieces, 512 in four
    with gates a hundredth as strong (so the segments' decays, which the split gradient's
    steps carry, are far from zero); head dims 40 / 72 padded; with and without an initial
    state."""
    from linearnexus.kernels.common import mosaic_ops

    if pieces is not None:
        monkeypatch.setattr(mosaic_ops, "split_pieces", lambda programs, seg_chunks: pieces)
    H, K, V = 2, 40, 72
    q, k, v, g, _, s0, ks = _delta_inputs(7, B, T, H, K, V, B)
    g = None if gated is None else g * gated  # weak gates: segments' decays far from 0
    do = jax.random.normal(ks[0], (B, T, H, V))
    dht = jax.random.normal(ks[1], (B, H, K, V))

    def run(config, q, k, v, g, s0):
        return linear_attention_mosaic(q, k, v, g, scale=K ** -0.5,
                                       initial_state=s0 if with_h0 else None, config=config,
                                       check_device=False)

    def loss(fn, *args):
        o, final = fn(*args)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final * dht), (o, final)

    args = (q, k, v, g, s0)
    argnums = tuple(i for i, x in enumerate(args, 1) if x is not None and (i < 5 or with_h0))
    split_run = functools.partial(run, MosaicConfig(seq_split=split,
                                                    seq_split_grad=grad_split))
    with gpu_interpret():
        o, final = split_run(*args)
        grads, _ = jax.grad(loss, argnums, has_aux=True)(split_run, *args)
        one_grads, (o1, final1) = jax.grad(loss, argnums, has_aux=True)(
            functools.partial(run, None), *args)
    with jax.default_matmul_precision("highest"):
        ref_grads, (ro, rf) = jax.grad(loss, argnums, has_aux=True)(
            lambda q, k, v, g, s0: simple_gla_reference(
                q, k, v, jnp.zeros(q.shape[:3]) if g is None else g, scale=K ** -0.5,
                initial_state=s0 if with_h0 else None),
            *(None if x is None else x.astype(jnp.float32) for x in args))

    def rel(a, b):
        return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))

    for name, a, one, ref in (("o", o, o1, ro), ("final", final, final1, rf)):
        err, one_err = rel(a, ref), rel(one, ref)
        assert err <= 5e-3 and err <= 1.1 * one_err, (name, err, one_err)
    names = [("q", "k", "v", "g", "h0")[i - 1] for i in argnums]
    for name, a, one, ref in zip(names, grads, one_grads, ref_grads, strict=True):
        if grad_split:  # the segments' own backward walks: within one walk's error
            err, one_err = rel(a, ref), rel(one, ref)
            assert err <= 1e-2 and err <= 1.5 * one_err + 5e-4, (name, err, one_err)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(one))
            assert rel(a, ref) <= 1e-2
    if grad_split:  # and it is the segments' backward that ran, not one walk's
        assert any(not np.array_equal(np.asarray(a), np.asarray(one))
                   for a, one in zip(grads, one_grads, strict=True))


@pytest.mark.parametrize("gated,dtype,pieces", [(True, jnp.float32, 1), (True, jnp.float32, 2),
                                                (True, jnp.bfloat16, 2), (False, jnp.float32, 2)])
def test_segment_states_matches_the_sum_it_stands_for(gated, dtype, pieces):
    """``pallas_chunk.segment_states`` (the sequence split's entering states; Triton, here in
    Pallas interpret mode): each segment but the last ends on ``sum_t e^{b_end - b_t} k_t^T
    v_t`` from zero, against that sum in float32 (``b``: the segment's cumulative log-gates,
    which the kernel forms from in-chunk sums and chunk decays), walked whole or as two
    pieces joined by their decays; in reverse each segment but the first sends
    ``sum_t e^{b_t} k_t^T v_t`` to its start (``b_t`` up to and with t); the segments'
    summed log-gates (zeros without a gate);
    rows 2, three segments of two chunks of 16, K = 16, V = 32; a segment count or piece
    count that cuts a chunk is refused."""
    from linearnexus.kernels.common.pallas_chunk import in_chunk_cumsum, segment_states

    R, S, P, H, K, V, L = 2, 3, 32, 2, 16, 32, 16
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    k = jax.random.normal(ks[0], (R, S * P, H, K)).astype(dtype)
    v = jax.random.normal(ks[1], (R, S * P, H, V)).astype(dtype)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[2], (R, S * P, H)) + 2)
    gs = g.reshape(R, S, P, H) if gated else jnp.zeros((R, S, P, H))  # [R, S*P, H] -> [R, S, P, H]
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5  # bf16: the decayed k is rounded
    for reverse in (False, True):
        got, log_decay = segment_states(k, v, in_chunk_cumsum(g, L) if gated else None,
                                        segments=S, chunk=L, pieces=pieces, reverse=reverse,
                                        interpret=True)
        assert got.shape == (R, S - 1, H, K, V) and got.dtype == jnp.float32
        if reverse:  # the gates up to t in its segment, t's own included
            decay = jnp.cumsum(gs, axis=2)
        else:  # the gates after t in its segment
            decay = jnp.cumsum(gs[:, :, ::-1], axis=2)[:, :, ::-1] - gs
        kd = k.astype(jnp.float32).reshape(R, S, P, H, K) * jnp.exp(decay)[..., None]
        # [R, S, P, H, K] x [R, S, P, H, V] -> [R, S, H, K, V]
        want = jnp.einsum("rsphk,rsphv->rshkv", kd,
                          v.astype(jnp.float32).reshape(R, S, P, H, V), precision="highest")
        keep = slice(1, None) if reverse else slice(None, -1)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, keep]), rtol=tol,
                                   atol=tol)
        np.testing.assert_allclose(np.asarray(log_decay),
                                   np.asarray(jnp.sum(gs, axis=2)[:, keep]), rtol=1e-5,
                                   atol=1e-5)
    for segments, n in ((4, 1), (3, 4)):
        with pytest.raises(ValueError, match="segments, pieces: expected >= 2 segments"):
            segment_states(k, v, None, segments=segments, chunk=L, pieces=n, interpret=True)
    # the split's pieces: more walks where one per segment gives < 4 programs an SM,
    # each of >= 8 whole chunks
    from linearnexus.kernels.common.mosaic_ops import split_pieces

    assert split_pieces(384, 64) == 2  # (2, 16384, 16, 128) in four segments
    assert split_pieces(10, 64) == 8 and split_pieces(10, 16) == 2 and split_pieces(10, 8) == 1
    assert split_pieces(2000, 64) == 1
    # the heuristic's split: two segments where one walk at value blocks of 64 leaves half
    # the SMs idle on >= 64 chunks (batch rows, chunk 64, no value block of the call's own)
    pick = functools.partial(default_seq_split, heads=16, value_dim=128, chunk=64)
    assert pick(rows=2, n_chunks=256) == 2 and pick(rows=2, n_chunks=128) == 2
    assert pick(rows=8, n_chunks=256) == 1 and pick(rows=2, n_chunks=64) == 1
    assert pick(rows=2, n_chunks=256, block_v=64) == 1
    # on the padded value dim, as the value blocks' rule: V = 96 walks as 128
    assert default_seq_split(rows=2, heads=16, value_dim=96, n_chunks=256, chunk=64) == 2
    assert default_seq_split(rows=4, heads=16, value_dim=96, n_chunks=256, chunk=64) == 1
    assert default_seq_split(rows=2, heads=16, value_dim=128, n_chunks=128, chunk=128) == 1


def test_mosaic_declines_what_it_does_not_cover(monkeypatch):
    """What the kernel does not run raises NotImplementedError (so dispatch moves on), and a
    config over the shared-memory budget is a ValueError naming config."""
    q, k, v, g, _ = (-jnp.ones(s.shape, s.dtype) if s is not None else None
                     for s in _specs(1, 8, 1, 64, 64, False))  # g = -1: a valid log-gate
    kernel = BACKENDS["mosaic"]
    assert kernel.supports(platform="gpu", dtype=jnp.bfloat16)
    assert not kernel.supports(platform="gpu", dtype=jnp.float32)
    assert not kernel.supports(platform="cpu", dtype=jnp.bfloat16)
    if jax.default_backend() != "gpu":  # no Hopper here: the call-time device check declines
        with pytest.raises(NotImplementedError, match="compute capability"):
            simple_gla(q, k, v, g, backend="mosaic", mode="chunk")
    with pytest.raises(NotImplementedError, match="float32"):
        linear_attention_mosaic(q.astype(jnp.float32), k, v, g, scale=1.0, check_device=False)
    monkeypatch.setenv(PACKED_ENV, "0")  # the switch that keeps packed calls on pallas
    with pytest.raises(NotImplementedError, match=PACKED_ENV):
        linear_attention_mosaic(q, k, v, g, scale=1.0, check_device=False,
                                cu_seqlens=jnp.array([0, 3, 8], jnp.int32))
    with pytest.raises(NotImplementedError, match="key dim"):
        wide = jnp.ones((1, 8, 1, 256), jnp.bfloat16)
        linear_attention_mosaic(wide, wide, v, g, scale=1.0, check_device=False)
    if REASON is None:
        with pytest.raises(ValueError, match="config"):
            linear_attention_mosaic(jnp.ones((1, 8, 1, 128), jnp.bfloat16),
                                    jnp.ones((1, 8, 1, 128), jnp.bfloat16),
                                    jnp.ones((1, 8, 1, 128), jnp.bfloat16), g, scale=1.0,
                                    check_device=False,
                                    config=MosaicConfig(block_v=128, stages=4))
        with pytest.raises(ValueError, match="dqk_stages"):  # 3 stages of [64, V] tiles: over
            linear_attention_mosaic(jnp.ones((1, 8, 1, 128), jnp.bfloat16),
                                    jnp.ones((1, 8, 1, 128), jnp.bfloat16),
                                    jnp.ones((1, 8, 1, 128), jnp.bfloat16), g, scale=1.0,
                                    check_device=False, config=MosaicConfig(dqk_stages=3))
        with pytest.raises(ValueError, match="backward='mosaic'"):  # V = 256: [L, V] tiles
            linear_attention_mosaic(q, k, jnp.ones((1, 8, 1, 256), jnp.bfloat16), g, scale=1.0,
                                    check_device=False, config=MosaicConfig(backward="mosaic"))
        # 4 stages at K = V = 128 fit batch rows (225 KB) but not beside the packed staging
        # tile (258 KB): a packed call declines (dispatch then runs pallas) instead of failing
        ones = jnp.ones((1, 8, 1, 128), jnp.bfloat16)
        monkeypatch.delenv(PACKED_ENV, raising=False)
        with pytest.raises(NotImplementedError, match="packed sequences add"):
            linear_attention_mosaic(ones, ones, ones, g, scale=1.0, check_device=False,
                                    cu_seqlens=jnp.array([0, 3, 8], jnp.int32),
                                    config=MosaicConfig(stages=4, backward="pallas"))
    with pytest.raises(ValueError, match="block_v"):
        MosaicConfig(block_v=96)
    with pytest.raises(ValueError, match="stages"):
        MosaicConfig(stages=0)
    with pytest.raises(ValueError, match="dqk_stages"):
        MosaicConfig(dqk_stages=True)
    with pytest.raises(ValueError, match="backward"):
        MosaicConfig(backward="triton")
    with pytest.raises(ValueError, match="fused_wy"):
        MosaicConfig(fused_wy=1)
    with pytest.raises(ValueError, match="fused_grad"):
        MosaicConfig(fused_grad="yes")
    if REASON is None:  # the delta rules' knobs, named where another op is given them
        x = jnp.ones((1, 8, 1, 64), jnp.bfloat16)
        for knob in ("fused_wy", "fused_grad"):
            with pytest.raises(ValueError, match=f"config: {knob}"):
                linear_attention_mosaic(x, x, x, jnp.zeros((1, 8, 1)), scale=1.0,
                                        config=MosaicConfig(**{knob: True}), check_device=False)
    # the heuristic always fits shared memory at either chunk size, few programs or many,
    # and picks the Mosaic backward where it fits
    for chunk, K, V, rows, n_chunks, packed in itertools.product(
            (64, 128), (64, 128), (64, 128, 256), (1, 8), (1, 64, 256), (False, True)):
        cfg = default_mosaic_config(rows=rows, heads=16, key_dim=K, value_dim=V,
                                    n_chunks=n_chunks, chunk=chunk, packed=packed)
        assert cfg.chunk == chunk
        assert smem_bytes(chunk=chunk, key_dim=K, block_v=cfg.block_v, stages=cfg.stages,
                          itemsize=2, packed=packed) <= SMEM_LIMIT
        assert cfg.backward == ("mosaic" if mosaic_backward_fits(
            chunk=chunk, key_dim=K, value_dim=V, block_v=cfg.block_v, packed=packed)
            else "pallas")
        if chunk == 64 and not packed:
            assert cfg.backward == ("mosaic" if V <= 128 else "pallas")
    # value blocks of 32 where 64 would leave half the SMs idle on a long walk (measured at
    # (2, 16384, 16, 128)); 64 at (8, 4096, 16, 128), short walks, packed rows, chunk 128
    pick = functools.partial(default_mosaic_config, heads=16, key_dim=128, value_dim=128)
    assert pick(rows=2, n_chunks=256).block_v == 32
    assert pick(rows=8, n_chunks=64).block_v == 64
    assert pick(rows=2, n_chunks=4).block_v == 64
    assert pick(rows=1, n_chunks=256, packed=True).block_v == 64
    assert pick(rows=2, n_chunks=128, chunk=128).block_v == 64
    assert pick(rows=2, n_chunks=256, block_v=64).block_v == 64  # a call's own wins


def test_mosaic_config_comes_from_the_tuning_cache(tmp_path, monkeypatch):
    """With no config on the backend object, the tuning cache's entry for (op, "mosaic",
    shape bucket, dtype) reaches the kernel as a MosaicConfig; a stale entry is ignored, and
    one the kernel refuses for the call runs the heuristic with a warning."""
    import dataclasses as dc

    from linearnexus.kernels import tuning
    from linearnexus.kernels.base import GridConfig
    from linearnexus.kernels.common.mosaic_ops import MosaicKernel

    monkeypatch.setenv("LINEARNEXUS_TUNING_CACHE", str(tmp_path / "tuning.json"))
    seen = []

    def fake_chunked(*arrays, config=None, **kwargs):
        seen.append(config)
        return arrays[0], None

    fake_chunked.__module__ = "linearnexus.kernels.simple_gla.mosaic"  # names the op
    kernel = MosaicKernel(fake_chunked, None)
    q = jnp.ones((2, 300, 4, 64), jnp.bfloat16)
    g = -jnp.ones((2, 300, 4), jnp.float32)

    @dc.dataclass(frozen=True)
    class Knobs:  # what benchmarks/run.py --tune records: a dataclass of the winning knobs
        stages: int
        block_v: int

    tuning.record("simple_gla", "mosaic", (2, 300, 4, 64, 64), jnp.bfloat16,
                  Knobs(stages=3, block_v=64), seconds=1e-3, device_kind=jax.devices()[0].device_kind)
    kernel.forward_chunk(q, q, q, g, initial_state=None, grid=GridConfig(chunk_size=64), scale=1.0,
                         cu_seqlens=None)
    assert seen[-1] == MosaicConfig(stages=3, block_v=64)
    tuning.record("simple_gla", "mosaic", (2, 300, 4, 64, 64), jnp.bfloat16,
                  Knobs(stages=0, block_v=64), seconds=1e-3, device_kind=jax.devices()[0].device_kind)
    kernel.forward_chunk(q, q, q, g, initial_state=None, grid=GridConfig(chunk_size=64), scale=1.0,
                         cu_seqlens=None)
    assert seen[-1] is None  # stages=0 does not validate: the heuristic decides

    # an entry the kernel refuses for this call (a ValueError naming config: over a shared-
    # memory budget, say) warns and runs the heuristic; the caller's own config still raises
    def refusing(*arrays, config=None, **kwargs):
        seen.append(config)
        if config is not None:
            raise ValueError(f"config: stages={config.stages} does not fit")
        return arrays[0], None

    refusing.__module__ = fake_chunked.__module__
    tuning.record("simple_gla", "mosaic", (2, 300, 4, 64, 64), jnp.bfloat16,
                  Knobs(stages=3, block_v=64), seconds=1e-3, device_kind=jax.devices()[0].device_kind)
    call = dict(initial_state=None, grid=GridConfig(chunk_size=64), scale=1.0, cu_seqlens=None)
    with pytest.warns(UserWarning, match="tuning cache.*does not fit"):
        MosaicKernel(refusing, None).forward_chunk(q, q, q, g, **call)
    assert seen[-2:] == [MosaicConfig(stages=3, block_v=64), None]
    with pytest.raises(ValueError, match="config: stages=2"):
        MosaicKernel(refusing, None, config=MosaicConfig(stages=2)).forward_chunk(q, q, q, g, **call)


def _delta_specs(B, T, H, K, V, h0, gated):
    qk = jax.ShapeDtypeStruct((B, T, H, K), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((B, T, H, V), jnp.bfloat16)
    beta = jax.ShapeDtypeStruct((B, T, H), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((B, T, H), jnp.float32) if gated else None
    s0 = jax.ShapeDtypeStruct((B, H, K, V), jnp.float32) if h0 else None
    return qk, qk, v, beta, g, s0


@needs_mosaic
@pytest.mark.parametrize("shape,h0,gated,config", [
    # gated, T not a multiple of the chunk, the benchmark's K = V, initial state
    ((2, 1000, 2, 128, 128), True, True, None),
    # the ungated delta rule, odd head dims (padded), one pipeline stage
    ((1, 63, 3, 40, 72), False, False, MosaicConfig(stages=1, bwd_stages=1)),
    # the Mosaic backward: gated with an initial state, and ungated at one stage
    ((2, 1000, 2, 128, 128), True, True, MosaicConfig(backward="mosaic")),
    ((1, 63, 3, 40, 72), False, False, MosaicConfig(backward="mosaic", bwd_stages=1,
                                                    dqk_stages=1)),
    # the WY products in the walk (the plain forward; the gradient's forward is separate)
    ((2, 1000, 2, 128, 128), True, True, MosaicConfig(fused_wy=True)),
    ((1, 63, 3, 40, 72), False, False, MosaicConfig(fused_wy=True, stages=3)),
    # the gradient from M^{-1} too: M^{-1} in Triton, the storing fused walk, the two Mosaic
    # backward kernels and the WY backward from dy (Mosaic by default, else Triton)
    ((2, 1000, 2, 128, 128), True, True, MosaicConfig(fused_grad=True)),
    ((1, 63, 3, 40, 72), False, False, MosaicConfig(fused_grad=True, bwd_stages=1)),
    # value blocks of 32 in the walks (every operand tile at a 64-byte swizzle)
    ((2, 1000, 2, 128, 128), True, True, MosaicConfig(block_v=32)),
    ((1, 63, 3, 40, 72), False, False, MosaicConfig(block_v=32, fused_wy=False)),
])
def test_delta_rules_mosaic_lower_forward_and_backward(shape, h0, gated, config, monkeypatch):
    """The delta rules' mosaic backend lowers for CUDA: the forward is the Triton WY kernel
    and one Mosaic GPU kernel; under the gradient that kernel stores the states and vn, and
    the Triton backward (dv, dh, dq / dk, WY backward) follows, with no Triton fwd_h; with
    ``backward="mosaic"`` the backward is the two Mosaic kernels (reverse walk, dq / dk)
    and the Triton WY backward (with ``fused_grad``, the default, the WY backward from dy:
    a Mosaic kernel where ``mosaic_delta.WY_MOSAIC``). ``fused_wy``: the forward's Triton
    kernel writes M^{-1} only (``w``, ``u`` formed in the walk); the gradient as without it
    unless ``fused_grad``."""
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    monkeypatch.delenv(mosaic_delta.FUSED_GRAD_ENV, raising=False)
    monkeypatch.delenv(mosaic_delta.WY_MOSAIC_ENV, raising=False)

    def fwd(q, k, v, beta, g, s0):
        return delta_rule_mosaic(q, k, v, beta, g, scale=0.1, initial_state=s0, config=config,
                                 check_device=False)

    def loss(q, k, v, beta, g, s0):
        o, final = fwd(q, k, v, beta, g, s0)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    specs = _delta_specs(*shape, h0, gated)
    text = _lower(fwd, *specs)
    assert text.count("custom_call @mosaic_gpu") == 1 and text.count("xla.gpu.triton") == 1
    argnums = tuple(i for i, s in enumerate(specs) if s is not None)
    grad_text = _lower(jax.value_and_grad(loss, argnums=argnums), *specs)
    # the backward the heuristic resolves to: these shapes fit the Mosaic one (V <= 128)
    bwd_mosaic = (config.backward if config is not None and config.backward
                  else mosaic_delta.DEFAULT_BACKWARD) == "mosaic"
    # the gradient from M^{-1} (the default with the Mosaic backward and the fused walk): its
    # WY backward is the one that takes dy (named in the text)
    fused_grad = _resolved_fused_grad(config, bwd_mosaic)
    wy_mosaic = int(fused_grad and mosaic_delta.WY_MOSAIC)  # the WY backward on Mosaic GPU
    # dw = -dvn S_c^T in a Mosaic kernel of its own, except where the gradient from M^{-1}
    # forms it in the WY backward (mosaic_delta.DKS_IN_WY, or the Mosaic one)
    dw = int(mosaic_bwd.DW_KERNEL and not (fused_grad and (mosaic_delta.DKS_IN_WY or wy_mosaic)))
    assert grad_text.count("custom_call @mosaic_gpu") == (3 + dw + wy_mosaic if bwd_mosaic
                                                         else 1)
    assert grad_text.count("xla.gpu.triton") == (2 - wy_mosaic if bwd_mosaic else 5)
    assert ("_wy_bwd_fused_kernel" in grad_text) == (fused_grad and not wy_mosaic)
    assert ("_wy_bwd_kernel" in grad_text) == (not fused_grad)


def _delta_static(R: int, NC: int, H: int, K: int, V: int, *, gated: bool = True,
                  chunk: int = 64) -> MosaicStatic:
    """The static description of a delta-rule call in the chunk layout (batch rows, no initial
    state, scale 1) with the Mosaic backward and the gradient from ``M^{-1}``: what the
    kernels of the backward (``run_dw``, ``wy_fused_backward_mosaic``) are called with."""
    from linearnexus.kernels.common.pallas_chunk import CoreStatic

    core = CoreStatic(gate="scalar" if gated else "none", delta=True, has_h0=False, scale=1.0,
                      rows=R, n_chunks=NC, chunk=chunk, heads=H, key_dim=K, value_dim=V,
                      n_seqs=R, block_k=K, block_v=64, num_warps=4, num_stages=2,
                      interpret=True, packed=False)
    return MosaicStatic(core=core, block_v=64, stages=2, backward="mosaic", fused_wy=True,
                        fused_grad=True)


def _count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that each call appends to the returned list (a spy)."""
    calls: list = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def _resolved_fused_grad(config: MosaicConfig | None, bwd_mosaic: bool) -> bool:
    """Whether the delta rules' gradient runs from M^{-1} under ``config`` (None fields: the
    module defaults, the switch unset)."""
    def pick(name, default):
        value = None if config is None else getattr(config, name)
        return default if value is None else value

    return bool(bwd_mosaic and pick("fused_wy", mosaic_delta.DEFAULT_FUSED_WY)
                and pick("fused_grad", mosaic_delta.DEFAULT_FUSED_GRAD))


def _delta_inputs(seed: int, B: int, T: int, H: int, K: int, V: int, N: int):
    """Random delta-rule inputs ``(q, k, v, g, beta, s0, ks)``: bf16 q, L2-normalised k, v
    ``[B, T, H, K / V]`` and beta ``[B, T, H]``, float32 log-gates ``g`` and ``N`` initial
    states ``s0 [N, H, K, V]``; ``ks``, two PRNG keys left for the caller's cotangents."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q = jax.random.normal(ks[0], (B, T, H, K)).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, V)).astype(jnp.bfloat16)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))).astype(jnp.bfloat16)
    s0 = jax.random.normal(ks[5], (N, H, K, V))
    return q, k, v, g, beta, s0, ks[6:]


#: the interpreter tests' packed sequences: one empty, one closing mid-chunk, one a whole chunk
PACKED_LENS = (70, 0, 30, 64)


def _interpreter_case(seed: int, packed: bool, B: int, T: int, H: int, K: int, V: int):
    """``(T, cu, inputs, loss)`` of an interpreter test: batch rows, or (``packed``, B = 1)
    :data:`PACKED_LENS` with ``T`` their sum and ``cu`` their offsets (else None); ``inputs``
    as :func:`_delta_inputs` without its keys, one initial state a row or sequence;
    ``loss(fn, *args)`` is ``(sum(o * do) + sum(final * dht), (o, final))`` for
    ``(o, final) = fn(*args)`` and random cotangents ``do``, ``dht``."""
    T = sum(PACKED_LENS) if packed else T
    cu = jnp.array([0, *itertools.accumulate(PACKED_LENS)], jnp.int32) if packed else None
    N = len(PACKED_LENS) if packed else B
    *inputs, ks = _delta_inputs(seed, B, T, H, K, V, N)
    do = jax.random.normal(ks[0], (B, T, H, V))
    dht = jax.random.normal(ks[1], (N, H, K, V))

    def loss(fn, *args):
        o, final = fn(*args)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final * dht), (o, final)

    return T, cu, tuple(inputs), loss


@pytest.mark.skipif(REASON is not None or gpu_interpret_reason() is not None,
                    reason=REASON or gpu_interpret_reason() or "")
@pytest.mark.parametrize("op", ["gated_delta_rule", "gated_delta_rule/mosaic-bwd",
                                "simple_gla", "simple_gla/packed", "simple_gla/packed-no-h0",
                                "simple_gla/block_v32",
                                "gated_delta_rule/packed", "gated_delta_rule/packed-triton-bwd"])
def test_mosaic_matches_reference_in_the_interpreter(op, monkeypatch):
    """The Mosaic GPU kernels run on the CPU by JAX's Mosaic GPU interpreter (JAX 0.11),
    forward and gradient, against the per-step reference: the gated delta rule (the
    Mosaic forward storing the states and vn, then the Triton backward in interpret mode,
    or with ``backward="mosaic"`` the two Mosaic backward kernels) and simple_gla (Mosaic
    forward and both Mosaic backward kernels). bf16, two chunks (T = 100, the last one
    padded), an initial state; thresholds as on the GPU (outputs and states 5e-3,
    gradients 1e-2). ``/packed``: four packed sequences of 70, 0, 30 and 64 tokens (one
    empty, one closing mid-chunk, one a whole chunk), each with its initial state (none with
    ``-no-h0``), through the Mosaic backward (the Triton one with ``-triton-bwd``).
    ``/block_v32``: simple_gla's walks at value blocks of 32 (two per head here), every
    operand tile at a 64-byte swizzle."""
    packed = "/packed" in op
    with_h0 = not op.endswith("-no-h0")
    monkeypatch.delenv(PACKED_ENV, raising=False)
    B, H, K, V = 1, 1, 64, 64
    T, cu, (q, k, v, g, beta, s0), loss = _interpreter_case(3, packed, B, 100, H, K, V)
    if op.startswith("simple_gla"):
        args, names = (q, k, v, g, s0), ("dq", "dk", "dv", "dg", "dh0")

        config = MosaicConfig(block_v=32) if op.endswith("block_v32") else None

        def mosaic(q, k, v, g, s0):
            return linear_attention_mosaic(q, k, v, g, scale=K ** -0.5,
                                           initial_state=s0 if with_h0 else None,
                                           cu_seqlens=cu, config=config, check_device=False)

        def reference(q, k, v, g, s0):
            return simple_gla_reference(q, k, v, g, scale=K ** -0.5,
                                        initial_state=s0 if with_h0 else None, cu_seqlens=cu)
    else:
        args, names = (q, k, v, g, beta, s0), ("dq", "dk", "dv", "dg", "dbeta", "dh0")
        bwd_mosaic = op.endswith("mosaic-bwd") or (packed and not op.endswith("triton-bwd"))
        config = MosaicConfig(backward="mosaic" if bwd_mosaic else "pallas")

        def mosaic(q, k, v, g, beta, s0):
            return delta_rule_mosaic(q, k, v, beta, g, scale=K ** -0.5, initial_state=s0,
                                     cu_seqlens=cu, config=config, check_device=False)

        def reference(q, k, v, g, beta, s0):
            return gated_delta_rule_reference(q, k, v, g, beta, scale=K ** -0.5,
                                              initial_state=s0, cu_seqlens=cu)

    argnums = tuple(range(1, len(args) + 1))
    with gpu_interpret():
        grads, (o, final) = jax.grad(loss, argnums, has_aux=True)(mosaic, *args)
    with jax.default_matmul_precision("highest"):
        ref_grads, (ro, rf) = jax.grad(loss, argnums, has_aux=True)(
            reference, *(x.astype(jnp.float32) for x in args))

    def rel(a, b):
        return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))

    errors = {"o": rel(o, ro), "final": rel(final, rf)}
    assert max(errors.values()) <= 5e-3, errors
    errors = {n: rel(a, b) for n, a, b in zip(names, grads, ref_grads, strict=True)
              if with_h0 or n != "dh0"}  # without an initial state its gradient is not asked
    assert max(errors.values()) <= 1e-2, errors


@pytest.mark.skipif(REASON is not None or gpu_interpret_reason() is not None,
                    reason=REASON or gpu_interpret_reason() or "")
@pytest.mark.parametrize("bad", ["q_nan", "g_positive", "g_nan"])
@pytest.mark.parametrize("op", ["simple_gla", "simple_gla/packed", "gated_delta_rule",
                                "gated_delta_rule/packed", "gla", "gla/packed"])
def test_final_state_marks_bad_inputs_in_the_interpreter(op, bad, monkeypatch):
    """The Mosaic kernels mark every bad input in their final states: a NaN in one q row
    (the walks add ``(q S_c) * 0`` to the state update, simple_gla its row sums to the decay
    factors, GLA its row sums to the final state from a carry) and a positive or NaN
    log-gate (made or kept NaN with the floor, whatever the backend's max does with NaN: the
    glue's ``floor_log_gate``, GLA's ``sums`` kernel; GLA's in one key dim) leave
    the final state of that head's row (packed: of its sequence) NaN, in the plain forward
    and in the forward under a gradient; the outputs they reach (that step's and later
    chunks' of that row and head; a bad gate's, its chunk's) are NaN, and every other final
    state and output bit for bit as on clean inputs. The guard, told so (``run_guarded``'s
    third return), reads only the final states and returns what the guard returns around
    the reference (which reads the outputs and gates): the same NaN, the finite values
    within bf16's 5e-3. JAX 0.11's
    Mosaic GPU interpreter; bf16, T = 100 (two chunks, the last padded) or packed sequences
    of 70 and 30, K = V = 64."""
    from linearnexus.kernels.common.validation import run_guarded
    from linearnexus.kernels.gla.mosaic import gla_mosaic
    from linearnexus.kernels.gla.reference import gla_reference

    packed = op.endswith("/packed")
    name = op.split("/")[0]
    monkeypatch.delenv(PACKED_ENV, raising=False)
    B, T, H, K, V = (1, 100, 2, 64, 64) if packed else (2, 100, 2, 64, 64)
    cu = jnp.array([0, 70, 100], jnp.int32) if packed else None
    # step 16 of the second chunk (packed: step 10 of the second sequence, which starts a
    # chunk at 70)
    row, t_bad, chunk_start = (0, 80, 70) if packed else (1, 80, 64)
    bad_state = (1, 0) if packed else (row, 0)  # (sequence or row, head) the NaN reaches
    q, k, v, g, beta, _, _ = _delta_inputs(5, B, T, H, K, V, B)
    if name == "gla":  # a log-gate per key dim
        g = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(9), (B, T, H, K)) + 2) / 4
    gates = {"q": None, "g": g, "beta": beta}
    names = ("g", "beta") if name == "gated_delta_rule" else ("g",)
    bad_inputs = dict(q=q, g=g)
    if bad == "q_nan":
        bad_inputs["q"] = q.at[row, t_bad, 0, 3].set(jnp.nan)
    else:  # GLA: one key dim's gate
        at = (row, t_bad, 0, 5) if name == "gla" else (row, t_bad, 0)
        bad_inputs["g"] = g.at[at].set(0.5 if bad == "g_positive" else jnp.nan)

    def mosaic(q, k, v, *gate_arrays, initial_state=None, cu_seqlens=cu):
        kw = dict(scale=K ** -0.5, cu_seqlens=cu_seqlens, initial_state=initial_state,
                  check_device=False)
        if name == "gated_delta_rule":
            return delta_rule_mosaic(q, k, v, gate_arrays[1], gate_arrays[0], **kw)
        if name == "gla":
            return gla_mosaic(q, k, v, gate_arrays[0], **kw)
        return linear_attention_mosaic(q, k, v, gate_arrays[0], **kw)

    def reference(q, k, v, *gate_arrays, initial_state=None, cu_seqlens=cu):
        f32 = [x.astype(jnp.float32) for x in (q, k, v, *gate_arrays)]
        fn = {"gated_delta_rule": gated_delta_rule_reference, "gla": gla_reference,
              "simple_gla": simple_gla_reference}[name]
        return fn(*f32, scale=K ** -0.5, cu_seqlens=cu_seqlens, initial_state=initial_state)

    clean = [gates[n] for n in names]
    arrays = [bad_inputs["g"] if n == "g" else gates[n] for n in names]
    q_in = bad_inputs["q"]
    with gpu_interpret():
        o_clean, f_clean = mosaic(q, k, v, *clean)
        o_bad, f_bad = mosaic(q_in, k, v, *arrays)
        (_, f_grad), _ = jax.vjp(lambda q: mosaic(q, k, v, *arrays), q_in)
        o_g, f_g = run_guarded(lambda *a, **kw: (*mosaic(*a, **kw), True), q_in, k, v,
                               tuple(zip(names, arrays, strict=True)), initial_state=None,
                               cu_seqlens=cu)
    with jax.default_matmul_precision("highest"):
        ro, rf = run_guarded(reference, q_in, k, v, tuple(zip(names, arrays, strict=True)),
                             initial_state=None, cu_seqlens=cu)
    f_bad, f_clean, f_grad = (np.asarray(x) for x in (f_bad, f_clean, f_grad))
    for final in (f_bad, f_grad):
        assert np.isnan(final[bad_state]).all()
        others = np.ones(final.shape[:2], bool)
        others[bad_state] = False
        np.testing.assert_array_equal(final[others], f_clean[others])
    o_bad, o_clean = np.asarray(o_bad, np.float32), np.asarray(o_clean, np.float32)
    rows_bad = np.isnan(o_bad).any(axis=-1)  # [B, T, H]
    # the NaN reaches that step's and later chunks' outputs (that row or sequence and
    # head), never earlier chunks'; a bad gate also earlier steps of its chunk (the chunk's
    # matmuls mix its steps: why the guard reruns)
    reach = np.zeros_like(rows_bad)
    reach[row, (t_bad if bad == "q_nan" else chunk_start):(cu[2] if packed else T), 0] = True
    assert rows_bad[row, t_bad, 0] and not (rows_bad & ~reach).any()
    np.testing.assert_array_equal(o_bad[~rows_bad], o_clean[~rows_bad])

    o_g, ro = np.asarray(o_g, np.float32), np.asarray(ro, np.float32)
    f_g, rf = np.asarray(f_g), np.asarray(rf)
    np.testing.assert_array_equal(np.isnan(o_g), np.isnan(ro))
    np.testing.assert_array_equal(np.isnan(f_g), np.isnan(rf))

    def rel(a, b):
        keep = ~np.isnan(b)
        return float(np.linalg.norm(a[keep] - b[keep]) / np.linalg.norm(b[keep]))

    assert rel(o_g, ro) <= 5e-3 and rel(f_g, rf) <= 5e-3


@pytest.mark.skipif(gpu_interpret_reason() is not None, reason=gpu_interpret_reason() or "")
@pytest.mark.parametrize("bad", ["q_nan", "g_positive", "g_nan", "k_nan", "v_nan"])
def test_seq_split_marks_bad_inputs_in_the_final_state(bad):
    """With the sequence split (``seq_split=2``), a bad input in the first segment (NaN
    q, k or v, a positive or NaN log-gate) still leaves the returned final state NaN (a
    NaN q row marks its segment's walk, whose final state is added at zero weight; the
    others reach the second segment's entering state), every other head's finite;
    through the guard the outputs and final states have the reference guard's NaN and
    its values within bf16's 5e-3. JAX 0.11's Mosaic GPU interpreter; bf16, T = 300
    (segments of 192 and 108 tokens), K = V = 64."""
    from linearnexus.kernels.common.validation import run_guarded

    B, T, H, K, V = 2, 300, 2, 64, 64
    row, t_bad = 1, 20
    q, k, v, g, _, _, _ = _delta_inputs(5, B, T, H, K, V, B)
    if bad == "q_nan":
        q = q.at[row, t_bad, 0, 3].set(jnp.nan)
    elif bad == "k_nan":
        k = k.at[row, t_bad, 0, 3].set(jnp.nan)
    elif bad == "v_nan":
        v = v.at[row, t_bad, 0, 3].set(jnp.nan)
    else:
        g = g.at[row, t_bad, 0].set(0.5 if bad == "g_positive" else jnp.nan)
    config = MosaicConfig(seq_split=2)

    def mosaic(q, k, v, g, initial_state=None, cu_seqlens=None):
        return linear_attention_mosaic(q, k, v, g, scale=K ** -0.5, config=config,
                                       initial_state=initial_state, check_device=False)

    def reference(q, k, v, g, initial_state=None, cu_seqlens=None):
        f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
        return simple_gla_reference(*f32, scale=K ** -0.5, initial_state=initial_state)

    with gpu_interpret():
        _, final = mosaic(q, k, v, g)
        o_g, f_g = run_guarded(lambda *a, **kw: (*mosaic(*a, **kw), True), q, k, v,
                               (("g", g),), initial_state=None, cu_seqlens=None)
    with jax.default_matmul_precision("highest"):
        ro, rf = run_guarded(reference, q, k, v, (("g", g),), initial_state=None,
                             cu_seqlens=None)
    final = np.asarray(final)
    assert np.isnan(final[row, 0]).all()
    others = np.ones(final.shape[:2], bool)
    others[row, 0] = False
    assert np.isfinite(final[others]).all()
    o_g, ro = np.asarray(o_g, np.float32), np.asarray(ro, np.float32)
    f_g, rf = np.asarray(f_g), np.asarray(rf)
    np.testing.assert_array_equal(np.isnan(o_g), np.isnan(ro))
    np.testing.assert_array_equal(np.isnan(f_g), np.isnan(rf))
    for got, want in ((o_g, ro), (f_g, rf)):
        keep = ~np.isnan(want)
        assert (np.linalg.norm(got[keep] - want[keep]) / np.linalg.norm(want[keep])) <= 5e-3


@needs_mosaic
def test_delta_dw_kernel_lowers_and_matches_xla(monkeypatch):
    """``dw = -dvn S_c^T`` in the Mosaic kernel (``mosaic_bwd.run_dw``, the default;
    ``LINEARNEXUS_MOSAIC_DW_KERNEL=0``: the XLA matmul): the gradient with the Mosaic backward lowers for CUDA
    with one more Mosaic kernel (4) and the same two Triton (WY) kernels; on JAX 0.11 the
    kernel runs in the interpreter against the XLA product at chunk splits of 1-4 (head dims
    64 / 128, V 64 / 128), and a whole gradient through it equals the XLA one's bit for bit.
    With ``dks`` in the WY backward (``LINEARNEXUS_MOSAIC_DKS_IN_WY=1``, the default) the
    gradient from ``M^{-1}`` has no ``dw`` kernel: 3 Mosaic kernels, the same 2 Triton."""
    from linearnexus.kernels.common import mosaic_delta

    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    monkeypatch.setenv(mosaic_bwd.DW_KERNEL_ENV, "1")
    monkeypatch.setenv(mosaic_delta.WY_MOSAIC_ENV, "0")  # the Triton WY backward's forms
    config = MosaicConfig(backward="mosaic")

    def loss(q, k, v, beta, g, s0):
        o, final = delta_rule_mosaic(q, k, v, beta, g, scale=0.1, initial_state=s0,
                                     config=config, check_device=False)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    specs = _delta_specs(2, 1000, 2, 128, 128, True, True)
    for in_wy, mosaic_kernels in (("0", 4), ("1", 3)):
        monkeypatch.setenv(mosaic_delta.DKS_IN_WY_ENV, in_wy)
        grad_text = _lower(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)), *specs)
        assert grad_text.count("custom_call @mosaic_gpu") == mosaic_kernels, in_wy
        assert grad_text.count("xla.gpu.triton") == 2, in_wy
    monkeypatch.setenv(mosaic_delta.DKS_IN_WY_ENV, "0")  # the dw kernel's own checks below
    if gpu_interpret_reason() is not None:
        return
    monkeypatch.delenv("LINEARNEXUS_PALLAS_INTERPRET")  # the Triton WY kernels interpreted
    for R, NC, H, K, V in ((2, 3, 2, 64, 64), (1, 4, 1, 128, 128), (1, 2, 3, 64, 128)):
        L = 64
        st = _delta_static(R, NC, H, K, V)
        k1, k2 = jax.random.split(jax.random.PRNGKey(R * NC + K))
        dvn = jax.random.normal(k1, (R, NC * L, H, V)).astype(jnp.bfloat16)
        h = jax.random.normal(k2, (R, NC, H, K, V)).astype(jnp.bfloat16)
        with gpu_interpret():
            dw = mosaic_bwd.run_dw(st, dvn, h).astype(jnp.float32)
        # [R, NC, L, H, V] x [R, NC, H, K, V] -> [R, NC, L, H, K], then [R, TP, H, K]
        ref = -jnp.einsum("rclhv,rchkv->rclhk", dvn.astype(jnp.float32).reshape(R, NC, L, H, V),
                          h.astype(jnp.float32), precision="highest").reshape(R, NC * L, H, K)
        # float32 accumulation both ways; dw rounded once to bf16 (2^-8 of each entry)
        np.testing.assert_allclose(np.asarray(dw), np.asarray(ref), rtol=2 ** -8, atol=1e-6)

    q, k, v, g, beta, s0, _ = _delta_inputs(3, 1, 100, 2, 64, 64, 1)
    grads = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(mosaic_bwd.DW_KERNEL_ENV, flag)
        with gpu_interpret():
            grads[flag] = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, beta, g, s0)
    for a, b in zip(grads["0"], grads["1"], strict=True):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                      np.asarray(b.astype(jnp.float32)))


@pytest.mark.skipif(REASON is not None or gpu_interpret_reason() is not None,
                    reason=REASON or gpu_interpret_reason() or "")
@pytest.mark.parametrize("gated,packed,dims,T", [
    (True, False, (64, 64), 100), (True, False, (64, 64), 1), (False, False, (64, 128), 65),
    (False, True, (64, 64), None), (True, True, (40, 72), None)])
def test_delta_fused_wy_forward_in_the_interpreter(gated, packed, dims, T, monkeypatch):
    """The delta rules' plain forward with the WY products in the walk
    (``MosaicConfig(fused_wy=True)``: the Triton preparation writes M^{-1} only, the walk
    forms ``vn = M^{-1} (beta v - beta e^b k S_c)``) in JAX's Mosaic GPU interpreter, against
    the per-step reference at the GPU thresholds and no worse than the separate form's
    (``w``, ``u`` through HBM) by more than 10%: the gated and the ungated rule, batch rows and
    four packed sequences (70, 0, 30, 64 tokens: one empty, one closing mid-chunk), T = 1,
    65 and 100, with initial states, head dims padded (40 -> 64, 72 -> 128); and its
    gradient with `fused_grad=False`, which runs the separate form, equal to that form's."""
    monkeypatch.delenv(PACKED_ENV, raising=False)
    lens = PACKED_LENS if packed else None
    K, V = dims
    B, T, H = (1, sum(lens), 2) if packed else (2, T, 1)
    cu = jnp.array([0, *itertools.accumulate(lens)], jnp.int32) if packed else None
    q, k, v, g, beta, s0, ks = _delta_inputs(11, B, T, H, K, V, len(lens) if packed else B)
    do = jax.random.normal(ks[0], (B, T, H, V))

    def mosaic(fused, q, k, v, beta, s0):
        return delta_rule_mosaic(q, k, v, beta, g if gated else None, scale=K ** -0.5,
                                 initial_state=s0, cu_seqlens=cu,
                                 config=MosaicConfig(fused_wy=fused, fused_grad=False),
                                 check_device=False)

    with jax.default_matmul_precision("highest"):
        ro, rf = gated_delta_rule_reference(
            *(x.astype(jnp.float32) for x in (q, k, v, g if gated else jnp.zeros_like(g), beta)),
            scale=K ** -0.5, initial_state=s0, cu_seqlens=cu)

    def rel(a, b):
        return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))

    def loss(fused, *args):
        o, final = mosaic(fused, *args)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final)

    with gpu_interpret():
        fused = mosaic(True, q, k, v, beta, s0)
        separate = mosaic(False, q, k, v, beta, s0)
        grads = [jax.grad(functools.partial(loss, f), argnums=(0, 1, 2, 3, 4))(q, k, v, beta, s0)
                 for f in (True, False)]
    for name, a, sep, ref in (("o", fused[0], separate[0], ro), ("final", fused[1], separate[1], rf)):
        assert rel(a, ref) <= 5e-3, (name, rel(a, ref))
        assert rel(a, ref) <= 1.1 * rel(sep, ref), (name, rel(a, ref), rel(sep, ref))
    for a, b in zip(*grads, strict=True):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                      np.asarray(b.astype(jnp.float32)))


@pytest.mark.skipif(REASON is not None or gpu_interpret_reason() is not None,
                    reason=REASON or gpu_interpret_reason() or "")
@pytest.mark.parametrize("packed,fused_wy", [(False, True), (True, True), (False, False)])
def test_delta_value_blocks_of_32_in_the_interpreter(packed, fused_wy, monkeypatch):
    """The delta rules' walks at value blocks of 32 (``MosaicConfig(block_v=32)``, four
    programs per head at V = 128) in JAX's Mosaic GPU interpreter: the plain forward and
    the default gradient (the storing walk, then the Mosaic backward, whose blocks do not
    depend on the forward's) give the same outputs, final states and gradients as value
    blocks of 64 (every output column's products are the same at either width), and the
    per-step reference's within the GPU thresholds. Gated, K = V = 128, T = 130 (the last
    chunk padded) with an initial state, or four packed sequences (70, 0, 30, 64); the WY
    products in the walk (``fused_wy``) or through HBM."""
    monkeypatch.delenv(PACKED_ENV, raising=False)
    B, H, K, V = 1, 1, 128, 128
    T, cu, (q, k, v, g, beta, s0), loss = _interpreter_case(13, packed, B, 130, H, K, V)

    def run(block_v, q, k, v, g, beta, s0):
        return delta_rule_mosaic(q, k, v, beta, g, scale=K ** -0.5, initial_state=s0,
                                 cu_seqlens=cu, check_device=False,
                                 config=MosaicConfig(block_v=block_v, fused_wy=fused_wy))

    args = (q, k, v, g, beta, s0)
    argnums = tuple(range(1, 7))
    with gpu_interpret():
        runs = {bv: (run(bv, *args), jax.grad(loss, argnums, has_aux=True)(
            functools.partial(run, bv), *args)) for bv in (32, 64)}
    with jax.default_matmul_precision("highest"):
        ref_grads, (ro, rf) = jax.grad(loss, argnums, has_aux=True)(
            lambda q, k, v, g, beta, s0: gated_delta_rule_reference(
                q, k, v, g, beta, scale=K ** -0.5, initial_state=s0, cu_seqlens=cu),
            *(x.astype(jnp.float32) for x in args))

    def rel(a, b):
        return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))

    (plain32, (grads32, _)), (plain64, (grads64, _)) = runs[32], runs[64]
    for a, b in zip((*plain32, *grads32), (*plain64, *grads64), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-6, atol=1e-6)
    assert rel(plain32[0], ro) <= 5e-3 and rel(plain32[1], rf) <= 5e-3
    for name, a, ref in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads32, ref_grads,
                            strict=True):
        assert rel(a, ref) <= 1e-2, (name, rel(a, ref))


@pytest.mark.skipif(REASON is not None or gpu_interpret_reason() is not None,
                    reason=REASON or gpu_interpret_reason() or "")
@pytest.mark.parametrize("gated,packed,dims,B,T,H,dks", [
    (True, False, (64, 64), 1, 100, 1, "kernel"), (True, False, (64, 64), 2, 1, 1, "kernel"),
    (False, False, (40, 72), 1, 65, 2, "kernel"), (True, True, (64, 64), 1, None, 2, "kernel"),
    (False, True, (64, 128), 1, None, 1, "kernel"),
    (True, False, (128, 128), 1, 300, 1, "kernel"), (True, False, (64, 64), 1, 130, 1, "xla"),
    (True, False, (128, 128), 1, 300, 1, "wy"), (False, True, (64, 128), 1, None, 1, "wy"),
    (True, False, (40, 72), 2, 65, 2, "wy"), (True, False, (128, 128), 1, 300, 1, "mosaic"),
    (False, True, (64, 128), 1, None, 1, "mosaic"), (True, False, (40, 72), 2, 65, 2, "mosaic"),
    (True, True, (128, 64), 1, None, 2, "mosaic"), (True, False, (64, 64), 2, 1, 1, "mosaic"),
    (True, False, (128, 128), 1, 300, 1, "mosaic-f16")])
def test_delta_fused_grad_in_the_interpreter(gated, packed, dims, B, T, H, dks, monkeypatch):
    """The delta rules' gradient from M^{-1} (``MosaicConfig(fused_grad=True)``: the fused
    walk storing S_c and vn, the reverse walk forming ``dy = M^{-T} dvn``, the ``dks``
    kernel and the Triton WY backward from ``dy``) in JAX's Mosaic GPU interpreter: every
    gradient (q, k, v, g, beta, h0) against the per-step reference at the GPU threshold
    (1e-2) and within 1.25x the separate form's error (``dy`` is rounded to bf16 once more:
    1.0-1.14x measured), outputs and final states equal to the plain fused forward's. Gated
    and ungated, T = 1 / 65 / 100 / 300, head dims 40 / 72 padded, K = V = 128, four packed
    sequences (70, 0, 30, 64 tokens), initial states throughout; ``dks``: formed by the
    Mosaic ``dw`` kernel, by the XLA matmul (``LINEARNEXUS_MOSAIC_DW_KERNEL=0``), in the
    Triton WY backward from the states (``LINEARNEXUS_MOSAIC_DKS_IN_WY=1``) or in the Mosaic
    WY backward (``LINEARNEXUS_MOSAIC_WY_BWD=1``, the reverse walk writing ``dv = beta dy``;
    K = V = 128, K = 64 / V = 128 packed, K = 128 / V = 64 packed, head dims 40 / 72, T = 1;
    and float16 inputs with the reverse walk at value blocks of 32, ``-f16``)."""
    from linearnexus.kernels.common import mosaic_delta

    monkeypatch.delenv(PACKED_ENV, raising=False)
    monkeypatch.setenv(mosaic_bwd.DW_KERNEL_ENV, "0" if dks == "xla" else "1")
    monkeypatch.setenv(mosaic_delta.DKS_IN_WY_ENV, "1" if dks == "wy" else "0")
    monkeypatch.setenv(mosaic_delta.WY_MOSAIC_ENV, "1" if dks.startswith("mosaic") else "0")
    wy_calls = _count_calls(monkeypatch, mosaic_delta, "wy_fused_backward_mosaic")
    K, V = dims
    T, cu, (q, k, v, g, beta, s0), loss = _interpreter_case(5, packed, B, T, H, K, V)
    g = g if gated else jnp.zeros_like(g)  # the reference's ungated rule; mosaic gets None
    if dks.endswith("-f16"):  # float16 operands; the reverse walk at value blocks of 32
        q, k, v, beta = (x.astype(jnp.float16) for x in (q, k, v, beta))
        monkeypatch.setenv(mosaic_bwd.STATE_SMALL_BV_ENV, "1")
        monkeypatch.setattr(mosaic_bwd, "STATE_SMALL_MIN_CHUNKS", 1)
        assert mosaic_bwd.state_block_v(rows=B, heads=H, value_dim=V, n_chunks=5) == 32

    def run(config, q, k, v, g, beta, s0):
        return delta_rule_mosaic(q, k, v, beta, g if gated else None, scale=K ** -0.5,
                                 initial_state=s0, cu_seqlens=cu, config=config,
                                 check_device=False)

    args = (q, k, v, g, beta, s0)
    argnums = tuple(range(1, 7))
    names = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
    fused = MosaicConfig(backward="mosaic", fused_wy=True, fused_grad=True)
    separate = MosaicConfig(backward="mosaic", fused_grad=False)
    with gpu_interpret():
        grads, (o, final) = jax.grad(loss, argnums, has_aux=True)(
            functools.partial(run, fused), *args)
        sep_grads, _ = jax.grad(loss, argnums, has_aux=True)(
            functools.partial(run, separate), *args)
        plain = run(fused, *args)
    with jax.default_matmul_precision("highest"):
        ref_grads, _ = jax.grad(loss, argnums, has_aux=True)(
            lambda q, k, v, g, beta, s0: gated_delta_rule_reference(
                q, k, v, g, beta, scale=K ** -0.5, initial_state=s0, cu_seqlens=cu),
            *(x.astype(jnp.float32) for x in args))

    def rel(a, b):
        return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))

    for a, b in zip((o, final), plain, strict=True):  # the storing walk computes the same
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                      np.asarray(b.astype(jnp.float32)))
    for name, a, sep, ref in zip(names, grads, sep_grads, ref_grads, strict=True):
        if name == "dg" and not gated:
            continue
        err, sep_err = rel(a, ref), rel(sep, ref)
        assert err <= 1e-2 and err <= 1.25 * sep_err, (name, err, sep_err)
    assert (len(wy_calls) > 0) == dks.startswith("mosaic")  # the Mosaic WY backward ran, or not


@needs_mosaic
def test_delta_mosaic_wy_backward_lowers_and_refuses(monkeypatch):
    """The Mosaic WY backward (``LINEARNEXUS_MOSAIC_WY_BWD=1``, ``mosaic_wy.py``): the gradient
    from ``M^{-1}`` lowers for CUDA with it as a fourth Mosaic kernel and one Triton kernel
    (``M^{-1}``) where the Triton WY backward made two Triton and three Mosaic (gated, K = V
    = 128; and with it, ungated at K = 64 / V = 128, gated at K = 128 / V = 64); the kernel
    refuses what
    it does not take before any work (a chunk of 128, a head dim not a multiple of 64, an
    argument of the wrong shape, naming it), and ``scaled_dy`` asks for the gradient from
    ``M^{-1}``."""
    from linearnexus.kernels.common import mosaic_wy

    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    config = MosaicConfig(backward="mosaic")
    for gated, (K, V), flags in ((True, (128, 128), "10"), (False, (64, 128), "1"),
                                 (True, (128, 64), "1")):
        def loss(q, k, v, beta, g, s0, gated=gated):
            o, final = delta_rule_mosaic(q, k, v, beta, g if gated else None, scale=0.1,
                                         initial_state=s0, config=config, check_device=False)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

        specs = _delta_specs(2, 1000, 2, K, V, True, True)
        for flag, mosaic_kernels, triton_kernels in (("1", 4, 1), ("0", 3, 2))[:len(flags)]:
            monkeypatch.setenv(mosaic_delta.WY_MOSAIC_ENV, flag)
            text = _lower(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)), *specs)
            assert text.count("custom_call @mosaic_gpu") == mosaic_kernels, (gated, K, V, flag)
            assert text.count("xla.gpu.triton") == triton_kernels, (gated, K, V, flag)

    assert mosaic_wy.wy_mosaic_fits(chunk=64, key_dim=128, value_dim=128)
    assert not mosaic_wy.wy_mosaic_fits(chunk=128, key_dim=128, value_dim=128)
    assert not mosaic_wy.wy_mosaic_fits(chunk=64, key_dim=96, value_dim=128)
    assert not mosaic_wy.wy_mosaic_fits(chunk=64, key_dim=128, value_dim=256)  # 3 x [L, V]

    def static(chunk, K, V):
        return _delta_static(1, 2, 1, K, V, chunk=chunk)

    x = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
    rows = jnp.zeros((1, 128, 1), jnp.float32)
    h = jnp.zeros((1, 2, 1, 64, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="chunk 64"):
        mosaic_wy.wy_fused_backward_mosaic(static(128, 64, 64), x, x, rows, rows, x, x, h, x)
    with pytest.raises(ValueError, match=r"dy: expected \(1, 128, 1, 64\), got"):
        mosaic_wy.wy_fused_backward_mosaic(static(64, 64, 64), x, x, rows, rows, x, x[:, :64],
                                           h, x)
    with pytest.raises(ValueError, match="scaled_dy: beta dy exists only"):
        mosaic_bwd.run_state_grad(dataclasses.replace(static(64, 64, 64), fused_grad=False),
                                  x, x, x, (rows,) * 3, jnp.zeros((1, 1, 64, 64)),
                                  w=x, scaled_dy=True)


@pytest.mark.skipif(REASON is not None or gpu_interpret_reason() is not None,
                    reason=REASON or gpu_interpret_reason() or "")
@pytest.mark.parametrize("R,NC,H,K,V,gated,walk", [
    (1, 2, 2, 128, 128, True, False), (1, 3, 1, 64, 128, False, False),
    (2, 1, 1, 128, 64, True, False), (1, 5, 1, 64, 64, True, True),
    (1, 4, 2, 128, 64, True, True)])
def test_delta_mosaic_wy_backward_in_the_interpreter(R, NC, H, K, V, gated, walk, monkeypatch):
    """``mosaic_wy.wy_fused_backward_mosaic`` in JAX 0.11's Mosaic GPU interpreter against
    autodiff of the plain-JAX WY form (``tests/helpers/wy.py``; the same target as the Triton
    kernel's test): ``dk`` (with the core's added), ``dbeta`` and ``dg`` within bf16's
    rounding (8e-3 of the largest entry; 1.2e-3-4.4e-3 measured), gated and ungated, K and V
    of 64 and 128 (one and two key blocks a chunk); one chunk a program (what ``wy_split``
    gives these small grids) and, ``walk``, every chunk of a row in one program's pipeline
    (``WY_PROGRAMS`` at 1: four and five chunks, as on a GPU's full grids)."""
    from linearnexus.kernels.common import mosaic_wy
    from linearnexus.kernels.common.pallas_chunk import in_chunk_cumsum
    from tests.helpers.wy import fused_wy_case

    if walk:
        monkeypatch.setattr(mosaic_wy, "WY_PROGRAMS", 1)
    assert mosaic_wy.wy_split(programs=R * H * K // 64, n_chunks=NC) == (1 if walk else NC)
    L, bf16 = 64, jnp.bfloat16
    case = fused_wy_case(31 + NC, R, NC, H, K, V, gated, bf16, L)
    st = _delta_static(R, NC, H, K, V, gated=gated)
    b = in_chunk_cumsum(case["g"], L) if gated else jnp.zeros((R, NC * L, H))
    with gpu_interpret():
        dk, dbeta, dg = mosaic_wy.wy_fused_backward_mosaic(
            st, case["k"].astype(bf16), case["v"].astype(bf16), case["beta"], b,
            case["vn"].astype(bf16), case["dy"].astype(bf16), case["states"].astype(bf16),
            case["dk_core"].astype(bf16))
    want = case["want"]
    for name, a, ref in (("dk", dk, want[0]), ("dbeta", dbeta, want[2])) + (
            (("dg", dg, want[3]),) if gated else ()):
        a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
        err = np.max(np.abs(a - ref)) / np.max(np.abs(ref))
        assert err <= 8e-3, (name, err)


def _both_ops_loss(q, k, v, beta, g, s0):
    """The sum of simple_gla's and the gated rule's outputs and final states on the Mosaic
    kernels (a gradient through both lowers each op's forward and backward kernels)."""
    o1, f1 = linear_attention_mosaic(q, k, v, g, scale=0.1, initial_state=s0, check_device=False)
    o2, f2 = delta_rule_mosaic(q, k, v, beta, g, scale=0.1, initial_state=s0, check_device=False)
    return sum(jnp.sum(x.astype(jnp.float32)) for x in (o1, f1, o2, f2))


@needs_mosaic
def test_dqk_split_fills_the_sms_on_small_grids(monkeypatch):
    """``mosaic_bwd.dqk_split`` with ``LINEARNEXUS_MOSAIC_DQK_SPLIT=1``: one program per
    (key block, head, row) where they fill the 132 SMs, else the fewest divisors of the
    chunks that do, each walking >= 8 chunks, where at most half the SMs would be busy
    (128 programs are one wave at one program per SM); one with the switch at 0 (it is on by
    default). With it on, and the reverse walk at value blocks of 32
    (``LINEARNEXUS_MOSAIC_BWD_BV32=1``: every wgmma operand at a 64-byte swizzle),
    simple_gla's and the gated rule's gradients lower for CUDA at a shape both apply to (8
    programs, 16 chunks: 2 a row), with the same kernel counts."""
    monkeypatch.setenv(mosaic_bwd.DQK_SPLIT_ENV, "1")
    assert mosaic_bwd.dqk_split(programs=256, n_chunks=64) == 1  # (8, 4096, 16, 128)
    assert mosaic_bwd.dqk_split(programs=64, n_chunks=256) == 4  # (2, 16384, 16, 128)
    assert mosaic_bwd.dqk_split(programs=4, n_chunks=16) == 2  # at most 16 / 8
    assert mosaic_bwd.dqk_split(programs=4, n_chunks=7) == 1  # too few chunks to share
    assert mosaic_bwd.dqk_split(programs=32, n_chunks=72) == 6  # 5 does not divide 72
    assert mosaic_bwd.dqk_split(programs=128, n_chunks=256) == 1  # one wave already
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    monkeypatch.setenv(mosaic_delta.WY_MOSAIC_ENV, "0")
    monkeypatch.setenv(mosaic_bwd.STATE_SMALL_BV_ENV, "1")
    assert mosaic_bwd.state_block_v(rows=2, heads=2, value_dim=128, n_chunks=16) == 32
    specs = _delta_specs(2, 1000, 2, 128, 128, True, True)

    text = _lower(jax.value_and_grad(_both_ops_loss, argnums=(0, 1, 2, 3, 4, 5)), *specs)
    assert text.count("custom_call @mosaic_gpu") == 6 and text.count("xla.gpu.triton") == 2
    monkeypatch.setenv(mosaic_bwd.DQK_SPLIT_ENV, "0")
    assert mosaic_bwd.dqk_split(programs=64, n_chunks=256) == 1



def test_wave_balance_doubles_programs_only_where_the_last_wave_fills(monkeypatch):
    """The wave balance (on; ``LINEARNEXUS_MOSAIC_WAVES=0`` turns it off): the reverse walk
    takes value blocks of 32 and ``dq / dk`` two chunk parts where twice the programs fill
    the waves >= 0.1 better at one program per SM: 192 programs (1, 8192, 96, 128) fill 0.73
    of two waves' slots, 384 fill 0.97 of three. The delta rules' forward walks keep value
    blocks of 64 there (slower at 32 on an H100). Not at (8, 4096, 16, 128) (256 of 264
    slots), (4, 4096, 64, 128) (512), packed rows or walks of too few chunks."""
    from linearnexus.kernels.common.mosaic_chunk import WAVES_ENV, balances_waves, wave_fill

    assert wave_fill(192) == pytest.approx(192 / 264) and wave_fill(384) == pytest.approx(384 / 396)
    assert wave_fill(256) == pytest.approx(256 / 264) and wave_fill(264, per_sm=2) == 1.0

    def choices():
        return (mosaic_bwd.state_block_v(rows=1, heads=96, value_dim=128, n_chunks=128),
                mosaic_bwd.dqk_split(programs=192, n_chunks=128),
                mosaic_delta.default_delta_config(rows=1, heads=96, key_dim=128, value_dim=128,
                                                  n_chunks=128).block_v)

    monkeypatch.setenv(WAVES_ENV, "0")
    assert not balances_waves(192) and choices() == (64, 1, 64)
    monkeypatch.delenv(WAVES_ENV, raising=False)
    assert balances_waves(192) and choices() == (32, 2, 64)
    for rows, heads in ((8, 16), (4, 64)):  # full waves already
        assert not balances_waves(2 * rows * heads)
        assert mosaic_bwd.state_block_v(rows=rows, heads=heads, value_dim=128,
                                        n_chunks=64) == 64
        assert mosaic_delta.default_delta_config(rows=rows, heads=heads, key_dim=128,
                                                 value_dim=128, n_chunks=64).block_v == 64
    assert mosaic_bwd.dqk_split(programs=256, n_chunks=64) == 1
    assert mosaic_bwd.state_block_v(rows=1, heads=96, value_dim=128, n_chunks=128,
                                    packed=True) == 64
    assert mosaic_bwd.state_block_v(rows=1, heads=96, value_dim=128, n_chunks=4) == 64
    assert mosaic_bwd.dqk_split(programs=192, n_chunks=8) == 1  # too few chunks to share
    assert mosaic_delta.default_delta_config(rows=1, heads=96, key_dim=128, value_dim=128,
                                             n_chunks=4).block_v == 64


@pytest.mark.skipif(REASON is not None or gpu_interpret_reason() is not None,
                    reason=REASON or gpu_interpret_reason() or "")
@pytest.mark.parametrize("op,packed", [("simple_gla", False), ("gated_delta_rule", False),
                                       ("gated_delta_rule", True)])
def test_dqk_split_is_bit_identical_in_the_interpreter(op, packed, monkeypatch):
    """``dq / dk`` with each row's chunks shared between programs (``dqk_split``; forced to 2
    and 4 here, where the heuristic needs >= 16 chunks) gives the same gradients bit for bit
    as one program per row, in JAX 0.11's Mosaic GPU interpreter: every chunk's terms are
    independent of the others'. simple_gla and the gated rule (T = 256, four chunks; and five
    packed sequences in eight), K = V = 64, initial states."""
    monkeypatch.delenv(PACKED_ENV, raising=False)
    lens = PACKED_LENS + (92,)  # packed rows of 8 chunks
    T, N = (256, 1) if not packed else (sum(lens), len(lens))
    cu = jnp.cumsum(jnp.array((0,) + lens)) if packed else None
    q, k, v, g, beta, s0, ks = _delta_inputs(11, 1, T, 2, 64, 64, N)
    do = jax.random.normal(ks[0], v.shape)

    def loss(q, k, v, g, beta, s0):
        if op == "simple_gla":
            o, final = linear_attention_mosaic(q, k, v, g, scale=0.125, initial_state=s0,
                                               cu_seqlens=cu, check_device=False)
        else:
            o, final = delta_rule_mosaic(q, k, v, beta, g, scale=0.125, initial_state=s0,
                                         cu_seqlens=cu, check_device=False)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final)

    argnums = (0, 1, 2, 3, 5) if op == "simple_gla" else (0, 1, 2, 3, 4, 5)
    splits = (1, 2, 4)  # divisors of the chunks
    grads, seen = {}, []
    for split in splits:
        def fixed(programs, n_chunks, split=split):
            seen.append(n_chunks)
            return split

        monkeypatch.setattr(mosaic_bwd, "dqk_split", fixed)
        with gpu_interpret():
            grads[split] = jax.grad(loss, argnums)(q, k, v, g, beta, s0)
    assert set(seen) == {4 if not packed else 8}
    for split in splits[1:]:
        for a, b in zip(grads[split], grads[1], strict=True):
            np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                          np.asarray(b.astype(jnp.float32)))


@pytest.mark.skipif(REASON is not None or gpu_interpret_reason() is not None,
                    reason=REASON or gpu_interpret_reason() or "")
@pytest.mark.parametrize("op,config,wy", [
    ("simple_gla", None, "0"), ("gated_delta_rule", None, "0"),
    ("gated_delta_rule", None, "1"), ("delta_rule", MosaicConfig(fused_grad=False), "0")])
def test_reverse_walk_value_blocks_of_32_in_the_interpreter(op, config, wy, monkeypatch):
    """The reverse walk at value blocks of 32 (``LINEARNEXUS_MOSAIC_BWD_BV32=1``, where 64
    leaves half the SMs idle: every test shape here) in JAX 0.11's Mosaic GPU interpreter:
    the same gradients as at 64 (every output column's products are the same at either
    width; within float32 rounding), for simple_gla, the gated rule's gradient from
    ``M^{-1}`` (with the Triton and with the Mosaic WY backward, whose ``dv = beta dy`` the
    walk writes) and the ungated rule's separate form. K = V = 128, T = 130 (the last chunk
    padded; the walk's shortest length for blocks of 32 lowered to its 3 chunks here), an
    initial state; and the switch off keeps 64."""
    monkeypatch.setenv(mosaic_delta.WY_MOSAIC_ENV, wy)
    monkeypatch.setattr(mosaic_bwd, "STATE_SMALL_MIN_CHUNKS", 3)
    wy_calls = _count_calls(monkeypatch, mosaic_delta, "wy_fused_backward_mosaic")
    B, H, K, V = 1, 1, 128, 128
    T, cu, (q, k, v, g, beta, s0), loss = _interpreter_case(17, False, B, 130, H, K, V)

    def run(q, k, v, g, beta, s0):
        if op == "simple_gla":
            return linear_attention_mosaic(q, k, v, g, scale=K ** -0.5, initial_state=s0,
                                           config=config, check_device=False)
        return delta_rule_mosaic(q, k, v, beta, g if op == "gated_delta_rule" else None,
                                 scale=K ** -0.5, initial_state=s0, config=config,
                                 check_device=False)

    args = (q, k, v, g, beta, s0)
    argnums = (0, 1, 2, 3, 5) if op == "simple_gla" else (0, 1, 2, 3, 4, 5)
    if op == "delta_rule":
        argnums = (0, 1, 2, 4, 5)
    grads = {}
    for flag, want in (("0", 64), ("1", 32)):
        monkeypatch.setenv(mosaic_bwd.STATE_SMALL_BV_ENV, flag)
        assert mosaic_bwd.state_block_v(rows=B, heads=H, value_dim=V, n_chunks=3) == want
        with gpu_interpret():
            grads[flag], _ = jax.grad(lambda *a: loss(run, *a), argnums, has_aux=True)(*args)
    for a, b in zip(grads["1"], grads["0"], strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-6, atol=1e-6)
    assert len(wy_calls) == (2 if wy == "1" else 0)  # once a gradient



def test_program_grid_puts_the_shared_blocks_last(monkeypatch):
    """The kernels' launch order (``mosaic_chunk.program_grid``): by default the blocks that
    share a head's tiles are the grid's last axis (Pallas Mosaic GPU's fastest), batch rows
    the first; ``LINEARNEXUS_MOSAIC_SPLIT_MINOR=0`` gives the order before, blocks first.
    Each axis keeps its name and size either way."""
    from linearnexus.kernels.common.mosaic_chunk import SPLIT_MINOR_ENV, program_grid

    monkeypatch.delenv(SPLIT_MINOR_ENV, raising=False)
    assert program_grid("v", 2, heads=16, rows=8) == {"grid": (8, 16, 2),
                                                      "grid_names": ("r", "h", "v")}
    monkeypatch.setenv(SPLIT_MINOR_ENV, "0")
    assert program_grid("k", 4, heads=3, rows=5) == {"grid": (4, 3, 5),
                                                     "grid_names": ("k", "h", "r")}
    monkeypatch.setenv(SPLIT_MINOR_ENV, "1")
    assert program_grid("s", 6, heads=2, rows=1)["grid"] == (1, 2, 6)


@needs_mosaic
def test_lowered_kernels_launch_their_blocks_fastest(monkeypatch):
    """What the lowering hands Mosaic GPU: every kernel of simple_gla's and the gated rule's
    gradient (the walks, ``dq / dk``, the Mosaic WY backward) has a 3-axis grid whose last
    axis, the one Pallas Mosaic GPU launches fastest (CUDA's x; JAX 0.10.2 / 0.11.2's
    ``lower_jaxpr_to_module``, spied on here), is its blocks', and with
    ``LINEARNEXUS_MOSAIC_SPLIT_MINOR=0`` its first (rows last)."""
    from jax._src.pallas.mosaic_gpu import lowering as mgpu_lowering

    from linearnexus.kernels.common.mosaic_chunk import SPLIT_MINOR_ENV

    seen = []
    original = mgpu_lowering.lower_jaxpr_to_module

    def spy(jax_mesh, axis_names, grid, *args, **kwargs):
        seen.append((tuple(axis_names.grid), tuple(grid)))
        return original(jax_mesh, axis_names, grid, *args, **kwargs)

    monkeypatch.setattr(mgpu_lowering, "lower_jaxpr_to_module", spy)
    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    monkeypatch.delenv(mosaic_delta.WY_MOSAIC_ENV, raising=False)
    specs = _delta_specs(2, 1000, 2, 128, 128, True, True)

    for flag, rows_at in (("", 0), ("0", 2)):
        monkeypatch.setenv(SPLIT_MINOR_ENV, flag)
        seen.clear()
        # a new function each time: jit's trace cache does not see the environment
        _lower(jax.grad(lambda *a: _both_ops_loss(*a), argnums=(0, 1, 2, 3, 4, 5)), *specs)
        # each op's storing walk, reverse walk and dq / dk, and the gated rule's WY backward
        assert len(seen) == 7
        for names, grid in seen:
            assert len(names) == len(grid) == 3 and names[1] == "h" and grid[1] == 2
            assert names[rows_at] == "r" and grid[rows_at] == 2
            assert names[2 - rows_at] in ("v", "k", "s")


@pytest.mark.skipif(REASON is not None or gpu_interpret_reason() is not None,
                    reason=REASON or gpu_interpret_reason() or "")
@pytest.mark.parametrize("op", ["simple_gla", "gated_delta_rule", "gated_delta_rule/mosaic-wy",
                                "gla"])
def test_launch_order_is_bit_identical_in_the_interpreter(op, monkeypatch):
    """Launching the blocks of a head side by side (``program_grid``'s default) or the rows
    fastest (``LINEARNEXUS_MOSAIC_SPLIT_MINOR=0``) gives the same outputs, final states and
    gradients bit for bit in JAX 0.11's Mosaic GPU interpreter: the kernels read their
    indices by name. Two rows, two heads, K = V = 128 (two value blocks of 64 in every walk,
    two key blocks in ``dq / dk`` and the Mosaic WY backward), T = 130, initial states;
    simple_gla, the gated rule's gradient from ``M^{-1}`` with the Triton and the Mosaic WY
    backward, and GLA at value blocks of 64."""
    from linearnexus.kernels.common.mosaic_chunk import SPLIT_MINOR_ENV
    from linearnexus.kernels.gla.mosaic import gla_mosaic

    monkeypatch.setenv(mosaic_delta.WY_MOSAIC_ENV, "1" if op.endswith("/mosaic-wy") else "0")
    wy_calls = _count_calls(monkeypatch, mosaic_delta, "wy_fused_backward_mosaic")
    B, H, K, V = 2, 2, 128, 128
    T, cu, (q, k, v, g, beta, s0), loss = _interpreter_case(23, False, B, 130, H, K, V)
    if op == "gla":  # per-key log-gates [B, T, H, K]
        g = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(5), q.shape) + 2) / 4

    def run(q, k, v, g, beta, s0):
        if op == "simple_gla":
            return linear_attention_mosaic(q, k, v, g, scale=K ** -0.5, initial_state=s0,
                                           check_device=False)
        if op == "gla":
            return gla_mosaic(q, k, v, g, scale=K ** -0.5, initial_state=s0,
                              check_device=False, config=MosaicConfig(block_v=64))
        return delta_rule_mosaic(q, k, v, beta, g, scale=K ** -0.5, initial_state=s0,
                                 check_device=False)

    argnums = (0, 1, 2, 3, 5) if op in ("simple_gla", "gla") else (0, 1, 2, 3, 4, 5)
    got = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(SPLIT_MINOR_ENV, flag)
        with gpu_interpret():
            got[flag] = jax.grad(lambda *a: loss(run, *a), argnums, has_aux=True)(
                q, k, v, g, beta, s0)
    for a, b in zip(jax.tree.leaves(got["1"]), jax.tree.leaves(got["0"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                      np.asarray(b.astype(jnp.float32)))
    assert len(wy_calls) == (2 if op.endswith("/mosaic-wy") else 0)  # once a gradient


def test_delta_mosaic_dispatch_and_declines_what_it_does_not_cover(monkeypatch):
    """Automatic dispatch takes the delta rules' mosaic backend first on a GPU for bf16 (the
    default, and with LINEARNEXUS_MOSAIC_GDN=1) and passes it by with the variable at 0;
    calls it does not cover raise NotImplementedError, configs it does not take a
    ValueError naming config."""
    from linearnexus.kernels.base import dispatch
    from linearnexus.kernels.delta_rule import api as dr_api
    from linearnexus.kernels.gated_delta_rule import api as gdn_api

    def chosen(api, dtype):
        return dispatch("op", api.BACKENDS, api.BACKEND_ORDER, lambda k: k.name, backend=None,
                        dtype=dtype, platform="gpu")

    monkeypatch.setenv(mosaic_delta.OPT_IN_ENV, "0")
    for api in (gdn_api, dr_api):
        assert api.BACKEND_ORDER[0] == "mosaic"
        assert chosen(api, jnp.bfloat16) == "pallas"
        assert api.BACKENDS["mosaic"].by_name_dtypes  # the feature table: by name only
    for flag in ("1", ""):  # on, and the default
        monkeypatch.setenv(mosaic_delta.OPT_IN_ENV, flag)
        for api in (gdn_api, dr_api):
            assert chosen(api, jnp.bfloat16) == ("mosaic" if flag or mosaic_delta.AUTOMATIC
                                                 else "pallas")
            assert chosen(api, jnp.float32) == "pallas"
    monkeypatch.setenv(mosaic_delta.OPT_IN_ENV, "1")
    for api in (gdn_api, dr_api):
        assert api.BACKENDS["mosaic"].by_name_dtypes is None
    q = jnp.ones((1, 8, 1, 64), jnp.bfloat16)
    beta = jnp.ones((1, 8, 1), jnp.bfloat16)
    g = -jnp.ones((1, 8, 1), jnp.float32)
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="compute capability"):
            gdn_api.gated_delta_rule(q, q, q, g, beta, backend="mosaic", mode="chunk")
    with pytest.raises(NotImplementedError, match="chunk_size 128"):
        delta_rule_mosaic(q, q, q, beta, g, scale=1.0, chunk_size=128, check_device=False)
    with pytest.raises(NotImplementedError, match="float32"):
        delta_rule_mosaic(q.astype(jnp.float32), q, q, beta, g, scale=1.0, check_device=False)
    if REASON is None:
        q128 = jnp.ones((1, 8, 1, 128), jnp.bfloat16)
        v256 = jnp.ones((1, 8, 1, 256), jnp.bfloat16)
        for config, v, match in (
                (MosaicConfig(backward="mosaic"), v256, "backward='mosaic' at K=128, V=256"),
                (MosaicConfig(block_v=128), q128, "block_v"),
                (MosaicConfig(backward="pallas", dqk_stages=2), q128, "dqk_stages sets"),
                (MosaicConfig(backward="mosaic", dqk_stages=3), q128, "dqk_stages=3"),
                (MosaicConfig(backward="mosaic", bwd_stages=3), q128, "bwd_stages=3"),
                (MosaicConfig(stages=3, fused_wy=False), q128, "stages=3"),
                (MosaicConfig(stages=4), q128, "stages=4"),  # fused: 3 fit at K = 128
                (MosaicConfig(bwd_stages=3), q128, "bwd_stages=3"),
                (MosaicConfig(fused_grad=True, bwd_stages=3), q128, "bwd_stages=3"),
                (MosaicConfig(fused_grad=True, backward="pallas"), q128, "fused_grad=True takes"),
                (MosaicConfig(fused_grad=True, fused_wy=False), q128, "fused_grad=True takes")):
            with pytest.raises(ValueError, match=f"config.*{re.escape(match)}"):
                delta_rule_mosaic(q128, q128, v, beta, g, scale=1.0, config=config,
                                  check_device=False)
    monkeypatch.delenv(mosaic_delta.FUSED_GRAD_ENV, raising=False)  # the module's default
    for K, n_chunks, packed, fused, grad in itertools.product(
            (64, 128), (1, 64), (False, True), (None, False, True), (None, False, True)):
        # the heuristic fits shared memory, batch rows and packed, either WY form, either
        # gradient; the gradient from M^{-1} only with the fused walk and the Mosaic backward
        cfg = mosaic_delta.default_delta_config(rows=8, heads=16, key_dim=K, value_dim=128,
                                                n_chunks=n_chunks, packed=packed,
                                                fused_wy=fused, fused_grad=grad)
        assert cfg.fused_wy == (mosaic_delta.DEFAULT_FUSED_WY if fused is None else fused)
        want = mosaic_delta.DEFAULT_FUSED_GRAD if grad is None else grad
        assert cfg.fused_grad == (want and cfg.fused_wy and cfg.backward == "mosaic")
        mosaic_delta.check_delta_config(cfg, key_dim=K, value_dim=128, packed=packed)
    # value blocks of 32 where 64 would leave half the SMs idle on a long walk (measured at
    # (2, 16384, 16, 128)); 64 at (8, 4096, 16, 128), short walks, packed rows, a call's own
    pick = functools.partial(mosaic_delta.default_delta_config, heads=16, key_dim=128,
                             value_dim=128)
    assert pick(rows=2, n_chunks=256).block_v == 32
    assert pick(rows=8, n_chunks=64).block_v == 64
    assert pick(rows=2, n_chunks=4).block_v == 64
    assert pick(rows=1, n_chunks=256, packed=True).block_v == 64
    assert pick(rows=2, n_chunks=256, block_v=64).block_v == 64
    cfg = pick(rows=2, n_chunks=256)
    mosaic_delta.check_delta_config(cfg, key_dim=128, value_dim=128)
    monkeypatch.setenv(mosaic_delta.FUSED_GRAD_ENV, "1")  # the switch without a config
    assert mosaic_delta.default_delta_config(rows=8, heads=16, key_dim=128, value_dim=128,
                                             n_chunks=64).fused_grad
    # ... which gives way to a call's own Triton backward instead of clashing with it
    own = MosaicConfig(backward="pallas")
    cfg = own.merged(mosaic_delta.default_delta_config(rows=8, heads=16, key_dim=128,
                                                       value_dim=128, n_chunks=64,
                                                       backward=own.backward))
    assert cfg.backward == "pallas" and not cfg.fused_grad
    mosaic_delta.check_delta_config(cfg, key_dim=128, value_dim=128)
    monkeypatch.setenv(mosaic_delta.FUSED_GRAD_ENV, "0")
    assert not mosaic_delta.default_delta_config(rows=8, heads=16, key_dim=128, value_dim=128,
                                                 n_chunks=64, fused_grad=None).fused_grad



@needs_mosaic
@pytest.mark.parametrize("pdl", [False, True])
def test_few_row_matmul_lowers_with_and_without_pdl(pdl, monkeypatch):
    """The Mosaic GPU few-row matmul (``fused_decode/mosaic_gemv.py``) lowers for CUDA at a
    decode projection's shape, one kernel, with ``griddepcontrol`` (programmatic dependent
    launch) exactly when asked; its default tiles fit the shared-memory budget."""
    from linearnexus.kernels.fused_decode import mosaic_gemv as mg

    monkeypatch.setenv("LINEARNEXUS_PALLAS_INTERPRET", "0")
    n, k = 1024, 2752  # the GDN LM's MLP down projection: K is 43 steps of 64
    tiles = mg.default_tiles(n, k)
    assert tiles.smem_bytes() <= mg.SMEM_BUDGET and n // tiles.bn >= 128
    text = _lower(functools.partial(mg.few_row_matmul, pdl=pdl),
                  jax.ShapeDtypeStruct((mg.ROWS, k), jnp.bfloat16),
                  jax.ShapeDtypeStruct((n, k), jnp.bfloat16))
    assert text.count("custom_call @mosaic_gpu") == 1
    assert ("griddepcontrol" in text) == pdl


@pytest.mark.skipif(REASON is not None or gpu_interpret_reason() is not None,
                    reason=REASON or gpu_interpret_reason() or "")
@pytest.mark.parametrize("dtype,n,k,width,tiles", [
    # the ring wraps (3 steps, 2 slots); x wider than K (its first K columns are read)
    (jnp.bfloat16, 40, 192, 256, (8, 64, 2)),
    # one slot; two 64-column groups per step; float16
    (jnp.float16, 48, 256, 256, (16, 128, 1)),
    # the default tiles (bn 8, bk 64 here)
    (jnp.bfloat16, 24, 320, 320, None),
])
def test_few_row_matmul_matches_in_the_interpreter(dtype, n, k, width, tiles):
    """Three batch rows and five zero rows times ``W^T``, against float32 XLA: every entry
    within one rounding of the 16-bit output; the zero rows stay zero."""
    from linearnexus.kernels.fused_decode import mosaic_gemv as mg

    kx, kw = jax.random.split(jax.random.PRNGKey(n + k))
    x = jnp.zeros((mg.ROWS, width), dtype).at[:3].set(
        jax.random.normal(kx, (3, width)).astype(dtype))
    wt = jax.random.normal(kw, (n, k)).astype(dtype)
    with gpu_interpret():
        y = mg.few_row_matmul(x, wt, tiles=None if tiles is None else mg.GemvTiles(*tiles))
    assert y.shape == (mg.ROWS, n) and y.dtype == dtype
    # [8, K] x [N, K] -> [8, N]
    ref = jnp.einsum("rk,nk->rn", x[:, :k].astype(jnp.float32), wt.astype(jnp.float32),
                     precision="highest")
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), np.asarray(ref),
                               rtol=eps, atol=eps)
    assert not np.any(np.asarray(y[3:].astype(jnp.float32)))


def test_few_row_matmul_rejects_bad_input():
    """Wrong row count, narrow x, mixed dtypes and tiles that do not divide raise ValueError
    naming the argument, before any kernel is built."""
    from linearnexus.kernels.fused_decode import mosaic_gemv as mg

    wt = jnp.zeros((64, 128), jnp.bfloat16)
    cases = [
        (jnp.zeros((1, 128), jnp.bfloat16), wt, None, "x: expected"),
        (jnp.zeros((8, 64), jnp.bfloat16), wt, None, "x: expected"),
        (jnp.zeros((8, 128), jnp.float32), wt, None, "x, wt"),
        (jnp.zeros((8, 128), jnp.bfloat16), wt, mg.GemvTiles(24, 64, 2), "tiles.bn"),
        (jnp.zeros((8, 128), jnp.bfloat16), wt, mg.GemvTiles(8, 96, 2), "tiles.bk"),
        (jnp.zeros((8, 128), jnp.bfloat16), wt, mg.GemvTiles(8, 64, 0), "tiles.stages"),
        (jnp.zeros((8, 100), jnp.bfloat16), jnp.zeros((64, 100), jnp.bfloat16), None, "wt:"),
        (jnp.zeros((8, 128), jnp.bfloat16), jnp.zeros((64, 128, 1), jnp.bfloat16), None, "wt:"),
        (jnp.zeros((8, 128), jnp.bfloat16), wt, mg.GemvTiles(8, 64, 33), "tiles.stages"),
        # wider than K but not in whole 64-column tiles (TMA's tiling of x in HBM)
        (jnp.zeros((8, 200), jnp.bfloat16), wt, None, "x: expected a width"),
    ]
    for x, w, tiles, match in cases:
        with pytest.raises(ValueError, match=re.escape(match)):
            mg.few_row_matmul(x, w, tiles=tiles)
