"""What the linear ops' input guard (``kernels/common/validation.run_guarded``) costs on a GPU.

The guard runs each op, checks its outputs are finite (and log-gates <= 0, traced offsets
valid) and only then returns, through a ``lax.cond`` whose other branch reruns the op on
cleaned inputs. This script times the api path with the guard as shipped, or with
``--no-guard`` (the op called directly, as before the guard), for:

* ops: simple_gla, gated_delta_rule and gla, bf16 (8, 4096, 16, 128), forward and forward +
  backward (``jax.grad`` of a sum), the default backend (on sm_90: mosaic);
* decode: the ~200M Gated DeltaNet LM of ``benchmarks/decode_gpu.py`` at batch 1 and 64
  (its on-device loop).

Run it in one process per variant on the GPU machine (no compiled program is shared); the
guard's two forms of its last step (``validation.GUARD_SETTLE_ENV``: a ``lax.cond``, the
default, or a one-step ``lax.while_loop`` that passes the outputs through without a copy)::

    python3 benchmarks/guard_cost_gpu.py --no-guard
    python3 benchmarks/guard_cost_gpu.py
    LINEARNEXUS_GUARD_SETTLE=loop python3 benchmarks/guard_cost_gpu.py
    LINEARNEXUS_GUARD_BACKWARD=cond python3 benchmarks/guard_cost_gpu.py   # no pass over do
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _unguarded(run, q, k, v, gates, *, initial_state, cu_seqlens, always_clean=False):
    """The op called directly: what the api did before the guard (``always_clean``, the
    guard's own shortcut for calls it cleans up front, has nothing to skip here)."""
    return run(q, k, v, *(a for _, a in gates), initial_state=initial_state, cu_seqlens=cu_seqlens)


def time_call(fn, *args, repeats: int = 20) -> float:
    """Median ms of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


OPS = ("simple_gla", "gated_delta_rule", "gla")


def op_rows(shape: tuple[int, int, int, int], names: tuple[str, ...] = OPS) -> list[dict]:
    from linearnexus.kernels.gated_delta_rule import gated_delta_rule
    from linearnexus.kernels.gla import gla
    from linearnexus.kernels.simple_gla import simple_gla

    b, t, h, d = shape
    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], shape, jnp.bfloat16)
    k = jax.random.normal(keys[1], shape, jnp.bfloat16) * d ** -0.5
    v = jax.random.normal(keys[2], shape, jnp.bfloat16)
    g = -jax.nn.softplus(jax.random.normal(keys[3], (b, t, h), jnp.float32)) * 0.1
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (b, t, h), jnp.float32))
    gk = jnp.broadcast_to(g[..., None], shape) / 16  # GLA's per-key log-gates
    # the gates are arguments, not constants closed over: XLA constant-folded the in-chunk
    # sums of closed-over gates for minutes on an H100 (2026-12-05)
    ops = {
        "simple_gla": lambda q, k, v, g, beta, gk: simple_gla(q, k, v, g)[0],
        "gated_delta_rule": lambda q, k, v, g, beta, gk: gated_delta_rule(q, k, v, g, beta)[0],
        "gla": lambda q, k, v, g, beta, gk: gla(q, k, v, gk)[0],
    }
    rows = []
    for name, op in ops.items():
        if name not in names:
            continue
        fwd = jax.jit(op)
        grad = jax.jit(jax.grad(lambda *a, op=op: op(*a).astype(jnp.float32).sum(),
                                argnums=(0, 1, 2)))
        args = (q, k, v, g, beta, gk)
        rows.append({"op": name, "shape": list(shape), "fwd_ms": time_call(fwd, *args),
                     "fwd_bwd_ms": time_call(grad, *args)})
        print(rows[-1], flush=True)
    return rows


def decode_rows(batches: list[int]) -> list[dict]:
    import decode_gpu

    args = decode_gpu.build_parser().parse_args([]) if hasattr(decode_gpu, "build_parser") else None
    if args is None:
        args = argparse.Namespace(d_model=1024, layers=12, vocab=8192, dtype="bfloat16",
                                  max_seq_len=512, steps=128, repeats=3, host_batches=[])
    args.host_batches = []
    args.dtype = args.dtype or "bfloat16"
    rows = []
    for batch in batches:
        row = decode_gpu.time_ours("gdn", batch, args)
        rows.append({"model": "gdn", "batch": batch, "ms_per_step": row["ms_per_step"]})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-guard", action="store_true", help="call the ops without the guard")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file, written after the ops and again after the decode rows")
    p.add_argument("--skip-decode", action="store_true",
                   help="the ops only (decode calls skip the settle step either way)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS),
                   help="the ops to time (default: all three)")
    args = p.parse_args()
    if args.no_guard:
        from linearnexus.kernels.common import backends

        backends.run_guarded = _unguarded
    from linearnexus.kernels.common.validation import guard_backward_form, guard_settle_form

    result = {"guard": not args.no_guard, "settle": guard_settle_form(),
              "backward": guard_backward_form(),
              "device": str(jax.devices()[0]), "jax": jax.__version__, "ops": [], "decode": []}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))

    result["ops"] = op_rows((8, 4096, 16, 128), tuple(args.ops))
    save()
    if not args.skip_decode:
        result["decode"] = decode_rows([1, 64])
        save()

if __name__ == "__main__":
    main()
