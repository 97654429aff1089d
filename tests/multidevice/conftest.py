"""Multi-device tests: 8 simulated CPU devices, in a pytest process of their own.

Run them with (the Makefile's test target does)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/multidevice

The main run skips this folder (``tests/conftest.py``): XLA reads the device count once,
when jax starts, so it cannot change inside one process.
"""

from __future__ import annotations

import jax
import pytest

N_DEVICES = 8


def pytest_configure(config):
    if jax.device_count() < N_DEVICES:
        pytest.exit(f"tests/multidevice needs {N_DEVICES} devices, found {jax.device_count()}: "
                    "run with XLA_FLAGS=--xla_force_host_platform_device_count=8", returncode=4)
