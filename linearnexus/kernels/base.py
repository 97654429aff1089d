"""The kernel protocol every mechanism implements, and the call-time backend dispatcher.

A mechanism (``kernels/<m>/``) exposes one api function. Behind it sit one or more
*backends*, each an object following :class:`SelectiveKernelProtocol`: pure functions over
arrays with a chunk mode (training, prefill) and a recurrent mode (decoding), both taking
an optional initial state and returning ``(output, final_state)``.

The backend is chosen when the op is called (never at import time):

* ``backend="name"`` wins; if that backend cannot run the call, its error reaches the
  caller (``NotImplementedError`` for an unsupported device / dtype / shape).
* otherwise backends are tried in the mechanism's preference order; those whose
  ``supports`` says no, or that raise ``NotImplementedError``, are skipped; the reference
  backend is the last resort.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import jax

from linearnexus.core.mode import KernelMode, as_mode, select_mode
from linearnexus.core.types import Array, DType

__all__ = [
    "GridConfig",
    "KernelMode",
    "SelectiveKernelProtocol",
    "UnsupportedArgument",
    "current_platform",
    "dispatch",
    "resolve_mode",
]

_R = TypeVar("_R")


class UnsupportedArgument(NotImplementedError, ValueError):
    """An argument one backend cannot take (e.g. a chunk size its kernels do not tile) though
    the op accepts it: under automatic dispatch the next backend runs the call (a
    ``NotImplementedError``); a caller who named the backend gets the error, which is also a
    ``ValueError`` naming the argument."""


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """Tiling knobs of a kernel launch. ``None`` lets the backend's heuristic decide.

    Attributes:
        chunk_size: tokens per chunk in chunk mode (L).
        block_c: channels (or head-dim columns) per program for GPU kernels.
        num_warps: Triton warps per program.
        num_stages: software-pipelining stages.
        chunk_size_given: False when ``chunk_size`` is the op's default rather than the
            caller's choice (a backend with its own default tile, e.g. ``pallas_tpu``, then
            uses that).
    """

    chunk_size: int = 64
    block_c: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    chunk_size_given: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool):
            raise TypeError(f"chunk_size: expected int, got {type(self.chunk_size).__name__}")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size: expected a positive int, got {self.chunk_size}")
        for name in ("block_c", "num_warps", "num_stages"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: expected a positive int or None, got {value}")


@runtime_checkable
class SelectiveKernelProtocol(Protocol):
    """One backend of one mechanism.

    ``forward_chunk`` and ``forward_recurrent`` take the mechanism's arrays (its api
    documents them), ``initial_state`` (or None for zeros), and return
    ``(output, final_state)``. They assume inputs were validated by the api function.
    """

    name: ClassVar[str]

    def supports(self, *, platform: str, dtype: DType) -> bool:
        """Whether this backend can run on ``platform`` ("cpu", "gpu", "tpu") for ``dtype``."""
        ...

    def forward_chunk(self, *args: Array, initial_state: Array | None, grid: GridConfig,
                      **kwargs: Any) -> tuple[Array, Array]:
        ...

    def forward_recurrent(self, *args: Array, initial_state: Array | None,
                          **kwargs: Any) -> tuple[Array, Array]:
        ...


def current_platform() -> str:
    """The default JAX platform: "cpu", "gpu" or "tpu"."""
    platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def resolve_mode(mode: KernelMode | str | None, seq_len: int, threshold: int = 64) -> KernelMode:
    """An explicit ``mode`` wins; None picks by :func:`select_mode`."""
    resolved = as_mode(mode)
    return select_mode(seq_len, threshold) if resolved is None else resolved


def dispatch(
    op_name: str,
    backends: Mapping[str, SelectiveKernelProtocol],
    order: Sequence[str],
    call: Callable[[SelectiveKernelProtocol], _R],
    *,
    backend: str | None,
    dtype: DType,
    platform: str | None = None,
) -> _R:
    """Run ``call(kernel)`` on the chosen backend of ``op_name``.

    Args:
        op_name: mechanism name, for error messages.
        backends: name -> backend object.
        order: preference order when ``backend`` is None; its last entry is the fallback
            and is always tried.
        call: runs the op on a backend.
        backend: an explicit backend name, or None for automatic choice.
        dtype: input dtype, passed to ``supports``.
        platform: "cpu" / "gpu" / "tpu"; defaults to :func:`current_platform`.

    Raises:
        ValueError: unknown ``backend`` name.
        NotImplementedError: the named backend cannot run this call.
    """
    if backend is not None:
        if backend not in backends:
            raise ValueError(
                f"backend: {op_name} has no backend {backend!r}; choose one of {sorted(backends)}"
            )
        return call(backends[backend])
    platform = platform or current_platform()
    last_error: NotImplementedError | None = None
    for i, name in enumerate(order):
        kernel = backends[name]
        is_last = i == len(order) - 1
        if not is_last and not kernel.supports(platform=platform, dtype=dtype):
            continue
        try:
            return call(kernel)
        except NotImplementedError as e:
            last_error = e
            if is_last:
                raise
    raise NotImplementedError(f"{op_name}: no backend could run this call") from last_error
