"""Per-kernel device time of one op's ``pallas`` backend, from the JAX profiler.

    python3 benchmarks/profile_gpu.py OP [--shape B,T,H,D] [--mode fwd|fwd+bwd] [--calls 3]
        [--backend pallas|mosaic] [--config "seq_split=4,block_v=64"] [--json FILE] [--once]

OP is one of ``simple_gla gla delta_rule gated_delta_rule selective_scan``; the shape is
``B,T,H,D`` (``B,T,d_inner,d_state`` for the selective scan), default the issue's
(8, 4096, 16, 128) / (8, 4096, 2048, 16). Inputs follow ``benchmarks/kernels_gpu.py`` (bf16,
gates float32). ``--config`` sets a ``MosaicConfig`` on the mosaic backend (the syntax of
``mosaic_config_gpu.py --configs``).

It compiles the op's forward (or ``jax.grad`` of the sum of its output), runs it twice,
then records ``--calls`` calls with ``jax.profiler`` and reads the trace back with
``jax.profiler.ProfileData``: every event on the GPU plane's compute-stream line is one
kernel launch. Printed: each kernel's time per call, largest first, Pallas kernels under
their Python function names and XLA's own fusions (the glue around the kernels: layout
copies, scans, adds) under XLA's names, and the sum. Profiling the whole call, glue
included, is the point: on 2026-11-23 a third of GLA's forward + backward was XLA fusions
that no kernel-filtered Nsight Compute run had shown (``docs/benchmarks.md``, GPU kernel work log).

Timing here is CUPTI's per-kernel duration, not the wall time of a call (launch gaps are
left out); ``benchmarks/kernels_gpu.py`` measures calls. On a machine without a GPU the
trace has no GPU plane and the script says so.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels_gpu as kg  # noqa: E402  (the shared input recipes)

LINEAR_OPS = ("simple_gla", "gla", "delta_rule", "gated_delta_rule")
OPS = (*LINEAR_OPS, "selective_scan")


def build(op: str, shape: tuple[int, ...], mode: str, backend: str = "pallas",
          config: object = None):
    """``(jitted function, its argument)`` for ``op`` at ``shape`` on ``backend`` (``config``:
    set on that backend's kernel for the rest of the process, unless None)."""
    key = jax.random.PRNGKey(0)
    if op == "selective_scan":
        B, T, D, N = shape
        inputs = kg.mamba_inputs(key, B, T, D, N, jnp.bfloat16)
        run = kg.mamba_call("pallas", {})

        def fwd(args):
            return run(args, None, False)[0]
    else:
        B, T, H, D = shape
        inputs = kg.jax_inputs(op, key, B, T, H, D, D, jnp.bfloat16)
        api = importlib.import_module(f"linearnexus.kernels.{op}.api")
        fn = getattr(api, op)
        if config is not None:
            api.BACKENDS[backend].config = config
        names = list(inputs)
        inputs = tuple(inputs[n] for n in names)

        def fwd(args):
            return fn(*args, backend=backend, mode="chunk")[0]
    if mode == "fwd":
        return jax.jit(fwd), inputs

    def loss(args):
        # the cotangent of the sum is a broadcast of ones: one small XLA fusion in the listing
        return jnp.sum(fwd(args).astype(jnp.float32))

    return jax.jit(jax.grad(loss)), inputs


def kernel_times(fn, arg, calls: int) -> dict[str, tuple[float, float]]:
    """``{kernel name: (ms per call, launches per call)}`` from a profiler trace of ``calls``
    calls of ``fn(arg)`` (after two warm-up calls)."""
    jax.block_until_ready(fn(arg))
    jax.block_until_ready(fn(arg))
    folder = tempfile.mkdtemp(prefix="profile_gpu_")
    jax.profiler.start_trace(folder)
    out = None
    for _ in range(calls):
        out = fn(arg)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {folder}")
    data = jax.profiler.ProfileData.from_file(paths[0])
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            # one line per stream holds the launches; other lines (XLA ops, modules) repeat them
            name = line.name.lower()
            if "stream" not in name or "memcpy" in name:
                continue
            for event in line.events:
                totals[event.name][0] += event.duration_ns / 1e6 / calls
                totals[event.name][1] += 1 / calls
    return {k: (v[0], v[1]) for k, v in sorted(totals.items(), key=lambda kv: -kv[1][0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("op", choices=OPS)
    parser.add_argument("--shape", default=None, help="B,T,H,D (B,T,d_inner,d_state for the scan)")
    parser.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd+bwd")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--backend", default="pallas", choices=("pallas", "mosaic"),
                        help="the linear-attention op's backend")
    parser.add_argument("--config", default=None,
                        help="a MosaicConfig for --backend mosaic, e.g. seq_split=4,block_v=64")
    parser.add_argument("--json", default=None, help="also write the times to this file")
    parser.add_argument("--once", action="store_true",
                        help="run the call once, untraced, and exit: the program for an outside "
                             "profiler (Nsight Compute: benchmarks/ncu_gpu.sh), which sees only "
                             "that call's kernels")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error(f"--calls: expected >= 1, got {args.calls}")
    if args.shape is None:
        shape = kg.MAMBA_SHAPE_GPU if args.op == "selective_scan" else (8, 4096, 16, 128)
    else:
        try:
            shape = tuple(int(x) for x in args.shape.split(","))
        except ValueError:
            parser.error(f"--shape: expected four integers B,T,H,D, got {args.shape!r}")
        if len(shape) != 4 or min(shape) < 1:
            parser.error(f"--shape: expected four positive integers B,T,H,D, got {args.shape!r}")
    config = None
    if args.config is not None:
        if args.backend != "mosaic" or args.op == "selective_scan":
            parser.error("--config: sets a MosaicConfig, so it needs --backend mosaic and a "
                         f"linear op, got --backend {args.backend} and {args.op}")
        from mosaic_config_gpu import parse_config
        try:
            config = parse_config(args.config)
        except ValueError as e:
            parser.error(str(e).replace("--configs", "--config"))
    fn, arg = build(args.op, shape, args.mode, args.backend, config)
    if args.once:
        jax.block_until_ready(fn(arg))
        print(f"{args.op} {args.mode} {shape} ({args.backend}) ran once, untraced")
        return
    times = kernel_times(fn, arg, args.calls)
    if not times:
        print(f"no GPU kernels in the trace (devices: {jax.devices()}): run this on a GPU")
        return
    print(f"{args.op} {args.mode} {shape} on {jax.devices()[0].device_kind}, per call:")
    for name, (ms, launches) in times.items():
        print(f"  {ms:8.3f} ms  x{launches:g}  {name}")
    print(f"  {sum(ms for ms, _ in times.values()):8.3f} ms  in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"op": args.op, "mode": args.mode, "shape": shape,
                       "device": jax.devices()[0].device_kind,
                       "kernels_ms": {k: v[0] for k, v in times.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
