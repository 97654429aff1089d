"""Selective state-space blocks."""
