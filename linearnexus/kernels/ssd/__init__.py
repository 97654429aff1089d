"""Mamba2's SSD: simple GLA with q = C, k = B, v = dt * x, g = dt * A, plus the D skip."""

from linearnexus.kernels.ssd.api import ssd

__all__ = ["ssd"]
