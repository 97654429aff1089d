"""Public entry point of GLA (gated linear attention, a decay per key dimension) and its backends."""

from __future__ import annotations

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
from linearnexus.kernels.gla.chunked import gla_chunked
from linearnexus.kernels.gla.mosaic import MOSAIC_STATUS, gla_mosaic, gla_opted_in
from linearnexus.kernels.gla.pallas import gla_pallas
from linearnexus.kernels.gla.pallas_tpu import gla_pallas_tpu
from linearnexus.kernels.gla.reference import gla_recurrent, gla_reference

DEFAULT_CHUNK_SIZE = 64

STEP = StepSpec("vector", delta=False)
BACKENDS = make_backends(gla_reference, gla_chunked, gla_recurrent)
# "pallas_step": the fused one-token step by name (pallas runs it for T == 1 on a GPU)
BACKENDS.update(pallas_backends(gla_pallas, gla_recurrent, STEP))
BACKENDS["pallas_tpu"] = PallasTpuKernel(gla_pallas_tpu, gla_recurrent)
# the Mosaic GPU walk (sm_90+, bf16 / f16, batch rows and packed): automatic first on a GPU
# (faster than pallas on an H100), LINEARNEXUS_MOSAIC_GLA=0 keeps it out (kernels/gla/mosaic.py)
BACKENDS["mosaic"] = MosaicKernel(gla_mosaic, gla_recurrent, step=STEP, opt_in=gla_opted_in,
                                  status=MOSAIC_STATUS, final_marks_bad_inputs=True)
# automatic dispatch takes "mosaic" (opted in) and "pallas" on a GPU only, "pallas_tpu" on a
# TPU only (their `supports` say no elsewhere); mosaic raises NotImplementedError for what it
# does not cover and pallas runs it
BACKEND_ORDER = ("mosaic", "pallas", "pallas_tpu", *DEFAULT_ORDER)


@overridable("gla")  # context parallelism re-routes it (linearnexus.parallel)
def gla(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: Array | None = None,
    chunk_size: int | None = None,
    mode: KernelMode | str | None = None,
    backend: str | None = None,
) -> tuple[Array, Array | None]:
    """Gated linear attention with a decay per head, step and key dimension.

    ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`` and ``o_t = scale * q_t^T S_t``, with ``S`` a
    ``K x V`` state per head whose row ``k`` decays by ``exp(g_t[k])``.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
        g: ``[B, T, H, K]`` log-gates (<= 0 for decay).
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of packed sequences) or None.
        output_final_state: also return the final ``[N, H, K, V]`` state.
        cu_seqlens: ``[N+1]`` int32 offsets of packed sequences (requires B == 1); each
            sequence starts from its own initial state and never sees the others.
        chunk_size: tokens per chunk in chunk mode (default 64).
        mode: "chunk", "recurrent" or None (recurrent when T < 64).
        backend: "mosaic" (Mosaic GPU walk between Triton preparation and backward; the
            automatic choice on sm_90+ GPUs for bf16 / f16, off with
            ``LINEARNEXUS_MOSAIC_GLA=0``), "pallas" (Triton kernels; the automatic choice on
            other GPUs and for float32), "pallas_tpu"
            (Mosaic TPU kernels; the automatic choice on a TPU; on a CPU only with
            ``LINEARNEXUS_PALLAS_TPU_INTERPRET=1``, through the TPU interpreter), "pallas_step" (the fused
            one-token kernel, T == 1 only), "jax"
            (chunked / recurrent pure JAX), "naive" (per-step truth) or None.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``; float64
        inputs compute and return the state in float64.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, ``cu_seqlens`` or ``scale``, naming the
            argument. NotImplementedError: the named backend cannot run this call.
    """
    batch, seq, heads, key_dim, value_dim = check_qkv(q, k, v)
    if getattr(g, "ndim", None) == 3:
        raise ValueError(f"g: gla takes a gate per key dimension [B, T, H, K]; got rank 3 "
                         f"{tuple(g.shape)} (use simple_gla for a scalar gate per head)")
    if g is None:
        raise ValueError("g: gla needs log-gates [B, T, H, K]; got None (use simple_gla "
                         "without g for plain linear attention)")
    check_array("g", g, (batch, seq, heads, key_dim), "[B, T, H, K]")
    return check_and_run("gla", BACKENDS, BACKEND_ORDER, (q, k, v, g),
                         (batch, seq, heads, key_dim, value_dim),
                         gate_names=("g",), default_chunk_size=DEFAULT_CHUNK_SIZE, scale=scale,
                         initial_state=initial_state, output_final_state=output_final_state,
                         cu_seqlens=cu_seqlens, chunk_size=chunk_size, mode=mode, backend=backend)
