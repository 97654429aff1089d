"""Mamba-1 mixer block (Gu & Dao 2023), paper-faithful, on the shared block protocol.

Data flow for ``x: [B, T, D]`` with ``C = expand * D`` inner channels::

    (xi, z) = in_proj(x)                          # [B, T, 2C] -> 2 x [B, T, C]
    u       = silu(causal_depthwise_conv(xi))     # kernel d_conv, cache of d_conv-1 inputs
    (dr, Bt, Ct) = x_proj(u)                      # [B, T, R + 2N], R = ceil(D / 16)
    dt      = softplus(dt_proj(dr))               # [B, T, C], bias init: softplus(b) ~ logU[1e-3, 0.1]
    y       = selective_scan(u, dt, A=-exp(A_log), Bt, Ct, D) * silu(z)
    out     = out_proj(y)                         # [B, T, D]

The block's state is the conv cache and the ``[B, C, N]`` scan state, passed in and returned.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from linearnexus.core.cache import ConvState, RecurrentState
from linearnexus.core.config import ConfigError, field
from linearnexus.core.conv import depthwise_conv1d
from linearnexus.core.gating import sample_dt_bias
from linearnexus.core.mode import KernelMode
from linearnexus.core.types import Array, state_dtype
from linearnexus.kernels.mamba import selective_scan
from linearnexus.modules.base import (
    KERNEL_BACKENDS,
    BlockConfig,
    check_state_batch,
    dtype_of,
    op_backend,
)
from linearnexus.modules.common import dense
from linearnexus.modules.linear.runtime import begin_call, end_call, inert


@dataclasses.dataclass
class MambaConfig(BlockConfig):
    """Mamba-1 mixer hyper-parameters (paper defaults).

    Attributes:
        d_state: SSM state size N per channel.
        d_conv: width of the causal depthwise conv.
        expand: inner width C = expand * d_model.
        dt_rank: rank R of the dt projection; None means ceil(d_model / 16) as in the paper.
        dt_min, dt_max: softplus(dt bias) is initialised log-uniform in [dt_min, dt_max].
        dt_init_floor: lower clamp of that initial dt.
        dt_scale: scales the dt_proj weight init std (``dt_rank ** -0.5 * dt_scale``).
        conv_bias / bias: bias on the conv / on in_proj and out_proj.
        chunk_size: tokens per chunk in chunk mode (16 measured fastest on CPU).
        mode_threshold: calls with T < this run in recurrent mode when ``mode=None``.
        kernel_backend: "auto" (best available: "pallas" on a GPU, else "jax"), "jax"
            (pure JAX), "naive" (per-step reference, slow) or "pallas" (Triton kernels on a
            GPU; Pallas interpret mode elsewhere, slow).
    """

    d_state: int = field(16, gt=0)
    d_conv: int = field(4, gt=0)
    expand: int = field(2, gt=0)
    dt_rank: int | None = field(None, gt=0)
    dt_min: float = field(1e-3, gt=0)
    dt_max: float = field(0.1, gt=0)
    dt_init_floor: float = field(1e-4, gt=0)
    dt_scale: float = field(1.0, gt=0)
    conv_bias: bool = True
    bias: bool = False
    chunk_size: int = field(16, gt=0)
    mode_threshold: int = field(64, gt=0)
    kernel_backend: str = field("auto", choices=KERNEL_BACKENDS)

    def validate(self) -> None:
        if self.dt_min > self.dt_max:
            raise ConfigError(f"dt_min: must be <= dt_max ({self.dt_max}), got {self.dt_min}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

    @classmethod
    def tiny(cls, d_model: int = 16, **overrides: Any) -> MambaConfig:
        return cls.from_dict({"d_model": d_model, "d_state": 4, "chunk_size": 8, **overrides})


class MambaState(NamedTuple):
    """Per-block decoding state.

    Attributes:
        conv: the last ``d_conv - 1`` conv inputs, ``[B, d_conv-1, C]``.
        ssm: the scan state, ``[B, C, N]`` float32 (or a 16-bit decode state,
            ``generate.Decoder(state_dtype=...)``).
    """

    conv: ConvState
    ssm: RecurrentState


class MambaBlock(nnx.Module):
    """The Mamba-1 mixer (no norm or residual: the model wraps every block alike)."""

    #: the mechanism this block runs (its op in OP_REGISTRY; the README's feature table reads it)
    op = staticmethod(selective_scan)

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs) -> None:
        if not isinstance(config, MambaConfig):
            raise TypeError(f"config: expected MambaConfig, got {type(config).__name__}")
        self.config = config
        cfg = config
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        c, n, r = cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
        linear = dict(dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.in_proj = nnx.Linear(cfg.d_model, 2 * c, use_bias=cfg.bias, **linear)
        # PyTorch Conv1d default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = d_conv
        bound = 1.0 / math.sqrt(cfg.d_conv)
        self.conv_weight = nnx.Param(
            jax.random.uniform(rngs.params(), (cfg.d_conv, c), pdtype, -bound, bound))
        self.conv_bias = (nnx.Param(jax.random.uniform(rngs.params(), (c,), pdtype, -bound, bound))
                          if cfg.conv_bias else None)
        self.x_proj = nnx.Linear(c, r + 2 * n, use_bias=False, **linear)
        std = r ** -0.5 * cfg.dt_scale
        self.dt_proj = nnx.Linear(
            r, c, use_bias=True,
            kernel_init=lambda key, shape, dt: jax.random.uniform(key, shape, dt, -std, std),
            bias_init=lambda key, shape, dt: sample_dt_bias(
                key, shape, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, dt),
            **linear)
        # S4D-real: A[c, n] = -(n + 1)
        self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(
            jnp.arange(1, n + 1, dtype=jnp.float32), (c, n))).astype(pdtype))
        self.D = nnx.Param(jnp.ones((c,), pdtype))
        self.out_proj = nnx.Linear(c, cfg.d_model, use_bias=cfg.bias, **linear)

    def init_state(self, batch_size: int) -> MambaState:
        """Zero conv cache ``[B, d_conv-1, C]`` (compute dtype) and scan state ``[B, C, N]``."""
        cfg = self.config
        dtype = dtype_of(cfg.dtype)
        sdtype = state_dtype(dtype)
        return MambaState(
            conv=ConvState.zeros(batch_size, cfg.d_conv, cfg.d_inner, dtype),
            ssm=RecurrentState.zeros(batch_size, cfg.d_inner, cfg.d_state, dtype=sdtype),
        )

    def __call__(
        self,
        x: Array,
        *,
        state: MambaState | None = None,
        mask: Array | None = None,
        mode: KernelMode | str | None = None,
        cu_seqlens: Array | None = None,
    ) -> tuple[Array, MambaState]:
        """Run the mixer.

        Args:
            x: ``[B, T, D]`` float.
            state: a :class:`MambaState` from ``init_state`` or a previous call; None = zeros.
                Its batch is B, or N with ``cu_seqlens``.
            mask: optional ``[B, T]`` padding mask (True = valid), any padding pattern.
            mode: CHUNK, RECURRENT or None (recurrent when ``T < mode_threshold``).
            cu_seqlens: optional ``[N+1]`` int offsets: ``x`` (``B == 1``) packs N sequences,
                each run from its own state (conv cache and scan state). Not together with
                ``mask``.

        Returns:
            ``(y [B, T, D], new_state)``; ``y`` is zero at padded positions.

        Raises:
            ValueError / TypeError: bad ``x``, ``mask``, ``cu_seqlens``, ``state`` or ``mode``.
        """
        cfg = self.config
        # with a mask, valid tokens move to the front (pads zeroed): pads can then touch
        # neither conv cache nor state; the conv reads only the first n_valid inputs of each row
        x, call = begin_call(x, cfg.d_model, mask=mask, cu_seqlens=cu_seqlens, mode=mode,
                             mode_threshold=cfg.mode_threshold, dtype=dtype_of(cfg.dtype))
        n_states = call.n_states
        fresh = state is None  # the scan then starts from no state (its zero-state paths)
        if state is None:
            state = self.init_state(n_states)
        elif not isinstance(state, MambaState):
            raise TypeError(f"state: expected a MambaState, got {type(state).__name__}")
        else:
            check_state_batch("state.conv", state.conv.buffer,
                              (n_states, cfg.d_conv - 1, cfg.d_inner))
            check_state_batch("state.ssm", state.ssm.state, (n_states, cfg.d_inner, cfg.d_state))

        xi, z = jnp.split(dense(self.in_proj, x), 2, axis=-1)  # [B, T, 2C] -> 2 x [B, T, C]
        xi = inert(xi, call)  # in_proj's bias would make pads non-zero
        conv_w = self.conv_weight[...]
        conv_b = None if self.conv_bias is None else self.conv_bias[...]
        if xi.shape[1] == 1 and call.lengths is None and call.cu_seqlens is None and cfg.d_conv >= 2:
            from linearnexus.kernels.conv import conv_step  # decoding: one fused kernel on a GPU

            u, conv_cache = conv_step(xi, state.conv.buffer, conv_w, conv_b, activation="silu")
            u = u.astype(x.dtype)
        else:  # packed: each sequence convolved alone, from its own cache
            u, conv_cache = depthwise_conv1d(xi, conv_w, conv_b, state.conv.buffer,
                                             lengths=call.lengths, cu_seqlens=call.cu_seqlens)
            u = jax.nn.silu(u).astype(x.dtype)

        r, n = cfg.resolved_dt_rank, cfg.d_state
        x_dbl = dense(self.x_proj, u)  # [B, T, R + 2N]
        dt_in, b_t, c_t = jnp.split(x_dbl, [r, r + n], axis=-1)
        # gates in at least float32 (float64 when the block computes in float64)
        gate_dtype = jnp.promote_types(x.dtype, jnp.float32)
        dt = jax.nn.softplus(dense(self.dt_proj, dt_in).astype(gate_dtype))  # [B, T, C]
        dt = inert(dt, call)  # dt = 0: state passes through pads
        A = -jnp.exp(self.A_log[...].astype(gate_dtype))  # [C, N]
        y, ssm_state = selective_scan(
            u, dt, A, b_t, c_t, D=self.D[...], z=z,
            initial_state=None if fresh else state.ssm.state, output_final_state=True,
            cu_seqlens=call.cu_seqlens,
            chunk_size=cfg.chunk_size, mode=call.mode, backend=op_backend(cfg.kernel_backend))
        out = end_call(dense(self.out_proj, y), call)
        new_state = MambaState(conv=state.conv.update(conv_cache), ssm=state.ssm.update(ssm_state))
        return out, new_state
