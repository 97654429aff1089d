"""The fused projection kernels for several rows (``kernels/fused_decode/gemv.py``,
``_rows_kernel``: batch 2 .. 64 decoding with ``LINEARNEXUS_DECODE_ROWS``): each form
against the same ops in XLA through the Pallas interpreter, at row counts that are not
tiles (2, 5, 17) and sizes that are not multiples of the tiles; and batch-3 one-token model
calls through them against the XLA mode, over two tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import linearnexus.kernels.fused_decode.gemv as gemv
import linearnexus.modules.common as common
from linearnexus.models import LMModel, ModelConfig

pytestmark = pytest.mark.usefixtures("cpu_dispatch")


def _close(got, want, dtype):
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16: one rounding of O(1) values
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows,options", [
    (2, {"glu": True, "add": True, "norm": True, "transposed": True}),  # the MLP's first half
    (17, {"residual": True, "residual_add": True}),  # its second
    (5, {"norm": True}),  # a pre-norm projection / the tied head
])
def test_fused_rows_match_the_layers_ops(rows, options, dtype):
    """``one_row_fused`` with ``rows`` rows equals its XLA reference (the layers' ops) at
    D = 100, N = 70: float32 1e-5, bf16 one rounding."""
    depth, width = 100, 70
    keys = jax.random.split(jax.random.key(rows), 6)

    def rnd(k, shape, scale=1.0):
        return (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    out = 2 * width if options.get("glu") else width
    transposed = options.get("transposed", False)
    w = rnd(keys[1], (out, depth) if transposed else (depth, out), depth ** -0.5)
    kw = {"transposed": transposed, "glu": options.get("glu", False)}
    if options.get("add"):
        kw["add"] = rnd(keys[2], (rows, depth))
    if options.get("norm"):
        kw["norm_scale"] = 1.0 + 0.1 * jax.random.normal(keys[3], (depth,), jnp.float32)
        kw["norm_eps"] = 1e-5
    if options.get("residual"):
        kw["residual"] = rnd(keys[4], (rows, width))
    if options.get("residual_add"):
        kw["residual_add"] = rnd(keys[5], (rows, width))
    x = rnd(keys[0], (rows, depth))
    got = jax.jit(lambda x, w: gemv.one_row_fused(x, w, **kw))(x, w)
    want = gemv._fused_reference(x, w, kw.get("add"), kw.get("norm_scale"), kw.get("residual"),
                                 kw.get("residual_add"), norm_eps=kw.get("norm_eps"),
                                 out_dtype=jnp.dtype(dtype), transposed=transposed,
                                 glu=kw["glu"])
    _close(got, want, dtype)
    if dtype == "float32":  # the VJP's wiring: the reference's gradient, operands in order
        probe = jax.random.normal(keys[0], (rows, width))
        got_g = jax.grad(lambda x: jnp.sum(gemv.one_row_fused(x, w, **kw) * probe))(x)
        want_g = jax.grad(lambda x: jnp.sum(gemv._fused_reference(
            x, w, kw.get("add"), kw.get("norm_scale"), kw.get("residual"),
            kw.get("residual_add"), norm_eps=kw.get("norm_eps"), out_dtype=jnp.dtype(dtype),
            transposed=transposed, glu=kw["glu"]) * probe))(x)
        np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-5)


def test_a_float32_row_with_a_norm_is_rounded_to_the_weights_dtype():
    """Mamba2's gated-norm input arrives in float32 beside bf16 weights: the kernel rounds
    the normalised rows to bf16, as the reference does."""
    x = jax.random.normal(jax.random.key(0), (3, 64))
    w = (0.1 * jax.random.normal(jax.random.key(1), (64, 40))).astype(jnp.bfloat16)
    scale = jnp.linspace(0.5, 1.5, 64)
    got = gemv.one_row_fused(x, w, norm_scale=scale, norm_eps=1e-6)
    want = gemv._fused_reference(x, w, None, scale, None, None, transposed=False, glu=False,
                                 norm_eps=1e-6, out_dtype=jnp.dtype(jnp.bfloat16))
    _close(got, want, "bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("width,bias,norm", [(4, True, True), (2, False, False)])
def test_conv_rows_are_the_matmul_then_the_conv_step(dtype, width, bias, norm):
    """``one_row_conv`` with 5 rows equals XLA's matmul then the conv's one-token step on
    columns [16, 48) of 70 (D = 100), each row's cache shifted: float32 1e-5, bf16 one
    rounding."""
    from linearnexus.kernels.conv.api import conv_step

    rows, d, n, c, start = 5, 100, 70, 32, 16
    ks = jax.random.split(jax.random.key(width), 6)
    x = jax.random.normal(ks[0], (rows, d)).astype(dtype)
    wt = (0.1 * jax.random.normal(ks[1], (n, d))).astype(dtype)
    cache = jax.random.normal(ks[2], (rows, width - 1, c)).astype(dtype)
    cw = 0.5 * jax.random.normal(ks[3], (width, c))
    cb = jax.random.normal(ks[4], (c,)) if bias else None
    scale = jax.random.uniform(ks[5], (d,), minval=0.5, maxval=1.5) if norm else None
    got, got_cache = gemv.one_row_conv(x, wt, cache, cw, cb, conv_start=start, transposed=True,
                                       norm_scale=scale, norm_eps=1e-5 if norm else None)
    xin = x
    if norm:
        xf = x.astype(jnp.float32)
        xin = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5) * scale
               ).astype(dtype)
    y = jnp.dot(xin, wt.T, preferred_element_type=jnp.float32).astype(dtype)  # [R, N]
    seg, want_cache = conv_step(y[:, None, start:start + c], cache, cw, cb, activation="silu",
                                backend="jax")  # [R, 1, C]
    _close(got, y.at[:, start:start + c].set(seg[:, 0]), dtype)
    _close(got_cache, want_cache, dtype)


@pytest.mark.parametrize("rows,gated,dtype", [(3, True, "float32"), (3, False, "float32"),
                                              (17, True, "bfloat16")])
def test_group_norm_rows_are_the_head_norm_then_the_matmul(rows, gated, dtype):
    """``one_row_group_norm`` with several rows: each row's per-head norm (heads of 16 in
    64-column tiles, so the tile is reshaped into 4 groups a row), the silu gate read from a
    longer row at offset 37, then XLA's matmul (float32 1e-5, bf16 one rounding)."""
    heads, size, n, offset = 6, 16, 40, 37
    d = heads * size
    ks = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(ks[0], (rows, d)).astype(dtype)
    w = (0.1 * jax.random.normal(ks[1], (d, n))).astype(dtype)
    gate = jax.random.normal(ks[2], (rows, 150)).astype(dtype) if gated else None
    scale = jax.random.uniform(ks[3], (size,), minval=0.5, maxval=1.5)
    got = gemv.one_row_group_norm(x, w, group=size, norm_scale=scale, norm_eps=1e-5,
                                  gate=gate, gate_offset=offset)
    xh = x.astype(jnp.float32).reshape(rows, heads, size)  # [R, D] -> [R, H, V]
    y = xh * jax.lax.rsqrt(jnp.mean(xh * xh, -1, keepdims=True) + 1e-5) * scale
    if gated:
        y = y * jax.nn.silu(gate[:, offset:offset + d].astype(jnp.float32).reshape(
            rows, heads, size))  # [R, D] -> [R, H, V]
    want = jnp.dot(y.reshape(rows, d).astype(dtype), w,  # [R, H, V] -> [R, D]
                   preferred_element_type=jnp.float32).astype(dtype)
    _close(got, want, dtype)


