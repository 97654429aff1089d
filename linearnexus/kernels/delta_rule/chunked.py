"""The delta rule in chunks: the WY / UT form, matmuls inside a chunk, a scan across chunks.

The chunk math is shared with the gated form in :mod:`linearnexus.kernels.common.delta`
(derivation in README.md); without a gate every decay is 1 and no exponential is computed.
"""

from __future__ import annotations

from linearnexus.core.types import Array
from linearnexus.kernels.common.delta import delta_chunked


def delta_rule_chunked(q: Array, k: Array, v: Array, beta: Array, *, scale: float,
                       initial_state: Array | None = None, cu_seqlens: Array | None = None,
                       chunk_size: int = 64) -> tuple[Array, Array]:
    """Chunked delta rule; arguments and returns as :func:`delta_rule_reference`."""
    return delta_chunked(q, k, v, beta, None, scale=scale, initial_state=initial_state,
                         cu_seqlens=cu_seqlens, chunk_size=chunk_size)
