"""Fused one-token kernels: a recurrent layer's work between its projections in one kernel,
and batch-1 projections that read their weights once."""

from linearnexus.kernels.fused_decode.api import (
    DECODE_GEMV_ENV,
    FUSED_LAYER_ENV,
    DeltaLayerSpec,
    SsdLayerSpec,
    decode_matvec,
    delta_layer_step,
    layer_kernel_ready,
    matvec_ready,
    ssd_layer_step,
)

__all__ = ["DECODE_GEMV_ENV", "FUSED_LAYER_ENV", "DeltaLayerSpec", "SsdLayerSpec",
           "decode_matvec", "delta_layer_step", "layer_kernel_ready", "matvec_ready",
           "ssd_layer_step"]
