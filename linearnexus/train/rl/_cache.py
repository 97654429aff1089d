"""A small cache of compiled functions shared by trainers of the same model structure.

``jax.jit`` caches per function object, and each trainer builds its own closures, so two
trainers of one model (a run and its resumption, or the tests' several short runs) would
compile everything twice. The key holds the model's GraphDef (not hashable: compared with
``==``, as ``linearnexus.train.sft`` does) and the settings the compiled code reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ENTRIES: list[tuple[Any, Any, Any]] = []
_MAX = 16


def cached(graphdef: Any, key: Any, build: Callable[[], Any]) -> Any:
    """``build()`` once per ``(graphdef, key)``; ``key`` is compared with ``==`` (an optax
    transformation in it compares its functions by identity)."""
    for g, k, value in _ENTRIES:
        if k == key and g == graphdef:
            return value
    value = build()
    _ENTRIES.insert(0, (graphdef, key, value))
    del _ENTRIES[_MAX:]
    return value
