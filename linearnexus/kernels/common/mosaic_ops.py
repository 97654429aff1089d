"""The ``mosaic`` backend of the chunked linear-attention ops (Hopper, sm_90+).

Layout glue around ``mosaic_chunk.py``'s kernel, shared with the Triton ``pallas`` backend
(``pallas_ops.py``): batch inputs padded to whole chunks, head dims zero-padded. A call the
Mosaic kernel does not cover raises ``NotImplementedError`` here, before any work, so
automatic dispatch moves on to the Triton kernels (``pallas``), which run everything:

* not an NVIDIA GPU of compute capability 9.0 or newer (Ampere keeps the Triton kernels);
* an installed JAX whose Mosaic GPU lacks an API the kernel uses
  (:func:`~linearnexus.kernels.common.mosaic_chunk.mosaic_unavailable_reason`);
* float32 inputs (wgmma rounds float32 operands to TF32), key dims above 128, chunk sizes
  other than 64 / 128 (64 only for the delta rules).

Packed sequences (``cu_seqlens``, B = 1) run on the same kernels (``LINEARNEXUS_MOSAIC_PACKED=0``,
:data:`PACKED_ENV`, sends them to ``pallas``): the layout starts every
sequence on a fresh chunk (``chunking.plan_chunks``), and the kernels read each chunk's
sequence and open / close flags (``pallas_chunk.chunk_layout_info``) to load a sequence's
initial state (the backward: its final state's gradient) at the chunk that opens (closes)
it and to store its final state (``dh0``) there.

The delta rules (``delta_rule_mosaic``: Triton WY preparation, Mosaic GPU walk, Triton
or Mosaic GPU backward) carry an ``opt_in`` (``mosaic_delta.delta_opted_in``): automatic
dispatch takes them (faster than pallas in LM training) unless ``LINEARNEXUS_MOSAIC_GDN=0``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array, DType
from linearnexus.kernels.common import mosaic_bwd
from linearnexus.kernels.common.chunking import plan_chunks
from linearnexus.kernels.common.mosaic_chunk import (
    HOPPER_SMS,
    MOSAIC_DTYPES,
    SMEM_LIMIT,
    MosaicConfig,
    MosaicStatic,
    default_mosaic_config,
    env_switch,
    mosaic_backward_fits,
    mosaic_core,
    mosaic_unavailable_reason,
    small_grid,
    smem_bytes,
)
from linearnexus.kernels.common.pallas import TritonConfig, next_pow2
from linearnexus.kernels.common.pallas_chunk import (
    CoreStatic,
    chunk_layout_info,
    in_chunk_cumsum,
    segment_blocks,
    segment_states,
)
from linearnexus.kernels.common.pallas_ops import (
    PallasKernel,
    _layout,
    _pad_last,
    _resolve,
    _static,
    _unlayout,
    floor_log_gate,
)
from linearnexus.kernels.common.pallas_step import StepSpec

F32 = jnp.float32


def compute_capability() -> tuple[int, int] | None:
    """``(major, minor)`` of the first device when it is an NVIDIA GPU, else None."""
    device = jax.devices()[0]
    cc = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not cc:
        return None
    major, minor = (int(x) for x in str(cc).split(".")[:2])
    return major, minor


def mosaic_dtype(q: Array, k: Array, v: Array) -> Any:
    """The dtype the kernels compute in: q and k's when both are 16-bit, with ``v`` rounded
    to it, else ``result_type(q, k, v)``. A float32 ``v`` beside 16-bit q, k is what ssd
    passes (``v = dt * x``, bf16 x times float32 dt); wgmma takes 16-bit operands, so the
    kernel rounds it as it rounds everything it multiplies (the output keeps ``v``'s dtype).
    Without this, a bf16 Mamba2 would never reach these kernels."""
    qk = jnp.result_type(q.dtype, k.dtype)
    return qk if jnp.dtype(qk) in MOSAIC_DTYPES else jnp.result_type(q.dtype, k.dtype, v.dtype)


#: "0" keeps packed sequences (``cu_seqlens``) off the Mosaic kernels: they then raise
#: ``NotImplementedError`` and automatic dispatch runs them on ``pallas`` (the Triton kernels)
PACKED_ENV = "LINEARNEXUS_MOSAIC_PACKED"
#: packed sequences run on the Mosaic kernels unless :data:`PACKED_ENV` is "0": checked on an
#: H100 (``kernels_gpu.py`` packed rows, 2026-12-05) for simple_gla and both delta rules, and
#: through the delta rules' Mosaic backward; not yet timed against ``pallas``
PACKED_ON_BY_DEFAULT = True


def packed_enabled() -> bool:
    """Whether packed sequences run on the Mosaic kernels (:data:`PACKED_ENV`)."""
    return env_switch(PACKED_ENV, PACKED_ON_BY_DEFAULT)


def check_mosaic_call(q: Array, k: Array, v: Array, *, chunk: int, cu_seqlens: Array | None,
                      check_device: bool = True) -> None:
    """Raise ``NotImplementedError`` naming what the Mosaic kernel does not cover
    (``check_device`` False skips the GPU check: lowering for CUDA on a CPU machine)."""
    cc = compute_capability() if check_device else (9, 0)
    if cc is None or cc < (9, 0):
        raise NotImplementedError(
            f"mosaic backend: needs an NVIDIA GPU of compute capability >= 9.0 (Hopper), found "
            f"{'no GPU' if cc is None else f'sm_{cc[0]}{cc[1]}'}; the pallas (Triton) kernels "
            f"run Ampere")
    reason = mosaic_unavailable_reason()
    if reason is not None:
        raise NotImplementedError(f"mosaic backend: {reason}; the pallas (Triton) kernels run it")
    dtype = mosaic_dtype(q, k, v)
    if jnp.dtype(dtype) not in MOSAIC_DTYPES:
        raise NotImplementedError(
            f"mosaic backend: takes bfloat16 / float16 inputs, got {dtype} (wgmma rounds float32 "
            f"operands to TF32); the pallas backend runs float32")
    if cu_seqlens is not None and not packed_enabled():
        raise NotImplementedError(
            f"mosaic backend: packed sequences (cu_seqlens) are kept off the Mosaic kernels "
            f"({PACKED_ENV}=0); the pallas backend runs them")
    if next_pow2(q.shape[3], minimum=64) > 128:
        raise NotImplementedError(f"mosaic backend: key dim {q.shape[3]} > 128 (the [K, BV] "
                                  "float32 state must fit one warpgroup's registers)")
    if chunk not in (64, 128):
        raise NotImplementedError(f"mosaic backend: chunk_size {chunk} (64 or 128 only)")


def linear_attention_mosaic(q: Array, k: Array, v: Array, g: Array | None, *, scale: float,
                            initial_state: Array | None = None, cu_seqlens: Array | None = None,
                            chunk_size: int | None = None,
                            config: MosaicConfig | None = None,
                            check_device: bool = True) -> tuple[Array, Array]:
    """Gated linear attention with a scalar gate (simple_gla) through the Mosaic GPU kernel.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]`` (bfloat16 / float16).
        g: ``[B, T, H]`` log-gates or None. scale: multiplies q.
        initial_state: ``[N, H, K, V]`` or None (N = B, or the packed sequences).
        cu_seqlens: ``[N+1]`` offsets of packed sequences (B == 1), or None.
        chunk_size: L (64 or 128); ``config.chunk`` wins; default 64.
        config: tile / pipeline overrides (:class:`MosaicConfig`); None fields: heuristic.
            ``seq_split`` (None: :func:`default_seq_split`) cuts batch rows into segments
            for the plain forward (:func:`_split_walk`), and under a gradient the backward
            splits too (:func:`_split_backward`; ``seq_split_grad`` None: :data:`SPLIT_GRAD`).
            With ``seq_split_grad=False`` one walk per row runs under a gradient, so
            ``jax.value_and_grad``'s value is that walk's (within ~2e-5 relative of the
            split's on an H100 at (2, 16384, 16, 128)).
        check_device: False skips the sm_90 check, to lower for CUDA on a machine without a
            GPU (``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``, the CI test).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.

    Raises:
        NotImplementedError: a call the kernel does not cover (module doc).
        ValueError: a config the kernels do not take (naming ``config``): over the shared
            memory budget, a knob of another op, ``seq_split`` with ``cu_seqlens`` or with
            more segments than leave the last one a token.
    """
    cfg = config or MosaicConfig()
    chunk = cfg.chunk or chunk_size or 64
    check_mosaic_call(q, k, v, chunk=chunk, check_device=check_device, cu_seqlens=cu_seqlens)
    if cfg.seq_split_grad and (cfg.seq_split == 1 or cu_seqlens is not None):
        whole = ("packed sequences (cu_seqlens) walk whole" if cu_seqlens is not None
                 else "seq_split=1 walks whole")
        raise ValueError(f"config: seq_split_grad=True splits the gradient of a split walk; "
                         f"{whole}: leave it None")
    split = cfg.seq_split
    if split is None and cu_seqlens is None:
        split = default_seq_split(rows=q.shape[0], heads=q.shape[2], value_dim=v.shape[3],
                                  n_chunks=-(-q.shape[1] // chunk), chunk=chunk,
                                  block_v=cfg.block_v)
    if (split or 1) > 1:
        cfg = dataclasses.replace(cfg, seq_split=split)
        if cu_seqlens is not None:
            raise ValueError(f"config: seq_split={cfg.seq_split} cuts batch rows into segments; "
                             "packed sequences (cu_seqlens) walk whole: leave it None")
        _check_split(q.shape[1], chunk, cfg.seq_split)  # refused with or without a gradient
        # the segments' walk, and the whole walk under a gradient, split no further
        call = _SplitCall(scale=scale, chunk=chunk,
                          config=dataclasses.replace(cfg, seq_split=1, seq_split_grad=None),
                          split=cfg.seq_split, check_device=check_device,
                          grad=(env_switch(SPLIT_GRAD_ENV, SPLIT_GRAD)
                                if cfg.seq_split_grad is None else cfg.seq_split_grad))
        return _split_forward(call, q, k, v, g, initial_state)
    heads = q.shape[2]
    dtype, kp, vp, plan, h0, (qc, kc, vc) = _chunk_inputs(q, k, v, initial_state, chunk,
                                                          cu_seqlens)
    packed = plan.packed
    itemsize = jnp.dtype(dtype).itemsize
    cfg = cfg.merged(default_mosaic_config(rows=plan.rows, heads=heads, key_dim=kp,
                                           value_dim=vp, n_chunks=plan.n_chunks,
                                           itemsize=itemsize, chunk=chunk, packed=packed,
                                           block_v=cfg.block_v))
    if vp % cfg.block_v:
        raise ValueError(f"config: block_v={cfg.block_v} must divide the padded value dim {vp}")
    for knob in ("fused_wy", "fused_grad"):
        if getattr(cfg, knob):
            raise ValueError(f"config: {knob}=True is a knob of the delta rules' kernel (the WY "
                             "products in the walk); simple_gla's has no WY form: leave it None")
    _check_fits(cfg, chunk=chunk, kp=kp, vp=vp, itemsize=itemsize, packed=False)
    if packed:
        decline_unless_packed_fits(
            lambda: _check_fits(cfg, chunk=chunk, kp=kp, vp=vp, itemsize=itemsize, packed=True),
            key_dim=kp, block_v=cfg.block_v)
    if g is None:
        g = jnp.zeros(q.shape[:3], F32)
    gc = _layout(floor_log_gate(g, mark_positive=True), plan)  # [B, T, H] -> [R, NC * L, H]
    core = _core_static(dtype, plan, kp, vp, heads=heads, scale=scale, has_h0=h0 is not None,
                        gate="scalar", delta=False, n_seqs=_n_seqs(q, cu_seqlens))
    st = MosaicStatic(core=core, block_v=cfg.block_v, stages=cfg.stages, backward=cfg.backward,
                      bwd_stages=cfg.bwd_stages, dqk_stages=cfg.dqk_stages)
    o, final = mosaic_core(st, qc, kc, vc, gc, h0, _packed_layout(plan))
    o = _unlayout(o, plan)[..., :v.shape[3]].astype(v.dtype)
    return o, final[:, :, :q.shape[3], :v.shape[3]]


#: "0": under a gradient a split forward (``MosaicConfig.seq_split`` > 1) runs one walk per row
#: instead of the segments' own backward, where the config's ``seq_split_grad`` is None;
#: unset: :data:`SPLIT_GRAD`
SPLIT_GRAD_ENV = "LINEARNEXUS_MOSAIC_SPLIT_GRAD"
#: the split's own backward by default: yes. simple_gla (2, 16384, 16, 128) bf16 on an H100
#: (benchmarks/mosaic_config_gpu.py, one call, 2026-12-06): forward + backward 1.518 ms at two
#: segments against 2.132 for one walk and 2.083 for the split forward with one walk's
#: gradient; four segments 1.814. Its bad inputs' NaN patterns match the jax backend's on that
#: GPU (guard_nan_gpu.py --seq-split 2 --seq-split-grad, 7 of 7 dense cases)
SPLIT_GRAD = True


def default_seq_split(*, rows: int, heads: int, value_dim: int, n_chunks: int, chunk: int,
                      block_v: int | None = None) -> int:
    """The heuristic's sequence split (``MosaicConfig.seq_split``) of simple_gla's walk,
    forward and (:data:`SPLIT_GRAD`) gradient: 2 segments where one walk at value blocks of
    64 would leave at least half the SMs idle (``mosaic_chunk.small_grid`` on the padded value dim: where
    ``default_mosaic_config`` would take value blocks of 32) on a walk of >= 128 chunks
    (each segment then walks >= 64, as a full grid's walk does at T = 4096), with no value
    block of the call's own; else 1. Measured at (2, 16384, 16, 128) bf16 on an H100
    (2026-12-06, through the api): 0.384 ms against 0.453 for one walk in one call, 0.392
    against 0.492 in another; four segments 0.422 / 0.456. Shorter walks and V = 64 (ssd's
    usual head) are untimed. Under a gradient the split's own backward runs
    (:data:`SPLIT_GRAD`) unless the config sets ``seq_split_grad=False``."""
    if (block_v is None and n_chunks >= 128
            and small_grid(rows=rows, heads=heads, chunk=chunk,
                           value_dim=next_pow2(value_dim, minimum=64))):
        return 2
    return 1


def split_pieces(programs: int, seg_chunks: int) -> int:
    """Walks per segment for the split's entering states (``pallas_chunk.segment_states``):
    the fewest of 1, 2, 4, 8 that give >= 4 programs per SM (``programs``: those of one
    walk per segment), each piece a whole number of >= 8 chunks (``seg_chunks`` a segment)."""
    pieces = 1
    while (programs * pieces < 4 * HOPPER_SMS and pieces < 8
           and seg_chunks % (2 * pieces) == 0 and seg_chunks // (2 * pieces) >= 8):
        pieces *= 2
    return pieces


@dataclasses.dataclass(frozen=True)
class _SplitCall:
    """The static arguments of one split call (hashable: a ``custom_vjp`` nondiff argument).
    ``grad``: the gradient splits too (``MosaicConfig.seq_split_grad``)."""

    scale: float
    chunk: int
    config: MosaicConfig  # seq_split=1: one walk per row
    split: int
    check_device: bool
    grad: bool = False

    def whole(self, q, k, v, g, h0):
        """The same call as one walk per row (what runs under a gradient unless ``grad``)."""
        return linear_attention_mosaic(q, k, v, g, scale=self.scale, initial_state=h0,
                                       chunk_size=self.chunk, config=self.config,
                                       check_device=self.check_device)

    def rows(self, q, k, v, g, s_in):
        """The walk over the ``B * split`` segment rows from their entering states ``s_in``
        ``[B * split, H, K, V]``: ``(o [B, T, H, V], finals [B * split, H, K, V])``."""
        batch, seq = q.shape[:2]
        per = _check_split(seq, self.chunk, self.split)
        # the raw gates (zero-padded: not positive, so unmarked): the walk floors them once
        qs, ks, vs, gs = _split_rows((q, k, v), g, per=per, split=self.split, floor=False)
        o, final = linear_attention_mosaic(qs, ks, vs, gs, scale=self.scale, initial_state=s_in,
                                           chunk_size=self.chunk, config=self.config,
                                           check_device=self.check_device)
        # [B * split, per, H, V] -> [B, split * per, H, V] -> [B, T, H, V]
        return o.reshape(batch, self.split * per, *o.shape[2:])[:, :seq], final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _split_forward(call: _SplitCall, q, k, v, g, h0):
    """:func:`_split_walk` for the plain forward. Under a gradient one walk per row runs (its
    forward stores the states its backward reads), unless ``call.grad``: then the split's
    walk stores them and the backward walks the segments from their exiting state gradients
    (:func:`_split_backward`)."""
    return _split_walk(q, k, v, g, scale=call.scale, initial_state=h0, chunk=call.chunk,
                       config=call.config, split=call.split, check_device=call.check_device)


def _split_forward_fwd(call: _SplitCall, q, k, v, g, h0):
    if not call.grad:
        return jax.vjp(call.whole, q, k, v, g, h0)
    s_in = _entering_states(q, k, v, g, h0, chunk=call.chunk, split=call.split)
    (o, finals), vjp = jax.vjp(call.rows, q, k, v, g, s_in)
    return (o, _join_finals(finals, q.shape[0], call.split)), (vjp, q, g, h0)


def _split_forward_bwd(call: _SplitCall, res, ct):
    if not call.grad:
        return res(ct)
    return _split_backward(call, *res, ct)


_split_forward.defvjp(_split_forward_fwd, _split_forward_bwd)


def _split_backward(call: _SplitCall, vjp, q, g, h0, ct):
    """The split's gradient: each segment's reverse walk from the state gradient that leaves
    it. With ``R_s = scale sum_t e^{B_t} q_t^T do_t`` what segment ``s``'s outputs send to the
    state entering it (``B_t`` its log-gates up to ``t``; ``pallas_chunk.segment_states``
    in reverse) and ``D_s`` its total decay::

        dS_end(last) = dfinal,   dS_end(s) = dS_in(s + 1) = R_{s+1} + D_{s+1} dS_end(s + 1)

    Walked from ``dS_end(s)`` (as its final state's cotangent) and ``S_in(s)``, segment
    ``s``'s backward gives its tokens' full gradients: the state gradient already holds
    every later output's. ``dh0`` is the first segment's initial-state gradient."""
    do, dfinal = ct
    batch, seq, heads, key_dim = q.shape
    value_dim = do.shape[3]
    split, chunk = call.split, call.chunk
    per = _check_split(seq, chunk, split)
    qs, dos, gs = _split_rows((q, do), g, per=per, split=split, cut=False)
    # [B, split-1, H, K, V], [B, split-1, H]: segments 1 .. split-1
    sent, log_decay = _segment_sums(qs, dos, gs, split=split, per=per, chunk=chunk,
                                    reverse=True)
    sent = call.scale * sent
    decay = jnp.exp(log_decay)
    d_end = [dfinal.astype(F32)]  # the last segment's exiting state gradient
    for s in range(split - 2, -1, -1):  # a few [K, V] steps, right to left
        d_end.insert(0, sent[:, s] + decay[:, s, :, None, None] * d_end[0])
    # [B, split, H, K, V] -> [B * split, H, K, V]: each segment's final-state cotangent
    d_end = jnp.stack(d_end, axis=1).reshape(batch * split, heads, key_dim, value_dim)
    dq, dk, dv, dg, ds_in = vjp((do, d_end))
    dh0 = None
    if h0 is not None:  # [B * split, ..] -> [B, split, ..]: the first segment's
        dh0 = ds_in.reshape(batch, split, heads, key_dim, value_dim)[:, 0].astype(h0.dtype)
    return dq, dk, dv, dg, dh0


def _check_split(seq: int, chunk: int, split: int) -> int:
    """Tokens a segment (whole chunks) when ``seq`` tokens are cut in ``split``.

    Raises:
        ValueError: the last segment would hold no token (naming the splits that would not).
    """
    n_chunks = -(-seq // chunk)

    def seg_chunks(s: int) -> int:  # chunks a segment when cut in s
        return -(-n_chunks // s)

    def fits(s: int) -> bool:  # the last segment keeps a token
        return (s - 1) * seg_chunks(s) < n_chunks

    if not fits(split):
        valid = [s for s in range(1, min(n_chunks, 4 * split) + 1) if fits(s)]
        raise ValueError(f"config: seq_split={split} at T={seq} ({n_chunks} chunks of {chunk}) "
                         f"leaves the last segment without a token (segments of "
                         f"{seg_chunks(split)} whole chunk(s) each); splits that keep one "
                         f"here: {', '.join(map(str, valid))}")
    return seg_chunks(split) * chunk


def _split_rows(arrays: tuple[Array, ...], g: Array | None, *, per: int, split: int,
                cut: bool = True, floor: bool = True) -> tuple[Array | None, ...]:
    """``arrays`` (``[B, T, H, *]`` each) and the log-gates ``g``, floored (``floor``; a
    positive gate NaN: it marks the states it reaches) or as given, zero-padded to
    ``split * per`` tokens (padded tokens: zero k, v, g, inert), as ``[B * split, per, H, *]``
    segment rows, or (``cut`` False) ``[B, split * per, H, *]``; the gates last."""
    batch, seq = arrays[0].shape[:2]
    total = per * split

    def pad(x: Array) -> Array:  # [B, T, H, *] -> [B, total, H, *] -> rows
        x = jnp.pad(x, [(0, 0), (0, total - seq)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(batch * split, per, *x.shape[2:]) if cut else x

    gl = None if g is None else pad(floor_log_gate(g, mark_positive=True) if floor else g)
    return (*(pad(x) for x in arrays), gl)


def _entering_states(q: Array, k: Array, v: Array, g: Array | None, h0: Array | None, *,
                     chunk: int, split: int) -> Array:
    """Each segment's entering state ``[B * split, H, K, V]`` float32: with ``U_s`` the state
    segment ``s`` ends on from zero and ``D_s`` its total decay (``pallas_chunk
    .segment_states``), ``S_in(0) = h0``, ``S_in(s + 1) = D_s S_in(s) + U_s``. Not
    differentiated: the split's backward sends the state gradients itself."""
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[3]
    per = _check_split(seq, chunk, split)
    ks, vs, gs = _split_rows((k, v), g, per=per, split=split, cut=False)
    # [B, split-1, H, K, V], [B, split-1, H]: each segment's own state and summed log-gate
    own, log_decay = _segment_sums(ks, vs, gs, split=split, per=per, chunk=chunk)
    decay = jnp.exp(log_decay)
    s_in = [jnp.zeros((batch, heads, key_dim, value_dim), F32) if h0 is None
            else h0.astype(F32)]
    for i in range(split - 1):  # a few [K, V] steps
        s_in.append(decay[:, i, :, None, None] * s_in[-1] + own[:, i])
    # [B, split, H, K, V] -> [B * split, H, K, V]
    return jax.lax.stop_gradient(
        jnp.stack(s_in, axis=1).reshape(batch * split, heads, key_dim, value_dim))


def _segment_sums(a: Array, b: Array, gs: Array | None, *, split: int, per: int, chunk: int,
                  reverse: bool = False) -> tuple[Array, Array]:
    """``pallas_chunk.segment_states`` over ``a [B, split * per, H, K]`` (k, or q in
    ``reverse``) and ``b [B, split * per, H, V]`` (v, or do) with the floored log-gates ``gs``
    (or None): head dims padded to powers of two for the kernel and cut back, walked in
    :func:`split_pieces` pieces. Returns ``([B, split-1, H, K, V], [B, split-1, H])``."""
    batch, _, heads, key_dim = a.shape
    value_dim = b.shape[3]
    kp, vp = next_pow2(key_dim, minimum=16), next_pow2(value_dim, minimum=16)
    block_k, block_v = segment_blocks(kp, vp)
    dtype = mosaic_dtype(a, a, b)
    sums, log_decay = segment_states(
        _pad_last(a.astype(dtype), kp), _pad_last(b.astype(dtype), vp),
        None if gs is None else in_chunk_cumsum(gs, chunk), segments=split, chunk=chunk,
        reverse=reverse,
        pieces=split_pieces(batch * (split - 1) * heads * (kp // block_k) * (vp // block_v),
                            per // chunk))
    return sums[..., :key_dim, :value_dim], log_decay


def _join_finals(finals: Array, batch: int, split: int) -> Array:
    """The last segment's final state ``[B, H, K, V]`` from ``[B * split, H, K, V]``, the
    earlier segments' added at zero weight: their walks mark a bad output in them (a
    non-finite q row; module doc of mosaic_chunk, "Finite outputs"), which the api's guard
    reads in the final state it is given."""
    finals = finals.reshape(batch, split, *finals.shape[1:])  # [B*split, ..] -> [B, split, ..]
    return finals[:, -1] + 0.0 * jnp.sum(finals[:, :-1], axis=1)


def _split_walk(q: Array, k: Array, v: Array, g: Array | None, *, scale: float,
                initial_state: Array | None, chunk: int, config: MosaicConfig, split: int,
                check_device: bool) -> tuple[Array, Array]:
    """simple_gla with each batch row's sequence cut into ``split`` segments of whole chunks
    (``MosaicConfig.seq_split``), walked as ``B * split`` rows, each from the state that
    really enters it (:func:`_entering_states`): ``split`` times the programs of one walk, at
    the price of reading the keys and values of all but the last segment once more. Arguments
    and returns as :func:`linear_attention_mosaic` (batch rows; ``config`` with
    ``seq_split=1``; ``split`` checked by :func:`_check_split`)."""
    call = _SplitCall(scale=scale, chunk=chunk, config=config, split=split,
                      check_device=check_device)
    s_in = _entering_states(q, k, v, g, initial_state, chunk=chunk, split=split)
    o, finals = call.rows(q, k, v, g, s_in)
    return o, _join_finals(finals, q.shape[0], split)


def decline_unless_packed_fits(check: Callable[[], None], *, key_dim: int,
                               block_v: int) -> None:
    """Run ``check`` (a config check of a packed call, raising ``ValueError``) and turn its
    refusal into ``NotImplementedError``: a config that fits batch rows (one from the tuning
    cache, which does not key on packing, say) but not beside the packed staging tile makes
    dispatch move on to ``pallas`` rather than fail the call."""
    try:
        check()
    except ValueError as e:
        raise NotImplementedError(
            f"mosaic backend: packed sequences add a float32 [K, block_v] staging tile "
            f"({key_dim * block_v * 4} bytes) to the walks, and then {e}") from e


def _check_fits(cfg: MosaicConfig, *, chunk: int, kp: int, vp: int, itemsize: int,
                packed: bool) -> None:
    """Raise ``ValueError`` naming ``config`` when a kernel of the resolved ``cfg`` would ask
    for more shared memory than a block may use (``packed``: with the staging tile)."""
    need = smem_bytes(chunk=chunk, key_dim=kp, block_v=cfg.block_v, stages=cfg.stages,
                      itemsize=itemsize, packed=packed)
    if need > SMEM_LIMIT:
        raise ValueError(f"config: chunk={chunk}, block_v={cfg.block_v}, stages={cfg.stages} at "
                         f"K={kp} needs {need} bytes of shared memory, over the {SMEM_LIMIT} "
                         "a block may use; use fewer stages or a smaller block_v / chunk")
    needs = {}  # shared memory of the backward kernels' stage overrides
    if cfg.bwd_stages:  # the reverse walk and the forward that stores the states
        needs["bwd_stages"] = max(
            mosaic_bwd.state_smem_bytes(chunk=chunk, key_dim=kp,
                                        block_v=min(vp, mosaic_bwd.STATE_BLOCK_V),
                                        stages=cfg.bwd_stages, itemsize=itemsize, packed=packed),
            smem_bytes(chunk=chunk, key_dim=kp, block_v=cfg.block_v, stages=cfg.bwd_stages,
                       itemsize=itemsize, store_states=True, packed=packed))
    if cfg.dqk_stages:
        needs["dqk_stages"] = mosaic_bwd.dqk_smem_bytes(
            chunk=chunk, key_dim=kp, value_dim=vp, stages=cfg.dqk_stages, itemsize=itemsize)
    for name, need in needs.items():
        if need > SMEM_LIMIT:
            raise ValueError(f"config: {name}={getattr(cfg, name)} at K={kp}, V={vp} needs "
                             f"{need} bytes of shared memory, over the {SMEM_LIMIT} a block may use")
    if cfg.backward == "mosaic" and not mosaic_backward_fits(
            chunk=chunk, key_dim=kp, value_dim=vp, block_v=cfg.block_v, itemsize=itemsize,
            packed=packed):
        beside = " beside the packed staging tile" if packed else ""
        raise ValueError(f"config: backward='mosaic' at chunk={chunk}, K={kp}, V={vp}, "
                         f"block_v={cfg.block_v} does not fit shared memory: the dq / dk kernel "
                         "holds whole [L, V] tiles (V <= 128), and the forward that stores the "
                         f"states needs 2 stages of [K, block_v] slots{beside}; use "
                         "backward='pallas' or a smaller block_v")


def _n_seqs(q: Array, cu_seqlens: Array | None) -> int:
    """N: the batch, or the packed sequences' count."""
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _chunk_inputs(q: Array, k: Array, v: Array, initial_state: Array | None, chunk: int,
                  cu_seqlens: Array | None):
    """``(dtype, Kp, Vp, plan, h0, (q, k, v))`` in the chunk layout ``[R, NC * L, H, D]``
    (batch rows, or one row of packed sequences each starting on a fresh chunk), head dims
    zero-padded to powers of two >= 64 (the initial state likewise, float32)."""
    batch, seq, _, key_dim = q.shape
    value_dim = v.shape[3]
    dtype = mosaic_dtype(q, k, v)
    # zero padding of head dims is inert; 64 is the smallest wgmma-friendly tile here and a
    # power of two keeps the Triton backward's blocks valid on the same padded arrays
    kp, vp = next_pow2(key_dim, minimum=64), next_pow2(value_dim, minimum=64)
    plan = plan_chunks(batch, seq, chunk, cu_seqlens)  # rows padded to whole chunks
    h0 = initial_state
    if h0 is not None:
        h0 = jnp.pad(h0.astype(F32), [(0, 0), (0, 0), (0, kp - key_dim), (0, vp - value_dim)])
    qc = _layout(_pad_last(q.astype(dtype), kp), plan)  # [B, NC * L, H, Kp]
    kc = _layout(_pad_last(k.astype(dtype), kp), plan)
    vc = _layout(_pad_last(v.astype(dtype), vp), plan)  # [B, NC * L, H, Vp]
    return dtype, kp, vp, plan, h0, (qc, kc, vc)


def _core_static(dtype: Any, plan: Any, kp: int, vp: int, *, heads: int, scale: float,
                 has_h0: bool, gate: str, delta: bool, n_seqs: int) -> CoreStatic:
    """The Triton core's description of the call (the backward runs the Triton kernels)."""
    tcfg = _resolve(TritonConfig(chunk=plan.chunk), rows=plan.rows, heads=heads, key_dim=kp,
                    value_dim=vp, delta=delta, dtype=dtype, n_chunks=plan.n_chunks)
    return _static(tcfg, gate=gate, delta=delta, has_h0=has_h0, scale=scale, plan=plan,
                   heads=heads, key_dim=kp, value_dim=vp, n_seqs=n_seqs)


def _packed_layout(plan: Any) -> tuple[Array, Array] | None:
    """The kernels' ``(seq_info, flags)`` for a packed plan, None for batch rows."""
    return chunk_layout_info(plan) if plan.packed else None


def delta_rule_mosaic(q: Array, k: Array, v: Array, beta: Array, g: Array | None, *,
                      scale: float, initial_state: Array | None = None,
                      cu_seqlens: Array | None = None, chunk_size: int | None = None,
                      config: MosaicConfig | None = None,
                      check_device: bool = True) -> tuple[Array, Array]:
    """The (gated) delta rule: WY preparation in Triton, the chunk walk on Mosaic GPU, the
    backward in Triton or Mosaic GPU (``mosaic_delta.py``; checked on an H200, automatic unless
    ``LINEARNEXUS_MOSAIC_GDN=0``).

    Args:
        q, k: ``[B, T, H, K]`` (k L2-normalised). v: ``[B, T, H, V]`` (bfloat16 / float16).
        beta: ``[B, T, H]``. g: ``[B, T, H]`` log-gates, or None (the ungated delta rule).
        scale, initial_state, cu_seqlens, check_device: as :func:`linear_attention_mosaic`.
        chunk_size: L; 64 only (``config.chunk`` wins).
        config: :class:`MosaicConfig` overrides (``stages``, ``bwd_stages``: the depth of the
            forward that stores the states under a gradient and of the Mosaic reverse walk;
            ``block_v`` 64 or 32; ``backward``: ``"pallas"`` (Triton) or ``"mosaic"``;
            ``dqk_stages`` with the Mosaic backward; ``fused_wy``: the walk forms the WY
            products from ``M^{-1}``; ``fused_grad``: the gradient from ``M^{-1}`` too, with
            ``fused_wy`` and the Mosaic backward); None fields:
            ``mosaic_delta.default_delta_config``.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.

    Raises:
        NotImplementedError: what :func:`check_mosaic_call` declines, and chunk sizes other
            than 64. ValueError: a config the kernel does not take (names ``config``).
    """
    from linearnexus.kernels.common.mosaic_delta import (
        check_delta_config,
        default_delta_config,
        mosaic_delta_core,
        mosaic_delta_fused,
    )
    from linearnexus.kernels.common.pallas import interpret_mode
    from linearnexus.kernels.common.pallas_wy import WyStatic, wy_prepare

    cfg = config or MosaicConfig()
    chunk = cfg.chunk or chunk_size or 64
    check_mosaic_call(q, k, v, chunk=chunk, check_device=check_device, cu_seqlens=cu_seqlens)
    if chunk != 64:
        raise NotImplementedError(f"mosaic backend: chunk_size {chunk}: the delta rules' kernel "
                                  "takes chunks of 64 (a [128, 128] q k^T accumulator would not "
                                  "fit beside the state in registers)")
    heads = q.shape[2]
    dtype, kp, vp, plan, h0, (qc, kc, vc) = _chunk_inputs(q, k, v, initial_state, chunk,
                                                          cu_seqlens)
    cfg = cfg.merged(default_delta_config(rows=plan.rows, heads=heads, key_dim=kp, value_dim=vp,
                                          n_chunks=plan.n_chunks, packed=plan.packed,
                                          fused_wy=cfg.fused_wy, fused_grad=cfg.fused_grad,
                                          backward=cfg.backward, block_v=cfg.block_v))
    check_delta_config(cfg, key_dim=kp, value_dim=vp)
    if plan.packed:
        decline_unless_packed_fits(
            lambda: check_delta_config(cfg, key_dim=kp, value_dim=vp, packed=True),
            key_dim=kp, block_v=cfg.block_v)
    gc = None if g is None else _layout(floor_log_gate(g, mark_positive=True), plan)  # [B, NC*L, H]
    wst = WyStatic(gated=g is not None, rows=plan.rows, n_chunks=plan.n_chunks, chunk=chunk,
                   heads=heads, key_dim=kp, value_dim=vp, exact=False,
                   num_warps=8 if max(kp, vp) >= 256 else 4, interpret=interpret_mode())
    core = _core_static(dtype, plan, kp, vp, heads=heads, scale=scale, has_h0=h0 is not None,
                        gate="none" if g is None else "scalar", delta=True,
                        n_seqs=_n_seqs(q, cu_seqlens))
    st = MosaicStatic(core=core, block_v=cfg.block_v, stages=cfg.stages, backward=cfg.backward,
                      bwd_stages=cfg.bwd_stages, dqk_stages=cfg.dqk_stages,
                      fused_grad=bool(cfg.fused_grad))
    bc = _layout(beta, plan)  # [B, T, H] -> [R, NC * L, H]
    if cfg.fused_wy:  # w, u formed in the walk (a gradient's too with fused_grad)
        o, final = mosaic_delta_fused(st, wst, qc, kc, vc, bc, gc, h0, _packed_layout(plan))
    else:
        # k passes through so that the core's dk is added inside the WY backward kernel
        w, uc, kc = wy_prepare(wst, kc, vc, bc, gc)
        o, final = mosaic_delta_core(st, qc, kc, uc, w, gc, h0, _packed_layout(plan))
    o = _unlayout(o, plan)[..., :v.shape[3]].astype(v.dtype)
    return o, final[:, :, :q.shape[3], :v.shape[3]]


class MosaicKernel(PallasKernel):
    """The ``mosaic`` backend of a linear-attention op: chunk mode on the Mosaic GPU kernel
    (sm_90+), recurrent mode (decoding) on the op's pure-JAX recurrent form; config
    resolution as :class:`PallasKernel`'s (the object's ``config``, then the tuning cache
    under backend ``"mosaic"``, then the kernel's heuristic).

    Automatic dispatch tries it first on a GPU for bf16 / f16; calls it does not cover
    (module doc; an Ampere GPU among them) raise ``NotImplementedError`` and the dispatcher
    moves on to ``pallas``.

    Args:
        chunked: the op's mosaic function (``fn(*arrays, scale=, initial_state=,
            cu_seqlens=, chunk_size=, config=)``). recurrent: the op's recurrent form.
        config: :class:`MosaicConfig` overrides for every call.
        step: the op's one-token step (:class:`PallasKernel`).
        opt_in: a function saying whether automatic dispatch may pick it
            (``mosaic_delta.delta_opted_in``: an environment variable); by name it always
            runs. None: automatic dispatch picks it.
        status: the feature table's note after the name (None: the class's).
        final_marks_bad_inputs: the op's chunk forward makes its final state NaN after every
            bad input: a non-finite q row (the walk's own marking, ``mosaic_chunk``'s doc,
            "Finite outputs"), a positive log-gate (made NaN in the glue or GLA's ``sums``
            kernel) and the bad k, v, gates and beta that reach the state anyway; so the
            api's guard reads the final states only (:func:`validation.run_guarded`), not the
            outputs or the log-gates.
    """

    name: ClassVar[str] = "mosaic"
    #: shown after the name in the README's feature table
    status: str = ("sm_90+, batches and packed sequences: Mosaic GPU forward and backward "
                   "(Triton backward at V > 128); otherwise falls back to pallas")

    def __init__(self, chunked: Callable[..., tuple[Array, Array]],
                 recurrent: Callable[..., tuple[Array, Array]] | None,
                 config: MosaicConfig | None = None, step: StepSpec | None = None, *,
                 opt_in: Callable[[], bool] | None = None, status: str | None = None,
                 final_marks_bad_inputs: bool = False) -> None:
        super().__init__(chunked, recurrent, config=config, step=step)
        self.opt_in = opt_in
        self.final_marks_bad_inputs = final_marks_bad_inputs
        if status is not None:
            self.status = status

    @property
    def by_name_dtypes(self) -> tuple[DType, ...] | None:
        """The dtypes it takes when automatic dispatch leaves it out (not opted in): the
        feature table then lists it as by name only."""
        return None if self.opt_in is None or self.opt_in() else MOSAIC_DTYPES

    def supports(self, *, platform: str, dtype: DType) -> bool:
        # static (the feature table reads it on any machine); the compute capability and the
        # installed JAX are checked when a call runs (check_mosaic_call), which raises
        # NotImplementedError on an Ampere GPU so that dispatch moves on to pallas
        if self.opt_in is not None and not self.opt_in():
            return False
        return platform == "gpu" and jnp.dtype(dtype) in MOSAIC_DTYPES

    def cached_config(self, op: str, dims: tuple[int, ...], dtype: Any) -> MosaicConfig | None:
        from linearnexus.kernels import tuning

        return _config_from(tuning.lookup(op, self.name, dims, dtype))


def _config_from(knobs: dict[str, Any] | None) -> MosaicConfig | None:
    """A cached entry as a :class:`MosaicConfig`; None when absent or no longer valid."""
    if knobs is None:
        return None
    names = {f.name for f in dataclasses.fields(MosaicConfig)}
    try:
        return MosaicConfig(**{k: v for k, v in knobs.items() if k in names})
    except (TypeError, ValueError):
        return None
