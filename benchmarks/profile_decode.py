"""Where a decode step's time goes: kernels per step, device time per step, wall time per step.

    python3 benchmarks/profile_decode.py [--models gdn mamba2 gpt] [--batches 1 64]
        [--steps 64] [--hlo DIR]

For each model (the ~200M configs of ``benchmarks/decode_gpu.py``) and batch it compiles the
on-device decode loop (``Decoder.run``), runs it once, then records one run of ``--steps``
greedy steps with ``jax.profiler`` and reads the trace back (``profile_gpu.kernel_times``):
every event on the GPU plane's stream lines is one kernel launch. Printed per step: kernel
launches, the sum of their device times (CUPTI durations, launch gaps left out), the wall
time, and the kernels grouped by kind (gemm / Pallas / XLA fusion / other) with the largest
ones. The gap between wall time and device time is what the kernels' launches and the
dependencies between them cost.

On the H200 (JAX 0.11.2, 2026-12-04) the trace held no per-kernel events for the decode
loop: XLA runs the loop body as CUDA graphs (its command buffers are on by default for
fusions, cuBLAS and custom calls), whose kernels this trace does not list. The wall times
stand; for the kernel list run with graphs off (``XLA_FLAGS=--xla_gpu_enable_command_buffer=``,
which changes the timing) or under ``nsys profile --cuda-graph-trace=node``. On an H100
(JAX 0.11.2, 2026-12-05) the trace held no kernels with graphs off either, and the image
has no Nsight Systems: ``benchmarks/decode_parts_gpu.py`` times the step's kernels one by
one instead.

``--hlo DIR`` also writes each loop's optimized HLO there and prints the instruction count
of the while body by opcode (on the CPU the counts are XLA:CPU's, a proxy only). XLA flags
(``XLA_FLAGS``, e.g. ``--xla_gpu_enable_command_buffer=...``) apply as set in the
environment, so two runs with different flags compare them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_gpu import our_config  # noqa: E402
from profile_gpu import kernel_times  # noqa: E402

from linearnexus.generate import Decoder, SamplingConfig, stop_array  # noqa: E402
from linearnexus.models import create_model  # noqa: E402


def kind_of(name: str) -> str:
    low = name.lower()
    if any(s in low for s in ("gemm", "gemv", "cublas", "cutlass", "sm90_xmma", "matmul")):
        return "gemm"
    if "fusion" in low or low.startswith(("loop_", "input_", "wrapped_")):
        return "xla fusion"
    if any(s in low for s in ("memcpy", "memset")):
        return "copy/memset"
    return "other (pallas, reductions, ...)"


def body_opcodes(hlo: str) -> collections.Counter:
    """Opcodes of the instructions of the decode loop's while body (the largest body)."""
    bodies = re.findall(r"body=%?([\w.\-]+)", hlo)
    best: collections.Counter = collections.Counter()
    for body in set(bodies):
        m = re.search(r"^%?" + re.escape(body) + r" .*?\{\n(.*?)\n\}", hlo, re.S | re.M)
        if not m:
            continue
        counts = collections.Counter()
        for line in m.group(1).splitlines():
            op = re.search(r"=\s*[\w\[\]{},:\s()\-.*/]*?\s([a-z][\w\-]*)\(", line)
            if op:
                counts[op.group(1)] += 1
        if sum(counts.values()) > sum(best.values()):
            best = counts
    return best


def profile(kind: str, batch: int, args) -> dict:
    cfg = our_config(kind, d=args.d_model, layers=args.layers, vocab=args.vocab,
                     dtype=args.dtype, max_seq_len=512)
    model = create_model(cfg, seed=0)
    dec = Decoder(model, SamplingConfig(temperature=0.0), weights="compute")
    stops = stop_array(())
    steps = args.steps

    def inputs():
        tok = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, batch), jnp.int32)
        return tok, model.init_state(batch), jax.random.key(0), jnp.zeros(batch, bool)

    def run(_=None):
        return dec.run(*inputs(), stops, steps, first=False)

    jax.block_until_ready(run())
    walls = []
    for _ in range(3):
        tok, state, key, done = inputs()
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        jax.block_until_ready(dec.run(tok, state, key, done, stops, steps, first=False))
        walls.append((time.perf_counter() - t0) / steps * 1e3)
    kernels = {name: (ms / steps, n / steps)  # per call of `steps` steps -> per step
               for name, (ms, n) in kernel_times(run, None, 1).items()}
    row = {"model": kind, "batch": batch, "wall_ms_per_step": statistics.median(walls),
           "launches_per_step": sum(n for _, n in kernels.values()),
           "device_ms_per_step": sum(ms for ms, _ in kernels.values())}
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for name, (ms, n) in kernels.items():
        by_kind[kind_of(name)][0] += ms
        by_kind[kind_of(name)][1] += n
    row["by_kind"] = {k: {"ms": v[0], "launches": v[1]} for k, v in by_kind.items()}
    row["top"] = [(name, ms, n) for name, (ms, n) in list(kernels.items())[:25]]
    if args.hlo:
        tok, state, key, done = inputs()
        hlo = dec._compiled.loop.lower(dec.inputs, tok, state, key, done, stops, jnp.int32(steps),
                                       jnp.asarray(False), jnp.int32(0)).compile().as_text()
        path = Path(args.hlo) / f"loop_{kind}_b{batch}.hlo.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(hlo)
        row["body_opcodes"] = dict(body_opcodes(hlo).most_common())
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["gdn", "mamba2"],
                   choices=["gdn", "mamba2", "gpt"])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtype", default=None)
    p.add_argument("--hlo", default=None, help="folder for the loops' optimized HLO")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="tiny models (a CPU smoke test)")
    args = p.parse_args()
    if args.quick:
        args.d_model, args.layers, args.vocab, args.steps = 64, 2, 256, 8
    if args.dtype is None:
        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    print(json.dumps({"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                      "xla_flags": os.environ.get("XLA_FLAGS", "")}), flush=True)
    rows = []
    for kind in args.models:
        for batch in args.batches:
            try:
                row = profile(kind, batch, args)
            except Exception as e:  # noqa: BLE001 - one failing cell must not lose the others
                print(f"\n{kind} batch {batch}: {type(e).__name__}: {e}"[:2000], flush=True)
                continue
            rows.append(row)
            print(f"\n{kind} batch {batch}: wall {row['wall_ms_per_step']:.3f} ms/step, device "
                  f"{row['device_ms_per_step']:.3f} ms/step in {row['launches_per_step']:.0f} "
                  "launches/step", flush=True)
            if row["launches_per_step"] < 1 and jax.default_backend() == "gpu":
                print("  (no per-kernel events: the loop ran as CUDA graphs; see the docstring)")
            for k, v in sorted(row["by_kind"].items(), key=lambda kv: -kv[1]["ms"]):
                print(f"  {k:32s} {v['ms']:.3f} ms  x{v['launches']:.0f}")
            for name, ms, n in row["top"]:
                print(f"    {ms * 1e3:8.1f} us  x{n:4.0f}  {name[:100]}")
            if "body_opcodes" in row:
                print("  while body opcodes:", json.dumps(row["body_opcodes"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
