"""Shared layers: embedding, (gated) RMSNorm, SwiGLU MLP, rotary embedding, short conv, L2 norm,
and PyTorch's xavier-uniform initialiser.

All layers are Flax NNx modules built eagerly. Layers with parameters take keyword-only
``rngs``; ``dtype`` is the compute dtype and ``param_dtype`` the storage dtype, so bf16
compute can keep float32 master weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearnexus.core.autodiff import rotate_half_pairs, swiglu, written_backward_enabled
from linearnexus.core.conv import depthwise_conv1d
from linearnexus.core.types import Array, DType, is_float_dtype
from linearnexus.kernels.fused_decode.gemv import (
    batch_transposed,
    fused_ready,
    one_row_conv,
    one_row_fused,
    one_row_group_norm,
    one_row_matmul,
    one_row_ready,
    tiles,
    transposed_weights,
)


def _dtype(value: DType | str | None) -> np.dtype | None:
    """``"bfloat16"`` / ``jnp.bfloat16`` / None -> numpy dtype or None."""
    return None if value is None else jnp.dtype(value)


def math_dtype(dtype: DType | str) -> np.dtype:
    """The dtype to do reductions (norms, softmax, rotations) in: float32, or float64 for f64."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def xavier_uniform(gain: float = 1.0) -> nnx.Initializer:
    """PyTorch's ``xavier_uniform_(w, gain)``: ``U(+-gain * sqrt(6 / (fan_in + fan_out)))``."""
    return nnx.initializers.variance_scaling(gain * gain, "fan_avg", "uniform")


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

    def attend(self, x: Array, *, norm: RMSNorm | None = None) -> Array:
        """Tied output head: ``x: [..., D]`` -> logits ``[..., V] = x @ table.T``
        (``norm(x) @ table.T`` with ``norm``: one-token decoding on a GPU folds that norm into
        the head's kernel, see :func:`norm_foldable`; at batch 1, or up to
        ``LINEARNEXUS_DECODE_ROWS`` rows of one token each)."""
        if x.shape[-1] != self.features:
            raise ValueError(f"x: expected last axis D={self.features}, got shape {x.shape}")
        table = self.embedding[...].astype(self.dtype)
        if norm is not None:
            one_token = math.prod(x.shape[:-1]) == 1 or (x.ndim >= 2 and x.shape[-2] == 1)
            if one_token and norm_foldable(x, norm, jnp.dtype(self.dtype)):
                out = one_row_fused(x.reshape(-1, self.features), table, transposed=True,
                                    norm_scale=norm.scale[...], norm_eps=norm.eps)  # [R, V]
                return out.reshape(*x.shape[:-1], out.shape[-1])  # [R, V] -> [..., V]
            x = norm(x)
        if one_row_ready(x):  # batch-1 decoding on a GPU: kernels/fused_decode/gemv.py
            return one_row_matmul(x.astype(self.dtype), table, transposed=True)  # [..., V]
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


#: set to "0" to run one-token calls with a matmul per projection, as longer calls do
FUSED_DECODE_ENV = "LINEARNEXUS_FUSED_DECODE"


def fused_decode_enabled() -> bool:
    """False when ``LINEARNEXUS_FUSED_DECODE=0`` (read at trace time)."""
    return os.environ.get(FUSED_DECODE_ENV, "1") != "0"


def norm_foldable(x: Array, norm: Any, dtype: DType) -> bool:
    """Whether ``norm(x)`` can run in the prologue of a one-row (or few-row) matmul kernel
    computing in ``dtype`` (``kernels.fused_decode.gemv.one_row_fused``): ``fused_ready``
    (one row, or up to ``LINEARNEXUS_DECODE_ROWS``, on a GPU in the ``pallas`` mode),
    ``norm`` a plain :class:`RMSNorm` over ``x``'s last axis whose output dtype is ``dtype``
    (the matmul's compute dtype), ``x`` a float array. The kernel then computes the same
    float32 norm; for one row it rounds the normalised row to ``dtype`` as the module does
    (for several, ``x * scale``, with ``1 / rms`` applied to the product)."""
    return (type(norm) is RMSNorm and x.shape[-1] == norm.dim and is_float_dtype(x.dtype)
            and fused_ready(x) and jnp.dtype(norm.dtype or x.dtype) == jnp.dtype(dtype))


def input_norm_first(x: Array, norm: RMSNorm | None, dtype: DType, *,
                     fold: bool = True) -> tuple[Array, RMSNorm | None]:
    """A block's ``input_norm`` (the layer's pre-norm handed to the block): ``(x, norm)``
    when the block may fold it into its input projection's kernel (``fold``, one token
    ``x [B, 1, D]`` already in the compute ``dtype``, :func:`norm_foldable`), else
    ``(norm(x), None)`` (the norm applied here, as the layer would have)."""
    if norm is None:
        return x, None
    if (fold and getattr(x, "ndim", 0) == 3 and x.shape[1] == 1
            and jnp.dtype(x.dtype) == jnp.dtype(dtype) and norm_foldable(x, norm, dtype)):
        return x, norm
    return norm(x), None


