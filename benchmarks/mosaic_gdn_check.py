"""One-call GPU check of the delta rules' ``mosaic`` backend (Triton WY kernels, Mosaic GPU
forward walk and backward): numerics against the per-step reference, then speed against
the Triton ``pallas`` backend (and FLA 0.6.0 when importable), within a time budget.

    python3 benchmarks/mosaic_gdn_check.py [--out DIR] [--budget 130] [--seqs 1000 63 4096]
        [--dims 128 64] [--shape 8,4096,16,128] [--op gated_delta_rule|delta_rule] [--no-fla]
        [--check-share 0.5] [--extras-reserve 15]

On the GPU machine, FLA from the carried wheels (``.whl/``, docs: kernels_gpu.py)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    PYTHONUNBUFFERED=1 python3 benchmarks/mosaic_gdn_check.py --out $OUT

What it does, in order (a step not started when its share of ``--budget`` is spent is
skipped, and said so; the JSON is rewritten after every step, so a killed run keeps what it
finished):

1. Dispatch: the backend automatic dispatch picks for bf16 gated_delta_rule by default and
   with ``LINEARNEXUS_MOSAIC_GDN=0``.
2. Numerics, bf16 (``kernels_gpu.py``'s input recipe, metric and thresholds: outputs and
   states <= 5e-3, gradients <= 1e-2, NaN fails): ``gated_delta_rule(backend="mosaic")``
   through the api, the output, final state and the gradients of
   ``sum(o * do) + sum(ht * dht)`` w.r.t. q, k, v, g, beta (and the initial state) against
   ``backend="naive"`` (float32 inputs, highest matmul precision), with the backward
   ``--check-backward`` names (default the Mosaic kernels), at every ``--seqs`` x
   ``--dims`` (B = 2, H = 4, K = V = D), with an initial state and without one (the
   reference then runs from a zero state); then delta_rule (no gate) at T = 1000, D = 128
   with an initial state and T = 63, D = 64 without. Each check also runs the plain
   forward with the WY products in the walk (``MosaicConfig(fused_wy=True)``: ``o_fused``,
   ``ht_fused``; the gradient's forward is the separate form) and the gradient from
   ``M^{-1}`` (``MosaicConfig(fused_grad=True)``: ``dq_fg`` ... ``dh0_fg``). No new check
   starts after ``--check-share`` of the budget.
3. Speed of ``--op`` at ``--shape`` (bf16, no states): forward and forward+backward (the
   gradient of ``sum(o * do)`` w.r.t. every input) through the api for mosaic (the heuristic's
   config: the fused forward, the Mosaic backward where it fits), the gradient from
   ``M^{-1}`` (``fused_grad=True``), the forward with ``w``,
   ``u`` through HBM (``fused_wy=False``), mosaic with the Triton backward
   (``backward="pallas"``), with ``dw`` as one XLA matmul
   (``LINEARNEXUS_MOSAIC_DW_KERNEL=0``) and pallas, with ``kernels_gpu.host_time`` (host
   clock around back-to-back calls, median of 5, inputs rotated past L2); plus
   ``||mosaic - pallas|| / ||pallas||`` of the output at that shape.
4. FLA's ``chunk_gated_delta_rule`` (``chunk_delta_rule``) at the same shape and method, in
   a child process
   bounded by what is left of the budget less ``--extras-reserve`` (its first call
   autotunes); skipped when ``fla`` is not importable.
5. Extras, if time is left: mosaic at ``bwd_stages=1`` (the forward that stores the states
   under the gradient, and the reverse walk) and the plain forward at 1 and 3 stages, the
   other sides of the heuristic's choices; then each kernel alone in the chunk layout: the
   Triton WY preparation (forward, and forward + backward), the Mosaic walk at 1 and 2
   stages, plain and storing ``S_c`` / ``vn``, ``M^{-1}`` alone and the fused walk at 1-3
   stages; the Triton core backward and the Mosaic one (its reverse walk, ``dq / dk``, the
   XLA ``dw`` matmul and the ``dw`` kernel at 1-3 stages, and whole) on the stored
   residuals; and the gradient from ``M^{-1}``'s kernels (the fused walk storing ``S_c``,
   ``vn``; the reverse walk with ``M^{-1}``; its core backward whole; the Triton WY
   backward from ``dy``).

Prints a compact table; writes ``mosaic_gdn_check.json`` under ``--out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the FLA child shares the GPU

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels_gpu as kg  # noqa: E402  (input recipe, metric, thresholds, timing)

from linearnexus.kernels.base import dispatch  # noqa: E402
from linearnexus.kernels.common import mosaic_bwd, mosaic_delta  # noqa: E402
from linearnexus.kernels.common.mosaic_chunk import MosaicConfig  # noqa: E402


def ops() -> dict[str, Any]:
    from linearnexus.kernels.delta_rule import api as dr
    from linearnexus.kernels.gated_delta_rule import api as gdn

    return {"gated_delta_rule": gdn, "delta_rule": dr}


def chosen(api: Any) -> str:
    return dispatch("gated_delta_rule", api.BACKENDS, api.BACKEND_ORDER, lambda k: k.name,
                    backend=None, dtype=jnp.bfloat16)


def check(op: str, T: int, D: int, with_h0: bool, seed: int, ref_cache: dict) -> dict[str, Any]:
    """mosaic vs naive through the api at (2, T, 4, D), bf16; errors by name."""
    B, H = 2, 4
    api = ops()[op]
    fn = getattr(api, op)
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    inputs = kg.jax_inputs(op, k1, B, T, H, D, D, jnp.bfloat16)
    names = list(inputs)
    h0 = jax.random.normal(k2, (B, H, D, D), jnp.float32)
    if not with_h0:
        h0 = jnp.zeros_like(h0)
    do = jax.random.normal(k3, (B, T, H, D), jnp.float32)
    dht = jax.random.normal(k4, (B, H, D, D), jnp.float32)

    def make(backend: str, pass_h0: bool):
        def loss(args, h0, do, dht):
            o, ht = fn(*args, initial_state=h0 if pass_h0 else None, output_final_state=True,
                       backend=backend, **({"mode": "chunk"} if backend != "naive" else {}))
            return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(ht * dht), (o, ht)
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))

    args = tuple(inputs[n] for n in names)
    (g, g_h0), (o, ht) = make("mosaic", with_h0)(args, h0, do, dht)
    key = (op, T, D)
    if key not in ref_cache:  # one reference per shape: no initial state = a zero one
        ref_cache[key] = make("naive", True)
    with jax.default_matmul_precision("highest"):
        (rg, rg_h0), (ro, rht) = ref_cache[key](tuple(a.astype(jnp.float32) for a in args), h0,
                                                do, dht)
    errors = {"o": kg.rel_err(o, ro), "ht": kg.rel_err(ht, rht)}
    errors.update({f"d{n}": kg.rel_err(a, b) for n, a, b in zip(names, g, rg, strict=True)})
    if with_h0:
        errors["dh0"] = kg.rel_err(g_h0, rg_h0)
    # the plain forward with the WY products in the walk (MosaicConfig(fused_wy=True)): the
    # gradient above ran the separate form, which the fused one's gradient is
    kernel = api.BACKENDS["mosaic"]
    before, kernel.config = kernel.config, dataclasses.replace(kernel.config or MosaicConfig(),
                                                               fused_wy=True)
    try:
        fo, fht = jax.jit(lambda a, h: fn(*a, initial_state=h if with_h0 else None,
                                          output_final_state=True, backend="mosaic",
                                          mode="chunk"))(args, h0)
    finally:
        kernel.config = before
    errors["o_fused"], errors["ht_fused"] = kg.rel_err(fo, ro), kg.rel_err(fht, rht)
    # the gradient from M^{-1} too (MosaicConfig(fused_grad=True)): every gradient again,
    # in a try of its own (new kernels: a failure there keeps the default form's errors)
    grads = {f"d{n}" for n in names} | {"dh0"}
    fg_error = None
    kernel.config = MosaicConfig(backward="mosaic", fused_wy=True, fused_grad=True)
    try:
        (fg, fg_h0), _ = make("mosaic", with_h0)(args, h0, do, dht)
        errors.update({f"d{n}_fg": kg.rel_err(a, b) for n, a, b in zip(names, fg, rg,
                                                                         strict=True)})
        if with_h0:
            errors["dh0_fg"] = kg.rel_err(fg_h0, rg_h0)
        grads |= {f"{n}_fg" for n in grads}
    except Exception as e:  # noqa: BLE001 - reported in the row
        fg_error = kg.short_error(e)
    finally:
        kernel.config = before
    ok, bad = kg.judge(errors, grads, "bfloat16")
    row = {"op": op, "T": T, "D": D, "h0": with_h0, "status": "PASS" if ok else "FAIL",
           "failed": bad, "errors": errors}
    if fg_error is not None:
        row.update(status="FAIL", fused_grad_error=fg_error)
    return row


def time_backend(op: str, shape: tuple[int, ...], backend: str, config: MosaicConfig | None,
                 sets: list, n_sets: int, do: Any, fwd_only: bool = False) -> dict[str, Any]:
    """``op`` through the api on ``backend`` at ``config``: ``mosaic_config_gpu.time_config``."""
    import mosaic_config_gpu

    return mosaic_config_gpu.time_config(op, shape, config, sets, n_sets, do, fwd_only,
                                         backend=backend)


def time_kernels(shape: tuple[int, ...], sets: list, n_sets: int) -> dict[str, float]:
    """Each kernel of the mosaic forward and backward alone, in the chunk layout (T a
    multiple of 64, D a power of two >= 64): the Triton WY preparation (and its forward +
    backward), the Mosaic walk at 1 and 2 pipeline stages, plain and storing ``S_c`` and
    ``vn`` (the gradient's forward); the fused form's two kernels (``M^{-1}`` alone, the
    walk forming ``vn`` at 1-3 stages); then the two backwards of the core on the stored
    residuals: the Triton one (``pallas_chunk._core_bwd``: dv, dh, dq / dk) and the Mosaic
    one's parts (the reverse walk with ``w``, ``dq / dk``, the XLA ``dw`` matmul) and whole
    (``mosaic_bwd.mosaic_delta_backward``). Median ms."""

    from linearnexus.kernels.common import mosaic_bwd, mosaic_chunk
    from linearnexus.kernels.common.pallas import interpret_mode
    from linearnexus.kernels.common.pallas_chunk import (
        CoreStatic,
        _core_bwd,
        batch_layout_info,
        in_chunk_cumsum,
    )
    from linearnexus.kernels.common.pallas_wy import (
        WyStatic,
        wy_fused_backward,
        wy_inverse,
        wy_prepare,
    )

    B, T, H, D = shape
    L = 64
    wst = WyStatic(gated=True, rows=B, n_chunks=T // L, chunk=L, heads=H, key_dim=D,
                   value_dim=D, exact=False, num_warps=4, interpret=interpret_mode())
    core = CoreStatic(gate="scalar", delta=True, has_h0=False, scale=D ** -0.5, rows=B,
                      n_chunks=T // L, chunk=L, heads=H, key_dim=D, value_dim=D, n_seqs=B,
                      block_k=D, block_v=64, num_warps=4, num_stages=2, interpret=interpret_mode(),
                      packed=False)
    base = mosaic_chunk.MosaicStatic(core=core, block_v=64, stages=1, backward="pallas")
    # inputs: q, k, v, g, beta -> the walk's q, k, u, w, b (WY once per input set)
    wy = jax.jit(lambda q, k, v, g, beta: wy_prepare(wst, k, v, beta, g))
    walk_in = [(s[0], s[1], *wy(*s)[:2], in_chunk_cumsum(s[3], L)) for s in sets]
    out: dict[str, float] = {}

    def timed(name: str, call) -> None:
        try:
            out[name] = kg.host_time(call, kg.jax_sync, repeats=5, n_sets=n_sets)["ms"]
        except Exception as e:  # noqa: BLE001
            out[name] = float("nan")
            kg.log(f"  {name}: {kg.short_error(e)}")

    timed("WY preparation (Triton)", lambda i: wy(*sets[i % n_sets]))
    for stored in (False, True):
        for stages in (1, 2):
            st = dataclasses.replace(base, stages=stages, bwd_stages=stages)
            f = jax.jit(lambda q, k, w, u, b, st=st, stored=stored: mosaic_chunk.mosaic_forward(
                st, q, k, u, b, None, w=w, store_states=stored))
            timed(f"walk{' storing S_c, vn' if stored else ''} stages={stages}",
                  lambda i, f=f: f(*walk_in[i % n_sets]))
    # the fused form (MosaicConfig.fused_wy): M^{-1} alone, then the walk that forms vn
    minv_st = dataclasses.replace(wst, minv_only=True)
    inv = jax.jit(lambda k, g, beta: wy_inverse(minv_st, k, beta, g))
    timed("WY M^{-1} only (Triton)", lambda i: inv(*(sets[i % n_sets][j] for j in (1, 3, 4))))
    fused_in = [(s[0], s[1], s[2], in_chunk_cumsum(s[3], L), inv(s[1], s[3], s[4]), s[4])
                for s in sets]
    for stages in (1, 2, 3):
        st = dataclasses.replace(base, stages=stages, fused_wy=True)
        f = jax.jit(lambda q, k, v, b, m, beta, st=st: mosaic_chunk.mosaic_forward(
            st, q, k, v, b, None, minv=m, beta=beta))
        timed(f"walk fused_wy stages={stages}", lambda i, f=f: f(*fused_in[i % n_sets]))

    def wy_loss(q, k, v, g, beta):
        w, u, _ = wy_prepare(wst, k, v, beta, g)
        return jnp.sum(w.astype(jnp.float32)) + jnp.sum(u.astype(jnp.float32))

    wy_grad = jax.jit(jax.grad(wy_loss, argnums=(1, 2, 3, 4)))
    timed("WY preparation forward + backward (Triton)", lambda i: wy_grad(*sets[i % n_sets]))

    # the backward on the stored residuals (the default bwd_stages: the deepest that fit)
    st = dataclasses.replace(base, backward="mosaic")
    store = jax.jit(lambda q, k, w, u, b: mosaic_chunk.mosaic_forward(
        st, q, k, u, b, None, w=w, store_states=True))
    do = jax.random.normal(jax.random.PRNGKey(5), (B, T, H, D), jnp.float32).astype(jnp.bfloat16)
    dfinal = jnp.zeros((B, H, D, D), jnp.float32)
    res = []
    for q, k, w, u, b in walk_in:
        _, final, h, vn = store(q, k, w, u, b)
        res.append((q, k, w, u, b, h, vn, final))
    seq_info, flags = batch_layout_info(B, T // L)
    triton = jax.jit(lambda q, k, w, u, b, h, vn, final: _core_bwd(
        core, (q, k, u, w, b, None, seq_info, flags, h, vn, final), (do, dfinal)))
    timed("core backward, Triton (dv, dh, dq / dk)", lambda i: triton(*res[i % n_sets]))
    gates = jax.jit(lambda b: mosaic_chunk.gate_rows(b, L, D))
    rev = jax.jit(lambda q, k, w, b: mosaic_bwd.run_state_grad(st, q, k, do, gates(b), dfinal,
                                                               w=w))
    timed("Mosaic reverse walk with w", lambda i: rev(*(res[i % n_sets][j] for j in (0, 1, 2, 4))))
    rev_out = [rev(r[0], r[1], r[2], r[4]) for r in res]
    dqk = jax.jit(lambda q, k, vn, h, dh, b: mosaic_bwd.run_dqk(st, q, k, vn, do, h, dh, gates(b)))
    timed("Mosaic dq / dk", lambda i: dqk(res[i % n_sets][0], res[i % n_sets][1],
                                          res[i % n_sets][6], res[i % n_sets][5],
                                          rev_out[i % n_sets][1], res[i % n_sets][4]))

    def dw_xla(dvn, h):
        dvn_c = dvn.reshape(B, T // L, L, H, D)  # [R, TP, H, V] -> [R, NC, L, H, V]
        # [R, NC, L, H, V] x [R, NC, H, K, V] -> [R, NC, L, H, K]
        return jnp.einsum("rclhv,rchkv->rclhk", dvn_c, h, preferred_element_type=jnp.float32)

    dw = jax.jit(dw_xla)
    timed("dw = -dvn S_c^T (XLA)", lambda i: dw(rev_out[i % n_sets][0], res[i % n_sets][5]))
    for stages in (1, 2, 3):  # the same product in the Mosaic kernel (the default)
        dwk = jax.jit(lambda dvn, h, stages=stages: mosaic_bwd.run_dw(st, dvn, h, stages))
        timed(f"dw kernel (Mosaic) stages={stages}",
              lambda i, f=dwk: f(rev_out[i % n_sets][0], res[i % n_sets][5]))
    whole = jax.jit(lambda q, k, w, u, b, h, vn, final: mosaic_bwd.mosaic_delta_backward(
        st, q, k, w, b, h, vn, do, dfinal))
    timed("core backward, Mosaic (whole)", lambda i: whole(*res[i % n_sets]))

    # the gradient from M^{-1} (MosaicConfig.fused_grad): the fused walk storing S_c and vn,
    # the reverse walk with M^{-1} (dy = M^{-T} dvn), the core backward whole (with dq / dk
    # and the dks kernel) and the Triton WY backward from dy
    fst = dataclasses.replace(base, backward="mosaic", fused_wy=True, fused_grad=True)
    fstore = jax.jit(lambda q, k, v, b, m, beta: mosaic_chunk.mosaic_forward(
        fst, q, k, v, b, None, minv=m, beta=beta, store_states=True))
    timed("walk fused_wy storing S_c, vn", lambda i: fstore(*fused_in[i % n_sets]))
    try:  # (new kernels: a failure here must not lose the timings above)
        fres = [(*x, *fstore(*x)[2:]) for x in fused_in]  # q, k, v, b, minv, beta, h, vn
    except Exception as e:  # noqa: BLE001
        kg.log(f"  the gradient from M^{{-1}}'s residuals: {kg.short_error(e)}")
        return out
    frev = jax.jit(lambda q, k, b, m, beta: mosaic_bwd.run_state_grad(
        fst, q, k, do, gates(b), dfinal, minv=m, beta=beta))
    timed("Mosaic reverse walk with M^{-1}",
          lambda i: frev(*(fres[i % n_sets][j] for j in (0, 1, 3, 4, 5))))
    fwhole = jax.jit(lambda q, k, v, b, m, beta, h, vn: mosaic_bwd.mosaic_delta_fused_backward(
        fst, q, k, m, beta, b, h, vn, do, dfinal))
    timed("core backward from M^{-1}, Mosaic (whole)", lambda i: fwhole(*fres[i % n_sets]))
    try:
        core_out = [fwhole(*x) for x in fres]  # dq, dk, dy, dks, dv (None), dg, dh0
    except Exception as e:  # noqa: BLE001
        kg.log(f"  the gradient from M^{{-1}}'s core backward: {kg.short_error(e)}")
        return out
    wyb = jax.jit(lambda k, v, beta, g, vn, dy, dks, dkc: wy_fused_backward(
        wst, k, v, beta, g, vn, dy, dks, dkc))
    timed("WY backward from dy (Triton)", lambda i: wyb(
        sets[i % n_sets][1], sets[i % n_sets][2], sets[i % n_sets][4], sets[i % n_sets][3],
        fres[i % n_sets][7], core_out[i % n_sets][2], core_out[i % n_sets][3],
        core_out[i % n_sets][1]))
    return out


def fla_child(shape: tuple[int, ...], out_file: str, op: str = "gated_delta_rule") -> None:
    """(child process) FLA's ``chunk_<op>`` fwd and fwd+bwd at ``shape``."""
    import torch
    import triton.testing as triton_testing

    env = kg.environment(torch)
    notes = []
    if kg.unlock_fla_gated_backward(env):  # as kernels_gpu.py: timing only (FLA issue #640)
        notes.append("fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 forced True (timing only)")
    l2 = int((env.get("l2_cache_mib") or 50) * 2 ** 20)
    res = kg.time_fla(torch, triton_testing, op, shape, 5, l2)
    res["notes"] = notes
    res["versions"] = {k: env.get(k) for k in ("torch", "triton", "fla_core",
                                               "flash_linear_attention")}
    Path(out_file).write_text(json.dumps(res, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget", type=float, default=130.0,
                        help="seconds; steps not started by then are skipped")
    parser.add_argument("--seqs", nargs="+", type=int, default=[1000, 63, 4096])
    parser.add_argument("--dims", nargs="+", type=int, default=[128, 64])
    parser.add_argument("--shape", default="8,4096,16,128")
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--check-backward", choices=["mosaic", "pallas"], default="mosaic",
                        help="the backward the numerics checks run (MosaicConfig.backward)")
    parser.add_argument("--check-share", type=float, default=0.5,
                        help="share of the budget after which no new check starts")
    parser.add_argument("--extras-reserve", type=float, default=15.0,
                        help="seconds FLA leaves for the extra timings after it")
    parser.add_argument("--op", choices=["gated_delta_rule", "delta_rule"],
                        default="gated_delta_rule",
                        help="the op the speed steps time (the checks run both)")
    parser.add_argument("--fla-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    if args.fla_child:
        fla_child(shape, args.fla_child, args.op)
        return
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"env": kg.environment(None), "args": vars(args), "checks": [],
                               "timing": {}, "skipped": []}

    def save() -> None:
        (out_dir / "mosaic_gdn_check.json").write_text(json.dumps(results, indent=1, default=str))

    gdn = ops()["gated_delta_rule"]
    before = chosen(gdn)
    os.environ[mosaic_delta.OPT_IN_ENV] = "0"
    after = chosen(gdn)
    del os.environ[mosaic_delta.OPT_IN_ENV]
    results["dispatch"] = {"default": before, "kept_out": after}
    kg.log(f"{results['env'].get('gpu')} jax {jax.__version__}; dispatch bf16: {before}, "
           f"with {mosaic_delta.OPT_IN_ENV}=0: {after}")

    cases = [("gated_delta_rule", T, D, h0) for D in args.dims for T in args.seqs
             for h0 in (True, False)]
    cases += [("delta_rule", 1000, 128, True), ("delta_rule", 63, 64, False)]
    ref_cache: dict = {}
    checks_until = t0 + args.check_share * args.budget  # leave the rest to the timing
    for i, (op, T, D, h0) in enumerate(cases):
        label = f"{op} T={T} D={D} h0={'yes' if h0 else 'no'}"
        if time.perf_counter() > checks_until:
            results["skipped"].append(f"check {label}: budget spent")
            continue
        kernel = ops()[op].BACKENDS["mosaic"]
        before, kernel.config = kernel.config, MosaicConfig(backward=args.check_backward)
        try:
            row = check(op, T, D, h0, 9000 + i, ref_cache)
        except Exception as e:  # noqa: BLE001 - report it and go on
            row = {"op": op, "T": T, "D": D, "h0": h0, "status": "ERROR",
                   "error": kg.short_error(e)}
        finally:
            kernel.config = before
        row["backward"] = args.check_backward
        results["checks"].append(row)
        errs = " ".join(f"{n}={e:.1e}" for n, e in row.get("errors", {}).items())
        kg.log(f"{row['status']:5s} {label}: {errs or row.get('error', '')}"
               f"  [{time.perf_counter() - t0:.0f} s]")
        save()

    B, T, H, D = shape
    op = args.op
    n_sets = kg.input_sets(kg.input_bytes(op, B, T, H, D, D), 60 * 2 ** 20)
    sets = [tuple(kg.jax_inputs(op, jax.random.PRNGKey(100 + i), B, T, H, D, D,
                                jnp.bfloat16).values()) for i in range(n_sets)]
    do = jax.random.normal(jax.random.PRNGKey(99), (B, T, H, D), jnp.float32).astype(jnp.bfloat16)
    outs = {}

    def timing(label: str, backend: str, config: MosaicConfig | None,
               fwd_only: bool = False) -> None:
        if time.perf_counter() > deadline:
            results["skipped"].append(f"timing {label}: budget spent")
            return
        try:
            res = time_backend(op, shape, backend, config, sets, n_sets, do, fwd_only)
            outs[label] = res.pop("o")
            results["timing"][label] = res
            both = "" if fwd_only else f", fwd+bwd {res['fwd_bwd']['ms']:.3f} ms"
            kg.log(f"{label}: fwd {res['fwd']['ms']:.3f} ms{both}"
                   f"  [{time.perf_counter() - t0:.0f} s]")
        except Exception as e:  # noqa: BLE001
            results["timing"][label] = {"error": kg.short_error(e)}
            kg.log(f"{label}: {kg.short_error(e)}")
        save()

    timing("mosaic", "mosaic", None)  # the heuristic: fused_wy forward, Mosaic backward
    if mosaic_delta.delta_backward_fits(key_dim=D, value_dim=D):  # no w, u in the gradient
        timing("mosaic fused_grad=True", "mosaic",
               MosaicConfig(backward="mosaic", fused_wy=True, fused_grad=True))
    timing("mosaic fused_wy=False", "mosaic", MosaicConfig(fused_wy=False), fwd_only=True)
    timing("mosaic bwd=pallas", "mosaic", MosaicConfig(backward="pallas"))
    os.environ[mosaic_bwd.DW_KERNEL_ENV] = "0"  # dw = -dvn S_c^T as one XLA matmul
    timing("mosaic dw in XLA", "mosaic", None)
    del os.environ[mosaic_bwd.DW_KERNEL_ENV]
    timing("pallas", "pallas", None)
    for label in ("mosaic", "mosaic fused_wy=False"):
        if label in outs and "pallas" in outs:
            err = results[f"{label} vs pallas o"] = kg.rel_err(outs[label], outs["pallas"])
            kg.log(f"||o ({label}) - o_pallas|| / ||o_pallas|| = {err:.2e}")
    outs.clear()

    # FLA before the extras: its ratio is the measure; it may take what is left but
    # the extras' reserve (its first call autotunes)
    left = deadline - time.perf_counter() - args.extras_reserve
    if args.no_fla or importlib.util.find_spec("fla") is None:
        results["skipped"].append("FLA: --no-fla or not importable")
    elif left < 15:
        results["skipped"].append(f"FLA: {left:.0f} s of the budget left")
    else:
        child = out_dir / "fla_child.json"
        try:
            subprocess.run([sys.executable, __file__, "--shape", args.shape, "--op", op,
                            "--fla-child",
                            str(child)], timeout=left, check=True)
            results["timing"]["fla"] = json.loads(child.read_text())
            fla = results["timing"]["fla"]
            kg.log(f"FLA: fwd {fla.get('fwd', {}).get('ms', float('nan')):.3f} ms, fwd+bwd "
                   f"{fla.get('fwd_bwd', {}).get('ms', float('nan')):.3f} ms "
                   f"{fla.get('error', '')}  [{time.perf_counter() - t0:.0f} s]")
        except subprocess.TimeoutExpired:
            results["skipped"].append(f"FLA: not done within the {left:.0f} s left (autotuning)")
        except Exception as e:  # noqa: BLE001
            results["timing"]["fla"] = {"error": kg.short_error(e)}
        save()

    timing("mosaic bwd_stages=1", "mosaic", MosaicConfig(bwd_stages=1))
    for stages in (1, 3):
        timing(f"mosaic stages={stages}", "mosaic", MosaicConfig(stages=stages), fwd_only=True)
    if time.perf_counter() > deadline - 10:
        results["skipped"].append("kernels alone: budget spent")
    elif op != "gated_delta_rule":
        results["skipped"].append("kernels alone: gated_delta_rule only")
    elif T % 64 or D not in (64, 128):
        results["skipped"].append("kernels alone: T not a multiple of 64 or D not 64 / 128")
    else:
        results["kernels_ms"] = time_kernels(shape, sets, n_sets)
        kg.log("kernels alone: " + ", ".join(f"{n} {t:.3f} ms"
                                              for n, t in results["kernels_ms"].items()))
    results["elapsed_s"] = round(time.perf_counter() - t0, 1)
    save()
    print_table(results, shape)


def print_table(results: dict[str, Any], shape: tuple[int, ...]) -> None:
    checks = results["checks"]
    passed = sum(r["status"] == "PASS" for r in checks)
    kg.log(f"\nchecks: {passed}/{len(checks)} PASS"
           + "".join(f"\n  {r['status']} {r['op']} T={r['T']} D={r['D']} h0={r['h0']} "
                     f"{r.get('failed') or r.get('error', '')} {r.get('fused_grad_error', '')}"
                     for r in checks if r["status"] != "PASS"))
    timing = results["timing"]
    fla = timing.get("fla", {})
    kg.log(f"\n| {shape} bf16 | fwd ms | fwd+bwd ms | fwd / FLA | fwd+bwd / FLA |")
    kg.log("| --- | --- | --- | --- | --- |")
    for label, row in timing.items():
        if "error" in row or "fwd" not in row:
            kg.log(f"| {label} | {row.get('error', row.get('status', '-'))[:80]} | | | |")
            continue
        cells = []
        for part in ("fwd", "fwd_bwd"):
            ref = fla.get(part, {}).get("ms")
            cells.append(f"{row[part]['ms'] / ref:.2f}x" if ref and part in row else "-")
        both = f"{row['fwd_bwd']['ms']:.3f}" if "fwd_bwd" in row else "-"
        kg.log(f"| {label} | {row['fwd']['ms']:.3f} | {both} | {cells[0]} | {cells[1]} |")
    for s in results["skipped"]:
        kg.log(f"skipped: {s}")
    kg.log(f"elapsed {results['elapsed_s']} s")


if __name__ == "__main__":
    main()
