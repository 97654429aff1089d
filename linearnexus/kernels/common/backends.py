"""The two pure-JAX backends every linear-attention op has, and the shared api plumbing.

* ``"jax"``: the chunked form in chunk mode, the recurrent scan in recurrent mode. Runs
  everywhere; the default until a faster backend (Pallas) supports the call.
* ``"naive"``: the per-step reference (the truth) in both modes; packed sequences are run
  one at a time, so it needs concrete ``cu_seqlens``. For tests and debugging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from linearnexus.core.mode import KernelMode
from linearnexus.core.types import Array, DType
from linearnexus.kernels.base import GridConfig, current_platform, dispatch, resolve_mode
from linearnexus.kernels.common.validation import (
    as_cu_seqlens,
    check_cu_seqlens,
    check_initial_state,
    check_log_gate,
    cu_seqlens_ok,
    resolve_scale,
    run_guarded,
)

OpFn = Callable[..., tuple[Array, Array]]


class JaxKernel:
    """Chunked form for chunk mode, recurrent scan for recurrent mode; every platform and dtype."""

    name: ClassVar[str] = "jax"

    def __init__(self, chunked: OpFn, recurrent: OpFn) -> None:
        self.chunked = chunked
        self.recurrent = recurrent

    def supports(self, *, platform: str, dtype: DType) -> bool:
        return True

    def forward_chunk(self, *arrays: Array, initial_state: Array | None, grid: GridConfig,
                      **kwargs: Any) -> tuple[Array, Array]:
        return self.chunked(*arrays, initial_state=initial_state, chunk_size=grid.chunk_size, **kwargs)

    def forward_recurrent(self, *arrays: Array, initial_state: Array | None,
                          **kwargs: Any) -> tuple[Array, Array]:
        return self.recurrent(*arrays, initial_state=initial_state, **kwargs)


class NaiveKernel:
    """The per-step reference in both modes (slow; the definition the others are tested on)."""

    name: ClassVar[str] = "naive"

    def __init__(self, reference: OpFn) -> None:
        self.reference = reference

    def supports(self, *, platform: str, dtype: DType) -> bool:
        return True

    def forward_chunk(self, *arrays: Array, initial_state: Array | None, grid: GridConfig,
                      **kwargs: Any) -> tuple[Array, Array]:
        return self.reference(*arrays, initial_state=initial_state, **kwargs)

    def forward_recurrent(self, *arrays: Array, initial_state: Array | None,
                          **kwargs: Any) -> tuple[Array, Array]:
        return self.reference(*arrays, initial_state=initial_state, **kwargs)


def make_backends(reference: OpFn, chunked: OpFn, recurrent: OpFn) -> dict[str, Any]:
    """``{"jax": ..., "naive": ...}`` for one op."""
    return {"jax": JaxKernel(chunked, recurrent), "naive": NaiveKernel(reference)}


#: automatic choice: the first backend that supports the call; "naive" is never picked
#: automatically unless every other backend declines
DEFAULT_ORDER: tuple[str, ...] = ("jax", "naive")


def check_chunk_size(chunk_size: int | None, default: int) -> int:
    """``chunk_size`` or ``default``; a positive int."""
    if chunk_size is None:
        return default
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    return chunk_size


def run_op(op_name: str, backends: Mapping[str, Any], order: Sequence[str], arrays: tuple[Array, ...],
           *, initial_state: Array | None, output_final_state: bool, chunk_size: int,
           mode: KernelMode | str | None, backend: str | None, dtype: DType,
           chunk_size_given: bool = True, report: list[bool] | None = None,
           **kwargs: Any) -> tuple[Array, Array | None]:
    """Pick the mode and backend, run the op, drop the final state unless asked for.

    ``report``, when given, gets one bool appended: whether the kernel that ran marks every
    bad input in its final state (chunk mode on a backend whose ``final_marks_bad_inputs``
    is set; :func:`validation.run_guarded` then reads only the final state)."""
    run_mode = resolve_mode(mode, arrays[0].shape[1])
    grid = GridConfig(chunk_size=chunk_size, chunk_size_given=chunk_size_given)

    def call(kernel):
        if report is not None:
            report.append(run_mode is KernelMode.CHUNK
                          and bool(getattr(kernel, "final_marks_bad_inputs", False)))
        if run_mode is KernelMode.CHUNK:
            return kernel.forward_chunk(*arrays, initial_state=initial_state, grid=grid, **kwargs)
        return kernel.forward_recurrent(*arrays, initial_state=initial_state, **kwargs)

    o, final = dispatch(op_name, backends, order, call, backend=backend, dtype=dtype)
    return o, (final if output_final_state else None)


def step_kernel(backends: Mapping[str, Any], order: Sequence[str], backend: str | None,
                dtype: DType) -> Any:
    """The backend that would run a one-token call, when it runs the fused step kernel
    (``kernel.step_ready(dtype)``); else None (the call goes through :func:`run_op`)."""
    if backend is not None:
        kernel = backends.get(backend)
    else:
        platform = current_platform()
        kernel = next((backends[n] for n in order
                       if backends[n].supports(platform=platform, dtype=dtype)), None)
    ready = getattr(kernel, "step_ready", None)
    return kernel if ready is not None and ready(dtype) else None


def check_and_run(op_name: str, backends: Mapping[str, Any], order: Sequence[str],
                  arrays: tuple[Array, ...], dims: tuple[int, int, int, int, int], *,
                  gate_names: tuple[str, ...], default_chunk_size: int, scale: float | None,
                  initial_state: Array | None,
                  output_final_state: bool, cu_seqlens: Array | None, chunk_size: int | None,
                  mode: KernelMode | str | None, backend: str | None) -> tuple[Array, Array | None]:
    """The checks every linear-attention api shares after its own shape checks, then the run.

    Args:
        arrays: ``(q, k, v, *gates)`` as the op's backends take them.
        dims: ``(B, T, H, K, V)`` from :func:`validation.check_qkv`.
        gate_names: the names of ``arrays[3:]`` (``"g"`` is a log-gate, must be <= 0).
        default_chunk_size: the op's chunk size when ``chunk_size`` is None.
        Others: the api function's own arguments.

    Raises:
        ValueError / TypeError naming ``cu_seqlens``, ``initial_state``, ``scale``,
        ``chunk_size`` or ``g`` (concrete positive log-gates); NotImplementedError when the
        named backend cannot run the call. Traced bad values give NaN outputs instead and
        non-finite inputs propagate causally (:mod:`validation`'s module doc).
    """
    batch, seq, heads, key_dim, value_dim = dims
    cu_seqlens = as_cu_seqlens(cu_seqlens)
    n_states = check_cu_seqlens(cu_seqlens, batch, seq)
    check_initial_state(initial_state, n_states, heads, key_dim, value_dim)
    scale = resolve_scale(scale, key_dim)
    chunk_size_given = chunk_size is not None
    chunk_size = check_chunk_size(chunk_size, default_chunk_size)
    gates = tuple(zip(gate_names, arrays[3:], strict=True))
    for name, gate in gates:
        if name == "g":
            check_log_gate(name, gate)
    cu_seqlens_ok(cu_seqlens, seq)  # the checkify switch's check (traced offsets only)

    def run(*arrays, initial_state, cu_seqlens):
        report: list[bool] = []  # whether the kernel that ran marks bad inputs in its state
        o, final = run_op(op_name, backends, order, arrays, initial_state=initial_state,
                          output_final_state=True, chunk_size=chunk_size, mode=mode,
                          backend=backend, dtype=arrays[0].dtype, scale=scale,
                          cu_seqlens=cu_seqlens, chunk_size_given=chunk_size_given,
                          report=report)
        return o, final, report[-1]

    recurrent = resolve_mode(mode, seq) is KernelMode.RECURRENT
    names = gate_names
    fused = (step_kernel(backends, order, backend, arrays[0].dtype)
             if recurrent and seq == 1 and cu_seqlens is None else None)
    if fused is not None:  # decoding: one kernel, the guard's cleaning and marking inside it

        def fallback(*arrays, initial_state):
            def jax_run(*arrays, initial_state, cu_seqlens):
                return fused.recurrent(*arrays, initial_state=initial_state, scale=scale,
                                       cu_seqlens=cu_seqlens)

            return run_guarded(jax_run, *arrays[:3], tuple(zip(names, arrays[3:], strict=True)),
                               initial_state=initial_state, cu_seqlens=None, always_clean=True)

        o, final = fused.fused_step(*arrays, initial_state=initial_state, scale=scale,
                                    fallback=fallback)
        return o, (final if output_final_state else None)
    o, final = run_guarded(run, *arrays[:3], gates, initial_state=initial_state,
                           cu_seqlens=cu_seqlens, always_clean=recurrent)
    return o, (final if output_final_state else None)
