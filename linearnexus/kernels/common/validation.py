"""Input checks shared by the linear-attention ops and the selective scan.

Every error names the argument. What a bad *value* does depends on whether it is known
when the op is called:

* **Concrete values** (eager calls, or constants under ``jit``): invalid ``cu_seqlens``
  (not starting at 0, not ending at T, decreasing) and positive log-gates (``g > 0``, which
  grow the state instead of decaying it) raise ``ValueError`` naming the argument, before
  any work.
* **Traced values** (under ``jit``) cannot raise. The same conditions then make the
  affected outputs NaN, never a plausible wrong answer: every output and final state for
  invalid ``cu_seqlens``; the outputs from the first positive log-gate on (to the end of
  its sequence, that head) and that sequence's final state for ``g > 0`` (the selective
  scan checks its offsets only: ``A`` > 0 is its caller's choice). The checks are
  also registered with ``jax.experimental.checkify`` as debug checks, which cost nothing
  unless the caller opts in (the switch)::

      from jax.experimental import checkify
      err, out = jax.jit(checkify.checkify(step, errors=checkify.user_checks))(...)
      err.throw()   # raises e.g. "cu_seqlens: must start at 0, end at T=16 and ..."

* **Non-finite inputs** (NaN / inf in ``q``, ``k``, ``v``, gates, ``beta``) are not an
  error: they propagate as in the per-step recurrence, causally. A bad value at step t of
  a sequence makes that head's outputs NaN from t on (only ``o_t`` for a bad ``q_t``) and
  its final state NaN; outputs before t are exactly those of a run without it, in every
  mode and backend. (A chunked form mixes the steps of a chunk in matmuls, where
  ``0 * NaN = NaN`` would leak a NaN backwards in time: :func:`causal_guard` zeroes bad
  values before the kernel and marks the outputs they reach after it.)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from linearnexus.core.padding import segment_ids_from_cu_seqlens, validate_cu_seqlens
from linearnexus.core.types import Array, DType, is_float_dtype


def _shape(array: Array) -> tuple[int, ...]:
    return tuple(getattr(array, "shape", ()))


def check_float(name: str, array: Array) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``array`` has a float dtype."""
    if not hasattr(array, "dtype") or not is_float_dtype(array.dtype):
        raise TypeError(f"{name}: expected a float array (float16/bfloat16/float32/float64), "
                        f"got {getattr(array, 'dtype', type(array).__name__)}")


def check_qkv(q: Array, k: Array, v: Array) -> tuple[int, int, int, int, int]:
    """Check ``q, k: [B, T, H, K]`` and ``v: [B, T, H, V]``; return ``(B, T, H, K, V)``.

    Raises:
        ValueError: wrong rank, mismatched B / T / H / K, or ``T == 0``.
        TypeError: non-float arrays.
    """
    for name, array in (("q", q), ("k", k), ("v", v)):
        if getattr(array, "ndim", None) != 4:
            raise ValueError(f"{name}: expected rank 4 [B, T, H, {'V' if name == 'v' else 'K'}], "
                             f"got shape {_shape(array)}")
        check_float(name, array)
    batch, seq, heads, key_dim = q.shape
    if _shape(k) != _shape(q):
        raise ValueError(f"k: expected the shape of q {_shape(q)} [B, T, H, K], got {_shape(k)}")
    if _shape(v)[:3] != (batch, seq, heads):
        raise ValueError(f"v: expected shape ({batch}, {seq}, {heads}, V) [B, T, H, V] to match q, "
                         f"got {_shape(v)}")
    if seq == 0:
        raise ValueError("q: sequence length T must be >= 1, got T=0")
    return batch, seq, heads, key_dim, v.shape[3]


def check_array(name: str, array: Array | None, shape: tuple[int, ...], legend: str) -> None:
    """Raise naming ``name`` unless ``array`` is None or a float array of ``shape``."""
    if array is None:
        return
    if _shape(array) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} {legend}, got {_shape(array)}")
    check_float(name, array)


def check_initial_state(initial_state: Array | None, n_states: int, heads: int, key_dim: int,
                        value_dim: int) -> None:
    """``initial_state`` must be None or ``[N, H, K, V]`` (N = B, or sequences for varlen)."""
    check_array("initial_state", initial_state, (n_states, heads, key_dim, value_dim), "[N, H, K, V]")


