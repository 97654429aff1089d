"""Launch-grid estimates and a persistent per-device tuning cache for the Pallas backends.

The cache is one JSON file (``$LINEARNEXUS_TUNING_CACHE``, else
``$XDG_CACHE_HOME/linearnexus/tuning.json``, else ``~/.cache/linearnexus/tuning.json``)
mapping a key

    device kind | JAX version | op | backend | shape bucket | dtype

to the launch knobs that ran fastest there (``TritonConfig`` fields; ``MosaicConfig``
fields under backend ``"mosaic"``, read by ``kernels/common/mosaic_ops.MosaicKernel``). ``python
benchmarks/run.py --tune`` fills it on a GPU; the Pallas backends read it before their
heuristic default, so the order a call's knobs are resolved in is: the call's own
``config`` / ``grid``, the backend object's ``config``, this cache, the kernel's heuristic.
Nothing is written by a plain call, and a missing or unreadable file means "no entry".

Shape buckets keep the exact sizes except the sequence length, which is rounded up to a
power of two (one entry serves T = 3000 and T = 4096).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from linearnexus.core.fileio import atomic_write_text
from linearnexus.kernels.base import GridConfig
from linearnexus.kernels.common.pallas import TritonConfig, next_pow2

__all__ = ["cache_path", "estimate_grid_for_sequence", "lookup", "record", "shape_bucket",
           "tuned_config"]

_loaded: dict[str, Any] = {"path": None, "mtime": None, "entries": {}}


def estimate_grid_for_sequence(batch: int, seq: int, feature_dim: int, chunk_size: int = 64, *,
                               min_programs: int = 128) -> GridConfig:
    """A starting launch grid for a ``[batch, seq, feature_dim]`` chunked op.

    * ``chunk_size`` is kept for long sequences but shrunk to the power of two covering
      ``seq`` (at least 16) for short ones, so a 10-token call does not pad to 64.
    * ``block_c`` (feature columns per program) is the largest of 64, 32, 16 that still
      gives ``batch * ceil(feature_dim / block_c) >= min_programs`` programs (a GPU wants
      a few per SM: 128 fills an A100 / H100 about once), and 16 when none does.

    Args:
        batch: rows B (sequences, or batch x heads for per-head kernels).
        seq: tokens T. feature_dim: channels C (or a head dim). chunk_size: the op's chunk L.
        min_programs: programs to aim for.

    Returns:
        ``GridConfig(chunk_size, block_c)`` (warps / stages left to the backend).

    Raises:
        ValueError: a size below 1.
    """
    for name, value in (("batch", batch), ("seq", seq), ("feature_dim", feature_dim),
                        ("chunk_size", chunk_size), ("min_programs", min_programs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    chunk = min(chunk_size, next_pow2(seq, minimum=16))
    block_c = 16
    for candidate in (64, 32, 16):
        if batch * math.ceil(feature_dim / candidate) >= min_programs:
            block_c = candidate
            break
    return GridConfig(chunk_size=chunk, block_c=block_c)


def cache_path() -> Path:
    """Where the tuning cache lives (see the module docstring)."""
    env = os.environ.get("LINEARNEXUS_TUNING_CACHE")
    if env:
        return Path(env).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root).expanduser() / "linearnexus" / "tuning.json"


def shape_bucket(dims: Sequence[int]) -> str:
    """``(B, T, *rest)`` -> ``"B2-T4096-..."`` with T rounded up to a power of two."""
    if len(dims) < 2:
        raise ValueError(f"dims: expected (B, T, ...), got {tuple(dims)}")
    batch, seq, *rest = (int(d) for d in dims)
    return "x".join(str(d) for d in (batch, next_pow2(seq, minimum=1), *rest))


def _key(op: str, backend: str, dims: Sequence[int], dtype: Any, device_kind: str | None) -> str:
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    return "|".join((kind, f"jax{jax.__version__}", op, backend, shape_bucket(dims),
                     jnp.dtype(dtype).name))


def _entries() -> dict[str, Any]:
    """The cache file's entries, re-read when the file changed (cheap on every trace)."""
    path = cache_path()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return {}
    if _loaded["path"] != path or _loaded["mtime"] != mtime:
        try:
            entries = json.loads(path.read_text()).get("entries", {})
        except (OSError, ValueError, AttributeError):
            entries = {}  # a damaged cache only costs the tuned speed
        _loaded.update(path=path, mtime=mtime, entries=entries)
    return _loaded["entries"]


def lookup(op: str, backend: str, dims: Sequence[int], dtype: Any, *,
           device_kind: str | None = None) -> dict[str, Any] | None:
    """The cached knobs for this call, or None."""
    entry = _entries().get(_key(op, backend, dims, dtype, device_kind))
    return dict(entry["config"]) if isinstance(entry, Mapping) and "config" in entry else None


def tuned_config(op: str, backend: str, dims: Sequence[int], dtype: Any) -> TritonConfig | None:
    """The cached :class:`TritonConfig` for this call, or None (no entry, or a stale one that
    no longer validates)."""
    knobs = lookup(op, backend, dims, dtype)
    if knobs is None:
        return None
    try:
        return TritonConfig(**knobs)
    except (TypeError, ValueError):
        return None


def record(op: str, backend: str, dims: Sequence[int], dtype: Any, config: Any, *,
           seconds: float, device_kind: str | None = None) -> Path:
    """Store ``config`` (a config dataclass, e.g. :class:`TritonConfig`, measured at ``seconds``
    per call) for this key; an atomic rewrite.

    Returns:
        The cache file's path.
    """
    path = cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    entries = data.get("entries", {}) if isinstance(data, dict) else {}
    knobs = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    entries[_key(op, backend, dims, dtype, device_kind)] = {"config": knobs,
                                                            "seconds": float(seconds)}
    atomic_write_text(path, json.dumps({"version": 1, "entries": entries}, indent=1,
                                       sort_keys=True))
    return path
