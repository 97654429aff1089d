"""Per-token scans: the recurrent (decoding) form of every op, and the reference loop.

An op supplies ``step(state [R, H, K, V], *x_t) -> (next_state, o_t)`` for one token of
each row; these helpers run it over time, batch or packed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from linearnexus.core.padding import segment_ids_from_cu_seqlens
from linearnexus.core.types import Array, is_concrete
from linearnexus.kernels.common.validation import compute_dtype

Step = Callable[..., tuple[Array, Array]]


def scan_tokens(step: Step, xs: tuple[Array, ...], initial_state: Array | None,
                state_shape: tuple[int, ...], dtype) -> tuple[Array, Array]:
    """Run ``step`` over T for every row at once.

    Args:
        step: one-token update (see module doc).
        xs: per-token inputs, each ``[B, T, ...]``.
        initial_state: ``[B, H, K, V]`` or None (zeros).
        state_shape: ``(H, K, V)``. dtype: state dtype.

    Returns:
        ``(o [B, T, ...], final_state [B, H, K, V])``.
    """
    batch = xs[0].shape[0]
    start = (jnp.zeros((batch, *state_shape), dtype) if initial_state is None
             else initial_state.astype(dtype))
    xs_t = tuple(jnp.moveaxis(x, 1, 0) for x in xs)  # [B, T, ...] -> [T, B, ...]
    final, o = jax.lax.scan(lambda s, x_t: step(s, *x_t), start, xs_t)
    return jnp.moveaxis(o, 0, 1), final  # [T, B, ...] -> [B, T, ...]


def scan_tokens_packed(step: Step, xs: tuple[Array, ...], initial_state: Array | None,
                       state_shape: tuple[int, ...], dtype, cu_seqlens: Array) -> tuple[Array, Array]:
    """Run ``step`` over packed sequences (B == 1): the state restarts at each sequence.

    Works with a traced ``cu_seqlens``. The final state of sequence n is recorded when its
    last token is processed; an empty sequence keeps its initial state.

    Returns:
        ``(o [1, T, ...], final_state [N, *state_shape])`` (``state_shape`` is ``(H, K, V)``
        for the linear-attention ops, ``(C, N)`` for the selective scan).
    """
    cu = jnp.asarray(cu_seqlens).astype(jnp.int32)
    n_seqs = cu.shape[0] - 1
    seq = xs[0].shape[1]
    seg = segment_ids_from_cu_seqlens(cu, seq)  # [T]
    token = jnp.arange(seq, dtype=jnp.int32)
    is_first = token == cu[seg]
    is_last = token == cu[seg + 1] - 1
    starts = (jnp.zeros((n_seqs, *state_shape), dtype) if initial_state is None
              else initial_state.astype(dtype))
    xs_t = tuple(x[0] for x in xs)  # [1, T, ...] -> [T, ...]

    def body(carry, inp):
        state, finals = carry
        (seg_t, first_t, last_t), x_t = inp
        state = jnp.where(first_t, starts[seg_t][None], state)
        state, o_t = step(state, *(x[None] for x in x_t))
        # where() needs only its predicate in the backward pass, so `finals` adds no
        # per-token residuals
        hit = last_t & (jnp.arange(n_seqs) == seg_t)
        finals = jnp.where(hit.reshape(n_seqs, *([1] * len(state_shape))), state, finals)
        return (state, finals), o_t[0]

    init = (jnp.zeros((1, *state_shape), dtype), starts)
    (_, finals), o = jax.lax.scan(body, init, ((seg, is_first, is_last), xs_t))
    return o[None], finals


def reference_loop(run_one: Callable[[tuple[Array, ...], Array | None], tuple[Array, Array]],
                   xs: tuple[Array, ...], initial_state: Array | None, cu_seqlens: Array | None,
                   state_shape: tuple[int, ...], dtype) -> tuple[Array, Array]:
    """Reference handling of ``cu_seqlens``: run each packed sequence on its own.

    ``run_one(xs_n, initial_state_n)`` runs one batch (``[B, T_n, ...]`` inputs). With
    ``cu_seqlens`` (concrete, B == 1) each sequence is sliced out and run alone, which is
    the definition the packed forms are tested against.

    Raises:
        ValueError: ``cu_seqlens`` is traced (the loop needs concrete offsets).
    """
    if cu_seqlens is None:
        return run_one(xs, initial_state)
    if not is_concrete(cu_seqlens):
        raise ValueError("cu_seqlens: the reference needs concrete offsets (not traced under jit); "
                         "use mode='recurrent' or 'chunk' inside jit")
    cu = np.asarray(cu_seqlens).astype(np.int64)
    outs, finals = [], []
    for n in range(len(cu) - 1):
        lo, hi = int(cu[n]), int(cu[n + 1])
        init = None if initial_state is None else initial_state[n : n + 1]
        if hi == lo:  # an empty sequence keeps its initial state
            finals.append(jnp.zeros((1, *state_shape), dtype) if init is None else init.astype(dtype))
            continue
        o_n, final_n = run_one(tuple(x[:, lo:hi] for x in xs), init)
        outs.append(o_n)
        finals.append(final_n)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(finals, axis=0)


def _cast(xs: tuple[Array, ...]) -> tuple[tuple[Array, ...], object, tuple[int, int, int]]:
    """Cast ``(q, k, v, *gates)`` to the compute dtype; also return the state's ``(H, K, V)``."""
    dtype = compute_dtype(*(x.dtype for x in xs))
    q, _, v = xs[:3]
    return tuple(x.astype(dtype) for x in xs), dtype, (q.shape[2], q.shape[3], v.shape[3])


def per_step_reference(step: Step, xs: tuple[Array, ...], *, initial_state: Array | None,
                       cu_seqlens: Array | None) -> tuple[Array, Array]:
    """An op's truth from its one-token ``step``: a per-step scan; packed sequences run one by
    one (:func:`reference_loop`, concrete ``cu_seqlens``).

    Args:
        step: ``(state, q_t, k_t, v_t, *gates_t) -> (state, o_t)``.
        xs: ``(q [B, T, H, K], k, v [B, T, H, V], *gates [B, T, H, ...])``.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32, float64 for f64)``.
    """
    cast, dtype, shape = _cast(xs)

    def run_one(xs_n, init):
        return scan_tokens(step, xs_n, init, shape, dtype)

    o, final = reference_loop(run_one, cast, initial_state, cu_seqlens, shape, dtype)
    return o.astype(xs[2].dtype), final


def per_step_recurrent(step: Step, xs: tuple[Array, ...], *, initial_state: Array | None,
                       cu_seqlens: Array | None) -> tuple[Array, Array]:
    """The recurrent (decoding) form from ``step``: the reference's math, jit-safe with packed
    sequences (the state restarts at each ``cu_seqlens`` boundary). As
    :func:`per_step_reference`."""
    cast, dtype, shape = _cast(xs)
    if cu_seqlens is None:
        o, final = scan_tokens(step, cast, initial_state, shape, dtype)
    else:
        o, final = scan_tokens_packed(step, cast, initial_state, shape, dtype, cu_seqlens)
    return o.astype(xs[2].dtype), final
