"""One-row matmuls for batch-1 decoding (``kernels/fused_decode/gemv.py``): every mode
against XLA's matmul, the kernels through the Pallas interpreter, at sizes that are not
multiples of the tiles; and one-token model calls with the kernels picked (as on a GPU)
against the same calls without."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import linearnexus.kernels.fused_decode.gemv as gemv
import linearnexus.modules.common as common
from linearnexus.models import LMModel, ModelConfig

# the kernels run only where a test picks them, on the CPU and on a GPU alike
pytestmark = pytest.mark.usefixtures("cpu_dispatch")


def _ref(x, w, transposed):
    xf, wf = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return xf.reshape(1, -1) @ (wf.T if transposed else wf)


@pytest.mark.parametrize("mode", ["xla", "pad", "table", "pallas"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("depth,width,dtype", [(1, 1, "float32"), (63, 65, "float32"),
                                               (100, 1000, "bfloat16"), (520, 33, "float32")])
def test_one_row_matmul_matches_the_matmul(monkeypatch, mode, transposed, depth, width, dtype):
    """Each mode's ``[1, D] @ W`` against a float64 product (float32 1e-5, bf16: one
    rounding of the float32 sum, 1e-2), leading axes kept."""
    monkeypatch.setenv(gemv.GEMV_ENV, mode)
    kx, kw = jax.random.split(jax.random.PRNGKey(depth * 7 + width))
    x = jax.random.normal(kx, (1, 1, depth), jnp.float32).astype(dtype)
    shape = (width, depth) if transposed else (depth, width)
    w = jax.random.normal(kw, shape, jnp.float32).astype(dtype)
    y = jax.jit(lambda a, b: gemv.one_row_matmul(a, b, transposed=transposed))(x, w)
    assert y.shape == (1, 1, width) and y.dtype == jnp.dtype(dtype)
    tol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(1, width),
                               _ref(x, w, transposed), rtol=tol, atol=tol * np.sqrt(depth))


def test_one_row_matmul_gradient_is_the_matmuls(monkeypatch):
    """The kernel's backward pass is the matmul's (gradients to 1e-5)."""
    monkeypatch.setenv(gemv.GEMV_ENV, "pallas")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 40), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(1), (40, 70), jnp.float32)
    probe = jax.random.normal(jax.random.PRNGKey(2), (1, 70), jnp.float32)
    got = jax.grad(lambda a, b: jnp.sum(gemv.one_row_matmul(a, b) * probe), (0, 1))(x, w)
    want = jax.grad(lambda a, b: jnp.sum((a @ b) * probe), (0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named(monkeypatch):
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="x: expected one row"):
        gemv.one_row_matmul(x, jnp.ones((8, 4)))
    with pytest.raises(ValueError, match=r"w: expected \[D, N\] with D=8"):
        gemv.one_row_matmul(x[:1], jnp.ones((4, 8)))
    with pytest.raises(ValueError, match=r"w: expected \[N, D\] with D=8"):
        gemv.one_row_matmul(x[:1], jnp.ones((8, 4)), transposed=True)
    monkeypatch.setenv(gemv.GEMV_ENV, "cublas")
    with pytest.raises(ValueError, match="LINEARNEXUS_DECODE_GEMV: expected one of"):
        gemv.gemv_mode()


def test_one_row_ready_only_for_one_row_where_kernels_compile(monkeypatch):
    monkeypatch.setattr(gemv, "_compiles", lambda: False)  # the CPU, interpret mode: never
    assert not gemv.one_row_ready(jnp.ones((1, 1, 8)))
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setenv(gemv.GEMV_ENV, "pallas")
    assert gemv.one_row_ready(jnp.ones((1, 1, 8)))
    assert not gemv.one_row_ready(jnp.ones((2, 1, 8)))
    monkeypatch.setenv(gemv.GEMV_ENV, "xla")
    assert not gemv.one_row_ready(jnp.ones((1, 1, 8)))


@pytest.mark.parametrize("pattern,mlp", [(("gated_deltanet",), True), (("mamba2",), False),
                                         (("attention",), True), (("mamba",), False)])
@pytest.mark.parametrize("mode", ["pad", "table", "pallas"])
def test_one_token_models_match_xla(monkeypatch, pattern, mlp, mode):
    """Batch-1 one-token logits and states with every projection and the tied head
    through the mode (interpreted, picked as on a GPU) equal XLA's path to 1e-5."""
    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, block_pattern=pattern, mlp=mlp,
                      tie_embeddings=True)
    model = LMModel(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.array([[5]], jnp.int32)
    state = model.init_state(1)

    def call():
        return model(tokens, state=state, mode="recurrent")

    monkeypatch.setenv(gemv.GEMV_ENV, "xla")  # the reference, also on a GPU
    want = call()
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setenv(gemv.GEMV_ENV, mode)
    calls = []
    real = common.one_row_matmul
    monkeypatch.setattr(common, "one_row_matmul",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    got = call()
    assert calls, "no projection took the one-row path"
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("options", [
    {"glu": True, "add": True, "norm": True},  # the MLP's first kernel
    {"residual": True, "residual_add": True},  # its second
    {"norm": True, "transposed": True},  # the final norm and a tied head
    {"glu": True, "norm": True, "transposed": True},
    {"residual": True},
])
def test_one_row_fused_matches_the_layers_ops(monkeypatch, options, dtype):
    """Prologue (``x + add``, RMSNorm) and epilogue (SwiGLU, residual sums) folded into the
    kernel against the same ops in XLA at D = 100, N = 70: float32 1e-5, bf16 within one
    rounding of the output (2e-2 relative, the sums rounded at the same places)."""
    depth, width = 100, 70
    keys = jax.random.split(jax.random.PRNGKey(3), 6)

    def rnd(k, shape, scale=1.0):
        return (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    x = rnd(keys[0], (1, depth))
    out = 2 * width if options.get("glu") else width
    w_shape = (out, depth) if options.get("transposed") else (depth, out)
    w = rnd(keys[1], w_shape, depth ** -0.5)
    kw = {"transposed": options.get("transposed", False), "glu": options.get("glu", False)}
    if options.get("add"):
        kw["add"] = rnd(keys[2], (1, depth))
    if options.get("norm"):
        kw["norm_scale"] = 1.0 + 0.1 * jax.random.normal(keys[3], (depth,), jnp.float32)
        kw["norm_eps"] = 1e-5
    if options.get("residual"):
        kw["residual"] = rnd(keys[4], (1, width))
    if options.get("residual_add"):
        kw["residual_add"] = rnd(keys[5], (1, width))
    got = jax.jit(lambda x, w: gemv.one_row_fused(x, w, **kw))(x, w)
    ref_kw = {k: kw[k] for k in ("transposed", "glu")}
    want = gemv._fused_reference(x, w, kw.get("add"), kw.get("norm_scale"), kw.get("residual"),
                                 kw.get("residual_add"), norm_eps=kw.get("norm_eps"),
                                 out_dtype=jnp.dtype(dtype), **ref_kw)
    assert got.shape == (1, width) and got.dtype == jnp.dtype(dtype)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


def test_one_row_fused_refuses_bad_operands():
    x, w = jnp.ones((1, 8)), jnp.ones((8, 6))
    with pytest.raises(ValueError, match=r"x: expected \[R, D\] with 1 <= R <= 64"):
        gemv.one_row_fused(jnp.ones((65, 8)), w)
    with pytest.raises(ValueError, match=r"x: expected \[R, D\] with 1 <= R <= 64"):
        gemv.one_row_fused(jnp.ones((1, 1, 8)), w)
    with pytest.raises(ValueError, match=r"add: expected shape \(1, 8\)"):
        gemv.one_row_fused(x, w, add=jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=r"w: expected \[D, 2N\] with D=8"):
        gemv.one_row_fused(x, jnp.ones((8, 5)), glu=True)
    with pytest.raises(ValueError, match=r"w: expected \[2N, D\] with D=8"):
        gemv.one_row_fused(x, jnp.ones((5, 8)), glu=True, transposed=True)
    with pytest.raises(ValueError, match=r"residual: expected shape \(1, 6\)"):
        gemv.one_row_fused(x, w, residual=jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="norm_scale and norm_eps: expected both"):
        gemv.one_row_fused(x, w, norm_scale=jnp.ones((8,)))
    with pytest.raises(ValueError, match="residual_add: expected with residual"):
        gemv.one_row_fused(x, w, residual_add=jnp.ones((1, 6)))
    with pytest.raises(ValueError, match="add: expected dtype float32"):
        gemv.one_row_fused(x, w, add=jnp.ones((1, 8), jnp.bfloat16))
    with pytest.raises(ValueError, match="x: expected dtype bfloat16"):
        gemv.one_row_fused(x, w.astype(jnp.bfloat16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mlp_half_runs_two_kernels_and_matches(monkeypatch, dtype):
    """A batch-1 one-token GDN model with the pallas mode runs each MLP half, the input
    projection with the pre-norm and the tied head with the final norm through
    ``one_row_fused`` (three calls per layer, one for the head) and matches XLA's path
    (float32 1e-5, bf16 logits 5e-2 absolute on O(1) logits: the two round the same sums
    in another order)."""
    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, block_pattern=("gated_deltanet",),
                      mlp=True, tie_embeddings=True, dtype=dtype)
    model = LMModel(cfg, rngs=nnx.Rngs(1))
    tokens = jnp.array([[7]], jnp.int32)
    state = model.init_state(1)
    monkeypatch.setenv(gemv.GEMV_ENV, "xla")  # the reference, also on a GPU
    want = model(tokens, state=state, mode="recurrent")
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setenv(gemv.GEMV_ENV, "pallas")
    calls = []
    real = common.one_row_fused
    monkeypatch.setattr(common, "one_row_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = model(tokens, state=state, mode="recurrent")
    assert len(calls) == 3 * cfg.n_layers + 1
    tol = 1e-5 if dtype == "float32" else 5e-2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_kernels_lower_through_triton(monkeypatch, rows):
    """Both kernels, every prologue / epilogue, lowered for CUDA on this host (Triton form,
    not interpreted): one Triton custom call each; one row, 3 (the tensor-core form with
    masked padding rows) and 64; for several rows also heads of 64 (a tile of 128 reshaped
    into two groups a row)."""
    from linearnexus.kernels.common.gpu_lowering import lower_for_gpu
    from linearnexus.kernels.common.pallas import INTERPRET_ENV

    monkeypatch.setenv(INTERPRET_ENV, "0")
    bf = jnp.bfloat16
    row, h = jax.ShapeDtypeStruct((rows, 1000), bf), jax.ShapeDtypeStruct((rows, 1000), bf)
    w_gu = jax.ShapeDtypeStruct((1000, 2 * 2752), bf)
    w_dn = jax.ShapeDtypeStruct((2752, 1000), bf)
    scale = jax.ShapeDtypeStruct((1000,), jnp.float32)

    def mlp(x, h, w_gu, w_dn, scale):
        hid = gemv.one_row_fused(x, w_gu, glu=True, add=h, norm_scale=scale, norm_eps=1e-6)
        return gemv.one_row_fused(hid, w_dn, residual=x[:, :1000], residual_add=h)

    def head(x, table):
        return gemv.one_row_fused(x, table, transposed=True)

    text = lower_for_gpu(mlp, row, h, w_gu, w_dn, scale)
    assert text.count("__gpu$xla.gpu.triton") == 2
    text = lower_for_gpu(head, row, jax.ShapeDtypeStruct((8192, 1000), bf))
    assert text.count("__gpu$xla.gpu.triton") == 1

    def conv(x, wt, cache, cw, cb, scale):
        return gemv.one_row_conv(x, wt, cache, cw, cb, conv_start=1024, transposed=True,
                                 norm_scale=scale, norm_eps=1e-6)

    def head_norm(o, gate_row, wt, vscale):
        return gemv.one_row_group_norm(o, wt, group=128, norm_scale=vscale, norm_eps=1e-5,
                                       gate=gate_row, gate_offset=4128, transposed=True)

    text = lower_for_gpu(head_norm, jax.ShapeDtypeStruct((rows, 2048), bf),
                         jax.ShapeDtypeStruct((rows, 6176), bf),
                         jax.ShapeDtypeStruct((1000, 2048), bf),
                         jax.ShapeDtypeStruct((128,), jnp.float32))
    assert text.count("__gpu$xla.gpu.triton") == 1
    if rows > 1:
        text = lower_for_gpu(
            lambda o, g, wt, s: gemv.one_row_group_norm(o, wt, group=64, norm_scale=s,
                                                        norm_eps=1e-5, gate=g, gate_offset=64,
                                                        transposed=True),
            jax.ShapeDtypeStruct((rows, 2048), bf), jax.ShapeDtypeStruct((rows, 2112), bf),
            jax.ShapeDtypeStruct((1000, 2048), bf), jax.ShapeDtypeStruct((64,), jnp.float32))
        assert text.count("__gpu$xla.gpu.triton") == 1
    text = lower_for_gpu(conv, row, jax.ShapeDtypeStruct((4256, 1000), bf),
                         jax.ShapeDtypeStruct((rows, 3, 2176), bf),
                         jax.ShapeDtypeStruct((4, 2176), jnp.float32),
                         jax.ShapeDtypeStruct((2176,), jnp.float32), scale)
    assert text.count("__gpu$xla.gpu.triton") == 1


def _gdn_one_token(monkeypatch, *, seed: int, token: int):
    """A 2-layer GDN LM, one token and its state, and XLA's one-token output (the
    reference, also on a GPU): ``(cfg, model, tokens, state, want)``."""
    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, block_pattern=("gated_deltanet",),
                      mlp=True, tie_embeddings=True)
    model = LMModel(cfg, rngs=nnx.Rngs(seed))
    tokens, state = jnp.array([[token]], jnp.int32), model.init_state(1)
    monkeypatch.setenv(gemv.GEMV_ENV, "xla")
    return cfg, model, tokens, state, model(tokens, state=state, mode="recurrent")


def _assert_trees_close(got, want) -> None:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-5, atol=1e-5)


def test_transposed_decode_table(monkeypatch):
    """With the Pallas mode picked (as on a GPU), the decode table stores every projection
    transposed (the fused groups and each other Linear), the one-token call reads it, and
    its logits and states equal XLA's path without a table (1e-5); a kernel of the wrong
    shape is refused, naming it."""
    from linearnexus.modules.common import TRANSPOSED, decode_weights, using_decode_weights

    cfg, model, tokens, state, want = _gdn_one_token(monkeypatch, seed=2, token=3)
    monkeypatch.setattr(gemv, "_compiles", lambda: False)  # the CPU: plain layout
    assert decode_weights(model) and not any(k.endswith(TRANSPOSED)
                                             for k in decode_weights(model))
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setenv(gemv.GEMV_ENV, "pallas")
    table = decode_weights(model)
    assert all(k.endswith(TRANSPOSED) for k in table)
    o_proj = [k for k in table if "o_proj" in k]
    assert len(o_proj) == cfg.n_layers and table[o_proj[0]][0].shape == (64, 64 * 2)
    seen = []
    real = gemv._launch
    monkeypatch.setattr(gemv, "_launch", lambda x, wt, *a, **k: seen.append(wt) or
                        real(x, wt, *a, **k))
    with using_decode_weights(model, table):
        got = model(tokens, state=state, mode="recurrent")
    tabled = {id(v[0]) for v in table.values()}
    assert seen and sum(id(w) in tabled for w in seen) >= 4 * cfg.n_layers
    _assert_trees_close(got, want)
    bad = dict(table)
    bad[o_proj[0]] = (table[o_proj[0]][0].T, None)
    with pytest.raises(ValueError, match="kernel of shape"), using_decode_weights(model, bad):
        pass


def test_table_mode_reads_the_transposed_table_through_xla(monkeypatch):
    """Mode ``"table"`` (as on a GPU): the decode table is transposed as for ``"pallas"``, the
    one-token call reads it through XLA's matmul and launches none of this module's kernels,
    and its logits and states equal XLA's path without a table (1e-5)."""
    from linearnexus.modules.common import TRANSPOSED, decode_weights, using_decode_weights

    _, model, tokens, state, want = _gdn_one_token(monkeypatch, seed=5, token=7)
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setenv(gemv.GEMV_ENV, "table")
    table = decode_weights(model)
    assert table and all(k.endswith(TRANSPOSED) for k in table)
    launched = []  # every kernel of the module goes through one of these two
    monkeypatch.setattr(gemv, "_launch", lambda *a, **k: launched.append(1))
    monkeypatch.setattr(gemv, "_launch_any", lambda *a, **k: launched.append(1))
    matmuls = []
    real = common.one_row_matmul
    monkeypatch.setattr(common, "one_row_matmul",
                        lambda *a, **k: matmuls.append(k.get("transposed")) or real(*a, **k))
    with using_decode_weights(model, table):
        got = model(tokens, state=state, mode="recurrent")
    assert not launched and matmuls and all(matmuls)
    _assert_trees_close(got, want)


@pytest.mark.parametrize("layout,want_t,bias", [("auto", {(64, 386)}, False), ("kn", set(), False),
                                                 ("nk", {(64, 386), (128, 64)}, False),
                                                 ("auto", {(64, 386)}, True)])
def test_batch_layout_reads_the_transposed_table(monkeypatch, layout, want_t, bias):
    """A batch-3 one-token Mamba2 call (as on a GPU, Pallas mode: the table transposed)
    reads the table's ``W^T`` through XLA's matmul for the projections that
    ``LINEARNEXUS_DECODE_BATCH_LAYOUT`` picks (``auto``: wider than deep, ``in_proj`` 64 ->
    386; ``nk``: also ``out_proj`` 128 -> 64; ``kn``: none) and no one-row kernel; logits
    and states equal XLA's path without a table (1e-5), with and without projection biases;
    a bad value is refused, naming the variable."""
    from linearnexus.modules.common import decode_weights, using_decode_weights

    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, block_pattern=("mamba2",),
                      mlp=False, tie_embeddings=True,
                      block_options={"mamba2": {"bias": bias}} if bias else {})
    model = LMModel(cfg, rngs=nnx.Rngs(6))
    tokens = jnp.array([[3], [60], [0]], jnp.int32)
    state = model.init_state(3)
    monkeypatch.setenv(gemv.GEMV_ENV, "xla")
    want = model(tokens, state=state, mode="recurrent")
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setenv(gemv.GEMV_ENV, "pallas")
    monkeypatch.setenv(gemv.BATCH_LAYOUT_ENV, layout)
    table = decode_weights(model)
    assert any(b is not None for _, b in table.values()) == bias
    launched = []
    monkeypatch.setattr(gemv, "_launch_any", lambda *a, **k: launched.append(1))
    seen = []
    real = common._matmul
    monkeypatch.setattr(common, "_matmul", lambda lin, x, kernel, transposed=False: seen.append(
        (lin.in_features, lin.out_features, transposed)) or real(lin, x, kernel, transposed))
    with using_decode_weights(model, table):
        got = model(tokens, state=state, mode="recurrent")
    assert not launched
    assert {(d, n) for d, n, t in seen if t} == want_t
    assert all(t for _, _, t in seen)  # a projection not picked runs nnx.Linear itself
    _assert_trees_close(got, want)
    monkeypatch.setenv(gemv.BATCH_LAYOUT_ENV, "tn")
    with pytest.raises(ValueError, match=gemv.BATCH_LAYOUT_ENV), \
            using_decode_weights(model, table):
        model(tokens, state=state, mode="recurrent")


@pytest.mark.parametrize("pattern", [("gated_deltanet",), ("mamba2",)])
def test_generate_with_pallas_mode_equals_xla(monkeypatch, pattern):
    """Greedy tokens of the on-device loop with every batch-1 matmul through the Pallas
    mode (interpreted) equal the XLA mode's."""
    from linearnexus.generate import SamplingConfig, generate

    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, block_pattern=pattern,
                      mlp=pattern == ("gated_deltanet",), tie_embeddings=True)
    model = LMModel(cfg, rngs=nnx.Rngs(4))
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=6)
    monkeypatch.setenv(gemv.GEMV_ENV, "xla")  # the reference, also on a GPU
    want = generate(model, [[1, 2, 3]], sampling)
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setenv(gemv.GEMV_ENV, "pallas")
    model = LMModel(cfg, rngs=nnx.Rngs(4))  # a fresh model: nothing cached from the XLA run
    assert generate(model, [[1, 2, 3]], sampling) == want


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mamba2_gated_norm_folds_into_out_proj(monkeypatch, dtype):
    """With the fused layer kernel and the pallas mode picked (interpreted), a batch-1
    one-token Mamba2 call runs its gated norm in ``out_proj``'s prologue (from the float32
    gated row), the layer's pre-norm and the conv in ``in_proj``'s kernel
    (``one_row_conv``) and the final norm in the tied head's, and matches the XLA mode
    (float32 1e-5; bf16 2e-2 on O(1) logits)."""
    import linearnexus.kernels.fused_decode.api as layer_api

    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, block_pattern=("mamba2",),
                      mlp=False, tie_embeddings=True, dtype=dtype,
                      block_options={"mamba2": {"d_state": 16, "headdim": 16}})
    model = LMModel(cfg, rngs=nnx.Rngs(5))
    tokens, state = jnp.array([[9]], jnp.int32), model.init_state(1)
    monkeypatch.setattr(layer_api, "_compiles", lambda: True)
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setenv(gemv.GEMV_ENV, "xla")
    want = model(tokens, state=state, mode="recurrent")
    monkeypatch.setenv(gemv.GEMV_ENV, "pallas")
    calls = []
    real, real_conv = common.one_row_fused, common.one_row_conv
    monkeypatch.setattr(common, "one_row_fused",
                        lambda x, *a, **k: calls.append(x.dtype) or real(x, *a, **k))
    monkeypatch.setattr(common, "one_row_conv",
                        lambda x, *a, **k: calls.append("conv") or real_conv(x, *a, **k))
    got = model(tokens, state=state, mode="recurrent")
    row, f32 = jnp.dtype(dtype), jnp.dtype(jnp.float32)
    # per layer in_proj (with the pre-norm and the conv), out_proj; then the head
    assert calls == ["conv", f32] * cfg.n_layers + [row]
    tol = 1e-5 if dtype == "float32" else 2e-2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)


