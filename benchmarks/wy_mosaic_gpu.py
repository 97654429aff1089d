"""One-call GPU check of the delta rules' Mosaic WY backward (``mosaic_wy.py``) against the
Triton one it replaces, in the gradient from ``M^{-1}``.

    python3 benchmarks/wy_mosaic_gpu.py [--out DIR] [--budget 150] [--shapes 8,4096,16,128 ...]

1. Numerics through the api with ``LINEARNEXUS_MOSAIC_WY_BWD=1`` (``mosaic_gdn_check.check``:
   bf16, (2, T, 4, D), output, final state and every gradient against the naive reference at
   the bf16 thresholds): gated_delta_rule at T = 1000 / D = 128 with an initial state,
   T = 63 / D = 64 without, T = 4096 / D = 128 without; delta_rule at T = 1000 / D = 128
   with one.
2. The two kernels alone in the chunk layout at each ``--shapes`` (B, T, H, D; K = V = D),
   on the same random residuals: ``pallas_wy.wy_fused_backward`` from the states (Triton,
   which also writes ``dv``) and ``mosaic_wy.wy_fused_backward_mosaic`` (``dv = beta dy`` is
   the reverse walk's) at its default depth (the deepest that fits: two stages and one
   program per SM at D = 128, three at 64) and at one stage (two programs per SM at
   D = 128), median ms on ``kernels_gpu.host_time``, the rate of the bytes each must move,
   and the relative distance of ``dk``, ``dbeta``, ``dg`` between them.

Prints one line per result; writes ``wy_mosaic_gpu.json`` under ``--out`` after every step.
The api's forward + backward with and without the kernel is ``mosaic_config_gpu.py``'s
(``--configs LINEARNEXUS_MOSAIC_WY_BWD=0 LINEARNEXUS_MOSAIC_WY_BWD=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels_gpu as kg  # noqa: E402  (metric, thresholds, timing)
import mosaic_gdn_check  # noqa: E402  (the api check)

from linearnexus.kernels.common import mosaic_delta  # noqa: E402

CHECKS = (("gated_delta_rule", 1000, 128, True), ("gated_delta_rule", 63, 64, False),
          ("gated_delta_rule", 4096, 128, False), ("delta_rule", 1000, 128, True))


def residuals(shape: tuple[int, ...], seed: int) -> dict[str, Any]:
    """Random inputs of the WY backward in the chunk layout (bf16 tensors, float32 gates)."""
    from linearnexus.kernels.common.pallas_chunk import in_chunk_cumsum

    B, T, H, D = shape
    L, NC = 64, T // 64
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    k = jax.random.normal(ks[0], (B, T, H, D), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    bf = lambda i, s, scale=1.0: (scale * jax.random.normal(ks[i], s)).astype(jnp.bfloat16)  # noqa: E731
    g = jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[1], (B, T, H)))
    return {"k": k, "v": bf(2, (B, T, H, D)), "beta": jax.nn.sigmoid(
                jax.random.normal(ks[3], (B, T, H))).astype(jnp.bfloat16),
            "g": g, "b": in_chunk_cumsum(g, L), "vn": bf(4, (B, T, H, D)),
            "dy": bf(5, (B, T, H, D)), "h": bf(6, (B, NC, H, D, D), 0.3),
            "dk_core": bf(7, (B, T, H, D))}


def kernels(shape: tuple[int, ...], budget_left: float) -> dict[str, Any]:
    """Both WY backwards alone at ``shape``: ms, bytes' rate, and their distance."""
    from linearnexus.kernels.common.mosaic_chunk import MosaicStatic
    from linearnexus.kernels.common.mosaic_wy import wy_fused_backward_mosaic
    from linearnexus.kernels.common.pallas_chunk import CoreStatic
    from linearnexus.kernels.common.pallas_wy import WyStatic, wy_fused_backward

    B, T, H, D = shape
    NC = T // 64
    n_sets = kg.input_sets(11 * B * T * H * D, 50 * 2**20)
    sets = [residuals(shape, i) for i in range(n_sets)]
    wst = WyStatic(gated=True, rows=B, n_chunks=NC, chunk=64, heads=H, key_dim=D, value_dim=D,
                   exact=False, num_warps=4, interpret=False)
    core = CoreStatic(gate="scalar", delta=True, has_h0=False, scale=1.0, rows=B, n_chunks=NC,
                      chunk=64, heads=H, key_dim=D, value_dim=D, n_seqs=B, block_k=D,
                      block_v=64, num_warps=4, num_stages=2, interpret=False, packed=False)
    st = MosaicStatic(core=core, block_v=64, stages=2, backward="mosaic", fused_wy=True,
                      fused_grad=True)
    triton = jax.jit(lambda r: wy_fused_backward(wst, r["k"], r["v"], r["beta"], r["g"],
                                                 r["vn"], r["dy"], None, r["dk_core"],
                                                 states=r["h"]))
    def mosaic_at(stages):
        return jax.jit(lambda r: wy_fused_backward_mosaic(
            st, r["k"], r["v"], r["beta"], r["b"], r["vn"], r["dy"], r["h"], r["dk_core"],
            stages=stages))

    mosaic = mosaic_at(None)
    tok = B * T * H * D * 2  # one bf16 [B, T, H, D] tensor
    # both read k, v, vn, dy, dk_core and the states (D * D bf16 a chunk) and write dk;
    # Triton writes dv too
    states = B * NC * H * D * D * 2
    row: dict[str, Any] = {"shape": list(shape)}
    for name, fn, nbytes in (("triton", triton, 7 * tok + states),
                             ("mosaic", mosaic, 6 * tok + states),
                             ("mosaic_1stage", mosaic_at(1), 6 * tok + states)):
        if budget_left <= 0:
            row[name] = "skipped: budget spent"
            continue
        t = kg.host_time(lambda i, fn=fn: fn(sets[i % n_sets]), kg.jax_sync, repeats=5,
                         n_sets=n_sets)
        row[f"{name}_ms"] = round(t["ms"], 4)
        row[f"{name}_tb_s"] = round(nbytes / (t["ms"] * 1e-3) / 1e12, 3)
    a, b = triton(sets[0]), mosaic(sets[0])
    row["dist"] = {"dk": kg.rel_err(b[0], a[0]), "dbeta": kg.rel_err(b[1], a[2]),
                   "dg": kg.rel_err(b[2], a[3])}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget", type=float, default=150.0, help="seconds")
    parser.add_argument("--shapes", nargs="+", default=["8,4096,16,128", "8,4096,16,64"])
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    for shape in shapes:
        if len(shape) != 4 or shape[1] % 64 or shape[3] not in (64, 128):
            parser.error(f"--shapes: expected B,T,H,D with T a multiple of 64 and D 64 or 128, "
                         f"got {shape}")
    start = time.perf_counter()
    results: dict[str, Any] = {"device": str(jax.devices()[0].device_kind),
                               "jax": jax.__version__, "checks": [], "kernels": []}

    def save() -> None:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "wy_mosaic_gpu.json"), "w") as f:
            json.dump(results, f, indent=1)

    os.environ[mosaic_delta.WY_MOSAIC_ENV] = "1"
    refs: dict = {}
    for i, (op, T, D, h0) in enumerate(CHECKS):
        if time.perf_counter() - start > 0.6 * args.budget:
            results["checks"].append({"op": op, "T": T, "D": D, "skipped": "budget"})
            continue
        try:
            row = mosaic_gdn_check.check(op, T, D, h0, 100 + i, refs)
        except Exception as e:  # noqa: BLE001 - reported in the row
            row = {"op": op, "T": T, "D": D, "h0": h0, "status": "ERROR",
                   "error": kg.short_error(e)}
        results["checks"].append(row)
        errs = " ".join(f"{k}={v:.1e}" for k, v in row.get("errors", {}).items())
        print(f"{row['status']} {op} T={T} D={D} h0={h0} {row.get('failed', '')} "
              f"{row.get('error', '')} {errs}", flush=True)
        save()
    for shape in shapes:
        try:
            row = kernels(shape, args.budget - (time.perf_counter() - start))
        except Exception as e:  # noqa: BLE001 - reported in the row
            row = {"shape": list(shape), "error": kg.short_error(e)}
        results["kernels"].append(row)
        print(row, flush=True)
        save()


if __name__ == "__main__":
    main()
