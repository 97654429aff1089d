"""simple_gla's ``mosaic`` backend: the Mosaic GPU (Hopper) kernels with a scalar gate,
forward and backward (``kernels/common/mosaic_bwd.py``).

Kernel, tile config and scope: ``kernels/common/mosaic_chunk.py``; glue and what falls back
to the Triton ``pallas`` backend: ``kernels/common/mosaic_ops.py``; design and measured
numbers: this folder's README ("Mosaic GPU kernel").
"""

from __future__ import annotations

from linearnexus.core.types import Array
from linearnexus.kernels.common.mosaic_chunk import MosaicConfig
from linearnexus.kernels.common.mosaic_ops import linear_attention_mosaic


def simple_gla_mosaic(q: Array, k: Array, v: Array, g: Array | None, *, scale: float,
                      initial_state: Array | None = None, cu_seqlens: Array | None = None,
                      chunk_size: int | None = None,
                      config: MosaicConfig | None = None) -> tuple[Array, Array]:
    """Simple GLA on Mosaic GPU (forward and, under a gradient, backward); arguments as
    :func:`simple_gla_reference` plus ``chunk_size`` (64 or 128) and ``config`` (tile /
    pipeline overrides, which backward: :class:`MosaicConfig`).

    Returns ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)`` (N = B, or
    the packed sequences).

    Raises:
        NotImplementedError: float32 inputs, key dims > 128, a JAX without
            the Mosaic GPU APIs used (the dispatcher then runs the ``pallas`` backend).
    """
    return linear_attention_mosaic(q, k, v, g, scale=scale, initial_state=initial_state,
                                   cu_seqlens=cu_seqlens, chunk_size=chunk_size, config=config)
