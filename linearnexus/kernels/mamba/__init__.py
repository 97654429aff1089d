"""Mamba-1 selective scan (S6). The api function is the only public entry point."""

from linearnexus.kernels.mamba.api import selective_scan

__all__ = ["selective_scan"]
