"""LinearNexus: linear attention and selective state-space models in JAX + Flax NNx.

Importing the package is cheap: subpackages (kernels, modules, models, ...) load
on first attribute access, so ``import linearnexus`` pulls in no Flax code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "core",
    "kernels",
    "modules",
    "registry",
    "models",
    "generate",
    "optim",
    "data",
    "train",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'linearnexus' has no attribute {name!r}")
