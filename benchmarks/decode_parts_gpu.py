"""What each kernel of a batch-1 decode step costs, alone, in a dependent loop.

    python3 benchmarks/decode_parts_gpu.py [--iters 256] [--json FILE]
    python benchmarks/decode_parts_gpu.py --quick        # CPU smoke test (interpret mode)

The decode loop runs as CUDA graphs, whose kernels the JAX profiler does not list (see
``profile_decode.py``), so this script times the parts of a step one at a time instead:
each part is called ``--iters`` times inside one jitted ``lax.fori_loop`` whose carry makes
every call depend on the previous one (as the layers of a decode step do), and the time per
call is taken from two loops: one call per iteration (``one``) and ``--unroll`` calls per
iteration (``many``, in ``iters / unroll`` iterations), as ``(unroll * many - one) /
(unroll - 1)``, which leaves out what each loop iteration costs by itself (on the H100 a
`fori_loop` iteration of one tiny fusion takes ~10 us: XLA:GPU reads the loop condition
back on the host); the median of 5 loops each. Parts, at the shapes of
``decode_gpu.py``'s ~200M models (d_model 1024, bf16):

* ``pallas_noop`` / ``xla_noop``: a Pallas kernel / an XLA fusion that adds one to a
  ``[1, 1024]`` row: what one dependent launch costs with no work;
* ``gdn_layer`` / ``mamba2_layer``: the fused one-token layer kernels
  (``kernels/fused_decode/pallas.py``: gates, state update, output norm) as batch-1
  decoding runs them (the short conv in the input projection's kernel), the state
  carried (GDN: 4 programs per head, the output norm left to ``o_proj``);
  ``gdn_layer_whole_v``: one program per head with the norm; ``*_layer_conv``: with the
  conv and its cache inside (the path before, and batch > 1);
* ``row_conv_*``: the input projections with the pre-norm and the short conv folded in
  (``gemv.one_row_conv``);
* ``row_<D>x<N>``: the one-row matmul kernel (``gemv.one_row_matmul`` over ``W^T``) at the
  GDN and Mamba2 layers' projection shapes, and the tied head (1024 x 8192), each unrolled
  call reading its own weight (16 of them: more than the 50 MB L2 holds); each call also
  runs one small XLA fusion (the next call's ``[1, D]`` row), so subtract ``xla_noop``;
  reported: the unrolled loop's time per call;
* ``*_w<n>``: the layer kernels at ``n`` warps (without: the library's choice); ``*_b64``:
  at batch 64.

Each line gives us per call and, for the matmuls, the weight bytes read per call over the
measured time (GB/s). The sum over a layer's kernels, times the layers, against
``decode_gpu.py``'s ms/step says how much of the step the kernels alone explain.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import linearnexus.kernels.fused_decode.pallas as layer_kernels  # noqa: E402
from linearnexus.kernels.common.pallas import interpret_mode  # noqa: E402
from linearnexus.kernels.fused_decode import gemv  # noqa: E402
from linearnexus.kernels.fused_decode.pallas import DeltaLayerSpec, SsdLayerSpec  # noqa: E402

BF16 = jnp.bfloat16
F32 = jnp.float32


def timed(fn, carry, iters: int, repeats: int = 5, unroll: int = 1) -> float:
    """Microseconds per call of ``carry -> carry``: ``iters`` iterations of one fori_loop,
    each calling ``fn`` ``unroll`` times in a row."""

    def body(_, x):
        for u in range(unroll):
            x = fn(x, u)
        return x

    loop = jax.jit(lambda c: jax.lax.fori_loop(0, iters, body, c))
    jax.block_until_ready(loop(carry))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(carry))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / (iters * unroll) * 1e6


def _noop_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0


def pallas_noop(x):
    """A one-program Pallas kernel adding one to ``x [1, 1024]``."""
    return pl.pallas_call(_noop_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          interpret=interpret_mode())(x)


def gdn_spec(heads: int = 16) -> DeltaLayerSpec:
    return DeltaLayerSpec(heads=heads, key_dim=64, value_dim=128, conv_width=4,
                          silu_without_conv=False, gated=True, output_gate=True,
                          allow_neg_eigval=False, qk_eps=1e-6, norm_eps=1e-5, scale=0.125)


def mamba2_spec() -> SsdLayerSpec:
    return SsdLayerSpec(heads=32, head_dim=64, groups=1, d_state=64, conv_width=4,
                        d_per_channel=False, dt_limit=None)


def _layer_parts(ks, batch: int, quick: bool, warps: tuple[int, ...]) -> dict[str, tuple]:
    """The fused layer kernels at ``batch`` rows (state and conv cache carried)."""
    out: dict[str, tuple] = {}
    suffix = "" if batch == 1 else f"_b{batch}"
    heads = 2 if quick else 16
    sp = gdn_spec(heads)
    proj = jax.random.normal(next(ks), (batch, sp.width), F32).astype(BF16)
    cache = jax.random.normal(next(ks), (batch, 3, sp.qkv_width), F32).astype(BF16)
    w = jax.random.normal(next(ks), (4, sp.qkv_width), F32).astype(BF16) * 0.3
    state = jax.random.normal(next(ks), (batch, heads, 64, 128), F32) * 0.1
    a_log = jnp.zeros((heads,), F32)
    dt_bias = jnp.zeros((heads,), F32)
    scale = jnp.ones((128,), F32)

    def gdn(carry, _u, nwarps=None):
        c, s = carry
        with _warps(nwarps):
            _, c, s = layer_kernels.delta_layer(sp, proj, c, w, None, s, a_log, dt_bias, scale)
        return c, s  # y is still computed: the kernel's one call writes all three

    msp = SsdLayerSpec(heads=2 if quick else 32, head_dim=64, groups=1, d_state=64,
                       conv_width=4, d_per_channel=False, dt_limit=None)
    mproj = jax.random.normal(next(ks), (batch, msp.width), F32).astype(BF16)
    mcache = jax.random.normal(next(ks), (batch, 3, msp.conv_channels), F32).astype(BF16)
    mw = jax.random.normal(next(ks), (4, msp.conv_channels), F32).astype(BF16) * 0.3
    mstate = jax.random.normal(next(ks), (batch, msp.heads, 64, 64), F32) * 0.1
    mh = jnp.zeros((msp.heads,), F32)

    def mamba2(carry, _u, nwarps=None):
        c, s = carry
        with _warps(nwarps):
            _, c, s = layer_kernels.ssd_layer(msp, mproj, c, mw, None, s, mh, mh, mh)
        return c, s

    # the layer kernels as the library runs them at batch 1 since the conv moved into the
    # input projection's kernel: no conv, no conv cache
    sp_nc = dataclasses.replace(sp, conv_width=None)
    msp_nc = dataclasses.replace(msp, conv_width=None)

    def gdn_nc(s, _u, nwarps=None):
        with _warps(nwarps):
            return layer_kernels.delta_layer(sp_nc, proj, None, None, None, s, a_log, dt_bias,
                                             scale)[2]

    sp_vb = dataclasses.replace(sp_nc, norm_out=False, value_blocks=4)

    def gdn_vb(s, _u, nwarps=None):  # 4 programs per head, the norm left to o_proj
        with _warps(nwarps):
            return layer_kernels.delta_layer(sp_vb, proj, None, None, None, s, a_log, dt_bias,
                                             scale)[2]

    def mamba2_nc(s, _u, nwarps=None):
        with _warps(nwarps):
            return layer_kernels.ssd_layer(msp_nc, mproj, None, None, None, s, mh, mh, mh)[2]

    for name, fn, carry in (("gdn_layer_conv", gdn, (cache, state)),
                            ("mamba2_layer_conv", mamba2, (mcache, mstate)),
                            ("gdn_layer_whole_v", gdn_nc, state), ("gdn_layer", gdn_vb, state),
                            ("mamba2_layer", mamba2_nc, mstate)):
        out[name + suffix] = (fn, carry, 0)
        for n in warps:
            out[f"{name}{suffix}_w{n}"] = (functools.partial(fn, nwarps=n), carry, 0)
    return out


def _conv_rows(ks, quick: bool, unroll: int) -> dict[str, tuple]:
    """The input projections with the pre-norm and the short conv folded in
    (``gemv.one_row_conv``), GDN's (1024 -> 6176, conv over the first 4096 columns) and
    Mamba2's (1024 -> 4256, conv over [2048, 4224)); the conv cache carried."""
    out: dict[str, tuple] = {}
    shapes = [("gdn", 1024, 6176, 0, 4096), ("mamba2", 1024, 4256, 2048, 2176)]
    if quick:
        shapes = [("gdn", 64, 96, 0, 64)]
    for name, d, n, start, c in shapes:
        wts = [(jax.random.normal(next(ks), (n, d), F32) * d ** -0.5).astype(BF16)
               for _ in range(min(unroll, 2) if quick else unroll)]
        cw = jax.random.normal(next(ks), (4, c), F32) * 0.3
        scale = jnp.ones((d,), F32)
        x0 = jax.random.normal(next(ks), (1, d), F32).astype(BF16)
        cache0 = jax.random.normal(next(ks), (1, 3, c), F32).astype(BF16)

        def mm(carry, u, wts=wts, cw=cw, scale=scale, start=start):
            x, cache = carry
            y, cache = gemv.one_row_conv(x, wts[u % len(wts)], cache, cw, None,
                                         conv_start=start, transposed=True, norm_scale=scale,
                                         norm_eps=1e-5)  # [1, N], [1, 3, C]
            return x + 0 * y[:, :1], cache

        out[f"row_conv_{name}_{d}x{n}"] = (mm, (x0, cache0), 2 * d * n)
    return out


