"""delta_rule's ``mosaic`` backend: gated_delta_rule's kernels without a gate (no decay).
Checked in JAX 0.11's Mosaic GPU interpreter (its gated twin on an H200); automatic on sm_90+
(``LINEARNEXUS_MOSAIC_GDN=0`` leaves it to name only: ``kernels/common/mosaic_delta.py``;
docs/mosaic.md).
"""

from __future__ import annotations

from linearnexus.core.types import Array
from linearnexus.kernels.common.mosaic_chunk import MosaicConfig
from linearnexus.kernels.common.mosaic_ops import delta_rule_mosaic as _delta


def delta_rule_mosaic(q: Array, k: Array, v: Array, beta: Array, *, scale: float,
                              initial_state: Array | None = None,
                              cu_seqlens: Array | None = None, chunk_size: int | None = None,
                              config: MosaicConfig | None = None) -> tuple[Array, Array]:
    """The delta rule with the Mosaic GPU forward; arguments as :func:`delta_rule_reference`
    plus ``chunk_size`` (64) and ``config``. Returns ``(o, final_state)`` as the reference.

    Raises:
        NotImplementedError: as :func:`gated_delta_rule_mosaic`.
    """
    return _delta(q, k, v, beta, None, scale=scale, initial_state=initial_state,
                  cu_seqlens=cu_seqlens, chunk_size=chunk_size, config=config)
