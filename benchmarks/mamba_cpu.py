"""Mamba on the CPU: block forward+backward tokens/s by mode, and the scan formulations.

    python benchmarks/mamba_cpu.py [--quick]

1. Mamba block (B=4, T=1024, d_model=256, d_state=16): forward and forward+backward
   tokens/s in chunk mode and in recurrent mode (``run.py``'s block harness).
2. The selective-scan op alone (same sizes: C=512, N=16): the per-step reference, the
   chunked "scan" and "assoc" forms at several chunk sizes, forward and forward+backward.

Writes benchmarks/results/mamba_cpu.json and the "mamba-cpu" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save_json, time_fn, today, write_section  # noqa: E402
from run import Preset, bench_blocks  # noqa: E402

from linearnexus.kernels.base import GridConfig  # noqa: E402
from linearnexus.kernels.mamba.api import jax_backend  # noqa: E402


def bench_block(batch: int, seq: int, d_model: int, repeats: int) -> list[dict]:
    """The Mamba block in chunk and recurrent mode, through ``run.py``'s block harness."""
    preset = Preset("Mamba block on the CPU", op_sizes=(), block_size=(batch, seq, d_model),
                    repeats=repeats)
    rows = []
    for r in bench_blocks(preset, ["mamba"], repeats, quick=False):
        tokens = batch * seq
        rows.append({"mode": r["variant"].removesuffix(" mode"), "fwd_ms": r["forward_ms"],
                     "fwd_bwd_ms": r["forward_backward_ms"],
                     "fwd_tok_s": tokens / (r["forward_ms"] / 1e3),
                     "fwd_bwd_tok_s": tokens / (r["forward_backward_ms"] / 1e3)})
    return rows


def bench_op(batch: int, seq: int, channels: int, n_state: int, repeats: int, quick: bool) -> list[dict]:
    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    x = jax.random.normal(ks[0], (batch, seq, channels))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (batch, seq, channels)) - 3)
    A = -jnp.broadcast_to(jnp.arange(1, n_state + 1, dtype=jnp.float32), (channels, n_state))
    B = jax.random.normal(ks[2], (batch, seq, n_state))
    C = jax.random.normal(ks[3], (batch, seq, n_state))
    variants = [("per-step reference (recurrent mode)", "recurrent", None, None)]
    sizes = (16, 64) if quick else (8, 16, 32, 64)
    variants += [(f"chunked scan L={L}", "chunk", "scan", L) for L in sizes]
    variants += [(f"chunked assoc L={L}", "chunk", "assoc", L) for L in sizes]
    rows = []
    for label, mode, form, L in variants:
        kernel = jax_backend(chunk_form=form)
        if mode == "recurrent":
            def run(x, dt, B, C, kernel=kernel):
                return kernel.forward_recurrent(x, dt, A, B, C)[0]
        else:
            def run(x, dt, B, C, kernel=kernel, L=L):
                return kernel.forward_chunk(x, dt, A, B, C, grid=GridConfig(chunk_size=L))[0]
        fwd = jax.jit(run)
        fwd_bwd = jax.jit(jax.grad(lambda *a, run=run: jnp.sum(run(*a) ** 2), argnums=(0, 1, 2, 3)))
        t_f = time_fn(lambda fwd=fwd: fwd(x, dt, B, C), repeats=repeats)
        t_fb = time_fn(lambda fwd_bwd=fwd_bwd: fwd_bwd(x, dt, B, C), repeats=repeats)
        rows.append({"variant": label, "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3})
        print(f"op {label:38s} fwd {t_f * 1e3:8.1f} ms   fwd+bwd {t_fb * 1e3:8.1f} ms", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer variants and repeats")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    repeats = 3 if args.quick else 5
    batch, seq, d_model = 4, 1024, 256
    print(machine())
    block_rows = bench_block(batch, seq, d_model, repeats)
    op_rows = bench_op(batch, seq, 2 * d_model, 16, repeats, args.quick)
    if args.no_write:
        return
    save_json("mamba_cpu", {"block": block_rows, "op": op_rows,
                            "shape": {"B": batch, "T": seq, "d_model": d_model, "d_state": 16}})
    lines = [
        "## Mamba on the CPU",
        "",
        f"{today()}, {machine()}. `python benchmarks/mamba_cpu.py`. Median of {repeats} runs after a",
        "compile + warm-up call; wall time of jit-compiled functions.",
        "",
        f"Mamba block, B={batch}, T={seq}, d_model={d_model} (C={2 * d_model}), d_state=16, float32:",
        "",
        "| mode | forward ms | forward tok/s | forward+backward ms | forward+backward tok/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in block_rows:
        lines.append(f"| {r['mode']} | {r['fwd_ms']:.1f} | {r['fwd_tok_s']:,.0f} | {r['fwd_bwd_ms']:.1f} | "
                     f"{r['fwd_bwd_tok_s']:,.0f} |")
    lines += ["", f"Selective scan op alone (B={batch}, T={seq}, C={2 * d_model}, N=16):", "",
              "| variant | forward ms | forward+backward ms |", "| --- | ---: | ---: |"]
    for r in op_rows:
        lines.append(f"| {r['variant']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} |")
    write_section("mamba-cpu", "\n".join(lines))


if __name__ == "__main__":
    main()
