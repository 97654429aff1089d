"""GLA: gated linear attention with a decay per head, step and key dimension."""

from linearnexus.kernels.gla.api import gla

__all__ = ["gla"]
