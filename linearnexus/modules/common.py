"""Layers every model and block shares: token embedding, RMSNorm, SwiGLU MLP, rotary embedding.

All layers are Flax NNx modules built eagerly. Layers with parameters take keyword-only
``rngs``; ``dtype`` is the compute dtype and ``param_dtype`` the storage dtype, so bf16
compute can keep float32 master weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearnexus.core.types import Array, DType


def _dtype(value: DType | str | None) -> np.dtype | None:
    """``"bfloat16"`` / ``jnp.bfloat16`` / None -> numpy dtype or None."""
    return None if value is None else jnp.dtype(value)


def math_dtype(dtype: DType | str) -> np.dtype:
    """The dtype to do reductions (norms, softmax, rotations) in: float32, or float64 for f64."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


class Embedding(nnx.Module):
    """Token embedding table ``[V, D]`` with :meth:`attend` for tied output logits.

    Args:
        num_embeddings: vocabulary size V.
        features: embedding width D.
        init_std: standard deviation of the normal initialiser.
        dtype: compute dtype of the outputs (None = ``param_dtype``).
        param_dtype: storage dtype of the table.
        rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(self, num_embeddings: int, features: int, *, init_std: float = 0.02,
                 dtype: DType | str | None = None, param_dtype: DType | str = jnp.float32,
                 rngs: nnx.Rngs) -> None:
        if num_embeddings < 1 or features < 1:
            raise ValueError(
                f"num_embeddings and features must be >= 1, got {num_embeddings}, {features}"
            )
        self.num_embeddings = num_embeddings
        self.features = features
        self.param_dtype = _dtype(param_dtype)
        self.dtype = _dtype(dtype) or self.param_dtype
        table = init_std * jax.random.normal(rngs.params(), (num_embeddings, features), jnp.float32)
        self.embedding = nnx.Param(table.astype(self.param_dtype))

    def __call__(self, ids: Array) -> Array:
        """``ids: [...]`` int -> ``[..., D]`` in ``dtype``.

        Raises:
            TypeError: non-integer ``ids``.
        """
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"ids: expected an integer dtype, got {ids.dtype}")
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """Tied output head: ``x: [..., D]`` -> logits ``[..., V] = x @ table.T``."""
        if x.shape[-1] != self.features:
            raise ValueError(f"x: expected last axis D={self.features}, got shape {x.shape}")
        table = self.embedding[...].astype(self.dtype)
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), table)  # [..., D] -> [..., V]


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x^2) + eps) * scale``, computed in float32 (float64 for f64 input).

    Args:
        dim: size of the normalised (last) axis.
        eps: added to the mean square.
        dtype: output dtype (None = the input's dtype).
        param_dtype: storage dtype of ``scale`` (initialised to ones).
        rngs: accepted for a uniform constructor; unused (no random init).
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype: DType | str | None = None,
                 param_dtype: DType | str = jnp.float32, rngs: nnx.Rngs | None = None) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        del rngs
        self.dim = dim
        self.eps = eps
        self.dtype = _dtype(dtype)
        self.scale = nnx.Param(jnp.ones((dim,), _dtype(param_dtype)))

    def __call__(self, x: Array) -> Array:
        """``x: [..., dim]`` -> same shape, in ``dtype`` (or ``x.dtype``)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last axis {self.dim}, got shape {x.shape}")
        out_dtype = self.dtype or x.dtype
        ct = math_dtype(x.dtype)
        xf = x.astype(ct)
        inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * inv * self.scale[...].astype(ct)).astype(out_dtype)


