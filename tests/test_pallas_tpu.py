"""The ``pallas_tpu`` backend (Mosaic TPU kernels) in Pallas's TPU interpret mode on the CPU.

Every op's kernels, forward and backward, against the per-step recurrence (the reference's
step function, run by ``backend="jax", mode="recurrent"``: one jit-safe scan, packed
sequences included, where ``backend="naive"`` would compile one scan per sequence): the
output, the final state and the gradient of every input, initial state included.

The interpreter compiles slowly (~4 s of CPU per op and shape) and runs every grid step in
Python, so the issue's grid of cases is folded into seven calls (``docs/tpu.md``, "Tests"):
* packed, every op: ``cu_seqlens`` lengths (0, 1, 63, 65, 70, 129) with initial states,
  plus a T = 1000 sequence for simple_gla (the chunk core all ops share): T = 1, 63, 65
  and 1000 as sequences, and the packing lengths (0, 1, 70, 129); head dims 64 (padded to
  the 128 lanes);
* batch (no ``cu_seqlens``), T = 65 (T not a multiple of the chunk), no initial state,
  head dims 128 (no padding): simple_gla and gla in float32, gated_delta_rule with
  bfloat16 q, k, v (delta_rule runs the same kernels as gated_delta_rule without the gate,
  checked packed).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linearnexus.kernels.base import dispatch
from linearnexus.kernels.common import pallas_tpu
from linearnexus.registry import KERNEL_REGISTRY, OP_REGISTRY
from tests.helpers.parity import assert_close
from tests.op_specs import SPECS

OPS = ("simple_gla", "delta_rule", "gated_delta_rule", "gla")
OUT_TOL, GRAD_TOL = 1e-4, 1e-3
PACKED_LENGTHS = (0, 1, 63, 65, 70, 129)
RUNS = [  # (op, case, head dims)
    ("simple_gla", "packed-long", 64), ("delta_rule", "packed", 64),
    ("gated_delta_rule", "packed", 64), ("gla", "packed", 64),
    ("simple_gla", "batch", 128), ("gla", "batch", 128),
    ("gated_delta_rule", "batch-bf16", 128),
]
#: bfloat16 q, k, v (gates, beta, states float32), against the reference on the same values
#: in float32: bf16 rounding of the in-kernel operands alone gives ~1e-3
BF16_OUT_TOL, BF16_GRAD_TOL = 5e-3, 1e-2


ON_TPU = jax.default_backend() == "tpu"


@pytest.fixture
def interpret(monkeypatch):
    """The TPU interpreter off a TPU; on a TPU the kernels run compiled."""
    if not ON_TPU:
        monkeypatch.setenv(pallas_tpu.INTERPRET_ENV, "1")


@functools.partial(jax.jit, static_argnames=("op", "backend", "mode"))
def _loss_and_grads(arrays, h0, cu, cts, *, op, backend, mode):
    def loss(arrays, h0):
        o, final = OP_REGISTRY[op](*arrays, initial_state=h0, output_final_state=True,
                                   cu_seqlens=cu, mode=mode, backend=backend)
        return jnp.sum(o * cts[0]) + jnp.sum(final * cts[1]), (o, final)

    (_, outs), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(arrays, h0)
    return outs, grads


@pytest.mark.parametrize(("op", "case", "dim"), RUNS)
def test_matches_reference(op, case, dim, interpret, key):
    packed = case.startswith("packed")
    lengths = (*PACKED_LENGTHS, 1000) if case == "packed-long" else PACKED_LENGTHS if packed else (65,)
    total = sum(lengths)
    n = len(lengths) if packed else 1
    k1, k2, k3, k4 = jax.random.split(key, 4)
    named = SPECS[op].make(k1, 1, total, 1, dim, dim)
    arrays = tuple(named.values())  # positional order (a dict would be key-sorted by jit)
    bf16 = case.endswith("bf16")
    out_tol, grad_tol = (BF16_OUT_TOL, BF16_GRAD_TOL) if bf16 else (OUT_TOL, GRAD_TOL)
    if bf16:  # q, k, v in bf16; the reference sees the same (rounded) values in float32
        arrays = tuple(a.astype(jnp.bfloat16) if i < 3 else a for i, a in enumerate(arrays))
    cu = jnp.asarray(np.cumsum((0, *lengths)), jnp.int32) if packed else None
    h0 = jax.random.normal(k2, (n, 1, dim, dim), jnp.float32) if packed else None
    cts = (jax.random.normal(k3, (1, total, 1, dim), jnp.float32),
           jax.random.normal(k4, (n, 1, dim, dim), jnp.float32))
    (o, final), (grads, dh0) = _loss_and_grads(arrays, h0, cu, cts, op=op, backend="pallas_tpu",
                                               mode="chunk")
    (o_ref, final_ref), (grads_ref, dh0_ref) = _loss_and_grads(
        tuple(a.astype(jnp.float32) for a in arrays), h0, cu, cts, op=op, backend="jax",
        mode="recurrent")
    assert o.dtype == arrays[2].dtype and final.dtype == jnp.float32
    assert_close(o, o_ref, out_tol, f"{op} {case} output")
    assert_close(final, final_ref, out_tol, f"{op} {case} final state")
    for name, grad, grad_ref in zip(named, grads, grads_ref, strict=True):
        assert_close(grad, grad_ref, grad_tol, f"{op} {case} d{name}")
    if h0 is not None:
        assert_close(dh0, dh0_ref, grad_tol, f"{op} {case} d initial_state")


def test_registry_lists_the_backend():
    for op in (*OPS, "retention", "ssd"):
        assert KERNEL_REGISTRY[f"{op}:pallas_tpu"].name == "pallas_tpu"


@pytest.mark.skipif(ON_TPU, reason="on a TPU the kernels run without the switch")
def test_needs_a_tpu_or_the_interpreter_switch(monkeypatch, key):
    monkeypatch.delenv(pallas_tpu.INTERPRET_ENV, raising=False)
    arrays = SPECS["simple_gla"].make(key, 1, 8, 1, 16, 16)
    with pytest.raises(NotImplementedError, match=pallas_tpu.INTERPRET_ENV):
        OP_REGISTRY["simple_gla"](*arrays.values(), mode="chunk", backend="pallas_tpu")


@pytest.mark.parametrize("op", (*OPS, "retention", "ssd"))
def test_automatic_dispatch_takes_it_on_a_tpu_only(op):
    """On a TPU backend=None picks pallas_tpu (float32 / bfloat16); elsewhere nothing changes."""
    api = importlib.import_module(f"linearnexus.kernels.{op}.api")
    # retention and ssd run through simple_gla's backends and preference order
    order = getattr(api, "BACKEND_ORDER", None) or importlib.import_module(
        "linearnexus.kernels.simple_gla.api").BACKEND_ORDER

    def chosen(platform, dtype=jnp.float32):
        return dispatch(op, api.BACKENDS, order, lambda k: k.name, backend=None, dtype=dtype,
                        platform=platform)

    assert chosen("tpu") == chosen("tpu", jnp.bfloat16) == "pallas_tpu"
    assert chosen("tpu", jnp.float16) == chosen("tpu", jnp.float64) == "jax"
    assert chosen("cpu") == chosen("cpu", jnp.bfloat16) == "jax"
    assert chosen("gpu") == "pallas"


def test_vmem_budget_is_checked_before_launch(monkeypatch, interpret, key):
    monkeypatch.setenv(pallas_tpu.VMEM_ENV, str(1 << 20))
    arrays = SPECS["gla"].make(key, 1, 8, 1, 256, 256)
    expected = r"gla \(B=1, T=8, H=1, K=256, V=256\).*budget of 1.00 MiB"
    with pytest.raises(pallas_tpu.TpuVmemError, match=expected):
        OP_REGISTRY["gla"](*arrays.values(), mode="chunk", backend="pallas_tpu")


def test_bad_chunk_size_names_the_argument(interpret, key):
    arrays = SPECS["simple_gla"].make(key, 1, 8, 1, 16, 16)
    with pytest.raises(ValueError, match="chunk_size"):
        OP_REGISTRY["simple_gla"](*arrays.values(), mode="chunk", backend="pallas_tpu",
                                  chunk_size=12)