def fused_dense(x: Array, linears: Sequence[nnx.Linear], *,
                groups: Sequence[int] | None = None,
                norm: RMSNorm | None = None) -> list[Array]:
    """``[l(x) for l in linears]`` as one matmul: ``x [..., D] @ [W_1 | ... | W_n]``.

    For one-token decoding, where every projection is a separate tiny GEMV kernel and the
    step is bound by how many kernels run, not by the bytes they read. The concatenated
    weights come from :func:`using_decode_weights` when the caller computed them once
    (``generate.Decoder`` does); otherwise they are concatenated inside the traced
    function, where in an on-device loop XLA hoists them out of the loop body. Each output
    column is the same dot product as in its own ``nnx.Linear`` (the same dtypes, precision
    and bias), so results differ at most by the matmul's rounding.

    Args:
        x: ``[..., D]``.
        linears: ``nnx.Linear`` modules of the same ``in_features`` D, compute dtype,
            precision and ``dot_general``.
        groups: how many consecutive linears each output covers (summing to
            ``len(linears)``): ``(3, 1)`` returns ``[y_1 | y_2 | y_3, y_4]``, the first three
            outputs side by side without a concatenate. None: one output per linear.
        norm: an :class:`RMSNorm` applied to ``x`` first (a pre-norm layer's norm), or
            None. For one row (or up to ``LINEARNEXUS_DECODE_ROWS``) on a GPU in the
            ``pallas`` mode it runs in the matmul kernel's prologue (:func:`norm_foldable`,
            and bias-free plain linears); elsewhere as the module.

    Returns:
        ``[y_1 [..., F_1], ..., y_n [..., F_n]]`` (or one per group) in the linears'
        compute dtype.

    Raises:
        ValueError: no linears, linears that differ in what their matmul does, or
            ``groups`` that do not sum to ``len(linears)``.
    """
    if not linears:
        raise ValueError("linears: expected at least one nnx.Linear, got none")
    groups = [1] * len(linears) if groups is None else list(groups)
    if sum(groups) != len(linears) or min(groups) < 1:
        raise ValueError(f"groups: expected positive sizes summing to {len(linears)} (the "
                         f"number of linears), got {groups}")
    first = linears[0]
    for lin in linears[1:]:
        if (lin.in_features, lin.dtype, lin.precision, lin.dot_general,
                lin.preferred_element_type) != (first.in_features, first.dtype, first.precision,
                                                first.dot_general, first.preferred_element_type):
            raise ValueError("linears: expected the same in_features, dtype, precision and "
                             "dot_general in all of them")
    ends = np.cumsum([lin.out_features for lin in linears])[np.cumsum(groups) - 1]
    if norm is not None:
        y = _normed_matmul(norm, linears, x)
        if y is not None:
            return jnp.split(y, ends[:-1].tolist(), axis=-1)
        x = norm(x)
    kernel, bias, transposed = _group_weights(linears)
    x, kernel, bias = first.promote_dtype((x, kernel, bias), dtype=first.dtype)
    y = _matmul(first, x, kernel, transposed)  # [..., D] @ [D, sum F] -> [..., sum F]
    if bias is not None:
        y = y + bias
    return jnp.split(y, ends[:-1].tolist(), axis=-1)


def _matmul(lin: nnx.Linear, x: Array, kernel: Array, transposed: bool = False) -> Array:
    """``x [..., D] @ kernel [D, N]`` (``kernel [N, D]`` when ``transposed``) as ``lin``'s
    matmul does it (its precision and preferred element type); one row on a GPU through
    ``kernels.fused_decode.gemv`` (not for a custom ``dot_general``)."""
    if lin.dot_general is jax.lax.dot_general and one_row_ready(x):
        return one_row_matmul(x, kernel, transposed=transposed,
                              out_dtype=lin.preferred_element_type, precision=lin.precision)
    kwargs = ({} if lin.preferred_element_type is None
              else {"preferred_element_type": lin.preferred_element_type})
    if transposed and lin.dot_general is not jax.lax.dot_general:
        kernel, transposed = kernel.T, False  # [N, D] -> [D, N]: what a custom matmul takes
    dims = (((x.ndim - 1,), (1 if transposed else 0,)), ((), ()))
    return lin.dot_general(x, kernel, dims, precision=lin.precision,
                           **kwargs)  # [..., D] -> [..., N]


def _normed_matmul(norm: RMSNorm, linears: Sequence[nnx.Linear], x: Array) -> Array | None:
    """``norm(x) @ [W_1 | ... | W_n]`` in one ``one_row_fused`` kernel (the norm in its
    prologue), ``[..., sum F]``; None where that does not apply."""
    dtype = jnp.dtype(linears[0].dtype or linears[0].param_dtype)
    if not (norm_foldable(x, norm, dtype) and all(
            _kernel_linear(lin) and jnp.dtype(lin.dtype or lin.param_dtype) == dtype
            for lin in linears)):
        return None
    kernel, _, transposed = _group_weights(linears)  # [D, sum F] or [sum F, D]
    out = one_row_fused(x.reshape(-1, norm.dim), kernel.astype(dtype), transposed=transposed,
                        norm_scale=norm.scale[...], norm_eps=norm.eps)  # [R, sum F]
    return out.reshape(*x.shape[:-1], out.shape[-1])  # [R, sum F] -> [..., sum F]


