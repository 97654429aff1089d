"""Public entry point of simple GLA (scalar-gated linear attention) and its backends."""

from __future__ import annotations

import jax.numpy as jnp

from linearnexus.core.hooks import overridable
from linearnexus.core.mode import KernelMode
from linearnexus.core.types import Array
from linearnexus.kernels.common.backends import DEFAULT_ORDER, check_and_run, make_backends
from linearnexus.kernels.common.mosaic_ops import MosaicKernel
from linearnexus.kernels.common.pallas_ops import pallas_backends
from linearnexus.kernels.common.pallas_step import StepSpec
from linearnexus.kernels.common.pallas_tpu import PallasTpuKernel
from linearnexus.kernels.common.validation import (
    check_array,
    check_qkv,
)
from linearnexus.kernels.simple_gla.chunked import simple_gla_chunked
from linearnexus.kernels.simple_gla.mosaic import simple_gla_mosaic
from linearnexus.kernels.simple_gla.pallas import simple_gla_pallas
from linearnexus.kernels.simple_gla.pallas_tpu import simple_gla_pallas_tpu
from linearnexus.kernels.simple_gla.reference import simple_gla_recurrent, simple_gla_reference

DEFAULT_CHUNK_SIZE = 64

BACKENDS = make_backends(simple_gla_reference, simple_gla_chunked, simple_gla_recurrent)
STEP = StepSpec("scalar", delta=False)
# "pallas_step": the fused one-token step by name (pallas and mosaic run it for T == 1 on a GPU)
BACKENDS.update(pallas_backends(simple_gla_pallas, simple_gla_recurrent, STEP))
BACKENDS["mosaic"] = MosaicKernel(simple_gla_mosaic, simple_gla_recurrent, step=STEP,
                                  final_marks_bad_inputs=True)
BACKENDS["pallas_tpu"] = PallasTpuKernel(simple_gla_pallas_tpu, simple_gla_recurrent)
# Mosaic GPU first on sm_90+ (bf16 / f16, batch rows; it raises NotImplementedError for the
# rest), then the Triton kernels on any NVIDIA GPU; both decline off a GPU; the Mosaic TPU
# kernels on a TPU only
BACKEND_ORDER = ("mosaic", "pallas", "pallas_tpu", *DEFAULT_ORDER)


@overridable("simple_gla")  # context parallelism re-routes it (linearnexus.parallel)
def simple_gla(
    q: Array,
    k: Array,
    v: Array,
    g: Array | None = None,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: Array | None = None,
    chunk_size: int | None = None,
    mode: KernelMode | str | None = None,
    backend: str | None = None,
) -> tuple[Array, Array | None]:
    """Linear attention with a scalar decay per head and step.

    ``S_t = exp(g_t) S_{t-1} + k_t v_t^T`` and ``o_t = scale * q_t^T S_t``, with ``S`` a
    ``K x V`` state per head.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log-gates (<= 0 for decay), or None for no decay (plain linear
            attention).
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of packed sequences) or None.
        output_final_state: also return the final ``[N, H, K, V]`` state.
        cu_seqlens: ``[N+1]`` int32 offsets of packed sequences (requires B == 1); each
            sequence starts from its own initial state and never sees the others.
        chunk_size: tokens per chunk in chunk mode (default 64).
        mode: "chunk", "recurrent" or None (recurrent when T < 64).
        backend: "mosaic" (Mosaic GPU forward on sm_90+, the automatic choice there for
            bf16 / f16 batch rows), "pallas" (Triton kernels; the automatic choice on other
            GPUs and for what mosaic does not cover), "pallas_tpu" (Mosaic TPU kernels; the
            automatic choice on a TPU; on a CPU only with ``LINEARNEXUS_PALLAS_TPU_INTERPRET=1``,
            through the TPU interpreter), "pallas_step" (the fused
            one-token kernel, T == 1 only), "jax"
            (chunked / recurrent pure JAX), "naive" (per-step truth) or None.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, ``cu_seqlens`` or ``scale``, naming the
            argument. NotImplementedError: the named backend cannot run this call.
    """
    batch, seq, heads, key_dim, value_dim = check_qkv(q, k, v)
    if g is not None and getattr(g, "ndim", None) == 4:
        raise ValueError(f"g: simple_gla takes a scalar gate per head [B, T, H]; got rank 4 "
                         f"{tuple(g.shape)} (use gla for a gate per key dimension)")
    check_array("g", g, (batch, seq, heads), "[B, T, H]")
    if g is None:
        g = jnp.zeros((batch, seq, heads), jnp.float32)
    return check_and_run("simple_gla", BACKENDS, BACKEND_ORDER, (q, k, v, g),
                         (batch, seq, heads, key_dim, value_dim),
                         gate_names=("g",), default_chunk_size=DEFAULT_CHUNK_SIZE, scale=scale,
                         initial_state=initial_state, output_final_state=output_final_state,
                         cu_seqlens=cu_seqlens, chunk_size=chunk_size, mode=mode, backend=backend)