def test_a_linear_subclass_keeps_its_own_call(monkeypatch):
    """A subclass of nnx.Linear with its own __call__ (an adapter) is called as it is,
    never replaced by the one-row kernel."""
    class Doubled(nnx.Linear):
        def __call__(self, x, out_sharding=None):
            return 2.0 * super().__call__(x)

    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setenv(gemv.GEMV_ENV, "pallas")
    lin = Doubled(8, 5, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 1, 8))
    np.testing.assert_allclose(common.dense(lin, x), 2.0 * (x @ lin.kernel[...]), rtol=1e-6)
    plain = nnx.Linear(8, 5, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(common.dense(plain, x), x @ plain.kernel[...], rtol=1e-5)


def _picked(monkeypatch, layer_kernels: bool = True):
    """The one-row kernels (and the fused layer kernels) picked as on a GPU, interpreted."""
    import linearnexus.kernels.fused_decode.api as layer_api

    if layer_kernels:
        monkeypatch.setattr(layer_api, "_compiles", lambda: True)
    monkeypatch.setattr(gemv, "_compiles", lambda: True)
    monkeypatch.setenv(gemv.GEMV_ENV, "pallas")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("width,bias", [(37, False), (1000, False), (24, True)])
def test_dense_with_a_norm_is_the_norm_then_the_matmul(monkeypatch, dtype, width, bias):
    """``dense(lin, x, norm=n)`` and ``fused_dense(..., norm=n)`` equal ``lin(n(x))`` with
    the norm in the kernel's prologue (bias-free) or applied first (with a bias, or off the
    GPU path): float32 1e-5, bf16 one rounding of O(1) outputs; D = 100 (not a tile)."""
    depth = 100
    rngs = nnx.Rngs(3)
    lin = nnx.Linear(depth, width, use_bias=bias, dtype=dtype, rngs=rngs)
    other = nnx.Linear(depth, 9, use_bias=False, dtype=dtype, rngs=rngs)
    norm = common.RMSNorm(depth, eps=1e-5, dtype=dtype)
    norm.scale[...] = jax.random.uniform(jax.random.key(1), (depth,), minval=0.5, maxval=1.5)
    x = (3.0 * jax.random.normal(jax.random.key(2), (1, 1, depth))).astype(dtype)
    want = lin(norm(x))
    want_other = other(norm(x))
    tol = 1e-5 if dtype == "float32" else 2e-2
    # the kernels not picked (cpu_dispatch): the norm, then lin
    np.testing.assert_allclose(np.asarray(common.dense(lin, x, norm=norm), np.float32),
                               np.asarray(want, np.float32), rtol=tol, atol=tol)
    _picked(monkeypatch, layer_kernels=False)
    calls = []
    real = common.one_row_fused
    monkeypatch.setattr(common, "one_row_fused",
                        lambda *a, **k: calls.append(k.get("norm_scale") is not None)
                        or real(*a, **k))
    got = common.dense(lin, x, norm=norm)
    got_pair = common.fused_dense(x, [lin, other], norm=norm)
    assert calls == ([] if bias else [True, True])  # a bias: norm first, then the plain kernel
    for a, b in ((got, want), (got_pair[0], want), (got_pair[1], want_other)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)


def test_tied_head_with_the_final_norm(monkeypatch):
    """``Embedding.attend(x, norm=n)`` equals ``attend(n(x))``, folded (one kernel) on the
    GPU path and applied first elsewhere (two rows)."""
    emb = common.Embedding(50, 24, rngs=nnx.Rngs(0))
    norm = common.RMSNorm(24, eps=1e-6)
    x = 2.0 * jax.random.normal(jax.random.key(0), (1, 1, 24))
    x2 = 2.0 * jax.random.normal(jax.random.key(1), (2, 1, 24))
    _picked(monkeypatch, layer_kernels=False)
    np.testing.assert_allclose(emb.attend(x, norm=norm), emb.attend(norm(x)), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(emb.attend(x2, norm=norm), emb.attend(norm(x2)), rtol=1e-6,
                               atol=1e-6)


_PRE_NORM_PATTERNS = [
    (("gated_deltanet",), {}),
    (("deltanet",), {}),
    (("mamba2",), {"mamba2": {"d_state": 16, "headdim": 16}}),
    (("gla",), {}),
    (("attention",), {}),
]


# every block family in float32 and in bf16 with a float32 residual stream (the norm on the
# float32 row); bf16 throughout for two families only (the same code path but for the
# casts; each case interprets the kernels, ~10 s on a 2-core CI machine)
@pytest.mark.parametrize("pattern,options,dtype,fp32_residual", [
    *((p, o, "float32", False) for p, o in _PRE_NORM_PATTERNS),
    *((p, o, "bfloat16", True) for p, o in _PRE_NORM_PATTERNS),
    *((p, o, "bfloat16", False) for p, o in _PRE_NORM_PATTERNS[::4]),
])
def test_pre_norm_folds_into_the_input_projection(monkeypatch, pattern, options, dtype,
                                                  fp32_residual):
    """A batch-1 one-token call with the kernels picked (interpreted) hands each layer's
    pre-norm to its mixer, which runs it in its input projection's kernel (blocks with a
    fused projection: the delta family, Mamba2; GLA applies it itself), and the logits and
    states equal the XLA mode's (float32 1e-5, bf16 2e-2 on O(1) logits). With a float32
    residual stream and bf16 compute the mixer applies the norm to the float32 row itself
    (its projection kernel reads the compute dtype)."""
    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, block_pattern=pattern, mlp=True,
                      tie_embeddings=True, dtype=dtype, block_options=options,
                      residual_in_fp32=fp32_residual)
    model = LMModel(cfg, rngs=nnx.Rngs(4))
    tokens = jnp.array([[11]], jnp.int32)
    state = model.init_state(1)
    # a state that is not zero, so the one-token step reads it
    state = jax.tree.map(lambda s: 0.3 * jax.random.normal(jax.random.key(s.size), s.shape
                                                           ).astype(s.dtype)
                         if jnp.issubdtype(s.dtype, jnp.floating) else s, state)
    monkeypatch.setenv(gemv.GEMV_ENV, "xla")
    # jitted (one compile, not an eager op-by-op run: CI time); a new function each time,
    # so each traces under the switches set then
    want = jax.jit(lambda: model(tokens, state=state, mode="recurrent"))()
    _picked(monkeypatch)
    seen = []
    for cls in {type(layer.mixer) for layer in model.layers}:
        monkeypatch.setattr(cls, "__call__",
                            lambda self, x, real=cls.__call__, **k: seen.append(
                                k.get("input_norm") is not None) or real(self, x, **k))
    got = jax.jit(lambda: model(tokens, state=state, mode="recurrent"))()
    assert seen == [True] * cfg.n_layers
    tol = 1e-5 if dtype == "float32" else 2e-2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)
    # two tokens, or the XLA mode: the layer applies the norm itself
    seen.clear()  # (traced only: what the layers hand over is decided at trace time)
    jax.eval_shape(lambda: model(jnp.array([[11, 12]], jnp.int32), state=state, mode="recurrent"))
    monkeypatch.setenv(gemv.GEMV_ENV, "xla")
    jax.eval_shape(lambda: model(tokens, state=state, mode="recurrent"))
    assert seen == [False] * (2 * cfg.n_layers)


