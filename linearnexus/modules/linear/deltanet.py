"""DeltaNet (Yang et al. 2024) and Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025) blocks.

"Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (Yang, Wang,
Zhang, Shen, Kim; NeurIPS 2024) and "Gated Delta Networks: Improving Mamba2 with Delta
Rule" (Yang, Kautz, Hatamizadeh; ICLR 2025), with the layer defaults of
flash-linear-attention's (FLA) ``DeltaNet`` and ``GatedDeltaNet``. Data flow for
``x: [B, T, D]`` with ``H`` heads, per-head key / value sizes ``K``, ``V``::

    q, k, v = x W_q, x W_k, x W_v                 # [B, T, H*K], [B, T, H*K], [B, T, H*V]
    (q, k, v) = silu(short_conv(q | k | v))       # silu(q, k, v) without the short conv
    q, k    = q / ||q||, k / ||k||                # per head, over K
    beta    = sigmoid(x W_b)                      # [B, T, H] (x 2 with allow_neg_eigval)
    g       = -exp(A_log) softplus(x W_a + dt_bias)   # Gated DeltaNet only: [B, T, H], <= 0
    S_t     = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T   # [H, K, V], float32
    o_t     = K^-1/2 q_t^T S_t                    # [B, T, H, V]
    y       = W_o (rmsnorm(o) * scale * silu(x W_g))   # per head over V (no gate: rmsnorm(o) * scale)

DeltaNet is the same with ``g = 0`` (no decay): each step moves the state's value at key
``k_t`` a fraction ``beta_t`` of the way toward ``v_t``. Everything but the L2 norm, beta
and the decay is :class:`~linearnexus.modules.linear.base.LinearAttentionBlock`
(``modules/linear/base.py``: projections, short conv, output norm and projection, the
call); :class:`DeltaNetFamilyBlock` adds what the two blocks share (the silu without the
conv, the L2 norm of q and k, beta) and each block only its decay and its op
(``kernels.delta_rule.delta_rule`` or ``kernels.gated_delta_rule.gated_delta_rule``).

Choices and where they come from:

* Initialisation: every linear weight ``xavier_uniform(gain=2^-2.5)``, norm scales one, the
  short conv with PyTorch's Conv1d init: FLA's ``DeltaNet`` and ``GatedDeltaNet`` layers at
  the time of the two papers (both called ``_initialize_weights``; current FLA layers have
  no init of their own and take the model's ``normal(0, 0.02)``). Gated DeltaNet's
  ``A = exp(A_log) ~ U(0, 16]`` per head and ``softplus(dt_bias) ~ logU[1e-3, 0.1]``
  (floor 1e-4) per head are FLA's; A is clamped to ``>= a_init_floor`` before the log so a
  draw of 0 cannot give ``-inf``.
* The output gate: FLA's Gated DeltaNet has it on by default, FLA's DeltaNet off
  (``use_gate=False``); here ``use_output_gate=True`` for both, a plain per-head RMSNorm
  when off.
* Without the short conv, q, k and v go through silu (FLA's Gated DeltaNet; FLA's DeltaNet
  silus only v there, but its default ``qk_activation='silu'`` is the conv's activation).
* Head sizes: FLA's DeltaNet has ``num_heads=4`` at ``D=1024`` (K=256) and FLA's Gated
  DeltaNet ``head_dim=256, num_heads=6`` (``H K = 0.75 D`` at ``D=2048``): sized for large
  models. Here ``num_heads=None`` picks heads of ``K = 64`` (DeltaNet) or ``H ~ 0.75 D / K``
  with ``head_dim = 64`` (Gated DeltaNet, FLA's ratio), which suits small widths.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from linearnexus.core.config import ConfigError, field
from linearnexus.core.gating import sample_dt_bias, softplus_decay
from linearnexus.core.mode import KernelMode
from linearnexus.core.types import Array
from linearnexus.kernels.conv import conv_step
from linearnexus.kernels.delta_rule import delta_rule
from linearnexus.kernels.fused_decode import DeltaLayerSpec, delta_layer_step, layer_kernel_ready
from linearnexus.kernels.fused_decode.pallas import FEW_PROGRAMS
from linearnexus.kernels.gated_delta_rule import gated_delta_rule
from linearnexus.modules.base import MOSAIC_KERNEL_BACKENDS, dtype_of
from linearnexus.modules.common import (
    RMSNorm,
    conv_dense,
    dense,
    fused_dense,
    gated_rms_norm,
    head_norm_group,
    head_normed_dense,
    l2_normalize,
    math_dtype,
)
from linearnexus.modules.linear.base import LinearAttentionBlock, LinearAttentionConfig, whole_width
from linearnexus.modules.linear.runtime import LinearState, SequenceCall

__all__ = [
    "DeltaNetBlock",
    "DeltaNetConfig",
    "DeltaNetFamilyBlock",
    "DeltaNetFamilyConfig",
    "GatedDeltaNetBlock",
    "GatedDeltaNetConfig",
]

#: with ``num_heads=None``, DeltaNet uses heads of this key size (and Gated DeltaNet's
#: ``head_dim`` defaults to it): the per-head size of most small linear-attention models
DEFAULT_HEAD_K_DIM = 64


@dataclasses.dataclass
class DeltaNetFamilyConfig(LinearAttentionConfig):
    """Fields shared by DeltaNet and Gated DeltaNet (FLA's layer arguments and defaults).

    DeltaNet has FLA's ``expand_k`` / ``expand_v`` head layout, Gated DeltaNet a fixed
    ``head_dim`` (see :class:`~linearnexus.modules.linear.base.LinearAttentionConfig`).

    Attributes:
        use_short_conv: a causal depthwise conv (+ silu) on q, k and v after their
            projections (FLA's ``ShortConvolution``, on by default: the papers call it
            crucial); one conv over the concatenated channels, which equals three
            separate depthwise convs.
        conv_size: the short conv's width W (4).
        conv_bias: learn a bias in the short conv (False).
        use_output_gate: output ``rmsnorm(o) * silu(x W_g)`` (True) or ``rmsnorm(o)``.
        allow_neg_eigval: ``beta = 2 sigmoid(.)`` in ``(0, 2)``, so ``I - beta k k^T`` can
            have a negative eigenvalue (Grazzi et al. 2024, FLA's ``allow_neg_eigval``).
        norm_eps: epsilon of the per-head output RMSNorm (1e-5).
        qk_norm_eps: epsilon of the L2 norm of q and k (FLA's ``l2norm``: 1e-6).
        chunk_size: tokens per chunk in chunk mode (FLA's 64).
        mode_threshold: with ``mode=None``, calls with T < this run in recurrent mode.
        kernel_backend: one of :data:`~linearnexus.modules.base.MOSAIC_KERNEL_BACKENDS`: "auto"
            (best available), "jax", "naive" (the per-step reference; needs concrete
            ``cu_seqlens``), "pallas" or "mosaic" (the Mosaic GPU forward walk on sm_90+,
            docs/mosaic.md).
    """

    use_short_conv: bool = True
    conv_size: int = field(4, gt=0)
    conv_bias: bool = False
    use_output_gate: bool = True
    allow_neg_eigval: bool = False
    norm_eps: float = field(1e-5, gt=0)
    qk_norm_eps: float = field(1e-6, gt=0)
    chunk_size: int = field(64, gt=0)
    mode_threshold: int = field(64, gt=0)
    kernel_backend: str = field("auto", choices=MOSAIC_KERNEL_BACKENDS)

    @property
    def output_gate(self) -> bool:
        """``use_output_gate``."""
        return self.use_output_gate


@dataclasses.dataclass
class DeltaNetConfig(DeltaNetFamilyConfig):
    """DeltaNet hyper-parameters (FLA ``DeltaNet`` defaults, except where noted).

    Attributes (besides :class:`DeltaNetFamilyConfig`'s):
        num_heads: H, or None for heads of ``K = 64``: the largest ``H <= key_dim // 64``
            (at least 1) that divides both ``key_dim`` and ``value_dim``. FLA's layer
            default is 4 heads at ``D = 1024`` (K = 256); its 1.3B model 16 at 2048 (K = 128).
        expand_k: ``key_dim = d_model * expand_k`` (1.0); per head ``K = key_dim / H``.
        expand_v: ``value_dim = d_model * expand_v`` (1.0); per head ``V = value_dim / H``.
    """

    num_heads: int | None = field(None, gt=0)
    expand_k: float = field(1.0, gt=0)
    expand_v: float = field(1.0, gt=0)

    @property
    def heads(self) -> int:
        if self.num_heads is not None:
            return self.num_heads
        key_dim, value_dim = self.key_dim, self.value_dim
        heads = max(1, key_dim // DEFAULT_HEAD_K_DIM)
        while key_dim % heads or value_dim % heads:
            heads -= 1
        return heads


@dataclasses.dataclass
class GatedDeltaNetConfig(DeltaNetFamilyConfig):
    """Gated DeltaNet hyper-parameters (FLA ``GatedDeltaNet`` defaults, except where noted).

    Attributes (besides :class:`DeltaNetFamilyConfig`'s):
        head_dim: per-head key size K (64; FLA's default 256 is sized for ``D = 2048``).
        num_heads: H, or None for ``max(1, round(0.75 * d_model / head_dim))``: FLA's
            sizing ``H K = 0.75 D`` (its defaults, 6 heads of 256 at ``D = 2048``, are
            this rule), which keeps the layer near ``6 D^2`` parameters.
        expand_v: per-head value size ``V = head_dim * expand_v`` (FLA's 2.0).
        dt_min, dt_max: ``softplus(dt_bias)`` is initialised log-uniform in
            ``[dt_min, dt_max]`` (FLA's 1e-3, 0.1), clamped below at ``dt_init_floor``.
        dt_init_floor: 1e-4 (FLA).
        a_init_max: ``A = exp(A_log)`` is initialised ``U(0, a_init_max]`` per head (FLA's 16).
        a_init_floor: ``A`` is clamped to at least this before the log (a draw of exactly
            0 would make ``A_log = -inf``).
    """

    head_dim: int = field(DEFAULT_HEAD_K_DIM, gt=0)
    num_heads: int | None = field(None, gt=0)
    expand_v: float = field(2.0, gt=0)
    dt_min: float = field(1e-3, gt=0)
    dt_max: float = field(0.1, gt=0)
    dt_init_floor: float = field(1e-4, gt=0)
    a_init_max: float = field(16.0, gt=0)
    a_init_floor: float = field(1e-4, gt=0)

    def validate(self) -> None:
        whole_width("expand_v", "head_dim", self.head_dim, self.expand_v)
        if self.dt_min > self.dt_max:
            raise ConfigError(f"dt_min: must be <= dt_max ({self.dt_max}), got {self.dt_min}")
        if self.a_init_floor >= self.a_init_max:
            raise ConfigError(
                f"a_init_floor: must be < a_init_max ({self.a_init_max}), got {self.a_init_floor}")

    @property
    def heads(self) -> int:
        if self.num_heads is not None:
            return self.num_heads
        return max(1, math.floor(0.75 * self.d_model / self.head_dim + 0.5))

    @property
    def key_dim(self) -> int:
        return self.heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.heads * self.head_v_dim

    @property
    def head_k_dim(self) -> int:
        return self.head_dim

    @property
    def head_v_dim(self) -> int:
        return whole_width("expand_v", "head_dim", self.head_dim, self.expand_v)

    @classmethod
    def tiny(cls, d_model: int = 16, **overrides: Any) -> GatedDeltaNetConfig:
        """d_model 16, 2 heads of K = 4, V = 8, chunks of 8 (T = 13 or 19 spans several)."""
        return super().tiny(d_model, **{"head_dim": 4, **overrides})


class DeltaNetFamilyBlock(LinearAttentionBlock):
    """The shared body of DeltaNet and Gated DeltaNet (no norm or residual around it).

    :class:`~linearnexus.modules.linear.base.LinearAttentionBlock` with silu on q, k and v
    when there is no short conv, L2-normalised q and k, and ``beta = sigmoid(x W_b)`` (times
    2 with ``allow_neg_eigval``). A subclass sets ``config_class`` and ``op`` and implements
    ``_gates`` (from :meth:`_beta` and its decay); for a decay it extends
    ``_build_mechanism``.

    Parameters: ``q_proj``, ``k_proj`` ``[D, H*K]``, ``v_proj`` ``[D, H*V]``, ``b_proj``
    ``[D, H]`` (no biases), ``g_proj`` ``[D, H*V]`` with ``use_output_gate``, ``o_proj``
    ``[H*V, D]``, ``norm.scale`` ``[V]`` (one scale shared by the heads, as in FLA),
    ``conv.conv_weight`` ``[W, 2HK + HV]`` with ``use_short_conv``, and the subclass's
    decay parameters.
    """

    config_class: ClassVar[type[DeltaNetFamilyConfig]] = DeltaNetFamilyConfig
    silu_without_conv = True
    #: a data-dependent decay (Gated DeltaNet's ``A_log``, ``dt_bias`` and ``a_proj``)
    decays: ClassVar[bool] = False

    def _build_mechanism(self, rngs: nnx.Rngs) -> None:
        self.b_proj = self._linear(self.config.d_model, self.config.heads, rngs)  # beta logits

    def _prepare_qk(self, q: Array, k: Array, state: Any,
                    call: SequenceCall) -> tuple[Array, Array]:
        """``q / ||q||``, ``k / ||k||`` per head over K."""
        eps = self.config.qk_norm_eps
        return l2_normalize(q, eps), l2_normalize(k, eps)

    def _layer_spec(self) -> DeltaLayerSpec:
        cfg = self.config
        return DeltaLayerSpec(
            heads=cfg.heads, key_dim=cfg.head_k_dim, value_dim=cfg.head_v_dim,
            conv_width=cfg.conv_width, silu_without_conv=self.silu_without_conv,
            gated=self.decays, output_gate=self.g_proj is not None,
            allow_neg_eigval=cfg.allow_neg_eigval, qk_eps=cfg.qk_norm_eps,
            norm_eps=cfg.norm_eps, scale=cfg.head_k_dim ** -0.5)

    def _fused_layer(self, x: Array, linear: LinearState,
                     input_norm: RMSNorm | None = None) -> tuple[Array, LinearState] | None:
        """One token through ``kernels.fused_decode.delta_layer_step`` (conv, silu, L2
        norms, beta and decay, the state step with the guard, the output norm and gate in
        one kernel) where :func:`layer_kernel_ready` says it runs; else None. The input
        projection (of ``input_norm(x)`` with a norm: in its prologue) is one kernel."""
        cfg = self.config
        spec = self._layer_spec()
        if not layer_kernel_ready(spec, x.dtype, cfg.backend):
            return None
        linears = self.decode_linears()[0]
        conv = self.conv
        gates = (self.A_log[...], self.dt_bias[...]) if spec.gated else (None, None)
        arrived = self._arrival_layer(x, linear, input_norm, spec, linears, gates)
        if arrived is not None:
            return arrived
        done = None if conv is None else conv_dense(x, linears, conv, linear.conv.buffer,
                                                   norm=input_norm)
        if done is not None:  # the conv ran in the input projection's kernel
            proj, cache = done
            spec = self._conv_in_spec(spec, proj.shape[0], proj.dtype)
            o, _, final = delta_layer_step(
                spec, proj[:, 0], None, None, None, linear.recurrent.state, *gates,
                self.norm.scale[...], fallback=lambda *a: self._layer_reference(spec, *a))
            return self._conv_in_out(spec, o, proj[:, 0]), LinearState(
                conv=linear.conv.update(cache), recurrent=linear.recurrent.update(final))
        proj = fused_dense(x, linears, groups=(len(linears),),
                           norm=input_norm)[0][:, 0]  # [B, 1, F] -> [B, F]

        def value(param):
            return None if param is None else param[...]

        y, cache, final = delta_layer_step(
            spec, proj, None if conv is None else linear.conv.buffer,
            None if conv is None else conv.conv_weight[...],
            None if conv is None else value(conv.conv_bias), linear.recurrent.state,
            *gates, self.norm.scale[...], fallback=lambda *a: self._layer_reference(spec, *a))
        new_conv = None if conv is None else linear.conv.update(cache)
        return dense(self.o_proj, y[:, None]), LinearState(
            conv=new_conv, recurrent=linear.recurrent.update(final))

    def _conv_in_spec(self, spec: DeltaLayerSpec, batch: int, dtype: Any) -> DeltaLayerSpec:
        """The layer kernel's spec when the conv runs in the input projection's kernel: no
        conv, and more programs per head (V split) with the output norm and gate in
        ``o_proj``'s kernel where that kernel takes them (a grid of few programs: batch
        1)."""
        spec = dataclasses.replace(spec, conv_width=None, silu_without_conv=False)
        o_like = jax.ShapeDtypeStruct((batch, 1, spec.heads * spec.value_dim), dtype)
        blocks = _value_blocks(spec.value_dim, spec.heads * batch)
        if blocks > 1 and head_norm_group(self.o_proj, o_like, self.norm,
                                          spec.output_gate) is not None:
            spec = dataclasses.replace(spec, norm_out=False, value_blocks=blocks)
        return spec

    def _conv_in_out(self, spec: DeltaLayerSpec, o: Array, proj: Array) -> Array:
        """``o_proj`` of the layer kernel's output ``o [B, H*V]`` (``[B, 1, D]``), with the
        output norm and gate (from the projection row ``proj [B, F]``) in its kernel where
        the layer kernel left them (``spec.norm_out`` False)."""
        if not spec.norm_out:
            return head_normed_dense(self.o_proj, o[:, None], self.norm,
                                     proj if spec.output_gate else None, spec.gate_offset)
        return dense(self.o_proj, o[:, None])

    def _arrival_layer(self, x: Array, linear: LinearState, input_norm: RMSNorm | None,
                       spec: DeltaLayerSpec, linears: Any, gates: tuple[Any, Any]
                       ) -> tuple[Array, LinearState] | None:
        """The input projection (with the pre-norm and the conv) and the layer kernel of a
        batch-1 token as one launch (``kernels.fused_decode.arrival.delta_in_layer``),
        then ``o_proj`` as in the separate path, where ``LINEARNEXUS_DECODE_ARRIVAL=1`` asks
        for it and the separate kernels would run (the conv in the input projection's
        kernel); else None. Differentiable through the separate kernels."""
        from linearnexus.kernels.fused_decode import arrival
        from linearnexus.kernels.fused_decode.api import kept_state_dtype
        from linearnexus.modules.common import conv_dense_weight

        conv = self.conv
        if not (arrival.arrival_enabled() and conv is not None and x.shape[:2] == (1, 1)):
            return None
        w_in_t = conv_dense_weight(x, linears, conv, linear.conv.buffer, norm=input_norm)
        if w_in_t is None:
            return None
        spec = self._conv_in_spec(spec, 1, w_in_t.dtype)
        proj, o, cache, final = arrival.layer_call(
            dict(x=x.reshape(1, x.shape[-1]),
                 norm1_scale=None if input_norm is None else input_norm.scale[...],
                 w_in_t=w_in_t, conv_cache=linear.conv.buffer,
                 conv_weight=conv.conv_weight[...],
                 conv_bias=None if conv.conv_bias is None else conv.conv_bias[...],
                 state=kept_state_dtype(linear.recurrent.state), a_log=gates[0],
                 dt_bias=gates[1], norm_scale=self.norm.scale[...]),
            spec=spec, norm1_eps=None if input_norm is None else input_norm.eps,
            layer_fallback=lambda *a: self._layer_reference(spec, *a))
        return self._conv_in_out(spec, o, proj), LinearState(
            conv=linear.conv.update(cache), recurrent=linear.recurrent.update(final))

    def persistent_layer(self, x: Array, state: Any, input_norm: RMSNorm, mlp: Any,
                         mlp_norm: RMSNorm) -> tuple[Array, Any] | None:
        """A whole pre-norm layer's batch-1 token (this block after ``input_norm``, the
        residual sum, ``mlp`` after ``mlp_norm``) in one persistent kernel
        (``kernels.fused_decode.persistent.delta_mlp_layer``), where
        ``LINEARNEXUS_DECODE_PERSISTENT=1`` asks for it and the five separate kernels it
        stands for would run (the fused layer kernel with value blocks and the output norm
        in ``o_proj``, the conv in the input projection, the MLP's two kernels); else None
        (the caller runs the layer as usual). ``x [1, 1, D]``; returns ``(x + h + mlp(...)
        [1, 1, D], new_state)``. Differentiable through the separate kernels."""
        from linearnexus.kernels.fused_decode import persistent
        from linearnexus.modules.common import SwiGLU, conv_dense_weight, transposed_weight
        from linearnexus.modules.linear.runtime import begin_call

        cfg = self.config
        dtype = dtype_of(cfg.dtype)
        if not (persistent.persistent_enabled() and isinstance(mlp, SwiGLU)
                and self.conv is not None and self._gate_linears() is not None
                and state is not None
                and getattr(x, "ndim", 0) == 3 and x.shape[:2] == (1, 1)
                and jnp.dtype(x.dtype) == jnp.dtype(dtype)):
            return None
        x, call = begin_call(x, cfg.d_model, mode=KernelMode.RECURRENT,
                             mode_threshold=cfg.mode_threshold, dtype=dtype)
        linear = self._linear_state(state, call)
        spec = self._layer_spec()
        if not layer_kernel_ready(spec, x.dtype, cfg.backend):
            return None
        linears = self.decode_linears()[0]
        w_in_t = conv_dense_weight(x, linears, self.conv, linear.conv.buffer, norm=input_norm)
        o_like = jax.ShapeDtypeStruct((1, 1, cfg.heads * cfg.head_v_dim), x.dtype)
        blocks = _value_blocks(spec.value_dim, spec.heads)
        if (w_in_t is None or blocks < 2 or not mlp._fused_residual_ready(x, x, mlp_norm)
                or head_norm_group(self.o_proj, o_like, self.norm, spec.output_gate) is None):
            return None
        spec = dataclasses.replace(spec, conv_width=None, silu_without_conv=False,
                                   norm_out=False, value_blocks=blocks)
        done = persistent.layer_call(
            persistent.delta_mlp_layer, persistent.delta_mlp_layer_separate, dict(
                **persistent.input_operands(x, input_norm, w_in_t, self.conv,
                                            linear.conv.buffer, linear.recurrent.state),
                a_log=self.A_log[...] if spec.gated else None,
                dt_bias=self.dt_bias[...] if spec.gated else None,
                o_norm_scale=self.norm.scale[...],
                w_o_t=transposed_weight([self.o_proj]).astype(dtype),
                norm2_scale=mlp_norm.scale[...],
                w_gu_t=transposed_weight(mlp.decode_linears()[0]).astype(dtype),
                w_down_t=transposed_weight([mlp.w_down]).astype(dtype)),
            tiled=(spec.qkv_width,),  # the conv's channels in whole tiles
            layer_fallback=lambda *b: self._layer_reference(spec, *b), spec=spec,
            norm1_eps=input_norm.eps, o_norm_eps=self.norm.eps, norm2_eps=mlp_norm.eps)
        if done is None:
            return None
        out, cache, final = done
        new_linear = LinearState(conv=linear.conv.update(cache),
                                 recurrent=linear.recurrent.update(final))
        return out.reshape(1, 1, cfg.d_model), self._next_state(state, new_linear, call, 1)

    def _layer_reference(self, spec: DeltaLayerSpec, proj: Array, cache: Array | None,
                         conv_weight: Array | None, conv_bias: Array | None, state: Array,
                         a_log: Array | None, dt_bias: Array | None,
                         norm_scale: Array) -> tuple[Array, Array | None, Array]:
        """:func:`delta_layer_step`'s math unfused, on explicit parameters (its backward
        pass): the same steps as the block's one-token call."""
        batch, hk = proj.shape[0], spec.heads * spec.key_dim
        qkv = proj[:, None, :spec.qkv_width]  # [B, F] -> [B, 1, 2HK + HV]
        if spec.conv_width is not None:
            qkv, cache = conv_step(qkv, cache, conv_weight, conv_bias, activation="silu")
        elif spec.silu_without_conv:
            qkv = jax.nn.silu(qkv)
        q, k, v = jnp.split(qkv, [hk, 2 * hk], axis=-1)
        q = q.reshape(batch, 1, spec.heads, spec.key_dim)  # [B, 1, HK] -> [B, 1, H, K]
        k = k.reshape(batch, 1, spec.heads, spec.key_dim)
        v = v.reshape(batch, 1, spec.heads, spec.value_dim)  # [B, 1, HV] -> [B, 1, H, V]
        q, k = l2_normalize(q, spec.qk_eps), l2_normalize(k, spec.qk_eps)
        at, h = spec.qkv_width, spec.heads
        beta = self._beta_from(proj[:, None, at:at + h])  # [B, 1, H]
        gates = (beta,)
        if spec.gated:
            logits = proj[:, None, at + h:at + 2 * h].astype(math_dtype(proj.dtype))
            gates = (softplus_decay(logits, a_log, dt_bias), beta)
        o, final = type(self).op(q, k, v, *gates, initial_state=state, output_final_state=True,
                                 mode="recurrent", backend=self.config.backend)  # [B, 1, H, V]
        if not spec.norm_out:  # the op's output, in the compute dtype
            o = o[:, 0].astype(proj.dtype)  # [B, H, V]
            return o.reshape(batch, h * spec.value_dim), cache, final  # [B, H, V] -> [B, HV]
        gate = None
        if spec.output_gate:
            gate = proj[:, at + len(gates) * h:].reshape(batch, h, spec.value_dim)  # [B, H, V]
        y = gated_rms_norm(o[:, 0], gate, norm_scale, eps=spec.norm_eps)  # [B, H, V]
        return y.reshape(batch, h * spec.value_dim), cache, final  # [B, H, V] -> [B, HV]

    def _beta(self, x: Array) -> Array:
        """``beta [B, T, H]`` in float32 (float64 for float64 compute) from ``x [B, T, D]``."""
        return self._beta_from(dense(self.b_proj, x))

    def _beta_from(self, logits: Array) -> Array:
        """``beta [B, T, H]`` from ``logits = x W_b [B, T, H]`` (compute dtype)."""
        beta = jax.nn.sigmoid(logits.astype(math_dtype(logits.dtype)))
        return 2.0 * beta if self.config.allow_neg_eigval else beta


class DeltaNetBlock(DeltaNetFamilyBlock):
    """DeltaNet: the delta rule without decay; op :func:`linearnexus.kernels.delta_rule.delta_rule`.

    Parameters as :class:`DeltaNetFamilyBlock` (no decay parameters).
    """

    config_class = DeltaNetConfig
    op = staticmethod(delta_rule)

    def _gates(self, x: Array) -> tuple[Array]:
        return (self._beta(x),)

    def _gate_linears(self) -> tuple[nnx.Linear, ...]:
        return (self.b_proj,)

    def _gates_from(self, x: Array, logits: list[Array]) -> tuple[Array]:
        return (self._beta_from(logits[0]),)


def _value_blocks(value_dim: int, heads: int) -> int:
    """Programs per head for the layer kernel over ``heads`` heads in all (batch x heads):
    the most of 4, 2, 1 that leaves at most ``FEW_PROGRAMS`` programs and a power-of-two
    value block of >= 16 columns (1 where the batch alone fills the GPU)."""
    for blocks in (4, 2):
        bv = value_dim // blocks
        if (value_dim % blocks == 0 and bv >= 16 and bv & (bv - 1) == 0
                and heads * blocks <= FEW_PROGRAMS):
            return blocks
    return 1


class GatedDeltaNetBlock(DeltaNetFamilyBlock):
    """Gated DeltaNet: the delta rule with a data-dependent scalar decay per head and step.

    ``g = -exp(A_log) * softplus(x W_a + dt_bias)`` (Mamba2's decay; FLA's ``a_proj =
    Linear(D, H, bias=False)``), computed in float32; op
    :func:`linearnexus.kernels.gated_delta_rule.gated_delta_rule`. Extra parameters:
    ``a_proj`` ``[D, H]``, ``A_log`` ``[H]``, ``dt_bias`` ``[H]``.
    """

    config_class = GatedDeltaNetConfig
    op = staticmethod(gated_delta_rule)
    decays = True

    def _build_mechanism(self, rngs: nnx.Rngs) -> None:
        super()._build_mechanism(rngs)
        cfg = self.config
        pdtype = dtype_of(cfg.param_dtype)
        h = cfg.heads
        self.a_proj = self._linear(cfg.d_model, h, rngs)
        a = jax.random.uniform(rngs.params(), (h,), jnp.float32, 0.0, cfg.a_init_max)
        self.A_log = nnx.Param(jnp.log(jnp.maximum(a, cfg.a_init_floor)).astype(pdtype))
        self.dt_bias = nnx.Param(sample_dt_bias(rngs.params(), (h,), cfg.dt_min, cfg.dt_max,
                                                cfg.dt_init_floor, pdtype))

    def _gates(self, x: Array) -> tuple[Array, Array]:
        beta = self._beta(x)  # first: the order x is used in sets how its gradient is summed
        # the projection in the compute dtype, the decay in float32 (float64 for float64)
        return self._decay_from(dense(self.a_proj, x)), beta

    def _decay_from(self, logits: Array) -> Array:
        """``g [B, T, H] <= 0`` from ``logits = x W_a [B, T, H]`` (compute dtype)."""
        logits = logits.astype(math_dtype(logits.dtype))
        return softplus_decay(logits, self.A_log[...], self.dt_bias[...])  # [B, T, H]

    def _gate_linears(self) -> tuple[nnx.Linear, ...]:
        return (self.b_proj, self.a_proj)

    def _gates_from(self, x: Array, logits: list[Array]) -> tuple[Array, Array]:
        return self._decay_from(logits[1]), self._beta_from(logits[0])
