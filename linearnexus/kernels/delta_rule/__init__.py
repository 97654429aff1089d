"""DeltaNet: linear attention whose state is corrected toward each new value (the delta rule)."""

from linearnexus.kernels.delta_rule.api import delta_rule

__all__ = ["delta_rule"]
