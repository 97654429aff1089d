"""One registry-driven benchmark harness: ops x backends and blocks x modes.

    python benchmarks/run.py --preset constrained            # CPU or a 12 GB GPU, < 10 min on a CPU
    python benchmarks/run.py --preset gpu                    # the H200 shapes of kernels_gpu.py
    python benchmarks/run.py --preset full --ops gla --backends jax pallas
    python benchmarks/run.py --preset constrained --quick --blocks   # ops only, short sequences
    python benchmarks/run.py --preset gpu --tune             # fill the tuning cache (pallas, mosaic)

Every op in ``OP_REGISTRY`` runs on every backend of it in ``KERNEL_REGISTRY`` that claims
this machine's platform (Pallas backends only on a GPU: interpret mode timings mean nothing),
in chunk mode, at each of the preset's op sizes ``(B, T, H, K, V)``; every block in
``LAYER_REGISTRY`` runs at the preset's block size in chunk and recurrent mode. Each is
timed jit-compiled, forward and forward + backward (``jax.grad`` of a random projection of
the output with respect to every input, parameters included for blocks): the median of
``repeats`` calls after a compile + warm-up call.

Prints a table and writes ``benchmarks/results/run_<preset>.json`` and ``.md``;
``--docs`` also replaces the ``run-<preset>`` section of ``docs/benchmarks.md``.
``--tune`` times a few launch configs of each Pallas backend (Triton ``pallas``: chunk sizes
and warps; Mosaic GPU ``mosaic``: value blocks and pipeline depths) at the preset's op sizes
and records the fastest in the tuning cache (``linearnexus.kernels.tuning``), which both
backends read before their heuristic default; it needs a GPU (sm_90 for ``mosaic``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine, save_json, time_fn, today, write_section  # noqa: E402

from linearnexus.kernels.base import current_platform  # noqa: E402
from linearnexus.registry import KERNEL_REGISTRY, LAYER_REGISTRY, OP_REGISTRY, kernels_for  # noqa: E402
from linearnexus.tools.inputs import Sizes, build_block, make_op_inputs  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Preset:
    """What one preset measures.

    Attributes:
        op_sizes: ``(B, T, H, K, V)`` per op run (``tools.inputs`` maps them to each op).
        block_size: ``(B, T, d_model)`` of the block runs; None skips blocks.
        dtype: input dtype of ops and blocks.
        repeats: timed calls per measurement (the median is reported).
        chunk_sizes: extra chunk-size variants of the chunked backends (default L always).
        ops / blocks: the default selection (None: everything registered).
        modes: block modes.
    """

    description: str
    op_sizes: tuple[Sizes, ...]
    block_size: tuple[int, int, int] | None
    dtype: str = "float32"
    repeats: int = 3
    chunk_sizes: tuple[int, ...] = ()
    ops: tuple[str, ...] | None = None
    blocks: tuple[str, ...] | None = None
    modes: tuple[str, ...] = ("chunk", "recurrent")


def _gpu_op_sizes() -> tuple[Sizes, ...]:
    # the (B, T, H, D) shapes kernels_gpu.py times against FLA on the H200, K = V = D
    return ((1, 8192, 96, 128, 128), (2, 16384, 16, 128, 128), (4, 2048, 16, 128, 128),
            (4, 4096, 64, 128, 128), (8, 1024, 8, 64, 64), (8, 2048, 32, 256, 256),
            (8, 4096, 16, 128, 128))


PRESETS: dict[str, Preset] = {
    "constrained": Preset("a CPU or a 12 GB GPU: short sequences, small widths",
                          op_sizes=((2, 512, 4, 64, 64),), block_size=(2, 256, 128)),
    "gpu": Preset("the H200 shapes of benchmarks/kernels_gpu.py, bfloat16",
                  op_sizes=_gpu_op_sizes(), block_size=(8, 4096, 1024), dtype="bfloat16",
                  repeats=10),
    "full": Preset("constrained plus longer sequences and wider blocks",
                   op_sizes=((2, 512, 4, 64, 64), (2, 2048, 4, 64, 64), (4, 4096, 8, 128, 128)),
                   block_size=(4, 1024, 256), repeats=5),
    # what benchmarks/linear_ops_cpu.py measures (it is a wrapper of this preset)
    "linear-ops-cpu": Preset("linear-attention ops on the CPU: chunk sizes vs the reference",
                             op_sizes=((2, 2048, 4, 64, 64),), block_size=None, repeats=5,
                             chunk_sizes=(16, 32, 64),
                             ops=("simple_gla", "gla", "delta_rule", "gated_delta_rule",
                                  "retention", "ssd")),
}


#: presets whose ``--docs`` table replaces a named section of docs/benchmarks.md:
#: ``{preset: (section marker, heading)}`` (others: ``run-<preset>``)
DOC_SECTIONS = {"linear-ops-cpu": ("linear-ops-cpu", "Linear-attention ops on the CPU")}


def runs_natively(kernel: Any, dtype: Any) -> bool:
    """Whether a backend claims this machine (Pallas off a GPU would run interpreted)."""
    return kernel.supports(platform=current_platform(), dtype=dtype) or kernel.name == "naive"


def _time_pair(forward: Callable[..., Any], args: tuple[Any, ...], repeats: int,
               argnums: tuple[int, ...]) -> tuple[float, float]:
    """Seconds of ``forward(*args)`` and of the gradient of a random projection of its output."""
    fwd = jax.jit(forward)
    out_shape = jax.eval_shape(forward, *args)
    cot = jax.random.normal(jax.random.PRNGKey(1), out_shape.shape, jnp.float32)

    def loss(*a: Any) -> jax.Array:
        return jnp.sum(forward(*a).astype(jnp.float32) * cot)

    grad = jax.jit(jax.grad(loss, argnums=argnums))
    t_f = time_fn(lambda: fwd(*args), repeats=repeats)
    t_fb = time_fn(lambda: grad(*args), repeats=repeats)
    return t_f, t_fb


def bench_ops(preset: Preset, ops: Sequence[str], backends: Sequence[str] | None,
              repeats: int, quick: bool) -> list[dict[str, Any]]:
    dtype = jnp.dtype(preset.dtype)
    rows = []
    for op in ops:
        fn = OP_REGISTRY[op]
        reference = KERNEL_REGISTRY[f"{op}:reference"]
        for sizes in preset.op_sizes:
            if quick:
                sizes = (sizes[0], max(64, sizes[1] // 4), *sizes[2:])
            args = make_op_inputs(op, jax.random.PRNGKey(0), sizes, dtype)
            for backend, kernel in sorted(kernels_for(op).items()):
                if backends is not None and backend not in backends:
                    continue
                if not runs_natively(kernel, dtype):
                    continue
                variants: list[tuple[str, dict[str, Any]]] = [("default L", {})]
                if kernel.name == "jax":
                    variants += [(f"L={c}", {"chunk_size": c}) for c in preset.chunk_sizes]
                if kernel is reference:
                    variants = [("per-step", {})]
                for label, extra in variants:
                    def forward(*a, f=fn, b=backend, kw=extra):
                        return f(*a, backend=b, mode="chunk", **kw)[0]

                    t_f, t_fb = _time_pair(forward, args, repeats, tuple(range(len(args))))
                    row = {"kind": "op", "name": op, "backend": backend, "variant": label,
                           "shape": "x".join(map(str, sizes)), "dtype": dtype.name,
                           "forward_ms": 1e3 * t_f, "forward_backward_ms": 1e3 * t_fb}
                    rows.append(row)
                    print(_line(row), flush=True)
    return rows


def bench_blocks(preset: Preset, blocks: Sequence[str], repeats: int,
                 quick: bool) -> list[dict[str, Any]]:
    from flax import nnx

    if preset.block_size is None:
        return []
    batch, seq, d_model = preset.block_size
    if quick:
        seq = max(64, seq // 4)
    rows = []
    for name in blocks:
        block, config = build_block(name, d_model=d_model, dtype=preset.dtype)
        graphdef, params = nnx.split(block)
        x = jax.random.normal(jax.random.PRNGKey(2), (batch, seq, d_model)).astype(preset.dtype)
        for mode in preset.modes:
            def forward(p, x, mode=mode, graphdef=graphdef):
                return nnx.merge(graphdef, p)(x, mode=mode)[0]

            t_f, t_fb = _time_pair(forward, (params, x), repeats, (0, 1))
            row = {"kind": "block", "name": name, "backend": "auto", "variant": f"{mode} mode",
                   "shape": f"{batch}x{seq}x{d_model}", "dtype": preset.dtype,
                   "forward_ms": 1e3 * t_f, "forward_backward_ms": 1e3 * t_fb,
                   "tokens_per_s_fwd_bwd": batch * seq / t_fb}
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    return (f"{row['kind']:5s} {row['name']:16s} {row['backend']:7s} {row['variant']:15s} "
            f"{row['shape']:>18s} fwd {row['forward_ms']:9.2f} ms  fwd+bwd "
            f"{row['forward_backward_ms']:9.2f} ms")


def markdown(preset_name: str, preset: Preset, rows: list[dict[str, Any]], command: str,
             repeats: int) -> str:
    """The results as a markdown section (speed-up column: against the op's reference)."""
    title = DOC_SECTIONS.get(preset_name, (None, f"`benchmarks/run.py --preset {preset_name}`"))[1]
    lines = [f"## {title}", "",
             f"{today()}, {machine()}. `{command}`. Preset: {preset.description}. Jit-compiled, median "
             f"of {repeats} calls "
             "after a compile + warm-up call; forward+backward is `jax.grad` of a random "
             "projection of the output w.r.t. every input (and the parameters for blocks).", ""]
    op_rows = [r for r in rows if r["kind"] == "op"]
    if op_rows:
        lines += ["| op | backend | variant | B x T x H x K x V | dtype | forward ms | "
                  "forward+backward ms | fwd+bwd vs reference |",
                  "| --- | --- | --- | --- | --- | ---: | ---: | ---: |"]
        for r in op_rows:
            ref = next((x for x in op_rows if x["name"] == r["name"] and x["shape"] == r["shape"]
                        and x["variant"] == "per-step"), None)
            speed = f"{ref['forward_backward_ms'] / r['forward_backward_ms']:.1f}x" if ref else "-"
            lines.append(f"| {r['name']} | {r['backend']} | {r['variant']} | {r['shape']} | "
                         f"{r['dtype']} | {r['forward_ms']:.2f} | {r['forward_backward_ms']:.2f} "
                         f"| {speed} |")
    block_rows = [r for r in rows if r["kind"] == "block"]
    if block_rows:
        lines += ["", "| block | mode | B x T x D | dtype | forward ms | forward+backward ms | "
                  "fwd+bwd tokens/s |", "| --- | --- | --- | --- | ---: | ---: | ---: |"]
        for r in block_rows:
            lines.append(f"| {r['name']} | {r['variant']} | {r['shape']} | {r['dtype']} | "
                         f"{r['forward_ms']:.2f} | {r['forward_backward_ms']:.2f} | "
                         f"{r['tokens_per_s_fwd_bwd']:,.0f} |")
    return "\n".join(lines) + "\n"


#: the backends ``--tune`` sweeps, in this order
TUNED_BACKENDS = ("pallas", "mosaic")


def tune_candidates(op: str, backend: str) -> list[Any]:
    """The launch configs ``--tune`` times for ``op`` on ``backend``: Triton chunk sizes and
    warps (``pallas``; block_v and warps for Mamba-1's scan), Mosaic GPU value blocks and
    pipeline depths (``mosaic``; a config the op's kernel does not take, or one over the
    shared-memory budget at that shape, is a ValueError when it runs and is skipped)."""
    from linearnexus.kernels.common.mosaic_chunk import MosaicConfig
    from linearnexus.kernels.common.pallas import TritonConfig

    if backend == "mosaic":  # stages and bwd_stages together; tune() separates them
        # value blocks: simple_gla's walk (and the ops it serves) 32 / 64 / 128, the delta
        # rules' 32 / 64, GLA's 64 / 128; simple_gla's walk whole or split in two by entering
        # states, forward and gradient (MosaicConfig.seq_split: a config with a value block
        # would otherwise turn the heuristic's split off)
        simple = op in ("simple_gla", "retention", "ssd")
        blocks = ((32, 64, 128) if simple
                  else (32, 64) if op in ("delta_rule", "gated_delta_rule") else (64, 128))
        return [MosaicConfig(block_v=b, stages=s, bwd_stages=s, seq_split=p) for b in blocks
                for s in (1, 2, 3) for p in ((1, 2) if simple else (None,))]
    if op == "mamba":
        return [TritonConfig(block_v=b, num_warps=w) for b in (16, 32) for w in (1, 2)]
    return [TritonConfig(chunk=c, num_warps=w) for c in (32, 64) for w in (4, 8)]


def tune(preset: Preset, ops: Sequence[str], repeats: int,
         backends: Sequence[str] = TUNED_BACKENDS) -> dict[tuple[str, str, tuple[int, ...]], Any]:
    """Time each candidate launch config (:func:`tune_candidates`) of the Pallas backends
    (Triton ``pallas``, Mosaic GPU ``mosaic``) per op and op size, forward and forward +
    backward, and record the fastest in the tuning cache, under the backend's name: for
    ``pallas`` the config of the fastest forward + backward; for ``mosaic`` its value block
    ``bwd_stages`` (the depth of the kernels that run under a gradient) and ``seq_split``
    (simple_gla's sequence split, which its gradient runs too) from the fastest forward +
    backward, and ``stages`` (the plain forward's depth, which a gradient does not run) from
    the fastest forward at that value block and split; where only the forward gains from the
    split (the fastest forward split, the fastest forward + backward not), the forward's
    split with ``seq_split_grad=False`` (one walk's gradient, as timed). Returns
    ``{(op, backend, sizes): recorded config}``."""
    from linearnexus.kernels import tuning
    from linearnexus.kernels.common.mosaic_chunk import MOSAIC_DTYPES

    dtype = jnp.dtype(preset.dtype)
    tuned_kernels: list[Any] = []
    chosen: dict[tuple[str, str, tuple[int, ...]], Any] = {}
    for op in ops:
        for backend in backends:
            kernel = kernels_for(op).get(backend)
            if kernel is None or any(kernel is k for k in tuned_kernels):
                continue  # retention / ssd run on simple_gla's kernels: tuned once, under its name
            tuned_kernels.append(kernel)
            if backend == "mosaic":  # opted-in or not (the delta rules): it runs by name
                runs_here = current_platform() == "gpu" and dtype in MOSAIC_DTYPES
            else:
                runs_here = kernel.supports(platform=current_platform(), dtype=dtype)
            if not runs_here:
                print(f"tune: skipping {op}:{backend} (not for {dtype.name} on "
                      f"{current_platform()})")
                continue
            fn = OP_REGISTRY[op]
            for sizes in preset.op_sizes:
                args = make_op_inputs(op, jax.random.PRNGKey(0), sizes, dtype)
                timed: list[tuple[Any, float, float]] = []  # (config, fwd s, fwd+bwd s)
                for cfg in tune_candidates(op, backend):
                    kernel.config = cfg  # the backend's own config wins over the cache
                    try:
                        t_f, t_fb = _time_pair(
                            lambda *a, f=fn, b=backend: f(*a, backend=b, mode="chunk")[0],
                            args, repeats, tuple(range(len(args))))
                    except (ValueError, NotImplementedError) as e:
                        print(f"tune: {op}:{backend} {cfg}: {e}")
                        continue
                    finally:
                        kernel.config = None
                    print(f"tune: {op}:{backend} {sizes} {cfg}: fwd {1e3 * t_f:.2f} ms, "
                          f"fwd+bwd {1e3 * t_fb:.2f} ms", flush=True)
                    timed.append((cfg, t_f, t_fb))
                if not timed:
                    continue
                best, _, seconds = min(timed, key=lambda r: r[2])
                if backend == "mosaic":
                    at_block = [r for r in timed if r[0].block_v == best.block_v]
                    fwd_best = min(at_block, key=lambda r: r[1])[0]
                    if (fwd_best.seq_split or 1) > 1 and (best.seq_split or 1) == 1:
                        best = dataclasses.replace(best, stages=fwd_best.stages,
                                                   seq_split=fwd_best.seq_split,
                                                   seq_split_grad=False)
                    else:
                        fwd_best = min((r for r in at_block if r[0].seq_split == best.seq_split),
                                       key=lambda r: r[1])[0]
                        best = dataclasses.replace(best, stages=fwd_best.stages)
                dims = (*sizes[:4], sizes[4]) if op != "mamba" else (
                    sizes[0], sizes[1], sizes[2] * sizes[4], min(sizes[3], 16))
                path = tuning.record(op, backend, dims, dtype, best, seconds=seconds)
                chosen[(op, backend, tuple(sizes))] = best
                print(f"tune: {op}:{backend} {sizes}: {best} -> {path}")
    return chosen


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="presets: " + "; ".join(
                                         f"{k}: {v.description}" for k, v in PRESETS.items()))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="constrained",
                        help="shapes, dtype and repeats (default: constrained)")
    parser.add_argument("--ops", nargs="*", choices=sorted(OP_REGISTRY),
                        help="only these ops (no value: none; default: the preset's, else all)")
    parser.add_argument("--blocks", nargs="*", choices=sorted(LAYER_REGISTRY),
                        help="only these blocks (no value: none; default: all)")
    parser.add_argument("--backends", nargs="+", help="only these backends (e.g. jax naive pallas)")
    parser.add_argument("--quick", action="store_true",
                        help="a quarter of the sequence length and one timed call")
    parser.add_argument("--tune", action="store_true",
                        help="fill the Pallas tuning cache at the preset's op sizes (GPU) instead "
                             "of benchmarking")
    parser.add_argument("--docs", action="store_true",
                        help="also write the table into docs/benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    ops = args.ops if args.ops is not None else list(preset.ops or sorted(OP_REGISTRY))
    blocks = args.blocks if args.blocks is not None else list(preset.blocks or sorted(LAYER_REGISTRY))
    repeats = 1 if args.quick else preset.repeats
    print(f"{machine()}; preset {args.preset}: {preset.description}", flush=True)
    if args.tune:
        tune(preset, ops, repeats)
        return {}
    start = time.perf_counter()
    rows = bench_ops(preset, ops, args.backends, repeats, args.quick)
    rows += bench_blocks(preset, blocks, repeats, args.quick)
    elapsed = time.perf_counter() - start
    print(f"{len(rows)} measurements in {elapsed:.0f}s")
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"preset": args.preset, "quick": args.quick, "repeats": repeats,
               "elapsed_s": round(elapsed, 1), "rows": rows}
    if not args.no_write and rows:
        name = f"run_{args.preset}{'_quick' if args.quick else ''}"
        save_json(name, payload)
        text = markdown(args.preset, preset, rows, command.strip(), repeats)
        (RESULTS_DIR / f"{name}.md").write_text(text)
        print(f"wrote {RESULTS_DIR / name}.json and .md")
        if args.docs:
            write_section(DOC_SECTIONS.get(args.preset, (f"run-{args.preset}",))[0], text)
    return payload


if __name__ == "__main__":
    main()