def conv_dense_weight(x: Array, linears: Sequence[nnx.Linear], conv: ShortConv, cache: Array,
                      *, conv_start: int = 0, norm: RMSNorm | None = None) -> Array | None:
    """The transposed weight ``[sum F, D]`` (compute dtype) that :func:`conv_dense`'s kernel
    reads, or None where :func:`conv_dense` does not apply (see there)."""
    dtype = jnp.dtype(linears[0].dtype or linears[0].param_dtype)
    rows = math.prod(x.shape[:-1])
    bn = tiles(x.shape[-1], rows)[1]
    channels = conv.channels
    if not (fused_ready(x) and conv.activation == "silu" and conv.width >= 2
            and tuple(cache.shape) == (rows, conv.width - 1, channels)
            and jnp.dtype(cache.dtype) == dtype and conv_start % bn == 0 and channels % bn == 0
            and conv_start + channels <= sum(lin.out_features for lin in linears)
            and all(_kernel_linear(lin) and jnp.dtype(lin.dtype or lin.param_dtype) == dtype
                    for lin in linears)):
        return None
    if norm is None:
        if jnp.dtype(x.dtype) != dtype:
            return None
    elif not norm_foldable(x, norm, dtype):
        return None
    return transposed_weight(linears).astype(dtype)


def transposed_weight(linears: Sequence[nnx.Linear]) -> Array:
    """``[W_1 | ... | W_n]^T`` ``[sum F, D]``: the decode table's transposed copy where it
    holds one (:func:`using_decode_weights`), else made here (hoisted out of a decode loop
    by XLA)."""
    kernel, _, transposed = _group_weights(linears)  # [D, sum F] or [sum F, D]
    return kernel if transposed else kernel.T


def conv_dense(x: Array, linears: Sequence[nnx.Linear], conv: ShortConv, cache: Array, *,
               conv_start: int = 0, norm: RMSNorm | None = None) -> tuple[Array, Array] | None:
    """``fused_dense(x, linears)`` (of ``norm(x)`` with a norm) whose columns ``[conv_start,
    conv_start + C)`` then take ``conv``'s one-token step (silu), in one kernel
    (``kernels.fused_decode.gemv.one_row_conv``): a recurrent layer's input projection and
    short conv at batch 1 (or up to ``LINEARNEXUS_DECODE_ROWS``) on a GPU in the ``pallas``
    mode. Returns ``(y [..., sum F] in the compute dtype, new_cache [R, W-1, C])``, or None
    where that does not apply (then the caller runs the conv itself): not ``fused_ready``,
    linears that are not plain bias-free matmuls of one dtype, a conv without silu or of
    another width than the cache, a cache not in the compute dtype, odd ``conv_start`` or
    ``C``, or a norm that does not fold."""
    wt = conv_dense_weight(x, linears, conv, cache, conv_start=conv_start, norm=norm)
    if wt is None:
        return None
    depth = x.shape[-1]
    bias = None if conv.conv_bias is None else conv.conv_bias[...]
    y, new_cache = one_row_conv(
        x.reshape(-1, depth), wt, cache, conv.conv_weight[...], bias,
        conv_start=conv_start, transposed=True,
        norm_scale=None if norm is None else norm.scale[...],
        norm_eps=None if norm is None else norm.eps)  # [R, sum F], [R, W-1, C]
    return y.reshape(*x.shape[:-1], y.shape[-1]), new_cache  # [R, sum F] -> [..., sum F]


def head_norm_group(lin: nnx.Linear, x: Array, norm: Any, gated: bool) -> int | None:
    """The group size with which :func:`head_normed_dense` folds ``norm`` (per head, over
    its last axis of ``norm.dim`` features) into ``lin``'s one-row kernel for an input like
    ``x [..., H*V]`` (shape and dtype), or None where it does not: ``norm`` a plain
    :class:`RMSNorm` (``gated`` False) or a :class:`GatedRMSNorm` that normalises before a
    silu gate over whole heads (``gated`` True), in ``lin``'s compute dtype; ``lin`` a
    plain bias-free matmul; the head size a power of two the kernel's tiles hold whole."""
    dtype = jnp.dtype(lin.dtype or lin.param_dtype)
    if gated:
        ok = (type(norm) is GatedRMSNorm and norm.norm_before_gate and norm.activation == "silu"
              and norm.group_size in (None, norm.dim))
    else:
        ok = type(norm) is RMSNorm
    if not (ok and fused_ready(x) and _kernel_linear(lin) and jnp.dtype(x.dtype) == dtype
            and jnp.dtype(norm.dtype or x.dtype) == dtype and x.shape[-1] == lin.in_features):
        return None
    group, depth = norm.dim, x.shape[-1]
    if group & (group - 1) or depth % group or group > tiles(depth, math.prod(x.shape[:-1]))[0]:
        return None
    return group


def head_normed_dense(lin: nnx.Linear, x: Array, norm: Any, gate_row: Array | None = None,
                      gate_offset: int = 0) -> Array | None:
    """``lin(norm(x per head, gate))`` in one kernel (``gemv.one_row_group_norm``: the
    per-head output norm and silu gate of a linear-attention layer in ``o_proj``'s
    prologue) for one row (or up to ``LINEARNEXUS_DECODE_ROWS``) on a GPU, or None where
    :func:`head_norm_group` says it does not apply. ``x [..., H*V]`` (R rows);
    ``gate_row [R, F]`` holds the gate's ``H*V`` values from ``gate_offset`` on (None
    without a gate)."""
    group = head_norm_group(lin, x, norm, gate_row is not None)
    if group is None:
        return None
    depth = x.shape[-1]
    kernel, _, transposed = _group_weights([lin])
    dtype = jnp.dtype(lin.dtype or lin.param_dtype)
    out = one_row_group_norm(x.reshape(-1, depth), kernel.astype(dtype), group=group,
                             norm_scale=norm.scale[...], norm_eps=norm.eps, gate=gate_row,
                             gate_offset=gate_offset, transposed=transposed)  # [R, N]
    return out.reshape(*x.shape[:-1], out.shape[-1])  # [R, N] -> [..., N]


