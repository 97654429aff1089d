"""Gated delta rule in chunks: the WY / UT form, matmuls inside a chunk, a scan across chunks.

The chunk math is shared with the ungated form in :mod:`linearnexus.kernels.common.delta`
(derivation in README.md). Every exponent is a difference ``b_i - b_j`` with ``j <= i``
(<= 0), so strong decay underflows to zero instead of overflowing.
"""

from __future__ import annotations

from linearnexus.core.types import Array
from linearnexus.kernels.common.delta import delta_chunked


def gated_delta_rule_chunked(q: Array, k: Array, v: Array, g: Array, beta: Array, *,
                             scale: float, initial_state: Array | None = None,
                             cu_seqlens: Array | None = None,
                             chunk_size: int = 64) -> tuple[Array, Array]:
    """Chunked gated delta rule; arguments and returns as :func:`gated_delta_rule_reference`."""
    return delta_chunked(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                         cu_seqlens=cu_seqlens, chunk_size=chunk_size)
