"""Mamba block specifics; the protocol checks live in test_blocks_registry.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus.core.config import ConfigError
from linearnexus.core.mode import KernelMode
from linearnexus.modules.ssm import mamba as mamba_module
from linearnexus.modules.ssm.mamba import MambaBlock, MambaConfig
from tests.helpers.parity import assert_close, jit_block


def test_paper_initialisation():
    cfg = MambaConfig(d_model=64, d_state=8)
    block = MambaBlock(cfg, rngs=nnx.Rngs(3))
    assert cfg.d_inner == 128 and cfg.resolved_dt_rank == math.ceil(64 / 16)
    np.testing.assert_allclose(np.asarray(-jnp.exp(block.A_log[...]))[5], -np.arange(1, 9), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(block.D[...]), np.ones(128))
    dt = np.asarray(jax.nn.softplus(block.dt_proj.bias[...]))
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    bound = cfg.resolved_dt_rank ** -0.5
    assert np.abs(np.asarray(block.dt_proj.kernel[...])).max() <= bound
    assert block.in_proj.kernel.shape == (64, 256)
    assert block.x_proj.kernel.shape == (128, cfg.resolved_dt_rank + 16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chunk_size": 0}, r"chunk_size: expected a value > 0, got 0"),
        ({"d_model": -4}, r"d_model: expected a value > 0"),
        ({"dt_min": 0.5, "dt_max": 0.1}, r"dt_min: must be <= dt_max"),
        ({"kernel_backend": "cuda"}, r"kernel_backend: expected one of \['auto', 'jax', 'naive', 'pallas'\]"),
        ({"d_state": 2.0}, r"d_state: expected int"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MambaConfig(**kwargs)


def test_auto_backend_matches_the_per_step_reference():
    # "auto" runs the chunked pure-JAX form here (Pallas only on a GPU); "naive" is the
    # per-step scan in both modes, so the two share no scan code
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 40, 16)), jnp.float32)
    auto = MambaBlock(MambaConfig.tiny(), rngs=nnx.Rngs(0))
    ref = MambaBlock(MambaConfig.tiny(kernel_backend="naive"), rngs=nnx.Rngs(0))
    assert_close(auto(x, mode="chunk")[0], ref(x, mode="chunk")[0], 1e-5, "auto vs naive")


def test_state_shape_errors():
    block = MambaBlock(MambaConfig.tiny(), rngs=nnx.Rngs(0))
    state = block.init_state(3)
    with pytest.raises(ValueError, match=r"state.conv: expected shape \(2, 3, 32\)"):
        block(jnp.ones((2, 4, 16)), state=state)


def test_bfloat16_compute_keeps_float32_state():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 70, 16)), jnp.float32)
    f32 = MambaBlock(MambaConfig.tiny(), rngs=nnx.Rngs(0))
    bf16 = MambaBlock(MambaConfig.tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))
    y32, _ = jit_block(f32, "chunk")(x)
    y16, s16 = jit_block(bf16, "chunk")(x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and s16.ssm.state.dtype == jnp.float32
    assert_close(y16, y32, 5e-2, "bf16 vs f32 output")


def test_mode_none_picks_by_length(monkeypatch):
    # both modes give the same numbers, so the mode the op receives is what tells them apart
    seen = []

    def spy(*args, mode, **kwargs):
        seen.append(KernelMode(mode))
        return mamba_module.selective_scan_impl(*args, mode=mode, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan_impl", mamba_module.selective_scan,
                        raising=False)
    monkeypatch.setattr(mamba_module, "selective_scan", spy)
    block = MambaBlock(MambaConfig.tiny(mode_threshold=8), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    for seq in (8, 7):  # at and just under the threshold
        block(jnp.asarray(rng.standard_normal((1, seq, 16)), jnp.float32))
    assert seen == [KernelMode.CHUNK, KernelMode.RECURRENT]
