"""The RL trainers' compiled functions, cached per model structure and settings.

``jax.jit`` caches per function object, and each trainer builds its own closures, so two
trainers of one model (a run and its resumption, or the tests' several short runs) would
compile everything twice without this shared :class:`~linearnexus.core.compile_cache.CompileCache`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from linearnexus.core.compile_cache import CompileCache

_COMPILED: CompileCache[Any] = CompileCache(max_entries=16)


def cached(graphdef: Any, key: Any, build: Callable[[], Any]) -> Any:
    """``build()`` once per ``(graphdef, key)`` (both compared with ``==``; an optax
    transformation in ``key`` compares its functions by identity)."""
    return _COMPILED.get(graphdef, key, build)
