"""Pallas Mosaic TPU kernels for the chunked linear-attention core, forward and backward.

One core serves ``simple_gla`` (and through it ``ssd`` / ``retention``), ``delta_rule`` and
``gated_delta_rule``; ``gla`` (a gate per key dimension) adds a per-key decay to the same
walk. Per chunk of L tokens entering with state ``S [K, V]`` (float32)::

    vn  = v                                  (gated linear attention)
    vn  = u - w S                            (delta rules: u, w from the WY form)
    o   = scale * [ (q * e^b) S + ((q k^T) * Gamma) vn ]
    S'  = e^{b_L} S + (k * e^{b_L - b})^T vn

with ``b`` the inclusive in-chunk sum of log-gates (0 without a gate) and
``Gamma_ij = exp(b_i - b_j)`` for ``j <= i``, else 0. (``kernels/common/pallas_chunk.py``
is the Triton version of the same algebra, ``docs/tpu.md`` the TPU design.)

Two kernels, each one sequential walk over the chunks of one (row, head):

* ``fwd`` (grid ``[rows x heads, chunks]``): per chunk the output, the entering state
  (stored for the backward), ``vn`` (delta rules) and, at a sequence's last chunk, its
  final state. The state lives in a VMEM scratch buffer across grid steps.
* ``bwd`` (same grid, chunks visited last to first): with the stored entering state ``S``
  and the carried gradient ``dS'`` of the state leaving the chunk, every gradient of the
  chunk at once (``dq, dk, dv, dw`` and the gate's), then ``dS`` for the chunk before.

The chunk axis of the grid is "arbitrary" (sequential on one core, in order), the
rows x heads axis "parallel" (split across the TensorCores of a megacore chip). Packed
sequences (``cu_seqlens``) each start on a fresh chunk; two scalar-prefetched int32 tables
(SMEM) give each chunk's sequence and whether it opens / closes it, and the index maps of
the initial / final state blocks read them.

The gate gradient is chunk-local and summed with the grouping of ``pallas_chunk.py`` (no
pair of large terms that cancel):
``dg_t = sum_{i >= t} [q_i.dq_i(state) + sum_{j<i} P_ij - sum_{l>i} P_li]
+ e^{b_L} <S, dS'> + sum_{j<t} k_j.dk_j(state)``, ``P_ij = dA_ij (q_i . k_j)``.

GLA's in-chunk scores (a decay per key dim) go by 16-token query sub-chunks
(:func:`_key_blocks`): keys before the sub-chunk through the split decay
``exp(b_i - b_i0) exp(b_i0 - b_j)`` (both <= 1) as one MXU matmul, the 16 x 16 diagonal
block exactly per key dim on the VPU. Its gate gradient is ``dg_t = sum_{i >= t} db_i`` per
key dim, with ``db`` gathered from every place ``b`` enters (not regrouped; checked at
log-gates near -20 against the recurrence: 5e-5 relative).

TPU layout: tensors go in as ``[rows x heads, tokens, D]`` with D padded to a multiple of
the lane width (128) and tokens to whole chunks (L a multiple of 8; 128 by default, the
MXU edge), so every block is a whole number of (8, 128) tiles; log-gate sums come twice, as
a column ``[L, 1]`` (to scale rows) and a row ``[1, L]`` (for ``b_i - b_j``), so the kernels
never transpose a vector. The VMEM a call needs is computed from its shape before launch
(:func:`vmem_bytes`) and a call over the budget is refused (:class:`TpuVmemError`).

Off a TPU the kernels run in Pallas's TPU interpret mode (``pltpu.InterpretParams``) when
``LINEARNEXUS_PALLAS_TPU_INTERPRET=1``: the same kernel code, its grid, block copies and
scratch buffers simulated on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from linearnexus.core.types import Array
from linearnexus.kernels.base import UnsupportedArgument, current_platform

F32 = jnp.float32
LANE = 128
SUBLANE = 8
#: set to "1" to run the TPU kernels through Pallas's TPU interpreter on a CPU (or GPU)
INTERPRET_ENV = "LINEARNEXUS_PALLAS_TPU_INTERPRET"
#: VMEM a kernel may use, in bytes (passed to Mosaic as ``vmem_limit_bytes``), at most: on
#: a TPU the budget is the smaller of this and 3/4 of the chip's VMEM per core
#: (``pltpu.get_tpu_info``: 128 MiB on v5e / v6e, 64 MiB on v5p / v7x, 16 MiB on v4), the
#: rest left to Mosaic's own scratch. ``LINEARNEXUS_TPU_VMEM_BYTES`` overrides it.
DEFAULT_VMEM_BUDGET = 32 * 1024 * 1024
VMEM_ENV = "LINEARNEXUS_TPU_VMEM_BYTES"


class TpuVmemError(ValueError):
    """A call whose blocks and scratch would not fit the VMEM budget (raised before launch)."""


def interpret_requested() -> bool:
    """Whether ``LINEARNEXUS_PALLAS_TPU_INTERPRET=1`` asks for the TPU interpreter."""
    return os.environ.get(INTERPRET_ENV) == "1"


def run_mode() -> bool:
    """``interpret`` for the launch: False on a TPU, True when the interpreter is asked for.

    Raises:
        NotImplementedError: not on a TPU and the interpreter was not asked for.
    """
    if current_platform() == "tpu":
        return interpret_requested()
    if interpret_requested():
        return True
    raise NotImplementedError(
        f"pallas_tpu: the TPU kernels need a TPU (default device here: {current_platform()!r}); "
        f"set {INTERPRET_ENV}=1 to run them through Pallas's TPU interpreter on this machine "
        "(slow: for tests), or use backend='jax'")


def vmem_budget() -> int:
    """The VMEM budget in bytes: ``LINEARNEXUS_TPU_VMEM_BYTES``, else
    :data:`DEFAULT_VMEM_BUDGET` capped at 3/4 of the TPU's VMEM per core (on a TPU)."""
    raw = os.environ.get(VMEM_ENV)
    if raw is None:
        if current_platform() != "tpu":
            return DEFAULT_VMEM_BUDGET
        try:
            capacity = pltpu.get_tpu_info().vmem_capacity_bytes
        except ValueError:  # a chip this JAX does not know: keep the default
            return DEFAULT_VMEM_BUDGET
        return min(DEFAULT_VMEM_BUDGET, capacity * 3 // 4)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{VMEM_ENV}: expected a positive int (bytes), got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{VMEM_ENV}: expected a positive int (bytes), got {value}")
    return value


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class TpuStatic:
    """The static description of one core call (hashable: it keys the compiled kernels).

    Attributes:
        gate: "none", "scalar" (a log-gate per head and step) or "key" (one per key dim, GLA).
        delta: whether ``w`` is given (the delta rules).
        has_h0: whether an initial state is given.
        scale: multiplies q.
        rows, heads, n_chunks, chunk, key_dim, value_dim, n_seqs: R, H, NC, L, Kp, Vp, N
            (head dims already padded to the lane width).
        interpret: run through the TPU interpreter.
    """

    gate: str
    delta: bool
    has_h0: bool
    scale: float
    rows: int
    heads: int
    n_chunks: int
    chunk: int
    key_dim: int
    value_dim: int
    n_seqs: int
    interpret: bool


# ----------------------------------------------------------------------------- VMEM


def _tile_bytes(shape: tuple[int, int], itemsize: int) -> int:
    """Bytes of a 2-D VMEM block: rows padded to 8 sublanes, columns to 128 lanes."""
    return round_up(shape[0], SUBLANE) * round_up(shape[1], LANE) * itemsize


def vmem_bytes(st: TpuStatic, itemsize: int) -> dict[str, int]:
    """VMEM the larger of the two kernels (the backward) needs, by part, in bytes.

    Every block is double-buffered by the Pallas pipeline (the next grid step's copy runs
    during this one); the state scratch is single; the in-kernel temporaries are the
    ``[L, L]`` float32 matrices (scores, decays, their gradients: 6 live at once) and the
    ``[L, D]`` float32 intermediates (8 live at once). Args: ``itemsize`` of the inputs.
    """
    L, K, V = st.chunk, st.key_dim, st.value_dim
    kg = st.gate == "key"
    # backward blocks: q, k, (w), do, v/vn, dq, dk, (dw), dv, gates, S, dS', dh0
    token_blocks = (2 + st.delta) * _tile_bytes((L, K), itemsize) + 2 * _tile_bytes((L, V), itemsize)
    token_blocks += (2 + st.delta) * _tile_bytes((L, K), itemsize) + _tile_bytes((L, V), itemsize)
    if st.gate == "scalar":
        token_blocks += 2 * _tile_bytes((L, 1), 4) + _tile_bytes((1, L), 4)
    elif kg:  # b (read), dg (written), the chunk's last sums [K, 1]
        token_blocks += 2 * _tile_bytes((L, K), 4) + _tile_bytes((K, 1), 4)
    state_blocks = 3 * _tile_bytes((K, V), 4)
    parts = {
        "blocks (x2, double-buffered)": 2 * (token_blocks + state_blocks),
        "state scratch": _tile_bytes((K, V), 4),
        "[L, L] temporaries": 6 * _tile_bytes((L, L), 4),
        "[L, D] temporaries": 8 * _tile_bytes((L, max(K, V)), 4),
    }
    if kg:  # GLA's diagonal blocks: up to 4 live [16, 16, K] float32 arrays, and the split
        # decays of the keys ([L, K] x 2)
        parts["GLA sub-chunk temporaries"] = 4 * 16 * _tile_bytes((16, K), 4) + 2 * _tile_bytes((L, K), 4)
    return parts


def check_vmem(st: TpuStatic, itemsize: int, shape_desc: str) -> int:
    """Raise :class:`TpuVmemError` (before any launch) when the call does not fit; else the
    bytes to ask Mosaic for (the budget)."""
    parts = vmem_bytes(st, itemsize)
    need, budget = sum(parts.values()), vmem_budget()
    if need > budget:
        detail = ", ".join(f"{k}: {v / 2**20:.2f} MiB" for k, v in parts.items())
        raise TpuVmemError(
            f"pallas_tpu: {shape_desc} with chunk {st.chunk} (head dims padded to K={st.key_dim}, "
            f"V={st.value_dim}) needs {need / 2**20:.2f} MiB of VMEM ({detail}), over the "
            f"budget of {budget / 2**20:.2f} MiB; use a smaller chunk_size, or raise {VMEM_ENV} "
            "if the chip has the room")
    return budget


# ----------------------------------------------------------------------------- helpers


def _dot(a: Array, b: Array, *, ta: bool = False, tb: bool = False) -> Array:
    """``a @ b`` with either operand transposed, float32 accumulation (exact for float32).

    Written as ``dot_general`` on the contracting dims so Mosaic feeds the MXU the
    transposed operand directly."""
    dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jax.lax.dot_general(a, b, dims, preferred_element_type=F32, precision=precision)


def _iota(length: int) -> tuple[Array, Array]:
    return (jax.lax.broadcasted_iota(jnp.int32, (length, length), 0),
            jax.lax.broadcasted_iota(jnp.int32, (length, length), 1))


def _chunk_flags(st: TpuStatic, seq_ref, flag_ref, c):
    """``(starts, ends)`` of chunk ``c`` of this program's row: whether it opens / closes its
    sequence (bits 0 / 1 of the flag table)."""
    # lax.div / lax.rem, not // and %: jnp's floor division lowers through `sign`, which
    # Mosaic lowers per TPU generation (and the operands are never negative)
    r = jax.lax.div(pl.program_id(0), st.heads)
    flag = flag_ref[r * st.n_chunks + c]
    return (flag & 1) == 1, (flag & 2) == 2


def _decays(st: TpuStatic, bc_ref, br_ref):
    """``(e^b [L, 1 or K], e^{b_L - b} [L, 1 or K], e^{b_L} [1, 1 or K], Gamma [L, L] or None)``
    of the chunk's gate (all ones / causal mask without one). ``Gamma`` for the per-key gate
    is not a matrix (the decay depends on the key dim) and is None."""
    L = st.chunk
    row, col = _iota(L)
    if st.gate == "none":
        one = jnp.ones((1, 1), F32)
        return one, one, one, (row >= col).astype(F32)
    if st.gate == "scalar":
        bc = bc_ref[...]  # [L, 1] column
        br = br_ref[...]  # [1, L] row
        b_last = br[:, L - 1:]  # [1, 1]
        gamma = jnp.exp(jnp.where(row >= col, bc - br, -jnp.inf))  # [L, L]
        return jnp.exp(bc), jnp.exp(b_last - bc), jnp.exp(b_last), gamma
    b = bc_ref[...]  # [L, K] per-key in-chunk sums
    b_last = b[L - 1:, :]  # [1, K]
    return jnp.exp(b), jnp.exp(b_last - b), jnp.exp(b_last), None


def _sub(st: TpuStatic) -> int:
    """GLA's sub-chunk: 16 tokens (8 when the chunk is not a multiple of 16)."""
    return 16 if st.chunk % 16 == 0 else SUBLANE


def _key_blocks(st: TpuStatic, q: Array, k: Array, b: Array, i0: int):
    """The factors of GLA's scores for the query rows ``[i0, i0 + c)`` of the chunk.

    Off the diagonal block (keys ``j < i0``) the decay splits at the sub-chunk's first token:
    ``exp(b_i - b_j) = exp(b_i - b_i0) exp(b_i0 - b_j)``, both factors <= 1, so
    ``A = q_t k_t^T`` is one MXU matmul with nothing overflowing. Inside the diagonal block
    the decay is formed exactly per key dim (a ``[c, c, K]`` array), as masked differences.

    Returns ``(q_t [c, K], e_q [c, K], k_t [L, K], e_k [L, K], decay [c, c, K], place
    [c, L])``; ``place`` moves a ``[c, c]`` block to columns ``[i0, i0 + c)`` by a matmul
    (exact for float32 at full precision; no lane-unaligned concatenation)."""
    L, c = st.chunk, _sub(st)
    b_i = b[i0:i0 + c]  # [c, K]
    b_0 = b[i0:i0 + 1]  # [1, K]
    e_q = jnp.exp(b_i - b_0)
    q_t = q[i0:i0 + c] * e_q
    j = jax.lax.broadcasted_iota(jnp.int32, (L, 1), 0)
    e_k = jnp.exp(jnp.where(j < i0, b_0 - b, -jnp.inf))  # [L, K]: 0 from row i0 on
    k_t = k * e_k
    ii = jax.lax.broadcasted_iota(jnp.int32, (c, c, 1), 0)
    jj = jax.lax.broadcasted_iota(jnp.int32, (c, c, 1), 1)
    decay = jnp.exp(jnp.where(ii >= jj, b_i[:, None, :] - b_i[None, :, :], -jnp.inf))
    place = (jax.lax.broadcasted_iota(jnp.int32, (c, L), 1)
             == i0 + jax.lax.broadcasted_iota(jnp.int32, (c, L), 0)).astype(F32)
    return q_t, e_q, k_t, e_k, decay, place


def _key_scores(st: TpuStatic, q: Array, k: Array, bc_ref) -> Array:
    """GLA's in-chunk scores ``A_ij = sum_d q_id k_jd exp(b_id - b_jd)`` for ``j <= i``, one
    ``[c, L]`` block of query rows at a time (:func:`_key_blocks`): ``[L, L]`` float32."""
    L, c = st.chunk, _sub(st)
    b = bc_ref[...]  # [L, K]
    qf, kf = q.astype(F32), k.astype(F32)
    dt = q.dtype
    blocks = []
    for i0 in range(0, L, c):
        q_t, _, k_t, _, decay, place = _key_blocks(st, qf, kf, b, i0)
        q_i, k_i = qf[i0:i0 + c], kf[i0:i0 + c]
        diag = jnp.sum(q_i[:, None, :] * k_i[None, :, :] * decay, axis=2)  # [c, c]
        block = _dot(diag, place)  # [c, L]
        if i0:
            block = block + _dot(q_t.astype(dt), k_t.astype(dt), tb=True)
        blocks.append(block)
    return jnp.concatenate(blocks, axis=0)  # [L, L]


def _key_score_grads(st: TpuStatic, q: Array, k: Array, da: Array, bc_ref):
    """Gradients of :func:`_key_scores` for the cotangent ``da [L, L]`` (causal): ``(dq [L, K],
    dk [L, K], db [L, K])``, ``db`` the gradient of the in-chunk sums ``b``.

    Off the diagonal block, ``q_t = q e^{b - b_i0}`` and ``k_t = k e^{b_i0 - b}`` give
    ``db_i += q_t.dq_t``, ``db_j -= k_t.dk_t`` and the split point ``b_i0`` the difference of
    their sums. Inside it the pairs ``i > j`` give ``+`` to ``b_i`` and ``-`` to ``b_j`` (the
    ``i == j`` terms cancel exactly and are left out)."""
    L, c = st.chunk, _sub(st)
    b = bc_ref[...]
    qf, kf = q.astype(F32), k.astype(F32)
    dt = q.dtype
    rows = jax.lax.broadcasted_iota(jnp.int32, (L, 1), 0)
    ii = jax.lax.broadcasted_iota(jnp.int32, (c, c, 1), 0)
    jj = jax.lax.broadcasted_iota(jnp.int32, (c, c, 1), 1)
    dk = jnp.zeros_like(kf)
    db = jnp.zeros_like(kf)
    dq_blocks, dk_blocks, db_blocks = [], [], []
    for i0 in range(0, L, c):
        q_t, e_q, k_t, e_k, decay, place = _key_blocks(st, qf, kf, b, i0)
        q_i, k_i = qf[i0:i0 + c], kf[i0:i0 + c]
        da_i = da[i0:i0 + c]  # [c, L]
        # the diagonal block, exactly per key dim
        wgt = _dot(da_i, place, tb=True)[:, :, None] * decay  # [c, c, K]
        dq_i = jnp.sum(wgt * k_i[None, :, :], axis=1)  # [c, K]
        dk_blocks.append(jnp.sum(wgt * q_i[:, None, :], axis=0))  # [c, K]
        term = jnp.where(ii > jj, wgt * q_i[:, None, :] * k_i[None, :, :], 0.0)
        db_i = jnp.sum(term, axis=1) - jnp.sum(term, axis=0)  # [c, K]
        if i0:  # the keys before the sub-chunk, through the split decay
            dq_t = _dot(da_i.astype(dt), k_t.astype(dt))  # [c, K]
            dk_t = _dot(da_i.astype(dt), q_t.astype(dt), ta=True)  # [L, K]
            dq_i = dq_i + dq_t * e_q
            dk = dk + dk_t * e_k
            t_q, t_k = q_t * dq_t, k_t * dk_t
            db_i = db_i + t_q
            split = jnp.sum(t_k, axis=0, keepdims=True) - jnp.sum(t_q, axis=0, keepdims=True)
            db = db - t_k + jnp.where(rows == i0, split, 0.0)  # [L, K]
        dq_blocks.append(dq_i)
        db_blocks.append(db_i)
    dq = jnp.concatenate(dq_blocks, axis=0)
    dk = dk + jnp.concatenate(dk_blocks, axis=0)
    return dq, dk, db + jnp.concatenate(db_blocks, axis=0)


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(seq_ref, flag_ref, *refs, st: TpuStatic, names: tuple[str, ...]):
    r = dict(zip(names, refs, strict=True))
    q_ref, k_ref, v_ref = r["q"], r["k"], r["v"]
    state_ref = r["scratch"]
    c = pl.program_id(1)
    starts, ends = _chunk_flags(st, seq_ref, flag_ref, c)

    @pl.when(starts)
    def _():
        state_ref[...] = r["h0"][...] if st.has_h0 else jnp.zeros_like(state_ref)

    S = state_ref[...]  # [K, V] float32, the state entering the chunk
    r["h"][...] = S
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    dt = q.dtype
    if st.delta:
        vn = v.astype(F32) - _dot(r["w"][...], S.astype(dt))
        r["vn"][...] = vn.astype(r["vn"].dtype)
    else:
        vn = v.astype(F32)
    e_b, e_end, e_last, gamma = _decays(st, r.get("bc"), r.get("br"))
    if st.gate == "key":
        scores = _key_scores(st, q, k, r["bc"])
    else:
        scores = _dot(q, k, tb=True) * gamma  # [L, L]
    o = _dot((q.astype(F32) * e_b).astype(dt), S.astype(dt)) + _dot(scores.astype(dt), vn.astype(dt))
    r["o"][...] = (o * st.scale).astype(r["o"].dtype)
    k_end = (k.astype(F32) * e_end).astype(dt)  # [L, K] k_j e^{b_L - b_j}
    decay_rows = jnp.exp(r["bl"][...]) if st.gate == "key" else e_last  # [K, 1] or [1, 1]
    S_new = S * decay_rows + _dot(k_end, vn.astype(dt), ta=True)
    state_ref[...] = S_new

    @pl.when(ends)
    def _():
        r["final"][...] = S_new


def _bwd_kernel(seq_ref, flag_ref, *refs, st: TpuStatic, names: tuple[str, ...]):
    r = dict(zip(names, refs, strict=True))
    dS_ref = r["scratch"]
    L = st.chunk
    c = st.n_chunks - 1 - pl.program_id(1)
    starts, ends = _chunk_flags(st, seq_ref, flag_ref, c)

    @pl.when(ends)  # the walk is reversed: a sequence's last chunk comes first
    def _():
        dS_ref[...] = r["dht"][...]

    dSn = dS_ref[...]  # [K, V] gradient of the state leaving the chunk
    S = r["h"][...]  # [K, V] the state entering it
    q, k, do = r["q"][...], r["k"][...], r["do"][...]
    dt = q.dtype
    vn = (r["vn"] if st.delta else r["v"])[...]
    e_b, e_end, e_last, gamma = _decays(st, r.get("bc"), r.get("br"))
    qf, kf = q.astype(F32), k.astype(F32)
    q_start = (qf * e_b).astype(dt)  # [L, K]
    k_end = (kf * e_end).astype(dt)  # [L, K]
    if st.gate == "key":
        scores = _key_scores(st, q, k, r["bc"])
    else:
        scores = _dot(q, k, tb=True) * gamma
    # dvn = scale P^T do + k_end dS'
    dvn = _dot((scores * st.scale).astype(dt), do, ta=True) + _dot(k_end, dSn.astype(dt))
    r["dv"][...] = dvn.astype(r["dv"].dtype)
    dP = _dot(do, vn, tb=True) * st.scale  # [L, L]
    row, col = _iota(L)
    dq_state = _dot(do, S.astype(dt), tb=True) * st.scale * e_b  # [L, K]
    dk_state = _dot(vn, dSn.astype(dt), tb=True) * e_end  # [L, K]
    if st.gate == "key":
        da = jnp.where(row >= col, dP, 0.0)
        dq_intra, dk_intra, db_intra = _key_score_grads(st, q, k, da, r["bc"])
        dq = dq_state + dq_intra
        dk = dk_state + dk_intra
    else:
        da = dP * gamma  # [L, L], zero above the diagonal
        dq = dq_state + _dot(da.astype(dt), k)
        dk = dk_state + _dot(da.astype(dt), q, ta=True)
    r["dq"][...] = dq.astype(r["dq"].dtype)
    r["dk"][...] = dk.astype(r["dk"].dtype)
    decay_rows = jnp.exp(r["bl"][...]) if st.gate == "key" else e_last  # [K, 1] or [1, 1]
    dS_prev = _dot(q_start, do, ta=True) * st.scale + dSn * decay_rows
    if st.delta:
        dS_prev = dS_prev - _dot(r["w"][...], dvn.astype(dt), ta=True)
        r["dw"][...] = (-_dot(dvn.astype(dt), S.astype(dt), tb=True)).astype(r["dw"].dtype)
    if st.gate == "scalar":
        # the module doc's grouping: per-token terms summed from t on, state terms before t
        p = jnp.where(row > col, dP * scores, 0.0)  # [L, L]: dA_ij (q_i . k_j) e^{b_i - b_j}
        term = (jnp.sum(qf * dq_state, axis=1, keepdims=True) + jnp.sum(p, axis=1, keepdims=True)
                - jnp.sum(p.T, axis=1, keepdims=True))  # [L, 1]
        kdk = jnp.sum(kf * dk_state, axis=1, keepdims=True)  # [L, 1]
        upper = (col >= row).astype(F32)  # [t, i]: i >= t
        lower = (col < row).astype(F32)  # [t, j]: j < t
        # [L, L] @ [L, 128] with every column the vector: a cumulative sum on the MXU
        dg = (_dot(upper, jnp.broadcast_to(term, (L, LANE)))
              + _dot(lower, jnp.broadcast_to(kdk, (L, LANE))))[:, :1]
        carried = jnp.sum(S * dSn) * e_last  # [1, 1]: e^{b_L} <S, dS'>
        r["dg"][...] = dg + carried
    elif st.gate == "key":
        # per key dim d: dg_td = sum_{i >= t} db_id + e^{b_Ld} <S_d, dS'_d> (rows of the state),
        # with db the gradient of the in-chunk sums b (module doc, per key dim)
        db = qf * dq_state + db_intra - kf * dk_state  # [L, K]
        # <S_d, dS'_d> per key dim d as a row: a ones [8, V] x (S * dS')^T product on the MXU
        # rather than a lane reduction reshaped from a column into a row
        carried = _dot(jnp.ones((SUBLANE, st.value_dim), F32), S * dSn, tb=True)[:1]  # [1, K]
        db_last = carried * e_last + jnp.sum(kf * dk_state, axis=0, keepdims=True)
        upper = (col >= row).astype(F32)
        r["dg"][...] = _dot(upper, db) + db_last  # [L, K]
    dS_ref[...] = dS_prev

    if st.has_h0:
        @pl.when(starts)
        def _():
            r["dh0"][...] = dS_prev


# ----------------------------------------------------------------------------- launches


def _specs(st: TpuStatic, *, reverse: bool) -> dict[str, Any]:
    """Block specs by operand kind; ``reverse`` visits the chunks last to first."""
    L, K, V, H, NC = st.chunk, st.key_dim, st.value_dim, st.heads, st.n_chunks
    sq = pl.squeezed  # a block dim of 1 the kernel does not see

    def cc(c):
        return NC - 1 - c if reverse else c

    def token(rh, c, seq, flag):
        return rh, cc(c), 0

    def per_chunk(rh, c, seq, flag):
        return rh, cc(c), 0, 0

    def per_seq(rh, c, seq, flag):
        return seq[jax.lax.div(rh, H) * NC + cc(c)], jax.lax.rem(rh, H), 0, 0

    return {
        "k": pl.BlockSpec((sq, L, K), token),
        "v": pl.BlockSpec((sq, L, V), token),
        "col": pl.BlockSpec((sq, L, 1), token),
        "row": pl.BlockSpec((sq, sq, 1, L), per_chunk),
        "key_col": pl.BlockSpec((sq, sq, K, 1), per_chunk),
        "chunk_state": pl.BlockSpec((sq, sq, K, V), per_chunk),
        "seq_state": pl.BlockSpec((sq, sq, K, V), per_seq),
    }


def _launch(kernel, st: TpuStatic, *, reverse: bool, seq_info: Array, flags: Array,
            inputs: list[tuple[str, str, Array | None]],
            outputs: list[tuple[str, str, jax.ShapeDtypeStruct | None]],
            vmem_limit: int) -> dict[str, Array]:
    """One ``pallas_call`` over the grid ``[rows x heads, chunks]`` with two scalar-prefetched
    tables; ``inputs`` / ``outputs`` are ``(name, block kind, array | shape)`` (None: absent).
    The kernel gets the refs by name (``names``) plus ``"scratch"``, the ``[K, V]`` float32
    carry."""
    specs = _specs(st, reverse=reverse)
    ins = [(n, kind, a) for n, kind, a in inputs if a is not None]
    outs = [(n, kind, s) for n, kind, s in outputs if s is not None]
    names = tuple(n for n, _, _ in ins) + tuple(n for n, _, _ in outs) + ("scratch",)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(st.rows * st.heads, st.n_chunks),
        in_specs=[specs[kind] for _, kind, _ in ins],
        out_specs=[specs[kind] for _, kind, _ in outs],
        scratch_shapes=[pltpu.VMEM((st.key_dim, st.value_dim), F32)],
    )
    call = pl.pallas_call(
        functools.partial(kernel, st=st, names=names),
        grid_spec=grid_spec,
        out_shape=[s for _, _, s in outs],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit),
        interpret=pltpu.InterpretParams() if st.interpret else False,
        name=getattr(kernel, "__name__", "kernel").strip("_"),
    )
    results = call(seq_info, flags, *(a for _, _, a in ins))
    return dict(zip((n for n, _, _ in outs), results, strict=True))


