"""Profiling: a ``jax.profiler`` trace of a block, or of some training steps, and a per-op summary.

    from linearnexus.tools.profile import profile_layer
    from linearnexus.modules.ssm.mamba import MambaBlock, MambaConfig
    summary = profile_layer(MambaBlock, MambaConfig(d_model=256), batch=2, seq=128)

writes a trace (open it with TensorBoard's profile plugin or xprof; the ``.xplane.pb``
under ``<out_dir>/plugins/profile/``) and prints the compiled ops that took the most time
(XLA ops on the CPU, kernels on a GPU), read back from the trace with
``jax.profiler.ProfileData``. ``train_lm.py --profile STEPS`` traces training steps the
same way through :class:`StepTrace`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["OpTime", "ProfileSummary", "StepTrace", "op_times", "profile_layer"]


@dataclasses.dataclass(frozen=True)
class OpTime:
    """Total time of one compiled op over the traced calls."""

    name: str
    module: str  # the jitted program it belongs to
    calls: int
    total_ms: float


@dataclasses.dataclass(frozen=True)
class ProfileSummary:
    """Where the trace went and its slowest ops, slowest first."""

    trace_dir: Path
    ops: list[OpTime]

    def table(self, top: int = 15) -> str:
        total = sum(o.total_ms for o in self.ops) or 1.0
        lines = [f"{'op':40s} {'program':28s} {'calls':>6s} {'total ms':>10s} {'share':>6s}"]
        for o in self.ops[:top]:
            lines.append(f"{o.name[:40]:40s} {o.module[:28]:28s} {o.calls:6d} "
                         f"{o.total_ms:10.3f} {100 * o.total_ms / total:5.1f}%")
        lines.append(f"{len(self.ops)} ops, {total:.3f} ms in all; trace: {self.trace_dir}")
        return "\n".join(lines)


def op_times(trace_dir: str | Path) -> list[OpTime]:
    """Per-op totals from the newest ``.xplane.pb`` under ``trace_dir``, slowest first.

    Counts the trace events that carry an ``hlo_op`` stat (what XLA's CPU and GPU runtimes
    record per executed op / kernel).

    Raises:
        FileNotFoundError: no trace under ``trace_dir``.
    """
    from jax.profiler import ProfileData

    files = sorted(Path(trace_dir).glob("plugins/profile/*/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"trace_dir: no plugins/profile/*/*.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(str(files[-1]))
    totals: dict[tuple[str, str], list[float]] = {}
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" not in stats:
                    continue
                key = (str(stats["hlo_op"]), str(stats.get("hlo_module", "")))
                entry = totals.setdefault(key, [0, 0.0])
                entry[0] += 1
                entry[1] += event.duration_ns / 1e6
    ops = [OpTime(name, module, int(n), ms) for (name, module), (n, ms) in totals.items()]
    return sorted(ops, key=lambda o: o.total_ms, reverse=True)


def profile_layer(layer_cls: type, config: Any, batch: int = 2, seq: int = 128, *,
                  mode: str | None = None, backward: bool = False, steps: int = 3,
                  out_dir: str | Path | None = None, seed: int = 0, top: int = 15,
                  verbose: bool = True) -> ProfileSummary:
    """Trace ``steps`` jit-compiled calls of ``layer_cls(config)`` on a random ``[batch, seq, D]``
    input (after one untraced compile + warm-up call) and print the slowest ops.

    Args:
        layer_cls, config: a block class and its config (e.g. ``LAYER_REGISTRY["mamba"]``).
        batch, seq: input size; ``D`` is ``config.d_model``.
        mode: the block's mode (None: its own choice for ``seq``).
        backward: trace forward + backward (gradient of the output's sum w.r.t. the
            parameters and the input) instead of the forward alone.
        steps: traced calls.
        out_dir: where the trace goes (default: a new temporary directory).
        top: rows printed.

    Returns:
        :class:`ProfileSummary` (the trace directory and every op's total time).

    Raises:
        ValueError: a size below 1.
    """
    from flax import nnx

    for name, value in (("batch", batch), ("seq", seq), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    block = layer_cls(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(block)
    dtype = getattr(config, "dtype", "float32")
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, seq, config.d_model)).astype(dtype)

    def forward(p: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, p)(x, mode=mode)[0]

    if backward:
        fn = jax.jit(jax.grad(lambda p, x: jnp.sum(forward(p, x).astype(jnp.float32)), argnums=(0, 1)))
    else:
        fn = jax.jit(forward)
    jax.block_until_ready(fn(params, x))  # compile outside the trace
    trace_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="ln-profile-"))
    with jax.profiler.trace(str(trace_dir)):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("layer", step_num=i):
                jax.block_until_ready(fn(params, x))
    summary = ProfileSummary(trace_dir, op_times(trace_dir))
    if verbose:
        print(f"{layer_cls.__name__} {'forward+backward' if backward else 'forward'}, "
              f"x [{batch}, {seq}, {config.d_model}] {dtype}, {steps} calls:")
        print(summary.table(top))
    return summary


class StepTrace:
    """An ``on_step`` callback that traces ``steps`` training steps into ``trace_dir``.

    Tracing starts after the first step seen (so compilation stays out of the trace) and
    stops after ``steps`` more; :meth:`close` stops it early (a run that ends first).

    Args:
        trace_dir: where the trace goes.
        steps: steps to trace (>= 1).
        sync: called before the trace stops, to wait for the traced steps' device work
            (e.g. ``lambda: jax.block_until_ready(trainer.state.params)``).
    """

    def __init__(self, trace_dir: str | Path, steps: int, sync: Callable[[], Any] | None = None):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        self.trace_dir = Path(trace_dir)
        self.steps = steps
        self.sync = sync
        self._first: int | None = None
        self.active = False
        self.done = False
        self.summary: ProfileSummary | None = None

    def __call__(self, step: int) -> None:
        if self.done:
            return
        if self._first is None:
            self._first = step
            if self.sync is not None:
                self.sync()
            jax.profiler.start_trace(str(self.trace_dir))
            self.active = True
        elif step - self._first >= self.steps:
            self.close()

    def close(self) -> ProfileSummary | None:
        """Stop tracing (if it runs); the summary of what was traced (None: nothing was)."""
        if self.active:
            if self.sync is not None:
                self.sync()
            jax.profiler.stop_trace()
            self.active, self.done = False, True
            self.summary = ProfileSummary(self.trace_dir, op_times(self.trace_dir))
        return self.summary
