"""The fused one-token layer kernels at batch 64, against a copy of the same bytes.

    python3 benchmarks/layer_b64_gpu.py [--batch 64] [--json FILE]
    python benchmarks/layer_b64_gpu.py --quick        # CPU smoke test (interpret mode)

At batch 64 the recurrent state is most of a decode step's bytes (Mamba2 ~200M-class
layer: ``[64, 32, 64, 64]`` float32, 33.5 MB read and written per layer), so how near the
layer kernel runs to the memory's rate decides the step. Each variant is timed as the
decode loop calls it: the state carried through a jitted ``fori_loop`` and updated in
place, four states (and conv caches) in turn so that one call's state is not in the 50 MB
L2 from the call before (4 x 33.5 MB). Per call ``c`` from loops of ``U = 4`` and ``8``
calls an iteration: ``t_U = c + o / U`` with ``o`` the loop iteration's own cost, so
``c = 2 t_8 - t_4``; the median of 5 loops each.

Variants (``name``: what runs): ``copy_pallas`` (a Pallas kernel over the layer kernel's
grid and tiles scaling the state in place: the same bytes and tiling, no other work: the
rate to beat), then the Mamba2 and
Gated DeltaNet layer kernels (with their short conv, as batch > 1 runs them) at value
blocks ``vb`` (programs per head), warps ``w`` (none: the library's choice) and the
state's dtype (``bf16``: a 16-bit state); then the one-token kernels of the other blocks
(GLA's and Simple GLA's ``linear_step``, the Mamba-1 step) at their warps and at 2 and 4.
Each line: us per call and GB/s over the state's read and write.

Read the numbers against each other, not against the memory's peak: on an H100 the copy
came out at 4.8 TB/s (over the HBM's 3.35), so part of the four states stays in L2 or
the two loops' difference under-counts; the ranking of variants of the same bytes is what
the script is for. (XLA's own scaling is not a reference here: it folds the unrolled
calls' multiplies of one state into one pass.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import loop_time  # noqa: E402

import linearnexus.kernels.common.pallas as common_pallas  # noqa: E402
import linearnexus.kernels.common.pallas_step as step_kernels  # noqa: E402
import linearnexus.kernels.fused_decode.pallas as layer_kernels  # noqa: E402
import linearnexus.kernels.mamba.step as mamba_step  # noqa: E402
from linearnexus.kernels.common.pallas import compiler_params, interpret_mode  # noqa: E402
from linearnexus.kernels.common.pallas_step import StepSpec  # noqa: E402
from linearnexus.kernels.fused_decode.pallas import DeltaLayerSpec, SsdLayerSpec  # noqa: E402

BF16 = jnp.bfloat16
F32 = jnp.float32
STATES = 4  # buffers in turn: 4 x 33.5 MB outgrow the L2


def _loop_time(fn, carry, iters: int, unroll: int, repeats: int) -> float:
    """Seconds per iteration of ``iters`` iterations, each ``unroll`` calls of ``fn(carry,
    i) -> carry`` with ``i`` the call's place (its state is ``i % STATES``)."""

    def body(_, c):
        for u in range(unroll):
            c = fn(c, u % STATES)
        return c

    return loop_time(body, carry, iters=iters, repeats=repeats)


def per_call_us(fn, make_carry, iters: int, repeats: int) -> float:
    """``c = 2 t_8 - t_4`` (module docstring), in microseconds per call."""
    t4 = _loop_time(fn, make_carry(), iters, 4, repeats) / 4
    t8 = _loop_time(fn, make_carry(), iters, 8, repeats) / 8
    return (2 * t8 - t4) * 1e6


@contextlib.contextmanager
def _warps(n: int | None):
    """Every kernel launched inside takes ``n`` warps (the layer kernels, the linear ops'
    step kernel and the Mamba-1 step, whichever name of ``compiler_params`` they call;
    None: their own choice)."""
    owners = (layer_kernels, step_kernels, common_pallas)
    saved = [o.compiler_params for o in owners]
    if n is not None:
        for owner in owners:
            owner.compiler_params = lambda _w, stages: compiler_params(n, stages)
    try:
        yield
    finally:
        for owner, fn in zip(owners, saved, strict=True):
            owner.compiler_params = fn


