"""Public entry point of the gated delta rule (Gated DeltaNet) and its backends."""

from __future__ import annotations

from linearnexus.core.hooks import overridable
from linearnexus.core.mode import KernelMode
from linearnexus.core.types import Array
from linearnexus.kernels.common.backends import DEFAULT_ORDER, check_and_run, make_backends
from linearnexus.kernels.common.mosaic_delta import MOSAIC_STATUS, delta_opted_in
from linearnexus.kernels.common.mosaic_ops import MosaicKernel
from linearnexus.kernels.common.pallas_ops import pallas_backends
from linearnexus.kernels.common.pallas_step import StepSpec
from linearnexus.kernels.common.pallas_tpu import PallasTpuKernel
from linearnexus.kernels.common.validation import check_array, check_qkv
from linearnexus.kernels.gated_delta_rule.chunked import gated_delta_rule_chunked
from linearnexus.kernels.gated_delta_rule.mosaic import gated_delta_rule_mosaic
from linearnexus.kernels.gated_delta_rule.pallas import gated_delta_rule_pallas
from linearnexus.kernels.gated_delta_rule.pallas_tpu import gated_delta_rule_pallas_tpu
from linearnexus.kernels.gated_delta_rule.reference import (
    gated_delta_rule_recurrent,
    gated_delta_rule_reference,
)

# fastest fwd+bwd on 2 CPU cores (B=2, T=2048, H=4, K=V=64); 128 is ~1.4x faster on an H200
# (README.md, Speed)
DEFAULT_CHUNK_SIZE = 64

STEP = StepSpec("scalar", delta=True)
BACKENDS = make_backends(gated_delta_rule_reference, gated_delta_rule_chunked,
                         gated_delta_rule_recurrent)
# "pallas_step": the fused one-token step by name (pallas runs it for T == 1 on a GPU)
BACKENDS.update(pallas_backends(gated_delta_rule_pallas, gated_delta_rule_recurrent, STEP))
BACKENDS["pallas_tpu"] = PallasTpuKernel(gated_delta_rule_pallas_tpu, gated_delta_rule_recurrent)
# the Mosaic GPU kernels (sm_90+, bf16 / f16, batch rows and packed): automatic unless
# LINEARNEXUS_MOSAIC_GDN=0 (faster than pallas in LM training: kernels/common/mosaic_delta.py)
BACKENDS["mosaic"] = MosaicKernel(gated_delta_rule_mosaic, gated_delta_rule_recurrent,
                                  step=STEP, opt_in=delta_opted_in, status=MOSAIC_STATUS,
                                  final_marks_bad_inputs=True)
# automatic dispatch takes "mosaic" (opted in) and "pallas" on a GPU
# only, "pallas_tpu" on a TPU only (their `supports` say no elsewhere); mosaic raises
# NotImplementedError for what it does not cover and pallas runs it
BACKEND_ORDER = ("mosaic", "pallas", "pallas_tpu", *DEFAULT_ORDER)


@overridable("gated_delta_rule")  # context parallelism re-routes it (linearnexus.parallel)
def gated_delta_rule(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: Array | None = None,
    chunk_size: int | None = None,
    mode: KernelMode | str | None = None,
    backend: str | None = None,
) -> tuple[Array, Array | None]:
    """The delta rule with a scalar decay per head and step (Gated DeltaNet).

    ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` and
    ``o_t = scale * q_t^T S_t``, with ``S`` a ``K x V`` state per head.

    Keys are expected L2-normalised (``||k_t|| = 1``, e.g. ``k / ||k||`` in the layer);
    with ``beta_t`` in ``(0, 1)`` and ``g_t <= 0`` each step is then a contraction. Nothing
    here normalises or checks them.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log-gates (<= 0 for decay).
        beta: ``[B, T, H]`` write strengths, typically in ``(0, 1)``.
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of packed sequences) or None.
        output_final_state: also return the final ``[N, H, K, V]`` state.
        cu_seqlens: ``[N+1]`` int32 offsets of packed sequences (requires B == 1); each
            sequence starts from its own initial state and never sees the others.
        chunk_size: tokens per chunk in chunk mode (default 64).
        mode: "chunk", "recurrent" or None (recurrent when T < 64).
        backend: "mosaic" (Mosaic GPU forward on sm_90+ for bf16 / f16 batch rows, Mosaic GPU
            or Triton backward; the automatic choice on sm_90+ unless
            ``LINEARNEXUS_MOSAIC_GDN=0``), "pallas" (Triton kernels; the automatic choice on
            other GPUs), "pallas_tpu"
            (Mosaic TPU kernels; the automatic choice on a TPU; on a CPU only with
            ``LINEARNEXUS_PALLAS_TPU_INTERPRET=1``, through the TPU interpreter), "pallas_step" (the fused
            one-token kernel, T == 1 only), "jax"
            (chunked / recurrent pure JAX), "naive" (per-step truth) or None.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``
        (float64 when any input is float64).

    Raises:
        ValueError / TypeError: bad shapes, dtypes, ``cu_seqlens`` or ``scale``, naming the
            argument. NotImplementedError: the named backend cannot run this call.
    """
    batch, seq, heads, key_dim, value_dim = check_qkv(q, k, v)
    for name, gate in (("g", g), ("beta", beta)):
        if gate is None:
            raise ValueError(f"{name}: expected shape {(batch, seq, heads)} [B, T, H], got None")
    if getattr(g, "ndim", None) == 4:
        raise ValueError(f"g: gated_delta_rule takes a scalar gate per head [B, T, H]; got rank 4 "
                         f"{tuple(g.shape)}")
    check_array("g", g, (batch, seq, heads), "[B, T, H]")
    check_array("beta", beta, (batch, seq, heads), "[B, T, H]")
    return check_and_run("gated_delta_rule", BACKENDS, BACKEND_ORDER, (q, k, v, g, beta),
                         (batch, seq, heads, key_dim, value_dim),
                         gate_names=("g", "beta"), default_chunk_size=DEFAULT_CHUNK_SIZE, scale=scale,
                         initial_state=initial_state, output_final_state=output_final_state,
                         cu_seqlens=cu_seqlens, chunk_size=chunk_size, mode=mode, backend=backend)
