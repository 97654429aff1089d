"""The delta rules' WY preparation on a GPU: where its time goes, and what its variants cost
in time and in error (docs/mosaic.md, "The delta rules' forward": the preparation is most of
the forward: 0.59 of 1.05 ms at (8, 4096, 16, 128) on an H100 before ``low_wu``, 0.43 after).

    python3 benchmarks/wy_profile_gpu.py [--out DIR] [--budget 300]
        [--shapes 8,4096,16,128 8,4096,16,64] [--skip-fla] [--skip-op]
        [--variants NAME ...] [--op-variants NAME ...] [--fused-warps N ...]

Per shape (B, T, H, D), K = V = D, bf16 (``kernels_gpu.py``'s recipe, gated), in the chunk
layout, ``kernels_gpu.host_time``:

* ``pallas_wy.wy_prepare`` alone, forward and forward + backward, for each variant of its
  ``WyStatic`` (``low_wu``: ``w``, ``u`` from the bf16 ``M^{-1}`` on bf16 operands, as FLA,
  the default, or from the float32 one on TF32; ``split_x``: the bf16 operands as a hi + lo
  pair, one more product each; the warps per program), each with its error
  against a float32 reference (triangular solves at full precision):
  ``max |w - w_ref| / max |w_ref|`` and the same for ``u``;
* the whole ``gated_delta_rule`` through the api (``mosaic`` and ``pallas``), forward and
  forward + backward, per variant (``--op-variants``, default all), and each variant's
  check against the naive reference (``kernels_gpu.check_linear``, bf16 thresholds;
  T = 1000, D = 128, dense and packed, with an initial state);
* with ``--fused-warps``, first: the fused gradient's two WY kernels alone (``wy_inverse``,
  ``M^{-1}`` only, by block substitution and by halves; ``wy_fused_backward`` from ``dks``
  and from the states) at each warp count, with the rate of the bytes each must move
  (``--variants`` with no names skips the rest);
* FLA 0.6.0 in a child process: its preparation (``chunk_gated_delta_rule_fwd_intra``: the
  fused ``kkt + solve_tril`` kernel and ``recompute_w_u``) and the whole op, forward and
  forward + backward.

A step not started when ``--budget`` seconds are spent is skipped and said so; the JSON
(``wy_profile.json`` under ``--out``) is rewritten after every step. ``--quick`` on the CPU
runs one tiny shape in interpret mode to check the script, not to time anything.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels_gpu as kg  # noqa: E402

import linearnexus.kernels.common.pallas_ops as pallas_ops  # noqa: E402
from linearnexus.kernels.common import pallas_wy  # noqa: E402
from linearnexus.kernels.common.pallas import interpret_mode  # noqa: E402

F32 = jnp.float32
WY_STATIC = pallas_wy.WyStatic
# (name, low_wu, warps, split_x); the first is the preparation before low_wu became the
# default.
# Also measured on an H100 (2026-12-05) and removed since: the blocks of M^{-1} below the
# diagonal on TF32 (0.09 ms slower), w and u in a kernel of their own (the op 0.1 ms slower),
# two warps (the backward spilled: ~14 ms instead of ~1.2)
VARIANTS = [("float32-wu", False, 4, False), ("default", True, 4, False),
            ("split-x", True, 4, True), ("default w8", True, 8, False)]


def wy_static(B: int, T: int, H: int, D: int, chunk: int, low_wu: bool,
              warps: int, split_x: bool = False) -> pallas_wy.WyStatic:
    return WY_STATIC(gated=True, rows=B, n_chunks=T // chunk, chunk=chunk, heads=H,
                     key_dim=D, value_dim=D, exact=False, num_warps=warps,
                     interpret=interpret_mode(), low_wu=low_wu, split_x=split_x)


def reference(k: jax.Array, v: jax.Array, beta: jax.Array, g: jax.Array,
              chunk: int) -> tuple[jax.Array, jax.Array]:
    """``w, u`` per chunk in float32 at full precision: ``M = I + A`` with
    ``A_ij = beta_i k_i.k_j e^{b_i - b_j}`` (j < i), ``w = M^{-1} (beta e^b k)``,
    ``u = M^{-1} (beta v)``; inputs ``[B, T, H, *]``, outputs the same layout."""
    B, T, H, D = k.shape
    nc = T // chunk

    def chunks(x):  # [B, T, H, *] -> [B, H, NC, L, *]
        x = x.reshape(B, nc, chunk, H, *x.shape[3:])  # [B, T, H, *] -> [B, NC, L, H, *]
        return jnp.moveaxis(x, 3, 1)  # -> [B, H, NC, L, *]

    kc, vc = chunks(k.astype(F32)), chunks(v.astype(F32))
    bc, gc = chunks(beta.astype(F32)), chunks(g)
    b = jnp.cumsum(gc, axis=-1)  # [B, H, NC, L] in-chunk inclusive sums
    with jax.default_matmul_precision("highest"):
        kk = jnp.einsum("bhcik,bhcjk->bhcij", kc, kc)  # [B, H, NC, L, K] x2 -> [..., L, L]
        low = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
        decay = jnp.exp(jnp.where(low, b[..., :, None] - b[..., None, :], -jnp.inf))
        m = jnp.eye(chunk, dtype=F32) + bc[..., :, None] * kk * decay  # [..., L, L]
        solve = functools.partial(jax.scipy.linalg.solve_triangular, lower=True,
                                  unit_diagonal=True)
        w = solve(m, (bc * jnp.exp(b))[..., None] * kc)  # [B, H, NC, L, K]
        u = solve(m, bc[..., None] * vc)  # [B, H, NC, L, V]

    def back(x):  # [B, H, NC, L, *] -> [B, T, H, *]
        x = jnp.moveaxis(x, 1, 3)  # -> [B, NC, L, H, *]
        return x.reshape(B, T, H, *x.shape[4:])  # [B, NC, L, H, *] -> [B, T, H, *]

    return back(w), back(u)


def max_rel(a: jax.Array, ref: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a.astype(F32) - ref)) / jnp.max(jnp.abs(ref)))


def profile_shape(shape: tuple[int, int, int, int], variants: list[tuple], repeats: int,
                  deadline: float, results: dict, save) -> None:
    B, T, H, D = shape
    chunk = 64
    ins = kg.jax_inputs("gated_delta_rule", jax.random.PRNGKey(7), B, T, H, D, D, jnp.bfloat16)
    k, v, beta, g = ins["k"], ins["v"], ins["beta"], ins["g"]
    w_ref, u_ref = reference(k, v, beta, g, chunk)
    dw = jax.random.normal(jax.random.PRNGKey(8), k.shape, F32).astype(k.dtype)
    du = jax.random.normal(jax.random.PRNGKey(9), v.shape, F32).astype(v.dtype)
    row: dict[str, Any] = {}
    results["wy"][str(shape)] = row
    for name, low_wu, warps, split_x in variants:
        if time.time() > deadline:
            row[name] = "skipped: budget spent"
            continue
        st = wy_static(B, T, H, D, chunk, low_wu, warps, split_x)
        fwd = jax.jit(lambda k, v, b, g, st=st: pallas_wy.wy_prepare(st, k, v, b, g)[:2])

        def loss(k, v, b, g, dw, du, st=st):
            w, u, kk = pallas_wy.wy_prepare(st, k, v, b, g)
            return (jnp.sum(w.astype(F32) * dw) + jnp.sum(u.astype(F32) * du)
                    + jnp.sum(kk.astype(F32)))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        entry: dict[str, Any] = {"low_wu": low_wu, "warps": warps, "split_x": split_x}
        try:
            w, u = fwd(k, v, beta, g)
            entry["w_err"], entry["u_err"] = max_rel(w, w_ref), max_rel(u, u_ref)
            entry["fwd_ms"] = kg.host_time(lambda i, fwd=fwd: fwd(k, v, beta, g), kg.jax_sync,
                                           repeats=repeats, n_sets=1)["ms"]
            entry["fwd_bwd_ms"] = kg.host_time(lambda i, grad=grad: grad(k, v, beta, g, dw, du),
                                               kg.jax_sync, repeats=repeats, n_sets=1)["ms"]
        except Exception as e:  # noqa: BLE001
            entry["error"] = kg.short_error(e)
        row[name] = entry
        kg.log(f"  wy {shape} {name:24s} " + " ".join(
            f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}"
            for key, val in entry.items()))
        save()


def fused_rows(shape: tuple[int, int, int, int], warps: list[int], repeats: int,
               deadline: float, results: dict, save) -> None:
    """The fused gradient's two WY kernels alone (``wy_inverse``: ``M^{-1}`` only, by block
    substitution and by halves, ``WyStatic.inverse_halves``; ``wy_fused_backward`` from
    ``dks``, and from the states as the default gradient runs it), at each warp count: time
    and the rate of the bytes each must move (inputs read once, outputs written once;
    ``M^{-1}``'s float32 scratch not counted). On an H200 (2026-12-06, (8, 4096, 16, 128)):
    4 warps best for the substitution inverse and the backward from ``dks`` (0.284 / 0.551
    ms; 2 warps 0.293 / 1.020, 8 warps 0.373 / 0.855)."""
    B, T, H, D = shape
    chunk = 64
    ins = kg.jax_inputs("gated_delta_rule", jax.random.PRNGKey(7), B, T, H, D, D, jnp.bfloat16)
    k, v, beta, g = ins["k"], ins["v"], ins["beta"], ins["g"]
    keys = jax.random.split(jax.random.PRNGKey(11), 4)
    vn, dy, dks, dk_core = (jax.random.normal(key, k.shape, F32).astype(k.dtype) for key in keys)
    row: dict[str, Any] = {}
    results["fused"][str(shape)] = row
    n = B * T * H
    small = n * (2 + 4)  # beta (bf16) and the gate rows (float32)
    inv_bytes = n * D * 2 + small + n * chunk * 2  # k in, M^{-1} out
    bwd_bytes = 8 * n * D * 2 + small + 2 * n * 4  # k v vn dy dks dk0 in, dk dv out; dbeta db
    states = jax.random.normal(keys[0], (B, T // chunk, H, D, D), F32).astype(k.dtype) * 0.1
    # the states [B, NC, H, K, V] in place of dks: (D / chunk) n D 16-bit values
    states_bytes = bwd_bytes - n * D * 2 + n * D * D // chunk * 2
    for kind in ("inverse", "inverse halves", "fused_bwd", "fused_bwd states"):
        for w in warps:
            label = f"{kind} w{w}"
            if time.time() > deadline:
                row[label] = "skipped: budget spent"
                continue
            st = wy_static(B, T, H, D, chunk, True, w)
            if kind.startswith("inverse"):  # by block substitution, or by halves
                st = dataclasses.replace(st, inverse_halves=kind.endswith("halves"))
                fn = jax.jit(lambda k, b, g, st=st: pallas_wy.wy_inverse(st, k, b, g))
                args, nbytes = (k, beta, g), inv_bytes
            elif kind == "fused_bwd":
                fn = jax.jit(lambda *a, st=st: pallas_wy.wy_fused_backward(st, *a))
                args, nbytes = (k, v, beta, g, vn, dy, dks, dk_core), bwd_bytes
            else:  # the default form since 2026-12-06 (mosaic_delta.DKS_IN_WY)
                fn = jax.jit(lambda *a, st=st: pallas_wy.wy_fused_backward(
                    st, *a[:6], None, a[7], states=a[6]))
                args, nbytes = (k, v, beta, g, vn, dy, states, dk_core), states_bytes
            try:
                ms = kg.host_time(lambda i, fn=fn, args=args: fn(*args), kg.jax_sync,
                                  repeats=repeats, n_sets=1)["ms"]
                row[label] = {"ms": ms, "GB": nbytes / 1e9, "TB_s": nbytes / ms / 1e9}
            except Exception as e:  # noqa: BLE001
                row[label] = {"error": kg.short_error(e)}
            kg.log(f"  fused {shape} {label:16s} {row[label]}")
            save()


@contextlib.contextmanager
def preparation(low_wu: bool, warps: int | None, split_x: bool = False):
    """The api's delta-rule backends build their ``WyStatic`` with these settings (``warps``
    None: theirs)."""
    real = WY_STATIC

    def make(**kw):
        kw.update(low_wu=low_wu, split_x=split_x)
        if warps is not None:
            kw["num_warps"] = warps
        return real(**kw)

    # pallas_ops binds the name at import, mosaic_ops imports it from pallas_wy per call
    pallas_ops.WyStatic = pallas_wy.WyStatic = make
    try:
        yield
    finally:
        pallas_ops.WyStatic = pallas_wy.WyStatic = real


def op_rows(shape: tuple[int, int, int, int], variants: list[tuple], repeats: int,
            deadline: float, results: dict, save, check_shape: tuple[int, ...],
            check_cu: tuple[int, ...]) -> None:
    """The whole op per backend and preparation: times, then the checks."""
    row: dict[str, Any] = {}
    results["op"][str(shape)] = row
    for backend in ("mosaic", "pallas"):
        for name, low_wu, warps, split_x in variants:
            label = f"{backend} {name}"
            if time.time() > deadline:
                row[label] = "skipped: budget spent"
                continue
            with preparation(low_wu, warps, split_x):
                row[label] = kg.time_ln("gated_delta_rule", shape, repeats, None,
                                        results["env"].get("l2_bytes", 50 * 2 ** 20),
                                        backend=backend)
            entry = row[label]
            kg.log(f"  op {shape} {label:34s} fwd {kg.fmt_ms(entry, 'fwd')} "
                   f"fwd+bwd {kg.fmt_ms(entry, 'fwd_bwd')}")
            save()
    checks: dict[str, Any] = {}
    results["checks"] = checks
    ref_cache: dict = {}
    for backend in ("mosaic", "pallas"):
        for name, low_wu, warps, split_x in variants:
            for case in ("dense", "packed"):
                label = f"{backend} {name} {case}"
                if time.time() > deadline:
                    checks[label] = "skipped: budget spent"
                    continue
                with preparation(low_wu, warps, split_x):
                    try:
                        checks[label] = kg.check_linear(
                            "gated_delta_rule", "bfloat16", case, jax.random.PRNGKey(3),
                            check_shape, check_cu, None, ref_cache, backend=backend)
                    except Exception as e:  # noqa: BLE001
                        checks[label] = {"status": "ERROR", "error": kg.short_error(e)}
                c = checks[label]
                worst = max(c.get("errors", {"-": float("nan")}).items(), key=lambda kv: kv[1])
                kg.log(f"  check {label:40s} {c['status']} worst {worst[0]} {worst[1]:.2e}")
                save()


def fla_child(shapes: list[tuple[int, ...]], out_file: str, repeats: int) -> None:
    """FLA 0.6.0's preparation kernels and whole op, timed the same way (this process has
    torch and FLA only)."""
    import torch
    import triton.testing as triton_testing
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    out: dict[str, Any] = {}
    sync = lambda o: torch.cuda.synchronize()  # noqa: E731
    for shape in shapes:
        B, T, H, D = shape
        row: dict[str, Any] = {}
        out[str(shape)] = row
        try:
            ins = kg.torch_inputs(torch, "gated_delta_rule", 100, B, T, H, D, D,
                                  requires_grad=False)
            gcs = chunk_local_cumsum(ins["g"], chunk_size=64, scale=RCP_LN2)
            with torch.no_grad():
                row["intra_ms"] = kg.host_time(lambda i, ins=ins, gcs=gcs: chunk_gated_delta_rule_fwd_intra(
                    k=ins["k"], v=ins["v"], g=gcs, beta=ins["beta"]), sync, repeats=repeats,
                    n_sets=1)["ms"]
            row.update({f"op_{k}": v for k, v in kg.time_fla(
                torch, triton_testing, "gated_delta_rule", shape, repeats,
                50 * 2 ** 20).items()})
        except Exception as e:  # noqa: BLE001
            row["error"] = kg.short_error(e)
        print(json.dumps({str(shape): row}), flush=True)
    Path(out_file).write_text(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--budget", type=float, default=300.0)
    p.add_argument("--shapes", nargs="*", default=["8,4096,16,128", "8,4096,16,64"])
    p.add_argument("--skip-fla", action="store_true")
    p.add_argument("--skip-op", action="store_true")
    p.add_argument("--variants", nargs="*", default=None,
                   help="the preparation's variants to time alone (names; default all)")
    p.add_argument("--op-variants", nargs="*", default=None,
                   help="the variants to time and check through the api (default: all)")
    p.add_argument("--fused-warps", nargs="*", type=int, default=None,
                   help="time the fused gradient's WY kernels alone (wy_inverse, "
                        "wy_fused_backward) at these warp counts, first")
    p.add_argument("--quick", action="store_true", help="the CPU: a tiny shape, interpreted")
    p.add_argument("--fla-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in a.shapes]
    repeats = 3 if a.quick else 5
    if a.fla_child:
        fla_child(shapes, a.fla_child, repeats)
        return
    start = time.time()
    deadline = start + a.budget
    out_dir = Path(a.out or "/tmp/wy_profile")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"env": {"jax": jax.__version__,
                                       "devices": [d.device_kind for d in jax.devices()],
                                       "date_utc": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                 time.gmtime())},
                               "wy": {}, "op": {}, "fla": {}, "fused": {}}
    if a.quick:
        shapes, check_shape, check_cu = [(1, 128, 2, 32)], (1, 100, 2, 32), (0, 30, 100)
    else:
        check_shape, check_cu = (2, 1000, 4, 128), kg.CHECK_CU_GPU

    def save() -> None:
        (out_dir / "wy_profile.json").write_text(json.dumps(results, indent=1))

    if a.fused_warps:
        for shape in shapes:
            kg.log(f"== the fused gradient's WY kernels {shape}")
            fused_rows(shape, a.fused_warps, repeats, deadline, results, save)
    # FLA first, in a child, while nothing of ours holds GPU memory
    fla_budget = 0.3 * a.budget
    if not (a.skip_fla or a.quick):
        child = out_dir / "wy_profile_fla.json"
        try:
            subprocess.run([sys.executable, __file__, "--fla-child", str(child), "--shapes",
                            *a.shapes], timeout=fla_budget, check=False)
            results["fla"] = json.loads(child.read_text()) if child.exists() else {
                "error": "no output"}
        except subprocess.TimeoutExpired:
            results["fla"] = {"error": f"timed out after {fla_budget:.0f} s"}
        save()
    chosen = [v for v in VARIANTS if a.variants is None or v[0] in a.variants]
    for shape in shapes:
        kg.log(f"== WY preparation {shape}")
        profile_shape(shape, chosen, repeats, deadline, results, save)
    if not a.skip_op:
        keep = [v for v in VARIANTS if a.op_variants is None or v[0] in a.op_variants]
        kg.log(f"== the op with {[v[0] for v in keep]}")
        op_rows(shapes[0], keep, repeats, deadline, results, save, check_shape, check_cu)
    kg.log(json.dumps(results["fla"]))
    kg.log(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
