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
# tests/multidevice needs 8 simulated devices, so it runs in a process of its own (the
# Makefile's second pytest call sets XLA_FLAGS before jax is imported)
collect_ignore = ([] if "xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
                  else ["multidevice"])
# several pytest workers may share one GPU: no 75% preallocation per process
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Most of the suite's time is XLA compiling small programs, not running them. Without XLA's
# optimisation passes the suite takes about two thirds of the time (test_linear_ops.py
# 127 -> 72 s, test_blocks_registry.py 203 -> 139 s), all within the tests' tolerances. The
# library keeps XLA's defaults for users; LINEARNEXUS_TEST_OPTIMIZE=1 runs the suite with
# them (both settings below) too. Set through the environment (JAX reads it at import) so
# the subprocesses that tests start (train_lm.py runs, the quickstart notebook's kernel)
# compile the same way.
_FAST_COMPILE = os.environ.get("LINEARNEXUS_TEST_OPTIMIZE", "0") != "1"
if _FAST_COMPILE:
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    # XLA:CPU in jaxlib 0.10 compiles fusions through its newer MLIR emitters unless told
    # otherwise; its older LLVM emitters compile the suite's small programs in about half
    # the CPU time (test_linear_ops.py's forward sweep: 51 -> 27 s of CPU; same tolerances
    # met). jaxlib 0.11 has only the new emitters (the flag is unknown there: a fatal error)
    from importlib.metadata import version as _version

    if _version("jaxlib").startswith("0.10.") and "fusion_emitters" not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

import jax  # noqa: E402

# The suite checks math at 1e-5: on GPUs XLA's default float32 matmuls use TF32 (about 1e-3
# relative), so ask for full float32 precision (a no-op on the CPU).
jax.config.update("jax_default_matmul_precision", "highest")
if _FAST_COMPILE:
    jax.config.update("jax_disable_most_optimizations", True)  # jax imported before conftest


@pytest.fixture
def key(request):
    """A PRNG key that differs per test (derived from the test's name)."""
    import zlib

    import jax

    return jax.random.PRNGKey(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def cpu_dispatch(monkeypatch):
    """The one-row matmul kernels and the fused layer kernels' dispatch as on the CPU
    whatever runs the suite: neither family is picked by itself (their ``_compiles`` is
    False; other one-token kernels, the op's step and the conv step, still follow the
    machine), so a test that picks them (``monkeypatch.setattr(..., "_compiles", lambda:
    True)``) runs the same combination on a CPU (interpreted) and on a GPU (compiled). Without
    it a GPU picks every kernel at once, and tests that count one path's calls or compare a
    path with XLA's fail there for that reason alone (10 did on an H100, 2026-12-05)."""
    import linearnexus.kernels.fused_decode.api as layer_api
    import linearnexus.kernels.fused_decode.gemv as gemv

    monkeypatch.setattr(layer_api, "_compiles", lambda: False)
    monkeypatch.setattr(gemv, "_compiles", lambda: False)


@pytest.fixture(autouse=True)
def _fresh_mosaic_traces():
    """Each test traces the Mosaic kernels anew: ``mosaic_chunk.lowered_once`` keeps a trace
    per static description for the process, and tests change module constants the kernels
    read at trace time (``monkeypatch.setattr(mosaic_bwd, "STATE_SMALL_MIN_CHUNKS", 1)``)."""
    yield
    module = sys.modules.get("linearnexus.kernels.common.mosaic_chunk")
    if module is not None:
        module.clear_lowering_caches()