def _gate_inputs(st: TpuStatic, b: Array | None) -> list[tuple[str, str, Array | None]]:
    """The gate's operands: ``b [RH, TP]`` as a column and a row (scalar gate), or
    ``b [RH, TP, K]`` (per key)."""
    if st.gate == "scalar":
        RH = st.rows * st.heads
        return [("bc", "col", b[..., None]),  # [RH, TP] -> [RH, TP, 1]
                ("br", "row", b.reshape(RH, st.n_chunks, 1, st.chunk))]  # -> [RH, NC, 1, L]
    if st.gate == "key":  # and the chunk's last sums as a column, to decay the state's rows
        last = b.reshape(b.shape[0], st.n_chunks, st.chunk, -1)[:, :, -1, :, None]  # [RH, NC, K, 1]
        return [("bc", "k", b), ("bl", "key_col", last)]
    return []


def in_chunk_cumsum(st: TpuStatic, g: Array) -> Array:
    """Inclusive in-chunk cumsum of log-gates ``g [RH, TP(, K)]``, float32, same shape."""
    RH = g.shape[0]
    gc = g.astype(F32).reshape(RH, st.n_chunks, st.chunk, *g.shape[2:])  # [RH, NC, L(, K)]
    return jnp.cumsum(gc, axis=2).reshape(g.shape)


