"""Fused one-token layer steps: a recurrent layer's work between its projections in one kernel."""

from linearnexus.kernels.fused_decode.api import (
    FUSED_LAYER_ENV,
    DeltaLayerSpec,
    SsdLayerSpec,
    delta_layer_step,
    layer_kernel_ready,
    ssd_layer_step,
)

__all__ = ["FUSED_LAYER_ENV", "DeltaLayerSpec", "SsdLayerSpec", "delta_layer_step",
           "layer_kernel_ready", "ssd_layer_step"]