def test_rows_are_checked():
    x, w = jnp.ones((3, 8)), jnp.ones((8, 6))
    with pytest.raises(ValueError, match=r"residual: expected shape \(3, 6\)"):
        gemv.one_row_fused(x, w, residual=jnp.ones((1, 6)))
    with pytest.raises(ValueError, match=r"conv_cache: expected \[R, W-1, C\] with R=3"):
        gemv.one_row_conv(x, jnp.ones((8, 48)), jnp.ones((1, 3, 16)), jnp.ones((4, 16)))
    with pytest.raises(ValueError, match="conv_start: expected a multiple of 16"):
        gemv.one_row_conv(x, jnp.ones((8, 48)), jnp.ones((3, 3, 16)), jnp.ones((4, 16)),
                          conv_start=2)


def test_rows_switch(monkeypatch):
    """``LINEARNEXUS_DECODE_ROWS`` bounds the rows ``fused_ready`` accepts (default 1) and
    refuses values outside 1..64, naming the variable."""
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setenv(gemv.GEMV_ENV, "pallas")
    monkeypatch.delenv(gemv.ROWS_ENV, raising=False)
    assert gemv.fused_ready(jnp.ones((1, 1, 8))) and not gemv.fused_ready(jnp.ones((2, 1, 8)))
    assert not gemv.fused_ready(jnp.ones((0, 1, 8)))  # no rows: XLA's path
    monkeypatch.setenv(gemv.ROWS_ENV, "64")
    assert gemv.fused_ready(jnp.ones((64, 1, 8))) and not gemv.fused_ready(jnp.ones((65, 1, 8)))
    assert not gemv.one_row_ready(jnp.ones((2, 1, 8)))  # plain matmuls stay one-row only
    for bad in ("0", "65", "x"):
        monkeypatch.setenv(gemv.ROWS_ENV, bad)
        with pytest.raises(ValueError, match="LINEARNEXUS_DECODE_ROWS: expected an integer"):
            gemv.fused_rows()


