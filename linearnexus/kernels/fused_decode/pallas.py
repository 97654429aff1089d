"""A whole recurrent layer's one-token step in one Pallas (Triton) kernel, per head.

Between a layer's input projection (one matmul, ``modules.common.fused_dense``) and its
output projection, a decode step of a DeltaNet / Gated DeltaNet or Mamba2 block is a
chain of small per-head operations: the short conv and its rolling cache, silu, the L2
norm of q and k, the gate nonlinearities, the state update (with the input guard), and the
output norm and gate. Run by XLA that is a dozen kernels of a few microseconds each; here
it is one launch with grid ``(B, H)``: program ``(b, h)`` reads head h's columns of the
projection row, its conv channels' cache (and rewrites it shifted), its ``[K, V]`` state
(once, in place) and writes its share of the output. Values are rounded to the compute
dtype exactly where the unfused path rounds them (the conv output, the normalised q and k,
the op's output), so the two paths agree to float32 rounding.

* :func:`delta_layer` (DeltaNet, Gated DeltaNet): writes ``norm(o) * scale * silu(gate)``
  (or ``norm(o) * scale``), the input of ``o_proj``. Each head's q, k and v conv channels
  are its own, so the conv cache is updated in place.
* :func:`ssd_layer` (Mamba2): writes ``y * silu(z)`` in float32 (the gated norm's input:
  the norm spans a group of heads, which one program cannot see). Heads of a group share
  the B and C channels, so the conv cache is written to a new buffer (every head of the
  group writes the same values), never in place: in place, one head's write could land
  before another head's read.

Head sizes must be powers of two (the Triton block shapes) with ``K * V <= MAX_TILE``;
:mod:`.api` checks that and the callers fall back to the unfused path otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas import compiler_params, interpret_mode, named_pallas_call
from linearnexus.kernels.common.pallas_step import guarded_update

F32 = jnp.float32
#: largest state tile per program (float32 elements): 16384 is 128 registers a thread at 4 warps
MAX_TILE = 16384


@dataclasses.dataclass(frozen=True)
class DeltaLayerSpec:
    """What is static in a DeltaNet-family layer's one-token step.

    Attributes:
        heads, key_dim, value_dim: H, K, V.
        conv_width: the short conv's W (>= 2), or None without a short conv.
        silu_without_conv: silu q, k and v when there is no short conv.
        gated: a decay ``g = -exp(A_log) softplus(a + dt_bias)`` (Gated DeltaNet) or none.
        output_gate: ``norm(o) * scale * silu(gate)`` (True) or ``norm(o) * scale``.
        allow_neg_eigval: ``beta = 2 sigmoid(b)``.
        qk_eps, norm_eps: epsilons of the L2 norm and of the output RMSNorm.
        scale: multiplies q (``K ** -0.5``).
        norm_out: write the output norm and gate (True), or the op's output ``o`` and leave
            them to ``o_proj``'s kernel (``gemv.one_row_group_norm``).
        value_blocks: programs per head, each ``V / value_blocks`` columns of the state
            (more programs for batch-1 decoding); above 1 needs ``norm_out=False`` (the
            norm spans V) and no conv (each head's q and k channels would be shifted by
            several programs).

    The projection row ``proj [B, F]`` holds, in order: q, k, v (``2HK + HV``), the beta
    logits (H), with ``gated`` the decay logits (H), with ``output_gate`` the gate (HV).
    """

    heads: int
    key_dim: int
    value_dim: int
    conv_width: int | None
    silu_without_conv: bool
    gated: bool
    output_gate: bool
    allow_neg_eigval: bool
    qk_eps: float
    norm_eps: float
    scale: float
    norm_out: bool = True
    value_blocks: int = 1

    @property
    def gate_offset(self) -> int:
        """Where the output gate starts in the projection row."""
        return self.qkv_width + self.heads * (2 if self.gated else 1)

    @property
    def qkv_width(self) -> int:
        return self.heads * (2 * self.key_dim + self.value_dim)

    @property
    def width(self) -> int:
        """F, the projection row's width."""
        return (self.qkv_width + self.heads * (2 if self.gated else 1)
                + (self.heads * self.value_dim if self.output_gate else 0))


