"""Kernels: pure functions over arrays, one folder per mechanism (see ``kernels/base.py``)."""
