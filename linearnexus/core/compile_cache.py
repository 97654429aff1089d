"""One small cache of compiled functions per model structure, shared by training and sampling.

``jax.jit`` already caches executables per input signature, but a jitted function built
around one model's ``GraphDef`` (the static structure ``nnx.split`` returns) must itself be
kept somewhere, or every call would build, trace and compile a new one. A ``GraphDef`` of a
model that holds its config is not hashable, so it cannot be a dict key or a static jit
argument; this cache is a short most-recently-used list compared with ``==`` instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class CompileCache(Generic[T]):
    """Most-recently-used cache of built (jitted) functions keyed on ``(graphdef, key)``.

    ``graphdef`` is compared with ``==`` (two models of the same structure share an entry);
    ``key`` is any value compared with ``==`` (e.g. sampler settings, or an optax
    transformation, whose NamedTuple of closures compares by identity).

    Example::

        _STEPS = CompileCache(max_entries=8)
        fns = _STEPS.get(graphdef, tx, build=lambda: make_steps(graphdef, tx))
    """

    def __init__(self, max_entries: int = 8) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries: expected >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: list[tuple[Any, Any, T]] = []
        self._lock = threading.Lock()

    def get(self, graphdef: Any, key: Hashable | Any, build: Callable[[], T]) -> T:
        """The entry of ``(graphdef, key)``, built with ``build()`` on a miss (the least
        recently used entry is dropped past ``max_entries``)."""
        with self._lock:
            for i, (g, k, value) in enumerate(self._entries):
                if k == key and g == graphdef:
                    if i:
                        self._entries.insert(0, self._entries.pop(i))
                    return value
        value = build()  # outside the lock: building may trace, which can be slow
        with self._lock:
            self._entries.insert(0, (graphdef, key, value))
            del self._entries[self.max_entries:]
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


__all__ = ["CompileCache"]
