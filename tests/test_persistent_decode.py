"""The persistent layer kernel (kernels/fused_decode/persistent.py): a DeltaNet-family +
SwiGLU layer's batch-1 token in one kernel, checked here in interpret mode, where its
phases run program after program (the grid barriers run only on a GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import linearnexus.kernels.fused_decode.api as layer_api
import linearnexus.kernels.fused_decode.gemv as gemv
from linearnexus.kernels.fused_decode import persistent as P
from linearnexus.kernels.fused_decode.pallas import DeltaLayerSpec
from linearnexus.models import LMModel, ModelConfig
from tests.helpers.decode import random_state

pytestmark = pytest.mark.usefixtures("cpu_dispatch")


def _spec(gated: bool, output_gate: bool, heads: int = 2, k: int = 16, v: int = 32):
    return DeltaLayerSpec(heads=heads, key_dim=k, value_dim=v, conv_width=None,
                          silu_without_conv=False, gated=gated, output_gate=output_gate,
                          allow_neg_eigval=not gated, qk_eps=1e-6, norm_eps=1e-5,
                          scale=k ** -0.5, norm_out=False, value_blocks=2)


def _operands(spec: DeltaLayerSpec, depth: int, hidden: int, dtype, seed: int = 0):
    """Random operands of order one (weights scaled by 1 / sqrt(fan-in))."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    f32 = jnp.float32

    def rnd(shape, scale=1.0, dt=dtype):
        return (scale * jax.random.normal(next(keys), shape, f32)).astype(dt)

    hv, channels = spec.heads * spec.value_dim, spec.qkv_width
    return dict(
        x=rnd((1, depth)), norm1_scale=rnd((depth,), 0.2) + 1, norm1_eps=1e-5,
        w_in_t=rnd((spec.width, depth), depth ** -0.5),
        conv_cache=rnd((1, 3, channels)), conv_weight=rnd((4, channels), 0.5),
        conv_bias=rnd((channels,), 0.1), spec=spec,
        state=rnd((1, spec.heads, spec.key_dim, spec.value_dim), 0.3, f32),
        a_log=rnd((spec.heads,), 0.5, f32) if spec.gated else None,
        dt_bias=rnd((spec.heads,), 0.5, f32) if spec.gated else None,
        o_norm_scale=rnd((spec.value_dim,), 0.2) + 1, o_norm_eps=1e-5,
        w_o_t=rnd((depth, hv), hv ** -0.5), norm2_scale=rnd((depth,), 0.2) + 1,
        norm2_eps=1e-6, w_gu_t=rnd((2 * hidden, depth), depth ** -0.5),
        w_down_t=rnd((depth, hidden), hidden ** -0.5))


@pytest.mark.parametrize("gated,output_gate,dtype,depth,hidden", [
    (True, True, "float32", 48, 72),  # Gated DeltaNet; widths that are not powers of two
    (False, False, "bfloat16", 64, 100),  # DeltaNet without an output gate, bf16
])
def test_persistent_layer_equals_the_separate_kernels(gated, output_gate, dtype, depth,
                                                      hidden):
    """The one kernel's phases are the five kernels' programs: the same output, conv cache
    and state, bit for bit."""
    ops = _operands(_spec(gated, output_gate), depth, hidden, jnp.dtype(dtype))
    spec = ops["spec"]
    fallback = lambda *a: pytest.fail("the layer kernel's reference is its backward only")  # noqa: E731
    want = P.delta_mlp_layer_separate(**ops, layer_fallback=fallback)
    on_gpu = jax.default_backend() == "gpu"
    # on a GPU also with real barriers (one program per SM), compiled: to float rounding
    # the separate kernels' tiles (2 rows a program), then the persistent default's 16 rows
    # (each row's sums run over the same tiles in the same order: the same values)
    # and the shares of 3 / 5 programs (the GPU's round-robin arithmetic, run in turn)
    for virtual, rows, programs in ((True, None, 1), (True, 16, 3), (True, 16, 5),
                                    *(((False, 16, None),) if on_gpu else ())):
        got = P.delta_mlp_layer(**ops, virtual=virtual, rows=rows, programs=programs)
        for name, a, b in zip(("out", "conv cache", "state"), got, want, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            tol = (1e-5 if dtype == "float32" else 1e-2) if on_gpu else 0.0
            np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol,
                err_msg=f"{name}, virtual={virtual}, rows={rows}, programs={programs}")
    assert float(jnp.abs(got[0].astype(jnp.float32)).max()) > 0.1  # not a row of zeros
    assert got[2].shape == (1, spec.heads, spec.key_dim, spec.value_dim)


