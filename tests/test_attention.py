"""Softmax attention (MHA / GQA / MQA), MLA, and the shared layers in modules/common.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus.core.config import ConfigError
from linearnexus.modules.attention import causal, mla
from linearnexus.modules.attention.causal import AttentionBlock, AttentionConfig, KVCache
from linearnexus.modules.attention.mla import MLABlock, MLACache, MLAConfig
from linearnexus.modules.common import Embedding, RMSNorm, RotaryEmbedding, SwiGLU
from tests.helpers.parity import assert_close, assert_trees_close, jit_block

TOL = 2e-5

ATTN_VARIANTS = {
    "mha": dict(n_heads=4, n_kv_heads=None),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa": dict(n_heads=4, n_kv_heads=1),
}
MLA_VARIANTS = {
    "mla-qlora": dict(),
    "mla-fullq": dict(q_lora_rank=None),
}


def make(name: str, **overrides):
    """Build a block by variant name; returns (block, config)."""
    if name in ATTN_VARIANTS:
        config = AttentionConfig.tiny(max_seq_len=32, **{**ATTN_VARIANTS[name], **overrides})
        return AttentionBlock(config, rngs=nnx.Rngs(0)), config
    config = MLAConfig.tiny(max_seq_len=32, **{**MLA_VARIANTS[name], **overrides})
    return MLABlock(config, rngs=nnx.Rngs(0)), config


@pytest.fixture
def rng(key) -> np.random.Generator:
    """Fresh per-test numpy randomness (jax.random would compile a kernel per shape)."""
    return np.random.default_rng(np.asarray(key))


def randn(rng: np.random.Generator, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


# ---- references written independently of the library -----------------------------------


def ref_rope(x, positions, base=10000.0):
    """Half-split RoPE on ``x: [B, T, H, K]`` at ``positions: [B, T]``, numpy float64."""
    x = np.asarray(x, np.float64)
    k = x.shape[-1]
    inv = base ** (-np.arange(0, k, 2) / k)
    ang = np.asarray(positions, np.float64)[..., None, None] * inv  # [B, T, 1, K/2]
    x1, x2 = x[..., : k // 2], x[..., k // 2 :]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                           x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def ref_attention(block: AttentionBlock, x) -> np.ndarray:
    """Causal softmax attention from the block's weights, kv heads repeated per group."""
    cfg = block.config
    b, t, _ = x.shape
    h, hkv, k = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
    x = np.asarray(x, np.float64)
    w = {n: np.asarray(getattr(block, n).kernel[...], np.float64)
         for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    pos = np.broadcast_to(np.arange(t), (b, t))
    q = ref_rope((x @ w["q_proj"]).reshape(b, t, h, k), pos, cfg.rope_base)
    kk = ref_rope((x @ w["k_proj"]).reshape(b, t, hkv, k), pos, cfg.rope_base)
    v = (x @ w["v_proj"]).reshape(b, t, hkv, k)
    kk, v = np.repeat(kk, h // hkv, axis=2), np.repeat(v, h // hkv, axis=2)  # -> [B, T, H, K]
    s = np.einsum("bthk,bshk->bhts", q, kk) / np.sqrt(k)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshk->bthk", p, v).reshape(b, t, h * k)
    return o @ w["o_proj"]


# ---- decoding equals the full forward ----------------------------------------------------


# attention ignores the mode; MLA's "recurrent" is the absorbed path, "chunk" the naive one
@pytest.mark.parametrize("name,mode", [("mha", None), ("gqa", None), ("mqa", None),
                                       ("mla-qlora", "chunk"), ("mla-qlora", "recurrent"),
                                       ("mla-fullq", "recurrent")])
def test_token_by_token_equals_full(name, mode, rng):
    block, cfg = make(name)
    x = randn(rng, 2, 9, cfg.d_model)
    y_full, s_full = jit_block(block, "chunk")(x)
    step = jit_block(block, mode)
    state, ys = block.init_state(2), []
    for t in range(x.shape[1]):
        y_t, state = step(x[:, t : t + 1], state)
        ys.append(y_t)
    assert_close(jnp.concatenate(ys, 1), y_full, TOL, f"{name} {mode} decode")
    assert_trees_close(state, s_full, TOL, f"{name} {mode} cache")
    np.testing.assert_array_equal(np.asarray(state.lengths), [9, 9])


@pytest.mark.parametrize("name", ["mqa", "mla-fullq"])
def test_prefix_then_continuation_and_empty_slots_stay_zero(name, rng):
    block, cfg = make(name)
    x = randn(rng, 2, 12, cfg.d_model)
    run = jit_block(block, None)
    y_full, s_full = run(x)
    y1, s1 = run(x[:, :5])
    y2, s2 = run(x[:, 5:], s1)
    assert_close(jnp.concatenate([y1, y2], 1), y_full, TOL, "prefix+continuation output")
    assert_trees_close(s2, s_full, TOL, "prefix+continuation cache")
    for leaf in jax.tree.leaves(s2)[:2]:
        assert not np.any(np.asarray(leaf[:, 12:]))  # slots past lengths are exactly zero


@pytest.mark.parametrize("name", ["gqa", "mla-qlora"])
def test_left_padded_prompts_then_decoding(name, rng):
    """Batched prompts of lengths 7, 3, 1 (left padded) then 3 decode steps per row."""
    block, cfg = make(name)
    prompts = randn(rng, 3, 7, cfg.d_model)
    steps = randn(rng, 3, 3, cfg.d_model)
    lengths = [7, 3, 1]
    mask = jnp.asarray(np.arange(7)[None] >= 7 - np.asarray(lengths)[:, None])
    run = jit_block(block, None)
    y_p, state = run(prompts, None, mask)
    np.testing.assert_array_equal(np.asarray(state.lengths), lengths)
    y_d, state = run(steps, state)
    for b, n in enumerate(lengths):
        alone = jnp.concatenate([prompts[b : b + 1, 7 - n :], steps[b : b + 1]], 1)
        y_alone, s_alone = run(alone)
        assert_close(y_p[b : b + 1, 7 - n :], y_alone[:, :n], TOL, f"row {b} prompt")
        assert_close(y_d[b : b + 1], y_alone[:, n:], TOL, f"row {b} decode")
        assert_trees_close(jax.tree.map(lambda a, b=b: a[b : b + 1], state), s_alone, TOL,
                           f"row {b} cache")
        assert not np.any(np.asarray(y_p[b, : 7 - n]))  # pads give zeros


@pytest.mark.parametrize("name", ["gqa", "mla-qlora"])
def test_scattered_mask_equals_valid_tokens_alone(name, rng):
    block, cfg = make(name)
    x = randn(rng, 1, 8, cfg.d_model)
    mask = jnp.asarray([[1, 0, 1, 1, 0, 0, 1, 1]], bool)
    run = jit_block(block, None)
    y, s = run(x, None, mask)
    keep = np.flatnonzero(np.asarray(mask[0]))
    y_alone, s_alone = run(x[:, keep])
    assert_close(y[:, keep], y_alone, TOL, "scattered-mask outputs")
    assert_trees_close(s, s_alone, TOL, "scattered-mask cache")


def test_works_under_jit(rng):
    block, cfg = make("gqa")
    x = randn(rng, 2, 6, cfg.d_model)
    step = nnx.jit(lambda blk, x, s: blk(x, state=s))
    y, s = step(block, x[:, :4], block.init_state(2))
    y2, s = step(block, x[:, 4:], s)
    y_ref, s_ref = jit_block(block, None)(x)
    assert_close(jnp.concatenate([y, y2], 1), y_ref, TOL, "jit")
    assert_trees_close(s, s_ref, TOL, "jit cache")


# ---- attention math ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa"])
def test_matches_einsum_reference(name, rng):
    block, cfg = make(name, qkv_bias=False)
    x = randn(rng, 2, 10, cfg.d_model)
    y, _ = jit_block(block, None)(x)
    assert_close(y, ref_attention(block, x), TOL, f"{name} vs reference")


def test_gqa_with_all_kv_heads_is_mha(rng):
    explicit = AttentionBlock(AttentionConfig.tiny(n_heads=4, n_kv_heads=4), rngs=nnx.Rngs(3))
    default = AttentionBlock(AttentionConfig.tiny(n_heads=4, n_kv_heads=None), rngs=nnx.Rngs(3))
    x = randn(rng, 2, 7, 16)
    y = jit_block(explicit, None)(x)[0]
    assert_close(y, jit_block(default, None)(x)[0], 1e-7, "n_kv_heads=n_heads vs None")
    assert_close(y, ref_attention(explicit, x), TOL, "MHA vs reference")


def test_mode_is_validated_and_ignored_by_attention(rng):
    block, cfg = make("gqa")
    x = randn(rng, 2, 5, cfg.d_model)
    y_rec = jit_block(block, "recurrent")(x)[0]
    assert_close(y_rec, jit_block(block, "chunk")(x)[0], 1e-7, "modes")
    with pytest.raises(ValueError, match="mode"):
        block(x, mode="parallel")


def test_bf16_compute_with_f32_params(rng):
    block, cfg = make("gqa", dtype="bfloat16", param_dtype="float32")
    assert block.q_proj.kernel[...].dtype == jnp.float32
    x = randn(rng, 2, 6, cfg.d_model)
    y, state = jit_block(block, None)(x)
    assert y.dtype == jnp.bfloat16 and state.k.dtype == jnp.bfloat16
    ref, _ = jit_block(make("gqa")[0], None)(x)
    assert_close(y, ref, 3e-2, "bf16 vs f32")


# ---- MLA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mla-qlora"])
def test_mla_absorbed_equals_naive(name, rng):
    block, cfg = make(name)
    prefix = randn(rng, 2, 6, cfg.d_model)
    x = randn(rng, 2, 5, cfg.d_model)
    # no cache
    assert_close(jit_block(block, "recurrent")(x)[0], jit_block(block, "chunk")(x)[0], TOL,
                 "no cache")
    # over a filled cache (absorbed attends to the latents, naive up-projects them)
    _, state = jit_block(block, None)(prefix)
    y_abs, s_abs = jit_block(block, "recurrent")(x, state)
    y_naive, s_naive = jit_block(block, "chunk")(x, state)
    assert_close(y_abs, y_naive, TOL, "with cache")
    # same projections either way; only XLA fusion order differs (exact on CPU, ~1e-8 on GPU)
    assert_trees_close(s_abs, s_naive, 1e-6, "cache")


def test_mla_core_paths_agree_on_random_weights(rng):
    b, t, s, h, r, dn, dr, dv = 2, 3, 11, 3, 10, 5, 4, 7
    args = (randn(rng, b, t, h, dn), randn(rng, b, t, h, dr), randn(rng, b, s, r),
            randn(rng, b, s, dr), randn(rng, r, h, dn), randn(rng, r, h, dv))
    allowed = rng.random((b, t, s)) < 0.6
    allowed[:, :, 0] = True  # every query reads at least one key
    allowed = jnp.asarray(allowed)
    core = jax.jit(mla.mla_attention, static_argnames="absorbed")
    naive = core(*args, allowed, absorbed=False)
    absorbed = core(*args, allowed, absorbed=True)
    assert naive.shape == (b, t, h, dv)
    assert_close(absorbed, naive, TOL, "absorbed vs naive core")


def test_mla_cache_is_latent_only():
    block, cfg = make("mla-qlora")
    state = block.init_state(3)
    assert isinstance(state, MLACache)
    assert state.c_kv.shape == (3, 32, cfg.kv_lora_rank)
    assert state.k_rope.shape == (3, 32, cfg.qk_rope_head_dim)
    assert state.lengths.dtype == jnp.int32


def test_cache_bytes_per_token():
    mha = AttentionConfig(d_model=2048, n_heads=16)
    gqa = AttentionConfig(d_model=2048, n_heads=16, n_kv_heads=4)
    latent = MLAConfig(d_model=2048, n_heads=16, kv_lora_rank=512, qk_rope_head_dim=64,
                       qk_nope_head_dim=128, v_head_dim=128)
    assert causal.cache_bytes_per_token(mha, "bfloat16") == 2 * 16 * 128 * 2
    assert causal.cache_bytes_per_token(gqa, "bfloat16") == 2 * 4 * 128 * 2
    assert mla.cache_bytes_per_token(latent, "bfloat16") == (512 + 64) * 2
    assert mla.cache_bytes_per_token(latent, "bfloat16") < causal.cache_bytes_per_token(
        mha, "bfloat16")
    assert mla.cache_bytes_per_token(latent) == (512 + 64) * 4  # config dtype float32


# ---- errors ------------------------------------------------------------------------------


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        AttentionConfig(d_model=16, n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="n_heads"):
        AttentionConfig(d_model=18, n_heads=4)
    with pytest.raises(ConfigError, match="head_dim"):
        AttentionConfig(d_model=12, n_heads=4)  # head dim 3: odd
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        MLAConfig.tiny(qk_rope_head_dim=3)
    with pytest.raises(TypeError, match="AttentionConfig"):
        AttentionBlock(MLAConfig.tiny(), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["gqa", "mla-qlora"])
def test_input_errors(name, rng):
    block, cfg = make(name)
    d = cfg.d_model
    x = randn(rng, 2, 4, d)
    with pytest.raises(ValueError, match="rank 3"):
        block(x[0])
    with pytest.raises(ValueError, match="hidden size"):
        block(randn(rng, 2, 4, d + 2))
    with pytest.raises(ValueError, match="T must be >= 1"):
        block(x[:, :0])
    with pytest.raises(ValueError, match="max_seq_len"):
        block(randn(rng, 1, 33, d))
    state = block.init_state(2)._replace(lengths=jnp.full((2,), 30, jnp.int32))
    with pytest.raises(ValueError, match="overflow"):
        block(x, state=state)
    # the same call fits when the pads would overflow but the valid tokens do not
    block(x, state=state, mask=jnp.asarray([[0, 0, 1, 1], [0, 0, 0, 1]], bool))
    with pytest.raises(ValueError, match="state"):
        block(x, state=block.init_state(3))
    with pytest.raises(TypeError, match="state"):
        block(x, state=(1, 2, 3))


def test_kv_cache_zeros():
    c = KVCache.zeros(2, 8, 3, 4, jnp.bfloat16)
    assert c.k.shape == c.v.shape == (2, 8, 3, 4) and c.k.dtype == jnp.bfloat16
    assert c.lengths.dtype == jnp.int32 and c.max_len == 8
    with pytest.raises(ValueError):
        KVCache.zeros(0, 8, 3, 4)


# ---- shared layers -----------------------------------------------------------------------


def test_rope_depends_only_on_position_difference(rng):
    rope = RotaryEmbedding(12, base=10000.0)
    q, k = randn(rng, 1, 1, 1, 12), randn(rng, 1, 1, 1, 12)

    def dot(m, n):
        qm = rope.apply(q, jnp.array([[m]]))
        kn = rope.apply(k, jnp.array([[n]]))
        return float(jnp.sum(qm * kn))

    base = dot(5, 2)
    for shift in (1, 17, 300):
        np.testing.assert_allclose(dot(5 + shift, 2 + shift), base, rtol=1e-4, atol=1e-5)
    assert abs(dot(5, 2) - dot(5, 4)) > 1e-3  # and it does depend on the difference
    # position 0 is the identity; the norm is preserved
    assert_close(rope.apply(q, jnp.array([[0]])), q, 1e-7, "rope at 0")
    np.testing.assert_allclose(jnp.linalg.norm(rope.apply(q, jnp.array([[9]]))),
                               jnp.linalg.norm(q), rtol=1e-5)


def test_rope_matches_reference_and_partial_rotation(rng):
    x = randn(rng, 2, 5, 3, 10)
    pos = jnp.asarray([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    assert_close(RotaryEmbedding(10).apply(x, pos), ref_rope(x, pos), 1e-6, "rope vs reference")
    partial = RotaryEmbedding(10, rotary_dim=6).apply(x, pos)
    assert_close(partial[..., :6], ref_rope(x[..., :6], pos), 1e-6, "partial rotated part")
    np.testing.assert_array_equal(np.asarray(partial[..., 6:]), np.asarray(x[..., 6:]))
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(10, rotary_dim=5)


def test_rmsnorm_values_shapes_and_dtype(rng):
    norm = RMSNorm(8, eps=1e-6, param_dtype=jnp.float32)
    x = randn(rng, 3, 4, 8, dtype=jnp.bfloat16)
    y = norm(x)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    assert norm.scale[...].dtype == jnp.float32
    xf = np.asarray(x, np.float64)
    ref = xf / np.sqrt((xf**2).mean(-1, keepdims=True) + 1e-6)
    assert_close(y, ref, 1e-2, "rmsnorm bf16")
    assert_close(norm(x.astype(jnp.float32)), ref, 1e-6, "rmsnorm f32")


def test_swiglu_shapes_and_dtype(rng):
    mlp = SwiGLU(48, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert mlp.hidden == 128  # 8/3 * 48 = 128, a multiple of 64
    assert SwiGLU(16, rngs=nnx.Rngs(0)).hidden == 64
    assert SwiGLU(16, hidden=40, rngs=nnx.Rngs(0)).hidden == 40
    x = randn(rng, 2, 5, 48)
    y = mlp(x)
    assert y.shape == (2, 5, 48) and y.dtype == jnp.bfloat16
    assert mlp.w_gate.kernel[...].dtype == jnp.float32
    w = {n: np.asarray(getattr(mlp, n).kernel[...], np.float64) for n in ("w_gate", "w_up",
                                                                         "w_down")}
    xf = np.asarray(x, np.float64)
    g = xf @ w["w_gate"]
    ref = (g / (1 + np.exp(-g)) * (xf @ w["w_up"])) @ w["w_down"]
    assert_close(y, ref, 3e-2, "swiglu")


def test_embedding_and_tied_logits(rng):
    emb = Embedding(50, 12, dtype=jnp.float32, rngs=nnx.Rngs(0))
    ids = jnp.asarray(rng.integers(0, 50, (2, 7)), jnp.int32)
    h = emb(ids)
    assert h.shape == (2, 7, 12)
    table = np.asarray(emb.embedding[...])
    np.testing.assert_array_equal(np.asarray(h), table[np.asarray(ids)])
    x = randn(rng, 2, 7, 12)
    assert_close(emb.attend(x), np.asarray(x) @ table.T, 1e-6, "attend")
    with pytest.raises(TypeError, match="ids"):
        emb(jnp.ones((2, 3)))
