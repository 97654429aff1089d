"""Core runtime shared by every kernel and block: caches, conv, padding, gating, modes, config.

``core`` imports only jax, numpy and the standard library.
"""
