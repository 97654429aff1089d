"""The chunked ops' matmuls on the CPU: XLA's rate against PyTorch's and NumPy's, same process.

    python benchmarks/cpu_matmul_rates.py                 # issue 22's shape, chunks 32 and 64
    python benchmarks/cpu_matmul_rates.py --chunks 64 --repeats 20 --json out.json
    python benchmarks/cpu_matmul_rates.py --chunks --projections   # the GPT recipe's matmuls

The chunked forms of the linear ops (``linearnexus/kernels/*/chunked.py``) spend their floor in
batched products of one chunk per (batch, head, chunk) row: at issue 22's shape (B=2, T=2048,
H=4, K=V=64) and chunk L that is ``B*H*T/L`` products of ``[L, 64]`` operands, in three
layouts:

* ``NN``: ``[n, L, L] @ [n, L, 64]`` (the masked scores times the values, ``A V``);
* ``NT``: ``[n, L, 64] @ [n, L, 64]^T`` (the scores, ``Q K^T``);
* ``TN``: ``[n, L, 64]^T @ [n, L, 64]`` (a chunk's state, ``K^T V``, the contraction over the
  chunk axis).

Each is timed as one jitted ``jnp.einsum`` (XLA:CPU with its default flags, as
``benchmarks/run.py --preset linear-ops-cpu`` times the ops; ``--training-flags`` adds those of
``linearnexus/core/cpu_flags.py``: each matmul on one thread), as ``torch.matmul``
on the same operands (``torch.set_num_threads`` = the cores this process may use) and as
``numpy.matmul``. ``--projections`` adds the nanoGPT recipe's projections (``configs/models/
gpt_nanogpt_cpu.yaml``: 768 tokens a step, width 128, SwiGLU hidden 384): ``X W`` and the
weight gradient ``X^T dY`` for q / k / v / o (``128 -> 128``), SwiGLU's gate or up
(``128 -> 384``), both as one (``128 -> 768``) and its down projection (``384 -> 128``).
``--callback`` also times a chain of the recipe's products shaped like a training step (4
layers of ``X W`` forward, then ``dY W^T`` and ``X^T dY`` for each, elementwise ops
between: 84 products) with XLA's ``@`` and with every product sent to ``numpy.matmul``
through ``jax.pure_callback``: what routing the matmuls to a BLAS from Python would cost.
A ``2048^3`` product (``--big``) gives each library's large-matmul rate. The median of
``--repeats`` calls after two warm-ups, in GFLOP/s. This says what XLA:CPU's small-matmul rate
costs the chunked ops' 10x target (docs/benchmarks.md, "CPU training speed, round 11").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", type=int, nargs="*", default=[32, 64],
                   help="chunk lengths L (none: no chunk products)")
    p.add_argument("--projections", action="store_true",
                   help="add the nanoGPT recipe's projections (768 tokens, width 128)")
    p.add_argument("--rows", type=int, default=2 * 4 * 2048,
                   help="B*H*T: rows of the chunked operands (issue 22: 2*4*2048)")
    p.add_argument("--dim", type=int, default=64, help="the head dim K = V")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--big", type=int, default=2048, help="the large product's size N (N^3)")
    p.add_argument("--callback", action="store_true",
                   help="also time a step-shaped chain of products through jax.pure_callback")
    p.add_argument("--training-flags", action="store_true",
                   help="add train_lm.py's XLA:CPU flags (each matmul on one thread)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    bad = [c for c in args.chunks if c < 1 or args.rows % c]
    if bad:
        p.error(f"--chunks: each must be >= 1 and divide --rows={args.rows}, got {bad}")
    if min(args.dim, args.repeats, args.big) < 1:
        p.error(f"--dim, --repeats and --big must be >= 1, got {args.dim}, {args.repeats} and "
                f"{args.big}")
    return args


def median_s(fn, operands: tuple, repeats: int) -> float:
    """Median wall seconds of ``fn(*operands)`` over ``repeats`` calls, after two warm-ups."""
    fn(*operands)
    fn(*operands)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*operands)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def xla_dot(a, b, ta: bool = False, tb: bool = False):
    """``op(a) @ op(b)`` by XLA (``op`` transposes where ``ta`` / ``tb``)."""
    return (a.T if ta else a) @ (b.T if tb else b)


def chain_inputs() -> tuple[list[dict], object]:
    """:func:`step_chain`'s weights (4 layers: ``q, k, v, o`` ``[128, 128]``, ``gate, up``
    ``[128, 384]``, ``down`` ``[384, 128]``) and input ``x [768, 128]``, float32."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(1)
    shapes = {"q": (128, 128), "k": (128, 128), "v": (128, 128), "o": (128, 128),
              "gate": (128, 384), "up": (128, 384), "down": (384, 128)}
    weights = [{n: jnp.asarray(0.05 * rng.standard_normal(s, dtype=np.float32))
                for n, s in shapes.items()} for _ in range(4)]
    return weights, jnp.asarray(rng.standard_normal((768, 128), dtype=np.float32))


