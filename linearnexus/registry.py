"""Name -> kernel backend, block, or model preset; resolved lazily on first lookup.

Tests, benchmarks, docs and the command-line tools walk these registries, so adding a
mechanism means registering it here once:

* ``KERNEL_REGISTRY["mamba:jax"]`` -> the backend object (``kernels/base.py``);
  ``"<op>:reference"`` is an alias of ``"<op>:naive"``, the per-step truth.
* ``OP_REGISTRY["mamba"]`` -> the mechanism's public api function.
* ``LAYER_REGISTRY["mamba"]`` -> ``LayerEntry(block_class, config_class)``, a named tuple:
  ``layer_cls, config_cls = LAYER_REGISTRY["mamba"]``.
* ``MODEL_REGISTRY["gpt-small"]`` -> a function ``(**overrides) -> ModelConfig``.

Entries are import paths, so ``import linearnexus.registry`` imports no kernel or Flax code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, NamedTuple, TypeVar

V = TypeVar("V")


def _import(path: str) -> Any:
    """``"pkg.module:attr.sub"`` -> the object."""
    module_name, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


class LazyRegistry(Mapping[str, V], Generic[V]):
    """A read-mostly mapping whose values are built by loaders on first access."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._loaders: dict[str, Callable[[], V]] = {}
        self._cache: dict[str, V] = {}
        # alternative names: resolved by lookup and ``in``, left out of iteration so that
        # walking the registry visits each entry once
        self._aliases: dict[str, str] = {}

    def alias(self, name: str, target: str) -> None:
        """Make ``name`` look up the same entry as ``target`` (which must be registered)."""
        if target not in self._loaders:
            raise KeyError(f"alias {name!r}: unknown {self.kind} {target!r}")
        if name in self._loaders:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._aliases[name] = target

    def register(self, name: str, loader: Callable[[], V], *, overwrite: bool = False) -> None:
        if name in self._loaders and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._loaders[name] = loader
        self._cache.pop(name, None)

    def __getitem__(self, name: str) -> V:
        name = self._aliases.get(name, name)
        if name not in self._loaders:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._loaders)}")
        if name not in self._cache:
            self._cache[name] = self._loaders[name]()
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._loaders))

    def __len__(self) -> int:
        return len(self._loaders)

    def __contains__(self, name: object) -> bool:
        return name in self._loaders or name in self._aliases


class LayerEntry(NamedTuple):
    """A registered block: its class and its config class (``Block(config, rngs=...)``)."""

    block: type
    config: type


KERNEL_REGISTRY: LazyRegistry[Any] = LazyRegistry("kernel")
OP_REGISTRY: LazyRegistry[Callable[..., Any]] = LazyRegistry("op")
LAYER_REGISTRY: LazyRegistry[LayerEntry] = LazyRegistry("layer")
MODEL_REGISTRY: LazyRegistry[Callable[[], Any]] = LazyRegistry("model preset")


def register_op(mechanism: str, api_module: str, function: str, backends: tuple[str, ...]) -> None:
    """Register ``mechanism``'s api function and each backend in ``api_module.BACKENDS``."""
    OP_REGISTRY.register(mechanism, lambda: _import(f"{api_module}:{function}"))
    for backend in backends:
        KERNEL_REGISTRY.register(
            f"{mechanism}:{backend}", lambda b=backend: _import(f"{api_module}:BACKENDS")[b]
        )
    if "naive" in backends:
        KERNEL_REGISTRY.alias(f"{mechanism}:reference", f"{mechanism}:naive")


def register_layer(name: str, block_path: str, config_path: str) -> None:
    """Register a block by import paths ``"module:Class"``."""
    LAYER_REGISTRY.register(name, lambda: LayerEntry(_import(block_path), _import(config_path)))


def kernels_for(mechanism: str) -> dict[str, Any]:
    """``{"jax": backend, ...}`` for one mechanism."""
    prefix = f"{mechanism}:"
    return {name[len(prefix):]: KERNEL_REGISTRY[name] for name in KERNEL_REGISTRY
            if name.startswith(prefix)}


# ---- built-in registrations ------------------------------------------------------------
register_op("mamba", "linearnexus.kernels.mamba.api", "selective_scan",
            ("jax", "naive", "pallas", "pallas_step"))
# the linear-attention family: backends "jax" (chunked / recurrent), "naive" (per-step truth),
# "pallas" (Triton kernels), "pallas_tpu" (Mosaic TPU kernels) and "pallas_step" (the fused
# one-token kernel by name); retention and ssd run through simple_gla's backends
LINEAR_OPS = ("simple_gla", "gla", "delta_rule", "gated_delta_rule", "retention", "ssd")
#: ops with a "mosaic" backend (Mosaic GPU kernels, sm_90+); retention and ssd share simple_gla's
#: (delta_rule and gated_delta_rule: the forward walk, automatic unless LINEARNEXUS_MOSAIC_GDN=0;
#: gla: the forward walk)
MOSAIC_OPS = ("simple_gla", "retention", "ssd", "gla", "delta_rule", "gated_delta_rule")
for _op in LINEAR_OPS:
    register_op(_op, f"linearnexus.kernels.{_op}.api", _op,
                (*(("mosaic",) if _op in MOSAIC_OPS else ()), "pallas", "pallas_tpu", "jax",
                 "naive", "pallas_step"))
register_layer("mamba", "linearnexus.modules.ssm.mamba:MambaBlock",
               "linearnexus.modules.ssm.mamba:MambaConfig")

# model presets (defined in linearnexus/models.py; a preset whose block is not registered
# raises a ConfigError naming the missing block when it is built)
MODEL_PRESETS = ("gpt-small", "mamba-small", "mamba2-small", "gla-small", "deltanet-small",
                 "gated-deltanet-small", "retnet-small", "mla-small", "hybrid-small")
for _preset in MODEL_PRESETS:
    MODEL_REGISTRY.register(
        _preset, lambda n=_preset: _import("linearnexus.models:preset_factory")(n))
register_layer("attention", "linearnexus.modules.attention.causal:AttentionBlock",
               "linearnexus.modules.attention.causal:AttentionConfig")
register_layer("mla", "linearnexus.modules.attention.mla:MLABlock",
               "linearnexus.modules.attention.mla:MLAConfig")
# the linear-attention family's blocks (one calling convention; see modules/base.py)
for _name, _path, _block, _config in (
    ("mamba2", "linearnexus.modules.ssm.mamba2", "Mamba2Block", "Mamba2Config"),
    ("gla", "linearnexus.modules.linear.gla", "GLABlock", "GLAConfig"),
    ("simple_gla", "linearnexus.modules.linear.gla", "SimpleGLABlock", "SimpleGLAConfig"),
    ("deltanet", "linearnexus.modules.linear.deltanet", "DeltaNetBlock", "DeltaNetConfig"),
    ("gated_deltanet", "linearnexus.modules.linear.deltanet", "GatedDeltaNetBlock",
     "GatedDeltaNetConfig"),
    ("retnet", "linearnexus.modules.linear.retnet", "RetNetBlock", "RetNetConfig"),
):
    register_layer(_name, f"{_path}:{_block}", f"{_path}:{_config}")