def _core_fwd(st: TpuStatic, vmem_limit: int, q, k, v, w, g, h0, seq_info, flags):
    b = None if g is None else in_chunk_cumsum(st, g)
    RH, TP = q.shape[0], q.shape[1]
    K, V = st.key_dim, st.value_dim
    outs = _launch(
        _fwd_kernel, st, reverse=False, seq_info=seq_info, flags=flags,
        inputs=[("q", "k", q), ("k", "k", k), ("v", "v", v), ("w", "k", w),
                *_gate_inputs(st, b), ("h0", "seq_state", h0)],
        outputs=[("o", "v", jax.ShapeDtypeStruct((RH, TP, V), v.dtype)),
                 ("h", "chunk_state", jax.ShapeDtypeStruct((RH, st.n_chunks, K, V), F32)),
                 ("vn", "v", jax.ShapeDtypeStruct((RH, TP, V), v.dtype) if st.delta else None),
                 ("final", "seq_state", jax.ShapeDtypeStruct((st.n_seqs, st.heads, K, V), F32))],
        vmem_limit=vmem_limit)
    owned = _has_chunk(st, seq_info, flags)[:, None, None, None]
    empty = jnp.zeros_like(outs["final"]) if h0 is None else h0
    final = jnp.where(owned, outs["final"], empty)
    res = (q, k, v, w, b, seq_info, flags, outs["h"], outs.get("vn"))
    return (outs["o"], final), res