def is_traced(array: object) -> bool:
    """True for a value only known at run time (a tracer under ``jit`` / ``grad``)."""
    return isinstance(array, jax.core.Tracer)


def as_cu_seqlens(cu_seqlens: object) -> Array | None:
    """``cu_seqlens`` as an array: None stays None, a list / tuple of ints becomes int32.

    Raises:
        TypeError naming ``cu_seqlens``: neither None, an array, nor a sequence of ints.
    """
    if cu_seqlens is None or hasattr(cu_seqlens, "ndim"):
        return cu_seqlens
    if isinstance(cu_seqlens, (list, tuple)):
        try:  # jnp, not np: the entries may be traced ints
            values = jnp.asarray(cu_seqlens)
        except TypeError:
            values = None
        if (values is not None and values.ndim == 1 and values.size
                and jnp.issubdtype(values.dtype, jnp.integer)):
            return values.astype(jnp.int32)
    raise TypeError(f"cu_seqlens: expected an int array or a list of ints [N+1], got "
                    f"{cu_seqlens!r}")


def _cu_valid(cu_seqlens: Array, seq: int) -> Array:
    """bool scalar: ``cu_seqlens`` starts at 0, ends at ``seq`` and never decreases."""
    return ((cu_seqlens[0] == 0) & (cu_seqlens[-1] == seq)
            & jnp.all(cu_seqlens[1:] >= cu_seqlens[:-1]))


def cu_seqlens_ok(cu_seqlens: Array | None, seq: int) -> Array | None:
    """Under ``jit``: a traced bool scalar, True when ``cu_seqlens`` is valid (starts at 0,
    ends at ``seq``, never decreases), also registered as a checkify debug check. None when
    ``cu_seqlens`` is None or concrete (checked by :func:`check_cu_seqlens` instead)."""
    if cu_seqlens is None or not is_traced(cu_seqlens):
        return None
    ok = _cu_valid(cu_seqlens, seq)
    checkify.check(ok, f"cu_seqlens: must start at 0, end at T={seq} and be non-decreasing, "
                   "got {}", cu_seqlens, debug=True)
    return ok


def check_log_gate(name: str, g: Array | None) -> None:
    """Log-gates must be <= 0 (a decay). Concrete: ``ValueError`` naming ``name`` at the
    first positive entry (NaN is not an error: it propagates, see the module doc). Traced:
    a checkify debug check (the outputs it reaches become NaN through :func:`causal_guard`).
    """
    if g is None:
        return
    if is_traced(g):
        checkify.check(~jnp.any(g > 0), f"{name}: log-gates must be <= 0 (a decay), got a "
                       "maximum of {}", jnp.max(g), debug=True)
        return
    # numpy, not jnp: inside a jit trace a jnp op on a concrete (closed-over) array is staged
    # out and gives a tracer that cannot be tested with bool()
    values = np.asarray(g)
    if np.any(values > 0):
        where = tuple(int(i) for i in np.argwhere(values > 0)[0])
        raise ValueError(f"{name}: log-gates must be <= 0 (a decay; exp(g) > 1 grows the state "
                         f"without bound), got {values[where]} at index {where}")


#: ``g = -inf`` (a gate of exactly 0) becomes this before a rerun: ``e^-105`` is 0 in float32,
#: and the chunked forms' in-chunk sums would otherwise form ``-inf - -inf`` or ``0 * -inf``
LOG_GATE_FLOOR = -105.0

#: how :func:`run_guarded` picks between the fast run's outputs and the guarded rerun: "cond"
#: (the default) a ``lax.cond``, whose pass-through branch XLA compiles to a copy of every
#: output (seen in the compiled HLO on the CPU); "loop" a ``lax.while_loop`` of at most one
#: step, whose carry's buffer is the output's, so the clean case copies nothing. Within noise
#: of each other on a 2-core CPU (simple_gla, gla, gated_delta_rule chunked at (2, 2048, 4,
#: 64)) and on an H100 (simple_gla bf16 (8, 4096, 16, 128): cond 0.481 / 1.900 ms fwd /
#: fwd+bwd, loop 0.486 / 1.928; ``benchmarks/guard_cost_gpu.py``, 2026-12-05). Read when the
#: op is traced.
GUARD_SETTLE_ENV = "LINEARNEXUS_GUARD_SETTLE"
GUARD_SETTLE_FORMS = ("cond", "loop")


