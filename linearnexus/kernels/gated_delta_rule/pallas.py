"""gated_delta_rule's ``pallas`` backend: every step in Pallas (Triton) kernels.

The per-chunk WY preparation (``w``, ``u`` and ``M^{-1}``, forward and backward) is
``kernels/common/pallas_wy.py``; the chunk core (the sequential state walk, the outputs and
their gradients) is ``kernels/common/pallas_chunk.py``; the layout glue, launch heuristic
and gradient path are ``kernels/common/pallas_ops.py``; this folder's README ("Pallas
kernels") has the derivation.
"""

from __future__ import annotations

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas import TritonConfig
from linearnexus.kernels.common.pallas_ops import delta_rule_pallas


def gated_delta_rule_pallas(q: Array, k: Array, v: Array, g: Array, beta: Array, *, scale: float,
                            initial_state: Array | None = None, cu_seqlens: Array | None = None,
                            chunk_size: int | None = None,
                            config: TritonConfig | None = None) -> tuple[Array, Array]:
    """The gated delta rule through the Pallas kernels; arguments as
    :func:`gated_delta_rule_reference` plus ``chunk_size`` (power of two >= 16) and ``config``.

    Returns ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.
    """
    return delta_rule_pallas(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                             cu_seqlens=cu_seqlens, chunk_size=chunk_size, config=config)
