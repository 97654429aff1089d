"""Shared pytest set-up: tests import helpers as ``tests.helpers``; keys are fresh per test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# keep XLA from grabbing both cores per test worker more than needed
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")


@pytest.fixture
def key(request):
    """A PRNG key that differs per test (derived from the test's name)."""
    import zlib

    import jax

    return jax.random.PRNGKey(zlib.crc32(request.node.nodeid.encode()))
