"""One-row matmuls (batch-1 decoding) on a GPU: which form reads the weights near the HBM rate.

A batch-1 decode step is a chain of ``[1, D] @ [D, N]`` projections. XLA:GPU rewrites each
as a multiply and a reduce ("dot strength reduction" below ~10M matrix elements), which can
write and read back the whole product. This script times, inside one jitted
``lax.fori_loop`` so that launch cost is what a decode loop pays, a chain shaped like the
Gated DeltaNet LM of ``decode_gpu.py`` (12 layers of: input projection 1024 -> 6160, output
projection 2048 -> 1024, MLP gate | up 1024 -> 5504, down 2752 -> 1024, with the residual
adds, SwiGLU and a norm between them) with each projection computed as:

* ``xla``: ``jnp.dot`` of the one row (what the models do today);
* ``pad2`` / ``pad8``: the row padded to 2 / 8 rows, so XLA keeps a matmul (cuBLAS or its
  Triton GEMM), then row 0;
* ``xla_t``: ``jnp.dot`` over the transposed weight ``W^T [N, D]`` (XLA's multiply and
  reduce then run along contiguous rows: the ``table`` mode of the models);
* ``splitk``: a Pallas (Triton) kernel over a ``(N / BN, S)`` grid, each program one
  ``[D / S, BN]`` tile of the weight loaded at once, float32 partial sums ``[S, N]`` summed
  by XLA;
* ``cols``: a Pallas kernel, program ``j`` owns ``BN`` output columns of ``W [D, N]`` and
  walks D in ``BK``-row tiles;
* ``rowsT``: the library's Pallas kernel (``kernels/fused_decode/gemv.py``) over the
  transposed weight ``W^T [N, D]`` (contiguous rows) at other tiles: program ``j`` owns
  ``BN`` rows and walks D in ``BK``-column tiles; ``lib`` / ``lib_fused`` at its own tiles,
  without and with the layer's norms, SwiGLU and residual sums folded in.

ms per chain step against the weight bytes read once at the measured copy bandwidth (the
floor).

``--bare`` times the projections alone, back to back with no XLA op between them (each
reads the first K columns of the previous one's output: ``in`` -> ``o`` -> ``gu`` ->
``down`` per layer, no norms or residuals), to isolate what each dependent kernel costs
beyond its bytes:

* ``xla`` / ``lib``: XLA's matmul over ``W^T`` / the library's Triton kernel; both read
  the previous output's first K columns through an XLA slice, which XLA can fuse into its
  own product but runs as a separate kernel before ``lib`` (24 of the 48 projections);
* ``mgpu`` / ``mgpu_pdl``: the Mosaic GPU kernel (``kernels/fused_decode/mosaic_gemv.py``,
  activations as ``[8, D]``) launched plainly / with programmatic dependent launch, whose
  weight copies start before the previous kernel ends; ``mgpu_bk64*``: 64-wide K steps,
  up to 8 in flight; ``mgpu_wave*``: one wave of at most 132 programs of <= 64 KB of shared
  memory, so that at least two of the next kernel's programs fit beside each one (the
  default tiles' programs take up to 100 KB);
* ``lib_bn*_bk*_w*``: the Triton kernel at other tiles (``bn`` rows a program, ``bk``
  columns a step, ``w`` warps), among them one warp per row as XLA's row reduction runs.

CPU smoke test: ``python benchmarks/gemv_gpu.py --quick [--bare]`` (Pallas interpret mode,
the Mosaic kernels through JAX 0.11's Mosaic GPU interpreter; checks every variant against
``xla``, no timing claims).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import linearnexus.kernels.fused_decode.gemv as gemv  # noqa: E402
from linearnexus.kernels.common.pallas import compiler_params, interpret_mode  # noqa: E402

F32 = jnp.float32
BF16 = jnp.bfloat16


def _splitk_kernel(x_ref, w_ref, o_ref, *, depth: int, width: int, bk: int, bn: int):
    j, s = pl.program_id(0), pl.program_id(1)
    cols = j * bn + jnp.arange(bn)
    rows = s * bk + jnp.arange(bk)
    mask = (rows[:, None] < depth) & (cols[None, :] < width)
    w = plt.load(w_ref.at[pl.ds(s * bk, bk), pl.ds(j * bn, bn)], mask=mask, other=0.0)
    x = plt.load(x_ref.at[pl.ds(0, 1), pl.ds(s * bk, bk)], mask=(rows < depth)[None],
                 other=0.0)[0]  # [BK]
    part = jnp.sum(x.astype(F32)[:, None] * w.astype(F32), axis=0)  # [BN]
    plt.store(o_ref.at[pl.ds(s, 1), pl.ds(j * bn, bn)], part[None], mask=(cols < width)[None])


def splitk(x, w, *, bn: int = 32, splits: int = 4, warps: int = 4):
    """``x [1, D] @ w [D, N]`` through float32 partials ``[S, N]`` summed by XLA."""
    depth, width = w.shape
    bk = pl.next_power_of_2(-(-depth // splits))
    splits = -(-depth // bk)
    part = pl.pallas_call(
        functools.partial(_splitk_kernel, depth=depth, width=width, bk=bk, bn=bn),
        out_shape=jax.ShapeDtypeStruct((splits, width), F32),
        grid=(pl.cdiv(width, bn), splits), interpret=interpret_mode(),
        compiler_params=compiler_params(warps, 1))(x, w)
    return part.sum(0, keepdims=True).astype(x.dtype)  # [S, N] -> [1, N]


def _cols_kernel(x_ref, w_ref, o_ref, *, depth: int, width: int, bk: int, bn: int):
    j = pl.program_id(0)
    cols = j * bn + jnp.arange(bn)

    def body(i, acc):
        rows = i * bk + jnp.arange(bk)
        mask = (rows[:, None] < depth) & (cols[None, :] < width)
        w = plt.load(w_ref.at[pl.ds(i * bk, bk), pl.ds(j * bn, bn)], mask=mask, other=0.0)
        x = plt.load(x_ref.at[pl.ds(0, 1), pl.ds(i * bk, bk)], mask=(rows < depth)[None],
                     other=0.0)[0]  # [BK]
        return acc + jnp.sum(x.astype(F32)[:, None] * w.astype(F32), axis=0)  # [BN]

    acc = jax.lax.fori_loop(0, pl.cdiv(depth, bk), body, jnp.zeros((bn,), F32))
    plt.store(o_ref.at[pl.ds(0, 1), pl.ds(j * bn, bn)], acc.astype(o_ref.dtype)[None],
              mask=(cols < width)[None])


def cols(x, w, *, bn: int = 32, bk: int = 256, warps: int = 4, stages: int = 3):
    """``x [1, D] @ w [D, N]``, program ``j`` owns columns ``[j BN, (j + 1) BN)``."""
    depth, width = w.shape
    return pl.pallas_call(
        functools.partial(_cols_kernel, depth=depth, width=width, bk=bk, bn=bn),
        out_shape=jax.ShapeDtypeStruct((1, width), x.dtype),
        grid=(pl.cdiv(width, bn),), interpret=interpret_mode(),
        compiler_params=compiler_params(warps, stages))(x, w)


def rows_t(x, wt, *, bn: int = 8, bk: int = 512, warps: int = 4):
    """``x [1, D] @ wt [N, D]^T``: the library's kernel (``gemv._launch``), program ``j``
    owning rows ``[j BN, (j + 1) BN)`` of ``wt``, at the given tiles and warps."""
    return gemv._launch(x, wt, None, None, None, None, glu=False, norm_eps=None,
                        out_dtype=x.dtype, blocks=(bk, bn), warps=warps)


def xla(x, w):
    return jnp.dot(x, w)  # [1, D] @ [D, N] -> [1, N]


def padded(rows: int):
    def mm(x, w):
        xp = jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))  # [rows, D]
        return jnp.dot(xp, w)[:1]  # [rows, N] -> [1, N]
    return mm


def variants(quick: bool) -> dict[str, tuple[callable, bool]]:
    """name -> (matmul(x, w), whether it takes the transposed weight)."""
    out = {"xla": (xla, False), "pad2": (padded(2), False), "pad8": (padded(8), False),
           # XLA's matmul over the transposed table: its multiply + reduce then reduces
           # along contiguous rows (W^T [N, D])
           "xla_t": (lambda x, wt: jnp.dot(x, wt.T), True)}
    for bn, s in ((32, 4), (64, 8), (16, 2)):
        out[f"splitk_bn{bn}_s{s}"] = (functools.partial(splitk, bn=bn, splits=s), False)
    for bn, bk in ((16, 256), (32, 128), (32, 512)):
        out[f"cols_bn{bn}_bk{bk}"] = (functools.partial(cols, bn=bn, bk=bk), False)
    for bn, bk, w in ((4, 512, 4), (8, 256, 4), (2, 1024, 4), (8, 512, 8)):
        out[f"rowsT_bn{bn}_bk{bk}_w{w}"] = (functools.partial(rows_t, bn=bn, bk=bk, warps=w),
                                            True)
    # the library's kernels with their own tiles (kernels/fused_decode/gemv.py)
    out["lib"] = (lambda x, w: gemv.one_row_fused(x, w, transposed=True), True)
    out["lib_fused"] = ("fused", False)  # prologue / epilogue folded in: see chain()
    if quick:
        out = {k: v for i, (k, v) in enumerate(out.items()) if i < 3 or k.endswith(
            ("bn32_s4", "bn16_bk256", "bn4_bk512_w4", "lib", "lib_fused", "xla_t"))}
    return out


def bare_variants() -> dict[str, tuple[callable, bool]]:
    """The ``--bare`` chain's forms: name -> (matmul(x, w^T), whether x is ``[8, D]``)."""
    from linearnexus.kernels.fused_decode import mosaic_gemv as mg

    def deepest(bn: int, k: int, bks: tuple[int, ...], most: int, budget: int):
        """The tiles of ``bn`` columns with the most weight bytes in flight (then the widest
        K step) among ``bks`` and up to ``most`` stages within ``budget`` bytes, or None."""
        fits = [mg.GemvTiles(bn, bk, st) for bk in bks if k % bk == 0
                for st in range(1, min(k // bk, most) + 1)
                if mg.GemvTiles(bn, bk, st).smem_bytes() <= budget]
        return max(fits, key=lambda t: (t.stages * t.bn * t.bk, t.bk), default=None)

    def mgpu(pdl: bool, bk: int | None = None):
        def mm(x, wt):
            tiles = mg.default_tiles(*wt.shape)
            if bk is not None:  # as deep a ring of bk-wide steps as fits, up to 8
                tiles = deepest(tiles.bn, wt.shape[1], (bk,), 8, mg.SMEM_BUDGET) or tiles
            return mg.few_row_matmul(x, wt, tiles=tiles, pdl=pdl)
        return mm

    def one_wave(pdl: bool):
        """Tiles for overlap: at most 132 programs (one wave at one per SM) of at most
        64 KB of shared memory each, so the next kernel's programs fit beside them on an
        SM and PDL can start their copies early."""
        def mm(x, wt):
            n, k = wt.shape
            bn = next((b for b in range(8, 257, 8) if n % b == 0 and n // b <= 132), None)
            tiles = None if bn is None else deepest(bn, k, (256, 128, 64), mg.MAX_STAGES,
                                                    64 * 1024)
            return mg.few_row_matmul(x, wt, tiles=tiles or mg.default_tiles(n, k), pdl=pdl)
        return mm

    def sliced(mm):
        return lambda x, wt: mm(x[:, :wt.shape[1]], wt)  # [1, >= K] -> [1, K] @ [K, N]

    return {"xla": (sliced(lambda x, wt: jnp.dot(x, wt.T)), False),
            "lib": (sliced(lambda x, wt: gemv.one_row_fused(x, wt, transposed=True)), False),
            "mgpu": (mgpu(False), True), "mgpu_pdl": (mgpu(True), True),
            "mgpu_bk64": (mgpu(False, 64), True), "mgpu_bk64_pdl": (mgpu(True, 64), True),
            "mgpu_wave": (one_wave(False), True), "mgpu_wave_pdl": (one_wave(True), True),
            # the Triton kernel at other tiles (rows per program, columns per step, warps):
            # one warp per row, as XLA's row reduction runs it, and two wider tilings
            **{f"lib_bn{bn}_bk{bk}_w{w}": (sliced(functools.partial(
                rows_t, bn=bn, bk=bk, warps=w)), False)
               for bn, bk, w in ((8, 1024, 8), (4, 1024, 4), (16, 512, 8))},
            # the whole chain as one persistent kernel with grid barriers
            # (benchmarks/persistent_gemv.py): rows per tile, warps, prefetch across barriers
            **{f"persist_bn{bn}_w{w}{'_pf' if pf else ''}": (
                Persistent(bn=bn, warps=w, prefetch=pf), False)
               for bn, w, pf in ((8, 4, False), (8, 4, True), (8, 8, True), (16, 8, True),
                                 (32, 8, True))},
            # the whole chain as one Mosaic GPU kernel streaming every program's weights
            # through a ring of TMA copies across the grid barriers
            # (benchmarks/streaming_gemv.py): slots of the ring; its grid barrier in one
            # round trip through L2 (the default) or two (_two); rows per tile up to 32
            # (_bn32)
            **{f"stream_s{s}{'' if b == 'one' else '_two'}{'' if w == 16 else '_bn32'}": (
                Streaming(stages=s, barrier=b, max_bn=w), True)
               for s, b, w in ((8, "one", 16), (12, "one", 16), (16, "one", 16),
                               (12, "two", 16), (8, "one", 32))}}


@dataclasses.dataclass(frozen=True)
class Persistent:
    """A ``--bare`` form that is not a per-projection matmul: the whole chain in one kernel
    (``persistent_gemv.persistent_chain``) over the layers' stacked weights."""

    bn: int
    warps: int
    prefetch: bool

    def chain(self, programs: int, virtual: bool):
        from persistent_gemv import persistent_chain

        return functools.partial(persistent_chain, programs=programs, bn=self.bn,
                                 warps=self.warps, prefetch=self.prefetch, virtual=virtual)


@dataclasses.dataclass(frozen=True)
class Streaming:
    """A ``--bare`` form over the stacked, padded weights of ``streaming_gemv.prepare``:
    the whole chain in one Mosaic GPU kernel (``streaming_gemv.streaming_chain``)."""

    stages: int
    barrier: str = "one"
    max_bn: int = 16

    def chain(self, programs: int):
        from streaming_gemv import streaming_chain

        return functools.partial(streaming_chain, programs=programs, stages=self.stages,
                                 barrier=self.barrier, max_bn=self.max_bn)


def bare_chain(mm):
    """One decode-like step of projections only: ``mm(x, w^T)`` per projection, each reading
    the first K columns of the previous output (``--bare``)."""
    def step(h, ws):
        for w in ws:
            y = mm(h, w["in_t"])  # [R, 6160]
            h = mm(y, w["o_t"])  # y[:, :2048] -> [R, 1024]
            g = mm(h, w["gu_t"])  # [R, 5504]
            h = mm(g, w["down_t"])  # g[:, :2752] -> [R, 1024]
        return h
    return step


def make_weights(key, d: int, layers: int, dims: dict[str, tuple[int, int]]):
    ws = []
    for layer in range(layers):
        lk = jax.random.fold_in(key, layer)
        ws.append({name: (0.02 * jax.random.normal(jax.random.fold_in(lk, i), shape, F32)
                          ).astype(BF16) for i, (name, shape) in enumerate(dims.items())})
    return ws


def chain(mm, transposed: bool, d: int, inner: int, hidden: int):
    """One decode-like step over every layer; ``mm(x, w)`` computes each projection."""
    def norm(h):
        hf = h.astype(F32)
        return (hf * jax.lax.rsqrt(jnp.mean(hf * hf, -1, keepdims=True) + 1e-6)).astype(BF16)

    if mm == "fused":  # the norms, residual sums and SwiGLU inside the matmul kernels
        def fused_step(h, ws):
            ones = jnp.ones((d,), BF16)
            for w in ws:
                y = gemv.one_row_fused(h, w["in_t"], transposed=True, norm_scale=ones,
                                       norm_eps=1e-6)
                h = gemv.one_row_fused(y[:, :inner] * jax.nn.sigmoid(y[:, -inner:]),
                                       w["o_t"], transposed=True, residual=h)
                hidden = gemv.one_row_fused(h, w["gu_t"], transposed=True, glu=True,
                                            norm_scale=ones, norm_eps=1e-6)
                h = gemv.one_row_fused(hidden, w["down_t"], transposed=True, residual=h)
            return h
        return fused_step

    def step(h, ws):
        for w in ws:
            def proj(x, name, w=w):
                return mm(x, w[name + ("_t" if transposed else "")])
            y = proj(norm(h), "in")  # [1, 6160]
            h = h + proj(y[:, :inner] * jax.nn.sigmoid(y[:, -inner:]), "o")  # [1, D]
            gu = proj(norm(h), "gu")  # [1, 2 * hidden]
            h = h + proj(jax.nn.silu(gu[:, :hidden]) * gu[:, hidden:], "down")
        return h
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, CPU check only")
    p.add_argument("--steps", type=int, default=None,
                   help="decode steps per timed call (default 64; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--variants", nargs="*", default=None,
                   help="names to time (default: all; see variants() / bare_variants())")
    p.add_argument("--bare", action="store_true",
                   help="projections alone, back to back (module doc)")
    args = p.parse_args()
    if args.steps is None:
        args.steps = 1 if args.quick else 64
    if args.steps < 1:
        p.error(f"--steps: expected >= 1, got {args.steps}")
    if args.quick:
        d, layers, inner, hidden, n_in = 64, 2, 128, 192, 400
    else:
        d, layers, inner, hidden, n_in = 1024, 12, 2048, 2752, 6160
    dims = {"in": (d, n_in), "o": (inner, d), "gu": (d, 2 * hidden), "down": (hidden, d)}
    ws = make_weights(jax.random.PRNGKey(0), d, layers, dims)
    for w in ws:
        for name in list(dims):
            w[name + "_t"] = w[name].T  # [N, D]
        if args.bare:  # TMA reads an activation [8, W] whose width W is a multiple of 64:
            # the input projection's zero-padded to 6208 rows (for every form, same bytes)
            rows = w["in_t"].shape[0]
            w["in_t"] = jnp.pad(w["in_t"], ((0, -rows % 64), (0, 0)))  # [N64, D]
    weight_bytes = sum(int(np.prod(s)) * 2 for s in dims.values()) * layers
    h0 = (jax.random.normal(jax.random.PRNGKey(1), (1, d), F32)).astype(BF16)

    bandwidth = None
    if not args.quick:
        buf = jnp.ones((1 << 29,), F32)  # 2 GiB
        copy = jax.jit(lambda a: a + 1.0)
        copy(buf).block_until_ready()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            copy(buf).block_until_ready()
            times.append(time.perf_counter() - t)
        bandwidth = 2 * buf.nbytes / min(times)
        del buf
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; weights "
          f"{weight_bytes / 1e6:.1f} MB; copy bandwidth "
          f"{'-' if bandwidth is None else f'{bandwidth / 1e12:.2f} TB/s'}", flush=True)

    ref = None
    rows = []
    def save(rows: list[dict]) -> None:
        if not (args.out or os.environ.get("OUT")):
            return
        path = Path(args.out or os.environ["OUT"]) / (
            "gemv_gpu_bare.json" if args.bare else "gemv_gpu.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                    "jax": jax.__version__, "bandwidth": bandwidth,
                                    "bare": args.bare, "steps": args.steps,
                                    "rows": rows}, indent=1))

    known = bare_variants() if args.bare else variants(False)
    chosen = known if args.bare else variants(args.quick)
    if args.variants:
        unknown = sorted(set(args.variants) - set(known))
        if unknown:
            p.error(f"--variants: unknown {unknown}; known: {sorted(known)}")
        chosen = {k: v for k, v in known.items() if k in args.variants}
    stacked = None
    for name, (mm, transposed) in chosen.items():
        weights = ws
        if isinstance(mm, Streaming):  # one Mosaic kernel per step over padded [L, N, K]
            from streaming_gemv import prepare

            h_in, weights = prepare(h0, ws)  # [8, Dp], the stacked weights
            on_gpu = jax.default_backend() == "gpu"
            # one program per SM on a GPU; one under the interpreter (no global semaphores)
            programs = getattr(jax.devices()[0], "core_count", 132) if on_gpu else 1
            step = mm.chain(programs)
            one = jax.jit(lambda h, ws, step=step, d=h0.shape[1]: step(h, ws)[:1, :d])
        elif isinstance(mm, Persistent):  # one kernel per step over [L, N, K] weights
            if stacked is None:
                stacked = {k: jnp.stack([w[k] for w in ws])  # L x [N, K] -> [L, N, K]
                           for k in ("in_t", "o_t", "gu_t", "down_t")}
            weights = stacked
            on_gpu = jax.default_backend() == "gpu"
            # one program per SM on a GPU (all resident: the barriers need it); off a GPU
            # 3 programs run in turn (interpret mode, no barriers)
            programs = getattr(jax.devices()[0], "core_count", 132) if on_gpu else 3
            kernel = mm.chain(programs, virtual=not on_gpu)
            expect = programs * 4 * layers if on_gpu else 0

            def step(h, st, kernel=kernel, expect=expect):
                out, counter = kernel(h, st)
                # a barrier that gave up (programs not all resident) poisons the result
                return jnp.where(counter[0] == expect, out, jnp.nan).astype(out.dtype)
            h_in = h0
            one = jax.jit(step)
        elif args.bare:  # transposed here: the activation is [8, D] (row 0 is the batch row)
            step = bare_chain(mm)
            h_in = jnp.pad(h0, ((0, 7), (0, 0))) if transposed else h0  # [8, D] or [1, D]
            one = jax.jit(lambda h, ws, step=step: step(h, ws)[:1])
        else:
            step = chain(mm, transposed, d, inner, hidden)
            h_in = h0
            one = jax.jit(step)
        run = jax.jit(lambda h, ws, step=step: jax.lax.fori_loop(
            0, args.steps, lambda i, h: step(h, ws), h))
        interp = contextlib.nullcontext
        if args.bare and transposed and jax.default_backend() == "cpu":
            from linearnexus.kernels.common import mosaic_chunk
            if mosaic_chunk.gpu_interpret_reason():  # (JAX 0.10: no Mosaic GPU interpreter)
                print(f"{name:24s} skipped: {mosaic_chunk.gpu_interpret_reason()}")
                continue
            interp = mosaic_chunk.gpu_interpret  # the Mosaic kernels on the CPU
        try:
            with interp():
                out1 = np.asarray(one(h_in, weights).astype(F32))
            if not np.isfinite(out1).all():
                raise RuntimeError("non-finite output (a persistent kernel's barrier gave up?)")
            if ref is None:
                ref = out1
                print(f"(reference {name}: |out| = {np.linalg.norm(ref):.3e} after one step)")
            err = float(np.linalg.norm(out1 - ref) / np.linalg.norm(ref))
            with interp():
                compiled = run.lower(h_in, weights).compile()
            compiled(h_in, weights).block_until_ready()
            times = []
            for _ in range(1 if args.quick else args.repeats):
                t = time.perf_counter()
                compiled(h_in, weights).block_until_ready()
                times.append(time.perf_counter() - t)
            ms = statistics.median(times) / args.steps * 1e3
        except Exception as exc:  # a variant that does not compile here: report, go on
            print(f"{name:24s} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        floor = None if bandwidth is None else weight_bytes / bandwidth * 1e3
        rows.append({"variant": name, "ms_per_step": ms, "rel_err_vs_xla": err,
                     "floor_ms": floor, "x_floor": None if floor is None else ms / floor})
        print(f"{name:24s} {ms:8.3f} ms/step  err {err:.1e}"
              + ("" if floor is None else f"  {ms / floor:5.1f}x floor ({floor:.3f} ms)"),
              flush=True)
        save(rows)  # after every variant: a run cut short by its timeout keeps the rows


if __name__ == "__main__":
    main()