def _has_chunk(st: TpuStatic, seq_info: Array, flags: Array) -> Array:
    """``[N]`` bool: the sequence owns a chunk (a length-0 packed sequence owns none, and the
    kernels never write its final state or its gradient)."""
    starts = (flags & 1) == 1
    return jnp.zeros((st.n_seqs,), bool).at[seq_info].max(starts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def tpu_core(st: TpuStatic, vmem_limit: int, q, k, v, w, g, h0, seq_info, flags):
    """The core in the TPU layout; ``(o [RH, TP, Vp], final [N, H, Kp, Vp] float32)``.

    Args:
        st: static description. vmem_limit: bytes for Mosaic (already checked).
        q, k: ``[RH, TP, Kp]``. v: ``[RH, TP, Vp]`` (``u`` for the delta rules).
        w: ``[RH, TP, Kp]`` or None. g: log-gates ``[RH, TP]`` (scalar), ``[RH, TP, Kp]``
        (per key) or None. h0: ``[N, H, Kp, Vp]`` float32 or None.
        seq_info, flags: ``[R * NC]`` int32, each chunk's sequence and its open / close bits.
    """
    return _core_fwd(st, vmem_limit, q, k, v, w, g, h0, seq_info, flags)[0]


def _core_bwd(st: TpuStatic, vmem_limit: int, res, cts):
    q, k, v, w, b, seq_info, flags, h, vn = res
    has_h0 = st.has_h0
    do, dfinal = cts
    RH, TP = q.shape[0], q.shape[1]
    K, V = st.key_dim, st.value_dim
    dt = q.dtype
    dg_shape = None
    if st.gate == "scalar":
        dg_shape = jax.ShapeDtypeStruct((RH, TP, 1), F32)
    elif st.gate == "key":
        dg_shape = jax.ShapeDtypeStruct((RH, TP, K), F32)
    grads = _launch(
        _bwd_kernel, st, reverse=True, seq_info=seq_info, flags=flags,
        inputs=[("q", "k", q), ("k", "k", k), ("v", "v", None if st.delta else v),
                ("vn", "v", vn), ("w", "k", w), *_gate_inputs(st, b),
                ("do", "v", do.astype(dt)), ("h", "chunk_state", h),
                ("dht", "seq_state", dfinal.astype(F32))],
        outputs=[("dq", "k", jax.ShapeDtypeStruct((RH, TP, K), dt)),
                 ("dk", "k", jax.ShapeDtypeStruct((RH, TP, K), dt)),
                 ("dv", "v", jax.ShapeDtypeStruct((RH, TP, V), dt)),
                 ("dw", "k", jax.ShapeDtypeStruct((RH, TP, K), dt) if st.delta else None),
                 ("dg", "col" if st.gate == "scalar" else "k", dg_shape),
                 ("dh0", "seq_state",
                  jax.ShapeDtypeStruct((st.n_seqs, st.heads, K, V), F32) if has_h0 else None)],
        vmem_limit=vmem_limit)
    dg = grads.get("dg")
    if st.gate == "scalar":
        dg = dg[..., 0]  # [RH, TP, 1] -> [RH, TP]
    dh0 = None
    if has_h0:  # a length-0 sequence passes its initial state straight through
        owned = _has_chunk(st, seq_info, flags)[:, None, None, None]
        dh0 = jnp.where(owned, grads["dh0"], dfinal.astype(F32))
    dw = grads.get("dw")
    return (grads["dq"].astype(q.dtype), grads["dk"].astype(k.dtype), grads["dv"].astype(v.dtype),
            None if w is None else dw.astype(w.dtype), dg, dh0, None, None)


tpu_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------- glue

_SUPPORTED = (jnp.dtype(F32), jnp.dtype(jnp.bfloat16))
#: tokens per chunk when the caller leaves it to the backend: the MXU's edge on every TPU
DEFAULT_CHUNK = 128


def check_tpu_dtype(op: str, *arrays: Array | None) -> None:
    """``NotImplementedError`` for dtypes the TPU kernels do not take (float16, float64)."""
    for a in arrays:
        if a is not None and jnp.dtype(a.dtype) not in _SUPPORTED:
            raise NotImplementedError(
                f"{op}: the pallas_tpu backend takes float32 / bfloat16 inputs, got {a.dtype}; "
                "use backend='jax' for it")


def resolve_chunk(chunk_size: int | None) -> int:
    """The chunk length: ``chunk_size`` (a multiple of 8, the sublane count) or 128."""
    if chunk_size is None:
        return DEFAULT_CHUNK
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 8 \
            or chunk_size % SUBLANE:
        raise UnsupportedArgument(f"chunk_size: the pallas_tpu backend needs a multiple of {SUBLANE} "
                         f"(128 fills the MXU), got {chunk_size!r}")
    return chunk_size


def to_tpu_layout(x: Array, plan, width: int | None) -> Array:
    """``[B, T, H(, D)]`` -> ``[R * H, NC * L(, width)]``: whole chunks (packed sequences each
    on fresh ones, :mod:`chunking`), heads folded into the rows, D zero-padded to ``width``."""
    from linearnexus.kernels.common.chunking import to_chunks

    c = to_chunks(x, plan)  # [R, NC, L, H(, D)]
    R, NC, L, H = c.shape[:4]
    c = c.reshape(R, NC * L, H, *c.shape[4:])  # [R, TP, H(, D)]
    c = jnp.moveaxis(c, 2, 1).reshape(R * H, NC * L, *c.shape[3:])  # [R * H, TP(, D)]
    if width is not None and c.shape[-1] != width:
        c = jnp.pad(c, [(0, 0), (0, 0), (0, width - c.shape[-1])])
    return c


def from_tpu_layout(y: Array, plan, heads: int, width: int) -> Array:
    """``[R * H, TP, Dp]`` -> ``[B, T, H, width]`` (padding slots and columns dropped)."""
    RH, TP = y.shape[:2]
    y = jnp.moveaxis(y.reshape(RH // heads, heads, TP, -1), 1, 2)  # [R, TP, H, Dp]
    if not plan.packed:
        y = y[:, : plan.seq]
    else:
        y = jnp.take(y[0], plan.dst, axis=0)[None]  # [T, H, Dp] -> [1, T, H, Dp]
    return y[..., :width]


def tpu_layout_info(plan) -> tuple[Array, Array]:
    """``(seq_info, flags)``, each ``[R * NC]`` int32 (flattened: scalar prefetch goes to SMEM,
    whose 2-D arrays pad their last dim to 128 words)."""
    from linearnexus.kernels.common.pallas_chunk import chunk_layout_info

    seq_info, flags = chunk_layout_info(plan)
    return seq_info.reshape(-1), flags.reshape(-1)


def run_tpu_core(st: TpuStatic, limit: int, q: Array, k: Array, v: Array, w: Array | None,
                 g: Array | None, *, initial_state: Array | None, plan, key_dim: int,
                 value_dim: int) -> tuple[Array, Array]:
    """Launch :func:`tpu_core` on inputs already in the TPU layout (VMEM already checked by
    :func:`_prepare`); return ``(o [B, T, H, V], final [N, H, K, V] float32)``.

    Args:
        q, k, w: ``[RH, TP, Kp]``; v: ``[RH, TP, Vp]``; g: ``[RH, TP(, Kp)]`` float32 or None.
        plan: the chunk plan; key_dim / value_dim: the unpadded K and V.
    """
    h0 = initial_state
    if h0 is not None:
        h0 = jnp.pad(h0.astype(F32), [(0, 0), (0, 0), (0, st.key_dim - key_dim),
                                      (0, st.value_dim - value_dim)])
    seq_info, flags = tpu_layout_info(plan)
    o, final = tpu_core(st, limit, q, k, v, w, g, h0, seq_info, flags)
    return from_tpu_layout(o, plan, st.heads, value_dim), final[:, :, :key_dim, :value_dim]


def _prepare(op: str, q: Array, k: Array, v: Array, *, gate: str, delta: bool, scale: float,
             initial_state: Array | None, chunk_size: int | None, cu_seqlens: Array | None):
    """The static description, its VMEM check (before any layout work or launch), and q, k,
    v in the TPU layout: ``(st, vmem_limit, plan, dtype, qt, kt, vt)``.

    Raises:
        NotImplementedError: not on a TPU without the interpreter switch.
        TpuVmemError: the call does not fit the VMEM budget.
    """
    from linearnexus.kernels.common.chunking import plan_chunks

    interpret = run_mode()
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[3]
    chunk = resolve_chunk(chunk_size)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    kp, vp = round_up(key_dim, LANE), round_up(value_dim, LANE)
    n_seqs = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    plan = plan_chunks(batch, seq, chunk, cu_seqlens)
    st = TpuStatic(gate=gate, delta=delta, has_h0=initial_state is not None, scale=float(scale),
                   rows=plan.rows, heads=heads, n_chunks=plan.n_chunks, chunk=chunk,
                   key_dim=kp, value_dim=vp, n_seqs=n_seqs, interpret=interpret)
    shape_desc = f"{op} (B={batch}, T={seq}, H={heads}, K={key_dim}, V={value_dim})"
    limit = check_vmem(st, jnp.dtype(dtype).itemsize, shape_desc)
    qt, kt = (to_tpu_layout(x.astype(dtype), plan, kp) for x in (q, k))
    vt = to_tpu_layout(v.astype(dtype), plan, vp)
    return st, limit, plan, dtype, qt, kt, vt


def gated_attention_tpu(op: str, q: Array, k: Array, v: Array, g: Array | None, *, gate: str,
                        scale: float, initial_state: Array | None = None,
                        cu_seqlens: Array | None = None,
                        chunk_size: int | None = None) -> tuple[Array, Array]:
    """Gated linear attention through the TPU kernels: ``gate="scalar"`` (simple_gla,
    ``g [B, T, H]`` or None) or ``"key"`` (gla, ``g [B, T, H, K]``).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; float32 or bfloat16.
        scale: multiplies q. initial_state: ``[N, H, K, V]`` or None.
        cu_seqlens: ``[N+1]`` offsets of packed sequences (B == 1) or None.
        chunk_size: L, a multiple of 8; None: 128.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.

    Raises:
        NotImplementedError: not on a TPU without the interpreter switch, or an unsupported
            dtype. TpuVmemError: the shape does not fit the VMEM budget.
    """
    from linearnexus.kernels.common.pallas_ops import floor_log_gate

    check_tpu_dtype(op, q, k, v)
    st, limit, plan, _, qt, kt, vt = _prepare(
        op, q, k, v, gate="none" if g is None else gate, delta=False, scale=scale,
        initial_state=initial_state, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    gt = None
    if g is not None:
        gt = to_tpu_layout(floor_log_gate(g), plan, st.key_dim if gate == "key" else None)
    o, final = run_tpu_core(st, limit, qt, kt, vt, None, gt, initial_state=initial_state,
                            plan=plan, key_dim=q.shape[3], value_dim=v.shape[3])
    return o.astype(v.dtype), final


def _wy(kc: Array, vc: Array, betac: Array, gc: Array | None) -> tuple[Array, Array]:
    """The delta rules' per-chunk WY form in XLA (``kernels/common/delta.py``): ``(w, u)``.

    ``kc [RH, NC, L, Kp]``, ``vc [RH, NC, L, Vp]``, ``betac [RH, NC, L, 1]``, ``gc [RH, NC, L]``
    float32 log-gates or None. Batched ``[L, L]`` matmuls over all chunks at once (no
    sequential dependence, so XLA's batched MXU matmuls serve it), autodiff for the backward.
    """
    from linearnexus.kernels.common.chunking import chunk_cumsum, pairwise_decay
    from linearnexus.kernels.common.delta import unit_lower_inverse

    hi = jax.lax.Precision.HIGHEST
    L = kc.shape[2]
    kk = jnp.einsum("ncik,ncjk->ncij", kc, kc, precision=hi)  # [RH, NC, L, L]
    strict = jnp.tril(jnp.ones((L, L), bool), -1)
    if gc is None:
        a = jnp.where(strict, kk, 0.0) * betac
        k_beta = kc * betac
    else:
        a = jnp.where(strict, kk * pairwise_decay(gc), 0.0) * betac
        k_beta = kc * (betac * jnp.exp(chunk_cumsum(gc))[..., None])
    inv = unit_lower_inverse(a)  # [RH, NC, L, L]
    w = jnp.matmul(inv, k_beta, precision=hi)  # [RH, NC, L, Kp]
    u = jnp.matmul(inv, vc * betac, precision=hi)  # [RH, NC, L, Vp]
    return w, u


def delta_rule_tpu(op: str, q: Array, k: Array, v: Array, beta: Array, g: Array | None, *,
                   scale: float, initial_state: Array | None = None,
                   cu_seqlens: Array | None = None,
                   chunk_size: int | None = None) -> tuple[Array, Array]:
    """The (gated) delta rule: the WY form in XLA, then the TPU core.

    Args:
        q, k: ``[B, T, H, K]`` (k L2-normalised). v: ``[B, T, H, V]``. beta: ``[B, T, H]``.
        g: ``[B, T, H]`` log-gates or None (ungated). Others as :func:`gated_attention_tpu`.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.
    """
    from linearnexus.kernels.common.pallas_ops import floor_log_gate

    check_tpu_dtype(op, q, k, v, beta, g)
    st, limit, plan, dtype, qt, kt, vt = _prepare(
        op, q, k, v, gate="none" if g is None else "scalar", delta=True, scale=scale,
        initial_state=initial_state, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
    kp, vp = st.key_dim, st.value_dim
    RH, TP = qt.shape[:2]
    NC, L = plan.n_chunks, plan.chunk
    gt = None if g is None else to_tpu_layout(floor_log_gate(g), plan, None)  # [RH, TP]
    betat = to_tpu_layout(beta.astype(F32), plan, None)  # [RH, TP]
    w, u = _wy(kt.astype(F32).reshape(RH, NC, L, kp), vt.astype(F32).reshape(RH, NC, L, vp),
               betat.reshape(RH, NC, L, 1), None if gt is None else gt.reshape(RH, NC, L))
    w = w.reshape(RH, TP, kp).astype(dtype)  # [RH, NC, L, Kp] -> [RH, TP, Kp]
    u = u.reshape(RH, TP, vp).astype(dtype)
    o, final = run_tpu_core(st, limit, qt, kt, u, w, gt, initial_state=initial_state,
                            plan=plan, key_dim=q.shape[3], value_dim=v.shape[3])
    return o.astype(v.dtype), final


class PallasTpuKernel:
    """The ``pallas_tpu`` backend of a linear-attention op.

    Chunk mode runs the TPU kernels (compiled by Mosaic on a TPU; through Pallas's TPU
    interpreter elsewhere when ``LINEARNEXUS_PALLAS_TPU_INTERPRET=1``, else
    ``NotImplementedError``); recurrent mode (decoding, one token at a time) runs the op's
    pure-JAX recurrent form. Automatic dispatch picks it on a TPU only, for float32 /
    bfloat16. The chunk is 128 tokens unless the caller passed ``chunk_size``.

    Args:
        chunked: ``fn(*arrays, scale=..., initial_state=..., cu_seqlens=..., chunk_size=...)``.
        recurrent: the op's pure-JAX recurrent form.
    """

    name = "pallas_tpu"
    #: shown next to the backend in the README's feature table (``linearnexus.tools.features``)
    status = "TPU: verified in interpret mode; not yet timed on hardware"

    def __init__(self, chunked, recurrent) -> None:
        self.chunked = chunked
        self.recurrent = recurrent

    def supports(self, *, platform: str, dtype: Any) -> bool:
        return platform == "tpu" and jnp.dtype(dtype) in _SUPPORTED

    def forward_chunk(self, *arrays: Array, initial_state: Array | None, grid,
                      **kwargs: Any) -> tuple[Array, Array]:
        chunk = grid.chunk_size if getattr(grid, "chunk_size_given", True) else None
        return self.chunked(*arrays, initial_state=initial_state, chunk_size=chunk, **kwargs)

    def forward_recurrent(self, *arrays: Array, initial_state: Array | None,
                          **kwargs: Any) -> tuple[Array, Array]:
        return self.recurrent(*arrays, initial_state=initial_state, **kwargs)
