"""RetNet retention: simple GLA with a fixed per-head decay."""

from linearnexus.kernels.retention.api import retention

__all__ = ["retention"]
