"""Simple GLA: linear attention with a scalar decay per head and step."""

from linearnexus.kernels.simple_gla.api import simple_gla

__all__ = ["simple_gla"]
