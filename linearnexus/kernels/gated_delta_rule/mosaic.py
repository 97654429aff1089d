"""gated_delta_rule's ``mosaic`` backend: the Triton WY preparation, the chunk walk on Mosaic
GPU (Hopper), the Triton backward. Checked on an H200; automatic on sm_90+ (faster than pallas in LM training;
``LINEARNEXUS_MOSAIC_GDN=0`` leaves it to name only: ``kernels/common/mosaic_delta.py``;
docs/mosaic.md).
"""

from __future__ import annotations

from linearnexus.core.types import Array
from linearnexus.kernels.common.mosaic_chunk import MosaicConfig
from linearnexus.kernels.common.mosaic_ops import delta_rule_mosaic


def gated_delta_rule_mosaic(q: Array, k: Array, v: Array, g: Array, beta: Array, *,
                            scale: float, initial_state: Array | None = None,
                            cu_seqlens: Array | None = None, chunk_size: int | None = None,
                            config: MosaicConfig | None = None) -> tuple[Array, Array]:
    """The gated delta rule with the Mosaic GPU forward; arguments as
    :func:`gated_delta_rule_reference` plus ``chunk_size`` (64) and ``config``
    (:class:`MosaicConfig`: ``stages``).

    Returns ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)`` (N = B, or
    the packed sequences).

    Raises:
        NotImplementedError: not sm_90+, float32 inputs, key dims > 128,
            chunk sizes other than 64 (the dispatcher then runs the ``pallas`` backend).
    """
    return delta_rule_mosaic(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                             cu_seqlens=cu_seqlens, chunk_size=chunk_size, config=config)