def _tokens_one_by_one(model, tokens):
    """``(logits of each step, final state)`` of batch-1 one-token calls from an empty
    state."""
    def run():  # traced once per call (a new function each time: the switches apply)
        state, out = model.init_state(1), []
        for t in tokens:
            logits, state = model(jnp.array([[t]], jnp.int32), state=state, mode="recurrent")
            out.append(logits)
        return out, state

    return jax.jit(run)()  # one compile, not an eager op-by-op run of the kernels (CI time)


def _picked_against_xla(monkeypatch, model, tokens, module, name):
    """``(want, got, args)``: ``tokens`` fed one by one in the XLA mode (``want``) and with
    the picked kernels (``got``), ``module.name``'s positional arguments recorded per call
    in the second run."""
    monkeypatch.setenv(gemv.GEMV_ENV, "xla")
    want = _tokens_one_by_one(model, tokens)
    _picked(monkeypatch)
    args = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: args.append(a) or real(*a, **k))
    return want, _tokens_one_by_one(model, tokens), args


def _assert_trees_close(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-5, atol=1e-5)


def _conv_want(x, w, cache, cw, cb, conv_start, norm):
    """The matmul (XLA) then the conv's one-token step (``kernels.conv``, jax backend)."""
    from linearnexus.kernels.conv.api import conv_step

    xin = x if norm is None else norm(x)
    y = jnp.dot(xin, w, preferred_element_type=jnp.float32).astype(w.dtype)  # [1, N]
    c = cache.shape[2]
    seg, new_cache = conv_step(y[:, None, conv_start:conv_start + c], cache, cw, cb,
                               activation="silu", backend="jax")  # [1, 1, C]
    return y.at[:, conv_start:conv_start + c].set(seg[:, 0]), new_cache


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("width,bias,norm,transposed", [(4, True, False, False),
                                                        (2, False, True, True),
                                                        (3, True, True, False)])
