"""Shared pieces of the benchmark scripts: timing, machine description, results files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

ROOT = Path(__file__).resolve().parents[1]
BENCH_DOC = ROOT / "docs" / "benchmarks.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"


def machine() -> str:
    """'CPU model, N cores, JAX x.y.z (backend)'."""
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", text)
        if found:
            cpu = found.group(1).strip()
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, JAX {jax.__version__} ({jax.default_backend()})"


def today() -> str:
    return datetime.date.today().isoformat()


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time in seconds of ``fn()`` (blocked until ready) after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_time(body: Callable[[Any, Any], Any], carry: Any, *, iters: int,
              repeats: int = 5) -> float:
    """Median seconds per iteration of a jitted ``fori_loop(0, iters, body, carry)``, each
    run's carry donated and fed to the next (so a state updated in place stays one buffer),
    after one warm-up run (the compile)."""
    loop = jax.jit(lambda c: jax.lax.fori_loop(0, iters, body, c), donate_argnums=0)
    carry = loop(carry)
    jax.block_until_ready(carry)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        carry = loop(carry)
        jax.block_until_ready(carry)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / iters


def shakespeare_batches(global_batch: int, seq: int, vocab: int
                        ) -> Callable[[int], tuple[Any, Any]]:
    """``batch(i) -> (inputs, targets)``, each ``[global_batch, seq]`` int32: windows of
    TinyShakespeare bytes (mod ``vocab``) drawn from step number ``i`` alone, so every run
    (GPU count, backend, framework) sees the same data at the same step."""
    import numpy as np

    from linearnexus.data import resolve_shakespeare

    data = np.frombuffer(Path(resolve_shakespeare()).read_bytes(), np.uint8).astype(np.int32)
    data = data % vocab

    def batch(i: int) -> tuple[Any, Any]:
        starts = np.random.default_rng(i).integers(0, len(data) - seq - 1, global_batch)
        window = np.stack([data[s:s + seq + 1] for s in starts])  # [B, T+1]
        return window[:, :-1], window[:, 1:]
    return batch


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` / ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCH_DOC.read_text() if BENCH_DOC.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = BENCH_DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, BENCH_DOC)


def save_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"date": today(), "machine": machine(), **payload}, indent=2))
    os.replace(tmp, path)
    return path
