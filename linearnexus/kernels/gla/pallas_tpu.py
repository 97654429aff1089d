"""gla's ``pallas_tpu`` backend: the shared TPU chunk core with a gate per key dimension.

Kernels, layout and VMEM arithmetic: ``kernels/common/pallas_tpu.py`` and ``docs/tpu.md``.
"""

from __future__ import annotations

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas_tpu import gated_attention_tpu


def gla_pallas_tpu(q: Array, k: Array, v: Array, g: Array, *, scale: float,
                   initial_state: Array | None = None, cu_seqlens: Array | None = None,
                   chunk_size: int | None = None) -> tuple[Array, Array]:
    """GLA through the TPU kernels; arguments as :func:`gla_reference` plus ``chunk_size``
    (a multiple of 8; None: 128).

    Returns ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.
    """
    return gated_attention_tpu("gla", q, k, v, g, gate="key", scale=scale,
                               initial_state=initial_state, cu_seqlens=cu_seqlens,
                               chunk_size=chunk_size)