def dense(lin: nnx.Linear, x: Array, *, norm: RMSNorm | None = None) -> Array:
    """``lin(x)`` (``lin(norm(x))`` with ``norm``): ``x [..., D]`` -> ``[..., N]``, with the
    same dtypes, precision and bias; a call of one row in all on a GPU runs
    ``kernels.fused_decode.gemv`` (batch-1 decoding's projections), reading the weight from
    the decode table when it is there, with ``norm`` in the kernel's prologue where
    :func:`norm_foldable` says so (and ``lin`` is bias-free; then also for up to
    ``LINEARNEXUS_DECODE_ROWS`` rows). Several rows take XLA's matmul, over the decode
    table's transposed weight where it holds one and ``gemv.batch_transposed`` picks it."""
    if norm is not None:
        y = _normed_matmul(norm, [lin], x)
        if y is not None:
            return y
        x = norm(x)
    if not _plain_linear(lin):
        return lin(x)
    kernel, bias, transposed = _group_weights([lin])
    if not (one_row_ready(x)
            or (transposed and batch_transposed(lin.in_features, lin.out_features))):
        return lin(x)
    x, kernel, bias = lin.promote_dtype((x, kernel, bias), dtype=lin.dtype)
    y = _matmul(lin, x, kernel, transposed)
    return y if bias is None else y + bias


def normed_dense(lin: nnx.Linear, norm: Any, xg: Array) -> Array | None:
    """``lin(norm.normalize_gated(xg))`` as one kernel for a one-row call (or up to
    ``LINEARNEXUS_DECODE_ROWS`` rows) on a GPU in the ``pallas`` mode (the RMSNorm in the
    matmul's prologue: Mamba2's gated norm before ``out_proj`` when decoding), or None where
    that does not apply (the caller runs the two steps): ``norm`` a :class:`GatedRMSNorm` that
    gates before normalising, over the whole row (one group), in ``lin``'s compute dtype;
    ``lin`` a plain ``nnx.Linear`` without a bias. ``xg [..., D]`` (float32 from a fused
    kernel, or the compute dtype)."""
    if not (isinstance(norm, GatedRMSNorm) and not norm.norm_before_gate
            and norm.group_size in (None, norm.dim) and fused_ready(xg) and _kernel_linear(lin)
            and xg.shape[-1] == norm.dim == lin.in_features):
        return None
    dtype = jnp.dtype(lin.dtype or lin.param_dtype)
    if jnp.dtype(norm.dtype or xg.dtype) != dtype or not is_float_dtype(xg.dtype):
        return None
    kernel, _, transposed = _group_weights([lin])
    out = one_row_fused(xg.reshape(-1, norm.dim), kernel.astype(dtype), transposed=transposed,
                        norm_scale=norm.scale[...], norm_eps=norm.eps)  # [R, N]
    return out.reshape(*xg.shape[:-1], lin.out_features)  # [R, N] -> [..., N]


def _plain_linear(lin: nnx.Linear) -> bool:
    """``lin`` computes what ``nnx.Linear`` does (not a subclass with its own ``__call__``,
    e.g. an adapter), so its kernel and bias are the whole of it."""
    return type(lin).__call__ is nnx.Linear.__call__


def _kernel_linear(lin: nnx.Linear) -> bool:
    """``lin`` is a plain matmul that ``one_row_fused`` computes as it does: a plain
    ``nnx.Linear`` without a bias, precision, preferred element type or custom matmul."""
    return (_plain_linear(lin) and lin.bias is None and lin.precision is None
            and lin.preferred_element_type is None and lin.dot_general is jax.lax.dot_general)


def _group_weights(linears: Sequence[nnx.Linear]) -> tuple[Array, Array | None, bool]:
    """``(kernel, bias, transposed)`` of a group: from :func:`using_decode_weights`' table
    when set (``[sum F, D]`` when stored transposed), else ``[W_1 | ... | W_n] [D, sum F]``
    made here."""
    table = _DECODE_WEIGHTS.get()
    cached = None if table is None else table.get(tuple(id(lin) for lin in linears))
    return (*_concat_weights(linears), False) if cached is None else cached


def _concat_weights(linears: Sequence[nnx.Linear]) -> tuple[Array, Array | None]:
    """``([W_1 | ... | W_n] [D, sum F], [b_1 | ... | b_n] [sum F] or None)``."""
    if len(linears) == 1:
        lin = linears[0]
        return lin.kernel[...], None if lin.bias is None else lin.bias[...]
    kernel = jnp.concatenate([lin.kernel[...] for lin in linears], axis=1)  # [D, sum F]
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = jnp.concatenate([lin.bias[...] if lin.bias is not None
                                else jnp.zeros((lin.out_features,), lin.param_dtype)
                                for lin in linears])  # [sum F]
    return kernel, bias


# id(linear) tuples -> (kernel, bias, transposed), set by `using_decode_weights`
_DECODE_WEIGHTS: contextvars.ContextVar[dict[tuple[int, ...], tuple[Array, Array | None, bool]]
                                        | None] = (
    contextvars.ContextVar("linearnexus_decode_weights", default=None))
#: suffix of decode-table names whose kernel is stored transposed, ``[sum F, D]``
TRANSPOSED = "^T"


