"""XLA:CPU settings for training small models on a few cores.

``train_lm.py`` calls :func:`apply_cpu_flags` before JAX starts its backend. It adds
:data:`CPU_TRAINING_FLAGS` to ``XLA_FLAGS`` (only the ``xla_cpu_*`` flags, which GPU and TPU
backends ignore):

* ``--xla_cpu_multi_thread_eigen=false``: each Eigen matmul runs on one thread. The
  training step of a small model is hundreds of small ops (the nanoGPT recipe's largest
  matmul is ``[768, 128] x [128, 384]``); XLA still runs independent ops of the step
  concurrently on its thread pool, and splitting each small matmul across threads mostly
  adds synchronisation, which stalls whenever another process holds a core.
  ``benchmarks/cpu_train_compare.py`` measures it against the XLA default in the same run
  (docs/benchmarks.md, "Training on the CPU").

A flag the user already put in ``XLA_FLAGS`` wins (its name is matched, not its value), and
``LINEARNEXUS_XLA_CPU_FLAGS=0`` turns the whole addition off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

__all__ = ["CPU_TRAINING_FLAGS", "DISABLE_ENV", "apply_cpu_flags"]

CPU_TRAINING_FLAGS: tuple[str, ...] = ("--xla_cpu_multi_thread_eigen=false",)
DISABLE_ENV = "LINEARNEXUS_XLA_CPU_FLAGS"


def apply_cpu_flags(env: MutableMapping[str, str] | None = None) -> list[str]:
    """Add :data:`CPU_TRAINING_FLAGS` to ``env["XLA_FLAGS"]`` (default ``os.environ``).

    Must run before JAX creates its CPU backend (the first array or ``jax.devices()``);
    later, XLA has read its flags and this changes nothing.

    Returns:
        The flags added (empty when ``LINEARNEXUS_XLA_CPU_FLAGS=0``, when every flag's name
        is already in ``XLA_FLAGS``, or when this process's JAX backend already started:
        then ``os.environ`` is left alone, since the flags could no longer take effect).
    """
    if env is None:
        if _backend_started():
            return []
        env = os.environ
    if env.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    current = env.get("XLA_FLAGS", "")
    given = {part.split("=", 1)[0] for part in current.split()}
    added = [flag for flag in CPU_TRAINING_FLAGS if flag.split("=", 1)[0] not in given]
    if added:
        env["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:  # private, but the only way to ask; assume started if it moves
        from jax._src import xla_bridge
    except ImportError:
        return True
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())
