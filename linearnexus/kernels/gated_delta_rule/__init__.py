"""Gated DeltaNet: the delta rule with a scalar decay per head and step."""

from linearnexus.kernels.gated_delta_rule.api import gated_delta_rule

__all__ = ["gated_delta_rule"]