def max_rel_diff(want: object, got: object) -> float:
    """The largest ``max |want - got| / max |want|`` over the two pytrees' leaves."""
    import jax
    import jax.numpy as jnp

    return max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
               for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True))


def write_json(path: Path, payload: dict) -> None:
    """``payload`` with the UTC date to ``path`` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(
        {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **payload}, indent=1))


def step_chain(dot, weights: list[dict], x):
    """A training step's products for the recipe's GPT, without its attention scores: per
    layer ``q, k, v, o, gate, up, down`` forward (``x [T, 128]``), then in reverse the input
    gradients ``dY W^T`` and weight gradients ``X^T dY``; ``dot(a, b, ta, tb)`` computes
    ``op(a) @ op(b)`` (:func:`xla_dot`). Returns the input gradient ``[T, 128]`` and the
    weight gradients."""
    import jax
    import jax.numpy as jnp

    saved = []
    for w in weights:
        a = jnp.tanh(dot(x, w["q"]) + dot(x, w["k"]) + dot(x, w["v"]))  # [T, 128]
        y = x + dot(a, w["o"])
        h = jax.nn.silu(dot(y, w["gate"])) * dot(y, w["up"])  # [T, 384]
        saved.append((x, a, y, h))
        x = y + dot(h, w["down"])
    dy, grads = jnp.full_like(x, 1e-3), []
    for w, (xi, a, y, h) in zip(reversed(weights), reversed(saved), strict=True):
        dh = dot(dy, w["down"], tb=True)
        dyy = dot(dh, w["gate"], tb=True) + dot(dh, w["up"], tb=True) + dy
        da = dot(dyy, w["o"], tb=True)
        grads.append([dot(h, dy, ta=True), dot(y, dh, ta=True), dot(y, dh, ta=True),
                      dot(a, dyy, ta=True), dot(xi, da, ta=True), dot(xi, da, ta=True),
                      dot(xi, da, ta=True)])
        dy = dot(da, w["q"], tb=True) + dot(da, w["k"], tb=True) + dot(da, w["v"], tb=True) + dyy
    return dy, grads


def callback_chain(repeats: int) -> dict:
    """:func:`step_chain` with XLA's products against every product through
    ``jax.pure_callback`` into ``numpy.matmul`` (transposes inside NumPy): median ms of each,
    and their largest relative difference."""
    import jax
    import numpy as np

    weights, x = chain_inputs()

    def host_dot(a, b, ta=False, tb=False):
        m, n = a.shape[1] if ta else a.shape[0], b.shape[0] if tb else b.shape[1]
        return jax.pure_callback(lambda a, b: np.matmul(a.T if ta else a, b.T if tb else b),
                                 jax.ShapeDtypeStruct((m, n), a.dtype), a, b)

    xla = jax.jit(lambda w, x: step_chain(xla_dot, w, x))
    host = jax.jit(lambda w, x: step_chain(host_dot, w, x))
    diff = max_rel_diff(xla(weights, x), host(weights, x))
    ms = {name: 1e3 * median_s(lambda w, x, f=f: jax.block_until_ready(f(w, x)), (weights, x),
                               repeats) for name, f in (("xla", xla), ("callback", host))}
    return {"products": 84, "ms": ms, "max_rel_diff": diff}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.training_flags:
        from linearnexus.core.cpu_flags import apply_cpu_flags

        apply_cpu_flags()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    d = args.dim
    # (name, einsum, lhs shape, rhs shape, contraction length, numpy / torch form)
    cases = []
    for chunk in args.chunks:
        n = args.rows // chunk  # one product per (batch, head, chunk)
        cases += [
            (f"NN L={chunk}", "nij,njd->nid", (n, chunk, chunk), (n, chunk, d), chunk,
             lambda a, b: a @ b),
            (f"NT L={chunk}", "nid,njd->nij", (n, chunk, d), (n, chunk, d), d,
             lambda a, b: a @ b.mT),
            (f"TN L={chunk}", "nid,nie->nde", (n, chunk, d), (n, chunk, d), chunk,
             lambda a, b: a.mT @ b),
        ]
    if args.projections:
        tokens = 768  # batch 12 x context 64
        for k_in, n_out in ((128, 128), (128, 384), (128, 768), (384, 128)):
            cases += [
                (f"XW {k_in}->{n_out}", "tk,kn->tn", (tokens, k_in), (k_in, n_out), k_in,
                 lambda a, b: a @ b),
                (f"XtdY {k_in}->{n_out}", "tk,tn->kn", (tokens, k_in), (tokens, n_out), tokens,
                 lambda a, b: a.T @ b),
            ]
    big = args.big
    cases.append((f"{big}^3", "ij,jk->ik", (big, big), (big, big), big, lambda a, b: a @ b))

    rows = []
    print(f"JAX {jax.__version__} ({'training flags' if args.training_flags else 'XLA defaults'}), "
          f"torch {torch.__version__} ({threads} threads), numpy {np.__version__}; GFLOP/s, "
          f"median of {args.repeats}")
    print(f"{'product':<10} {'MFLOP':>8} {'jax':>8} {'torch':>8} {'numpy':>8}")
    for name, spec, ls, rs, contraction, form in cases:
        a = rng.standard_normal(ls, dtype=np.float32)
        b = rng.standard_normal(rs, dtype=np.float32)
        out = np.einsum(spec, a, b)
        flop = 2.0 * out.size * contraction
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        jf = jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y))
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        got = {
            "jax": median_s(lambda x, y, f=jf: f(x, y).block_until_ready(), (ja, jb), args.repeats),
            "torch": median_s(form, (ta, tb), args.repeats),
            "numpy": median_s(form, (a, b), args.repeats),
        }
        # every library computes the same product
        np.testing.assert_allclose(np.asarray(jf(ja, jb)), out, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(form(ta, tb).numpy(), out, rtol=2e-3, atol=2e-3)
        rates = {k: flop / s / 1e9 for k, s in got.items()}
        rows.append({"product": name, "mflop": flop / 1e6, "gflops": rates,
                     "ms": {k: 1e3 * s for k, s in got.items()}})
        print(f"{name:<10} {flop / 1e6:>8.1f} {rates['jax']:>8.1f} {rates['torch']:>8.1f} "
              f"{rates['numpy']:>8.1f}")
    chain = None
    if args.callback:
        chain = callback_chain(args.repeats)
        print(f"a step's 84 products: XLA {chain['ms']['xla']:.2f} ms, through "
              f"jax.pure_callback into numpy {chain['ms']['callback']:.2f} ms (largest "
              f"relative difference {chain['max_rel_diff']:.1e})")
    if args.json:
        write_json(args.json, {
            "jax": jax.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "threads": threads, "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows,
            "callback_chain": chain})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
