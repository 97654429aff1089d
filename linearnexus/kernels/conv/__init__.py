"""The short causal conv's one-token step (the rolling cache update) as a fused kernel."""

from linearnexus.kernels.conv.api import conv_step

__all__ = ["conv_step"]