def test_one_row_conv_is_the_matmul_then_the_conv_step(monkeypatch, dtype, width, bias,
                                                       norm, transposed):
    """``one_row_conv`` (interpreted) equals XLA's matmul followed by the conv's one-token
    step on columns [6, 30) of 40 (D = 100, not a tile), with the cache shifted and the
    other columns the matmul's: float32 1e-5, bf16 one rounding; conv widths 2-4, with and
    without a bias and a norm prologue; its gradient is the reference's."""
    d, n, c, start = 100, 40, 24, 6
    ks = jax.random.split(jax.random.key(width), 6)
    x = jax.random.normal(ks[0], (1, d)).astype(dtype)
    w = (jax.random.normal(ks[1], (d, n)) * 0.1).astype(dtype)
    cache = jax.random.normal(ks[2], (1, width - 1, c)).astype(dtype)
    cw = jax.random.normal(ks[3], (width, c)) * 0.5
    cb = jax.random.normal(ks[4], (c,)) if bias else None
    rms = None
    if norm:
        rms = common.RMSNorm(d, eps=1e-5, dtype=dtype)
        rms.scale[...] = jax.random.uniform(ks[5], (d,), minval=0.5, maxval=1.5)
    want, want_cache = _conv_want(x, w, cache, cw, cb, start, rms)
    got, got_cache = gemv.one_row_conv(
        x, w.T if transposed else w, cache, cw, cb, conv_start=start, transposed=transposed,
        norm_scale=None if rms is None else rms.scale[...], norm_eps=None if rms is None
        else rms.eps)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for a, b in ((got, want), (got_cache, want_cache)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)
    if dtype == "float32":  # the gradient is the reference's (the matmul and the conv's)
        def loss(fn, x, cw):
            y, nc = fn(x, cw)
            return jnp.sum(y * jnp.arange(n)) + jnp.sum(nc)

        kernel = functools.partial(loss, lambda x, cw: gemv.one_row_conv(
            x, w, cache, cw, cb, conv_start=start))
        ref = functools.partial(loss, lambda x, cw: _conv_want(x, w, cache, cw, cb, start, None))
        for a, b in zip(jax.grad(kernel, (0, 1))(x, cw), jax.grad(ref, (0, 1))(x, cw),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_one_row_conv_refuses_bad_operands():
    x, w = jnp.ones((1, 8)), jnp.ones((8, 10))
    cache, cw = jnp.ones((1, 3, 4)), jnp.ones((4, 4))
    with pytest.raises(ValueError, match="conv_cache: expected"):
        gemv.one_row_conv(x, w, jnp.ones((3, 4)), cw)
    with pytest.raises(ValueError, match=r"conv_weight: expected shape \(4, 4\)"):
        gemv.one_row_conv(x, w, cache, jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="conv_bias: expected shape"):
        gemv.one_row_conv(x, w, cache, cw, jnp.ones((5,)))
    with pytest.raises(ValueError, match="conv_start: expected a multiple of 2"):
        gemv.one_row_conv(x, w, cache, cw, conv_start=1)
    with pytest.raises(ValueError, match="conv_start: expected"):
        gemv.one_row_conv(x, w, cache, cw, conv_start=8)  # 8 + 4 > 10 columns
    with pytest.raises(ValueError, match="conv_cache: expected dtype float32"):
        gemv.one_row_conv(x, w, cache.astype(jnp.bfloat16), cw)
    with pytest.raises(ValueError, match="x: expected dtype"):
        gemv.one_row_conv(x.astype(jnp.bfloat16), w, cache, cw)


@pytest.mark.parametrize("pattern,options", [
    (("gated_deltanet",), {}),
    (("mamba2",), {"mamba2": {"d_state": 16, "headdim": 16}}),
])
def test_conv_runs_in_the_input_projection(monkeypatch, pattern, options):
    """At batch 1 with the kernels picked (interpreted), GDN and Mamba2 layers run their
    short conv in the input projection's kernel (``one_row_conv``, one per layer), hand the
    layer kernel a row without a conv (so Mamba2's kernel writes no new cache), and the
    logits and every state (conv caches included) over three tokens equal the XLA mode's
    (1e-5)."""
    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, block_pattern=pattern,
                      mlp=pattern == ("gated_deltanet",), tie_embeddings=True,
                      block_options=options)
    model = LMModel(cfg, rngs=nnx.Rngs(2))

    want, got, calls = _picked_against_xla(monkeypatch, model, (3, 17, 40), common,
                                           "one_row_conv")
    assert len(calls) == 3 * cfg.n_layers
    _assert_trees_close(got, want)


