"""The documented interface and the developer tools: cache constructors, registry aliases,
preset constants, the tuning cache, smoke / benchmark / profile / feature-table tools, and the
quickstart notebook (executed on a shortened setting so it cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linearnexus.core.cache import ConvState, RecurrentState
from linearnexus.registry import KERNEL_REGISTRY, LAYER_REGISTRY, MODEL_REGISTRY, OP_REGISTRY

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- core.cache


def test_state_constructors_by_keyword_and_position(key):
    rec = RecurrentState.zeros(batch=2, channels=256, state_size=16, dtype=jnp.float32)
    conv = ConvState.zeros(batch=2, kernel_size=4, channels=256, dtype=jnp.float32)
    assert rec.state.shape == (2, 256, 16) and rec.state.dtype == jnp.float32
    assert conv.buffer.shape == (2, 3, 256)
    new = jax.random.normal(key, (2, 256, 16))
    np.testing.assert_array_equal(rec.update(new).state, new)
    # the positional forms blocks use keep working
    assert RecurrentState.zeros(2, 3, 4, 5).state.shape == (2, 3, 4, 5)
    assert ConvState.zeros(2, 4, 3, jnp.bfloat16).buffer.dtype == jnp.bfloat16


@pytest.mark.parametrize("call, match", [
    (lambda: RecurrentState.zeros(2, batch=2, channels=3, state_size=4), "batch_size and batch"),
    (lambda: RecurrentState.zeros(batch=2, channels=3), "channels and state_size"),
    (lambda: RecurrentState.zeros(2, 3, channels=3, state_size=4), "not both"),
    (lambda: ConvState.zeros(batch=2, channels=3), "width"),
    (lambda: ConvState.zeros(2, 4, 3, kernel_size=4), "width and kernel_size"),
])
def test_state_constructor_errors(call, match):
    with pytest.raises(TypeError, match=match):
        call()
    with pytest.raises(ValueError, match="kernel|width"):
        ConvState.zeros(batch=1, kernel_size=0, channels=3)


# ----------------------------------------------------------------------------- registry


def test_reference_aliases_and_layer_unpacking():
    for op in OP_REGISTRY:
        assert KERNEL_REGISTRY[f"{op}:reference"] is KERNEL_REGISTRY[f"{op}:naive"]
        assert f"{op}:reference" in KERNEL_REGISTRY
    assert KERNEL_REGISTRY["mamba:jax"].name == "jax"
    assert not any(name.endswith(":reference") for name in KERNEL_REGISTRY)  # walked once
    layer_cls, config_cls = LAYER_REGISTRY["mamba"]
    assert (layer_cls.__name__, config_cls.__name__) == ("MambaBlock", "MambaConfig")
    pairs = dict(LAYER_REGISTRY.items())
    assert set(pairs) == set(LAYER_REGISTRY)
    for _, (layer_cls, config_cls) in LAYER_REGISTRY.items():
        assert isinstance(layer_cls, type) and isinstance(config_cls, type)


def test_preset_constants():
    import linearnexus.models as M

    for preset in MODEL_REGISTRY:
        assert getattr(M, M.preset_constant_name(preset)) == M.get_preset(preset), preset
    for preset in (M.GPT_SMALL, M.MAMBA_SMALL):
        model = M.create_model(preset.replace(vocab_size=11, n_layers=1, d_model=16))
        assert model.config.layer_types == preset.block_pattern[:1]


# ----------------------------------------------------------------------------- tuning


def test_estimate_grid_for_sequence():
    from linearnexus.kernels.tuning import estimate_grid_for_sequence

    short = estimate_grid_for_sequence(2, 10, 512, 64)
    assert short.chunk_size == 16  # a 10-token call is not padded to 64
    assert estimate_grid_for_sequence(2, 4096, 512, 64).chunk_size == 64
    assert estimate_grid_for_sequence(64, 4096, 256, 64).block_c == 64  # 256 programs
    assert estimate_grid_for_sequence(1, 4096, 256, 64).block_c == 16  # too few for any
    with pytest.raises(ValueError, match="feature_dim"):
        estimate_grid_for_sequence(1, 8, 0, 64)


def test_tuning_cache_round_trip_and_pallas_read_hook(tmp_path, monkeypatch):
    from linearnexus.kernels import tuning
    from linearnexus.kernels.base import GridConfig
    from linearnexus.kernels.common.pallas import TritonConfig
    from linearnexus.kernels.common.pallas_ops import PallasKernel

    monkeypatch.setenv("LINEARNEXUS_TUNING_CACHE", str(tmp_path / "tuning.json"))
    q = jnp.zeros((2, 3000, 4, 32))
    v = jnp.zeros((2, 3000, 4, 48))
    assert tuning.tuned_config("gla", "pallas", (2, 3000, 4, 32, 48), jnp.float32) is None
    cfg = TritonConfig(chunk=32, num_warps=8)
    tuning.record("gla", "pallas", (2, 4096, 4, 32, 48), jnp.float32, cfg, seconds=1e-3)
    # T = 3000 falls in the T = 4096 bucket; another dtype does not
    assert tuning.tuned_config("gla", "pallas", (2, 3000, 4, 32, 48), jnp.float32) == cfg
    assert tuning.tuned_config("gla", "pallas", (2, 3000, 4, 32, 48), jnp.bfloat16) is None

    seen = []

    def fake_gla_pallas(*arrays, config=None, **kwargs):
        seen.append(config)
        return arrays[2], None

    fake_gla_pallas.__module__ = "linearnexus.kernels.gla.pallas"
    kernel = PallasKernel(fake_gla_pallas, None)
    kernel.forward_chunk(q, q, v, q, initial_state=None, grid=GridConfig())
    own = TritonConfig(chunk=16)
    kernel.config = own  # the backend's own config wins over the cache
    kernel.forward_chunk(q, q, v, q, initial_state=None, grid=GridConfig())
    assert seen == [cfg, own]


# ----------------------------------------------------------------------------- tools


def test_smoke_runs_and_reports(capsys):
    from linearnexus.tools.smoke import run_smoke

    checks = run_smoke(["retention"], ["jax"], ["retnet"])
    names = {(c.target, c.name) for c in checks}
    assert ("retention:jax", "chunk grads") in names
    assert ("block retnet", "forward + decode step") in names
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert "ok   retention:jax" in capsys.readouterr().out


def test_benchmark_harness_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    payload = bench.main(["--preset", "constrained", "--quick", "--ops", "retention",
                          "--backends", "jax", "naive", "--blocks", "--no-write"])
    rows = payload["rows"]
    assert {r["backend"] for r in rows} == {"jax", "naive"}
    assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 for r in rows)
    text = bench.markdown("constrained", bench.PRESETS["constrained"], rows, "cmd", 1)
    assert "| retention | jax | default L |" in text and "x |" in text  # speed-up column


def test_state_dtype_quality_quick(tmp_path):
    """``benchmarks/state_dtype_quality.py --quick``: a random Mamba2 decodes held-out text
    with float32 and bf16 states; float32's recurrent loss equals the chunked forward's, bf16
    stays within a rounding's reach of it and the JSON records both."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import state_dtype_quality
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert state_dtype_quality.main(["--quick", "--tokens", "64", "--dtypes", "float32",
                                     "bfloat16", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "state_dtype_quality.json").read_text())
    f32, bf16 = res["dtypes"]["float32"], res["dtypes"]["bfloat16"]
    assert abs(f32["loss"] - res["chunked_loss"]) < 1e-4
    assert abs(bf16["loss_minus_float32"]) < 1e-2 and bf16["greedy_agreement"] > 0.9
    assert f32["max_logit_diff_at_depth"]["10"] == 0.0
    assert bf16["max_logit_diff_at_depth"]["10"] > 0.0  # the state really was rounded
    assert 0 < bf16["max_abs_state"] < 1e3


