"""Linear-attention blocks (GLA, DeltaNet, RetNet, Mamba2, ...) and their shared call runtime."""
