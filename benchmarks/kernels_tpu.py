"""LinearNexus Pallas TPU kernels: correctness and speed against the chunked JAX form.

    python benchmarks/kernels_tpu.py [--ops simple_gla gla ...] [--shapes 0 1] [--chunk-size 128]
        [--repeats 9] [--quick] [--out DIR]

On a TPU (v5e / v5p / v6e ...): for every op (simple_gla, gla, delta_rule, gated_delta_rule)
and shape ``(B, T, H, D)``, bf16 inputs (float32 gates and initial state):

1. correctness of ``backend="pallas_tpu"`` against ``backend="jax"`` (the chunked XLA form,
   the fastest other implementation on a TPU; FLA does not run there): output, final state
   and the gradient of ``sum(o * do) + sum(ht * dht)`` w.r.t. every input, as
   ``||a - b|| / ||b||`` in float64 on the host (bf16 thresholds: 5e-3 outputs / states,
   1e-2 gradients, as ``benchmarks/kernels_gpu.py``);
2. time of the forward and of forward+backward for both backends: ``jax.jit`` of the api
   call, a warm-up call, then the median of ``--repeats`` timed calls (each blocked on).

On a CPU, ``--quick`` runs the same checks through Pallas's TPU interpreter
(``LINEARNEXUS_PALLAS_TPU_INTERPRET=1``) at one small shape, in float32 (thresholds 1e-4 /
1e-3) and bf16, and lowers every op's fwd+bwd for a TPU with ``jax.export`` (the Mosaic
lowering, without a TPU); its times are the interpreter's and say nothing about a TPU.

``--roofline`` prints the roofline ESTIMATE of ``docs/tpu.md`` (no device needed): per op,
shape and direction, the MXU FLOPs and HBM bytes of the kernels (:func:`cost`), and
``max(FLOPs / peak bf16 rate, bytes / HBM bandwidth)`` for the chips in :data:`CHIPS`.

Writes ``<out>/kernels_tpu.json`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearnexus.kernels.common import pallas_tpu  # noqa: E402
from linearnexus.registry import OP_REGISTRY  # noqa: E402

OPS = ("simple_gla", "gla", "delta_rule", "gated_delta_rule")
#: (B, T, H, D) with K = V = D
SHAPES = ((8, 2048, 16, 128), (2, 8192, 16, 128), (4, 4096, 8, 256))
QUICK_SHAPE = (1, 200, 2, 64)
TOL = {"bfloat16": (5e-3, 1e-2), "float32": (1e-4, 1e-3)}
#: published per-chip peak bf16 FLOP/s and HBM bytes/s (Google Cloud TPU docs, cited in
#: docs/tpu.md): v5e 197 TFLOP/s, 819 GB/s; v5p 459 TFLOP/s, 2765 GB/s; v6e 918 TFLOP/s,
#: 1638 GB/s
CHIPS = {"v5e": (197e12, 819e9), "v5p": (459e12, 2765e9), "v6e": (918e12, 1638e9)}


def cost(op: str, direction: str, L: int, K: int, V: int) -> tuple[float, float]:
    """``(MXU FLOPs, HBM bytes)`` per token and head of the kernels (bf16 inputs, float32
    gates and states), with K, V the lane-padded head dims and L the chunk.

    Forward per chunk: ``q k^T`` (2 L^2 K), ``scores vn`` (2 L^2 V), ``(q e^b) S`` and
    ``k_end^T vn`` (2 L K V each); the delta rules add ``w S`` (2 L K V) and the WY form in
    XLA (``k k^T`` 2 L^2 K, the triangular inverse ~2 L^3 / 3, ``w``, ``u`` 2 L^2 (K + V); its
    backward counted as twice that). Backward per chunk: ``q k^T`` again, ``P^T do`` and
    ``do vn^T`` (2 L^2 V each), ``dA k`` and ``dA^T q`` (2 L^2 K each), four ``[L, K] x [K, V]``
    products (8 L K V), the delta rules' ``w^T dvn`` and ``dvn S^T`` (4 L K V), and the scalar
    gate's two in-chunk sums as ``[L, L] x [L, 128]`` matmuls (4 L^2 128). GLA's in-chunk
    scores off the 16-token diagonal blocks are MXU matmuls (split decay); its diagonal
    blocks run on the VPU and are not counted here.
    Bytes: every operand block read once and every result written once, plus the float32
    per-chunk states (4 K V / L per token, written forward, read backward).
    """
    delta, gla = "delta" in op, op == "gla"
    fwd = direction == "fwd"
    if gla:  # the split-decay scores q_t k_t^T (2 L K) and their two gradients (4 L K)
        flops = 2 * L * (K + V) + 4 * K * V if fwd else 2 * L * (2 * V + 3 * K) + 10 * K * V
    else:
        flops = 2 * L * (K + V) + 4 * K * V if fwd else L * (6 * K + 4 * V) + 8 * K * V
        if op in ("simple_gla", "gated_delta_rule") and not fwd:
            flops += 4 * L * 128
    if delta:
        wy = 2 * L * K + 2 * L * L / 3 + 2 * L * (K + V)
        flops += (2 * K * V + wy) if fwd else (4 * K * V + 2 * wy)
    gate_bytes = {"simple_gla": 8, "gated_delta_rule": 8, "delta_rule": 0, "gla": 4 * K}[op]
    states = 4 * K * V / L
    if fwd:
        nbytes = 2 * (2 * K + V) + gate_bytes + 2 * V + states
        if delta:  # w read, vn written; the WY form reads k, v, beta and writes w, u
            nbytes += 2 * K + 2 * V + 2 * (K + V) + 4 + 2 * (K + V)
    else:
        nbytes = 2 * (2 * K + 2 * V) + gate_bytes + states + 2 * (2 * K + V) + gate_bytes
        if delta:  # w, dw, and the WY backward (about twice its forward traffic)
            nbytes += 4 * K + 4 * (2 * (K + V) + 4 + 2 * (K + V))
    return flops, nbytes


def roofline(shapes, chunk: int = 128) -> list[dict]:
    """The estimate per op, shape, direction and chip (milliseconds; see :func:`cost`)."""
    rows = []
    for op in OPS:
        for B, T, H, D in shapes:
            K = V = -(-D // 128) * 128
            n = B * T * H
            for direction in ("fwd", "bwd"):
                flops, nbytes = cost(op, direction, chunk, K, V)
                row = {"op": op, "shape": [B, T, H, D], "direction": direction,
                       "GFLOP": n * flops / 1e9, "GB": n * nbytes / 1e9}
                for chip, (peak, bw) in CHIPS.items():
                    t_mxu, t_hbm = n * flops / peak, n * nbytes / bw
                    row[chip] = (1e3 * max(t_mxu, t_hbm), "MXU" if t_mxu > t_hbm else "HBM")
                rows.append(row)
    return rows


def make_inputs(op: str, shape: tuple[int, int, int, int], dtype, seed: int = 0) -> dict:
    """The op's positional arrays (q, k, v in ``dtype``; gates, beta float32) and cotangents."""
    B, T, H, D = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32)
    if "delta" in op:
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # the delta rules assume ||k|| = 1
    else:
        k = k * D ** -0.5
    v = jax.random.normal(ks[2], (B, T, H, D), jnp.float32)
    arrays = [q.astype(dtype), k.astype(dtype), v.astype(dtype)]
    gate_shape = (B, T, H, D) if op == "gla" else (B, T, H)
    if op != "delta_rule":
        arrays.append(jax.nn.log_sigmoid(jax.random.normal(ks[3], gate_shape) + 2.0))
    if "delta" in op:
        arrays.append(jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))))
    h0 = jax.random.normal(ks[5], (B, H, D, D), jnp.float32) * 0.1
    cts = (jax.random.normal(ks[6], (B, T, H, D), jnp.float32).astype(dtype),
           jax.random.normal(ks[7], (B, H, D, D), jnp.float32))
    return {"arrays": tuple(arrays), "h0": h0, "cts": cts}


