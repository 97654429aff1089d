"""Linear-attention ops on the CPU: chunked form vs the per-step reference.

    python benchmarks/linear_ops_cpu.py [--quick] [--ops simple_gla gla ...]

For every op in ``linearnexus.registry.LINEAR_OPS`` at B=2, T=2048, H=4, K=V=64 (float32):
forward and forward+backward wall time of the per-step reference (backend "naive") and
of the chunked form (backend "jax", mode "chunk") at a few chunk sizes, and the speed-up
of the op's default chunk size over the reference.

Writes benchmarks/results/linear_ops_cpu.json and the "linear-ops-cpu" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save_json, time_fn, today, write_section  # noqa: E402

from linearnexus.registry import LINEAR_OPS, OP_REGISTRY  # noqa: E402


def make_inputs(op: str, key: jax.Array, B: int, T: int, H: int, K: int, V: int) -> tuple:
    """Random positional inputs of ``op`` (log-gates mild, keys normalised for delta rules)."""
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, H, V))
    g_head = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)) + 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    if op == "simple_gla":
        return q, k, v, g_head
    if op == "gla":
        return q, k, v, jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, K)) + 3.0) / 4
    if op == "delta_rule":
        return q, k, v, beta
    if op == "gated_delta_rule":
        return q, k, v, g_head, beta
    if op == "retention":
        return q, k, v
    if op == "ssd":  # x [B,T,H,P=V], dt [B,T,H], A [H], B/C [B,T,G=1,N=K]
        dt = jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)) - 2.0)
        A = -jnp.exp(jax.random.uniform(ks[4], (H,), minval=0.0, maxval=1.5))
        return v, dt, A, k[:, :, :1], q[:, :, :1]
    raise KeyError(f"no input recipe for op {op!r}")


def bench_op(op: str, shape: tuple[int, ...], chunk_sizes: list[int], repeats: int) -> list[dict]:
    fn = OP_REGISTRY[op]
    args = make_inputs(op, jax.random.PRNGKey(0), *shape)
    o_shape = fn(*args, backend="jax", mode="chunk")[0].shape
    cot = jax.random.normal(jax.random.PRNGKey(1), o_shape)
    float_args = tuple(range(len(args)))
    variants = [("per-step reference (naive)", dict(backend="naive"))]
    variants += [(f"chunked L={c}", dict(backend="jax", mode="chunk", chunk_size=c))
                 for c in chunk_sizes]
    variants.append(("chunked (default L)", dict(backend="jax", mode="chunk")))
    rows = []
    for name, kwargs in variants:
        fwd = jax.jit(lambda *a, kw=kwargs: fn(*a, **kw)[0])

        def loss(*a, kw=kwargs):
            return jnp.sum(fn(*a, **kw)[0] * cot)

        grad = jax.jit(jax.grad(loss, argnums=float_args))
        t_fwd = time_fn(lambda f=fwd: f(*args), repeats=repeats)
        t_bwd = time_fn(lambda f=grad: f(*args), repeats=repeats)
        rows.append({"op": op, "variant": name, "forward_ms": 1e3 * t_fwd,
                     "forward_backward_ms": 1e3 * t_bwd})
        print(f"{op:18s} {name:28s} fwd {1e3 * t_fwd:8.1f} ms   fwd+bwd {1e3 * t_bwd:8.1f} ms",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=512, 2 repeats (smoke run)")
    parser.add_argument("--ops", nargs="*", default=list(LINEAR_OPS), choices=LINEAR_OPS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    shape = (2, 512 if args.quick else 2048, 4, 64, 64)
    repeats = 2 if args.quick else 5
    rows = []
    for op in args.ops:
        rows += bench_op(op, shape, [16, 32, 64], repeats)
    if args.no_write or args.quick:
        return
    lines = [
        "## Linear-attention ops on the CPU",
        "",
        f"{today()}, {machine()}. `python benchmarks/linear_ops_cpu.py`. B=2, T=2048, H=4, "
        "K=V=64, float32; median of 5 runs after a compile + warm-up call. Forward+backward "
        "is `jax.grad` of a random projection of the output w.r.t. every input.",
        "",
        "| op | variant | forward ms | forward+backward ms | fwd+bwd speed-up vs reference |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for op in args.ops:
        op_rows = [r for r in rows if r["op"] == op]
        ref = op_rows[0]["forward_backward_ms"]
        for r in op_rows:
            lines.append(f"| {op} | {r['variant']} | {r['forward_ms']:.1f} | "
                         f"{r['forward_backward_ms']:.1f} | {ref / r['forward_backward_ms']:.1f}x |")
    write_section("linear-ops-cpu", "\n".join(lines))
    save_json("linear_ops_cpu", {"shape": dict(zip("BTHKV", shape, strict=True)), "rows": rows})


if __name__ == "__main__":
    main()
