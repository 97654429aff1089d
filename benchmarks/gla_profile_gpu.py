"""Where GLA's forward time goes on a GPU, kernel by kernel, for the ``mosaic`` and ``pallas``
backends (docs/mosaic.md, "GLA's forward walk": what is left is not known without this).

    python3 benchmarks/gla_profile_gpu.py [--out DIR] [--budget 240]
        [--shapes 8,4096,16,128 2,16384,16,128 8,4096,16,64]

Per shape (B, T, H, D), K = V = D, bf16 inputs and float32 log-gates (``kernels_gpu.py``'s
recipe), inputs rotated past L2, ``kernels_gpu.host_time`` (host clock around back-to-back
calls, median of 5), each of these alone in the chunk layout:

* ``sums``: the Triton compensated in-chunk sums of the log-gates;
* ``fwd_a``: the Triton intra-chunk scores ``A``, and ``fwd_a`` also writing the decayed
  ``q e^b``, ``k e^{b_L - b}`` (what the mosaic backend runs);
* the Mosaic GPU walk (``gla/mosaic.gla_walk``) at 1, 2 and 3 pipeline stages, value blocks of
  64 and 128 where they fit, plain and storing the chunk states (the gradient's forward);
* the Triton ``fwd_h`` + ``fwd_o`` the walk replaces (``gla_forward`` less ``fwd_a``);
* the whole op through the api, forward and forward + backward, for ``mosaic`` (its
  heuristic config) and ``pallas``.

A step not started when ``--budget`` seconds are spent is skipped and said so; the JSON
(``gla_profile.json`` under ``--out``) is rewritten after every shape. On the CPU, ``--quick``
runs one tiny shape through the interpreters (JAX 0.11 for the Mosaic walk), to check the
script, not to time anything.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels_gpu as kg  # noqa: E402

from linearnexus.kernels.common.mosaic_chunk import (  # noqa: E402
    SMEM_LIMIT,
    MosaicStatic,
    gpu_interpret,
)
from linearnexus.kernels.common.pallas_chunk import _call, batch_layout_info  # noqa: E402
from linearnexus.kernels.gla import mosaic as gla_mosaic  # noqa: E402
from linearnexus.kernels.gla import pallas as gla_pallas  # noqa: E402


def _core(B: int, T: int, H: int, D: int) -> Any:
    """GLA's Triton core description at (B, T, H, D), batch rows, no initial state."""
    return gla_mosaic.batch_core(B, T // gla_mosaic.CHUNK, H, D, D)


def profile_shape(shape: tuple[int, int, int, int], deadline: float,
                  skipped: list[str]) -> dict[str, Any]:
    """Median ms of each part at one shape (NaN and a logged reason for a part that fails)."""
    B, T, H, D = shape
    n_sets = kg.input_sets(kg.input_bytes("gla", B, T, H, D, D), 60 * 2 ** 20)
    sets = [tuple(kg.jax_inputs("gla", jax.random.PRNGKey(100 + i), B, T, H, D, D,
                                jnp.bfloat16).values()) for i in range(n_sets)]
    core = _core(B, T, H, D)
    out: dict[str, Any] = {"n_sets": n_sets}

    def timed(name: str, call) -> None:
        if time.perf_counter() > deadline:
            skipped.append(f"{shape} {name}: budget spent")
            return
        try:
            out[name] = kg.host_time(call, kg.jax_sync, repeats=5, n_sets=n_sets)["ms"]
            kg.log(f"  {shape} {name}: {out[name]:.3f} ms")
        except Exception as e:  # noqa: BLE001 - report it and go on
            out[name] = float("nan")
            kg.log(f"  {shape} {name}: {kg.short_error(e)}")

    # the chunk layout is the batch layout here (T a multiple of 64, D a power of two >= 64)
    sums = jax.jit(lambda g: gla_pallas._in_chunk_sums(g, core))
    timed("sums (Triton)", lambda i: sums(sets[i % n_sets][3]))
    bs = [sums(s[3]) for s in sets]
    fwd_a = jax.jit(lambda q, k, b, bc: gla_pallas.run_fwd_a(core, q, k, b, bc)[0])
    timed("fwd_a (Triton)", lambda i: fwd_a(sets[i % n_sets][0], sets[i % n_sets][1],
                                            *bs[i % n_sets]))
    fwd_a_d = jax.jit(lambda q, k, b, bc: gla_pallas.run_fwd_a(core, q, k, b, bc, decayed=True))
    timed("fwd_a + decayed q, k (Triton)", lambda i: fwd_a_d(
        sets[i % n_sets][0], sets[i % n_sets][1], *bs[i % n_sets]))
    walk_in = []
    for s, (b, bc) in zip(sets, bs, strict=True):
        a, qe, ke = fwd_a_d(s[0], s[1], b, bc)
        walk_in.append((qe, ke, s[2], a, gla_mosaic._decay_rows(b, core.chunk)))
    for stored in (False, True):
        for block_v in (b for b in (64, 128) if b <= D):
            for stages in (1, 2, 3):
                if gla_mosaic.gla_smem_bytes(key_dim=D, block_v=block_v, stages=stages,
                                             store_states=stored) > SMEM_LIMIT:
                    continue
                st = MosaicStatic(core=core, block_v=block_v, stages=stages,
                                  backward="pallas", bwd_stages=stages)
                f = jax.jit(lambda *a, st=st, stored=stored: gla_mosaic.gla_walk(
                    st, *a, None, store_states=stored))
                timed(f"walk{' storing S_c' if stored else ''} block_v={block_v} "
                      f"stages={stages}", lambda i, f=f: f(*walk_in[i % n_sets]))
    tri = jax.jit(lambda q, k, v, b, bc, a: _fwd_h_o(core, q, k, v, b, bc, a))
    a0 = [fwd_a(s[0], s[1], *b) for s, b in zip(sets, bs, strict=True)]
    timed("fwd_h + fwd_o (Triton)", lambda i: tri(*sets[i % n_sets][:3], *bs[i % n_sets],
                                                  a0[i % n_sets]))
    for backend in ("mosaic", "pallas"):  # the whole op, as kernels_gpu.py times it
        if time.perf_counter() > deadline:
            skipped.append(f"{shape} api, {backend}: budget spent")
            continue
        row = kg.time_ln("gla", shape, 5, None, 60 * 2 ** 20, backend=backend)
        for part, label in (("fwd", "api forward"), ("fwd_bwd", "api forward + backward")):
            name = f"{label}, {backend}"
            out[name] = row[part]["ms"] if part in row else float("nan")
            kg.log(f"  {shape} {name}: {out[name]:.3f} ms" if part in row else
                   f"  {shape} {name}: {row.get(f'{part}_error', row.get('status'))}")
    return out


def _fwd_h_o(core: Any, q, k, v, b, bc, a):
    """Triton ``fwd_h`` then ``fwd_o`` (``gla_pallas.gla_forward`` without its ``fwd_a``)."""
    R, NC, L, H, K, V = (core.rows, core.n_chunks, core.chunk, core.heads, core.key_dim,
                         core.value_dim)
    seq_info, flags = batch_layout_info(R, NC)
    nk, nv = K // core.block_k, V // core.block_v
    ins = dict(k=k, v=v, b=b, c=bc, h0=None, seq=seq_info, flag=flags)
    outs = dict(h=jax.ShapeDtypeStruct((R, NC, H, K, V), q.dtype),
                final=jax.ShapeDtypeStruct((R, H, K, V), jnp.float32))
    res = _call(functools.partial(gla_pallas._fwd_h_kernel, st=core), core, (nk, nv, R * H), ins,
                outs)
    return _call(functools.partial(gla_pallas._fwd_o_kernel, st=core), core, (nv, NC, R * H),
                 dict(q=q, v=v, h=res["h"], b=b, a=a),
                 dict(o=jax.ShapeDtypeStruct((R, NC * L, H, V), q.dtype)))["o"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds; parts not started by then are skipped")
    parser.add_argument("--shapes", nargs="+",
                        default=["8,4096,16,128", "2,16384,16,128", "8,4096,16,64"])
    parser.add_argument("--quick", action="store_true",
                        help="one tiny shape through the interpreters (a CPU check of the script)")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    if args.quick:
        shapes = [(1, 128, 1, 64)]
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"env": kg.environment(None), "args": vars(args), "shapes": {},
                               "skipped": []}
    for shape in shapes:
        kg.log(f"profiling gla {shape} ... ({time.perf_counter() - t0:.0f} s)")
        if args.quick:
            with gpu_interpret():
                results["shapes"][str(shape)] = profile_shape(shape, deadline, results["skipped"])
        else:
            results["shapes"][str(shape)] = profile_shape(shape, deadline, results["skipped"])
        (out_dir / "gla_profile.json").write_text(json.dumps(results, indent=1, default=str))
    for s in results["skipped"]:
        kg.log(f"skipped: {s}")
    kg.log(f"total {time.perf_counter() - t0:.0f} s; wrote {out_dir / 'gla_profile.json'}")


if __name__ == "__main__":
    main()