@dataclasses.dataclass(frozen=True)
class SsdLayerSpec:
    """What is static in a Mamba2 layer's one-token step.

    Attributes:
        heads, head_dim, groups, d_state: H, P, G, N (``E = H P`` inner channels).
        conv_width: the conv's W (>= 2), or None when the projection row arrives with the
            conv (and its silu) applied already (``gemv.one_row_conv``).
        d_per_channel: ``D`` is ``[H, P]`` (else ``[H]``).
        dt_limit: ``(low, high)`` clamp of the step size, or None.
        value_blocks: programs per head, each ``P / value_blocks`` columns of the state
            (more, smaller tiles; each program convolves its head's whole x for the
            input guard's check, writing only its own channels of the cache).

    The projection row ``proj [B, F]`` holds z (E), x, B, C (``E + 2GN``, the conv's
    channels) and the raw step sizes (H).
    """

    heads: int
    head_dim: int
    groups: int
    d_state: int
    conv_width: int | None
    d_per_channel: bool
    dt_limit: tuple[float, float] | None
    value_blocks: int = 1

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        return self.inner + 2 * self.groups * self.d_state

    @property
    def width(self) -> int:
        return self.inner + self.conv_channels + self.heads


def _rounder(dtype):
    """``x -> x`` rounded to ``dtype`` and back to float32: where the unfused path stores
    an intermediate in the compute dtype, the kernel rounds it the same way."""
    if jnp.dtype(dtype) == jnp.dtype(F32):
        return lambda x: x
    return lambda x: x.astype(dtype).astype(F32)


def _sigmoid(x: Array) -> Array:
    return 1.0 / (1.0 + jnp.exp(-x))


