"""RetNet multi-scale retention (Sun et al. 2023) on the shared GLA-family body.

"Retentive Network: A Successor to Transformer for Large Language Models" (Sun, Dong,
Huang, Ma, Xia, Xue, Wang, Wei; 2023), with the defaults of flash-linear-attention's (FLA)
``MultiScaleRetention`` layer. Data flow for ``x: [B, T, D]``, ``H`` heads, per-head
``K = D * expand_k / H`` and ``V = D * expand_v / H``::

    q, k, v = x W_q, x W_k, x W_v                 # [B, T, H*K], [B, T, H*K], [B, T, H*V]
    q, k    = rope(q, n), rope(k, n)              # n: absolute token positions
    S_t     = gamma_h S_{t-1} + k_t v_t^T         # gamma_h = 1 - 2^(-5-h), fixed per head
    o_t     = K^-1/2 q_t^T S_t                    # [B, T, H, V]
    y       = W_o (rmsnorm(o) * scale * silu(x W_g))   # per-head gated RMSNorm over V

Retention is Simple GLA with a data-independent decay, so the block is
:class:`~linearnexus.modules.linear.gla.GLAFamilyBlock` (the shared body of
``modules/linear/base.py``: projections, optional short conv, gated norm, output
projection, mask / varlen handling) with a fixed log-gate and rotary q / k. Two departures
from the paper, both FLA's: the per-head norm is an RMSNorm where the paper uses GroupNorm
(LayerNorm per head), and the rotary embedding is the standard half-split RoPE (base 10000)
where the paper's code uses an xPos-style interleaved rotation.
Initialisation as FLA's layers at the time: ``xavier_uniform(gain=2^-2.5)`` for every
projection (torchscale, the paper's code, uses gain 2^-1 for the output projection).

Because RoPE needs absolute positions across calls, the state carries a token offset per
sequence (:class:`RetNetState`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
from flax import nnx

from linearnexus.core.cache import ConvState, RecurrentState
from linearnexus.core.config import ConfigError, field
from linearnexus.core.gating import retention_log_decay
from linearnexus.core.padding import segment_ids_from_cu_seqlens
from linearnexus.core.types import Array
from linearnexus.kernels.simple_gla import simple_gla
from linearnexus.modules.common import RotaryEmbedding, math_dtype
from linearnexus.modules.linear.gla import GLAFamilyBlock, GLAFamilyConfig
from linearnexus.modules.linear.runtime import LinearState, SequenceCall

__all__ = ["RetNetBlock", "RetNetConfig", "RetNetState"]

#: with ``num_heads=None``, heads of this key size (and ``expand_v / expand_k`` times that
#: value size); FLA's 2048-wide RetNet has 8 heads of K = 256, far too wide for small models
DEFAULT_HEAD_K_DIM = 64


@dataclasses.dataclass
class RetNetConfig(GLAFamilyConfig):
    """Multi-scale retention hyper-parameters (FLA ``MultiScaleRetention`` defaults).

    Same fields as :class:`GLAFamilyConfig` with FLA's retention defaults (expand_k 1.0,
    expand_v 2.0, no short conv), plus:

    Attributes:
        num_heads: H, or None for ``max(1, key_dim // 64)`` heads (K = 64 per head when
            ``key_dim`` is a multiple of 64; FLA defaults to 8 heads at D = 2048, K = 256).
            The decays ``1 - 2^(-5-h)`` depend on H.
        rotary_base: RoPE frequency base.
    """

    num_heads: int | None = field(None, gt=0)
    expand_k: float = field(1.0, gt=0)
    expand_v: float = field(2.0, gt=0)
    rotary_base: float = field(10000.0, gt=0)

    def validate(self) -> None:
        super().validate()
        if self.head_k_dim % 2:
            raise ConfigError(f"num_heads: rotary needs an even key size per head, got "
                              f"K = {self.key_dim} / {self.heads} = {self.head_k_dim}")

    @property
    def heads(self) -> int:
        if self.num_heads is not None:
            return self.num_heads
        return max(1, self.key_dim // DEFAULT_HEAD_K_DIM)


class RetNetState(NamedTuple):
    """RetNet's decoding state (a pytree, passed in and returned).

    Attributes:
        conv: the short conv's cache ``[B, W-1, 2HK + HV]``, or None without a short conv.
        recurrent: the ``[B, H, K, V]`` retention state, float32 (float64 for float64; or
            a 16-bit decode state, ``generate.Decoder(state_dtype=...)``).
        offset: ``[B]`` int32, tokens each sequence has seen: the absolute position of its
            next token, for the rotary embedding.

    ``B`` is the number of sequences: the batch, or ``N`` with ``cu_seqlens``.
    """

    conv: ConvState | None
    recurrent: RecurrentState
    offset: Array


class RetNetBlock(GLAFamilyBlock):
    """RetNet's multi-scale retention (no norm or residual: the model wraps every block).

    Parameters as :class:`GLAFamilyBlock` (no gate parameters: the decay is fixed).
    """

    config_class = RetNetConfig
    op = staticmethod(simple_gla)

    def _build_mechanism(self, rngs: nnx.Rngs) -> None:
        cfg = self.config
        self.rotary = RotaryEmbedding(cfg.head_k_dim, base=cfg.rotary_base)

    def _gates(self, x: Array) -> tuple[Array]:
        # The retention op takes its decay as a constant and so cannot skip pads; as a
        # [B, T, H] gate fed to simple_gla it is zeroed at pads by the caller (inert), so a
        # masked call decays the state only over its valid tokens.
        decay = retention_log_decay(self.config.heads).astype(math_dtype(x.dtype))  # [H]
        return (jnp.broadcast_to(decay, (*x.shape[:2], decay.shape[0])),)  # [H] -> [B, T, H]

    def _prepare_qk(self, q: Array, k: Array, state: RetNetState,
                    call: SequenceCall) -> tuple[Array, Array]:
        """Rotate ``q, k [B, T, H, K]`` at each token's absolute position."""
        seq = q.shape[1]
        t = jnp.arange(seq, dtype=jnp.int32)
        if call.cu_seqlens is not None:
            # packed: positions restart per sequence, continuing from its own offset
            seg = segment_ids_from_cu_seqlens(call.cu_seqlens, seq)  # [T]
            positions = (state.offset[seg] + t - call.cu_seqlens[seg])[None]  # [1, T]
        else:
            # with a mask begin_call moved valid tokens to the front: aligned token i of
            # row b is that row's i-th valid token (pads get positions too, unused)
            positions = state.offset[:, None] + t[None, :]  # [B, T]
        return self.rotary(q, positions), self.rotary(k, positions)

    def init_state(self, batch_size: int) -> RetNetState:
        """Zero :class:`RetNetState` (conv cache, recurrent state, int32 offsets)."""
        linear = super().init_state(batch_size)
        return RetNetState(conv=linear.conv, recurrent=linear.recurrent,
                           offset=jnp.zeros((batch_size,), jnp.int32))

    def _linear_state(self, state: Any, call: SequenceCall) -> LinearState:
        if not isinstance(state, RetNetState):
            raise TypeError(f"state: expected a RetNetState, got {type(state).__name__}")
        offset = state.offset
        if tuple(getattr(offset, "shape", ())) != (call.n_states,):
            raise ValueError(f"state.offset: expected shape ({call.n_states},) [B], "
                             f"got {tuple(getattr(offset, 'shape', ()))}")
        if not jnp.issubdtype(offset.dtype, jnp.integer):
            raise TypeError(f"state.offset: expected an integer dtype, got {offset.dtype}")
        linear = LinearState(conv=state.conv, recurrent=state.recurrent)
        self._check_linear(linear, call)
        return linear

    def _next_state(self, state: RetNetState, linear: LinearState, call: SequenceCall,
                    seq: int) -> RetNetState:
        if call.cu_seqlens is not None:
            seen = jnp.diff(call.cu_seqlens)  # [N] tokens per packed sequence
        elif call.lengths is not None:
            seen = call.lengths  # [B] valid tokens per row
        else:
            seen = seq
        return RetNetState(conv=linear.conv, recurrent=linear.recurrent,
                           offset=(state.offset + seen).astype(jnp.int32))
