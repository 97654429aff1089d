"""Pieces every linear-attention mechanism shares: input checks, chunk layout, scans.

Nothing here knows a mechanism's math; each ``kernels/<m>/`` supplies that as pure
functions and uses these helpers for validation, padding to whole chunks, packed
variable-length sequences (``cu_seqlens``) and the per-step / per-chunk scans.
"""