def _softplus(x: Array) -> Array:
    """``log(1 + exp(x))`` without overflow (``jax.nn.softplus`` lowers through
    ``logaddexp``, whose ``isnan`` branch Triton does not need)."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _conv_channels(proj_ref, cache_ref, w_ref, bias_ref, new_cache_ref, *, b, proj_at, cache_at,
                   size, width, write: bool = True):
    """One span of conv channels for row ``b``: ``silu(bias + sum_w w[w] * window[w])`` in
    float32, and (with ``write``) the span's cache rows shifted by one token (written to
    ``new_cache_ref``). ``proj_at`` / ``cache_at``: where the span starts in the projection
    row / the cache."""
    x = proj_ref[b, pl.ds(proj_at, size)].astype(F32)  # [S]
    span = pl.ds(cache_at, size)
    window = [cache_ref[b, i, span].astype(F32) for i in range(width - 1)] + [x]
    acc = bias_ref[span].astype(F32) if bias_ref is not None else jnp.zeros((size,), F32)
    for i, value in enumerate(window):  # W is 2..4: unrolled multiply-adds
        acc = acc + w_ref[i, span].astype(F32) * value
    for i in range(width - 1 if write else 0):  # no program reads new_cache_ref's channels
        new_cache_ref[b, i, span] = window[i + 1].astype(new_cache_ref.dtype)
    return acc * _sigmoid(acc)


def _delta_kernel(*, proj_ref, cache_ref, w_ref, bias_ref, h0_ref, a_log_ref, dt_bias_ref,
                  scale_ref, y_ref, new_cache_ref, final_ref, sp: DeltaLayerSpec,
                  ids: tuple[Array, Array, Array] | None = None):
    """Program ``(b, h, vb)``: row b, head h, value block vb (``ids``, given by a kernel
    that runs this one's programs itself, ``persistent.py``; default the program ids)."""
    b, h, vb = ids or (pl.program_id(0), pl.program_id(1), pl.program_id(2))
    nh, kd, vd = sp.heads, sp.key_dim, sp.value_dim
    bv = vd // sp.value_blocks
    rnd = _rounder(proj_ref.dtype)

    def qkv(offset, size):  # one head's q, k or v channels, after the conv (or silu)
        if sp.conv_width is not None:
            return rnd(_conv_channels(proj_ref, cache_ref, w_ref, bias_ref, new_cache_ref, b=b,
                                      proj_at=offset, cache_at=offset, size=size,
                                      width=sp.conv_width))
        x = proj_ref[b, pl.ds(offset, size)].astype(F32)
        # one rounding, as XLA:GPU's fused silu (XLA:CPU rounds its bf16 sigmoid per op)
        return rnd(x * _sigmoid(x)) if sp.silu_without_conv else x

    def l2(x):
        return rnd(x * jax.lax.rsqrt(jnp.sum(x * x) + sp.qk_eps))

    q = l2(qkv(h * kd, kd))  # [K]
    k = l2(qkv(nh * kd + h * kd, kd))
    v_full = qkv(2 * nh * kd + h * vd, vd)  # [V]: the whole head, for the guard's check
    v = v_full if sp.value_blocks == 1 else qkv(2 * nh * kd + h * vd + vb * bv, bv)  # [BV]
    at = sp.qkv_width
    beta = _sigmoid(proj_ref[b, pl.ds(at + h, 1)].astype(F32))  # [1]
    if sp.allow_neg_eigval:
        beta = 2.0 * beta
    g = None
    if sp.gated:
        a = proj_ref[b, pl.ds(at + nh + h, 1)].astype(F32) + dt_bias_ref[pl.ds(h, 1)].astype(F32)
        g = -jnp.exp(a_log_ref[pl.ds(h, 1)].astype(F32)) * _softplus(a)  # [1], <= 0
    cols = pl.ds(vb * bv, bv)
    s = h0_ref[b, h, :, cols].astype(F32)  # [K, BV]
    o, s = guarded_update(q, k, v, g, beta, s, delta=True, scale=sp.scale, guard=True,
                          v_full=None if sp.value_blocks == 1 else v_full)
    final_ref[b, h, :, cols] = s.astype(final_ref.dtype)  # the state's dtype (float32 or 16-bit)
    o = rnd(o)  # the op's output, in the compute dtype
    if not sp.norm_out:  # o_proj's kernel normalises and gates
        y_ref[b, pl.ds(h * vd + vb * bv, bv)] = o.astype(y_ref.dtype)
        return
    y = o * jax.lax.rsqrt(jnp.mean(o * o) + sp.norm_eps) * scale_ref[...].astype(F32)
    if sp.output_gate:
        gate = proj_ref[b, pl.ds(at + (2 if sp.gated else 1) * nh + h * vd, vd)].astype(F32)
        y = y * (gate * _sigmoid(gate))
    y_ref[b, pl.ds(h * vd, vd)] = y.astype(y_ref.dtype)


def _ssd_kernel(*, proj_ref, cache_ref, w_ref, bias_ref, h0_ref, a_log_ref, dt_bias_ref, d_ref,
                y_ref, new_cache_ref, final_ref, sp: SsdLayerSpec,
                ids: tuple[Array, ...] | None = None):
    """Program ``(b, h, vb)``: row b, head h, value block vb of ``sp.value_blocks`` (``ids``,
    given by a kernel that runs this one's programs itself, ``persistent.py``: ``(b, h)``
    with one block; default the program ids)."""
    b, h, vb = (tuple(ids) + (0,))[:3] if ids else (pl.program_id(0), pl.program_id(1),
                                                    pl.program_id(2))
    e, p, n = sp.inner, sp.head_dim, sp.d_state
    bp = p // sp.value_blocks
    group = h // (sp.heads // sp.groups)
    rnd = _rounder(proj_ref.dtype)

    def conv(channel, size, write=True):  # conv channel offset within x | B | C
        if sp.conv_width is None:  # the row holds the conv's output already
            return proj_ref[b, pl.ds(e + channel, size)].astype(F32)
        return rnd(_conv_channels(proj_ref, cache_ref, w_ref, bias_ref, new_cache_ref, b=b,
                                  proj_at=e + channel, cache_at=channel, size=size,
                                  width=sp.conv_width, write=write))

    if sp.value_blocks == 1:
        x = x_full = conv(h * p, p)  # [P]
    else:  # the block's channels, and the whole head's for the guard's check
        x_full = conv(h * p, p, write=False)  # [P]
        x = conv(h * p + vb * bp, bp)  # [BP]
    k = conv(e + group * n, n)  # B: [N]
    q = conv(e + sp.groups * n + group * n, n)  # C: [N]
    dt = _softplus(proj_ref[b, pl.ds(e + sp.conv_channels + h, 1)].astype(F32)
                   + dt_bias_ref[pl.ds(h, 1)].astype(F32))  # [1]
    if sp.dt_limit is not None:
        dt = jnp.clip(dt, *sp.dt_limit)
    g = dt * -jnp.exp(a_log_ref[pl.ds(h, 1)].astype(F32))  # [1]
    cols = pl.ds(vb * bp, bp)
    s = h0_ref[b, h, :, cols].astype(F32)  # [N, BP]
    y, s = guarded_update(q, k, x * dt, g, None, s, delta=False, scale=1.0, guard=True,
                          v_full=None if sp.value_blocks == 1 else x_full * dt)
    final_ref[b, h, :, cols] = s.astype(final_ref.dtype)
    skip = d_ref[h, cols] if sp.d_per_channel else d_ref[pl.ds(h, 1)]  # [BP] or [1]
    y = rnd(y + x * skip.astype(F32))  # ssd's output, in the compute dtype
    z = proj_ref[b, pl.ds(h * p + vb * bp, bp)].astype(F32)
    y_ref[b, pl.ds(h * p + vb * bp, bp)] = y * (z * _sigmoid(z))


#: grids of at most this many programs (batch x heads x value blocks) launch with 2 warps
#: whatever their tiles: on an H100, batch 1, the GDN layer kernel (16 programs, [64, 128]
#: tiles) took 4.8 us at 2 warps and 5.8 at 4, Mamba2's (32 programs, [64, 64]) 2.4 and 5.3
#: us (benchmarks/decode_parts_gpu.py)
FEW_PROGRAMS = 128
#: tiles of at most this many state elements launch with 2 warps in any grid: on an H100 at
#: batch 64 (2048 Mamba2 programs of [64, 64], 1024 GDN programs of [64, 128]) 2 warps took
#: the decode step from 0.712 to 0.617 ms (Mamba2) and 0.942 to 0.831 (GDN) against 4; 1
#: warp 0.625 / 0.996, 8 warps 0.770 (docs/benchmarks.md, "The layer kernels' warps")
TWO_WARP_TILE = 8192


#: an explicit warp count for every layer kernel (read when a step is traced; 1, 2, 4 or 8):
#: how the choice of :func:`layer_warps` is measured against others (decode_step_ab_gpu.sh)
WARPS_ENV = "LINEARNEXUS_LAYER_WARPS"


def layer_warps(programs: int, tile: int) -> int:
    """Warps per program of a layer kernel with ``programs`` programs of ``tile`` state
    elements: 2 for a grid that leaves most SMs idle (batch-1 decoding) or tiles of at most
    :data:`TWO_WARP_TILE` elements (measured faster at both batch 1 and 64); else 4 (larger
    tiles in 2 warps would hold over 128 state values a thread). :data:`WARPS_ENV`
    overrides it."""
    forced = os.environ.get(WARPS_ENV, "")
    if forced:
        if forced not in ("1", "2", "4", "8"):
            raise ValueError(f"{WARPS_ENV}: expected 1, 2, 4 or 8, got {forced!r}")
        return int(forced)
    return 2 if programs <= FEW_PROGRAMS or tile <= TWO_WARP_TILE else 4


#: programs per head for the Mamba2 layer kernel (read when a step is traced; 1, 2 or 4,
#: clipped to what P allows): how :func:`ssd_value_blocks`'s choice is measured against
#: others (benchmarks/layer_b64_gpu.py, decode_step_ab_gpu.sh)
SSD_BLOCKS_ENV = "LINEARNEXUS_SSD_VALUE_BLOCKS"


def ssd_value_blocks(head_dim: int) -> int:
    """Programs per head for the Mamba2 layer kernel: 1 (one ``[N, P]`` tile a program),
    or what :data:`SSD_BLOCKS_ENV` names where ``P`` splits into power-of-two blocks of at
    least 16 columns.

    Raises:
        ValueError: an override that is not 1, 2 or 4.
    """
    forced = os.environ.get(SSD_BLOCKS_ENV, "")
    if not forced:
        return 1
    if forced not in ("1", "2", "4"):
        raise ValueError(f"{SSD_BLOCKS_ENV}: expected 1, 2 or 4, got {forced!r}")
    blocks = int(forced)
    while blocks > 1 and (head_dim % blocks or head_dim // blocks < 16
                          or (head_dim // blocks) & (head_dim // blocks - 1)):
        blocks //= 2
    return blocks


def _launch(kernel, sp, inputs, outputs, *, aliases, heads, tile, name, blocks=1):
    batch = inputs["proj"].shape[0]
    interpret = interpret_mode()
    return named_pallas_call(
        functools.partial(kernel, sp=sp), inputs=inputs, outputs=outputs, aliases=aliases,
        grid=(batch, heads, blocks), interpret=interpret,
        compiler_params=None if interpret else compiler_params(
            layer_warps(batch * heads * blocks, tile // blocks), 1), name=name)


def delta_layer(sp: DeltaLayerSpec, proj: Array, conv_cache: Array | None,
                conv_weight: Array | None, conv_bias: Array | None, state: Array,
                a_log: Array | None, dt_bias: Array | None,
                norm_scale: Array) -> tuple[Array, Array | None, Array]:
    """The kernel (shapes checked by :func:`..api.delta_layer_step`); returns
    ``(y [B, HV] in proj's dtype (``o`` without ``sp.norm_out``), new_cache or None,
    final [B, H, K, V] in the state's dtype)``."""
    batch = proj.shape[0]
    out = _launch(
        _delta_kernel, sp,
        {"proj": proj, "cache": conv_cache, "w": conv_weight, "bias": conv_bias, "h0": state,
         "a_log": a_log, "dt_bias": dt_bias, "scale": norm_scale},
        {"y": jax.ShapeDtypeStruct((batch, sp.heads * sp.value_dim), proj.dtype),
         "new_cache": None if conv_cache is None else jax.ShapeDtypeStruct(
             conv_cache.shape, conv_cache.dtype),
         "final": jax.ShapeDtypeStruct(state.shape, state.dtype)},
        aliases={"h0": "final", **({"cache": "new_cache"} if conv_cache is not None else {})},
        heads=sp.heads, tile=sp.key_dim * sp.value_dim, blocks=sp.value_blocks,
        name=f"{'gated_' if sp.gated else ''}delta_layer_step")
    return out["y"], out["new_cache"], out["final"]


def ssd_layer(sp: SsdLayerSpec, proj: Array, conv_cache: Array | None,
              conv_weight: Array | None, conv_bias: Array | None, state: Array,
              a_log: Array, dt_bias: Array, d: Array) -> tuple[Array, Array | None, Array]:
    """The kernel (shapes checked by :func:`..api.ssd_layer_step`); returns
    ``(y * silu(z) [B, E] float32, new_cache or None, final [B, H, N, P] in the state's
    dtype)``."""
    batch = proj.shape[0]
    out = _launch(
        _ssd_kernel, sp,
        {"proj": proj, "cache": conv_cache, "w": conv_weight, "bias": conv_bias, "h0": state,
         "a_log": a_log, "dt_bias": dt_bias, "d": d},
        {"y": jax.ShapeDtypeStruct((batch, sp.inner), F32),
         "new_cache": None if conv_cache is None else jax.ShapeDtypeStruct(
             conv_cache.shape, conv_cache.dtype),
         "final": jax.ShapeDtypeStruct(state.shape, state.dtype)},
        aliases={"h0": "final"}, heads=sp.heads, tile=sp.d_state * sp.head_dim,
        blocks=sp.value_blocks, name="ssd_layer_step")
    return out["y"], out["new_cache"], out["final"]
