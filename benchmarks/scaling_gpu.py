"""Multi-GPU scaling of the sharded training (issue 18), one command on one host.

    python benchmarks/scaling_gpu.py                     # every GPU count 1, 2, ..., N
    python benchmarks/scaling_gpu.py --gpus 1            # the one-GPU baseline alone
    python benchmarks/scaling_gpu.py --quick --cpu 8     # the same code on 8 simulated CPUs

Three measurements, each GPU count in a process of its own (``CUDA_VISIBLE_DEVICES`` picks
the first n GPUs; on the CPU, ``--xla_force_host_platform_device_count=n``), so a mesh
always covers every device the process sees:

1. **Throughput**: a Gated DeltaNet LM of ~300M parameters (d_model 1024, 20 layers, vocab
   8192, bf16 compute, float32 parameters and AdamW state) and a hybrid with one attention
   layer in four, T = 4096, the same batch per GPU, on ``data=n`` and ``fsdp=n``: tokens/s
   and the scaling efficiency ``tps(n) / (n tps(1))`` (target >= 0.9).
2. **Same losses**: the first ``--loss-steps`` (200) losses on ``fsdp=N`` against one GPU
   with the same global batch and the same data (TinyShakespeare bytes, batches drawn by
   step number), max and mean absolute difference.
3. **Context parallelism**: one sequence of T = 131072 (``--cp-len``) split over
   ``context=n``: forward+backward time of the gated_delta_rule op (B=1, H=16, D=128, bf16)
   and of a whole training step of the GDN model, the bytes each device receives in
   collectives (compiled HLO), and whether one device fits it at all.

Writes benchmarks/results/scaling_gpu.json and the "scaling-gpu" section of
docs/benchmarks.md (not with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

FULL = {"d_model": 1024, "n_layers": 20, "vocab": 8192, "seq": 4096, "per_gpu_batch": 4,
        "heads": 16, "head_dim": 128, "steps": 10, "loss_steps": 200, "cp_len": 131072,
        "dtype": "bfloat16"}
QUICK = {"d_model": 64, "n_layers": 4, "vocab": 256, "seq": 128, "per_gpu_batch": 2,
         "heads": 2, "head_dim": 16, "steps": 3, "loss_steps": 5, "cp_len": 1024,
         "dtype": "float32"}
KINDS = ("gdn", "hybrid")


# ----------------------------------------------------------------------------- worker side


def _config(kind: str, s: dict):
    from linearnexus.models import ModelConfig

    pattern = (("gated_deltanet",) if kind == "gdn"
               else ("gated_deltanet", "gated_deltanet", "gated_deltanet", "attention"))
    return ModelConfig(vocab_size=s["vocab"], d_model=s["d_model"], n_layers=s["n_layers"],
                       block_pattern=pattern, dtype=s["dtype"], param_dtype="float32",
                       max_seq_len=max(s["seq"], s["cp_len"]),
                       block_options={"attention": {"n_heads": max(1, s["d_model"] // 128)}})


def _trainer(kind: str, s: dict, mesh: str | None, batch: int, seq: int, steps: int):
    from linearnexus.models import create_model
    from linearnexus.train import SFTTrainer, TrainConfig

    class _Shape:
        batch_size, seq_len = batch, seq

    cfg = TrainConfig(max_steps=max(steps, 2), batch_size=batch, seq_len=seq, progress=False,
                      mesh=mesh, out_dir="/tmp/scaling-unused", lr=3e-4,
                      warmup_steps=min(10, steps // 4))
    return SFTTrainer(create_model(_config(kind, s), seed=0), None, _Shape(), None, cfg)


def _is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def work_throughput(s: dict, n: int) -> list[dict]:
    import jax
    from common import shakespeare_batches

    rows = []
    batch_of = shakespeare_batches(s["per_gpu_batch"] * n, s["seq"], s["vocab"])
    for kind in KINDS:
        for axis in ("data", "fsdp"):
            mesh = f"{axis}={n}" if n > 1 else None
            row = {"kind": kind, "gpus": n, "mesh": mesh or "one device",
                   "global_batch": s["per_gpu_batch"] * n, "seq": s["seq"]}
            try:
                t = _trainer(kind, s, mesh, s["per_gpu_batch"] * n, s["seq"], s["steps"] + 2)
                row["params"] = sum(int(x.size) for x in jax.tree.leaves(t.state.params))
                for i in range(2):  # compile + one warm step
                    jax.block_until_ready(t.train_step(*batch_of(i)))
                start = time.perf_counter()
                for i in range(s["steps"]):
                    loss = t.train_step(*batch_of(2 + i))
                jax.block_until_ready(loss)
                sec = (time.perf_counter() - start) / s["steps"]
                row.update(step_ms=sec * 1e3, tokens_per_s=row["global_batch"] * s["seq"] / sec)
            except Exception as e:  # noqa: BLE001 - a failed configuration is a result
                row["error"] = ("does not fit: " if _is_oom(e) else "") + str(e).splitlines()[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if n == 1:
                break  # data=1 and fsdp=1 are the same program
    return rows


def work_losses(s: dict, n: int, global_batch: int) -> dict:
    import jax
    from common import shakespeare_batches

    mesh = f"fsdp={n}" if n > 1 else None
    batch_of = shakespeare_batches(global_batch, s["seq"], s["vocab"])
    t = _trainer("gdn", s, mesh, global_batch, s["seq"], s["loss_steps"])
    losses = [float(jax.device_get(t.train_step(*batch_of(i)))) for i in range(s["loss_steps"])]
    return {"gpus": n, "mesh": mesh or "one device", "global_batch": global_batch,
            "losses": losses}


def _context_op(s: dict, n: int) -> dict:
    """The gated delta rule's forward+backward on one sequence of ``cp_len`` tokens, split
    over ``context=n`` (n > 1) or on one device."""
    import jax
    import jax.numpy as jnp
    from common import time_fn

    from linearnexus.kernels.gated_delta_rule import gated_delta_rule
    from linearnexus.parallel import make_mesh
    from linearnexus.parallel.context import collective_bytes, context_parallel

    seq, h, d = s["cp_len"], s["heads"], s["head_dim"]
    dtype = jnp.dtype(s["dtype"])
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (jax.random.normal(kk, (1, seq, h, d), dtype) for kk in keys[:3])  # [1, T, H, D]
    k = k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True).astype(dtype)
    g = -jax.nn.softplus(jax.random.normal(keys[3], (1, seq, h), jnp.float32))
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (1, seq, h), jnp.float32))

    def loss(q, k, v, g, beta):
        o, st = gated_delta_rule(q, k, v, g, beta, output_final_state=True)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(st)

    step = jax.grad(loss, (0, 1, 2, 3, 4))
    out = {}
    if n > 1:
        with context_parallel(make_mesh(f"context={n}")):
            fn = jax.jit(step)
            out["op_collective_bytes"] = collective_bytes(
                fn.lower(q, k, v, g, beta).compile().as_text())
    else:
        fn = jax.jit(step)
    out["op_fwd_bwd_ms"] = time_fn(lambda: fn(q, k, v, g, beta), repeats=3) * 1e3
    return out


def work_context(s: dict, n: int) -> dict:
    import jax
    from common import shakespeare_batches

    from linearnexus.parallel.context import collective_bytes

    seq = s["cp_len"]
    out = {"gpus": n, "seq": seq}
    try:
        out.update(_context_op(s, n))
    except Exception as e:  # noqa: BLE001 - a failed configuration is a result
        out["op_error"] = ("does not fit: " if _is_oom(e) else "") + str(e).splitlines()[0]
    try:
        mesh = f"context={n}" if n > 1 else None
        t = _trainer("gdn", s, mesh, 1, seq, 4)
        batch_of = shakespeare_batches(1, seq, s["vocab"])
        if n > 1:
            hlo = t._fns.step.lower(t.state, *batch_of(0)).compile().as_text()
            out["model_collective_bytes"] = collective_bytes(hlo)
        jax.block_until_ready(t.train_step(*batch_of(0)))
        start = time.perf_counter()
        for i in range(2):
            loss_value = t.train_step(*batch_of(1 + i))
        jax.block_until_ready(loss_value)
        out["model_step_ms"] = (time.perf_counter() - start) / 2 * 1e3
    except Exception as e:  # noqa: BLE001
        out["model_error"] = ("does not fit: " if _is_oom(e) else "") + str(e).splitlines()[0]
    print(json.dumps(out), flush=True)
    return out


def worker(args: argparse.Namespace) -> None:
    s = QUICK if args.quick else FULL
    if args.part == "throughput":
        result = work_throughput(s, args.n)
    elif args.part == "losses":
        result = work_losses(s, args.n, args.global_batch)
    else:
        result = work_context(s, args.n)
    Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver side


def _spawn(args: argparse.Namespace, part: str, n: int, **extra) -> object:
    env = dict(os.environ)
    if args.cpu:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                            + f" --xla_force_host_platform_device_count={n}").strip()
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (device notes)
    result = Path(f"/tmp/scaling-{part}-{n}-{os.getpid()}.json")
    cmd = [sys.executable, __file__, "--worker", part, "--n", str(n), "--result", str(result)]
    cmd += ["--quick"] if args.quick else []
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    print(f"[{part} on {n}]", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, env=env, timeout=args.timeout)
    if proc.returncode != 0 or not result.exists():
        return {"part": part, "gpus": n, "error": f"worker exited with {proc.returncode}"}
    return json.loads(result.read_text())


def _device_count(args: argparse.Namespace) -> int:
    if args.cpu:
        return args.cpu
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def render(res: dict) -> str:
    lines = ["## Multi-GPU scaling (issue 18)", "",
             f"{res['date']}, {res['machine']}; `python benchmarks/scaling_gpu.py "
             f"--gpus {','.join(map(str, res['counts']))}`. GDN LM d_model 1024, 20 layers, "
             "vocab 8192, bf16 compute, float32 AdamW state, T = 4096, "
             f"{FULL['per_gpu_batch']} sequences per GPU.", "",
             "| model | GPUs | mesh | params | step ms | tokens/s | efficiency |",
             "|---|---:|---|---:|---:|---:|---:|"]
    base = {r["kind"]: r.get("tokens_per_s") for r in res["throughput"] if r["gpus"] == 1}
    for r in res["throughput"]:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['gpus']} | {r['mesh']} | | {r['error'][:80]} | | |")
            continue
        eff = (r["tokens_per_s"] / (r["gpus"] * base[r["kind"]])) if base.get(r["kind"]) else None
        lines.append(f"| {r['kind']} | {r['gpus']} | {r['mesh']} | {r['params'] / 1e6:.0f}M | "
                     f"{r['step_ms']:.0f} | {r['tokens_per_s']:,.0f} | "
                     f"{'' if eff is None else f'{eff:.2f}'} |")
    if res.get("losses"):
        lines += ["", f"Losses: {res['losses']}"]
    if res.get("context"):
        lines += ["", "Context parallelism, one sequence:", "",
                  "| GPUs | T | op fwd+bwd ms | model step ms | op collectives | note |",
                  "|---:|---:|---:|---:|---|---|"]
        for r in res["context"]:
            note = "; ".join(r[k][:60] for k in ("op_error", "model_error") if k in r)
            lines.append(f"| {r['gpus']} | {r['seq']} | {r.get('op_fwd_bwd_ms', float('nan')):.1f}"
                         f" | {r.get('model_step_ms', float('nan')):.0f} | "
                         f"{r.get('op_collective_bytes', '')} | {note} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default=None, help="GPU counts, e.g. 1,2,8 (default 1, 2, ..., N "
                   "in powers of two, and N)")
    p.add_argument("--parts", default="throughput,losses,context")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a code-path check)")
    p.add_argument("--cpu", type=int, default=0, metavar="N",
                   help="run on N simulated CPU devices instead of the GPUs")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per worker process")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--global-batch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.part = args.worker
        return worker(args)

    total = _device_count(args)
    if args.gpus:
        counts = sorted({int(x) for x in args.gpus.split(",")})
        if counts[-1] > total:
            p.error(f"--gpus: asked for {counts[-1]} devices, this host has {total}")
    else:
        counts = sorted({c for c in (1, 2, 4, 8) if c <= total} | {total})
    s = QUICK if args.quick else FULL
    parts = set(args.parts.split(","))
    res: dict = {"counts": counts, "throughput": [], "losses": None, "context": []}
    if "throughput" in parts:
        for n in counts:
            out = _spawn(args, "throughput", n)
            res["throughput"] += out if isinstance(out, list) else [out]
    if "losses" in parts and counts[-1] > 1:
        gb = s["per_gpu_batch"] * counts[-1]
        one = _spawn(args, "losses", 1, global_batch=gb)
        many = _spawn(args, "losses", counts[-1], global_batch=gb)
        if "losses" in one and "losses" in many:
            diff = [abs(a - b) for a, b in zip(one["losses"], many["losses"], strict=True)]
            res["losses"] = {"gpus": counts[-1], "global_batch": gb, "steps": len(diff),
                             "max_abs_diff": max(diff), "mean_abs_diff": sum(diff) / len(diff),
                             "first": one["losses"][0], "last_one": one["losses"][-1],
                             "last_many": many["losses"][-1]}
        else:
            res["losses"] = {"error": [one.get("error"), many.get("error")]}
        print(json.dumps(res["losses"]), flush=True)
    if "context" in parts:
        for n in sorted({1, counts[-1]}):
            res["context"].append(_spawn(args, "context", n))

    from common import machine, save_json, today, write_section

    res["date"], res["machine"] = today(), machine()
    if args.cpu:
        res["machine"] += f", {args.cpu} simulated devices"
    print(render(res))
    if not args.quick:
        save_json("scaling_gpu", res)
        write_section("scaling-gpu", render(res))


if __name__ == "__main__":
    main()