def _decode_groups(model: nnx.Module, *, singles: bool = False
                   ) -> Iterator[tuple[str, list[nnx.Linear]]]:
    """``("path/i", linears)`` for every group of projections a module of ``model`` runs as
    one matmul at ``T == 1`` (modules with a ``decode_linears()`` method); with ``singles``
    also ``("path", [linear])`` for every other ``nnx.Linear``."""
    grouped: set[int] = set()
    linears_at: list[tuple[str, nnx.Linear]] = []
    for path, node in nnx.iter_graph(model):
        groups = getattr(node, "decode_linears", None)
        if isinstance(node, nnx.Module) and callable(groups):
            for i, linears in enumerate(groups()):
                grouped.update(id(lin) for lin in linears)
                yield "/".join(map(str, (*path, i))), linears
        if singles and isinstance(node, nnx.Linear):
            linears_at.append(("/".join(map(str, path)), node))
    for name, lin in linears_at:
        if id(lin) not in grouped:
            yield name, [lin]


def decode_weights(model: nnx.Module) -> dict[str, tuple[Array, Array | None]]:
    """The decode weight table of ``model``, keyed by module path: the concatenated weights
    of every one-token fused projection (see :func:`fused_dense`); in the
    ``LINEARNEXUS_DECODE_GEMV`` modes ``pallas`` and ``table`` on a GPU those and every
    other ``nnx.Linear``'s kernel stored transposed (``[sum F, D]``, names ending in
    :data:`TRANSPOSED`), the layout the batch-1 Pallas matmuls read (and XLA's matmul in
    ``table``). Compute it once per set of
    parameters (``linearnexus.generate.Decoder`` does) and pass it to
    :func:`using_decode_weights` inside the decode step, so a step that XLA cannot hoist
    it out of (the per-token host loop) does not rebuild it on every call. It is a second
    copy of those projections' weights."""
    if transposed_weights():
        out = {}
        for name, linears in _decode_groups(model, singles=True):
            kernel, bias = _concat_weights(linears)
            out[name + TRANSPOSED] = (kernel.T, bias)  # [D, sum F] -> [sum F, D]
        return out
    return {name: _concat_weights(linears) for name, linears in _decode_groups(model)}


