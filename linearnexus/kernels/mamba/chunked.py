"""Chunked selective scan: chunks of L tokens, a sequential scan across chunks.

The sequence is cut into ``T/L`` chunks (T padded up with ``dt = 0``, which leaves the
state untouched: decay ``exp(0) = 1`` and input ``0``; the padded outputs are stripped).
Across chunks a ``lax.scan`` carries the ``[B, C, N]`` state; each chunk body is wrapped in
``jax.checkpoint`` so the backward pass keeps only one state per chunk boundary and
recomputes the per-token states of one chunk at a time (memory ``T/L * B*C*N`` instead of
``T * B*C*N``).

Two forms of the chunk body, same result:

* ``"scan"``: the L steps written out (unrolled up to 16) so XLA fuses the chunk into one
  loop body. Fastest on the CPU (see ``docs/features/mamba.md``).
* ``"assoc"``: a parallel ``lax.associative_scan`` over the chunk of the affine maps
  ``h -> a*h + u`` (depth ``log L``): parallel over the chunk, for accelerators.

Packed sequences (``cu_seqlens``, B == 1) use the shared chunk layout
(``kernels/common/chunking.py``): each sequence is gathered to start on a fresh chunk (its
last chunk padded with ``dt = 0``), the carried state restarts from the sequence's initial
state at its first chunk, and its final state is the state after its last chunk.

Unlike Mamba2's scalar-per-head decay, S6's decay differs per (channel, state) pair, so
there is no matmul (SSD) form without an ``L x L x C x N`` tensor; we measured that and the
unstable ``exp(cumsum)`` trick and dropped both (numbers in the doc).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array, state_dtype
from linearnexus.kernels.common.chunking import (
    from_chunks,
    maybe_tune_cpu_malloc,
    plan_chunks,
    scan_chunk_states,
)
from linearnexus.kernels.common.chunking import to_chunks as to_chunk_layout
from linearnexus.kernels.mamba.reference import apply_skip_and_gate, selective_state_update

ChunkForm = Literal["scan", "assoc"]


def default_chunk_form(platform: str) -> ChunkForm:
    """``"scan"`` on the CPU (measured fastest), ``"assoc"`` on GPU / TPU (parallel)."""
    return "scan" if platform == "cpu" else "assoc"


def _affine_combine(left: tuple[Array, Array], right: tuple[Array, Array]) -> tuple[Array, Array]:
    # composing h -> a_l h + u_l, then h -> a_r h + u_r
    a_l, u_l = left
    a_r, u_r = right
    return a_l * a_r, a_r * u_l + u_r


def selective_scan_chunked(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    D: Array | None = None,
    z: Array | None = None,
    initial_state: Array | None = None,
    chunk_size: int = 16,
    form: ChunkForm = "scan",
    cu_seqlens: Array | None = None,
) -> tuple[Array, Array]:
    """Chunked selective scan; same contract as ``selective_scan_reference``.

    Args:
        x, dt: ``[B, T, C]``. A: ``[C, N]``. B, C: ``[B, T, N]``. D: ``[C]``.
        z: ``[B, T, C]``. initial_state: ``[B, C, N]`` (``[N_seq, C, N]`` packed) or None.
        chunk_size: tokens per chunk (L).
        form: ``"scan"`` or ``"assoc"`` chunk body.
        cu_seqlens: ``[N_seq + 1]`` int offsets of packed sequences (B == 1; may be traced)
            or None.

    Returns:
        ``(y [B, T, C], final_state [B or N_seq, C, N] float32 / float64)``.
    """
    if form not in ("scan", "assoc"):
        raise ValueError(f"form: expected 'scan' or 'assoc', got {form!r}")
    batch, seq, channels = x.shape
    n_state = A.shape[1]
    sd = state_dtype(x.dtype)
    L = chunk_size
    A_c = A.astype(sd)
    maybe_tune_cpu_malloc()

    if form == "scan":

        def chunk_body(h, chunk):
            def step(h, inputs):
                x_t, dt_t, b_t, c_t = inputs
                return selective_state_update(h, x_t, dt_t, A_c, b_t, c_t)

            # full unroll up to 16 steps (measured fastest); past that compile time grows
            return jax.lax.scan(step, h, chunk, unroll=min(L, 16))

    else:

        def chunk_body(h, chunk):
            x_c, dt_c, b_c, c_c = (a.astype(sd) for a in chunk)  # [L, R, .]
            decay = jnp.exp(dt_c[..., None] * A_c)  # [L, R, C, N]
            inp = (dt_c * x_c)[..., None] * b_c[:, :, None, :]  # [L, R, C, N]
            inp = inp.at[0].add(decay[0] * h)  # fold the carried state into step 0
            _, hs = jax.lax.associative_scan(_affine_combine, (decay, inp), axis=0)
            y = jnp.einsum("lbcn,lbn->lbc", hs, c_c)
            return hs[-1], y

    body = jax.checkpoint(chunk_body)
    if cu_seqlens is None:
        # batch rows: time-major chunks [T'/L, L, B, F], padded with dt = 0 (state unchanged)
        n_chunks = -(-seq // L)

        def to_chunks(a: Array) -> Array:
            a = jnp.pad(a, ((0, 0), (0, n_chunks * L - seq), (0, 0)))
            a = jnp.swapaxes(a, 0, 1)  # [B, T', F] -> [T', B, F]
            return a.reshape(n_chunks, L, batch, a.shape[-1])  # -> [T'/L, L, B, F]

        h0 = (jnp.zeros((batch, channels, n_state), sd) if initial_state is None
              else initial_state.astype(sd))
        h, y = jax.lax.scan(body, h0, tuple(to_chunks(a) for a in (x, dt, B, C)))
        y = jnp.swapaxes(y.reshape(n_chunks * L, batch, channels)[:seq], 0, 1)  # [B, T, C]
    else:
        # packed: every sequence on a fresh chunk of one row; the state restarts at each
        plan = plan_chunks(batch, seq, L, cu_seqlens)
        xs = tuple(to_chunk_layout(a, plan) for a in (x, dt, B, C))  # [1, NC, L, F]

        def step(h, *chunk):  # [1, L, F] each; the body runs time-major [L, 1, F]
            h, y = body(h, tuple(jnp.swapaxes(a, 0, 1) for a in chunk))
            return h, jnp.swapaxes(y, 0, 1)  # y: [L, 1, C] -> [1, L, C]

        _, y, h = scan_chunk_states(step, xs, plan, initial_state, (channels, n_state), sd)
        y = from_chunks(y, plan)  # [1, NC, L, C] -> [1, T, C]; h: [N_seq, C, N]
    y = apply_skip_and_gate(y, x, D, z)
    return y.astype(x.dtype), h
