"""The several-row fused projection kernels (``gemv._rows_kernel``) one projection at a time,
against the same math in XLA (issue 23, batch-64 decoding).

    python3 benchmarks/rows_gpu.py --rows 16 64 --out $OUT          # on the GPU, ~60 s
    python3 benchmarks/rows_gpu.py --quick                            # CPU check (interpreter)

For each projection of the ~200M models of ``decode_gpu.py`` (d_model 1024) with the work
that batch-1 decoding folds into it, and each row count in ``--rows``:

* ``mamba2_in``: RMSNorm, ``in_proj`` (4256 columns) and the short conv over x | B | C
  (``one_row_conv``);
* ``mamba2_out``: the gated RMSNorm's norm over a float32 ``[R, 2048]`` row, then
  ``out_proj`` (``one_row_fused`` with a norm);
* ``gdn_in``: RMSNorm, the fused q | k | v | beta | decay | gate projection (6176 columns)
  and the conv over q | k | v (``one_row_conv``);
* ``gdn_o``: the per-head output norm (heads of 128) and silu gate, then ``o_proj``
  (``one_row_group_norm``);
* ``mlp_up`` / ``mlp_down``: the SwiGLU half (``one_row_fused``: the residual sum, norm,
  gate | up and activation; down and the residual sums);
* ``head``: the final norm and the tied head (8192 columns).

Each is timed as ``--steps`` dependent calls in one ``fori_loop`` (each call's input
carries the sum of the last call's outputs times zero, so the calls run one after another
as a decode step's do and XLA drops none of the reference's work; the extra elementwise
and reduction kernels are in both forms): the kernel
(``rows``) and its XLA reference (``xla``: the function the kernel's gradient uses, op by op
as the layers compute it), median of ``--repeats`` loops, ms per call, their ratio, and the
kernel's relative difference from the reference. The JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import linearnexus.kernels.fused_decode.gemv as gemv  # noqa: E402

F32, BF16 = jnp.float32, jnp.bfloat16


def cases(rows: int, quick: bool) -> dict[str, tuple]:
    """``name -> (kernel_fn, reference_fn, args)``; the first argument is the row input."""
    d = 32 if quick else 1024
    keys = iter(jax.random.split(jax.random.key(rows), 32))

    def arr(shape, dtype=BF16, scale=1.0):
        return (scale * jax.random.normal(next(keys), shape, F32)).astype(dtype)

    def norm_scale(n):
        return 1.0 + 0.1 * jax.random.normal(next(keys), (n,), F32)

    out: dict[str, tuple] = {}
    # Mamba2: d_inner 2 d, B and C 64 each, 32 heads of dt; conv over x | B | C (width 4)
    inner, state = 2 * d, (16 if quick else 64)
    conv_ch = inner + 2 * state
    width = 2 * inner + 2 * state + inner // 64  # z | x | B | C | dt
    conv = dict(conv_start=inner, transposed=True, norm_eps=1e-5)
    args = (arr((rows, d)), arr((width, d), scale=d ** -0.5), norm_scale(d),
            arr((rows, 3, conv_ch)), arr((4, conv_ch), F32, 0.5), arr((conv_ch,), F32))

    def conv_kernel(x, wt, scale, cache, cw, cb, kw=conv):
        return gemv.one_row_conv(x, wt, cache, cw, cb, norm_scale=scale, **kw)

    def conv_ref(x, wt, scale, cache, cw, cb, kw=conv):
        kw = {k: v for k, v in kw.items() if k != "transposed"}
        return gemv._conv_reference(x, wt, scale, cache, cw, cb, out_dtype=jnp.dtype(BF16),
                                    **kw)

    out["mamba2_in"] = (conv_kernel, conv_ref, args)
    fused_ref = functools.partial(gemv._fused_reference, transposed=True, glu=False,
                                  out_dtype=jnp.dtype(BF16))
    out["mamba2_out"] = (
        lambda x, wt, s: gemv.one_row_fused(x, wt, transposed=True, norm_scale=s,
                                            norm_eps=1e-5),
        lambda x, wt, s: fused_ref(x, wt, None, s, None, None, norm_eps=1e-5),
        (arr((rows, inner), F32), arr((d, inner), scale=inner ** -0.5), norm_scale(inner)))
    # Gated DeltaNet: 16 heads of K 64, V 128 (q, k 1024 each, v 2048), beta and decay 16,
    # the output gate 2048; conv over q | k | v
    heads = 2 if quick else 16
    kdim, vdim = (16, 32) if quick else (64, 128)
    qkv = heads * (2 * kdim + vdim)
    g_width = qkv + 2 * heads + heads * vdim
    gconv = dict(conv_start=0, transposed=True, norm_eps=1e-5)
    out["gdn_in"] = (
        functools.partial(conv_kernel, kw=gconv), functools.partial(conv_ref, kw=gconv),
        (arr((rows, d)), arr((g_width, d), scale=d ** -0.5), norm_scale(d),
         arr((rows, 3, qkv)), arr((4, qkv), F32, 0.5), arr((qkv,), F32)))
    offset = qkv + 2 * heads
    hv = heads * vdim
    out["gdn_o"] = (
        lambda x, wt, s, g: gemv.one_row_group_norm(x, wt, group=vdim, norm_scale=s,
                                                    norm_eps=1e-5, gate=g, gate_offset=offset,
                                                    transposed=True),
        lambda x, wt, s, g: gemv._group_reference(x, wt, s, g, group=vdim, norm_eps=1e-5,
                                                  gate_offset=offset, out_dtype=jnp.dtype(BF16)),
        (arr((rows, hv)), arr((d, hv), scale=hv ** -0.5), norm_scale(vdim),
         arr((rows, g_width))))
    hidden = 96 if quick else 2752
    out["mlp_up"] = (
        lambda x, wt, a, s: gemv.one_row_fused(x, wt, transposed=True, glu=True, add=a,
                                               norm_scale=s, norm_eps=1e-5),
        lambda x, wt, a, s: gemv._fused_reference(x, wt, a, s, None, None, transposed=True,
                                                  glu=True, norm_eps=1e-5,
                                                  out_dtype=jnp.dtype(BF16)),
        (arr((rows, d)), arr((2 * hidden, d), scale=d ** -0.5), arr((rows, d)),
         norm_scale(d)))
    out["mlp_down"] = (
        lambda x, wt, r, ra: gemv.one_row_fused(x, wt, transposed=True, residual=r,
                                                residual_add=ra),
        lambda x, wt, r, ra: fused_ref(x, wt, None, None, r, ra, norm_eps=None),
        (arr((rows, hidden)), arr((d, hidden), scale=hidden ** -0.5), arr((rows, d)),
         arr((rows, d))))
    vocab = 256 if quick else 8192
    out["head"] = (
        lambda x, wt, s: gemv.one_row_fused(x, wt, transposed=True, norm_scale=s,
                                            norm_eps=1e-5),
        lambda x, wt, s: fused_ref(x, wt, None, s, None, None, norm_eps=1e-5),
        (arr((rows, d)), arr((vocab, d), scale=d ** -0.5), norm_scale(d)))
    return out


def chained(fn, steps: int):
    """``args -> scalar``: ``steps`` dependent calls of ``fn`` (module doc). Every output
    (the conv's new cache too) is summed into the carry, so XLA keeps all of the
    reference's work, as the Pallas call always does; the sums are the same extra kernels in
    both forms."""
    def run(*args):
        def body(_, carry):
            x = args[0] + (carry * 0).astype(args[0].dtype)  # a dependency, no change
            outs = fn(x, *args[1:])
            outs = outs if isinstance(outs, tuple) else (outs,)
            return carry + sum(jnp.sum(o.astype(F32)) for o in outs)
        return jax.lax.fori_loop(0, steps, body, jnp.zeros((), F32))
    return jax.jit(run)


def time_one(fn, args, steps: int, repeats: int) -> float:
    compiled = chained(fn, steps).lower(*args).compile()
    compiled(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / steps * 1e3


def rel_diff(a, b) -> float:
    a, b = (np.asarray(x, np.float32) for x in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    p.add_argument("--cases", nargs="*", default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for r in args.rows:
        if not 2 <= r <= gemv.MAX_ROWS:
            p.error(f"--rows: expected values in 2..{gemv.MAX_ROWS}, got {r}")
    if args.quick:
        args.steps, args.repeats = 2, 1
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu:  # the kernels through the Pallas interpreter
        os.environ.setdefault("LINEARNEXUS_PALLAS_INTERPRET", "1")
    rows_out = []
    for rows in args.rows:
        for name, (kernel, ref, inputs) in cases(rows, args.quick).items():
            if args.cases and name not in args.cases:
                continue
            try:
                got, want = jax.jit(kernel)(*inputs), jax.jit(ref)(*inputs)
                diff = rel_diff(got[0] if isinstance(got, tuple) else got,
                                want[0] if isinstance(want, tuple) else want)
                ms_k = time_one(kernel, inputs, args.steps, args.repeats)
                ms_x = time_one(ref, inputs, args.steps, args.repeats)
            except Exception as exc:  # report and go on (a shape this GPU cannot run)
                print(f"{name:11s} rows {rows:3d}  failed: {type(exc).__name__}: "
                      f"{str(exc)[:200]}", flush=True)
                continue
            row = {"case": name, "rows": rows, "rows_ms": ms_k, "xla_ms": ms_x,
                   "rows_over_xla": ms_k / ms_x, "rel_diff": diff}
            rows_out.append(row)
            print(f"{name:11s} rows {rows:3d}  kernel {ms_k * 1e3:8.1f} us  xla "
                  f"{ms_x * 1e3:8.1f} us  ratio {ms_k / ms_x:5.2f}  diff {diff:.1e}", flush=True)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "rows": rows_out}
    if args.out:
        path = Path(args.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "rows_gpu.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
