"""Meshes on 8 simulated CPU devices: per-device memory, step time, context-parallel traffic.

    python benchmarks/parallel_cpu.py [--quick]

1. For a small GPT and Gated DeltaNet (d_model 128, 2 layers, AdamW; B=8, T=128), on each
   mesh: the parameter + optimizer bytes one device holds (from the arrays' shards), the
   compiled step's per-device argument and temporary bytes (XLA memory analysis) and the
   median step time. The 8 "devices" share this machine's cores, so step times show the
   cost of the partitioned program's extra work and copies, not a speed-up.
2. Context parallelism (gla, B=1, H=4, K=V=32, context=8): bytes of collectives per device
   in the compiled forward and forward+backward programs, against the sequence length
   (and the bytes an all-gather of q, k, v would move instead).

Writes benchmarks/results/parallel_cpu.json and the "parallel-cpu" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save_json, time_fn, today, write_section  # noqa: E402

from linearnexus.kernels.gla import gla  # noqa: E402
from linearnexus.models import create_model, get_preset  # noqa: E402
from linearnexus.parallel import make_mesh  # noqa: E402
from linearnexus.parallel.context import collective_bytes, context_parallel  # noqa: E402
from linearnexus.train import SFTTrainer, TrainConfig  # noqa: E402

MESHES = (None, "data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "data=2,context=4")
MODELS = {
    "gpt": ("gpt-small", {}),
    "gated_deltanet": ("gated-deltanet-small", {"block_options": {"gated_deltanet": {
        "head_dim": 32, "num_heads": 4}}}),
}


class _Shape:
    batch_size, seq_len = 8, 128


def device0_bytes(tree) -> int:
    """Bytes of ``tree``'s arrays that live on the first device."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev)


def mesh_rows(quick: bool) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    batch = (rng.integers(0, 256, (8, 128)).astype(np.int32),
             rng.integers(0, 256, (8, 128)).astype(np.int32))
    for name, (preset, overrides) in MODELS.items():
        config = get_preset(preset, vocab_size=256, n_layers=2, **overrides)
        for mesh in MESHES:
            cfg = TrainConfig(max_steps=100, batch_size=8, seq_len=128, progress=False, mesh=mesh,
                              out_dir="/tmp/unused")
            trainer = SFTTrainer(create_model(config), None, _Shape(), None, cfg)
            held = device0_bytes((trainer.state.params, trainer.state.opt_state))
            total = sum(x.nbytes for x in jax.tree.leaves((trainer.state.params,
                                                           trainer.state.opt_state)))
            mem = trainer._fns.step.lower(trainer.state, *batch).compile().memory_analysis()
            seconds = time_fn(lambda t=trainer: t.train_step(*batch), warmup=1,
                              repeats=2 if quick else 5)
            rows.append({"model": name, "mesh": mesh or "one device", "state_bytes": total,
                         "device0_state_bytes": held, "fraction": held / total,
                         "argument_bytes": mem.argument_size_in_bytes,
                         "temp_bytes": mem.temp_size_in_bytes, "step_ms": seconds * 1e3})
            print(rows[-1], flush=True)
    return rows


def context_rows(quick: bool) -> list[dict]:
    mesh = make_mesh("context=8")
    heads, dim = 4, 32
    rows = []
    for seq in (1024, 4096) if quick else (1024, 4096, 16384):
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((1, seq, heads, dim)), jnp.float32)
                   for _ in range(3))
        g = jnp.asarray(-0.1 * rng.random((1, seq, heads, dim)), jnp.float32)

        def fwd(q, k, v, g):
            return gla(q, k, v, g, output_final_state=True)

        def loss(q, k, v, g):
            o, s = gla(q, k, v, g, output_final_state=True)
            return jnp.sum(o) + jnp.sum(s)

        row = {"T": seq, "local_T": seq // 8}
        for label, fn in (("forward", fwd), ("forward_backward", jax.grad(loss, (0, 1, 2, 3)))):
            with context_parallel(mesh):
                hlo = jax.jit(fn).lower(q, k, v, g).compile().as_text()
            row[label] = collective_bytes(hlo)
        # what gathering q, k, v (one device's view: the 7 other slices) would receive
        row["allgather_qkv_bytes"] = 3 * seq * heads * dim * 4 * 7 // 8
        rows.append(row)
        print(row, flush=True)
    return rows


def render(meshes: list[dict], ctx: list[dict]) -> str:
    lines = ["## Meshes on 8 simulated CPU devices", "",
             f"{today()}, {machine()}; `python benchmarks/parallel_cpu.py`. The machine's cores "
             "were shared with other jobs and the 8 devices share them too: step times compare "
             "programs, they are not a multi-device speed-up.", "",
             "Per device: parameters + AdamW state held by device 0 (from the arrays' shards), "
             "and the compiled train step's arguments / temporaries (XLA memory analysis). "
             "B=8, T=128, d_model 128, 2 layers, vocab 256.", "",
             "| model | mesh | params+opt on device 0 | share | step args | step temps | step ms |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in meshes:
        lines.append(f"| {r['model']} | {r['mesh']} | {r['device0_state_bytes'] / 2**20:.2f} MiB"
                     f" | {r['fraction']:.3f} | {r['argument_bytes'] / 2**20:.2f} MiB | "
                     f"{r['temp_bytes'] / 2**20:.2f} MiB | {r['step_ms']:.0f} |")
    lines += ["", "Context parallelism, gla (B=1, H=4, K=V=32) on context=8: bytes each device "
              "receives in collectives per call (compiled program), against the sequence "
              "length. The state summaries' all-gather does not depend on T; gathering q, k, v "
              "instead would grow with it.", "",
              "| T | tokens per device | forward | forward+backward | all-gather of q,k,v |",
              "|---:|---:|---:|---:|---:|"]

    def fmt(d):
        return ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in sorted(d.items())) or "none"
    for r in ctx:
        lines.append(f"| {r['T']} | {r['local_T']} | {fmt(r['forward'])} | "
                     f"{fmt(r['forward_backward'])} | {r['allgather_qkv_bytes'] / 1024:.0f} KiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and lengths")
    args = parser.parse_args()
    ctx = context_rows(args.quick)
    meshes = mesh_rows(args.quick)
    save_json("parallel_cpu", {"meshes": meshes, "context": ctx})
    write_section("parallel-cpu", render(meshes, ctx))


if __name__ == "__main__":
    main()