def build(op: str, backend: str, chunk_size: int | None):
    """Jitted ``(forward, forward+backward)`` of the api call on one backend."""
    fn = OP_REGISTRY[op]

    def forward(arrays, h0):
        return fn(*arrays, initial_state=h0, output_final_state=True, mode="chunk",
                  backend=backend, chunk_size=chunk_size)

    def loss(arrays, h0, cts):
        o, final = forward(arrays, h0)
        return (jnp.sum(o.astype(jnp.float32) * cts[0].astype(jnp.float32))
                + jnp.sum(final * cts[1]))

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1)))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def timed(f, *args, repeats: int) -> float:
    """Median seconds of ``repeats`` blocked calls after one warm-up."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_case(op: str, shape, dtype_name: str, chunk_size: int | None, repeats: int) -> dict:
    dtype = jnp.dtype(dtype_name)
    inp = make_inputs(op, shape, dtype)
    out_tol, grad_tol = TOL[dtype_name]
    fwd_t, grad_t = build(op, "pallas_tpu", chunk_size)
    fwd_j, grad_j = build(op, "jax", None)
    args = (inp["arrays"], inp["h0"])
    (o, final), (o_ref, final_ref) = fwd_t(*args), fwd_j(*args)
    grads, grads_ref = grad_t(*args, inp["cts"]), grad_j(*args, inp["cts"])
    errors = {"o": rel(o, o_ref), "final_state": rel(final, final_ref)}
    for i, (a, b) in enumerate(zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True)):
        errors[f"grad{i}"] = rel(a, b)
    ok = all(err <= (out_tol if name in ("o", "final_state") else grad_tol)
             for name, err in errors.items())
    row = {"op": op, "shape": list(shape), "dtype": dtype_name, "errors": errors, "ok": ok}
    if repeats:
        row["ms"] = {
            "pallas_tpu_fwd": 1e3 * timed(fwd_t, *args, repeats=repeats),
            "jax_fwd": 1e3 * timed(fwd_j, *args, repeats=repeats),
            "pallas_tpu_fwdbwd": 1e3 * timed(grad_t, *args, inp["cts"], repeats=repeats),
            "jax_fwdbwd": 1e3 * timed(grad_j, *args, inp["cts"], repeats=repeats),
        }
    return row


def lower_for_tpu(op: str, shape) -> str:
    """Export the fwd+bwd for a TPU (the Mosaic lowering runs; no TPU needed): "ok" or the error."""
    from jax import export

    inp = make_inputs(op, shape, jnp.bfloat16)
    saved = pallas_tpu.current_platform
    pallas_tpu.current_platform = lambda: "tpu"  # lower compiled kernels, not the interpreter
    try:
        _, grad = build(op, "pallas_tpu", None)
        # abstract arguments: concrete ones are committed to this machine's CPU device
        specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                             (inp["arrays"], inp["h0"], inp["cts"]))
        export.export(grad, platforms=("tpu",))(*specs)
        return "ok"
    except Exception as e:  # reported in the results, not raised: the other ops still run
        return f"{type(e).__name__}: {e}"[:300]
    finally:
        pallas_tpu.current_platform = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--shapes", nargs="+", type=int, default=None,
                        help=f"indices into {SHAPES}")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: 128")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true",
                        help="CPU: the TPU interpreter at one small shape, plus TPU lowering")
    parser.add_argument("--roofline", action="store_true",
                        help="print the roofline estimate (docs/tpu.md) and exit")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.roofline:
        print("| op | (B, T, H, D) | pass | GFLOP (MXU) | GB (HBM) | "
              + " | ".join(f"{c} ms (bound)" for c in CHIPS) + " |")
        print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in CHIPS) + " |")
        for r in roofline([SHAPES[i] for i in (args.shapes or range(len(SHAPES)))]):
            print(f"| {r['op']} | {tuple(r['shape'])} | {r['direction']} | {r['GFLOP']:.0f} | "
                  f"{r['GB']:.2f} | " + " | ".join(f"{r[c][0]:.2f} ({r[c][1]})" for c in CHIPS)
                  + " |")
        return
    on_tpu = jax.default_backend() == "tpu"
    if args.quick:
        os.environ[pallas_tpu.INTERPRET_ENV] = "1"
        shapes, dtypes, repeats = [QUICK_SHAPE], ["float32", "bfloat16"], min(args.repeats, 1)
    elif not on_tpu:
        parser.error(f"no TPU here (default backend {jax.default_backend()!r}); use --quick")
    else:
        shapes = [SHAPES[i] for i in (args.shapes or range(len(SHAPES)))]
        dtypes, repeats = ["bfloat16"], args.repeats
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "python": platform.python_version(), "interpret": bool(args.quick)}
    print(json.dumps(env))
    rows = []
    for op in args.ops:
        for shape in shapes:
            for dtype_name in dtypes:
                row = run_case(op, shape, dtype_name, args.chunk_size, repeats)
                if args.quick and dtype_name == "bfloat16":
                    row["tpu_lowering"] = lower_for_tpu(op, shape)
                rows.append(row)
                worst = max(row["errors"].values())
                ms = row.get("ms", {})
                print(f"{op:17s} {str(shape):22s} {dtype_name:8s} worst rel err {worst:.2e} "
                      f"{'ok' if row['ok'] else 'FAIL'} "
                      + " ".join(f"{k} {v:.2f}ms" for k, v in ms.items())
                      + (f" tpu_lowering {row['tpu_lowering']}" if "tpu_lowering" in row else ""),
                      flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_tpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    if not all(r["ok"] and r.get("tpu_lowering", "ok") == "ok" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
