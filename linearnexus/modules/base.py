"""The block protocol and the config base every block config extends.

Every block is built as ``Block(config, *, rngs)`` and called as::

    y, new_state = block(x, state=None, mask=None, mode=None)   # x: [B, T, D]
    state = block.init_state(batch_size)                         # zeros, right dtypes

State goes in and comes back out (blocks keep no hidden cache). ``mask`` is a ``[B, T]``
padding mask (True = valid token): padded positions change neither the valid outputs nor
the returned state, and their outputs are zero.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, TypeVar, runtime_checkable

import jax.numpy as jnp

from linearnexus.core.config import ConfigBase, field
from linearnexus.core.mode import KernelMode
from linearnexus.core.padding import validate_mask
from linearnexus.core.types import FLOAT_DTYPES, Array, is_float_dtype

_B = TypeVar("_B", bound="BlockConfig")

#: the ``kernel_backend`` choices of every block whose mechanism is a kernel op: "auto" (the
#: op picks at call time: its Pallas kernels on an NVIDIA GPU, else pure JAX), "jax"
#: (chunked / recurrent pure JAX), "naive" (the per-step reference in both modes), "pallas"
#: (the Triton kernels; Pallas interpret mode, slow, off a GPU)
KERNEL_BACKENDS = ("auto", "jax", "naive", "pallas")

#: ``KERNEL_BACKENDS`` plus "mosaic" (the Mosaic GPU kernels on sm_90+, docs/mosaic.md), for
#: the blocks whose op has that backend (Mamba2 through ssd / simple_gla, DeltaNet, Gated
#: DeltaNet, GLA, Simple GLA, RetNet). Naming it pins every layer of a model to it
#: (``ModelConfig.block_options``); a call it cannot run then raises ``NotImplementedError``
#: instead of falling back.
MOSAIC_KERNEL_BACKENDS = (*KERNEL_BACKENDS, "mosaic")


def op_backend(kernel_backend: str) -> str | None:
    """A config's ``kernel_backend`` as the op's ``backend=`` argument ("auto" -> None)."""
    return None if kernel_backend == "auto" else kernel_backend


@dataclasses.dataclass
class BlockConfig(ConfigBase):
    """Fields every block config has.

    Attributes:
        d_model: width of the residual stream (D).
        dtype: compute dtype of activations.
        param_dtype: storage dtype of parameters (kept separate so bf16 compute can use
            float32 master weights).
    """

    d_model: int = field(256, gt=0)
    dtype: str = field("float32", choices=FLOAT_DTYPES)
    param_dtype: str = field("float32", choices=FLOAT_DTYPES)

    @classmethod
    def tiny(cls: type[_B], d_model: int = 16, **overrides: Any) -> _B:
        """A small config for tests and smoke runs; subclasses shrink their own knobs."""
        return cls.from_dict({"d_model": d_model, **overrides})


@runtime_checkable
class Block(Protocol):
    """What models, tests and benchmarks rely on."""

    def __call__(self, x: Array, *, state: Any = None, mask: Array | None = None,
                 mode: KernelMode | str | None = None) -> tuple[Array, Any]: ...

    def init_state(self, batch_size: int) -> Any: ...


def check_block_input(x: Array, d_model: int, mask: Array | None = None) -> Array | None:
    """Validate a block's ``x: [B, T, D]`` and optional ``mask: [B, T]``; return the bool mask.

    Raises:
        ValueError: wrong rank, ``D != d_model``, ``T == 0``, or a mask of the wrong shape.
        TypeError: non-float ``x``.
    """
    if not hasattr(x, "ndim") or x.ndim != 3:
        shape = getattr(x, "shape", None)
        raise ValueError(f"x: expected rank 3 [B, T, D] with D={d_model}, got shape {shape}")
    if not is_float_dtype(x.dtype):
        raise TypeError(f"x: expected a float dtype (float32, bfloat16, ...), got {x.dtype}")
    batch, seq, width = x.shape
    if width != d_model:
        raise ValueError(f"x: expected hidden size D={d_model} (last axis), got shape {tuple(x.shape)}")
    if seq == 0:
        raise ValueError(f"x: sequence length T must be >= 1, got shape {tuple(x.shape)}")
    if mask is None:
        return None
    return validate_mask(mask, batch, seq, name="mask")


def check_state_batch(name: str, array: Array, expected: tuple[int, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` when a state array's shape is not ``expected``."""
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(array.shape)}")


def dtype_of(name: str):
    """``"bfloat16"`` -> ``jnp.bfloat16`` (config strings to JAX dtypes)."""
    return jnp.dtype(name)