def test_ssd_layer_without_a_conv_refuses_conv_operands():
    """``ssd_layer_step`` with ``spec.conv_width`` None (the row arrives after the conv)
    names the conv operands it was given anyway."""
    from linearnexus.kernels.fused_decode import SsdLayerSpec, ssd_layer_step

    spec = SsdLayerSpec(heads=2, head_dim=4, groups=1, d_state=4, conv_width=None,
                        d_per_channel=False, dt_limit=None)
    proj = jnp.zeros((1, spec.width))
    with pytest.raises(ValueError, match="conv_cache, conv_weight, conv_bias: expected None"):
        ssd_layer_step(spec, proj, jnp.zeros((1, 3, spec.conv_channels)), None, None,
                       jnp.zeros((1, 2, 4, 4)), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2),
                       fallback=lambda *a: a)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("gated,transposed", [(True, False), (True, True), (False, False)])
def test_one_row_group_norm_is_the_head_norm_then_the_matmul(dtype, gated, transposed):
    """``one_row_group_norm`` (interpreted) equals the layers' per-head output norm (FLA's
    gated RMSNorm, or a plain RMSNorm) then XLA's matmul: 6 heads of 16 (D = 96, not a
    tile), the gate read from a longer row at offset 37; float32 1e-5, bf16 one rounding;
    its gradient is the reference's."""
    heads, size, n, offset = 6, 16, 40, 37
    d = heads * size
    ks = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(ks[0], (1, d)).astype(dtype)
    w = (jax.random.normal(ks[1], (d, n)) * 0.1).astype(dtype)
    gate = jax.random.normal(ks[2], (1, 150)).astype(dtype) if gated else None
    if gated:
        norm = common.GatedRMSNorm(size, eps=1e-5, norm_before_gate=True, activation="silu",
                                   dtype=dtype)
    else:
        norm = common.RMSNorm(size, eps=1e-5, dtype=dtype)
    norm.scale[...] = jax.random.uniform(ks[3], (size,), minval=0.5, maxval=1.5)

    def want_fn(x):
        heads_x = x.reshape(heads, size)  # [1, D] -> [H, V]
        xn = (norm(heads_x, gate[0, offset:offset + d].reshape(heads, size)) if gated
              else norm(heads_x)).reshape(1, d)  # [H, V] -> [1, D]
        return jnp.dot(xn, w, preferred_element_type=jnp.float32).astype(w.dtype)

    def got_fn(x):
        return gemv.one_row_group_norm(x, w.T if transposed else w, group=size,
                                       norm_scale=norm.scale[...], norm_eps=1e-5, gate=gate,
                                       gate_offset=offset, transposed=transposed)

    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(got_fn(x), np.float32),
                               np.asarray(want_fn(x), np.float32), rtol=tol, atol=tol)
    if dtype == "float32":
        np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(got_fn(x) ** 2))(x),
                                   jax.grad(lambda x: jnp.sum(want_fn(x) ** 2))(x),
                                   rtol=1e-4, atol=1e-5)