def test_persistent_layer_refuses_bad_operands(monkeypatch):
    ops = _operands(_spec(True, True), 48, 72, jnp.float32)
    with pytest.raises(ValueError, match="spec: expected conv_width=None and norm_out=False"):
        P.delta_mlp_layer(**{**ops, "spec": _spec(True, True).__class__(
            **{**ops["spec"].__dict__, "norm_out": True})}, virtual=True)
    with pytest.raises(ValueError, match=r"w_o_t: expected shape \(48, 64\), got \(48, 63\)"):
        P.delta_mlp_layer(**{**ops, "w_o_t": ops["w_o_t"][:, :63]}, virtual=True)
    with pytest.raises(ValueError, match=r"x: expected \[1, D\], got shape \(2, 48\)"):
        P.delta_mlp_layer(**{**ops, "x": jnp.zeros((2, 48))}, virtual=True)
    with pytest.raises(ValueError, match="rows: expected a power of two dividing the conv's"):
        P.delta_mlp_layer(**ops, virtual=True, rows=12)
    monkeypatch.setenv(P.CONFIG_ENV, "rows=8,per_sm=2")
    assert P.persistent_config() == P.PersistentConfig(rows=8, per_sm=2)
    for bad, match in (("rows=8,warps=4", "expected 'rows=R,per_sm=S'"),
                       ("rows=6", "rows: expected a power of two")):
        monkeypatch.setenv(P.CONFIG_ENV, bad)
        with pytest.raises(ValueError, match=match):
            P.persistent_config()
    monkeypatch.setenv(P.PERSISTENT_ENV, "yes")
    with pytest.raises(ValueError, match="LINEARNEXUS_DECODE_PERSISTENT: expected '0' or '1'"):
        P.persistent_enabled()


def _model_on_gpu_path(monkeypatch, cfg: ModelConfig, kernel: str, seed: int):
    """``(model, a random batch-1 state, the launches of persistent.<kernel>)`` with the
    one-row and layer kernels picked as on a GPU (interpreted here)."""
    model = LMModel(cfg, rngs=nnx.Rngs(0))
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setattr(layer_api, "_compiles", lambda: True)
    launches = []
    real = getattr(P, kernel)
    monkeypatch.setattr(P, kernel, lambda **k: launches.append(1) or real(**k))
    return model, random_state(model, seed), launches