@contextlib.contextmanager
def using_decode_weights(model: nnx.Module,
                         weights: dict[str, tuple[Array, Array | None]] | None) -> Iterator[None]:
    """Within the block, :func:`fused_dense` and :func:`dense` over ``model``'s projections
    read their weights from ``weights`` (:func:`decode_weights` of the same structure)
    instead of concatenating. ``None`` or ``{}``: nothing changes.

    Raises:
        ValueError: ``weights`` has a group ``model`` does not have, or a kernel of another
            shape.
    """
    if not weights:
        yield
        return
    table: dict[tuple[int, ...], Any] = {}
    for name, linears in _decode_groups(model, singles=True):
        want = (linears[0].in_features, sum(lin.out_features for lin in linears))
        for key, shape, transposed in ((name, want, False),
                                       (name + TRANSPOSED, want[::-1], True)):
            if key in weights:
                kernel, bias = weights[key]
                if tuple(kernel.shape) != shape:
                    raise ValueError(f"weights[{key!r}]: expected a kernel of shape {shape}, "
                                     f"got {tuple(kernel.shape)}")
                table[tuple(id(lin) for lin in linears)] = (kernel, bias, transposed)
    if len(table) != len(weights):
        raise ValueError(f"weights: {len(weights) - len(table)} groups that model does not "
                         "have (weights from another model structure?)")
    token = _DECODE_WEIGHTS.set(table)
    try:
        yield
    finally:
        _DECODE_WEIGHTS.reset(token)


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

    def decode_linears(self) -> list[list[nnx.Linear]]:
        """The projections a one-token call runs as one matmul: gate and up."""
        return [[self.w_gate, self.w_up]]

    def residual_step(self, x: Array, h: Array, norm: RMSNorm) -> Array:
        """A pre-norm layer's MLP half: ``r + self(norm(r))`` with ``r = x + h`` (``x`` the
        residual stream, ``h`` the mixer's output, ``[..., D]``).

        One row (or up to ``LINEARNEXUS_DECODE_ROWS``) on a GPU with
        ``LINEARNEXUS_DECODE_GEMV=pallas`` (decoding) runs as two kernels
        (``kernels.fused_decode.gemv.one_row_fused``): the sum, the norm, gate | up and the
        activation in one; down and the residual sum in the other. Elsewhere (and for biases,
        a custom matmul, or mixed dtypes) the same steps in XLA.
        """
        if not self._fused_residual_ready(x, h, norm):
            r = x + h
            return r + self(norm(r))
        d = self.d_model
        row, h_row = x.reshape(-1, d), h.reshape(-1, d)  # [..., 1, D] -> [R, D]
        w_gu, _, gu_t = _group_weights(self.decode_linears()[0])  # [D, 2F] or [2F, D]
        w_dn, _, dn_t = _group_weights([self.w_down])  # [F, D] or [D, F]
        dtype = x.dtype
        hidden = one_row_fused(row, w_gu.astype(dtype), transposed=gu_t, glu=True, add=h_row,
                               norm_scale=norm.scale[...], norm_eps=norm.eps)  # [R, F]
        out = one_row_fused(hidden, w_dn.astype(dtype), transposed=dn_t, residual=row,
                            residual_add=h_row)  # [R, D]
        return out.reshape(x.shape)  # [R, D] -> [..., 1, D]

    def _fused_residual_ready(self, x: Array, h: Array, norm: RMSNorm) -> bool:
        lins = (self.w_gate, self.w_up, self.w_down)
        return (x.shape == h.shape and x.shape[-1] == self.d_model and x.ndim >= 2
                and x.shape[-2] == 1 and fused_decode_enabled() and fused_ready(x)
                and isinstance(norm, RMSNorm)
                and x.dtype == h.dtype == jnp.dtype(norm.dtype or x.dtype)
                and all(_kernel_linear(lin) and jnp.dtype(lin.dtype or lin.param_dtype) == x.dtype
                        for lin in lins))

    def __call__(self, x: Array) -> Array:
        """``x: [..., D]`` -> ``[..., D]`` in the compute dtype."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected last axis D={self.d_model}, got shape {x.shape}")
        if x.ndim >= 2 and x.shape[-2] == 1 and fused_decode_enabled():  # one token: one GEMV
            gate, up = fused_dense(x, self.decode_linears()[0])
        elif self.w_gate.bias is None and written_backward_enabled():
            # the same math with a written-out backward (core/autodiff.py: faster on the CPU)
            cdt = self.w_gate.dtype or jnp.promote_types(x.dtype, self.w_gate.kernel[...].dtype)
            flat = x.reshape(-1, self.d_model)  # [..., D] -> [N, D]
            y = swiglu(flat, self.w_gate.kernel[...], self.w_up.kernel[...],
                       self.w_down.kernel[...], jnp.dtype(cdt))
            return y.reshape(*x.shape[:-1], self.d_model)  # [N, D] -> [..., D]
        else:
            gate, up = self.w_gate(x), self.w_up(x)
        return dense(self.w_down, jax.nn.silu(gate) * up)  # [..., F] -> [..., D]


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
        if written_backward_enabled():  # the same rotation, its backward written out
            return rotate_half_pairs(xf, cos, sin).astype(x.dtype)
        x1, x2, rest = xf[..., :half], xf[..., half:self.rotary_dim], xf[..., self.rotary_dim:]
        rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest]
        return jnp.concatenate(rotated, axis=-1).astype(x.dtype)

    __call__ = apply


def l2_normalize(x: Array, eps: float = 1e-6, axis: int = -1) -> Array:
    """``x / sqrt(sum(x^2, axis) + eps)`` (FLA's ``l2norm``, used on DeltaNet's q and k).

    Computed in float32 (float64 for f64 input) and returned in ``x.dtype``.

    Args:
        x: ``[..., K]`` float (any rank; ``axis`` picks the normalised axis).
        eps: added to the sum of squares, so an all-zero vector maps to zeros.
        axis: the axis to normalise over.

    Raises:
        ValueError: ``eps <= 0``.
    """
    if eps <= 0:
        raise ValueError(f"eps: must be > 0, got {eps}")
    ct = math_dtype(x.dtype)
    xf = x.astype(ct)
    inv = jax.lax.rsqrt(jnp.sum(xf * xf, axis=axis, keepdims=True) + eps)
    return (xf * inv).astype(x.dtype)


_GATE_ACTIVATIONS = {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}


class GatedRMSNorm(nnx.Module):
    """RMSNorm with a multiplicative gate, the output norm of Mamba2, GLA and Gated DeltaNet.

    * ``norm_before_gate=True``: ``rmsnorm(x) * scale * act(gate)`` (FLA's
      ``FusedRMSNormGated``, used by GLA and Gated DeltaNet).
    * ``norm_before_gate=False``: ``rmsnorm(x * act(gate)) * scale`` (Mamba2's
      ``RMSNormGated(norm_before_gate=False)``).

    ``rmsnorm(v) = v / sqrt(mean(v^2) + eps)``, the mean over the last axis, or over each
    group of ``group_size`` consecutive features when ``group_size`` is set (Mamba2 with
    ``ngroups > 1``: ``group_size = d_inner // ngroups``). To normalise per head pass
    ``[..., H, K]`` with ``dim = K``. Math in float32 (float64 for f64 input).

    Args:
        dim: size of the last axis of ``x`` and ``gate``.
        eps: added to the mean square.
        norm_before_gate: normalise ``x`` then gate (True) or gate then normalise (False).
        activation: ``"silu"`` or ``"sigmoid"``, applied to ``gate``.
        group_size: features per normalisation group (None = the whole ``dim``); must
            divide ``dim``.
        dtype: output dtype (None = the input's dtype).
        param_dtype: storage dtype of ``scale`` (``[dim]``, initialised to ones).
        rngs: accepted for a uniform constructor; unused (no random init).

    Raises:
        ValueError: ``dim < 1``, ``eps <= 0``, an unknown ``activation`` or a
            ``group_size`` that does not divide ``dim``.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, norm_before_gate: bool = True,
                 activation: str = "silu", group_size: int | None = None,
                 dtype: DType | str | None = None, param_dtype: DType | str = jnp.float32,
                 rngs: nnx.Rngs | None = None) -> None:
        if dim < 1:
            raise ValueError(f"dim: must be >= 1, got {dim}")
        if eps <= 0:
            raise ValueError(f"eps: must be > 0, got {eps}")
        if activation not in _GATE_ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {sorted(_GATE_ACTIVATIONS)}, got {activation!r}")
        if group_size is not None and (group_size < 1 or dim % group_size):
            raise ValueError(f"group_size: must be >= 1 and divide dim={dim}, got {group_size}")
        del rngs
        self.dim = dim
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.activation = activation
        self.group_size = group_size
        self.dtype = _dtype(dtype)
        self.scale = nnx.Param(jnp.ones((dim,), _dtype(param_dtype)))

    def __call__(self, x: Array, gate: Array) -> Array:
        """``x, gate: [..., dim]`` (same shape) -> ``[..., dim]`` in ``dtype`` (or ``x.dtype``).

        Raises:
            ValueError: last axis of ``x`` is not ``dim``, or ``gate``'s shape differs.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last axis {self.dim}, got shape {x.shape}")
        if gate.shape != x.shape:
            raise ValueError(f"gate: expected shape {x.shape} (that of x), got {gate.shape}")
        return gated_rms_norm(x, gate, self.scale[...], eps=self.eps,
                              norm_before_gate=self.norm_before_gate, activation=self.activation,
                              group_size=self.group_size, dtype=self.dtype)

    def normalize_gated(self, xg: Array) -> Array:
        """``rmsnorm(xg) * scale`` for ``xg = x * act(gate)`` already formed (``[..., dim]``;
        ``norm_before_gate=False`` only): what a fused kernel that gated ``x`` hands over.

        Raises:
            ValueError: ``norm_before_gate=True`` or a last axis that is not ``dim``.
        """
        if self.norm_before_gate:
            raise ValueError("normalize_gated: this norm gates after normalising "
                             "(norm_before_gate=True); call it with x and gate")
        if xg.shape[-1] != self.dim:
            raise ValueError(f"xg: expected last axis {self.dim}, got shape {xg.shape}")
        return gated_rms_norm(xg, None, self.scale[...], eps=self.eps,
                              group_size=self.group_size, dtype=self.dtype)


def _grouped_rms(xf: Array, scale: Array, eps: float, group: int) -> Array:
    """``xf [..., D]`` (math dtype) normalised over each group of ``group`` features, times
    ``scale [D]``."""
    dim = xf.shape[-1]
    grouped = xf.reshape(*xf.shape[:-1], dim // group, group)  # [..., D] -> [..., G, D/G]
    inv = jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    return (grouped * inv).reshape(xf.shape) * scale.astype(xf.dtype)  # [..., G, D/G] -> [..., D]


def gated_rms_norm(x: Array, gate: Array | None, scale: Array, *, eps: float,
                   norm_before_gate: bool = True, activation: str = "silu",
                   group_size: int | None = None, dtype: DType | None = None) -> Array:
    """:class:`GatedRMSNorm`'s math on explicit parameters (``gate=None``: no gate, the
    plain RMSNorm). ``x, gate: [..., D]``, ``scale: [D]`` -> ``[..., D]`` in ``dtype`` (or
    ``x.dtype``); math in float32 (float64 for f64)."""
    out_dtype = dtype or x.dtype
    ct = math_dtype(x.dtype if gate is None else jnp.promote_types(x.dtype, gate.dtype))
    xf = x.astype(ct)
    g = None if gate is None else _GATE_ACTIVATIONS[activation](gate.astype(ct))
    if g is not None and not norm_before_gate:
        xf = xf * g
    y = _grouped_rms(xf, scale, eps, group_size or x.shape[-1])
    if g is not None and norm_before_gate:
        y = y * g
    return y.astype(out_dtype)


_CONV_ACTIVATIONS = {"silu": jax.nn.silu}


class ShortConv(nnx.Module):
    """Causal depthwise short conv with a cache: the token-shift conv of linear blocks.

    ``y = act(bias + sum_w conv_weight[w] * x[t - W + 1 + w])`` per channel, the window
    reaching into ``cache`` before the call's first token. The parameters are named
    ``conv_weight`` ``[W, C]`` and ``conv_bias`` ``[C]`` (or None) so the optimizer keeps
    them from Muon (``optim.NO_MUON_PARAM_NAMES``); both use PyTorch's Conv1d init
    ``U(-1/sqrt(W), 1/sqrt(W))``. One ShortConv over concatenated channels equals separate
    convs per part (the conv is depthwise), so a block with q, k and v convs can use one
    conv and one cache.

    Args:
        channels: C.
        width: kernel width W (the cache keeps ``W - 1`` inputs).
        bias: learn ``conv_bias``.
        activation: ``"silu"`` or None (identity).
        dtype: compute dtype: ``x`` is cast to it, and ``y`` and the cache come back in it
            (None = ``x.dtype``). The conv accumulates in the promoted dtype of ``x`` and the
            parameters, so float32 master weights give a float32 sum under bf16 compute.
        param_dtype: storage dtype of the parameters.
        rngs: ``nnx.Rngs`` with a ``params`` stream.

    Raises:
        ValueError: ``channels < 1``, ``width < 1`` or an unknown ``activation``.
    """

    def __init__(self, channels: int, width: int = 4, *, bias: bool = False,
                 activation: str | None = "silu", dtype: DType | str | None = None,
                 param_dtype: DType | str = jnp.float32, rngs: nnx.Rngs) -> None:
        if channels < 1:
            raise ValueError(f"channels: must be >= 1, got {channels}")
        if width < 1:
            raise ValueError(f"width: must be >= 1, got {width}")
        if activation is not None and activation not in _CONV_ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {sorted(_CONV_ACTIVATIONS)} or None, got {activation!r}")
        self.channels = channels
        self.width = width
        self.activation = activation
        self.dtype = _dtype(dtype)
        pdt = _dtype(param_dtype)
        bound = 1.0 / math.sqrt(width)  # PyTorch Conv1d default: fan_in = W for depthwise
        self.conv_weight = nnx.Param(
            jax.random.uniform(rngs.params(), (width, channels), pdt, -bound, bound))
        self.conv_bias = (nnx.Param(jax.random.uniform(rngs.params(), (channels,), pdt, -bound, bound))
                          if bias else None)

    def __call__(self, x: Array, cache: Array | None = None, *, lengths: Array | None = None,
                 cu_seqlens: Array | None = None,
                 written_backward: bool = False) -> tuple[Array, Array]:
        """Convolve ``x`` continuing from ``cache``.

        Args:
            x: ``[B, T, C]`` float.
            cache: ``[B, W-1, C]`` (``[N, W-1, C]`` with ``cu_seqlens``), the previous
                ``W - 1`` inputs, oldest first; None = zeros.
            lengths: optional ``[B]`` int valid tokens at the start of each row (rows
                padded on the right, pads zeroed): the new cache then holds the last
                ``W - 1`` valid inputs.
            cu_seqlens: optional ``[N+1]`` int, ``B == 1``: ``x`` packs ``N`` sequences,
                each convolved on its own with its own cache.
            written_backward: see ``core.conv.depthwise_conv1d_causal`` (no ``jax.jvp``
                through the conv when set; faster training on the CPU).

        Returns:
            ``(y [B, T, C], new_cache)`` both in ``dtype`` (None = ``x.dtype``); the cache
            has the shape of ``cache``.

        Raises:
            ValueError: both ``lengths`` and ``cu_seqlens``; bad shapes (named by the
                core conv: ``inputs`` is ``x``). TypeError: non-float ``x``.
        """
        if x.ndim != 3 or x.shape[-1] != self.channels:
            raise ValueError(f"x: expected [B, T, C={self.channels}], got shape {x.shape}")
        if not is_float_dtype(x.dtype):
            raise TypeError(f"x: expected a float dtype, got {x.dtype}")
        x = x.astype(self.dtype or x.dtype)
        weight = self.conv_weight[...]
        bias = None if self.conv_bias is None else self.conv_bias[...]
        if (x.shape[1] == 1 and cache is not None and self.width >= 2 and lengths is None
                and cu_seqlens is None):  # decoding: one fused kernel on a GPU
            from linearnexus.kernels.conv import conv_step  # imports Pallas: only when decoding

            return conv_step(x, cache, weight, bias, activation=self.activation)
        y, new_cache = depthwise_conv1d(x, weight, bias, cache, lengths=lengths,
                                        cu_seqlens=cu_seqlens, written_backward=written_backward)
        if self.activation is not None:
            y = _CONV_ACTIVATIONS[self.activation](y)
        return y.astype(x.dtype), new_cache

    def split_call(self, parts: list[Array], cache: Array | None = None, *,
                   lengths: Array | None = None, cu_seqlens: Array | None = None,
                   written_backward: bool = False) -> tuple[list[Array], Array]:
        """``self(concatenate(parts))`` split back into the parts, without the concatenation.

        The conv is depthwise, so each part is convolved on its own with its slice of
        ``conv_weight``, ``conv_bias`` and the cache; only the small ``[B, W-1, C]`` caches
        are concatenated. On the CPU, the full-width ``[B, T, C]`` concatenation and its
        backward (the split's transpose, written in the layout the weight-gradient matmuls
        want) cost a gated-deltanet-small training step more than its delta-rule op did.

        Args:
            parts: ``[B, T, C_i]`` arrays with ``sum(C_i) == C``, in channel order.
            cache, lengths, cu_seqlens, written_backward: as in ``__call__``.

        Returns:
            ``([y_i [B, T, C_i]], new_cache)`` as ``__call__`` would give, split.
        """
        sizes = [p.shape[-1] if p.ndim == 3 else -1 for p in parts]
        if sum(sizes) != self.channels or min(sizes) < 1:
            raise ValueError(f"parts: expected [B, T, C_i] arrays with sum(C_i) = "
                             f"{self.channels}, got shapes {[p.shape for p in parts]}")
        if parts[0].shape[1] == 1 and cache is not None:  # decoding: one fused conv
            y, new_cache = self(jnp.concatenate(parts, axis=-1), cache, lengths=lengths,
                                cu_seqlens=cu_seqlens)  # [B, 1, C]
            return jnp.split(y, np.cumsum(sizes)[:-1].tolist(), axis=-1), new_cache
        weight = self.conv_weight[...]
        bias = None if self.conv_bias is None else self.conv_bias[...]
        ys, caches, lo = [], [], 0
        for part, size in zip(parts, sizes, strict=True):
            if not is_float_dtype(part.dtype):
                raise TypeError(f"parts: expected float dtypes, got {part.dtype}")
            x = part.astype(self.dtype or part.dtype)
            hi = lo + size
            y, part_cache = depthwise_conv1d(
                x, weight[:, lo:hi], None if bias is None else bias[lo:hi],
                None if cache is None else cache[..., lo:hi], lengths=lengths,
                cu_seqlens=cu_seqlens, written_backward=written_backward)
            if self.activation is not None:
                y = _CONV_ACTIVATIONS[self.activation](y)
            ys.append(y.astype(x.dtype))
            caches.append(part_cache)
            lo = hi
        return ys, jnp.concatenate(caches, axis=-1)  # [B, W-1, C]