def test_rows_benchmark_quick(tmp_path):
    """``benchmarks/rows_gpu.py --quick`` (the several-row kernels interpreted against their
    XLA references) writes its rows, each kernel within bf16 rounding of the reference."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import rows_gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    res = rows_gpu.main(["--quick", "--rows", "2", "--cases", "gdn_o", "mlp_down",
                         "--out", str(tmp_path)])
    assert [r["case"] for r in res["rows"]] == ["gdn_o", "mlp_down"]
    assert all(r["rows_ms"] > 0 and r["xla_ms"] > 0 and r["rel_diff"] < 1e-2
               for r in res["rows"])
    assert (tmp_path / "rows_gpu.json").exists()


@pytest.fixture
def tune_bench(tmp_path, monkeypatch):
    """``benchmarks/run.py`` as a module, its tuning cache under ``tmp_path`` and its
    platform faked as a GPU (this machine has none)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setenv("LINEARNEXUS_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(bench, "current_platform", lambda: "gpu")
    return bench


def test_tune_records_the_fastest_config_per_backend(tune_bench, monkeypatch):
    """``run.py --tune`` times every candidate of both Pallas backends (Triton chunk sizes and
    warps; Mosaic value blocks and stages), skips the ones that raise, records the fastest
    under the backend's name, and the backends read it back from the cache (timings faked:
    this machine has no GPU)."""
    from linearnexus.kernels import tuning
    from linearnexus.kernels.common.mosaic_chunk import MosaicConfig
    from linearnexus.kernels.common.pallas import TritonConfig
    from linearnexus.registry import kernels_for

    bench = tune_bench
    kernels = kernels_for("gla")
    # pallas: the fastest fwd+bwd; mosaic: block_v and bwd_stages from the fastest fwd+bwd
    # (2 stages at block_v 64), stages from the fastest forward at that block_v (1 stage; 128
    # forwards faster still, but with the slower gradient)
    fastest = {"pallas": TritonConfig(chunk=32, num_warps=8),
               "mosaic": MosaicConfig(block_v=64, stages=1, bwd_stages=2)}

    def fake_time_pair(forward, args, repeats, argnums):
        cfg = kernels["pallas"].config
        if cfg is not None:
            return 1.0, (1.0 if cfg == fastest["pallas"] else 2.0)
        cfg = kernels["mosaic"].config
        assert cfg is not None, "no candidate config was set on the backend"
        if cfg.block_v == 128 and cfg.stages == 3:
            raise ValueError("config: over the shared-memory budget")
        t_f = {(64, 1): 1.0, (128, 1): 0.5}.get((cfg.block_v, cfg.stages), 2.0)
        return t_f, (1.0 if (cfg.block_v, cfg.bwd_stages) == (64, 2) else 2.0)

    monkeypatch.setattr(bench, "_time_pair", fake_time_pair)
    preset = bench.Preset("test", op_sizes=((1, 128, 2, 64, 64),), block_size=None,
                          dtype="bfloat16", repeats=1)
    chosen = bench.tune(preset, ["gla"], repeats=1)
    assert chosen == {("gla", b, (1, 128, 2, 64, 64)): c for b, c in fastest.items()}
    assert kernels["pallas"].config is None and kernels["mosaic"].config is None  # taken back
    device = jax.devices()[0].device_kind
    dims, bf16 = (1, 128, 2, 64, 64), jnp.bfloat16
    assert tuning.lookup("gla", "mosaic", dims, bf16, device_kind=device) == {
        "block_v": 64, "stages": 1, "bwd_stages": 2}
    assert kernels["mosaic"].cached_config("gla", dims, bf16) == fastest["mosaic"]
    assert tuning.lookup("gla", "pallas", dims, bf16, device_kind=device)["chunk"] == 32


@pytest.mark.parametrize("grad_split", [True, False])
def test_tune_takes_simple_gla_split_from_the_fastest_pair(tune_bench, monkeypatch, grad_split):
    """For simple_gla's mosaic backend ``--tune`` also times the walk split in two by
    entering states (``seq_split``, forward and gradient) and records the value block, split
    and backward depth of the fastest forward + backward with the forward depth of the
    fastest forward at that block and split (``grad_split``: the split fastest forward +
    backward, one walk at two stages the fastest forward); where the split is fastest
    forward but not forward + backward (``grad_split`` False), the forward's split and depth
    with one walk's gradient (``seq_split_grad=False``). Timings faked: no GPU here."""
    from linearnexus.kernels import tuning
    from linearnexus.kernels.common.mosaic_chunk import MosaicConfig
    from linearnexus.registry import kernels_for

    bench = tune_bench
    kernel = kernels_for("simple_gla")["mosaic"]
    seen = []

    def fake_time_pair(forward, args, repeats, argnums):
        cfg = kernel.config
        seen.append(cfg)
        # the forward: split at one stage, whole at two stages, one of them fastest
        fast_f = {(32, 1, 2): 1.5, (32, 2, 1): 1.0} if grad_split else {(32, 1, 2): 1.0,
                                                                        (32, 2, 1): 1.5}
        t_f = fast_f.get((cfg.block_v, cfg.stages, cfg.seq_split), 2.0)
        fast_fb = (32, 3, 2 if grad_split else 1)
        return t_f, (1.0 if (cfg.block_v, cfg.bwd_stages, cfg.seq_split) == fast_fb else 2.0)

    monkeypatch.setattr(bench, "_time_pair", fake_time_pair)
    preset = bench.Preset("test", op_sizes=((2, 4096, 2, 64, 64),), block_size=None,
                          dtype="bfloat16", repeats=1)
    chosen = bench.tune(preset, ["simple_gla"], repeats=1, backends=("mosaic",))
    want = MosaicConfig(block_v=32, stages=1, bwd_stages=3, seq_split=2,
                        seq_split_grad=None if grad_split else False)
    assert chosen == {("simple_gla", "mosaic", (2, 4096, 2, 64, 64)): want}
    assert {c.seq_split for c in seen} == {1, 2} and len(seen) == 18
    dims = (2, 4096, 2, 64, 64)
    assert tuning.lookup("simple_gla", "mosaic", dims, jnp.bfloat16,
                         device_kind=jax.devices()[0].device_kind)["seq_split"] == 2
    assert kernel.cached_config("simple_gla", dims, jnp.bfloat16) == want


def test_profile_layer(tmp_path, capsys):
    from linearnexus.modules.linear.gla import SimpleGLABlock, SimpleGLAConfig
    from linearnexus.tools.profile import profile_layer

    summary = profile_layer(SimpleGLABlock, SimpleGLAConfig.tiny(), batch=2, seq=16, steps=2,
                            out_dir=tmp_path / "trace")
    assert list((tmp_path / "trace").glob("plugins/profile/*/*.xplane.pb"))
    assert summary.ops and all(o.calls >= 1 and o.total_ms >= 0 for o in summary.ops)
    assert summary.ops == sorted(summary.ops, key=lambda o: o.total_ms, reverse=True)
    assert "ms in all" in capsys.readouterr().out
    with pytest.raises(ValueError, match="seq"):
        profile_layer(SimpleGLABlock, SimpleGLAConfig.tiny(), seq=0)


def test_readme_feature_table_is_fresh():
    from linearnexus.tools import features

    text = (ROOT / "README.md").read_text()
    assert features.render(text, features.feature_table()) == text, (
        "README.md's feature table is stale: run python -m linearnexus.tools.features")
    with pytest.raises(ValueError, match="markers"):
        features.render("no markers", "table")


def test_quickstart_notebook_runs(monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("QUICKSTART_STEPS", "3")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "step    2  loss" in text and "ROMEO:" in text


def test_cpu_matmul_rates_times_every_layout(tmp_path, capsys):
    """``benchmarks/cpu_matmul_rates.py`` times the chunked ops' three product layouts in
    JAX, PyTorch and NumPy (checking that all three compute the same product) and refuses a
    chunk length that does not divide the rows, naming ``--chunks``."""
    spec = importlib.util.spec_from_file_location(
        "cpu_matmul_rates", ROOT / "benchmarks" / "cpu_matmul_rates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rates" / "run.json"
    assert module.main(["--rows", "48", "--chunks", "8", "16", "--dim", "5", "--big", "32",
                        "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["product"] for r in rows] == ["NN L=8", "NT L=8", "TN L=8", "NN L=16", "NT L=16",
                                             "TN L=16", "32^3"]
    # 48 rows in chunks of 8: six [8, 8] @ [8, 5] products, 2 * 6 * 8 * 5 * 8 flops
    assert rows[0]["mflop"] == pytest.approx(2 * 6 * 8 * 5 * 8 / 1e6)
    assert rows[2]["mflop"] == pytest.approx(2 * 6 * 5 * 5 * 8 / 1e6)  # [5, 8] @ [8, 5]
    assert all(rate > 0 for r in rows for rate in r["gflops"].values())
    # the GPT recipe's projections alone: X W and X^T dY per shape, 768 tokens; and a
    # step's chain of them through a host callback, equal to XLA's
    assert module.main(["--chunks", "--projections", "--big", "8", "--repeats", "1",
                        "--callback", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    chain = result["callback_chain"]
    assert chain["max_rel_diff"] < 1e-4 and min(chain["ms"].values()) > 0
    rows = {r["product"]: r for r in result["rows"]}
    assert list(rows)[:2] == ["XW 128->128", "XtdY 128->128"] and len(rows) == 9
    assert rows["XtdY 384->128"]["mflop"] == pytest.approx(2 * 384 * 128 * 768 / 1e6)
    with pytest.raises(SystemExit):
        module.main(["--rows", "48", "--chunks", "7"])
    assert "--chunks: each must be >= 1 and divide --rows=48, got [7]" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the FFI handler")
def test_cpu_ffi_gemm_handler_matches_numpy(tmp_path):
    """``benchmarks/cpu_ffi_gemm.py``'s FFI handler (one OpenBLAS ``sgemm`` a product, the
    transposes as flags) computes ``op(a) @ op(b)`` for all four flag pairs, inside a jitted
    program, at sizes that are not multiples of anything."""
    spec = importlib.util.spec_from_file_location("cpu_ffi_gemm",
                                                  ROOT / "benchmarks" / "cpu_ffi_gemm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.find_openblas() is None:
        pytest.skip("NumPy without its bundled OpenBLAS")
    gemm = module.register(module.build(tmp_path), threads=1)
    rng = np.random.default_rng(0)
    m, k, n = 7, 5, 3
    for ta in (False, True):
        for tb in (False, True):
            a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
            b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
            got = jax.jit(lambda a, b, ta=ta, tb=tb: gemm(a, b, ta=ta, tb=tb))(a, b)
            want = (a.T if ta else a) @ (b.T if tb else b)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _benchmark_modules(*names: str) -> list:
    """``benchmarks/<name>.py`` modules, imported with ``benchmarks/`` on the path (they
    import each other by bare name)."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_persistent_gemv_chain_matches_xla():
    """``benchmarks/persistent_gemv.py`` (a decode step's projections in one kernel with
    grid barriers): its programs' tiles, run in turn in interpret mode, compute the bare
    chain exactly as XLA's bf16 matmuls do, at sizes that are not multiples of the tiles
    (N = 100 rows in tiles of 8, 16, 32; contractions of 40, 48 and 72 columns), with and
    without the prefetch across barriers. (The barriers themselves run only on a GPU.)"""
    gemv_gpu, pg = _benchmark_modules("gemv_gpu", "persistent_gemv")
    f32, bf16 = jnp.float32, jnp.bfloat16
    d, layers, inner, hidden, n_in = 48, 2, 40, 72, 100
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    shapes = {"in_t": (layers, n_in, d), "o_t": (layers, d, inner),
              "gu_t": (layers, 2 * hidden, d), "down_t": (layers, d, hidden)}
    st = {name: (jax.random.normal(k, shape, f32) / np.sqrt(shape[-1])).astype(bf16)
          for k, (name, shape) in zip(keys, shapes.items(), strict=False)}
    h0 = jax.random.normal(keys[4], (1, d), f32).astype(bf16)
    per_layer = [{name: w[i] for name, w in st.items()} for i in range(layers)]
    want = gemv_gpu.bare_chain(lambda x, wt: jnp.dot(
        x[:, :wt.shape[1]], wt.T, preferred_element_type=f32).astype(bf16))(h0, per_layer)
    assert float(jnp.linalg.norm(want.astype(f32))) > 1.0  # activations of order one
    for programs, bn, prefetch in ((3, 8, True), (5, 16, False), (1, 32, True)):
        got, counter = jax.jit(lambda h, w, p=programs, b=bn, f=prefetch: pg.persistent_chain(
            h, w, programs=p, bn=b, prefetch=f, virtual=True))(h0, st)
        np.testing.assert_array_equal(np.asarray(got.astype(f32)), np.asarray(want.astype(f32)))
        assert int(counter[0]) == 0  # no barriers in turn
    bad = dict(st, o_t=st["o_t"][:, :, :-1].T)
    with pytest.raises(ValueError, match=r"ws\['o_t'\]: expected \[L=2, 48, <= 100\]"):
        pg.persistent_chain(h0, bad, programs=2, virtual=True)


def test_skinny_gemm_kernel_matches_xla():
    """``benchmarks/skinny_gemm_gpu.py``'s bare few-row Pallas matmul (interpreted) equals
    XLA's bf16 product over the same ``W^T`` at sizes that are not multiples of its tiles
    (N = 100 in tiles of 16 and 32, K = 72 and 200 in tiles of 32 and 64), with the
    contraction whole and split over 2 and 3 programs (float32 partial sums)."""
    (sg,) = _benchmark_modules("skinny_gemm_gpu")
    f32, bf16 = jnp.float32, jnp.bfloat16
    for rows, depth, bn, bk, slices in ((16, 72, 16, 32, 1), (64, 200, 32, 64, 2),
                                        (32, 200, 16, 32, 3)):
        kx, kw = jax.random.split(jax.random.PRNGKey(depth + slices))
        x = jax.random.normal(kx, (rows, depth), f32).astype(bf16)
        wt = (jax.random.normal(kw, (100, depth), f32) / np.sqrt(depth)).astype(bf16)
        want = jnp.dot(x.astype(f32), wt.T.astype(f32))  # [R, K] x [K, N] -> [R, N]
        got = sg.pallas_matmul(x, wt, bn=bn, bk=bk, warps=4, stages=3, slices=slices)
        assert got.shape == (rows, 100) and got.dtype == bf16
        np.testing.assert_allclose(np.asarray(got.astype(f32)), np.asarray(want),
                                   rtol=1e-2, atol=1e-2)


def _streaming_operands():
    """``benchmarks/streaming_gemv.py``'s operands at a small size (widths that are not
    multiples of its tiles, padded by its ``prepare``) and the bare chain's XLA result."""
    gemv_gpu, sg = _benchmark_modules("gemv_gpu", "streaming_gemv")
    f32, bf16 = jnp.float32, jnp.bfloat16
    d, layers, inner, hidden, n_in = 200, 2, 300, 136, 400
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    shapes = {"in_t": (n_in, d), "o_t": (d, inner), "gu_t": (2 * hidden, d),
              "down_t": (d, hidden)}
    per_layer = [{name: (jax.random.normal(jax.random.fold_in(k, i), shape, f32)
                         / np.sqrt(shape[-1])).astype(bf16)
                  for k, (name, shape) in zip(keys, shapes.items(), strict=False)}
                 for i in range(layers)]
    h0 = jax.random.normal(keys[4], (1, d), f32).astype(bf16)
    want = gemv_gpu.bare_chain(lambda x, wt: jnp.dot(
        x[:, :wt.shape[1]], wt.T, preferred_element_type=f32).astype(bf16))(h0, per_layer)
    return sg, h0, per_layer, want


def test_streaming_gemv_chain_matches_xla():
    """``benchmarks/streaming_gemv.py`` (a step's projections in one Mosaic GPU kernel that
    streams its weights through a ring of TMA copies across projections and layers): under
    JAX's Mosaic GPU interpreter, with one program (the interpreter has no global
    semaphores, so no grid barrier), the same values as XLA's bf16 matmuls, at ring depths
    that a projection's steps are shorter and longer than."""
    from linearnexus.kernels.common import mosaic_chunk

    if mosaic_chunk.gpu_interpret_reason():
        pytest.skip(mosaic_chunk.gpu_interpret_reason())
    sg, h0, per_layer, want = _streaming_operands()
    f32 = jnp.float32
    assert float(jnp.linalg.norm(want.astype(f32))) > 1.0  # activations of order one
    h8, ws = sg.prepare(h0, per_layer)
    assert ws["down_t"].shape == (2, 256, 256) and ws["in_t"].shape == (2, 512, 256)
    assert ws["gu_t"].shape == (2, 320, 256)
    assert h8.shape == (8, 256)
    for stages, max_bn in ((2, 16), (7, 16), (3, 32)):
        with mosaic_chunk.gpu_interpret():
            got = jax.jit(lambda h, w, s=stages, b=max_bn: sg.streaming_chain(
                h, w, programs=1, stages=s, max_bn=b))(h8, ws)
        np.testing.assert_array_equal(np.asarray(got[:1, :200].astype(f32)),
                                      np.asarray(want.astype(f32)))
        assert not np.asarray(got[1:].astype(f32)).any()  # the other batch slots stay zero


def test_streaming_gemv_issues_each_program_s_tiles_in_the_order_it_uses_them():
    """``streaming_gemv.step_of`` (which tile the copy of a program's step ``g`` fetches) is
    the order that program's loops consume them, for every program of 132 at the
    benchmark's sizes, and the programs' tiles cover every row tile of every projection of
    every layer exactly once: what the one-program interpreter test cannot show."""
    (sg,) = _benchmark_modules("streaming_gemv")
    layers, programs = 12, 132
    shapes = {"in_t": (layers, 6208, 1024), "o_t": (layers, 1024, 2048),
              "gu_t": (layers, 5504, 1024), "down_t": (layers, 1024, 2816)}
    ws = {name: jax.ShapeDtypeStruct(shape, jnp.bfloat16) for name, shape in shapes.items()}
    for max_bn in (16, 32):
        kinds = sg._kinds(ws, programs, max_bn)
        assert [k.bn for k in kinds] == ([16, 8, 16, 8] if max_bn == 16 else [32, 8, 32, 8])
        # past the most steps any program has (program 0's), so the invalid tail shows
        span = 1 + layers * sum(-(-k.tiles // programs) * k.steps for k in kinds)
        g = jnp.arange(span, dtype=jnp.int32)
        fields = jax.jit(jax.vmap(jax.vmap(
            lambda g, p, kinds=kinds: sg.step_of(g, kinds, p, programs, layers),
            in_axes=(0, None)), in_axes=(None, 0)))(g, jnp.arange(programs, dtype=jnp.int32))
        valid, layer, index, r, s = (np.asarray(f) for f in fields)  # each [P, span]
        covered: dict[tuple[int, int], list[int]] = {}
        for pid in range(programs):
            want = [(ly, i, rr, ss) for ly in range(layers) for i, kind in enumerate(kinds)
                    for rr in range(max(0, -(-(kind.tiles - pid) // programs)))
                    for ss in range(kind.steps)]
            n = len(want)
            assert valid[pid, :n].all() and not valid[pid, n:].any(), pid
            got = list(zip(layer[pid, :n].tolist(), index[pid, :n].tolist(),
                           r[pid, :n].tolist(), s[pid, :n].tolist(), strict=True))
            assert got == want, pid
            for ly, i, rr, ss in want:
                if ss == 0:
                    covered.setdefault((ly, i), []).append(pid + rr * programs)
        for (ly, i), tiles in covered.items():
            assert sorted(tiles) == list(range(kinds[i].tiles)), (ly, kinds[i].name)
        assert len(covered) == layers * len(kinds)


def test_streaming_gemv_lowers_with_grid_barriers():
    """The many-program kernel (global semaphores between projections) lowers for CUDA on
    the CPU, on JAX 0.10 and 0.11; bad operands are refused before any work."""
    from linearnexus.kernels.common.gpu_lowering import lower_for_gpu

    sg, h0, per_layer, _ = _streaming_operands()
    h8, ws = sg.prepare(h0, per_layer)
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (h8, ws))
    for barrier, max_bn in (("one", 16), ("two", 16), ("one", 32)):
        text = lower_for_gpu(lambda h, w, b=barrier, n=max_bn: sg.streaming_chain(
            h, w, programs=132, stages=8, barrier=b, max_bn=n), *specs)
        assert text.count("mosaic_gpu") >= 1
    with pytest.raises(ValueError, match=r"ws\['o_t'\]: expected \[L=2, 256 \(a multiple of "
                                         r"64\), K <= 512, a multiple of 256\]"):
        sg.streaming_chain(h8, dict(ws, o_t=ws["o_t"][:, :, :200]), programs=1)
    with pytest.raises(ValueError, match=r"stages: expected 2..32"):
        sg.streaming_chain(h8, ws, programs=1, stages=1)
    with pytest.raises(ValueError, match=r"barrier: expected 'one' or 'two', got 'three'"):
        sg.streaming_chain(h8, ws, programs=1, barrier="three")
    with pytest.raises(ValueError, match=r"max_bn: expected 16 or 32, got 64"):
        sg.streaming_chain(h8, ws, programs=1, max_bn=64)
