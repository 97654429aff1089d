"""One-token calls with the projections fused into one matmul (``modules.common.fused_dense``)
against the same calls with a matmul per projection (``LINEARNEXUS_FUSED_DECODE=0``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus.modules.common import (
    FUSED_DECODE_ENV,
    SwiGLU,
    decode_weights,
    fused_dense,
    using_decode_weights,
)
from linearnexus.registry import LAYER_REGISTRY

# the kernels run only where a test picks them, on the CPU and on a GPU alike
pytestmark = pytest.mark.usefixtures("cpu_dispatch")


def _both(monkeypatch, fn):
    """``fn()`` with the fused path, then with it off."""
    fused = fn()
    monkeypatch.setenv(FUSED_DECODE_ENV, "0")
    plain = fn()
    monkeypatch.delenv(FUSED_DECODE_ENV)
    return fused, plain


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   rtol=1e-5, atol=1e-6)


# (block, config overrides, masked, dtype, batch). Unmasked calls whose head sizes are
# powers of two run the fused layer kernel (kernels/fused_decode; through the interpreter
# here): GDN with the conv and output gate, DeltaNet without them, Mamba2 with groups,
# per-channel D and a dt clamp in bf16 (without a conv, the XLA path's bf16 silu rounds
# per op on the CPU, the kernel once: those two are compared in float32). Masked calls
# and other head sizes keep the fused projection only.
CASES = [
    ("gated_deltanet", {}, False, "float32", 2),
    ("gated_deltanet", {}, True, "float32", 3),
    ("deltanet", {"expand_v": 1.5}, True, "float32", 3),
    ("deltanet", {"use_short_conv": False, "use_output_gate": False, "allow_neg_eigval": True},
     False, "float32", 1),
    ("mamba2", {"ngroups": 2, "D_has_hdim": True, "dt_limit": (0.0, 0.5), "conv_bias": False},
     False, "bfloat16", 2),
]


@pytest.mark.parametrize("name,overrides,masked,dtype,batch", CASES)
def test_one_token_block_matches_unfused(monkeypatch, name, overrides, masked, dtype, batch):
    """The one-token call (fused projection, and the fused layer kernel where it applies)
    against the unfused call (``LINEARNEXUS_FUSED_DECODE=0``: a matmul per projection,
    the conv, gates, op and norm apart): float32 to 1e-5, bf16 to 5e-3, every output and
    state leaf."""
    import linearnexus.kernels.fused_decode.api as layer_api

    monkeypatch.setattr(layer_api, "_compiles", lambda: True)  # pick it as on a GPU
    launched = []

    def record(real):  # the layer step's arguments and outputs, in the caller's trace
        def step(*args, fallback):
            launched.append((args, real(*args, fallback=fallback)))
            return launched[-1][1]
        return step

    for module, step in (("linearnexus.modules.linear.deltanet", "delta_layer_step"),
                         ("linearnexus.modules.ssm.mamba2", "ssd_layer_step")):
        monkeypatch.setattr(f"{module}.{step}", record(getattr(layer_api, step)))
    entry = LAYER_REGISTRY[name]
    block = entry.block(entry.config.tiny(dtype=dtype, **overrides), rngs=nnx.Rngs(1))
    zeros = jax.tree.leaves(block.init_state(batch))
    keys = jax.random.split(jax.random.key(0), len(zeros))  # a non-zero state to start from
    state = jax.tree.unflatten(jax.tree.structure(block.init_state(batch)), [
        (0.3 * jax.random.normal(k, z.shape)).astype(z.dtype) for k, z in zip(keys, zeros, strict=True)])
    x = jax.random.normal(jax.random.key(1), (batch, 1, 16))
    mask = jnp.array([[True], [False], [True]]) if masked else None  # a pad row stays inert

    def call(x, state):  # jitted: one compile instead of an eager compile per op
        launched.clear()
        out = block(x, state=state, mask=mask)
        # the kernel's outputs and the block's unfused reference on the same inputs (the
        # reference is the kernel's backward pass)
        return out, [(got, block._layer_reference(*args)) for args, got in launched]

    (fused, pairs), (plain, _) = _both(monkeypatch,
                                       lambda: jax.jit(lambda x, s: call(x, s))(x, state))
    assert len(pairs) == (0 if masked or "expand_v" in overrides else 1)
    for got, want in [(fused, plain), *pairs]:
        if dtype == "float32":
            _close(got, want)
            continue
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.linalg.norm(a - b) <= 5e-3 * np.linalg.norm(b)


def test_swiglu_one_token_matches_unfused(monkeypatch):
    mlp = SwiGLU(12, 20, use_bias=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 1, 12))
    fused, plain = _both(monkeypatch, lambda: mlp(x))
    _close(fused, plain)


def test_decode_weights_are_read_and_checked():
    """``fused_dense`` reads the concatenation computed once (``generate.Decoder`` passes
    it to every step) instead of concatenating; a table of another structure is refused."""
    mlp = SwiGLU(12, 20, use_bias=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 1, 12))
    weights = decode_weights(mlp)
    with using_decode_weights(mlp, weights):
        _close(mlp(x), mlp(x.reshape(2, 1, 12)))
    doubled = {k: (2 * w, 2 * b) for k, (w, b) in weights.items()}
    with using_decode_weights(mlp, doubled):  # the table is what the matmul reads
        gate, up = fused_dense(x, mlp.decode_linears()[0])
    _close((gate, up), (2 * mlp.w_gate(x), 2 * mlp.w_up(x)))
    with pytest.raises(ValueError, match="weights"), using_decode_weights(mlp, {"other/0": weights["0"]}):
        pass
    with pytest.raises(ValueError, match="kernel of shape"), using_decode_weights(
            mlp, {"0": (weights["0"][0][:4], None)}):
        pass


def test_fused_dense_groups_and_errors():
    rngs = nnx.Rngs(0)
    lins = [nnx.Linear(6, w, use_bias=b, rngs=rngs) for w, b in ((3, False), (4, True), (2, False))]
    x = jax.random.normal(jax.random.key(3), (2, 6))
    first, rest = fused_dense(x, lins, groups=(2, 1))
    _close((first, rest), (jnp.concatenate([lins[0](x), lins[1](x)], -1), lins[2](x)))
    with pytest.raises(ValueError, match="groups"):
        fused_dense(x, lins, groups=(1, 1))
    with pytest.raises(ValueError, match="linears"):
        fused_dense(x, [lins[0], nnx.Linear(5, 2, rngs=rngs)])
    with pytest.raises(ValueError, match="linears"):
        fused_dense(x, [])


def test_layer_step_refuses_bad_arguments():
    """Shapes are checked before the launch, naming the argument; specs the kernel cannot
    take are refused (the blocks ask ``layer_kernel_ready`` first and never send them)."""
    from linearnexus.kernels.fused_decode import DeltaLayerSpec, delta_layer_step

    spec = DeltaLayerSpec(heads=2, key_dim=4, value_dim=8, conv_width=4, silu_without_conv=True,
                          gated=False, output_gate=True, allow_neg_eigval=False, qk_eps=1e-6,
                          norm_eps=1e-5, scale=0.5)
    proj = jnp.zeros((1, spec.width))
    args = [proj, jnp.zeros((1, 3, spec.qkv_width)), jnp.zeros((4, spec.qkv_width)), None,
            jnp.zeros((1, 2, 4, 8)), None, None, jnp.ones((8,))]
    bad_state = list(args)
    bad_state[4] = jnp.zeros((1, 2, 8, 4))
    with pytest.raises(ValueError, match="state: expected shape"):
        delta_layer_step(spec, *bad_state, fallback=None)
    with pytest.raises(NotImplementedError, match="power-of-two"):
        delta_layer_step(spec.__class__(**{**spec.__dict__, "value_dim": 12}), *args,
                         fallback=None)


def test_layer_warps_default_and_override(monkeypatch):
    from linearnexus.kernels.fused_decode.pallas import FEW_PROGRAMS, WARPS_ENV, layer_warps

    monkeypatch.delenv(WARPS_ENV, raising=False)
    assert layer_warps(FEW_PROGRAMS, 64 * 128) == 2  # batch-1 grids: few programs
    assert layer_warps(64 * 32, 64 * 64) == 2  # Mamba2 at batch 64
    assert layer_warps(64 * 16, 64 * 128) == 2  # GDN at batch 64
    assert layer_warps(64 * 16, 128 * 128) == 4  # the largest tiles in a full grid
    monkeypatch.setenv(WARPS_ENV, "8")
    assert layer_warps(64 * 32, 64 * 64) == 8
    monkeypatch.setenv(WARPS_ENV, "3")
    with pytest.raises(ValueError, match=f"{WARPS_ENV}: expected 1, 2, 4 or 8, got '3'"):
        layer_warps(1, 1)


@pytest.mark.parametrize("name,overrides", [("gated_deltanet", {}),
                                            ("mamba2", {"ngroups": 2, "D_has_hdim": True})])
def test_sixteen_bit_state_through_the_layer_kernel(monkeypatch, name, overrides):
    """A bf16 recurrent state (``generate.Decoder(state_dtype="bfloat16")``): the layer
    kernel reads and writes it as bf16 (no float32 copy), updating in float32, and agrees
    with the unfused path on the same bf16 state: the output to 1e-5 (float32 compute),
    the new state to its one rounding; gradients flow through the reference as before."""
    import linearnexus.kernels.fused_decode.api as layer_api
    from linearnexus.core.cache import RecurrentState, cast_recurrent

    monkeypatch.setattr(layer_api, "_compiles", lambda: True)  # pick it as on a GPU
    finals = []
    module, step = (("linearnexus.modules.linear.deltanet", "delta_layer_step")
                    if name != "mamba2" else ("linearnexus.modules.ssm.mamba2", "ssd_layer_step"))
    real = getattr(layer_api, step)

    def record(*args, fallback):
        out = real(*args, fallback=fallback)
        finals.append(out[2].dtype)
        return out

    monkeypatch.setattr(f"{module}.{step}", record)
    entry = LAYER_REGISTRY[name]
    block = entry.block(entry.config.tiny(dtype="float32", **overrides), rngs=nnx.Rngs(1))
    zeros = jax.tree.leaves(block.init_state(2))
    keys = jax.random.split(jax.random.key(5), len(zeros))
    state = jax.tree.unflatten(jax.tree.structure(block.init_state(2)), [
        (0.3 * jax.random.normal(k, z.shape)).astype(z.dtype) for k, z in zip(keys, zeros, strict=True)])
    state = cast_recurrent(state, "bfloat16")
    x = jax.random.normal(jax.random.key(6), (2, 1, 16))
    run = jax.jit(lambda x, s: block(x, state=s))
    (fused, plain) = _both(monkeypatch, lambda: run(x, state))
    assert finals == [jnp.bfloat16]  # the kernel ran once (the unfused call never reaches it)
    (y_f, s_f), (y_p, s_p) = fused, plain
    np.testing.assert_allclose(np.asarray(y_f), np.asarray(y_p), rtol=1e-5, atol=1e-6)
    rec = lambda s: [r.state for r in jax.tree.leaves(  # noqa: E731
        s, is_leaf=lambda v: isinstance(v, RecurrentState)) if isinstance(r, RecurrentState)]
    for a, b in zip(rec(s_f), rec(s_p), strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-6)  # one bf16 rounding apart
    # the backward pass: the reference's VJP at the bf16 state (its new state rounded the
    # same), to the input and to the state (the new state's cotangent in bf16 too)
    def loss(x, s):
        y, new = block(x, state=s)
        return jnp.sum(y ** 2) + sum(jnp.sum(r.astype(jnp.float32) ** 2) for r in rec(new))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, state)
    monkeypatch.setenv("LINEARNEXUS_FUSED_DECODE", "0")
    want = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, state)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=2e-2, atol=1e-4)


def test_layer_kernels_lower_with_sixteen_bit_states(monkeypatch):
    """The GDN and Mamba2 layer kernels lowered for CUDA (Triton form, not interpreted) at
    the benchmark models' sizes, batch 64, with a bf16 state: one Triton call each, whose
    state operand and result are bf16 (read and written as such, aliased in place)."""
    from linearnexus.kernels.common.gpu_lowering import lower_for_gpu
    from linearnexus.kernels.common.pallas import INTERPRET_ENV
    from linearnexus.kernels.fused_decode.pallas import (
        DeltaLayerSpec,
        SsdLayerSpec,
        delta_layer,
        ssd_layer,
    )

    monkeypatch.setenv(INTERPRET_ENV, "0")
    bf, f32, b = jnp.bfloat16, jnp.float32, 64
    sds = jax.ShapeDtypeStruct
    ssd = SsdLayerSpec(heads=24, head_dim=64, groups=1, d_state=64, conv_width=4,
                       d_per_channel=False, dt_limit=None)
    c = ssd.conv_channels
    text = lower_for_gpu(
        lambda *a: ssd_layer(ssd, *a), sds((b, ssd.width), bf), sds((b, 3, c), bf),
        sds((4, c), f32), sds((c,), f32), sds((b, 24, 64, 64), bf), sds((24,), f32),
        sds((24,), f32), sds((24,), f32))
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "tensor<64x24x64x64xbf16>" in text and "tensor<64x24x64x64xf32>" not in text
    gdn = DeltaLayerSpec(heads=16, key_dim=64, value_dim=128, conv_width=4,
                         silu_without_conv=True, gated=True, output_gate=True,
                         allow_neg_eigval=False, qk_eps=1e-6, norm_eps=1e-5, scale=0.125)
    q = gdn.qkv_width
    text = lower_for_gpu(
        lambda *a: delta_layer(gdn, *a), sds((b, gdn.width), bf), sds((b, 3, q), bf),
        sds((4, q), f32), None, sds((b, 16, 64, 128), bf), sds((16,), f32), sds((16,), f32),
        sds((128,), f32))
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "tensor<64x16x64x128xbf16>" in text and "tensor<64x16x64x128xf32>" not in text


@pytest.mark.parametrize("d_per_channel", [False, True])
def test_ssd_value_blocks_match_one_block(d_per_channel):
    """The Mamba2 layer kernel with P split over 2 and 4 programs per head equals the kernel
    with one (interpreted: the output, conv cache and state, bit for bit), a NaN in one
    block's x marking the whole head's state and output as one program would."""
    import dataclasses

    from linearnexus.kernels.fused_decode.pallas import SsdLayerSpec, ssd_layer

    sp = SsdLayerSpec(heads=4, head_dim=16, groups=2, d_state=8, conv_width=4,
                      d_per_channel=d_per_channel, dt_limit=(0.0, 0.5))
    ks = jax.random.split(jax.random.key(11), 8)
    b, c = 3, sp.conv_channels
    proj = jax.random.normal(ks[0], (b, sp.width)).astype(jnp.bfloat16)
    proj = proj.at[1, sp.inner + 1 * sp.head_dim + 13].set(jnp.nan)  # row 1, head 1, block 1
    args = (proj, jax.random.normal(ks[1], (b, 3, c)).astype(jnp.bfloat16),
            0.3 * jax.random.normal(ks[2], (4, c)), 0.1 * jax.random.normal(ks[3], (c,)),
            0.3 * jax.random.normal(ks[4], (b, 4, 8, 16)), jax.random.normal(ks[5], (4,)),
            jax.random.normal(ks[6], (4,)),
            jax.random.normal(ks[7], (4, 16) if d_per_channel else (4,)))
    one = ssd_layer(sp, *args)
    y1, _, s1 = (np.asarray(a, np.float32) for a in one)
    assert np.isnan(s1[1, 1]).all() and np.isnan(y1[1, 16:32]).all()  # the whole head
    assert not np.isnan(s1[1, 0]).any() and not np.isnan(s1[0]).any()
    for blocks in (2, 4):
        split = ssd_layer(dataclasses.replace(sp, value_blocks=blocks), *args)
        for a, w in zip(split, one, strict=True):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(w, np.float32))
