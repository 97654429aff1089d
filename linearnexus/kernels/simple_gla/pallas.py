"""simple_gla's ``pallas`` backend: the shared Pallas chunk core with a scalar gate.

Kernels, launch heuristic and the gate-gradient identity: ``kernels/common/pallas_chunk.py``
and this folder's README ("Pallas kernels").
"""

from __future__ import annotations

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas import TritonConfig
from linearnexus.kernels.common.pallas_ops import linear_attention_pallas


def simple_gla_pallas(q: Array, k: Array, v: Array, g: Array | None, *, scale: float,
                      initial_state: Array | None = None, cu_seqlens: Array | None = None,
                      chunk_size: int | None = None,
                      config: TritonConfig | None = None) -> tuple[Array, Array]:
    """Simple GLA through the Pallas kernels; arguments as :func:`simple_gla_reference` plus
    ``chunk_size`` (power of two >= 16) and ``config`` (launch-knob overrides).

    Returns ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.
    """
    return linear_attention_pallas(q, k, v, g, scale=scale, initial_state=initial_state,
                                   cu_seqlens=cu_seqlens, chunk_size=chunk_size, config=config)