def parts(quick: bool, warps: tuple[int, ...], unroll: int) -> dict[str, tuple]:
    """``{name: (fn(carry, u) -> carry, carry, weight bytes per call)}``; ``u`` is the
    call's place in the unrolled iteration."""
    # as many keys as the parts take: the row shapes alone take unroll + 1 each (6 x 17 at the
    # default unroll of 16), past the 64 a fixed split gave, which ended a run on the GPU
    ks = (jax.random.fold_in(jax.random.key(0), i) for i in itertools.count())
    out: dict[str, tuple] = {}
    row = jnp.zeros((1, 1024), F32)
    out["pallas_noop"] = (lambda x, _u: pallas_noop(x), row, 0)
    out["xla_noop"] = (lambda x, _u: x + 1.0, row, 0)
    for batch in (1, 2 if quick else 64):
        out.update(_layer_parts(ks, batch, quick, warps))

    shapes = [(1024, 6160), (2048, 1024), (1024, 5504), (2752, 1024), (1024, 4256),
              (1024, 8192)]
    if quick:
        shapes = [(64, 96), (96, 64)]
    for d, n in shapes:
        # one weight per unrolled call: 16 distinct weights of >= 4 MB outgrow the 50 MB L2,
        # so the unrolled calls read HBM as a decode step does
        wts = [(jax.random.normal(next(ks), (n, d), F32) * d ** -0.5).astype(BF16)
               for _ in range(min(unroll, 2) if quick else unroll)]
        x0 = jax.random.normal(next(ks), (1, d), F32).astype(BF16)

        def mm(x, u, wts=wts):
            y = gemv.one_row_matmul(x, wts[u % len(wts)], transposed=True)  # [1, N]
            return x + 0 * y[:, :1]  # [1, D] again: one small XLA fusion (see xla_noop)

        out[f"row_{d}x{n}"] = (mm, x0, 2 * d * n)
    out.update(_conv_rows(ks, quick, unroll))
    return out