def test_model_decode_step_through_the_persistent_kernel(monkeypatch):
    """A batch-1 token of an LM with the kernels picked as on a GPU (interpreted): the
    persistent kernel runs every Gated DeltaNet layer (one launch each, in place of five),
    and logits, states and gradients equal the separate kernels' exactly."""
    pattern = ("gated_deltanet", "attention")  # the attention layer keeps its own kernels
    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, block_pattern=pattern, mlp=True,
                      tie_embeddings=True)
    model, state, launches = _model_on_gpu_path(monkeypatch, cfg, "delta_mlp_layer", 3)
    tokens = jnp.array([[5]], jnp.int32)
    graphdef, params = nnx.split(model)

    def run(params):
        logits, new = nnx.merge(graphdef, params)(tokens, state=state, mode="recurrent")
        return logits, new

    def loss(params):
        return run(params)[0].astype(jnp.float32).sum()

    def both(params):  # one program: the step and its gradient (one compile per setting)
        return run(params), jax.grad(loss)(params)

    monkeypatch.setenv(P.PERSISTENT_ENV, "0")
    want, want_grad = jax.jit(lambda p: both(p))(params)  # a new function: a new trace
    assert not launches
    monkeypatch.setenv(P.PERSISTENT_ENV, "1")
    got, got_grad = jax.jit(lambda p: both(p))(params)
    assert len(launches) == 2 * pattern.count("gated_deltanet")  # the step, and in the grad
    # interpreted: the same ops in the same order, bit for bit; compiled on a GPU (real
    # barriers, one Triton kernel against five) the compiler may contract differently, and
    # the gradient carries that on (an H100: one of 3904 entries 3e-5 off, relative)
    tol = 1e-4 if jax.default_backend() == "gpu" else 0.0
    for a, b in zip(jax.tree.leaves((got, got_grad)), jax.tree.leaves((want, want_grad)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)


def _ssd_operands(dtype, seed: int = 1):
    from linearnexus.kernels.fused_decode.pallas import SsdLayerSpec

    spec = SsdLayerSpec(heads=4, head_dim=16, groups=1, d_state=16, conv_width=None,
                        d_per_channel=False, dt_limit=None)
    depth, e, channels = 48, spec.inner, spec.conv_channels
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    f32 = jnp.float32

    def rnd(shape, scale=1.0, dt=dtype):
        return (scale * jax.random.normal(next(keys), shape, f32)).astype(dt)

    return dict(x=rnd((1, depth)), norm1_scale=rnd((depth,), 0.2) + 1, norm1_eps=1e-5,
                w_in_t=rnd((spec.width, depth), depth ** -0.5), conv_cache=rnd((1, 3, channels)),
                conv_weight=rnd((4, channels), 0.5), conv_bias=rnd((channels,), 0.1),
                spec=spec, state=rnd((1, 4, 16, 16), 0.3, f32), a_log=rnd((4,), 0.5, f32),
                dt_bias=rnd((4,), 0.5, f32), d=rnd((4,), 1.0, f32),
                out_norm_scale=rnd((e,), 0.2) + 1, out_norm_eps=1e-5,
                w_out_t=rnd((depth, e), e ** -0.5))


@pytest.mark.parametrize("dtype,state16", [("float32", False), ("bfloat16", False),
                                           ("float32", True)])
def test_persistent_mamba2_layer_equals_the_separate_kernels(dtype, state16):
    """Mamba2's three kernels (conv in in_proj, the layer kernel, the gated norm in
    out_proj) and the residual sum as one kernel's phases: the same values; with a bf16
    decode state (``state16``) both read and write it as bf16."""
    ops = _ssd_operands(jnp.dtype(dtype))
    if state16:
        ops["state"] = ops["state"].astype(jnp.bfloat16)
    fallback = lambda *a: pytest.fail("the layer kernel's reference is its backward only")  # noqa: E731
    want = P.ssd_layer_separate(**ops, layer_fallback=fallback)
    assert want[2].dtype == ops["state"].dtype  # the new state in the state's dtype
    on_gpu = jax.default_backend() == "gpu"
    for virtual, rows, programs in ((True, None, 1), (True, 16, 3),
                                    *(((False, 16, None),) if on_gpu else ())):
        got = P.ssd_layer(**ops, virtual=virtual, rows=rows, programs=programs)
        for name, a, b in zip(("out", "conv cache", "state"), got, want, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            tol = (1e-5 if dtype == "float32" else 1e-2) if on_gpu else 0.0
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=tol, atol=tol, err_msg=f"{name}, rows={rows}")
    with pytest.raises(ValueError, match=r"w_out_t: expected shape \(48, 64\)"):
        P.ssd_layer(**{**ops, "w_out_t": ops["w_out_t"][:, :-1]}, virtual=True)


def test_mamba2_model_decode_step_through_the_persistent_kernel(monkeypatch):
    """A Mamba2 LM without an MLP (the decode benchmark's): every layer through the
    persistent kernel, logits and states equal to the separate kernels'."""
    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, block_pattern=("mamba2",),
                      mlp=False, tie_embeddings=True)
    model, state, launches = _model_on_gpu_path(monkeypatch, cfg, "ssd_layer", 4)
    tokens = jnp.array([[7]], jnp.int32)

    def run():
        return model(tokens, state=state, mode="recurrent")

    monkeypatch.setenv(P.PERSISTENT_ENV, "0")
    want = jax.jit(lambda: run())()
    monkeypatch.setenv(P.PERSISTENT_ENV, "1")
    got = jax.jit(lambda: run())()
    assert len(launches) == 2
    tol = 1e-5 if jax.default_backend() == "gpu" else 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)
