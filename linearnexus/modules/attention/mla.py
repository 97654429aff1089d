"""Multi-head latent attention (MLA, DeepSeek-V2): a rank-r latent KV cache.

Per token (``x: [D]``, heads ``h = 1..H``)::

    c_kv    = RMSNorm(W_dkv x)                    [r]        cached
    k_rope  = RoPE(W_kr x)                        [d_rope]   cached, shared by all heads
    q       = W_uq RMSNorm(W_dq x)  (or W_q x)    [H, d_nope + d_rope]
    q_nope, q_rope = split(q);  q_rope = RoPE(q_rope)
    k_nope  = c_kv W_uk                           [H, d_nope]   (W_uk: [r, H, d_nope])
    v       = c_kv W_uv                           [H, d_v]      (W_uv: [r, H, d_v])
    score_h(t, s) = (q_nope_h(t) . k_nope_h(s) + q_rope_h(t) . k_rope(s)) / sqrt(d_nope + d_rope)
    o_h(t)  = sum_s softmax_s(score_h(t, s)) v_h(s);   y = W_o concat_h(o_h)

Two equal ways to compute it:

* **naive** (``mode="chunk"``): up-project the latents to per-head ``k_nope`` and ``v``, then
  ordinary attention. Cheapest for long prompts with no cache.
* **absorbed** (``mode="recurrent"``): ``q_nope . (c_kv W_uk) = (q_nope W_uk^T) . c_kv``, so the
  query is moved into latent space and scores are taken against the cached latents directly;
  likewise ``softmax @ (c_kv W_uv) = (softmax @ c_kv) W_uv``. Decoding then reads only
  ``r + d_rope`` numbers per cached token and never materialises per-head keys.

``mode=None`` picks by :func:`linearnexus.core.mode.select_mode` (absorbed for T < 64).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from linearnexus.core.config import ConfigError, field
from linearnexus.core.mode import KernelMode, as_mode, select_mode
from linearnexus.core.padding import unlayout
from linearnexus.core.types import Array, DType
from linearnexus.modules.attention.common import (
    append_and_read,
    begin_call,
    bytes_per_token,
    empty_slots,
    masked_softmax,
)
from linearnexus.modules.base import BlockConfig, dtype_of
from linearnexus.modules.common import RMSNorm, RotaryEmbedding, math_dtype


@dataclasses.dataclass
class MLAConfig(BlockConfig):
    """Multi-head latent attention.

    Attributes:
        n_heads: heads H.
        kv_lora_rank: r, width of the cached KV latent (DeepSeek-V2: 512).
        q_lora_rank: width of the query latent (None = a full-rank query projection).
        qk_nope_head_dim: per-head query/key dims without position (DeepSeek-V2: 128).
        qk_rope_head_dim: d_rope, dims of the decoupled RoPE query/key (even; DSV2: 64).
        v_head_dim: per-head value dim.
        max_seq_len: slots in the latent cache.
        rope_base: RoPE frequency base.
        norm_eps: epsilon of the latent RMSNorms.
    """

    n_heads: int = field(4, gt=0, doc="heads")
    kv_lora_rank: int = field(128, gt=0, doc="r: cached KV latent width")
    q_lora_rank: int | None = field(None, gt=0, doc="query latent width; None = full rank")
    qk_nope_head_dim: int = field(32, gt=0, doc="per-head q/k dims without RoPE")
    qk_rope_head_dim: int = field(16, gt=0, doc="decoupled RoPE q/k dims (even)")
    v_head_dim: int = field(32, gt=0, doc="per-head value dims")
    max_seq_len: int = field(1024, gt=0, doc="latent cache slots")
    rope_base: float = field(10000.0, gt=0, doc="RoPE frequency base")
    norm_eps: float = field(1e-6, gt=0, doc="RMSNorm epsilon of the latents")

    def validate(self) -> None:
        super().validate()
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"qk_rope_head_dim: must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}"
            )

    @classmethod
    def tiny(cls, d_model: int = 16, **overrides: Any) -> MLAConfig:
        """2 heads, r=8, a query latent of 12, odd-sized nope/value dims, a 128-slot cache."""
        base = {"d_model": d_model, "n_heads": 2, "kv_lora_rank": 8, "q_lora_rank": 12,
                "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 6,
                "max_seq_len": 128}
        return cls.from_dict({**base, **overrides})


class MLACache(NamedTuple):
    """The latent cache: per token only ``r + d_rope`` numbers, independent of H.

    Attributes:
        c_kv: ``[B, S, r]`` normalised KV latents.
        k_rope: ``[B, S, d_rope]`` rotated shared RoPE keys.
        lengths: ``[B]`` int32 number of filled slots per row.
    """

    c_kv: Array
    k_rope: Array
    lengths: Array

    @classmethod
    def zeros(cls, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int,
              dtype: DType | str = jnp.float32) -> MLACache:
        """An empty cache of ``max_len`` slots.

        Raises:
            ValueError: ``batch_size < 1`` or ``max_len < 1``.
        """
        return cls(*empty_slots(batch_size, max_len, ((kv_lora_rank,), (rope_dim,)), dtype))


def cache_bytes_per_token(config: MLAConfig, dtype: DType | str | None = None) -> int:
    """Bytes of cache one token costs in one layer: ``(r + d_rope) * itemsize``.

    Args:
        config: the MLA config.
        dtype: cache dtype (None = ``config.dtype``).
    """
    return bytes_per_token(config.kv_lora_rank + config.qk_rope_head_dim, config, dtype)


class MLABlock(nnx.Module):
    """DeepSeek-V2 multi-head latent attention with a latent cache (see the module docstring).

    ``y, new_state = mla(x, state=None, mask=None, mode=None)`` with ``x: [B, T, D]``; the
    ``state`` / ``mask`` semantics are those of
    :class:`linearnexus.modules.attention.causal.AttentionBlock`, with an
    :class:`MLACache`. ``mode="chunk"`` runs the naive path, ``"recurrent"`` the absorbed
    path, None picks by length; both give the same result.

    Raises:
        ValueError / TypeError: as ``AttentionBlock``.
    """

    def __init__(self, config: MLAConfig, *, rngs: nnx.Rngs) -> None:
        if not isinstance(config, MLAConfig):
            raise TypeError(f"config: expected MLAConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = dtype_of(config.dtype)
        pdt = dtype_of(config.param_dtype)
        d, h, r = config.d_model, config.n_heads, config.kv_lora_rank
        dn, dr, dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=pdt, rngs=rngs)
        norm_kw = dict(eps=config.norm_eps, dtype=self.dtype, param_dtype=pdt)
        if config.q_lora_rank is None:
            self.w_q = nnx.Linear(d, h * (dn + dr), **kw)
        else:
            self.w_dq = nnx.Linear(d, config.q_lora_rank, **kw)
            self.q_norm = RMSNorm(config.q_lora_rank, **norm_kw)
            self.w_uq = nnx.Linear(config.q_lora_rank, h * (dn + dr), **kw)
        self.w_dkv = nnx.Linear(d, r, **kw)
        self.kv_norm = RMSNorm(r, **norm_kw)
        self.w_kr = nnx.Linear(d, dr, **kw)
        # per-head up-projections kept 3-D so the absorbed path can contract over r
        self.w_uk = nnx.Param(
            (jax.random.normal(rngs.params(), (r, h, dn), jnp.float32) * r ** -0.5).astype(pdt)
        )
        self.w_uv = nnx.Param(
            (jax.random.normal(rngs.params(), (r, h, dv), jnp.float32) * r ** -0.5).astype(pdt)
        )
        self.w_o = nnx.Linear(h * dv, d, **kw)
        self.rope = RotaryEmbedding(dr, base=config.rope_base)

    def init_state(self, batch_size: int) -> MLACache:
        """An empty :class:`MLACache` of ``max_seq_len`` slots in the compute dtype."""
        c = self.config
        return MLACache.zeros(batch_size, c.max_seq_len, c.kv_lora_rank, c.qk_rope_head_dim,
                              self.dtype)

    def _queries(self, x: Array) -> Array:
        """``x: [B, T, D]`` -> ``[B, T, H*(d_nope+d_rope)]``."""
        if self.config.q_lora_rank is None:
            return self.w_q(x)
        return self.w_uq(self.q_norm(self.w_dq(x)))

    def __call__(self, x: Array, *, state: MLACache | None = None, mask: Array | None = None,
                 mode: KernelMode | str | None = None) -> tuple[Array, MLACache]:
        """``x: [B, T, D]`` -> ``(y [B, T, D] in the compute dtype, new MLACache)``."""
        c = self.config
        mode = as_mode(mode)
        xa, layout, cache = begin_call(x, state, mask, d_model=c.d_model, max_len=c.max_seq_len,
                                       dtype=self.dtype, init_state=self.init_state)
        batch, seq, _ = x.shape
        mode = mode or select_mode(seq)
        h, dn, dr, dv = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        q = self._queries(xa).reshape(batch, seq, h, dn + dr)  # [B,T,H*(dn+dr)] -> [B,T,H,dn+dr]
        q_nope = q[..., :dn]
        q_rope = self.rope.apply(q[..., dn:], layout.positions)
        c_kv = self.kv_norm(self.w_dkv(xa))  # [B, T, r]
        k_rope = self.w_kr(xa)[:, :, None, :]  # [B, T, dr] -> [B, T, 1, dr]
        k_rope = self.rope.apply(k_rope, layout.positions)[:, :, 0, :]  # -> [B, T, dr]

        new_state, (lat, kr), allowed = append_and_read(cache, (c_kv, k_rope), layout,
                                                        fresh=state is None)
        absorbed = mode is KernelMode.RECURRENT
        out = mla_attention(q_nope, q_rope, lat, kr, self.w_uk[...], self.w_uv[...], allowed,
                            absorbed=absorbed)  # [B, T, H, dv]
        y = self.w_o(out.astype(self.dtype).reshape(batch, seq, h * dv))  # -> [B, T, D]
        return unlayout(y, layout), new_state


def mla_attention(q_nope: Array, q_rope: Array, c_kv: Array, k_rope: Array, w_uk: Array,
                  w_uv: Array, allowed: Array, *, absorbed: bool) -> Array:
    """MLA's attention core over latent keys, naive or absorbed (same result).

    Args:
        q_nope: ``[B, T, H, dn]``. q_rope: ``[B, T, H, dr]`` (rotated).
        c_kv: ``[B, S, r]`` latents. k_rope: ``[B, S, dr]`` rotated shared keys.
        w_uk: ``[r, H, dn]``. w_uv: ``[r, H, dv]``.
        allowed: ``[B, T, S]`` bool.
        absorbed: fold ``w_uk`` into the query and ``w_uv`` into the output instead of
            up-projecting the latents.

    Returns:
        ``[B, T, H, dv]`` in float32 (float64 for f64 inputs).
    """
    ct = math_dtype(q_nope.dtype)
    q_nope, q_rope, c_kv, k_rope = (a.astype(ct) for a in (q_nope, q_rope, c_kv, k_rope))
    w_uk, w_uv = w_uk.astype(ct), w_uv.astype(ct)
    scale = (q_nope.shape[-1] + q_rope.shape[-1]) ** -0.5
    rope_scores = jnp.einsum("bthd,bsd->bhts", q_rope, k_rope)  # [B, H, T, S]
    if absorbed:
        q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk)  # query in latent space [B, T, H, r]
        scores = jnp.einsum("bthr,bsr->bhts", q_lat, c_kv) + rope_scores
        probs = masked_softmax(scores * scale, allowed[:, None])  # [B, H, T, S]
        o_lat = jnp.einsum("bhts,bsr->bthr", probs, c_kv)  # [B, T, H, r]
        return jnp.einsum("bthr,rhv->bthv", o_lat, w_uv)  # [B, T, H, dv]
    k_nope = jnp.einsum("bsr,rhn->bshn", c_kv, w_uk)  # [B, S, r] -> [B, S, H, dn]
    v = jnp.einsum("bsr,rhv->bshv", c_kv, w_uv)  # [B, S, r] -> [B, S, H, dv]
    scores = jnp.einsum("bthn,bshn->bhts", q_nope, k_nope) + rope_scores
    probs = masked_softmax(scores * scale, allowed[:, None])  # [B, H, T, S]
    return jnp.einsum("bhts,bshv->bthv", probs, v)  # [B, T, H, dv]

