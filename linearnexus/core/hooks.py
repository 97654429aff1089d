"""A scoped override of the sequence ops, so a layer above can re-route them.

The ops' public api functions (``simple_gla``, ``gla``, ``delta_rule``,
``gated_delta_rule``, ``selective_scan``) are wrapped with :func:`overridable`. While an
override is active (:func:`op_override`, a context variable, so per thread and per trace)
each call goes to ``hook(name, fn, args, kwargs)`` first; the hook returns the result, or
``NotImplemented`` to let the op run as usual. ``linearnexus.parallel.context`` uses this
to split the sequence over devices without blocks or models knowing about meshes (blocks
call the api functions; the override is set around tracing a training step).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["OpHook", "op_override", "overridable"]

OpHook = Callable[[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
_HOOK: contextvars.ContextVar[OpHook | None] = contextvars.ContextVar("linearnexus_op_hook",
                                                                       default=None)


def overridable(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: route calls of an op's api function through the active override."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            hook = _HOOK.get()
            if hook is not None:
                out = hook(name, fn, args, kwargs)
                if out is not NotImplemented:
                    return out
            return fn(*args, **kwargs)

        return call

    return wrap


@contextlib.contextmanager
def op_override(hook: OpHook | None) -> Iterator[None]:
    """Make ``hook`` the override inside the block (None: no override, e.g. for the inner
    calls a hook makes itself)."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)
