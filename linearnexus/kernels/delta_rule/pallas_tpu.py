"""delta_rule's ``pallas_tpu`` backend: the WY form in XLA, then the shared TPU chunk core.

Kernels, layout and VMEM arithmetic: ``kernels/common/pallas_tpu.py`` and ``docs/tpu.md``.
"""

from __future__ import annotations

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas_tpu import delta_rule_tpu


def delta_rule_pallas_tpu(q: Array, k: Array, v: Array, beta: Array, *, scale: float,
                          initial_state: Array | None = None, cu_seqlens: Array | None = None,
                          chunk_size: int | None = None) -> tuple[Array, Array]:
    """The delta rule through the TPU kernels; arguments as :func:`delta_rule_reference` plus
    ``chunk_size`` (a multiple of 8; None: 128).

    Returns ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.
    """
    return delta_rule_tpu("delta_rule", q, k, v, beta, None, scale=scale,
                          initial_state=initial_state, cu_seqlens=cu_seqlens,
                          chunk_size=chunk_size)
