"""Public entry point of the delta rule (DeltaNet) and its backends."""

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
from linearnexus.kernels.common.validation import (
    check_array,
    check_qkv,
)
from linearnexus.kernels.delta_rule.chunked import delta_rule_chunked
from linearnexus.kernels.delta_rule.mosaic import delta_rule_mosaic
from linearnexus.kernels.delta_rule.pallas import delta_rule_pallas
from linearnexus.kernels.delta_rule.pallas_tpu import delta_rule_pallas_tpu
from linearnexus.kernels.delta_rule.reference import delta_rule_recurrent, delta_rule_reference

# fastest fwd+bwd on 2 CPU cores (B=2, T=2048, H=4, K=V=64); 128 is ~1.4x faster on an H200
# (README.md, Speed)
DEFAULT_CHUNK_SIZE = 64

STEP = StepSpec("none", delta=True)
BACKENDS = make_backends(delta_rule_reference, delta_rule_chunked, delta_rule_recurrent)
# "pallas_step": the fused one-token step by name (pallas runs it for T == 1 on a GPU)
BACKENDS.update(pallas_backends(delta_rule_pallas, delta_rule_recurrent, STEP))
BACKENDS["pallas_tpu"] = PallasTpuKernel(delta_rule_pallas_tpu, delta_rule_recurrent)
# the Mosaic GPU kernels (sm_90+, bf16 / f16, batch rows and packed): automatic unless
# LINEARNEXUS_MOSAIC_GDN=0 (kernels/common/mosaic_delta.py)
BACKENDS["mosaic"] = MosaicKernel(delta_rule_mosaic, delta_rule_recurrent,
                                  step=STEP, opt_in=delta_opted_in, status=MOSAIC_STATUS,
                                  final_marks_bad_inputs=True)
# automatic dispatch takes "mosaic" (opted in) and "pallas" on a GPU
# only, "pallas_tpu" on a TPU only (their `supports` say no elsewhere); mosaic raises
# NotImplementedError for what it does not cover and pallas runs it
BACKEND_ORDER = ("mosaic", "pallas", "pallas_tpu", *DEFAULT_ORDER)


@overridable("delta_rule")  # context parallelism re-routes it (linearnexus.parallel)
def delta_rule(
    q: Array,
    k: Array,
    v: Array,
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
    """Linear attention with the delta rule (DeltaNet).

    ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` and
    ``o_t = scale * q_t^T S_t``, with ``S`` a ``K x V`` state per head: each step moves the
    state's value at ``k_t`` a fraction ``beta_t`` of the way toward ``v_t``.

    Keys are expected L2-normalised (``||k_t|| = 1``, e.g. ``k / ||k||`` in the layer);
    with ``beta_t`` in ``(0, 1)`` (a sigmoid) each step is then a contraction. Nothing here
    normalises or checks them: other keys give the same recurrence, which may grow.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
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
    if beta is None:
        raise ValueError(f"beta: expected shape {(batch, seq, heads)} [B, T, H], got None")
    check_array("beta", beta, (batch, seq, heads), "[B, T, H]")
    return check_and_run("delta_rule", BACKENDS, BACKEND_ORDER, (q, k, v, beta),
                         (batch, seq, heads, key_dim, value_dim),
                         gate_names=("beta",), default_chunk_size=DEFAULT_CHUNK_SIZE, scale=scale,
                         initial_state=initial_state, output_final_state=output_final_state,
                         cu_seqlens=cu_seqlens, chunk_size=chunk_size, mode=mode, backend=backend)
