"""The nanoGPT Shakespeare-char CPU recipe for several models, through the real CLI.

    python benchmarks/shakespeare_lm.py [--models gpt-small mamba-small hybrid-small] [--steps 2000]

Every model gets the training settings of ``configs/models/gpt_nanogpt_cpu.yaml`` (batch 12,
context 64, 2000 steps, AdamW lr 1e-3 cosine to 1e-4, 90/10 split, no dropout); the GPT
run uses that file's model, the others their preset. Each run is a ``train_lm.py``
subprocess; the numbers come from its ``metrics.jsonl``. Writes
``benchmarks/results/shakespeare_lm.json`` and the "shakespeare-lm" section of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, save_json, today, write_section  # noqa: E402

RECIPE = ROOT / "configs" / "models" / "gpt_nanogpt_cpu.yaml"
NANOGPT_VAL_LOSS = 1.88  # nanoGPT README figure for this recipe on a CPU


def run_one(name: str, steps: int, out_root: Path, data: str | None) -> dict:
    recipe = yaml.safe_load(RECIPE.read_text())
    train = dict(recipe["train"], max_steps=steps)
    # gpt-small keeps the recipe file's model; other presets bring their own
    model = recipe["model"] if name == "gpt-small" else {"preset": name}
    out = out_root / name
    cfg_path = out_root / f"{name}.yaml"
    out_root.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump({"model": model, "train": train}, sort_keys=False))
    cmd = [sys.executable, str(ROOT / "train_lm.py"), "--config", str(cfg_path), "--out", str(out),
           "--overwrite", "--no-progress", "--sample-tokens", "0"]
    if data:
        cmd += ["--data", data]  # else train_lm.py's default (env, cache, shipped copy)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: train_lm.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in rows if "val_loss" in r]
    params = next((line.split()[1] for line in proc.stdout.splitlines() if line.startswith("model:")), "?")
    tok_s = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    result = {
        "model": name, "params": params.rstrip(","), "steps": steps,
        "final_val_loss": evals[-1]["val_loss"], "best_val_loss": min(r["val_loss"] for r in evals),
        "final_train_loss": rows[-1].get("train_loss"), "wall_s": wall,
        "train_s": rows[-1]["elapsed_s"],
        "tokens_per_s_median": sorted(tok_s)[len(tok_s) // 2] if tok_s else None,
        "val_curve": [(r["step"], r["val_loss"]) for r in evals],
    }
    print(f"{name:14s} val {result['final_val_loss']:.4f}  wall {wall:6.1f}s  "
          f"{result['tokens_per_s_median']:,.0f} tok/s", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt-small", "mamba-small", "hybrid-small"])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_shakespeare"))
    p.add_argument("--data", default=None, help="TinyShakespeare input.txt (else as train_lm.py finds it)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    print(machine(), flush=True)
    results = [run_one(name, args.steps, Path(args.out), args.data) for name in args.models]
    if args.no_write:
        return
    save_json("shakespeare_lm", {"recipe": str(RECIPE.relative_to(ROOT)), "results": results})
    lines = [
        "## TinyShakespeare, nanoGPT CPU recipe",
        "",
        f"{today()}, {machine()}. `python benchmarks/shakespeare_lm.py` (each run is",
        "`train_lm.py` with the settings of `configs/models/gpt_nanogpt_cpu.yaml`: character level,",
        f"batch 12, context 64, {args.steps} steps, AdamW lr 1e-3 cosine to 1e-4, 90/10 split, no dropout).",
        f"nanoGPT's published validation loss for this recipe: {NANOGPT_VAL_LOSS}.",
        "",
        "| model | parameters | val loss | best val loss | train loss | wall time "
        "| training tok/s (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r['model']} | {r['params']} | {r['final_val_loss']:.3f} "
                     f"| {r['best_val_loss']:.3f} | {r['final_train_loss']:.3f} | {r['wall_s']:.0f} s "
                     f"| {r['tokens_per_s_median']:,.0f} |")
    lines += ["", "Validation loss by step:", "",
              "| model | " + " | ".join(str(s) for s, _ in results[0]["val_curve"]) + " |",
              "| --- |" + " ---: |" * len(results[0]["val_curve"])]
    for r in results:
        lines.append(f"| {r['model']} | " + " | ".join(f"{v:.3f}" for _, v in r["val_curve"]) + " |")
    write_section("shakespeare-lm", "\n".join(lines))


if __name__ == "__main__":
    main()
