"""Causal softmax self-attention (MHA / GQA / MQA) with RoPE and a preallocated KV cache.

``n_kv_heads == n_heads`` is multi-head attention, ``1 < n_kv_heads < n_heads`` grouped-query
attention (query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``) and
``n_kv_heads == 1`` multi-query attention.

The cache (:class:`KVCache`) has a fixed size ``max_seq_len`` so decoding never changes array
shapes: slot ``s`` of row ``b`` holds the key/value of absolute position ``s`` and
``lengths[b]`` says how many slots are filled. A call writes its valid tokens at slots
``lengths[b] .. lengths[b] + n_valid[b] - 1``; slots past the new length stay exactly zero.
The cache handling, call prologue and causal masking shared with MLA live in
:mod:`linearnexus.modules.attention.common`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
from flax import nnx

from linearnexus.core.autodiff import grouped_softmax_attention, written_backward_enabled
from linearnexus.core.config import ConfigError, field
from linearnexus.core.mode import KernelMode, as_mode
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
from linearnexus.modules.common import (
    RMSNorm,
    RotaryEmbedding,
    dense,
    fused_decode_enabled,
    fused_dense,
    input_norm_first,
    math_dtype,
)

# ---- config and cache --------------------------------------------------------------------


@dataclasses.dataclass
class AttentionConfig(BlockConfig):
    """Causal self-attention.

    Attributes:
        n_heads: query heads H.
        n_kv_heads: key/value heads (None = ``n_heads``); must divide ``n_heads``. Fewer than
            ``n_heads`` is GQA, 1 is MQA; the cache shrinks by ``n_heads / n_kv_heads``.
        head_dim: K per head (None = ``d_model // n_heads``, which then must divide evenly);
            even, because RoPE rotates feature pairs.
        max_seq_len: slots in the KV cache, i.e. the longest context a cache can hold.
        rope_base: RoPE frequency base.
        qkv_bias: add biases to the q, k, v projections (the output projection has none).
    """

    n_heads: int = field(4, gt=0, doc="query heads")
    n_kv_heads: int | None = field(None, gt=0, doc="key/value heads; None = n_heads")
    head_dim: int | None = field(None, gt=0, doc="per-head dim; None = d_model // n_heads")
    max_seq_len: int = field(1024, gt=0, doc="KV cache slots")
    rope_base: float = field(10000.0, gt=0, doc="RoPE frequency base")
    qkv_bias: bool = field(False, doc="biases on q, k, v projections")

    def validate(self) -> None:
        super().validate()
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_kv_heads: must divide n_heads={self.n_heads}, got {self.n_kv_heads}"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"n_heads: must divide d_model={self.d_model} when head_dim is None, "
                f"got {self.n_heads}"
            )
        if self.resolved_head_dim % 2:
            raise ConfigError(
                f"head_dim: must be even (RoPE rotates pairs), got {self.resolved_head_dim}"
            )

    @property
    def resolved_kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_heads`` or ``n_heads``)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def resolved_head_dim(self) -> int:
        """K per head (``head_dim`` or ``d_model // n_heads``)."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @classmethod
    def tiny(cls, d_model: int = 16, **overrides: Any) -> AttentionConfig:
        """4 query heads sharing 2 KV heads (GQA), head dim 4, a 128-slot cache."""
        base = {"d_model": d_model, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128}
        return cls.from_dict({**base, **overrides})


class KVCache(NamedTuple):
    """Preallocated key/value cache (a pytree, passed in and returned).

    Attributes:
        k: ``[B, S, Hkv, K]`` keys (already rotated), slot ``s`` = absolute position ``s``.
        v: ``[B, S, Hkv, V]`` values.
        lengths: ``[B]`` int32 number of filled slots per row.
    """

    k: Array
    v: Array
    lengths: Array

    @classmethod
    def zeros(cls, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
              dtype: DType | str = jnp.float32, v_head_dim: int | None = None) -> KVCache:
        """An empty cache of ``max_len`` slots.

        Raises:
            ValueError: ``batch_size < 1`` or ``max_len < 1``.
        """
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        shapes = ((n_kv_heads, head_dim), (n_kv_heads, v_head_dim))
        return cls(*empty_slots(batch_size, max_len, shapes, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[1]


def cache_bytes_per_token(config: AttentionConfig, dtype: DType | str | None = None) -> int:
    """Bytes of KV cache one token costs in one layer: ``2 * n_kv_heads * head_dim * itemsize``.

    Args:
        config: the attention config.
        dtype: cache dtype (None = ``config.dtype``).
    """
    return bytes_per_token(2 * config.resolved_kv_heads * config.resolved_head_dim, config, dtype)


# ---- attention math ----------------------------------------------------------------------


def grouped_attention(q: Array, k: Array, v: Array, allowed: Array, scale: float) -> Array:
    """Softmax attention with query heads grouped over shared key/value heads.

    Args:
        q: ``[B, T, H, K]``. k: ``[B, S, Hkv, K]``. v: ``[B, S, Hkv, V]`` with ``Hkv | H``.
        allowed: ``[B, T, S]`` bool.
        scale: multiplies ``q . k``.

    Returns:
        ``[B, T, H, V]`` in ``q.dtype``; scores and softmax run in float32 (float64 for f64).
        Differentiated through a written-out backward (``core/autodiff.py``) unless that is
        turned off.
    """
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    ct = math_dtype(q.dtype)
    qg = q.reshape(batch, seq, kv_heads, heads // kv_heads, dim)  # [B,T,H,K] -> [B,T,Hkv,G,K]
    # the same attention, its backward written out (a Python-number scale: it is static there)
    if written_backward_enabled() and isinstance(scale, (int, float)):
        out = grouped_softmax_attention(qg.astype(ct), k.astype(ct), v.astype(ct), allowed,
                                        scale)  # [B, T, Hkv, G, V]
    else:
        scores = jnp.einsum("btngk,bsnk->bngts", qg.astype(ct), k.astype(ct)) * scale
        probs = masked_softmax(scores, allowed[:, None, None])  # [B, Hkv, G, T, S]
        out = jnp.einsum("bngts,bsnv->btngv", probs, v.astype(ct))  # [B, T, Hkv, G, V]
    return out.reshape(batch, seq, heads, v.shape[-1]).astype(q.dtype)  # -> [B, T, H, V]


# ---- the block ---------------------------------------------------------------------------


class AttentionBlock(nnx.Module):
    """Causal multi-head / grouped-query / multi-query self-attention with RoPE.

    ``y, new_state = attn(x, state=None, mask=None, mode=None)`` with ``x: [B, T, D]``:

    * ``state``: a :class:`KVCache` (None = empty). The returned cache holds the old
      entries plus this call's valid tokens; with ``state=None`` the queries attend only
      to this call's tokens (no ``max_seq_len``-long cache read).
    * ``mask``: ``[B, T]`` padding mask (True = valid, any pattern). Valid tokens are taken
      in order as one contiguous continuation of the cache; pads are never cached, read
      or rotated into a position, and their outputs are zero.
    * ``mode``: validated and ignored: attention has one form, so ``"chunk"`` and
      ``"recurrent"`` give the same result.

    Raises:
        ValueError: bad ``x`` / ``mask`` / ``state`` shapes, ``T == 0``, or a call that
            overflows the cache (checked when lengths are concrete; ``T > max_seq_len``
            always). TypeError: a non-float ``x`` or a ``state`` that is not a KVCache.
    """

    def __init__(self, config: AttentionConfig, *, rngs: nnx.Rngs) -> None:
        if not isinstance(config, AttentionConfig):
            raise TypeError(f"config: expected AttentionConfig, got {type(config).__name__}")
        self.config = config
        self.n_heads = config.n_heads
        self.n_kv_heads = config.resolved_kv_heads
        self.head_dim = config.resolved_head_dim
        self.dtype = dtype_of(config.dtype)
        d, h, hkv, k = config.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=dtype_of(config.param_dtype), rngs=rngs)
        self.q_proj = nnx.Linear(d, h * k, use_bias=config.qkv_bias, **kw)
        self.k_proj = nnx.Linear(d, hkv * k, use_bias=config.qkv_bias, **kw)
        self.v_proj = nnx.Linear(d, hkv * k, use_bias=config.qkv_bias, **kw)
        self.o_proj = nnx.Linear(h * k, d, use_bias=False, **kw)
        self.rope = RotaryEmbedding(k, base=config.rope_base)

    def init_state(self, batch_size: int) -> KVCache:
        """An empty :class:`KVCache` of ``max_seq_len`` slots in the compute dtype."""
        return KVCache.zeros(batch_size, self.config.max_seq_len, self.n_kv_heads,
                             self.head_dim, self.dtype)

    def decode_linears(self) -> list[list[nnx.Linear]]:
        """The projections a one-token call runs as one matmul (``modules.common.fused_dense``):
        q, k and v."""
        return [[self.q_proj, self.k_proj, self.v_proj]]

    def __call__(self, x: Array, *, state: KVCache | None = None, mask: Array | None = None,
                 mode: KernelMode | str | None = None,
                 input_norm: RMSNorm | None = None) -> tuple[Array, KVCache]:
        """``x: [B, T, D]`` -> ``(y [B, T, D] in the compute dtype, new KVCache)``;
        ``input_norm`` (an :class:`RMSNorm`, the layer's pre-norm) is applied to ``x`` first,
        in the q | k | v projection's kernel for one token on a GPU."""
        as_mode(mode)  # validated only: one form of attention
        x, input_norm = input_norm_first(x, input_norm, self.dtype, fold=mask is None)
        xa, layout, cache = begin_call(x, state, mask, d_model=self.config.d_model,
                                       max_len=self.config.max_seq_len, dtype=self.dtype,
                                       init_state=self.init_state)
        batch, seq, _ = x.shape
        h, hkv, k = self.n_heads, self.n_kv_heads, self.head_dim
        if seq == 1 and fused_decode_enabled():  # one token: q, k, v in one matmul
            q, key, val = fused_dense(xa, self.decode_linears()[0], norm=input_norm)
        else:
            xa = xa if input_norm is None else input_norm(xa)
            q, key, val = (dense(lin, xa) for lin in self.decode_linears()[0])
        q = q.reshape(batch, seq, h, k)  # [B, T, H*K] -> [B, T, H, K]
        key = key.reshape(batch, seq, hkv, k)  # [B, T, Hkv*K] -> [B, T, Hkv, K]
        val = val.reshape(batch, seq, hkv, k)  # [B, T, Hkv*K] -> [B, T, Hkv, K]
        q = self.rope.apply(q, layout.positions)
        key = self.rope.apply(key, layout.positions)

        new_state, (keys, vals), allowed = append_and_read(cache, (key, val), layout,
                                                           fresh=state is None)
        out = grouped_attention(q, keys, vals, allowed, k ** -0.5)  # [B, T, H, K]
        y = dense(self.o_proj, out.reshape(batch, seq, h * k))  # [B, T, H, K] -> [B, T, D]
        return unlayout(y, layout), new_state