# (GDN in bf16 ran here too, 10 s of CI; its bf16 rounding places are the kernels' own,
# checked at 17 rows above, and the path is an opt-in measured slower than XLA's matmuls)
@pytest.mark.parametrize("pattern,options,dtype", [
    (("gated_deltanet",), {}, "float32"),
    (("mamba2",), {"mamba2": {"d_state": 16, "headdim": 16}}, "float32"),
    (("attention",), {}, "float32"),
])
def test_batch3_decoding_through_the_row_kernels(monkeypatch, pattern, options, dtype):
    """Batch-3 one-token calls with ``LINEARNEXUS_DECODE_ROWS=4`` and the kernels picked
    (interpreted here, compiled on a GPU): the norms, conv, SwiGLU and residual sums run in
    the projections' kernels (for the recurrent blocks the conv in the input projection's,
    once per layer and token; GDN's output norm and gate in ``o_proj``'s) and the logits and
    every state over two tokens (the second reads the first's state) equal the XLA mode's
    (float32 1e-5, with XLA's float32 matmuls at full precision as the kernels' are; bf16
    2e-2 on O(1) values)."""
    import linearnexus.kernels.fused_decode.api as layer_api

    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, block_pattern=pattern,
                      mlp=pattern != ("mamba2",), tie_embeddings=True, block_options=options,
                      dtype=dtype)
    model = LMModel(cfg, rngs=nnx.Rngs(5))
    steps = jnp.array([[3, 9], [17, 60], [40, 2]], jnp.int32)  # [B, steps]

    def run():
        state, out = model.init_state(3), []
        with jax.default_matmul_precision("float32"):  # (a GPU's default would be TF32)
            for t in range(steps.shape[1]):
                logits, state = model(steps[:, t:t + 1], state=state, mode="recurrent")
                out.append(logits)
        return out, state

    monkeypatch.setenv(gemv.GEMV_ENV, "xla")
    want = jax.jit(lambda: run())()  # one compile, not an eager op-by-op run (CI time)
    monkeypatch.setattr(layer_api, "_compiles", lambda: True)
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setenv(gemv.GEMV_ENV, "pallas")
    monkeypatch.setenv(gemv.ROWS_ENV, "4")
    fused, convs, heads = [], [], []
    real_fused, real_conv = common.one_row_fused, common.one_row_conv
    real_heads = common.one_row_group_norm
    monkeypatch.setattr(common, "one_row_fused",
                        lambda x, *a, **k: fused.append(x.shape[0]) or real_fused(x, *a, **k))
    monkeypatch.setattr(common, "one_row_conv",
                        lambda x, *a, **k: convs.append(x.shape[0]) or real_conv(x, *a, **k))
    monkeypatch.setattr(common, "one_row_group_norm",
                        lambda x, *a, **k: heads.append(x.shape[0]) or real_heads(x, *a, **k))
    got = jax.jit(lambda: run())()  # (a new function: traced anew under the switches)
    calls = cfg.n_layers * steps.shape[1]
    assert fused and set(fused) == {3}
    if pattern != ("attention",):
        assert convs == [3] * calls
    if pattern == ("gated_deltanet",):
        assert heads == [3] * calls
    tol = 1e-5 if dtype == "float32" else 2e-2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)
    # batch 5 is past the switch: XLA's path, no row kernels
    fused.clear()
    jax.eval_shape(lambda: model(jnp.ones((5, 1), jnp.int32), state=model.init_state(5),
                                 mode="recurrent"))
    assert not fused