def _copy_kernel(s_ref, o_ref):
    o_ref[...] = (s_ref[...].astype(F32) * 0.999).astype(o_ref.dtype)


def copy_pallas(state: jax.Array, blocks: int, warps: int) -> jax.Array:
    """``state [B, H, N, P] * 0.999`` in place, one program per ``(b, h, value block)``."""
    b, h, n, p = state.shape
    bp = p // blocks
    spec = pl.BlockSpec((None, None, n, bp), lambda i, j, k: (i, j, 0, k))
    return pl.pallas_call(
        _copy_kernel, out_shape=jax.ShapeDtypeStruct(state.shape, state.dtype),
        grid=(b, h, blocks), in_specs=[spec], out_specs=spec, input_output_aliases={0: 0},
        interpret=interpret_mode(),
        compiler_params=None if interpret_mode() else compiler_params(warps, 1))(state)


def variants(batch: int, quick: bool) -> dict[str, tuple]:
    """``{name: (fn(carry, i) -> carry, make_carry, state bytes read + written)}``."""
    ks = (jax.random.fold_in(jax.random.key(0), i) for i in itertools.count())
    out: dict[str, tuple] = {}
    mh = 2 if quick else 32
    msp = SsdLayerSpec(heads=mh, head_dim=64, groups=1, d_state=64, conv_width=4,
                       d_per_channel=False, dt_limit=None)
    mproj = jax.random.normal(next(ks), (batch, msp.width), F32).astype(BF16)
    mw = jax.random.normal(next(ks), (4, msp.conv_channels), F32).astype(BF16) * 0.3
    mzero = jnp.zeros((mh,), F32)
    gh = 2 if quick else 16
    gsp = DeltaLayerSpec(heads=gh, key_dim=64, value_dim=128, conv_width=4,
                         silu_without_conv=False, gated=True, output_gate=True,
                         allow_neg_eigval=False, qk_eps=1e-6, norm_eps=1e-5, scale=0.125)
    gproj = jax.random.normal(next(ks), (batch, gsp.width), F32).astype(BF16)
    gw = jax.random.normal(next(ks), (4, gsp.qkv_width), F32).astype(BF16) * 0.3
    gzero = jnp.zeros((gh,), F32)
    scale = jnp.ones((128,), F32)

    def states(shape, dtype, cache_width):
        def make():
            key = next(ks)
            return tuple(
                ((jax.random.normal(jax.random.fold_in(key, i), shape, F32) * 0.1).astype(dtype),
                 jnp.zeros((batch, 3, cache_width), BF16)) for i in range(STATES))
        return make

    def carried(step, warps):
        """``fn(carry, i)`` running ``step(state, cache) -> (cache, state)`` on state i."""
        def fn(carry, i):
            carry = list(carry)
            s, c = carry[i]
            with _warps(warps):
                c, s = step(s, c)
            carry[i] = (s, c)
            return tuple(carry)
        return fn

    def ssd(sp, warps):
        return carried(lambda s, c: layer_kernels.ssd_layer(
            sp, mproj, c, mw, None, s, mzero, mzero, mzero)[1:], warps)

    def delta(sp, warps):
        return carried(lambda s, c: layer_kernels.delta_layer(
            sp, gproj, c, gw, None, s, gzero, gzero, scale)[1:], warps)

    def copy(blocks=1, warps=4):
        return carried(lambda s, c: (c, copy_pallas(s, blocks, warps)), None)

    for dtype, tag in ((F32, ""), (BF16, "_bf16")):
        shape = (batch, mh, 64, 64)
        nbytes = 2 * batch * mh * 64 * 64 * jnp.dtype(dtype).itemsize
        make = states(shape, dtype, msp.conv_channels)
        for blocks, warps in ((1, 4), (1, 8), (2, 4)):
            out[f"mamba2 copy_pallas{tag} vb{blocks} w{warps}"] = (copy(blocks, warps),
                                                                  make, nbytes)
        grid = ((1, None), (1, 4), (1, 8), (2, None), (2, 4), (4, None)) if not tag else (
            (1, None), (1, 4), (2, None))
        for blocks, warps in grid:
            sp = dataclasses.replace(msp, value_blocks=blocks)
            out[f"mamba2 layer{tag} vb{blocks} w{warps or '-'}"] = (ssd(sp, warps), make, nbytes)
    shape = (batch, gh, 64, 128)
    nbytes = 2 * batch * gh * 64 * 128 * 4
    make = states(shape, F32, gsp.qkv_width)
    out["gdn copy_pallas vb1 w4"] = (copy(1, 4), make, nbytes)
    for warps in (None, 4, 8):
        out[f"gdn layer vb1 w{warps or '-'}"] = (delta(gsp, warps), make, nbytes)

    # the linear ops' one-token kernel (kernels/common/pallas_step.py: GLA, Simple GLA,
    # RetNet, the delta rules outside the layer kernels) at K = V = 128, 16 heads, and the
    # Mamba-1 step (kernels/mamba/step.py: 2048 channels, N = 16; its 8.4 MB states fit the
    # L2 four times over, so its times are the L2's)
    lh, d = (2, 16) if quick else (16, 128)
    q = jax.random.normal(next(ks), (batch, lh, d), F32).astype(BF16) * 0.1
    gv = -jnp.abs(jax.random.normal(next(ks), (batch, lh, d), F32)) * 0.1
    for gate, g in (("vector", gv), ("scalar", gv[..., 0])):
        spec = StepSpec(gate, delta=False)
        name = "gla" if gate == "vector" else "simple_gla"
        shape = (batch, lh, d, d)
        nbytes = 2 * batch * lh * d * d * 4
        make = states(shape, F32, 1)
        for warps in (None, 2, 4):
            out[f"{name} step w{warps or '-'}"] = (carried(
                lambda s, c, spec=spec, g=g: (c, step_kernels._launch(  # noqa: SLF001
                    q, q, q, g, None, s, spec=spec, scale=d ** -0.5, guard=True)[1]),
                warps), make, nbytes)
    ch, n = (32, 16) if quick else (2048, 16)
    x = jax.random.normal(next(ks), (batch, ch), F32).astype(BF16)
    a = -jnp.exp(jax.random.normal(next(ks), (ch, n), F32))
    bc = jax.random.normal(next(ks), (batch, n), F32).astype(BF16)
    dvec = jnp.ones((ch,), F32)
    make = states((batch, ch, n), F32, 1)
    for warps in (None, 2, 4):
        out[f"mamba1 step w{warps or '-'}"] = (carried(
            lambda s, c: (c, mamba_step._launch(  # noqa: SLF001
                x, jnp.abs(x) * 0.1, a, bc, bc, dvec, x, s)[1]), warps), make,
            2 * batch * ch * n * 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=32)
    p.add_argument("--only", nargs="*", default=None, help="names containing one of these")
    p.add_argument("--quick", action="store_true", help="tiny shapes, interpret mode on the CPU")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.quick:
        args.iters, args.batch = 1, 2
    repeats = 1 if args.quick else 5
    print(json.dumps({"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                      "batch": args.batch, "iters": args.iters}), flush=True)
    rows = []
    for name, (fn, make, nbytes) in variants(args.batch, args.quick).items():
        if args.only and not any(o in name for o in args.only):
            continue
        try:
            us = per_call_us(fn, make, args.iters, repeats)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
            print(f"{name:34s} {type(e).__name__}: {e}"[:400], flush=True)
            continue
        print(f"{name:34s} {us:8.2f} us per call  {nbytes / max(us, 1e-9) / 1e3:7.0f} GB/s "
              f"over {nbytes / 1e6:.1f} MB", flush=True)
        rows.append({"variant": name, "us_per_call": us, "state_bytes": nbytes})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
