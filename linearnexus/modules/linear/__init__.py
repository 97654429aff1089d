"""Linear-attention blocks (GLA, Simple GLA, RetNet, DeltaNet, Gated DeltaNet), their shared
body (``base.py``) and the call runtime they share with Mamba2 (``runtime.py``)."""
