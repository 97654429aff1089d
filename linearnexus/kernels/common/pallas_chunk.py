"""Pallas (Triton) kernels for the chunked linear-attention core, forward and backward.

One core serves ``simple_gla`` (and through it ``ssd`` / ``retention``), ``delta_rule`` and
``gated_delta_rule``. Per chunk of L tokens, entering with state ``S_c [K, V]``::

    vn  = v                                  (gated linear attention)
    vn  = u - w S_c                          (delta rules: u, w from the WY form)
    o   = scale * [ (q * e^b) S_c + ((q k^T) * Gamma) vn ]
    S_{c+1} = e^{b_L} S_c + (k * e^{b_L - b})^T vn

with ``b`` the inclusive in-chunk sum of log-gates (0 without a gate) and
``Gamma_ij = exp(b_i - b_j)`` for ``j <= i``, else 0. Five kernels:

* ``fwd_h`` (grid ``[K blocks, V blocks, rows x heads]``): walks the chunks of one row in
  order, stores ``S_c`` for every chunk (and ``vn`` for the delta rules). A batch row (one
  sequence, ``CoreStatic.packed`` False) loads its initial state before the loop and stores
  its final state after it; a row of packed sequences loads a sequence's initial state
  (masked) at the chunk that starts it and stores its final state at the chunk that ends it.
  For the gated delta rule the decay ``e^{b_L - b}`` multiplies ``vn``'s rows (float32 in
  registers) instead of ``k``'s, so ``k``'s tile goes from its asynchronous copy straight
  into the matmul; ``bwd_dh`` likewise decays ``do`` and ``k dS`` instead of ``q`` and ``k``.
* ``fwd_o`` (grid ``[V blocks, chunks, rows x heads]``): the output, all chunks in parallel.
* ``bwd_dv`` (same grid): ``dv`` (the intra-chunk part only for the delta rules).
* ``bwd_dh`` (as ``fwd_h``, chunks in reverse): ``dS`` for every chunk, the initial-state
  gradient, and for the delta rules ``dvn`` (which needs ``dS`` of the next chunk).
* ``bwd_dqk`` (grid ``[K blocks, chunks, rows x heads]``): ``dq``, ``dk`` (``dw``), and the
  per-token terms of the gate gradient.

The gate gradient is chunk-local. Raising the log-gate of token t of chunk c by d scales
every decay from t on: inside the chunk that acts on ``q_t'`` and ``k_t'`` as
``q e^{B}``, ``k e^{-B}`` (``dL/dB_t' = q_t'.dq_t' - k_t'.dk_t'``), and beyond the chunk it
scales the state leaving it, ``S_{c+1}`` (``<S_{c+1}, dS_{c+1}>``; for the delta rules the
``w S`` term of the next chunk moves with that state, so no extra term appears). Hence
``dg_t = sum_{t <= t' in chunk} (q.dq - k.dk)_t' + <S_{c+1}, dS_{c+1}>``, with
``<S_{c+1}, dS_{c+1}> = e^{b_L} <S_c, dS_{c+1}> + sum_j k_j . dk_j(state part)``, all from
values ``bwd_dqk`` already holds. ``bwd_dqk`` sums these terms regrouped so that pairs that
cancel exactly never appear: ``q_i.dq_i`` and ``k_i.dk_i`` share the ``dA_ii (q_i.k_i)``
term, and ``-k_j.dk_j(state)`` for ``j >= t`` cancels against the carried state's part (the
grouping of the GLA kernel, ``kernels/gla/pallas.py``). Measured before the regrouping:
a sequence-wide reverse cumsum of ``q.dq - k.dk`` gave bf16 gate gradients 1.6e-2 off on an
H200, and the ungrouped chunk-local sum was 35x off (relative) at log-gates near -20, where
the true ``dg`` is ~1e-8 and the cancelling terms O(10).

Inputs come in the chunk layout ``[R, NC * L, H, D]`` (see ``chunking.py``: batch rows, or
one row of packed sequences each starting on a fresh chunk), with head dims padded to
powers of two >= 16. States are float32 in registers; the per-chunk states stored for the
other kernels are in the input dtype (as FLA does), accumulation is float32 throughout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas import (
    TritonConfig,
    compiler_params,
    interpret_mode,
    named_pallas_call,
)
from linearnexus.kernels.common.pallas_scan import exp_approx

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class CoreStatic:
    """The static description of one core call (hashable: it keys the compiled kernels).

    Attributes:
        gate: "none" or "scalar".
        delta: whether ``w`` is given (the delta rules).
        has_h0: whether an initial state is given.
        scale: multiplies q.
        rows, n_chunks, chunk, heads, key_dim, value_dim, n_seqs: R, NC, L, H, K, V, N.
        block_k, block_v, num_warps: launch knobs of the two sequential kernels (``fwd_h``,
            ``bwd_dh``), already resolved; num_stages: every kernel's pipelining depth.
        par_block_k, par_block_v, par_warps: blocks and warps of the three parallel kernels
            (``fwd_o``, ``bwd_dv``, ``bwd_dqk``), which take whole head dims up to 128 so that
            ``q k^T`` is computed once per chunk, not once per value block (par_block_k: 64
            for the gated delta rule or K = 256, see ``pallas_ops.par_block_k``).
        interpret: Pallas interpret mode (off a GPU).
        packed: rows hold packed sequences (``cu_seqlens``), which open and close at any
            chunk; False for batch rows, one sequence each from the first chunk to the last,
            whose walks then load the initial state (or the final state's gradient) before
            their loop and store the final state (or ``dh0``) after it, instead of a
            masked load and store at every chunk.
    """

    gate: str
    delta: bool
    has_h0: bool
    scale: float
    rows: int
    n_chunks: int
    chunk: int
    heads: int
    key_dim: int
    value_dim: int
    n_seqs: int
    block_k: int
    block_v: int
    num_warps: int
    num_stages: int
    interpret: bool
    par_block_k: int = 64
    par_block_v: int = 64
    par_warps: int = 4
    packed: bool = True


def default_config(*, rows: int, heads: int, key_dim: int, value_dim: int, delta: bool,
                   n_chunks: int, dtype: Any) -> TritonConfig:
    """The heuristic launch config of the sequential kernels (README "Pallas kernels").

    Measured on an H200 (bf16, K = V = 128, the ``fwd_h`` kernel alone, 2026-11-23):

    * chunk 64: the matmuls inside a chunk are 64 x 64 x D, big enough for the tensor cores,
      and the per-chunk state store (``K x V`` per 64 tokens) stays under the q/k/v traffic.
    * block_v 64, 4 warps: fastest at both (8, 4096, 16) and (2, 16384, 16); smaller value
      blocks give more programs but each walks the same chunks, and lost (16: 2.5x slower).
      The delta rules need all of K in one program (``u - w S`` mixes it), and there
      block_v 32 wins when 64 would leave fewer programs than SMs (132).
    * num_stages 2, or 3 for long sequences (>= 128 chunks a program), where prefetching the
      next chunk's loads hides more latency (0.39 vs 0.50 ms at T = 16384). The delta rules
      at K >= 256 take 1 (for all their core kernels: ``num_stages`` is shared): with 2, a
      sequential backward kernel (``bwd_dh``, by elimination: the parallel kernels' blocks did
      not change it) asked 344 KB of shared memory (279 KB gated) of the 227 KB a block may
      have.
    """
    del dtype
    block_k = key_dim if delta else min(64, key_dim)
    block_v = min(64, value_dim)
    if delta and block_v > 32 and (value_dim // block_v) * rows * heads < 132:
        block_v = 32
    warps = 8 if (delta and key_dim >= 256) else 4
    stages = 3 if n_chunks >= 128 else 2
    if delta and key_dim >= 256:
        stages = 1
    return TritonConfig(chunk=64, block_k=block_k, block_v=block_v, num_warps=warps,
                        num_stages=stages)


# ----------------------------------------------------------------------------- helpers


def _dot(a: Array, b: Array, *, ta: bool = False, tb: bool = False) -> Array:
    """``a @ b`` (optionally transposed) with float32 accumulation; exact float32 for f32."""
    if ta:
        a = a.T
    if tb:
        b = b.T
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jnp.dot(a, b, preferred_element_type=F32, precision=precision)


def _causal(length: int) -> Array:
    i = jax.lax.broadcasted_iota(jnp.int32, (length, length), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (length, length), 1)
    return i >= j


def _gamma(b: Array, length: int) -> Array:
    """``exp(b_i - b_j)`` for ``j <= i``, else 0; ``b [L]`` float32 -> ``[L, L]``."""
    diff = jnp.where(_causal(length), b[:, None] - b[None, :], -jnp.inf)
    return exp_approx(diff)


def _row_col(st: CoreStatic) -> tuple[Any, Any]:
    rh = pl.program_id(2)
    return rh // st.heads, rh % st.heads


def _chunk_entry(seq_ref, flag_ref, r, c):
    """``(seq, starts, ends)`` of chunk ``c`` of row ``r``: its sequence, and whether the chunk
    opens / closes it (bits 0 / 1 of ``flags``); the walks reset their carry there."""
    flag = flag_ref[r, c]
    return seq_ref[r, c], (flag & 1) == 1, (flag & 2) == 2


def _state_block(st: CoreStatic) -> tuple[Any, Any, Any, Any]:
    """``(r, h, ks, vs)`` of a sequential program (grid ``[K blocks, V blocks, rows x heads]``):
    its row, head, and the key / value slices of its ``[BK, BV]`` state block."""
    ik, iv = pl.program_id(0), pl.program_id(1)
    r, h = _row_col(st)
    return r, h, pl.ds(ik * st.block_k, st.block_k), pl.ds(iv * st.block_v, st.block_v)


def _value_block(st: CoreStatic, block_v: int) -> tuple[Any, Any, Any, Any, Any]:
    """``(r, h, c, t0, vs)`` of a parallel program (grid ``[V blocks, chunks, rows x heads]``):
    its row, head, chunk, the chunk's first token, and its value columns."""
    iv, c = pl.program_id(0), pl.program_id(1)
    r, h = _row_col(st)
    t0 = c * st.chunk
    return r, h, c, t0, pl.ds(iv * block_v, block_v)


def _walk(st: CoreStatic, where, seq_ref, flag_ref, enter_ref, leave_ref, states_ref, step, *,
          reverse: bool) -> None:
    """Run ``carry = step(c, t0, carry)`` over the chunks ``c`` (first token ``t0``) of the
    program's row (last to first when ``reverse``), the carry a ``[BK, BV]`` float32 state
    (or its gradient) that enters each chunk as ``states_ref[r, c, h, ks, vs]`` (stored in
    ``states_ref``'s dtype for the parallel kernels). ``where``: :func:`_state_block`.

    The carry enters a sequence as its ``enter_ref`` block (``h0`` forward, ``dht`` backward;
    None: zeros) and leaves it into ``leave_ref`` (the final state, ``dh0``). A batch row is
    one sequence from the first chunk to the last: it loads before the loop and stores after
    it. Rows of packed sequences do it at the chunks that open / close each sequence, the
    load masked: an unmasked ``[K, V]`` load per chunk was the largest load of the delta
    rules' ``bwd_dh`` (16 KB of the 72 KB a step at K = 128, block_v = 32) and, with the
    masked store per chunk, 0.86 -> 0.59 ms of it on an H200 (``docs/benchmarks.md``, GPU kernel work log).
    """
    r, h, ks, vs = where
    shape = (st.block_k, st.block_v)

    def body(i, carry):
        c = st.n_chunks - 1 - i if reverse else i
        if st.packed:
            seq, starts, ends = _chunk_entry(seq_ref, flag_ref, r, c)
            enter, leave = (ends, starts) if reverse else (starts, ends)
            if enter_ref is None:
                carry = jnp.where(enter, 0.0, carry)
            else:
                block = plt.load(enter_ref.at[seq, h, ks, vs], mask=jnp.broadcast_to(enter, shape),
                                 other=0.0)
                carry = jnp.where(enter, block.astype(F32), carry)
        t0 = c * st.chunk
        states_ref[r, c, h, ks, vs] = carry.astype(states_ref.dtype)
        carry = step(c, t0, carry)
        if st.packed:
            plt.store(leave_ref.at[seq, h, ks, vs], carry, mask=jnp.broadcast_to(leave, shape))
        return carry

    if st.packed or enter_ref is None:
        start = jnp.zeros(shape, F32)
    else:
        start = enter_ref[seq_ref[r, 0], h, ks, vs].astype(F32)
    carry = jax.lax.fori_loop(0, st.n_chunks, body, start)
    if not st.packed:
        leave_ref[seq_ref[r, 0], h, ks, vs] = carry.astype(leave_ref.dtype)


def _call(kernel, st: CoreStatic, grid, inputs: dict[str, Any], outputs: dict[str, Any], *,
          parallel: bool = False, warps: int | None = None,
          aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """:func:`~linearnexus.kernels.common.pallas.named_pallas_call` with the launch knobs of
    ``st`` (``warps`` overrides them): the kernel takes ``<name>_ref`` for each input and
    output (None ones absent); ``aliases`` maps input names to the outputs reusing their
    buffers. Returns the outputs by name."""
    if warps is None:
        warps = st.par_warps if parallel else st.num_warps
    return named_pallas_call(kernel, inputs=inputs, outputs=outputs, grid=grid,
                             interpret=st.interpret,
                             compiler_params=compiler_params(warps, st.num_stages),
                             aliases=aliases)


# ----------------------------------------------------------------------------- forward


def _fwd_h_kernel(*, k_ref, v_ref, w_ref, b_ref, h0_ref, seq_ref, flag_ref, h_ref, vn_ref,
                  final_ref, st: CoreStatic):
    L = st.chunk
    where = r, h, ks, vs = _state_block(st)

    def step(c, t0, state):
        k = k_ref[r, pl.ds(t0, L), h, ks]  # [L, BK]
        v = v_ref[r, pl.ds(t0, L), h, vs]  # [L, BV]
        if st.gate == "scalar":
            b = b_ref[r, pl.ds(t0, L), h]  # [L]
            b_last = b_ref[r, pl.ds(t0 + L - 1, 1), h]  # [1]
        if st.delta:
            w = w_ref[r, pl.ds(t0, L), h, ks]  # [L, K] (BK == K)
            vn = v.astype(F32) - _dot(w, state.astype(w.dtype))
            vn_ref[r, pl.ds(t0, L), h, vs] = vn.astype(vn_ref.dtype)
            # the decay goes on vn's rows (float32 in registers already), not on k's: k's
            # tile then feeds the matmul straight from its asynchronous copy (module doc)
            if st.gate == "scalar":
                vn = vn * exp_approx(b_last - b)[:, None]
            v = vn.astype(k.dtype)
        elif st.gate == "scalar":
            k = (k.astype(F32) * exp_approx(b_last - b)[:, None]).astype(k.dtype)
        if st.gate == "scalar":
            state = state * exp_approx(b_last)[:, None]
        return state + _dot(k, v, ta=True)

    _walk(st, where, seq_ref, flag_ref, h0_ref, final_ref, h_ref, step, reverse=False)


def _fwd_o_kernel(*, q_ref, k_ref, v_ref, h_ref, b_ref, o_ref, st: CoreStatic):
    L, BK, BV = st.chunk, st.par_block_k, st.par_block_v
    r, h, c, t0, vs = _value_block(st, st.par_block_v)
    acc_o = jnp.zeros((L, BV), F32)
    acc_a = jnp.zeros((L, L), F32)
    for ik in range(st.key_dim // BK):
        ks = pl.ds(ik * BK, BK)
        q = q_ref[r, pl.ds(t0, L), h, ks]
        k = k_ref[r, pl.ds(t0, L), h, ks]
        acc_o += _dot(q, h_ref[r, c, h, ks, vs])
        acc_a += _dot(q, k, tb=True)
    if st.gate == "scalar":
        b = b_ref[r, pl.ds(t0, L), h]
        acc_o = acc_o * exp_approx(b)[:, None]
        a = acc_a * _gamma(b, L)
    else:
        a = jnp.where(_causal(L), acc_a, 0.0)
    v = v_ref[r, pl.ds(t0, L), h, vs]
    o = (acc_o + _dot(a.astype(v.dtype), v)) * st.scale
    o_ref[r, pl.ds(t0, L), h, vs] = o.astype(o_ref.dtype)


def run_fwd_h(st: CoreStatic, k, v, w, b, h0, seq_info, flags):
    """The ``fwd_h`` kernel: ``(h [R, NC, H, K, V], vn [R, TP, H, V] | None, final [N, H, K, V])``."""
    R, NC, H, K, V = st.rows, st.n_chunks, st.heads, st.key_dim, st.value_dim
    dt = k.dtype
    ins = dict(k=k, v=v, w=w if st.delta else None, b=b if st.gate == "scalar" else None,
               h0=h0 if st.has_h0 else None, seq=seq_info, flag=flags)
    outs = dict(h=jax.ShapeDtypeStruct((R, NC, H, K, V), dt),
                vn=jax.ShapeDtypeStruct((R, NC * st.chunk, H, V), dt) if st.delta else None,
                final=jax.ShapeDtypeStruct((st.n_seqs, H, K, V), F32))
    grid = (K // st.block_k, V // st.block_v, R * H)
    res = _call(functools.partial(_fwd_h_kernel, st=st), st, grid, ins, outs)
    return res["h"], res["vn"], res["final"]


def run_fwd_o(st: CoreStatic, q, k, v, h, b):
    """The ``fwd_o`` kernel: ``o [R, TP, H, V]`` (``v`` is ``vn`` for the delta rules)."""
    R, NC, H, V = st.rows, st.n_chunks, st.heads, st.value_dim
    ins = dict(q=q, k=k, v=v, h=h, b=b if st.gate == "scalar" else None)
    outs = dict(o=jax.ShapeDtypeStruct((R, NC * st.chunk, H, V), q.dtype))
    return _call(functools.partial(_fwd_o_kernel, st=st), st, (V // st.par_block_v, NC, R * H),
                 ins, outs, parallel=True)["o"]


def core_forward(st: CoreStatic, q, k, v, w, b, h0, seq_info, flags):
    """Run ``fwd_h`` and ``fwd_o``; returns ``(o, h, vn, final)`` (``vn`` None unless delta)."""
    h, vn, final = run_fwd_h(st, k, v, w, b, h0, seq_info, flags)
    o = run_fwd_o(st, q, k, vn if st.delta else v, h, b)
    return o, h, vn, final


def _segment_states_kernel(*, k_ref, v_ref, b_ref, out_ref, decay_ref, heads: int,
                           pieces: int, first: int, length: int, chunk: int, block_k: int,
                           block_v: int, reverse: bool, interpret: bool):
    """One ``[BK, BV]`` block of one piece's own state (grid ``[K blocks, V blocks, rows x
    pieces x heads]``, piece ``i`` the ``length`` tokens from ``(first + i) * length``) and
    the piece's summed log-gate (by the programs of the first block). Forward: the walk of
    ``fwd_h`` from a zero state over the piece's chunks, nothing stored on the way
    (``sum_t e^{B_end - B_t} k_t^T v_t``); ``reverse``: its chunks last to first, each row
    decayed from the piece's start instead (``sum_t e^{B_t} k_t^T v_t``, ``B_t`` the
    inclusive sum of the piece's log-gates up to ``t``: the state gradient a piece's
    ``q, do`` send to the state entering it)."""
    ik, iv, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    h = p % heads
    row, piece = (p // heads) // pieces, first + (p // heads) % pieces
    ks, vs = pl.ds(ik * block_k, block_k), pl.ds(iv * block_v, block_v)
    L, n = chunk, length // chunk

    def body(i, carry):
        state, log_decay = carry
        t0 = piece * length + ((n - 1 - i) if reverse else i) * L
        k = k_ref[row, pl.ds(t0, L), h, ks]  # [L, BK]
        v = v_ref[row, pl.ds(t0, L), h, vs]  # [L, BV]
        if b_ref is not None:
            b = b_ref[row, pl.ds(t0, L), h]  # [L]
            b_last = b_ref[row, pl.ds(t0 + L - 1, 1), h]  # [1]
            decay = exp_approx(b if reverse else b_last - b, interpret=interpret)  # [L]
            k = (k.astype(F32) * decay[:, None]).astype(k.dtype)
            state = state * exp_approx(b_last, interpret=interpret)[:, None]
            log_decay = log_decay + b_last
        return state + _dot(k, v, ta=True), log_decay

    state, log_decay = jax.lax.fori_loop(
        0, n, body, (jnp.zeros((block_k, block_v), F32), jnp.zeros((1,), F32)))
    out_ref[row, piece - first, h, ks, vs] = state

    @pl.when((ik == 0) & (iv == 0))
    def _():
        decay_ref[row, pl.ds(piece - first, 1), h] = log_decay


def segment_blocks(key_dim: int, value_dim: int) -> tuple[int, int]:
    """``(block_k, block_v)`` of :func:`segment_states`: whole head dims up to 128, so that
    every ``k`` and ``v`` tile is read by one program (64-wide blocks at K = V = 128 read each
    tile twice). On an H100 (2026-12-06, not side by side): 64-wide blocks read 201 MB in
    0.122-0.139 ms, whole head dims 134 MB in 0.085 ms."""
    return min(128, key_dim), min(128, value_dim)


def segment_states(k: Array, v: Array, b: Array | None, *, segments: int, chunk: int,
                   pieces: int = 1, reverse: bool = False, num_warps: int | None = None,
                   num_stages: int = 2, interpret: bool | None = None) -> tuple[Array, Array]:
    """Each segment's own state and summed log-gate, for rows cut into ``segments`` segments
    of whole chunks (the mosaic backend's sequence split, ``mosaic_ops.linear_attention_mosaic``).

    Forward (every segment but the last): the state the segment ends on from a zero state,
    ``U_s = sum_t e^{B_end - B_t} k_t^T v_t`` (``B`` the segment's cumulative log-gates).
    ``reverse`` (every segment but the first; ``k, v`` then ``q, do``): the state gradient
    the segment's outputs send to the state entering it, ``R_s = sum_t e^{B_t} q_t^T do_t``
    (times the op's scale, which the caller applies).

    One Triton kernel that reads ``k`` and ``v`` in place (an XLA einsum over the ``[B, T, H,
    D]`` layout ran two transpose fusions of them first: 0.14 of its 0.22 ms on an H100 at
    (2, 16384, 16, 128), 2026-12-06), each segment walked as ``pieces`` shorter walks (more
    programs, a shorter dependent chain each; against one walk a segment untimed side by
    side) that XLA then joins by their decays (a few ``[K, V]`` steps). The summed log-gates
    come from the same walk (an XLA reduction over the middle axis of ``[B, S, P, H]`` took
    0.12 ms there).

    Args:
        k: ``[R, S * P, H, K]``, v: ``[R, S * P, H, V]`` (head dims powers of two >= 16; P a
            multiple of ``pieces * chunk``).
        b: ``[R, S * P, H]`` in-chunk inclusive cumsums of the log-gates (float32), or None.
        segments: S (>= 2). chunk: L. pieces: walks a segment (>= 1). reverse: as above.
        num_warps, num_stages: Triton launch knobs (None warps: 8 for a ``[128, 128]``
            state block, else 4). interpret: None: off a GPU.

    Returns:
        ``(U or R [R, S - 1, H, K, V] float32, log_decay [R, S - 1, H] float32)`` (zeros
        without gates), for segments ``0 .. S - 2`` (forward) or ``1 .. S - 1`` (reverse).
    """
    rows, total, heads, key_dim = k.shape
    value_dim = v.shape[3]
    if segments < 2 or pieces < 1 or total % (segments * pieces * chunk):
        raise ValueError(f"segments, pieces: expected >= 2 segments of >= 1 pieces of whole "
                         f"chunks of {chunk} in {total} tokens, got {segments} and {pieces}")
    length = total // (segments * pieces)  # tokens a piece
    n = (segments - 1) * pieces  # the pieces walked a row: one segment's are not needed
    block_k, block_v = segment_blocks(key_dim, value_dim)
    if num_warps is None:
        num_warps = 8 if block_k * block_v >= 128 * 128 else 4
    interpret = interpret_mode() if interpret is None else interpret
    kernel = functools.partial(_segment_states_kernel, heads=heads, pieces=n,
                               first=pieces if reverse else 0, length=length, chunk=chunk,
                               block_k=block_k, block_v=block_v, reverse=reverse,
                               interpret=interpret)
    outs = dict(out=jax.ShapeDtypeStruct((rows, n, heads, key_dim, value_dim), F32),
                decay=jax.ShapeDtypeStruct((rows, n, heads), F32))
    grid = (key_dim // block_k, value_dim // block_v, rows * n * heads)
    res = named_pallas_call(kernel, inputs=dict(k=k, v=v, b=b), outputs=outs, grid=grid,
                            interpret=interpret,
                            compiler_params=compiler_params(num_warps, num_stages))
    # [R, (S - 1) * pieces, ..] -> [R, S - 1, pieces, ..]
    own = res["out"].reshape(rows, segments - 1, pieces, heads, key_dim, value_dim)
    log_decay = res["decay"].reshape(rows, segments - 1, pieces, heads)
    if pieces > 1:
        # forward: a piece's state decays through the later pieces of its segment (their
        # log-gates: a reverse cumsum shifted by one piece); reverse: a piece's gradient
        # reaches its segment's start through the earlier ones (a cumsum shifted the other
        # way). No difference of two sums either way.
        zero = jnp.zeros_like(log_decay[:, :, :1])
        if reverse:
            before = jnp.cumsum(log_decay[:, :, :-1], axis=2)  # [R, S-1, pieces-1, H]
            shift = jnp.concatenate([zero, before], axis=2)
        else:
            later = jax.lax.cumsum(log_decay[:, :, 1:], axis=2, reverse=True)
            shift = jnp.concatenate([later, zero], axis=2)
        own = jnp.sum(own * jnp.exp(shift)[..., None, None], axis=2)  # -> [R, S-1, H, K, V]
    else:
        own = own[:, :, 0]  # [R, S-1, 1, H, K, V] -> [R, S-1, H, K, V]
    return own, jnp.sum(log_decay, axis=2)


# ----------------------------------------------------------------------------- backward


def _bwd_dv_kernel(*, q_ref, k_ref, do_ref, dh_ref, b_ref, dv_ref, st: CoreStatic):
    """``dv = (scale (q k^T) * Gamma)^T do (+ (k e^{b_L - b}) dS_{c+1} unless delta)``."""
    L, BK, BV = st.chunk, st.par_block_k, st.par_block_v
    r, h, c, t0, vs = _value_block(st, st.par_block_v)
    acc_at = jnp.zeros((L, L), F32)  # [key j, query i] = k_j . q_i
    acc_dv = jnp.zeros((L, BV), F32)
    for ik in range(st.key_dim // BK):
        ks = pl.ds(ik * BK, BK)
        q = q_ref[r, pl.ds(t0, L), h, ks]
        k = k_ref[r, pl.ds(t0, L), h, ks]
        acc_at += _dot(k, q, tb=True)
        if not st.delta:
            acc_dv += _dot(k, dh_ref[r, c, h, ks, vs])
    if st.gate == "scalar":
        b = b_ref[r, pl.ds(t0, L), h]
        b_last = b_ref[r, pl.ds(t0 + L - 1, 1), h]
        at = acc_at * _gamma(b, L).T
        acc_dv = acc_dv * exp_approx(b_last - b)[:, None]
    else:
        at = jnp.where(_causal(L).T, acc_at, 0.0)
    do = do_ref[r, pl.ds(t0, L), h, vs]
    dv = _dot((at * st.scale).astype(do.dtype), do) + acc_dv
    dv_ref[r, pl.ds(t0, L), h, vs] = dv.astype(dv_ref.dtype)


def _bwd_dh_kernel(*, q_ref, do_ref, k_ref, w_ref, dvi_ref, b_ref, dht_ref, seq_ref, flag_ref,
                   dh_ref, dvn_ref, dh0_ref, st: CoreStatic):
    L = st.chunk
    where = r, h, ks, vs = _state_block(st)

    def step(c, t0, ds):
        q = q_ref[r, pl.ds(t0, L), h, ks]
        do = do_ref[r, pl.ds(t0, L), h, vs]
        if st.gate == "scalar":
            b = b_ref[r, pl.ds(t0, L), h]
            b_last = b_ref[r, pl.ds(t0 + L - 1, 1), h]
            # the delta rules decay do's [L, BV] rows, not q's [L, K] ones (as in fwd_h)
            if st.delta:
                do = (do.astype(F32) * exp_approx(b)[:, None]).astype(do.dtype)
            else:
                q = (q.astype(F32) * exp_approx(b)[:, None]).astype(q.dtype)
        nxt = _dot(q, do, ta=True) * st.scale
        if st.delta:
            k = k_ref[r, pl.ds(t0, L), h, ks]
            kds = _dot(k, ds.astype(k.dtype))
            if st.gate == "scalar":
                kds = kds * exp_approx(b_last - b)[:, None]
            dvn = dvi_ref[r, pl.ds(t0, L), h, vs].astype(F32) + kds
            dvn_ref[r, pl.ds(t0, L), h, vs] = dvn.astype(dvn_ref.dtype)
            w = w_ref[r, pl.ds(t0, L), h, ks]
            nxt -= _dot(w, dvn.astype(w.dtype), ta=True)
        if st.gate == "scalar":
            return nxt + ds * exp_approx(b_last)[:, None]
        return nxt + ds

    _walk(st, where, seq_ref, flag_ref, dht_ref, dh0_ref, dh_ref, step, reverse=True)


def _bwd_dqk_kernel(*, q_ref, k_ref, v_ref, do_ref, h_ref, dh_ref, w_ref, dvn_ref, b_ref,
                    dq_ref, dk_ref, dw_ref, db_ref, st: CoreStatic):
    L, BK, BV = st.chunk, st.par_block_k, st.par_block_v
    ik, c = pl.program_id(0), pl.program_id(1)
    r, h = _row_col(st)
    t0 = c * L
    ks = pl.ds(ik * BK, BK)
    acc_dq = jnp.zeros((L, BK), F32)  # do S_c^T
    acc_dk = jnp.zeros((L, BK), F32)  # vn dS_{c+1}^T
    acc_da = jnp.zeros((L, L), F32)  # do vn^T
    acc_dw = jnp.zeros((L, BK), F32)  # dvn S_c^T
    acc_sds = jnp.zeros((), F32)  # <S_c, dS_{c+1}> over this K block
    for iv in range(st.value_dim // BV):
        vs = pl.ds(iv * BV, BV)
        do = do_ref[r, pl.ds(t0, L), h, vs]
        v = v_ref[r, pl.ds(t0, L), h, vs]
        s = h_ref[r, c, h, ks, vs]
        ds = dh_ref[r, c, h, ks, vs]
        acc_dq += _dot(do, s, tb=True)
        acc_dk += _dot(v, ds, tb=True)
        if st.gate == "scalar":
            acc_sds += jnp.sum(s.astype(F32) * ds.astype(F32))
        acc_da += _dot(do, v, tb=True)
        if st.delta:
            acc_dw += _dot(dvn_ref[r, pl.ds(t0, L), h, vs], s, tb=True)
    q = q_ref[r, pl.ds(t0, L), h, ks]
    k = k_ref[r, pl.ds(t0, L), h, ks]
    if st.gate == "scalar":
        b = b_ref[r, pl.ds(t0, L), h]
        b_last = b_ref[r, pl.ds(t0 + L - 1, 1), h]
        da = acc_da * _gamma(b, L) * st.scale
        acc_dq = acc_dq * exp_approx(b)[:, None]
        acc_dk = acc_dk * exp_approx(b_last - b)[:, None]
    else:
        da = jnp.where(_causal(L), acc_da, 0.0) * st.scale
    da = da.astype(q.dtype)
    dq = acc_dq * st.scale + _dot(da, k)
    dk = acc_dk + _dot(da, q, ta=True)
    dq_ref[r, pl.ds(t0, L), h, ks] = dq.astype(dq_ref.dtype)
    dk_ref[r, pl.ds(t0, L), h, ks] = dk.astype(dk_ref.dtype)
    if st.delta:
        dw_ref[r, pl.ds(t0, L), h, ks] = (-acc_dw).astype(dw_ref.dtype)
    if st.gate == "scalar":
        # this K block's share of dg (module doc), summed so that nothing large cancels:
        # dg_t = sum_{i >= t} [q_i.dq_i(state) + sum_{j < i} P_ij - sum_{l > i} P_li]
        #        + e^{b_L} <S_c, dS_{c+1}> + sum_{j < t} k_j.dk_j(state),
        # P_ij = dA_ij (q_i . k_j) for j < i (the i == j pairs cancel exactly and are left out)
        qf, kf = q.astype(F32), k.astype(F32)
        row, col = jax.lax.broadcasted_iota(jnp.int32, (L, L), 0), jax.lax.broadcasted_iota(
            jnp.int32, (L, L), 1)
        p = jnp.where(row > col, da.astype(F32) * _dot(q, k, tb=True), 0.0)
        term = jnp.sum(qf * acc_dq, axis=1) * st.scale + jnp.sum(p, axis=1) - jnp.sum(p, axis=0)
        kdk = jnp.sum(kf * acc_dk, axis=1)
        dg = jnp.sum(jnp.where(col >= row, term[None, :], 0.0) + jnp.where(col < row, kdk[None, :], 0.0),
                     axis=1)
        db_ref[ik, r, pl.ds(t0, L), h] = dg + exp_approx(b_last) * acc_sds


def core_backward(st: CoreStatic, res, do, dfinal):
    """Gradients of the core; returns ``(dq, dk, dv, dw, dB_parts, dh0)``.

    ``dB_parts [NK, R, TP, H]`` (scalar gate): each K block's share of the gate gradient
    ``dg`` (see the module doc).
    """
    q, k, v, w, b, h0, seq_info, flags, h, vn, final = res
    del h0, final
    R, NC, L, H, K, V = st.rows, st.n_chunks, st.chunk, st.heads, st.key_dim, st.value_dim
    TP = NC * L
    dt = q.dtype
    nk, nv = K // st.block_k, V // st.block_v
    pk, pv = K // st.par_block_k, V // st.par_block_v
    do = do.astype(dt)
    dfinal = dfinal.astype(F32)
    bg = b if st.gate == "scalar" else None
    dh_shape = jax.ShapeDtypeStruct((R, NC, H, K, V), dt)
    dh0_shape = jax.ShapeDtypeStruct((st.n_seqs, H, K, V), F32)
    # dv (the whole of it for gated linear attention; its intra-chunk part for the delta rules)
    if st.delta:
        dv_intra = _call(functools.partial(_bwd_dv_kernel, st=st), st, (pv, NC, R * H),
                         dict(q=q, k=k, do=do, dh=None, b=bg),
                         dict(dv=jax.ShapeDtypeStruct((R, TP, H, V), F32)), parallel=True)["dv"]
        ins = dict(q=q, do=do, k=k, w=w, dvi=dv_intra, b=bg, dht=dfinal, seq=seq_info, flag=flags)
        outs = dict(dh=dh_shape, dvn=jax.ShapeDtypeStruct((R, TP, H, V), dt), dh0=dh0_shape)
        res_ = _call(functools.partial(_bwd_dh_kernel, st=st), st, (nk, nv, R * H), ins, outs)
        dh, dvn, dh0 = res_["dh"], res_["dvn"], res_["dh0"]
        dv = dvn
    else:
        ins = dict(q=q, do=do, k=None, w=None, dvi=None, b=bg, dht=dfinal, seq=seq_info,
                   flag=flags)
        res_ = _call(functools.partial(_bwd_dh_kernel, st=st), st, (nk, nv, R * H), ins,
                     dict(dh=dh_shape, dvn=None, dh0=dh0_shape))
        dh, dh0 = res_["dh"], res_["dh0"]
        dvn = None
        dv = _call(functools.partial(_bwd_dv_kernel, st=st), st, (pv, NC, R * H),
                   dict(q=q, k=k, do=do, dh=dh, b=bg),
                   dict(dv=jax.ShapeDtypeStruct((R, TP, H, V), dt)), parallel=True)["dv"]
    vv = vn if st.delta else v
    ins = dict(q=q, k=k, v=vv, do=do, h=h, dh=dh, w=w if st.delta else None, dvn=dvn, b=bg)
    grad = jax.ShapeDtypeStruct((R, TP, H, K), dt)
    outs = dict(dq=grad, dk=grad, dw=grad if st.delta else None,
                db=jax.ShapeDtypeStruct((pk, R, TP, H), F32) if st.gate == "scalar" else None)
    res_ = _call(functools.partial(_bwd_dqk_kernel, st=st), st, (pk, NC, R * H), ins, outs,
                 parallel=True)
    return res_["dq"], res_["dk"], dv, res_["dw"], res_["db"], dh0


# ----------------------------------------------------------------------------- custom_vjp


def in_chunk_cumsum(g: Array, chunk: int) -> Array:
    """In-chunk inclusive cumsum of log-gates ``g [R, TP, H]`` (chunk layout), float32."""
    rows, total, heads = g.shape
    gc = g.astype(F32).reshape(rows, total // chunk, chunk, heads)
    return jnp.cumsum(gc, axis=2).reshape(g.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunk_core(st: CoreStatic, q, k, v, w, g, h0, seq_info, flags):
    """The core in the chunk layout; ``(o [R, TP, H, V], final [N, H, K, V] float32)``.

    Args:
        st: static description. q, k: ``[R, TP, H, K]``. v: ``[R, TP, H, V]`` (``u`` for the
        delta rules). w: ``[R, TP, H, K]`` or None. g: ``[R, TP, H]`` log-gates or None.
        h0: ``[N, H, K, V]`` or None. seq_info: ``[R, NC]`` int32 sequence of each chunk.
        flags: ``[R, NC]`` int32, bit 0: chunk starts its sequence, bit 1: ends it.
    """
    o, final = _core_fwd(st, q, k, v, w, g, h0, seq_info, flags)[0]
    return o, final


def _has_chunk(st: CoreStatic, seq_info: Array, flags: Array) -> Array:
    """``[N]`` bool: the sequence owns at least one chunk (length-0 packed sequences do not,
    and the kernels never write their final state or its gradient)."""
    starts = ((flags & 1) == 1).ravel()
    return jnp.zeros((st.n_seqs,), bool).at[seq_info.ravel()].max(starts)


def _core_fwd(st, q, k, v, w, g, h0, seq_info, flags):
    b = in_chunk_cumsum(g, st.chunk) if st.gate == "scalar" else None
    h0f = None if h0 is None else h0.astype(F32)
    o, h, vn, final = core_forward(st, q, k, v, w, b, h0f, seq_info, flags)
    empty_final = jnp.zeros_like(final) if h0 is None else h0f
    final = jnp.where(_has_chunk(st, seq_info, flags)[:, None, None, None], final, empty_final)
    return (o, final), (q, k, v, w, b, h0, seq_info, flags, h, vn, final)


def _core_bwd(st, res, cts):
    do, dfinal = cts
    q, k, v, w, b, h0, seq_info, flags, h, vn, final = res
    dq, dk, dv, dw, db_parts, dh0 = core_backward(st, res, do, dfinal)
    dg = None
    if st.gate == "scalar":
        dg = jnp.sum(db_parts, axis=0)  # [R, TP, H]
    if h0 is not None:  # a length-0 sequence passes its initial state straight through
        dh0 = jnp.where(_has_chunk(st, seq_info, flags)[:, None, None, None], dh0, dfinal)
        dh0 = dh0.astype(h0.dtype)
    dw = None if w is None else dw.astype(w.dtype)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dw, dg, dh0, None, None)


chunk_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------- glue


def batch_layout_info(rows: int, n_chunks: int) -> tuple[Array, Array]:
    """``(seq_info [R, NC] int32, flags [R, NC] int32)`` of batch rows: one sequence per
    row, starting at its first chunk (flag 1) and ending at its last (flag 2)."""
    seq_info = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], (rows, n_chunks))
    c = jnp.arange(n_chunks)
    flags = jnp.where(c == 0, 1, 0) | jnp.where(c == n_chunks - 1, 2, 0)
    return seq_info, jnp.broadcast_to(flags.astype(jnp.int32)[None], (rows, n_chunks))


def chunk_layout_info(plan) -> tuple[Array, Array]:
    """``(seq_info [R, NC] int32, flags [R, NC] int32)`` for a :class:`ChunkPlan`."""
    if not plan.packed:
        return batch_layout_info(plan.rows, plan.n_chunks)
    seq = plan.seq_of_chunk.astype(jnp.int32)
    c = jnp.arange(plan.n_chunks, dtype=jnp.int32)
    last = plan.last_chunk[seq] == c
    flags = jnp.where(plan.reset, 1, 0) | jnp.where(last, 2, 0)
    return seq[None], flags.astype(jnp.int32)[None]