def test_one_row_group_norm_refuses_bad_operands():
    x, w, scale = jnp.ones((1, 96)), jnp.ones((96, 8)), jnp.ones((16,))
    with pytest.raises(ValueError, match="group: expected a power of two"):
        gemv.one_row_group_norm(x, w, group=24, norm_scale=jnp.ones((24,)), norm_eps=1e-5)
    with pytest.raises(ValueError, match=r"norm_scale: expected shape \(16,\)"):
        gemv.one_row_group_norm(x, w, group=16, norm_scale=jnp.ones((8,)), norm_eps=1e-5)
    with pytest.raises(ValueError, match="gate: expected \\[R, F\\] rows \\(R=1\\)"):
        gemv.one_row_group_norm(x, w, group=16, norm_scale=scale, norm_eps=1e-5,
                                gate=jnp.ones((1, 100)), gate_offset=10)
    with pytest.raises(ValueError, match="gate: expected dtype float32"):
        gemv.one_row_group_norm(x, w, group=16, norm_scale=scale, norm_eps=1e-5,
                                gate=jnp.ones((1, 96), jnp.bfloat16))


@pytest.mark.parametrize("output_gate", [True, False])
def test_batch1_delta_layer_splits_values_over_programs(monkeypatch, output_gate):
    """At batch 1 with the kernels picked (interpreted), a Gated DeltaNet layer of 3 heads
    runs its layer kernel with 4 programs per head (value blocks of 32), leaves the output
    norm and gate to ``o_proj``'s kernel, and three tokens' logits and states equal the XLA
    mode's (1e-5), with and without the output gate."""
    import linearnexus.modules.linear.deltanet as deltanet

    cfg = ModelConfig(vocab_size=61, d_model=96, n_layers=2, block_pattern=("gated_deltanet",),
                      mlp=True, tie_embeddings=True,
                      block_options={"gated_deltanet": {"num_heads": 3, "head_dim": 32,
                                                        "use_output_gate": output_gate}})
    model = LMModel(cfg, rngs=nnx.Rngs(6))

    want, got, calls = _picked_against_xla(monkeypatch, model, (5, 9, 33), deltanet,
                                           "delta_layer_step")
    specs = [a[0] for a in calls]
    assert [(sp.value_blocks, sp.norm_out) for sp in specs] == [(4, False)] * 6
    _assert_trees_close(got, want)