#: how :func:`run_guarded`'s backward makes the gradients NaN after bad inputs: "where" (the
#: default) a ``where`` over the cotangents before the fast path's backward (a pass over
#: ``do`` that XLA cannot fuse into a custom call, though in a model it can fuse into the
#: cotangent's producer), or "cond" a ``lax.cond`` between that backward and NaN-filled
#: gradients (no pass over ``do``). Read when the op is traced.
GUARD_BACKWARD_ENV = "LINEARNEXUS_GUARD_BACKWARD"
GUARD_BACKWARD_FORMS = ("where", "cond")


def _env_form(name: str, forms: tuple[str, ...]) -> str:
    """The form the environment variable ``name`` names (``forms[0]`` when unset); anything
    else is a ``ValueError`` naming the variable."""
    form = os.environ.get(name, forms[0])
    if form not in forms:
        raise ValueError(f"{name}: expected one of {forms}, got {form!r}")
    return form


def guard_backward_form() -> str:
    """The form :data:`GUARD_BACKWARD_ENV` names ("where" when unset)."""
    return _env_form(GUARD_BACKWARD_ENV, GUARD_BACKWARD_FORMS)


def guard_settle_form() -> str:
    """The form :data:`GUARD_SETTLE_ENV` names ("cond" when unset)."""
    return _env_form(GUARD_SETTLE_ENV, GUARD_SETTLE_FORMS)


def _token_ok(x: Array, valid: Callable[[Array], Array]) -> tuple[Array, Array]:
    """``(entry_ok like x, token_ok [B, T, H])``: ``valid`` per entry, and all of a token's."""
    entry_ok = valid(x)
    token_ok = jnp.all(entry_ok, axis=tuple(range(3, x.ndim))) if x.ndim > 3 else entry_ok
    return entry_ok, token_ok


def causal_guard(q: Array, k: Array, v: Array, gates: Sequence[tuple[str, Array]], *,
                 cu_seqlens: Array | None) -> tuple[tuple[Array, ...], Callable[..., tuple]]:
    """Make a linear-attention op's NaN handling causal and its traced bad values loud.

    Bad entries (non-finite, or a positive log-gate ``g``) are replaced by 0, which every
    op treats as inert, before the kernel runs (and ``g = -inf``, a valid hard reset, by
    :data:`LOG_GATE_FLOOR`); ``finish`` then marks what they reach:
    the head's outputs from the bad step to the end of its sequence (only that step's for
    a bad ``q``) and its final state become NaN. With traced invalid ``cu_seqlens``, every
    output does. For clean inputs the values are unchanged (a ``where`` on each array).

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
        gates: ``(name, array)`` of the op's other per-token inputs, ``[B, T, H]`` or
            ``[B, T, H, K]``; the one named ``g`` is a log-gate (must be <= 0).
        cu_seqlens: ``[N+1]`` int32 or None.

    Returns:
        ``((q, k, v, *gates) with bad entries zeroed, finish)``; ``finish(o [B, T, H, V],
        final [N, H, K, V] or None)`` returns them marked. A NaN's cotangent is NaN, so
        gradients through marked outputs are NaN too, as the recurrence's would be.
    """
    batch, seq, heads = q.shape[:3]

    def finite(x: Array) -> Array:
        return jnp.isfinite(x)

    def decay(x: Array) -> Array:
        return x <= 0  # False for NaN and for +-inf > 0

    q_ok, q_token_ok = _token_ok(q, finite)
    clean = [jnp.where(q_ok, q, 0)]
    state_ok = jnp.ones((batch, seq, heads), bool)
    for name, x in (("k", k), ("v", v), *gates):
        entry_ok, token_ok = _token_ok(x, decay if name == "g" else finite)
        if name == "g":  # -inf is a valid gate (a hard reset) that chunked sums turn into NaN
            x = jnp.where(x == -jnp.inf, LOG_GATE_FLOOR, x)
        clean.append(jnp.where(entry_ok, x, 0))
        state_ok = state_ok & token_ok
    # the first bad step of each row (or packed sequence) and head; a min, not a cumsum
    # (XLA:CPU runs a cumsum over T as a windowed reduction, O(T^2))
    steps = jnp.arange(seq, dtype=jnp.int32)[None, :, None]  # [1, T, 1]
    bad_at = jnp.where(state_ok, seq, steps)  # [B, T, H]: t at bad tokens, T elsewhere
    if cu_seqlens is None:
        first = jnp.min(bad_at, axis=1)  # [B, H]
        reached = steps >= first[:, None]  # [B, T, H]
        final_bad = first < seq  # [B, H]
    else:
        n_seqs = cu_seqlens.shape[0] - 1
        seg = jnp.clip(segment_ids_from_cu_seqlens(jnp.clip(cu_seqlens, 0, seq), seq),
                       0, n_seqs - 1)  # [T]
        first = jax.ops.segment_min(bad_at[0], seg, n_seqs, indices_are_sorted=True)  # [N, H]
        first = jnp.minimum(first, seq)  # an empty sequence's min is the dtype's maximum
        reached = (steps[0] >= first[seg])[None]  # [1, T, H]
        final_bad = first < seq  # [N, H]
    out_bad = reached | ~q_token_ok
    if cu_seqlens is not None and is_traced(cu_seqlens):
        cu_ok = _cu_valid(cu_seqlens, seq)
        out_bad, final_bad = out_bad | ~cu_ok, final_bad | ~cu_ok

    def finish(o: Array, final: Array | None) -> tuple[Array, Array | None]:
        # a product with 1 / NaN, not where(bad, o * nan, o): where's VJP sends a zero
        # cotangent into the unselected o * nan branch, and 0 * nan made every gradient NaN
        # even for clean inputs; this way clean entries get their exact gradient and marked
        # ones a NaN one, as the recurrence would give
        o = o * jnp.where(out_bad[..., None], jnp.nan, 1.0).astype(o.dtype)
        if final is not None:
            final = final * jnp.where(final_bad[..., None, None], jnp.nan, 1.0).astype(final.dtype)
        return o, final

    return tuple(clean), finish


