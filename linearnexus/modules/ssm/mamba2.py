"""Mamba-2 mixer block (Dao & Gu 2024, "Transformers are SSMs"), on the shared linear runtime.

Data flow for ``x: [B, T, D]`` with ``E = expand * D`` inner channels, ``H = E / P`` heads of
size ``P = headdim``, ``G = ngroups`` groups of ``N = d_state``::

    (z, xBC, dt) = in_proj(x)                   # [B, T, 2E + 2GN + H] -> [E], [E + 2GN], [H]
    xBC          = silu(causal_depthwise_conv(xBC))   # kernel d_conv, cache of d_conv-1 inputs
    (x, B, C)    = split(xBC)                   # [B, T, H, P], [B, T, G, N], [B, T, G, N]
    dt           = softplus(dt + dt_bias)       # [B, T, H], float32
    y            = ssd(x, dt, A=-exp(A_log), B, C, D)   # h_t = exp(dt A) h + dt B x^T; y = C^T h + D x
    out          = out_proj(rmsnorm(y * silu(z)))     # grouped gated RMSNorm, [B, T, D]

Head ``h`` reads group ``h // (H / G)`` of B and C. The state is a
:class:`~linearnexus.modules.linear.runtime.LinearState`: the conv cache over the
``E + 2GN`` xBC channels and the ``[B, H, N, P]`` SSD state (``K = d_state``, ``V = headdim``).

Follows the reference ``mamba_ssm.modules.mamba2.Mamba2`` (defaults, initialisation, the
single in_proj, one conv over x, B and C, ``RMSNormGated(norm_before_gate=False)`` with
``group_size = E / G``), including its ``dt_limit`` clamp and ``D_has_hdim`` (both off by
default). Left out of the reference: ``d_ssm < d_inner`` (a partial SSM with an extra MLP
path).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from linearnexus.core.config import ConfigError, field
from linearnexus.core.gating import sample_dt_bias
from linearnexus.core.mode import KernelMode
from linearnexus.core.types import Array
from linearnexus.kernels.conv import conv_step
from linearnexus.kernels.fused_decode import SsdLayerSpec, layer_kernel_ready, ssd_layer_step
from linearnexus.kernels.fused_decode.pallas import ssd_value_blocks
from linearnexus.kernels.ssd import ssd
from linearnexus.modules.base import MOSAIC_KERNEL_BACKENDS, BlockConfig, dtype_of, op_backend
from linearnexus.modules.common import (
    GatedRMSNorm,
    RMSNorm,
    ShortConv,
    conv_dense,
    dense,
    fused_decode_enabled,
    input_norm_first,
    math_dtype,
    normed_dense,
)
from linearnexus.modules.linear.runtime import (
    LinearState,
    begin_call,
    check_linear_state,
    end_call,
    inert,
    zeros_linear_state,
)

# PyTorch's nn.Linear default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance 1/(3 fan_in)
_TORCH_LINEAR_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass
class Mamba2Config(BlockConfig):
    """Mamba-2 mixer hyper-parameters (``mamba_ssm``'s ``Mamba2`` defaults unless noted).

    Attributes:
        d_state: SSM state size N per head. 64 here; the paper and ``mamba_ssm`` use 128.
            64 halves the state and the chunk-mode ``C B^T`` cost for the small models this
            library trains; set 128 for the paper's setting.
        d_conv: width W of the causal depthwise conv over x, B and C.
        expand: inner width E = expand * d_model.
        headdim: P, channels per head; must divide E (H = E / P heads).
        ngroups: G, groups of heads sharing B and C (as GQA shares keys); must divide H.
        A_init_range: A_h = -exp(A_log_h) with exp(A_log_h) ~ U(A_init_range) per head.
        dt_min, dt_max: softplus(dt_bias) is initialised log-uniform in [dt_min, dt_max].
        dt_init_floor: lower clamp of that initial dt.
        conv_bias / bias: bias on the conv / on in_proj and out_proj.
        rmsnorm: gated RMSNorm ``rmsnorm(y * silu(z))`` before out_proj (True) or the plain
            gate ``y * silu(z)`` (False), as the reference's ``rmsnorm`` flag.
        norm_eps: epsilon of that norm (the reference's RMSNormGated default 1e-5).
        chunk_size: tokens per chunk in chunk mode. 64 (the ssd kernel's default) rather
            than the reference's 256: on CPU at T=1024 chunk 64 measured faster than 256
            (docs/features/mamba2.md).
        mode_threshold: with ``mode=None``, calls with T < this run in recurrent mode.
        kernel_backend: one of :data:`~linearnexus.modules.base.MOSAIC_KERNEL_BACKENDS`: "auto"
            (best available), "jax", "naive" (the per-step reference) or "pallas" (simple
            GLA's Triton kernels, which the SSD op runs through) or "mosaic" (simple GLA's
            Mosaic GPU kernels on sm_90+, docs/mosaic.md).
        D_has_hdim: the skip ``D`` per channel, ``[H, P]`` (the reference's ``D_has_hdim``),
            instead of per head ``[H]``.
        dt_limit: ``(low, high)``: clamp ``softplus(dt + dt_bias)`` to it (the reference's
            ``dt_limit``; transformers' ``time_step_limit``); None = no clamp.
    """

    d_state: int = field(64, gt=0)
    d_conv: int = field(4, gt=0)
    expand: int = field(2, gt=0)
    headdim: int = field(64, gt=0)
    ngroups: int = field(1, gt=0)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = field(1e-3, gt=0)
    dt_max: float = field(0.1, gt=0)
    dt_init_floor: float = field(1e-4, gt=0)
    conv_bias: bool = True
    bias: bool = False
    rmsnorm: bool = True
    norm_eps: float = field(1e-5, gt=0)
    chunk_size: int = field(64, gt=0)
    mode_threshold: int = field(64, gt=0)
    kernel_backend: str = field("auto", choices=MOSAIC_KERNEL_BACKENDS)
    D_has_hdim: bool = False
    dt_limit: tuple[float, float] | None = None

    def validate(self) -> None:
        if self.dt_limit is not None:
            if len(self.dt_limit) != 2 or not 0 <= self.dt_limit[0] < self.dt_limit[1]:
                raise ConfigError(f"dt_limit: need (low, high) with 0 <= low < high, got {self.dt_limit}")
        if self.d_inner % self.headdim:
            raise ConfigError(
                f"headdim: must divide d_inner = expand * d_model = {self.d_inner}, got {self.headdim}")
        if self.n_heads % self.ngroups:
            raise ConfigError(
                f"ngroups: must divide the number of heads H = d_inner / headdim = {self.n_heads}, "
                f"got {self.ngroups}")
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ConfigError(f"A_init_range: need 0 < low <= high, got {self.A_init_range}")
        if self.dt_min > self.dt_max:
            raise ConfigError(f"dt_min: must be <= dt_max ({self.dt_max}), got {self.dt_min}")

    @property
    def d_inner(self) -> int:
        """E = expand * d_model."""
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        """H = d_inner / headdim."""
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv (and its cache): x, B and C, ``E + 2 G N``."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    @classmethod
    def tiny(cls, d_model: int = 16, **overrides: Any) -> Mamba2Config:
        # d_inner 32 -> 2 heads of 16; chunk 8 so T = 13 / 19 spans several chunks
        return cls.from_dict({"d_model": d_model, "d_state": 4, "headdim": 16, "chunk_size": 8,
                              **overrides})


class Mamba2Block(nnx.Module):
    """The Mamba-2 mixer (no outer norm or residual: the model wraps every block alike).

    Parameters and their initialisation (as ``mamba_ssm``'s ``Mamba2``):

    * ``in_proj`` ``[D, 2E + 2GN + H]`` and ``out_proj`` ``[E, D]``: PyTorch's Linear default
      ``U(+-1/sqrt(fan_in))``, no bias (``bias``). (The reference LM then divides
      ``out_proj`` by ``sqrt(n_layer)``; that is the model's business, not the mixer's.)
    * ``conv`` (:class:`ShortConv` over the ``E + 2GN`` xBC channels, SiLU): PyTorch's Conv1d
      default ``U(+-1/sqrt(W))``, with bias (``conv_bias``).
    * ``A_log`` ``[H]``: ``log(U(A_init_range))``; ``dt_bias`` ``[H]``: ``inverse_softplus(dt)``
      with ``dt`` log-uniform in ``[dt_min, dt_max]``, floored at ``dt_init_floor``;
      ``D`` ``[H]`` (``[H, P]`` with ``D_has_hdim``): ones; ``norm.scale`` ``[E]``: ones.
    """

    #: the mechanism this block runs (its op in OP_REGISTRY; the README's feature table reads it)
    op = staticmethod(ssd)

    def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs) -> None:
        if not isinstance(config, Mamba2Config):
            raise TypeError(f"config: expected Mamba2Config, got {type(config).__name__}")
        self.config = cfg = config
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        e, h = cfg.d_inner, cfg.n_heads
        linear = dict(use_bias=cfg.bias, kernel_init=_TORCH_LINEAR_INIT, dtype=dtype,
                      param_dtype=pdtype, rngs=rngs)
        self.in_proj = nnx.Linear(cfg.d_model, e + cfg.conv_dim + h, **linear)
        self.conv = ShortConv(cfg.conv_dim, cfg.d_conv, bias=cfg.conv_bias, activation="silu",
                              dtype=dtype, param_dtype=pdtype, rngs=rngs)
        lo, hi = cfg.A_init_range
        a = jax.random.uniform(rngs.params(), (h,), jnp.float32, lo, hi)
        self.A_log = nnx.Param(jnp.log(a).astype(pdtype))
        self.dt_bias = nnx.Param(sample_dt_bias(
            rngs.params(), (h,), cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, pdtype))
        self.D = nnx.Param(jnp.ones((h, cfg.headdim) if cfg.D_has_hdim else (h,), pdtype))
        self.norm = (GatedRMSNorm(e, eps=cfg.norm_eps, norm_before_gate=False,
                                  group_size=e // cfg.ngroups, dtype=dtype, param_dtype=pdtype)
                     if cfg.rmsnorm else None)
        self.out_proj = nnx.Linear(e, cfg.d_model, **linear)

    def _state_dims(self) -> dict[str, int]:
        cfg = self.config
        return dict(conv_width=cfg.d_conv, conv_channels=cfg.conv_dim, heads=cfg.n_heads,
                    key_dim=cfg.d_state, value_dim=cfg.headdim)

    def init_state(self, batch_size: int) -> LinearState:
        """Zero conv cache ``[B, d_conv-1, E+2GN]`` (compute dtype) and SSD state
        ``[B, H, N, P]`` (float32; float64 for a float64 block)."""
        return zeros_linear_state(batch_size, dtype=self.config.dtype, **self._state_dims())

    def _layer_spec(self) -> SsdLayerSpec:
        cfg = self.config
        return SsdLayerSpec(heads=cfg.n_heads, head_dim=cfg.headdim, groups=cfg.ngroups,
                            d_state=cfg.d_state, conv_width=cfg.d_conv,
                            d_per_channel=cfg.D_has_hdim, dt_limit=cfg.dt_limit)

    def _fused_layer(self, x: Array, input_norm: RMSNorm | None,
                     state: LinearState) -> tuple[Array, LinearState] | None:
        """One token (no mask, no packing) of ``x [B, 1, D]`` (``input_norm(x)`` with a
        norm) from ``in_proj`` through ``kernels.fused_decode.ssd_layer_step`` where it
        runs: ``(y * silu(z) [B, E] float32, new_state)``; else None. At batch 1 (or up to
        ``LINEARNEXUS_DECODE_ROWS``) on a GPU the conv runs in ``in_proj``'s kernel
        (``modules.common.conv_dense``: its cache is then updated in place, not copied)."""
        cfg = self.config
        spec = self._layer_spec()
        if not (fused_decode_enabled()
                and layer_kernel_ready(spec, dtype_of(cfg.dtype),
                                       op_backend(cfg.kernel_backend))):
            return None
        conv = self.conv
        params = (state.recurrent.state, self.A_log[...], self.dt_bias[...], self.D[...])
        arrived = self._arrival_layer(x, input_norm, state, spec)
        if arrived is not None:
            y, cache, final = arrived
            return y, LinearState(conv=state.conv.update(cache),
                                  recurrent=state.recurrent.update(final))
        done = conv_dense(x, [self.in_proj], conv, state.conv.buffer, conv_start=cfg.d_inner,
                          norm=input_norm)
        if done is not None:  # x | B | C arrive after the conv
            proj, cache = done
            spec = dataclasses.replace(spec, conv_width=None)
            y, _, final = ssd_layer_step(spec, proj[:, 0], None, None, None, *params,
                                         fallback=lambda *a: self._layer_reference(spec, *a))
        else:
            proj = dense(self.in_proj, x, norm=input_norm)  # [B, 1, 2E + 2GN + H]
            spec = dataclasses.replace(spec, value_blocks=ssd_value_blocks(cfg.headdim))
            y, cache, final = ssd_layer_step(
                spec, proj[:, 0], state.conv.buffer, conv.conv_weight[...],
                None if conv.conv_bias is None else conv.conv_bias[...], *params,
                fallback=lambda *a: self._layer_reference(spec, *a))
        return y, LinearState(conv=state.conv.update(cache),
                              recurrent=state.recurrent.update(final))

    def _arrival_layer(self, x: Array, input_norm: RMSNorm | None, state: LinearState,
                       spec: SsdLayerSpec) -> tuple[Array, Array, Array] | None:
        """``in_proj`` (with the pre-norm and the conv) and the layer kernel of a batch-1
        token as one launch (``kernels.fused_decode.arrival.ssd_in_layer``), where
        ``LINEARNEXUS_DECODE_ARRIVAL=1`` asks for it and the separate kernels it stands for
        would run (``conv_dense``'s kernel, then the layer kernel without a conv): ``(y *
        silu(z) [1, E] float32, new conv cache, new state)``; else None. Differentiable
        through the separate kernels."""
        from linearnexus.kernels.fused_decode import arrival
        from linearnexus.kernels.fused_decode.api import kept_state_dtype
        from linearnexus.modules.common import conv_dense_weight

        cfg = self.config
        if not (arrival.arrival_enabled() and x.shape[:2] == (1, 1)):
            return None
        w_in_t = conv_dense_weight(x, [self.in_proj], self.conv, state.conv.buffer,
                                   conv_start=cfg.d_inner, norm=input_norm)
        if w_in_t is None:
            return None
        spec = dataclasses.replace(spec, conv_width=None)
        conv = self.conv
        return arrival.layer_call(
            dict(x=x.reshape(1, cfg.d_model),
                 norm1_scale=None if input_norm is None else input_norm.scale[...],
                 w_in_t=w_in_t, conv_cache=state.conv.buffer,
                 conv_weight=conv.conv_weight[...],
                 conv_bias=None if conv.conv_bias is None else conv.conv_bias[...],
                 state=kept_state_dtype(state.recurrent.state), a_log=self.A_log[...],
                 dt_bias=self.dt_bias[...], d=self.D[...]),
            spec=spec, norm1_eps=None if input_norm is None else input_norm.eps,
            layer_fallback=lambda *a: self._layer_reference(spec, *a))

    def persistent_layer(self, x: Array, state: Any, input_norm: RMSNorm, mlp: Any,
                         mlp_norm: Any) -> tuple[Array, Any] | None:
        """A whole pre-norm layer without an MLP (``x + self(input_norm(x))``) at batch 1 in
        one persistent kernel (``kernels.fused_decode.persistent.ssd_layer``), where
        ``LINEARNEXUS_DECODE_PERSISTENT=1`` asks for it and the three separate kernels it
        stands for would run (the conv in ``in_proj``, the layer kernel, the gated norm in
        ``out_proj``); else None (the caller runs the layer as usual). ``x [1, 1, D]``;
        returns ``(x + y [1, 1, D], new_state)``. Differentiable through the separate
        kernels."""
        from linearnexus.kernels.fused_decode import persistent
        from linearnexus.modules.common import (
            GatedRMSNorm,
            _kernel_linear,
            conv_dense_weight,
            transposed_weight,
        )

        cfg = self.config
        dtype = dtype_of(cfg.dtype)
        norm = self.norm
        if not (persistent.persistent_enabled() and mlp is None and state is not None
                and isinstance(norm, GatedRMSNorm) and not norm.norm_before_gate
                and norm.group_size in (None, norm.dim) and fused_decode_enabled()
                and getattr(x, "ndim", 0) == 3 and x.shape[:2] == (1, 1)
                and jnp.dtype(x.dtype) == jnp.dtype(dtype)
                # as modules.common.normed_dense decides for the separate out_proj kernel
                and jnp.dtype(norm.dtype or jnp.float32) == jnp.dtype(dtype)):
            return None
        spec = self._layer_spec()
        if not layer_kernel_ready(spec, dtype, op_backend(cfg.kernel_backend)):
            return None
        x, call = begin_call(x, cfg.d_model, mode=KernelMode.RECURRENT,
                             mode_threshold=cfg.mode_threshold, dtype=dtype)
        check_linear_state(state, call, **self._state_dims())
        w_in_t = conv_dense_weight(x, [self.in_proj], self.conv, state.conv.buffer,
                                   conv_start=cfg.d_inner, norm=input_norm)
        out_lin = self.out_proj
        if (w_in_t is None or not _kernel_linear(out_lin)
                or jnp.dtype(out_lin.dtype or out_lin.param_dtype) != jnp.dtype(dtype)):
            return None
        spec = dataclasses.replace(spec, conv_width=None)
        done = persistent.layer_call(
            persistent.ssd_layer, persistent.ssd_layer_separate, dict(
                **persistent.input_operands(x, input_norm, w_in_t, self.conv,
                                            state.conv.buffer, state.recurrent.state),
                a_log=self.A_log[...],
                dt_bias=self.dt_bias[...], d=self.D[...], out_norm_scale=norm.scale[...],
                w_out_t=transposed_weight([out_lin]).astype(dtype)),
            tiled=(spec.conv_channels, cfg.d_inner),  # the conv's start and channels
            layer_fallback=lambda *b: self._layer_reference(spec, *b), spec=spec,
            norm1_eps=input_norm.eps, out_norm_eps=norm.eps)
        if done is None:
            return None
        out, cache, final = done
        return out.reshape(1, 1, cfg.d_model), LinearState(
            conv=state.conv.update(cache), recurrent=state.recurrent.update(final))

    def _layer_reference(self, spec: SsdLayerSpec, proj: Array, cache: Array | None,
                         conv_weight: Array | None, conv_bias: Array | None, state: Array,
                         a_log: Array, dt_bias: Array,
                         d: Array) -> tuple[Array, Array | None, Array]:
        """:func:`ssd_layer_step`'s math unfused, on explicit parameters (its backward pass):
        the same steps as the block's one-token call (without the conv when
        ``spec.conv_width`` is None: the row has it already)."""
        batch, e, h = proj.shape[0], spec.inner, spec.heads
        g, n = spec.groups, spec.d_state
        z, xbc, dt = jnp.split(proj[:, None], [e, e + spec.conv_channels], axis=-1)
        if spec.conv_width is not None:
            xbc, cache = conv_step(xbc, cache, conv_weight, conv_bias, activation="silu")
        xs, b_t, c_t = jnp.split(xbc, [e, e + g * n], axis=-1)
        ct = math_dtype(proj.dtype)
        dt = jax.nn.softplus(dt.astype(ct) + dt_bias.astype(ct))  # [B, 1, H]
        if spec.dt_limit is not None:
            dt = jnp.clip(dt, *spec.dt_limit)
        y, final = ssd(xs.reshape(batch, 1, h, spec.head_dim), dt, -jnp.exp(a_log.astype(ct)),
                       b_t.reshape(batch, 1, g, n), c_t.reshape(batch, 1, g, n), D=d,
                       initial_state=state, output_final_state=True, mode="recurrent",
                       backend=op_backend(self.config.kernel_backend))  # [B, 1, H, P]
        y = y.reshape(batch, e).astype(ct) * jax.nn.silu(z[:, 0].astype(ct))  # [B, E]
        return y, cache, final

    def __call__(
        self,
        x: Array,
        *,
        state: LinearState | None = None,
        mask: Array | None = None,
        mode: KernelMode | str | None = None,
        cu_seqlens: Array | None = None,
        input_norm: RMSNorm | None = None,
    ) -> tuple[Array, LinearState]:
        """Run the mixer.

        Args:
            x: ``[B, T, D]`` float.
            state: a :class:`LinearState` from ``init_state`` or a previous call; None =
                zeros. Its batch is B, or N with ``cu_seqlens``.
            mask: optional ``[B, T]`` padding mask (True = valid), any padding pattern.
            mode: CHUNK, RECURRENT or None (recurrent when ``T < mode_threshold``).
            cu_seqlens: optional ``[N+1]`` int offsets: ``x`` (``B == 1``) packs N sequences,
                each run from its own state. Not together with ``mask``.
            input_norm: an :class:`RMSNorm` to apply to ``x`` first (the layer's pre-norm),
                or None; one token on a GPU runs it in ``in_proj``'s kernel.

        Returns:
            ``(y [B, T, D] in the compute dtype, new_state)``; ``y`` is zero at pads.

        Raises:
            ValueError / TypeError: bad ``x``, ``mask``, ``cu_seqlens``, ``state`` or ``mode``.
        """
        cfg = self.config
        dtype = dtype_of(cfg.dtype)
        x, input_norm = input_norm_first(x, input_norm, dtype,
                                         fold=mask is None and cu_seqlens is None)
        x, call = begin_call(x, cfg.d_model, mask=mask, cu_seqlens=cu_seqlens, mode=mode,
                             mode_threshold=cfg.mode_threshold, dtype=dtype)
        dims = self._state_dims()
        fresh = state is None  # the op then starts from no state (its zero-state paths)
        if state is None:
            state = zeros_linear_state(call.n_states, dtype=dtype, **dims)
        else:
            check_linear_state(state, call, **dims)
        batch, seq = x.shape[:2]
        e, h, p = cfg.d_inner, cfg.n_heads, cfg.headdim
        g, n = cfg.ngroups, cfg.d_state

        if seq == 1 and call.layout is None and call.cu_seqlens is None:
            layer = self._fused_layer(x, input_norm, state)
            if layer is not None:  # conv, step size, SSD step, skip and gate in one kernel
                y, new_state = layer  # [B, E] float32: y * silu(z)
                out = (None if self.norm is None
                       else normed_dense(self.out_proj, self.norm, y[:, None]))  # decoding
                if out is None:
                    y = (self.norm.normalize_gated(y) if self.norm is not None
                         else y.astype(dtype))
                    out = dense(self.out_proj, y[:, None])
                return out, new_state
        zxbcdt = dense(self.in_proj, x, norm=input_norm)  # [B, T, 2E + 2GN + H]
        z, xbc, dt = jnp.split(zxbcdt, [e, e + cfg.conv_dim], axis=-1)
        # pads zeroed before the conv (in_proj's bias would make them non-zero), so the conv
        # cache keeps the last valid inputs
        xbc, conv_cache = self.conv(inert(xbc, call), state.conv.buffer, lengths=call.lengths,
                                    cu_seqlens=call.cu_seqlens,
                                    written_backward=call.mode is KernelMode.CHUNK)  # no jvp there
        xs, b_t, c_t = jnp.split(xbc, [e, e + g * n], axis=-1)
        xs = inert(xs.reshape(batch, seq, h, p), call)  # [B, T, E] -> [B, T, H, P]
        b_t = inert(b_t.reshape(batch, seq, g, n), call)  # [B, T, GN] -> [B, T, G, N]
        c_t = c_t.reshape(batch, seq, g, n)
        # gates in float32 (float64 for a float64 block); dt = 0 at pads, taken after the
        # softplus (softplus(0 + dt_bias) > 0), so pads neither decay nor write the state
        gate_dtype = math_dtype(dtype)
        dt = jax.nn.softplus(dt.astype(gate_dtype) + self.dt_bias[...].astype(gate_dtype))
        if cfg.dt_limit is not None:
            dt = jnp.clip(dt, *cfg.dt_limit)
        dt = inert(dt, call)  # [B, T, H]
        A = -jnp.exp(self.A_log[...].astype(gate_dtype))  # [H]
        y, ssm_state = ssd(xs, dt, A, b_t, c_t, D=self.D[...],
                           initial_state=None if fresh else state.recurrent.state,
                           output_final_state=True, cu_seqlens=call.cu_seqlens,
                           chunk_size=cfg.chunk_size, mode=call.mode,
                           backend=op_backend(cfg.kernel_backend))
        y = y.reshape(batch, seq, e)  # [B, T, H, P] -> [B, T, E]
        if self.norm is not None:
            y = self.norm(y, z)
        else:
            y = (y.astype(gate_dtype) * jax.nn.silu(z.astype(gate_dtype))).astype(dtype)
        out = end_call(dense(self.out_proj, y), call)
        new_state = LinearState(conv=state.conv.update(conv_cache),
                                recurrent=state.recurrent.update(ssm_state))
        return out, new_state