def swiglu_hidden_size(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's MLP width: ``8/3 * d_model`` rounded up to a multiple of ``multiple_of``."""
    return multiple_of * math.ceil(8 * d_model / 3 / multiple_of)


class SwiGLU(nnx.Module):
    """Gated MLP ``W_down(silu(W_gate x) * W_up x)``.

    Args:
        d_model: input and output width D.
        hidden: inner width F (None = :func:`swiglu_hidden_size`).
        multiple_of: rounding of the default F.
        use_bias: add biases to the three projections.
        dtype: compute dtype (None = ``param_dtype``).
        param_dtype: storage dtype of the weights.
        rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(self, d_model: int, hidden: int | None = None, *, multiple_of: int = 64,
                 use_bias: bool = False, dtype: DType | str | None = None,
                 param_dtype: DType | str = jnp.float32, rngs: nnx.Rngs) -> None:
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        if multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
        hidden = swiglu_hidden_size(d_model, multiple_of) if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.d_model = d_model
        self.hidden = hidden
        pdt = _dtype(param_dtype)
        cdt = _dtype(dtype) or pdt
        kw = dict(use_bias=use_bias, dtype=cdt, param_dtype=pdt, rngs=rngs)
        self.w_gate = nnx.Linear(d_model, hidden, **kw)
        self.w_up = nnx.Linear(d_model, hidden, **kw)
        self.w_down = nnx.Linear(hidden, d_model, **kw)

    def __call__(self, x: Array) -> Array:
        """``x: [..., D]`` -> ``[..., D]`` in the compute dtype."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected last axis D={self.d_model}, got shape {x.shape}")
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))  # [..., F] -> [..., D]


class RotaryEmbedding(nnx.Module):
    """Rotary position embedding (RoPE), half-split layout, angles computed on the fly.

    Feature pairs ``(i, i + R/2)`` of the first ``R = rotary_dim`` features are rotated by
    the angle ``position * base^(-2i/R)``; features past ``R`` pass through unchanged (so a
    head can rotate only part of its dims). Because angles come from explicit absolute
    ``positions``, cached decoding just passes ``cache_length + index``.

    Args:
        head_dim: last-axis size K of the inputs.
        rotary_dim: number of leading features to rotate (None = ``head_dim``); even.
        base: the frequency base (10000 in most models).
    """

    def __init__(self, head_dim: int, *, rotary_dim: int | None = None,
                 base: float = 10000.0) -> None:
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(
                f"rotary_dim must be even and in [2, head_dim={head_dim}], got {rotary_dim}"
            )
        if base <= 0:
            raise ValueError(f"base must be > 0, got {base}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.base = float(base)

    def inv_freq(self) -> np.ndarray:
        """``[R/2]`` float64 inverse frequencies ``base^(-2i/R)``."""
        return self.base ** (-np.arange(0, self.rotary_dim, 2, dtype=np.float64) / self.rotary_dim)

    def cos_sin(self, positions: Array, dtype: DType = jnp.float32) -> tuple[Array, Array]:
        """``positions: [...]`` int -> ``(cos, sin)``, each ``[..., R/2]`` in ``dtype``."""
        inv = jnp.asarray(self.inv_freq(), dtype)
        angles = positions.astype(dtype)[..., None] * inv  # [...] -> [..., R/2]
        return jnp.cos(angles), jnp.sin(angles)

    def apply(self, x: Array, positions: Array) -> Array:
        """Rotate ``x: [B, T, H, K]`` at absolute ``positions: [B, T]`` (or ``[T]``) int.

        Returns:
            ``[B, T, H, K]`` in ``x.dtype`` (rotation done in float32, float64 for f64).

        Raises:
            ValueError: ``x`` not rank 4, ``K != head_dim``, or ``positions`` of wrong shape.
        """
        if x.ndim != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x: expected [B, T, H, K={self.head_dim}], got shape {x.shape}")
        positions = jnp.asarray(positions)
        if positions.ndim == 1:
            positions = jnp.broadcast_to(positions[None], x.shape[:2])
        if positions.shape != x.shape[:2]:
            raise ValueError(
                f"positions: expected shape {x.shape[:2]} [B, T], got {positions.shape}"
            )
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise TypeError(f"positions: expected an integer dtype, got {positions.dtype}")
        ct = math_dtype(x.dtype)
        cos, sin = self.cos_sin(positions, ct)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, R/2] -> [B, T, 1, R/2]
        half = self.rotary_dim // 2
        xf = x.astype(ct)
        x1, x2, rest = xf[..., :half], xf[..., half:self.rotary_dim], xf[..., self.rotary_dim:]
        rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest]
        return jnp.concatenate(rotated, axis=-1).astype(x.dtype)

    __call__ = apply
