"""benchmarks/lm_train_gpu.py's cheap pieces (its run is a GPU benchmark), and the block option
that pins a model's linear ops to the mosaic backend."""

from __future__ import annotations

import importlib.util
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from linearnexus.core.config import ConfigError
from linearnexus.models import ModelConfig
from linearnexus.modules.linear.deltanet import GatedDeltaNetBlock, GatedDeltaNetConfig
from linearnexus.modules.linear.gla import GLABlock, GLAConfig
from tests.conftest import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("lm_train_gpu", ROOT / "benchmarks" / "lm_train_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments():
    m = load_script()
    gpu = m.parse_args([])
    assert gpu.loss_backends == ["mosaic", "pallas"] and gpu.backends == ["mosaic", "pallas"]
    assert gpu.sizes["d_model"] == 1024 and gpu.sizes["seq"] == 2048 and gpu.sizes["batch"] == 8
    cpu = m.parse_args(["--quick", "--cpu", "--out", "/tmp/x"])
    assert cpu.loss_backends == ["naive"] and cpu.backends == ["jax"] and cpu.steps == 2
    with pytest.raises(SystemExit):
        m.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        m.parse_args(["--parts", "decode"])


def test_compare_and_markdown():
    m = load_script()
    ref = {"model": "gdn", "backend": "jax", "label": "jax", "losses": [5.0, 4.0, 3.0]}
    close = {"model": "gdn", "backend": "mosaic", "label": "mosaic", "losses": [5.0, 4.02, 3.0]}
    c = m.compare(ref, close, 2e-2)
    assert c["status"] == "PASS" and c["at_step"] == 1 and c["max_rel_diff"] == pytest.approx(5e-3)
    assert m.compare(ref, {**close, "losses": [5.0, 4.0, 3.3]}, 2e-2)["status"] == "FAIL"
    nan = m.compare(ref, {**close, "losses": [5.0, math.nan, 3.0]}, 2e-2)
    assert nan["status"] == "FAIL" and nan["at_step"] == 1
    close["vs_jax"] = c
    res = {"env": {}, "argv": [], "sizes": m.SIZES["full"], "loss_steps": 3, "loss_tol": 2e-2,
           "steps": 10, "warmup": 3, "losses": [ref, close,
                                                {"model": "mamba2", "backend": "mosaic", "error": "boom"}],
           "throughput": [{"framework": "linearnexus", "backend": "pallas", "params": 2.1e8,
                           "ms_per_step": 200.0, "tokens_per_s": 81920.0, "first_step_s": 30.0},
                          {"framework": "linearnexus", "backend": "mosaic", "params": 2.1e8,
                           "ms_per_step": 160.0, "tokens_per_s": 102400.0, "first_step_s": 30.0},
                          {"framework": "fla", "error": "not done"}],
           "skipped": ["FLA: x"], "elapsed_s": 1.0}
    text = m.markdown(res)
    assert "| gdn | mosaic | 5.0000 | 3.0000 | 5.00e-03 | 1 | PASS |" in text
    assert "| mamba2 | mosaic | error: boom" in text and "| fla |  | error: not done" in text
    assert "| 102,400 | 1.25x |" in text and "* skipped: FLA: x" in text


def test_kernel_backend_mosaic_pins_the_op():
    """'mosaic' is a block option of the blocks whose op has that backend; named, a call it
    cannot run (here: no sm_90 GPU) raises instead of falling back."""
    for name in ("gated_deltanet", "deltanet", "mamba2", "gla", "simple_gla", "retnet"):
        ModelConfig(block_pattern=(name,), block_options={name: {"kernel_backend": "mosaic"}})
    with pytest.raises(ConfigError, match="kernel_backend"):
        ModelConfig(block_pattern=("mamba",), block_options={"mamba": {"kernel_backend": "mosaic"}})
    block = GatedDeltaNetBlock(GatedDeltaNetConfig.tiny(kernel_backend="mosaic", dtype="bfloat16"),
                               rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 13, 16), jnp.bfloat16)
    if jax.default_backend() == "cpu":
        with pytest.raises(NotImplementedError, match="compute capability"):
            jax.eval_shape(lambda x: block(x, mode="chunk"), x)  # traced only: raises there
        gla_block = GLABlock(GLAConfig.tiny(kernel_backend="mosaic", dtype="bfloat16"),
                             rngs=nnx.Rngs(0))
        with pytest.raises(NotImplementedError, match="compute capability"):
            jax.eval_shape(lambda x: gla_block(x, mode="chunk"), x)


def test_mosaic_takes_ssd_float32_v_beside_16_bit_qk():
    """ssd's ``v = dt * x`` is float32 beside bf16 q, k: the mosaic kernels compute in bf16
    (a bf16 Mamba2 reaches them); float32 q or k still goes to pallas."""
    from linearnexus.kernels.common.mosaic_ops import check_mosaic_call, mosaic_dtype

    qk = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    v32 = jnp.zeros((1, 64, 1, 64), jnp.float32)
    assert mosaic_dtype(qk, qk, v32) == jnp.bfloat16
    assert mosaic_dtype(qk.astype(jnp.float32), qk, v32) == jnp.float32
    try:
        check_mosaic_call(qk, qk, v32, chunk=64, cu_seqlens=None, check_device=False)
    except NotImplementedError as e:  # only a JAX without the Mosaic GPU APIs may refuse
        assert "float32" not in str(e)
    with pytest.raises(NotImplementedError, match="float32"):
        check_mosaic_call(qk.astype(jnp.float32), qk, v32, chunk=64, cu_seqlens=None,
                          check_device=False)
