"""Gated Linear Attention (Yang et al. 2024) and Simple GLA blocks, on the shared body.

"Gated Linear Attention Transformers with Hardware-Efficient Training" (Yang, Wang, Shen,
Panda, Kim; ICML 2024), with the defaults of flash-linear-attention's (FLA)
``GatedLinearAttention`` and ``SimpleGatedLinearAttention`` layers. Data flow for
``x: [B, T, D]`` with ``H`` heads, per-head key / value sizes ``K``, ``V``::

    q, k, v = x W_q, x W_k, x W_v                 # [B, T, H*K], [B, T, H*K], [B, T, H*V]
    (q, k, v) = silu(short_conv(q | k | v))       # only with use_short_conv
    g       = log_sigmoid(gate(x)) / 16           # GLA: [B, T, H, K] via a rank-16 projection
                                                  # Simple GLA: [B, T, H], one scalar per head
    S_t     = diag(exp(g_t)) S_{t-1} + k_t v_t^T  # [H, K, V] per sequence (float32)
    o_t     = K^-1/2 q_t^T S_t                    # [B, T, H, V]
    y       = W_o (rmsnorm(o) * scale * silu(x W_r))   # per-head gated RMSNorm over V

Everything but the gate is :class:`~linearnexus.modules.linear.base.LinearAttentionBlock`
(``modules/linear/base.py``: projections, optional short conv, gated norm, output
projection, the call); :class:`GLAFamilyBlock` fixes what GLA, Simple GLA and RetNet (Simple
GLA with a fixed decay and rotary q / k: ``modules/linear/retnet.py``) have in common, and
each block adds only its log-gate and its op (``kernels.gla.gla`` or
``kernels.simple_gla.simple_gla``).

Initialisation follows FLA's per-layer init from the time of the GLA paper: every linear
weight ``xavier_uniform(gain=2^-2.5)``, every bias zero, norm scales one, the short conv
with PyTorch's Conv1d init. (Current FLA layers have no init of their own and take the
model's ``normal(0, 0.02)``.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
from flax import nnx

from linearnexus.core.config import field
from linearnexus.core.gating import clamp_log_gate, log_sigmoid_gate, low_rank_gate
from linearnexus.core.types import Array
from linearnexus.kernels.gla import gla
from linearnexus.kernels.simple_gla import simple_gla
from linearnexus.modules.base import MOSAIC_KERNEL_BACKENDS, dtype_of
from linearnexus.modules.common import dense, math_dtype, xavier_uniform
from linearnexus.modules.linear.base import INIT_GAIN, LinearAttentionBlock, LinearAttentionConfig

__all__ = [
    "GLABlock",
    "GLAConfig",
    "GLAFamilyBlock",
    "GLAFamilyConfig",
    "SimpleGLABlock",
    "SimpleGLAConfig",
]


@dataclasses.dataclass
class GLAFamilyConfig(LinearAttentionConfig):
    """Fields shared by GLA, Simple GLA and RetNet (FLA's layer arguments).

    Attributes:
        num_heads: H; must divide ``key_dim`` and ``value_dim``.
        expand_k: ``key_dim = d_model * expand_k`` (all heads; per head ``K = key_dim / H``).
        expand_v: ``value_dim = d_model * expand_v`` (per head ``V = value_dim / H``).
        use_short_conv: a causal depthwise conv (+ silu) on q, k and v after their
            projections (FLA's ``ShortConvolution``); one conv over the concatenated
            channels, which equals three separate depthwise convs.
        conv_size: the short conv's width W.
        conv_bias: learn a bias in the short conv.
        norm_eps: epsilon of the per-head gated RMSNorm.
        chunk_size: tokens per chunk in chunk mode (FLA's 64).
        mode_threshold: with ``mode=None``, calls with T < this run in recurrent mode.
        kernel_backend: one of :data:`~linearnexus.modules.base.MOSAIC_KERNEL_BACKENDS`:
            "auto" (best available), "jax", "naive" (the per-step reference; needs concrete
            ``cu_seqlens``), "pallas" (Triton) or "mosaic" (Mosaic GPU on sm_90+; every op of
            this family has it: gla, simple_gla, retention).
    """

    num_heads: int = field(4, gt=0)
    expand_k: float = field(0.5, gt=0)
    expand_v: float = field(1.0, gt=0)
    use_short_conv: bool = False
    conv_size: int = field(4, gt=0)
    conv_bias: bool = False
    norm_eps: float = field(1e-5, gt=0)
    chunk_size: int = field(64, gt=0)
    mode_threshold: int = field(64, gt=0)
    kernel_backend: str = field("auto", choices=MOSAIC_KERNEL_BACKENDS)


@dataclasses.dataclass
class GLAConfig(GLAFamilyConfig):
    """GLA hyper-parameters (FLA ``GatedLinearAttention`` defaults).

    Attributes (besides :class:`GLAFamilyConfig`'s; FLA defaults num_heads 4, expand_k 0.5,
    expand_v 1.0, no short conv):
        gate_low_rank_dim: rank R of the gate projection ``W_g = W_down [D, R] W_up [R, H*K]``
            (16 in the paper and FLA).
        gate_logit_normalizer: ``g = log_sigmoid(logits) / gate_logit_normalizer`` (16): a
            zero logit gives a per-step decay ``2^(-1/16) ~ 0.958``, close to 1: the paper's
            ``alpha = sigmoid(.)^(1/tau)`` with temperature tau = 16, for slow forgetting.
        gate_min: clamp log-gates from below (FLA's ``clamp_min``); None = no clamp.
    """

    gate_low_rank_dim: int = field(16, gt=0)
    gate_logit_normalizer: float = field(16.0, gt=0)
    gate_min: float | None = field(None, lt=0)

    @classmethod
    def tiny(cls, d_model: int = 16, **overrides: Any) -> GLAConfig:
        return super().tiny(d_model, **{"gate_low_rank_dim": 4, **overrides})


@dataclasses.dataclass
class SimpleGLAConfig(GLAFamilyConfig):
    """Simple GLA hyper-parameters (FLA ``SimpleGatedLinearAttention`` defaults).

    Same fields as :class:`GLAFamilyConfig` with FLA's Simple GLA defaults (expand_k 1.0,
    expand_v 1.0, short conv on), plus:

    Attributes:
        gate_logit_normalizer: ``g = log_sigmoid(W_g x + b_g) / gate_logit_normalizer`` (16).
    """

    expand_k: float = field(1.0, gt=0)
    use_short_conv: bool = True
    gate_logit_normalizer: float = field(16.0, gt=0)


class GLAFamilyBlock(LinearAttentionBlock):
    """The shared body of GLA, Simple GLA and RetNet (no norm or residual around it).

    :class:`~linearnexus.modules.linear.base.LinearAttentionBlock` with an output gate and
    q, k, v as projected when there is no short conv. A subclass sets ``config_class`` and
    ``op`` and implements ``_build_mechanism`` (its gate's parameters) and ``_gates`` (its
    log-gate ``g``, the op's one argument after q, k, v).

    Parameters: ``q_proj``, ``k_proj`` ``[D, H*K]``, ``v_proj``, ``g_proj`` ``[D, H*V]``,
    ``o_proj`` ``[H*V, D]`` (no biases), ``norm.scale`` ``[V]`` (one scale shared by the
    heads, as in FLA), ``conv.conv_weight`` ``[W, 2HK + HV]`` with ``use_short_conv``, and
    the subclass's gate parameters.
    """

    config_class: ClassVar[type[GLAFamilyConfig]] = GLAFamilyConfig
    output_gate_first = True


class GLABlock(GLAFamilyBlock):
    """Gated Linear Attention: a data-dependent decay per head and key dimension.

    ``g = log_sigmoid(x W_down W_up + b) / 16``, ``W_down [D, 16]``, ``W_up [16, H*K]``
    (FLA's ``gk_proj``: ``Linear(D, 16, bias=False)`` then ``Linear(16, H*K)``), optionally
    clamped to ``[gate_min, 0]``; op :func:`linearnexus.kernels.gla.gla`.
    """

    config_class = GLAConfig
    op = staticmethod(gla)

    def _build_mechanism(self, rngs: nnx.Rngs) -> None:
        cfg = self.config
        pdtype = dtype_of(cfg.param_dtype)
        r, kd = cfg.gate_low_rank_dim, cfg.key_dim
        init = xavier_uniform(INIT_GAIN)
        self.gate_down = nnx.Param(init(rngs.params(), (cfg.d_model, r), pdtype))  # [D, R]
        self.gate_up = nnx.Param(init(rngs.params(), (r, kd), pdtype))  # [R, H*K]
        self.gate_bias = nnx.Param(jnp.zeros((kd,), pdtype))

    def _gates(self, x: Array) -> tuple[Array]:
        cfg = self.config
        # the projection in the compute dtype, the log-sigmoid in float32 (as Mamba's dt)
        logits = low_rank_gate(x, self.gate_down[...].astype(x.dtype),
                               self.gate_up[...].astype(x.dtype), self.gate_bias[...].astype(x.dtype))
        g = log_sigmoid_gate(logits.astype(math_dtype(x.dtype)), cfg.gate_logit_normalizer)
        if cfg.gate_min is not None:
            g = clamp_log_gate(g, cfg.gate_min)
        return (g.reshape(*x.shape[:2], cfg.heads, cfg.head_k_dim),)  # [B, T, H*K] -> [B, T, H, K]


class SimpleGLABlock(GLAFamilyBlock):
    """Simple GLA: one data-dependent scalar decay per head and step.

    ``g = log_sigmoid(x W_g + b_g) / 16`` with ``W_g [D, H]`` (FLA's ``gk_proj =
    Linear(D, H)``, with bias); op :func:`linearnexus.kernels.simple_gla.simple_gla`.
    """

    config_class = SimpleGLAConfig
    op = staticmethod(simple_gla)

    def _build_mechanism(self, rngs: nnx.Rngs) -> None:
        self.gate_proj = self._linear(self.config.d_model, self.config.heads, rngs, use_bias=True)

    def _gates(self, x: Array) -> tuple[Array]:
        logits = dense(self.gate_proj, x)  # [B, T, H]
        return (log_sigmoid_gate(logits.astype(math_dtype(x.dtype)),
                                 self.config.gate_logit_normalizer),)
