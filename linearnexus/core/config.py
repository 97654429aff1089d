"""Typed, validated configuration dataclasses with dict and YAML round trips.

Subclass :class:`ConfigBase` as a frozen-free ``@dataclass``; declare constraints with
:func:`field`::

    @dataclass
    class MambaConfig(ConfigBase):
        d_model: int = field(256, gt=0)
        kernel_backend: str = field("auto", choices=("auto", "jax", "naive", "pallas"))

Every field is type-checked against its annotation when the object is built, and the
error names the field. ``from_dict`` rejects unknown keys by name. YAML support needs
PyYAML, which is imported only when a YAML method is called.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

_C = TypeVar("_C", bound="ConfigBase")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def field(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    choices: Sequence[Any] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with validation metadata.

    Args:
        default / default_factory: as in :func:`dataclasses.field`.
        choices: allowed values.
        gt, ge, lt, le: numeric bounds (strict / inclusive).
        doc: one line shown in error messages and docs.
    """
    meta = {"choices": tuple(choices) if choices is not None else None,
            "gt": gt, "ge": ge, "lt": lt, "le": le, "doc": doc}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; return it (lists become tuples for tuples)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _check_type(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            f"{name}: expected {' | '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{name}: expected None, got {value!r}")
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a sequence, got {type(value).__name__} {value!r}")
        if args and not (len(args) == 2 and args[1] is Ellipsis) and origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"{name}: expected {len(args)} items, got {len(value)}")
            pairs = enumerate(zip(value, args, strict=True))
            items = [_check_type(f"{name}[{i}]", v, a) for i, (v, a) in pairs]
        elif args:
            items = [_check_type(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
        else:
            items = list(value)
        return tuple(items) if (origin is tuple or tp is tuple) else list(items)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return tp.from_dict(value, _prefix=f"{name}.")
        raise ConfigError(f"{name}: expected {tp.__name__} or a mapping, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected int, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"{name}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


@dataclasses.dataclass
class ConfigBase:
    """Base class for configs: type and bound checks, dict and YAML round trips.

    Subclasses add cross-field checks by overriding :meth:`validate` (call ``super()``).
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            value = _check_type(f.name, value, hints.get(f.name, Any))
            object.__setattr__(self, f.name, value)
            meta = f.metadata or {}
            if value is None:
                continue
            choices = meta.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{f.name}: expected one of {list(choices)}, got {value!r}")
            for key, op, word in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                                  ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
                bound = meta.get(key)
                if bound is not None and not op(value, bound):
                    raise ConfigError(f"{f.name}: expected a value {word} {bound}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise :class:`ConfigError` naming the field(s)."""

    # ---- dict round trip -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (nested configs become dicts, tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ConfigBase):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any], *, _prefix: str = "") -> _C:
        """Build from a mapping; unknown keys raise :class:`ConfigError` naming them."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}")
        known = set(cls.field_names())
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), sorted(known), n=1)
                hints.append(f"{_prefix}{k}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown field(s) for {cls.__name__}: {', '.join(hints)}")
        try:
            return cls(**dict(data))
        except ConfigError as e:
            raise ConfigError(f"{_prefix}{e}") from None

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with ``changes`` applied and validated; unknown names raise."""
        return type(self).from_dict({**self.to_dict(), **changes})

    # ---- YAML ------------------------------------------------------------------------
    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save_yaml(self, path: str | os.PathLike) -> None:
        """Write the config as YAML (atomically: see :func:`linearnexus.core.fileio.atomic_write`)."""
        from linearnexus.core.fileio import atomic_write_text

        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_yaml(cls: type[_C], text: str) -> _C:
        import yaml

        data = yaml.safe_load(text)
        if data is None:
            data = {}
        return cls.from_dict(data)

    @classmethod
    def load_yaml(cls: type[_C], path: str | os.PathLike) -> _C:
        with open(path, encoding="utf-8") as fh:
            return cls.from_yaml(fh.read())
