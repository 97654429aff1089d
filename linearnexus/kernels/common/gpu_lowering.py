"""Lower a function that calls the Pallas Triton kernels for a GPU, on a machine without one.

The tests and ``benchmarks/triton_static.py`` read the program XLA would get on a GPU (the
``__gpu$xla.gpu.triton`` custom calls, their warps and stages) without a GPU present.
JAX 0.10's Triton lowering accepted ``lowering_platforms=("cuda",)`` alone; from JAX 0.11
it asks the device it lowers for its compute capability and, with only CPU devices, stops
with "No supported GPU devices found, please specify an abstract GPU device". An abstract
mesh whose ``AbstractDevice`` names the GPU answers that question; both 0.10 and 0.11 have
``jax.sharding.AbstractDevice`` / ``use_abstract_mesh``, and 0.10 ignores the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax

# The project's GPU (docs/gpu_notes.md); its kind is what jax reports for it, which is how
# JAX 0.11 maps a device to a compute capability (9.0 here).
DEFAULT_GPU = "NVIDIA H200"
_H200_SMS = 132


@contextlib.contextmanager
def abstract_gpu(device_kind: str = DEFAULT_GPU, num_cores: int | None = _H200_SMS) -> Iterator[None]:
    """Within this context, Pallas' Triton lowering targets ``device_kind`` with no GPU present.

    ``device_kind`` is a jax device kind such as ``"NVIDIA H100"`` or ``"NVIDIA H200"``.
    On a machine whose GPU is of that kind, nothing changes: JAX uses the real device.
    """
    if not isinstance(device_kind, str) or not device_kind.startswith("NVIDIA "):
        raise ValueError(f"device_kind: expected a jax NVIDIA device kind such as "
                         f"'NVIDIA H200', got {device_kind!r}")
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores,
                                         platform="gpu")
    # one axis of size 1: the mesh exists only to carry the device. Auto, not 0.11's default
    # Explicit: an Explicit mesh would put shardings into every array's type and change how
    # the program traces (a reshape's output sharding must then be derivable, for example).
    mesh = jax.sharding.AbstractMesh((1,), ("_lowering",), (jax.sharding.AxisType.Auto,),
                                     abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def lower_for_gpu(fn: Callable[..., Any], *args: Any, device_kind: str = DEFAULT_GPU) -> str:
    """The StableHLO text of ``jax.jit(fn)`` lowered for CUDA at ``args`` (arrays or
    ``jax.ShapeDtypeStruct``), with the Pallas kernels in Triton form (not interpreted).

    The caller sets ``LINEARNEXUS_PALLAS_INTERPRET=0`` so the kernels are not lowered as
    interpreted JAX on a machine without a GPU.
    """
    with abstract_gpu(device_kind):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
