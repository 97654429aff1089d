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

:func:`plan_cpu_devices` and :func:`use_cpu_devices` split the batch over the host's cores:
on a host with no accelerator, ``train_lm.py`` asks JAX for 2 CPU devices
(``jax_num_cpu_devices``, before its backend starts) and trains on the mesh ``data=2``, each
device running its half of the batch on one thread. A step of a small model is ~600 small
ops; one device runs them one after another with little overlap, two devices run two
streams side by side and meet once per step in the gradient all-reduce. That pays on idle
cores, at the same losses; on cores shared with other busy processes the two devices wait
on each other at the all-reduce and it can cost (measured: docs/benchmarks.md, "CPU
training speed, round 3").
``LINEARNEXUS_CPU_DEVICES=1`` turns it off, ``=N`` asks for N devices; a ``--mesh`` of N
devices gets N CPU devices on such a host; a CPU device count the user set
(``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, ``JAX_NUM_CPU_DEVICES``) wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

__all__ = ["AUTO_CPU_DEVICES", "CPU_DEVICES_ENV", "CPU_TRAINING_FLAGS", "DISABLE_ENV",
           "apply_cpu_flags", "plan_cpu_devices", "use_cpu_devices"]

CPU_TRAINING_FLAGS: tuple[str, ...] = ("--xla_cpu_multi_thread_eigen=false",)
DISABLE_ENV = "LINEARNEXUS_XLA_CPU_FLAGS"
CPU_DEVICES_ENV = "LINEARNEXUS_CPU_DEVICES"
#: devices of the automatic split: measured on 2 cores only; each device holds a replica of
#: the parameters and optimizer state, so more would also multiply the memory
AUTO_CPU_DEVICES = 2


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


def plan_cpu_devices(mesh: str | None, batch_size: int,
                     env: Mapping[str, str] | None = None) -> tuple[int, str | None]:
    """How many CPU devices a training run should ask JAX for, and the mesh to train on.

    Args:
        mesh: the run's mesh spec (``TrainConfig.mesh``) or None.
        batch_size: the run's batch size (an automatic split must divide it).
        env: environment to read (default ``os.environ``).

    Returns:
        ``(n_devices, mesh)``: ``n_devices`` is 0 to leave JAX's CPU device count alone,
        else the count for :func:`use_cpu_devices`; ``mesh`` is the given one, or
        ``"data=N"`` when the batch is split automatically. Nothing is planned when JAX's
        backend already started, on a host with an accelerator (``JAX_PLATFORMS`` naming
        another platform, or a GPU / TPU plugin installed), when the user set the CPU device
        count, or for ``mesh="auto"``. Without a mesh: ``LINEARNEXUS_CPU_DEVICES`` if set,
        else :data:`AUTO_CPU_DEVICES` when this process may use that many cores and it
        divides the batch.

    Raises:
        ValueError: ``LINEARNEXUS_CPU_DEVICES`` not a positive integer, or not dividing
            ``batch_size``.
    """
    env = os.environ if env is None else env
    if _backend_started() or not _cpu_only(env) or _count_given(env):
        return 0, mesh
    if mesh is not None:
        return _mesh_devices(mesh), mesh
    given = env.get(CPU_DEVICES_ENV, "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ValueError(f"{CPU_DEVICES_ENV}: expected a positive integer, got {given!r}")
        n = int(given)
        if batch_size % n:
            raise ValueError(f"{CPU_DEVICES_ENV}: {n} devices do not divide the batch size "
                             f"{batch_size}")
    else:
        n = AUTO_CPU_DEVICES
        if _cores() < n or batch_size % n:
            return 0, None
    return (n, f"data={n}") if n > 1 else (0, None)


def use_cpu_devices(n: int) -> None:
    """Ask JAX for ``n`` CPU devices (``jax_num_cpu_devices``); before its backend starts.

    Raises:
        RuntimeError: JAX's backend already started (JAX's own error).
    """
    import jax

    jax.config.update("jax_num_cpu_devices", n)


def _cpu_only(env: Mapping[str, str]) -> bool:
    platforms = [p.strip().lower() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return all(p == "cpu" for p in platforms)
    import importlib.util
    import pkgutil

    if importlib.util.find_spec("libtpu") is not None:
        return False
    spec = importlib.util.find_spec("jax_plugins")  # where JAX's GPU / TPU plugins install
    if spec is None or spec.submodule_search_locations is None:
        return True
    return not any(pkgutil.iter_modules(list(spec.submodule_search_locations)))


def _count_given(env: Mapping[str, str]) -> bool:
    # a multi-process run (jax.distributed) lays out its devices itself
    flags = env.get("XLA_FLAGS", "")
    return ("--xla_force_host_platform_device_count" in flags
            or any(env.get(name, "").strip()
                   for name in ("JAX_NUM_CPU_DEVICES", "JAX_COORDINATOR_ADDRESS")))


def _mesh_devices(mesh: str) -> int:
    """Devices a ``"data=2,fsdp=4"`` spec covers (0 for "auto", "none" or a malformed spec,
    which the mesh's own validation reports)."""
    import math

    from linearnexus.parallel.mesh import MeshError, parse_mesh_spec

    try:
        total = math.prod(parse_mesh_spec(mesh, None).values())
    except MeshError:
        return 0
    return total if total > 1 else 0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