class _warps:
    """Context: the layer kernels launch with ``n`` warps (patches ``compiler_params``;
    None: the library's choice)."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.saved = layer_kernels.compiler_params
        if self.n is not None:
            layer_kernels.compiler_params = lambda _warps, stages: self.saved(self.n, stages)

    def __exit__(self, *exc):
        layer_kernels.compiler_params = self.saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=256)
    p.add_argument("--warps", type=int, nargs="*", default=[1, 2, 8])
    p.add_argument("--unroll", type=int, default=16,
                   help="calls per loop iteration for the in-loop time per call")
    p.add_argument("--quick", action="store_true", help="tiny shapes, interpret mode on the CPU")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.quick:
        args.iters = 2
    gemv._compiles = lambda: True  # noqa: SLF001 - the kernel on any platform (CPU: interpreted)
    os.environ.setdefault(gemv.GEMV_ENV, "pallas")
    print(json.dumps({"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                      "iters": args.iters}), flush=True)
    rows = []
    for name, (fn, carry, nbytes) in parts(args.quick, tuple(args.warps), args.unroll).items():
        try:
            one = timed(fn, carry, args.iters, 1 if args.quick else 5)
            many = timed(fn, carry, max(1, args.iters // args.unroll), 1 if args.quick else 5,
                         unroll=args.unroll)
        except Exception as e:  # noqa: BLE001 - one failing part must not lose the others
            print(f"{name:24s} {type(e).__name__}: {e}"[:400], flush=True)
            continue
        # the loop's own cost per iteration drops out of the difference (matmuls: the
        # unrolled calls read 16 weights from HBM, the single call one weight from L2, so
        # their time is the unrolled loop's, the loop's ~1 us per call share included)
        us = (many * args.unroll - one) / (args.unroll - 1) if args.unroll > 1 else one
        if nbytes:
            us = many
        rate = f"  {nbytes / us / 1e3:7.0f} GB/s" if nbytes and us > 0 else ""
        print(f"{name:24s} {us:8.2f} us per call  (1 per iteration: {one:7.2f} us, "
              f"{args.unroll} per iteration: {many:7.2f} us){rate}", flush=True)
        rows.append({"part": name, "us_per_call": us, "us_one_per_iteration": one,
                     "us_unrolled": many, "unroll": args.unroll, "weight_bytes": nbytes})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
