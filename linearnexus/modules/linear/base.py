"""The body every q / k / v linear-attention block shares: GLA, Simple GLA, RetNet, DeltaNet.

For ``x: [B, T, D]`` with ``H`` heads of key / value size ``K`` / ``V``,
:class:`LinearAttentionBlock` runs::

    q, k, v = x W_q, x W_k, x W_v                 # [B, T, H*K], [B, T, H*K], [B, T, H*V]
    (q, k, v) = silu(short_conv(q | k | v))       # with use_short_conv; without it q, k, v
                                                  # as they are, or silu'd (silu_without_conv)
    q, k    = _prepare_qk(q, k)                   # [B, T, H, K]: RetNet's rotary, DeltaNet's L2 norm
    gates   = _gates(x)                           # the mechanism's log-gates / beta
    o, S    = op(q, k, v, *gates, initial_state=S_0)   # [B, T, H, V], final [N, H, K, V] float32
    y       = W_o (rmsnorm(o) * scale * silu(x W_g))   # per head over V (no gate: rmsnorm(o) * scale)

with the call runtime of ``modules/linear/runtime.py`` around it (input checks, masks,
packed sequences, the :class:`LinearState` in and out). A mechanism's block sets its
config class and ``op`` (its api function) and writes only its own math: its parameters
(:meth:`~LinearAttentionBlock._build_mechanism`), its gates
(:meth:`~LinearAttentionBlock._gates`) and, where it has one, its q / k transform
(:meth:`~LinearAttentionBlock._prepare_qk`). :class:`LinearAttentionConfig` holds the
derived sizes every such config shares.

Every linear weight has FLA's per-layer init from the time of the GLA and DeltaNet papers,
``xavier_uniform(gain=2^-2.5)`` (:data:`INIT_GAIN`), biases zero, norm scales one, the short
conv PyTorch's Conv1d init.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from linearnexus.core.config import ConfigError
from linearnexus.core.mode import KernelMode
from linearnexus.core.types import Array
from linearnexus.modules.base import BlockConfig, dtype_of, op_backend
from linearnexus.modules.common import (
    GatedRMSNorm,
    RMSNorm,
    ShortConv,
    dense,
    fused_decode_enabled,
    fused_dense,
    input_norm_first,
    xavier_uniform,
)
from linearnexus.modules.linear.runtime import (
    LinearState,
    SequenceCall,
    begin_call,
    check_linear_state,
    end_call,
    inert,
    zeros_linear_state,
)

__all__ = ["INIT_GAIN", "LinearAttentionBlock", "LinearAttentionConfig", "whole_width"]

#: FLA's per-layer init gain (``nn.init.xavier_uniform_(w, gain=2 ** -2.5)``)
INIT_GAIN = 2.0 ** -2.5

OpFn = Callable[..., tuple[Array, Array | None]]


def whole_width(name: str, base_name: str, base: int, expand: float) -> int:
    """``base * expand`` as a positive int, or a ConfigError naming the field ``name``.

    Args:
        name: the config field holding ``expand`` (e.g. ``"expand_k"``).
        base_name: the field holding ``base``, for the message (``"d_model"``, ``"head_dim"``).
        base, expand: the factors.
    """
    width = base * expand
    if width < 1 or not math.isclose(width, round(width)):
        raise ConfigError(f"{name}: {base_name} * {name} must be a positive whole number, "
                          f"got {base} * {expand} = {width}")
    return round(width)


@dataclasses.dataclass
class LinearAttentionConfig(BlockConfig):
    """What :class:`LinearAttentionBlock` reads from a config: derived sizes, no fields.

    The fields live in each family's config (their defaults and order differ, and the order
    is that of saved YAML files): ``num_heads``, ``use_short_conv``, ``conv_size``,
    ``conv_bias``, ``norm_eps``, ``chunk_size``, ``mode_threshold``, ``kernel_backend``, and
    for the default head layout ``expand_k`` and ``expand_v``.

    The default head layout is FLA's: ``key_dim = d_model * expand_k`` and
    ``value_dim = d_model * expand_v`` split over ``num_heads`` heads. A config with another
    layout (Gated DeltaNet's fixed ``head_dim``) overrides :attr:`heads`, :attr:`key_dim`,
    :attr:`value_dim`, :attr:`head_k_dim`, :attr:`head_v_dim` and :meth:`validate`.
    """

    def validate(self) -> None:
        heads = self.heads
        for name, width in (("expand_k", self.key_dim), ("expand_v", self.value_dim)):
            if width % heads:
                raise ConfigError(f"num_heads: must divide d_model * {name} = {width}, got {heads}")

    @property
    def heads(self) -> int:
        """H (a config whose ``num_heads`` may be None resolves a default)."""
        return self.num_heads

    @property
    def key_dim(self) -> int:
        """All heads' key width ``H * K``."""
        return whole_width("expand_k", "d_model", self.d_model, self.expand_k)

    @property
    def value_dim(self) -> int:
        """All heads' value width ``H * V``."""
        return whole_width("expand_v", "d_model", self.d_model, self.expand_v)

    @property
    def head_k_dim(self) -> int:
        """K."""
        return self.key_dim // self.heads

    @property
    def head_v_dim(self) -> int:
        """V."""
        return self.value_dim // self.heads

    @property
    def conv_channels(self) -> int:
        """Channels of the short conv: q | k | v."""
        return 2 * self.key_dim + self.value_dim

    @property
    def conv_width(self) -> int | None:
        """The short conv's W, or None without it."""
        return self.conv_size if self.use_short_conv else None

    @property
    def output_gate(self) -> bool:
        """Whether the output is ``rmsnorm(o) * silu(x W_g)`` (True) or ``rmsnorm(o)``."""
        return True

    @property
    def backend(self) -> str | None:
        """``kernel_backend`` as the op's ``backend`` argument ("auto" -> None)."""
        return op_backend(self.kernel_backend)

    @classmethod
    def tiny(cls, d_model: int = 16, **overrides: Any):
        """d_model 16, 2 heads, chunks of 8 (so T = 13 or 19 spans several chunks)."""
        return cls.from_dict({"d_model": d_model, "num_heads": 2, "chunk_size": 8, **overrides})


class LinearAttentionBlock(nnx.Module):
    """The shared body of the linear-attention blocks (no norm or residual around it).

    A subclass sets ``config_class`` and ``op`` and implements :meth:`_build_mechanism` and
    :meth:`_gates`; optionally :meth:`_prepare_qk`, and for a state with more than a
    :class:`LinearState` (RetNet's offsets) :meth:`init_state`, :meth:`_linear_state` and
    :meth:`_next_state`.

    Parameters: ``q_proj``, ``k_proj`` ``[D, H*K]``, ``v_proj`` ``[D, H*V]``, ``g_proj``
    ``[D, H*V]`` with an output gate (else None), ``o_proj`` ``[H*V, D]`` (no biases),
    ``norm.scale`` ``[V]`` (one scale shared by the heads, as in FLA),
    ``conv.conv_weight`` ``[W, 2HK + HV]`` (and ``conv.conv_bias``) with
    ``use_short_conv`` (else ``conv`` is None), and the mechanism's own.
    """

    config_class: ClassVar[type[LinearAttentionConfig]] = LinearAttentionConfig
    #: the mechanism's api function: ``op(q, k, v, *gates, initial_state=...,
    #: output_final_state=True, cu_seqlens=..., chunk_size=..., mode=..., backend=...)``
    op: ClassVar[OpFn]
    #: without the short conv, silu q, k and v (DeltaNet) or leave them as they are (GLA)
    silu_without_conv: ClassVar[bool] = False
    #: create the output gate before the short conv and the mechanism's parameters after it
    #: (GLA family), or the reverse (DeltaNet family). Only which random draws each weight
    #: gets for a given seed depends on it; each family keeps its original order.
    output_gate_first: ClassVar[bool] = False

    def __init__(self, config: LinearAttentionConfig, *, rngs: nnx.Rngs) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"config: expected {self.config_class.__name__}, got {type(config).__name__}")
        self.config = cfg = config
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        d, kd, vd = cfg.d_model, cfg.key_dim, cfg.value_dim
        self.q_proj = self._linear(d, kd, rngs)
        self.k_proj = self._linear(d, kd, rngs)
        self.v_proj = self._linear(d, vd, rngs)
        first, last = self._build_mechanism, self._build_output_gate
        if self.output_gate_first:
            first, last = last, first
        first(rngs)
        self.conv = (ShortConv(cfg.conv_channels, cfg.conv_size, bias=cfg.conv_bias,
                               activation="silu", dtype=dtype, param_dtype=pdtype, rngs=rngs)
                     if cfg.use_short_conv else None)
        last(rngs)
        if self.g_proj is not None:
            # FLA's FusedRMSNormGated: rmsnorm(o) * scale * silu(gate), per head over V
            self.norm = GatedRMSNorm(cfg.head_v_dim, eps=cfg.norm_eps, norm_before_gate=True,
                                     activation="silu", dtype=dtype, param_dtype=pdtype)
        else:
            self.norm = RMSNorm(cfg.head_v_dim, eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype)
        self.o_proj = self._linear(vd, d, rngs)

    def _linear(self, fan_in: int, fan_out: int, rngs: nnx.Rngs, *,
                use_bias: bool = False) -> nnx.Linear:
        """An ``nnx.Linear [fan_in, fan_out]`` with FLA's init, in the config's dtypes."""
        cfg = self.config
        return nnx.Linear(fan_in, fan_out, use_bias=use_bias,
                          kernel_init=xavier_uniform(INIT_GAIN), dtype=dtype_of(cfg.dtype),
                          param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)

    def _build_output_gate(self, rngs: nnx.Rngs) -> None:
        cfg = self.config
        self.g_proj = self._linear(cfg.d_model, cfg.value_dim, rngs) if cfg.output_gate else None

    # ---- subclass hooks ------------------------------------------------------------------
    def _build_mechanism(self, rngs: nnx.Rngs) -> None:
        """Create the mechanism's own parameters (its gates', beta's)."""
        raise NotImplementedError(f"{type(self).__name__} must define _build_mechanism: the base "
                                  "class has no gate of its own")

    def _gates(self, x: Array) -> tuple[Array, ...]:
        """The op's arguments after q, k, v, from the aligned ``x [B, T, D]``: log-gates
        ``[B, T, H, K]`` or ``[B, T, H]``, beta ``[B, T, H]``, in float32 (float64 for float64
        compute). The caller zeroes them at pads."""
        raise NotImplementedError(f"{type(self).__name__} must define _gates: the base class has "
                                  "no gate of its own")

    def _gate_linears(self) -> tuple[nnx.Linear, ...] | None:
        """The ``nnx.Linear`` projections of ``x`` that :meth:`_gates` reads, in the order
        :meth:`_gates_from` takes their outputs, or None (the default) when the gates are
        not plain projections of ``x``: then one-token calls project q, k, v apart."""
        return None

    def _gates_from(self, x: Array, logits: list[Array]) -> tuple[Array, ...]:
        """:meth:`_gates` from its projections' outputs ``logits`` (those of
        :meth:`_gate_linears`, computed with q, k and v in one matmul at decode)."""
        raise NotImplementedError(f"{type(self).__name__} must define _gates_from with "
                                  "_gate_linears")

    def decode_linears(self) -> list[list[nnx.Linear]]:
        """The projections a one-token call runs as one matmul (``modules.common.fused_dense``):
        q, k, v, the gates' (:meth:`_gate_linears`) and the output gate; none when the gates
        are not plain projections."""
        gate_linears = self._gate_linears()
        if gate_linears is None:
            return []
        out_gate = [] if self.g_proj is None else [self.g_proj]
        return [[self.q_proj, self.k_proj, self.v_proj, *gate_linears, *out_gate]]

    def _fused_layer(self, x: Array, linear: LinearState,
                     input_norm: RMSNorm | None = None) -> tuple[Array, LinearState] | None:
        """A one-token call (no mask, no packing) through one fused layer kernel, from the
        input projection (of ``input_norm(x)`` with a norm) to the block's output
        ``[B, 1, D]`` (``o_proj`` included), with the new state; None (the default) when
        the block has none or it does not apply (then the block runs its unfused path)."""
        return None

    def _prepare_qk(self, q: Array, k: Array, state: Any,
                    call: SequenceCall) -> tuple[Array, Array]:
        """Transform ``q, k [B, T, H, K]`` before the op (RetNet's rotary, DeltaNet's L2
        norm); ``state`` is the caller's, as passed to :meth:`_linear_state`."""
        return q, k

    # ---- state ---------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> Any:
        """Zero :class:`LinearState`: conv cache ``[B, W-1, 2HK + HV]`` (compute dtype; None
        without a short conv) and recurrent state ``[B, H, K, V]`` float32."""
        cfg = self.config
        return zeros_linear_state(
            batch_size, conv_width=cfg.conv_width, conv_channels=cfg.conv_channels,
            heads=cfg.heads, key_dim=cfg.head_k_dim, value_dim=cfg.head_v_dim,
            dtype=dtype_of(cfg.dtype))

    def _linear_state(self, state: Any, call: SequenceCall) -> LinearState:
        """Check the caller's state against the call; return its :class:`LinearState` part."""
        self._check_linear(state, call)
        return state

    def _check_linear(self, state: LinearState, call: SequenceCall) -> None:
        cfg = self.config
        check_linear_state(
            state, call, conv_width=cfg.conv_width, conv_channels=cfg.conv_channels,
            heads=cfg.heads, key_dim=cfg.head_k_dim, value_dim=cfg.head_v_dim)

    def _next_state(self, state: Any, linear: LinearState, call: SequenceCall, seq: int) -> Any:
        """The state to return, from the old one, the updated :class:`LinearState` and the
        call's length T."""
        return linear

    # ---- the call ------------------------------------------------------------------------
    def __call__(
        self,
        x: Array,
        *,
        state: Any = None,
        mask: Array | None = None,
        mode: KernelMode | str | None = None,
        cu_seqlens: Array | None = None,
        input_norm: RMSNorm | None = None,
    ) -> tuple[Array, Any]:
        """Run the block.

        Args:
            x: ``[B, T, D]`` float.
            state: from ``init_state`` or a previous call (batch B, or N with
                ``cu_seqlens``); None = zeros.
            mask: optional ``[B, T]`` padding mask (True = valid), any padding pattern.
            mode: CHUNK, RECURRENT or None (recurrent when ``T < mode_threshold``).
            cu_seqlens: optional ``[N+1]`` int32 offsets of ``N`` sequences packed in
                ``x`` (``B == 1``); each runs from its own state row. Not with ``mask``.
            input_norm: an :class:`RMSNorm` to apply to ``x`` first (the layer's pre-norm:
                the block then computes ``block(input_norm(x))``), or None. One token on a
                GPU runs it in the input projection's kernel (``modules.common.fused_dense``).

        Returns:
            ``(y [B, T, D] in the compute dtype, new_state)``; ``y`` is zero at pads.

        Raises:
            ValueError / TypeError: bad ``x``, ``mask``, ``cu_seqlens``, ``state`` or
                ``mode``, naming the argument.
        """
        cfg = self.config
        x, input_norm = input_norm_first(x, input_norm, dtype_of(cfg.dtype),
                                         fold=mask is None and cu_seqlens is None)
        x, call = begin_call(x, cfg.d_model, mask=mask, cu_seqlens=cu_seqlens, mode=mode,
                             mode_threshold=cfg.mode_threshold, dtype=dtype_of(cfg.dtype))
        fresh = state is None  # the op then starts from no state (its zero-state paths)
        if state is None:
            state = self.init_state(call.n_states)
        linear = self._linear_state(state, call)
        batch, seq, _ = x.shape
        h, hk, hv = cfg.heads, cfg.head_k_dim, cfg.head_v_dim

        gate_linears = self._gate_linears()
        fused = seq == 1 and gate_linears is not None and fused_decode_enabled()
        if fused and call.layout is None and call.cu_seqlens is None:
            layer = self._fused_layer(x, linear, input_norm)
            if layer is not None:  # the recurrent part in one kernel (a GPU), o_proj after
                y, new_linear = layer
                return y, self._next_state(state, new_linear, call, seq)
        if fused:  # one token: q, k, v, the gates' and the output gate's projections in one GEMV
            rest = self.decode_linears()[0]
            qkv, *rest = fused_dense(x, rest, groups=(3,) + (1,) * (len(rest) - 3),
                                     norm=input_norm)
            gate_logits = rest[:len(gate_linears)]  # [B, 1, 2HK + HV], then the gates'
            q, k, v = jnp.split(qkv, [cfg.key_dim, 2 * cfg.key_dim], axis=-1)
        if input_norm is not None:  # x's other uses (XLA drops it where none reads it)
            x = input_norm(x)
        if not fused:
            q, k, v = dense(self.q_proj, x), dense(self.k_proj, x), dense(self.v_proj, x)
        conv = linear.conv
        if self.conv is not None:
            if fused:  # one token: qkv is the fused projection's first columns already
                qkv, cache = self.conv(qkv, conv.buffer, lengths=call.lengths,
                                       cu_seqlens=call.cu_seqlens)
                q, k, v = jnp.split(qkv, [cfg.key_dim, 2 * cfg.key_dim], axis=-1)
            else:  # one conv over q | k | v, run part by part (no [B, T, 2HK + HV] concatenation)
                (q, k, v), cache = self.conv.split_call(
                    [q, k, v], conv.buffer, lengths=call.lengths, cu_seqlens=call.cu_seqlens,
                    written_backward=call.mode is KernelMode.CHUNK)  # the op has no jvp there
            conv = conv.update(cache)
        elif self.silu_without_conv:
            q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
        q = q.reshape(batch, seq, h, hk)  # [B, T, H*K] -> [B, T, H, K]
        k = k.reshape(batch, seq, h, hk)
        v = v.reshape(batch, seq, h, hv)  # [B, T, H*V] -> [B, T, H, V]
        q, k = self._prepare_qk(q, k, state, call)
        # pads write nothing (k = v = 0, beta = 0) and decay nothing (log-gate = 0): the
        # conv, biases and sigmoids make them non-zero even though begin_call zeroed x there
        k, v = inert(k, call), inert(v, call)
        gates = self._gates_from(x, gate_logits) if fused else self._gates(x)
        gates = [inert(gate, call) for gate in gates]
        o, final = type(self).op(
            q, k, v, *gates, initial_state=None if fresh else linear.recurrent.state,
            output_final_state=True,
            cu_seqlens=call.cu_seqlens, chunk_size=cfg.chunk_size, mode=call.mode,
            backend=cfg.backend)  # o: [B, T, H, V]
        if self.g_proj is not None:
            gate = rest[-1] if fused else dense(self.g_proj, x)  # [B, T, H*V]
            gate = gate.reshape(batch, seq, h, hv)  # [B, T, H*V] -> [B, T, H, V]
            o = self.norm(o, gate)
        else:
            o = self.norm(o)
        o = o.reshape(batch, seq, h * hv)  # [B, T, H, V] -> [B, T, H*V]
        y = end_call(dense(self.o_proj, o), call)
        new_linear = LinearState(conv=conv, recurrent=linear.recurrent.update(final))
        return y, self._next_state(state, new_linear, call, seq)