def run_guarded(run: Callable[..., tuple[Array, Array]], q: Array, k: Array, v: Array,
                gates: Sequence[tuple[str, Array]], *, initial_state: Array | None,
                cu_seqlens: Array | None, always_clean: bool = False) -> tuple[Array, Array]:
    """``run(q, k, v, *gates, initial_state=, cu_seqlens=) -> (o, final)``, with bad values
    handled as the module doc says, at the cost of a check when the inputs are clean.

    ``run`` may also return ``(o, final, marks)`` with ``marks`` a Python bool: True when
    the kernel that ran makes ``final`` non-finite after every bad input, positive log-gates
    included (the Mosaic GPU walks, ``mosaic_chunk``'s module doc); the check then reads
    ``final`` only, not ``o`` or the log-gates.

    ``run`` is first called on the inputs as they are. When its outputs are all finite,
    every log-gate is <= 0 and traced ``cu_seqlens`` are valid (the usual case), that is
    the answer; otherwise (a ``lax.cond``, or a one-step ``lax.while_loop``:
    :data:`GUARD_SETTLE_ENV`) the op runs again through :func:`causal_guard`.
    Guarding every call instead cost a copy of every input and output (+20-40% on a
    chunked forward, 2-core CPU). Reverse-mode differentiable through a ``custom_vjp``
    (forward-mode ``jvp`` is not supported): the fast path's backward, whose gradients
    are NaN after bad inputs (a ``where`` over the cotangents, or with
    :data:`GUARD_BACKWARD_ENV` = "cond" a conditional between that backward and NaN
    gradients); a conditional under autodiff of the whole op would make each branch carry
    the other's residuals.

    Args:
        run: the op; ``final`` is ``[N, H, K, V]``.
        q, k, v, gates, cu_seqlens: as :func:`causal_guard`. initial_state: passed on.
        always_clean: skip the first run and the conditional: clean, run, mark, always.
            For recurrent-mode calls (decoding, short inputs), whose inputs are a few
            tokens: the elementwise cleaning costs next to nothing there, while the
            conditional cost 22-36% of a decode step on the H200 (a 200M Gated DeltaNet
            LM, ``benchmarks/guard_cost_gpu.py``).
    """
    names = tuple(name for name, _ in gates)
    seq = q.shape[1]
    # concrete offsets stay concrete (the naive backend loops over them in Python): only
    # traced ones travel as an argument of the custom_vjp
    traced_cu = cu_seqlens is not None and is_traced(cu_seqlens)
    fixed_cu = None if traced_cu else cu_seqlens

    marks = [False]  # whether the fast run's final state marks every bad input

    def fast(cu, q, k, v, gate_arrays, h0):
        out = run(q, k, v, *gate_arrays, initial_state=h0,
                  cu_seqlens=cu if traced_cu else fixed_cu)
        marks[0] = len(out) == 3 and bool(out[2])
        return tuple(out[:2])

    def slow(cu, q, k, v, gate_arrays, h0):
        cu = cu if traced_cu else fixed_cu
        clean, finish = causal_guard(q, k, v, tuple(zip(names, gate_arrays, strict=True)),
                                     cu_seqlens=cu)
        return finish(*run(*clean, initial_state=h0, cu_seqlens=cu)[:2])

    form = guard_settle_form()  # a bad value is refused on every path
    bwd_form = guard_backward_form()
    if always_clean:
        return slow(cu_seqlens, q, k, v, tuple(a for _, a in gates), initial_state)

    def clean_run(out, cu, gate_arrays):
        # the output's read is the check's cost (~0.05 ms of a 0.3 ms forward on an H100), and
        # GLA's [B, T, H, K] log-gates' more: skipped where the final state marks them
        ok = jnp.all(jnp.isfinite(out[1]))
        if not marks[0]:
            ok = ok & jnp.all(jnp.isfinite(out[0]))
            for name, gate in zip(names, gate_arrays, strict=True):
                if name == "g":
                    ok = ok & jnp.all(gate <= 0)
        if traced_cu:
            ok = ok & _cu_valid(cu, seq)
        return ok

    def settle(ok, out, cu, args):
        """``out`` if ok, else the guarded run (:data:`GUARD_SETTLE_ENV`)."""
        if form == "cond":
            return jax.lax.cond(ok, lambda: out, lambda: slow(cu, *args))

        def again(carry):
            return jnp.logical_not(carry[0])

        def redo(carry):
            return jnp.bool_(True), slow(cu, *args)

        return jax.lax.while_loop(again, redo, (ok, out))[1]

    @jax.custom_vjp
    def guarded(cu, *args):
        out = fast(cu, *args)
        return settle(clean_run(out, cu, args[3]), out, cu, args)

    def guarded_fwd(cu, *args):
        out, fast_vjp = jax.vjp(functools.partial(fast, cu), *args)
        ok = clean_run(out, cu, args[3])
        return settle(ok, out, cu, args), (ok, fast_vjp)

    def guarded_bwd(res, ct):
        # after bad inputs the gradients are NaN (as the recurrence's would be): a NaN
        # cotangent through the fast path's backward, or ("cond") a conditional between that
        # backward and NaN-filled gradients; not one between the fast and the guarded
        # backward passes (its operands, every residual of both, were copied: +40% fwd+bwd
        # on the CPU)
        ok, fast_vjp = res
        if bwd_form == "cond":
            shapes = jax.eval_shape(fast_vjp, ct)
            return (None, *jax.lax.cond(ok, lambda: fast_vjp(ct), lambda: jax.tree.map(
                lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)))
        ct = jax.tree.map(lambda c: jnp.where(ok, c, c * jnp.nan), ct)
        return (None, *fast_vjp(ct))

    guarded.defvjp(guarded_fwd, guarded_bwd)
    return guarded(cu_seqlens if traced_cu else None, q, k, v, tuple(a for _, a in gates),
                   initial_state)


def check_cu_seqlens(cu_seqlens: Array | None, batch: int, seq: int) -> int:
    """Validate packed-sequence offsets; return the state batch N (B when ``cu_seqlens`` is None).

    Raises:
        ValueError / TypeError naming ``cu_seqlens`` (B != 1, wrong rank, not starting at 0,
        not ending at T, decreasing; value checks only on concrete arrays).
    """
    if cu_seqlens is None:
        return batch
    validate_cu_seqlens(cu_seqlens, seq, batch=batch)
    return int(cu_seqlens.shape[0]) - 1


def resolve_scale(scale: float | None, key_dim: int) -> float:
    """``scale`` if given (any finite number), else the default ``K ** -0.5``."""
    if scale is None:
        return float(key_dim) ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    return float(scale)


def compute_dtype(*dtypes: DType) -> np.dtype:
    """The dtype ops compute in: float32, or float64 when any input is float64."""
    out = np.dtype("float32")
    for dtype in dtypes:
        out = jnp.promote_types(out, jnp.dtype(dtype))
    return np.dtype(out)
