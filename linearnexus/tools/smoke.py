"""A fast correctness pass over everything registered: ``make smoke`` (under 90 s on 2 cores).

    python -m linearnexus.tools.smoke [--ops gla mamba] [--backends jax pallas] [--blocks ...]

For every op in ``OP_REGISTRY`` and every backend of it in ``KERNEL_REGISTRY`` that runs on
this machine (Pallas backends run in interpret mode off the GPU), at a small awkward shape
(T = 37, not a multiple of any chunk size; head dims 12 and 10, not powers of two):

* chunk mode from a random initial state: output and final state against the reference
  (``"<op>:reference"``), and the gradients of a random projection of both with respect to
  every float input and the initial state;
* recurrent mode: output and final state against the reference;
* two packed sequences (``cu_seqlens``): output and per-sequence final states.

For every block in ``LAYER_REGISTRY`` (its ``tiny()`` config): one forward of T tokens,
then one decode step (T = 1 from the returned state), checked against the last position of
a forward over all T + 1 tokens.

The thorough checks (more shapes, float64, strong decay, finite differences) are the test
suite's; this is the five-second-per-op answer to "does everything still run and agree".
Exits 1 when a check fails, printing each check's relative error.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearnexus.kernels.base import current_platform
from linearnexus.registry import KERNEL_REGISTRY, LAYER_REGISTRY, OP_REGISTRY, kernels_for
from linearnexus.tools.inputs import Sizes, build_block, make_op_inputs

SIZES: Sizes = (2, 37, 2, 12, 10)  # (B, T, H, K, V)
PACKED = (0, 15, 37)  # two sequences of 15 and 22 tokens in one row
FWD_TOL = 2e-4  # float32 chunked forms vs the float32 per-step scan: ~1e-6 typical
GRAD_TOL = 1e-3


@dataclass
class Check:
    """One line of the report."""

    target: str  # "gla:pallas" or "block mamba"
    name: str
    error: float | None  # largest relative error, None when the check raised
    tol: float
    seconds: float
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is not None and np.isfinite(self.error) and self.error <= self.tol


def rel_err(a: Any, b: Any) -> float:
    """``||a - b|| / ||b||`` in float64 (``||a - b||`` when ``b`` is zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} != reference shape {b.shape}")
    denom = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    return float(diff / denom) if denom > 0 else float(diff)


def tree_err(a: Any, b: Any) -> float:
    return max(rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _timed(target: str, name: str, tol: float, fn: Callable[[], float]) -> Check:
    start = time.perf_counter()
    try:
        err, msg = fn(), ""
    except Exception as e:  # noqa: BLE001 - a smoke run reports every failure and goes on
        err, msg = None, f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return Check(target, name, err, tol, time.perf_counter() - start, msg)


def runs_here(kernel: Any) -> bool:
    """Whether a backend can run on this machine: it claims the platform, or it is a Pallas
    backend (interpret mode off the GPU)."""
    platform = current_platform()
    if kernel.supports(platform=platform, dtype=jnp.float32):
        return True
    return getattr(kernel, "name", "") == "pallas" and platform == "cpu"


def check_op(op: str, backend: str, key: jax.Array, *, with_grads: bool = True,
             memo: dict[Any, Any] | None = None) -> list[Check]:
    """The op checks of this module's docstring for one ``op:backend`` (gradients only when
    ``with_grads``). ``memo`` keeps the reference's results between backends of one op
    (same ``key``)."""
    memo = {} if memo is None else memo

    def once(name: str, compute: Callable[[], Any]) -> Any:
        if (op, name) not in memo:
            memo[op, name] = compute()
        return memo[op, name]

    fn = OP_REGISTRY[op]
    target = f"{op}:{backend}"
    reference = KERNEL_REGISTRY[f"{op}:reference"].name  # the api's name for it ("naive")
    args = make_op_inputs(op, key, SIZES)
    _, ref_state = fn(*args, backend=reference, output_final_state=True)
    h0 = jax.random.normal(jax.random.fold_in(key, 1), ref_state.shape, ref_state.dtype)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(b: str, mode: str, *a: jax.Array):
        *arrays, state = a
        return fn(*arrays, initial_state=state, output_final_state=True, mode=mode, backend=b)

    def forward(mode: str) -> Callable[[], float]:
        def check() -> float:
            got = run(backend, mode, *args, h0)
            want = once(mode, lambda: run(reference, mode, *args, h0))
            return tree_err(got, want)
        return check

    def backward() -> float:
        o_ref, s_ref = once("chunk", lambda: run(reference, "chunk", *args, h0))
        cot_o = jax.random.normal(jax.random.fold_in(key, 2), o_ref.shape, o_ref.dtype)
        cot_s = jax.random.normal(jax.random.fold_in(key, 3), s_ref.shape, s_ref.dtype)

        def loss(b: str) -> Callable[..., jax.Array]:
            def f(*a: jax.Array) -> jax.Array:
                o, s = run(b, "chunk", *a)
                return jnp.sum(o * cot_o) + jnp.sum(s * cot_s)
            return f

        argnums = tuple(range(len(args) + 1))
        got = jax.jit(jax.grad(loss(backend), argnums))(*args, h0)
        want = once("grads", lambda: jax.jit(jax.grad(loss(reference), argnums))(*args, h0))
        return tree_err(got, want)

    def packed() -> float:
        # offsets closed over as a constant, not a traced argument: the per-step reference
        # runs packed rows one at a time and needs them concrete
        cu = np.asarray(PACKED, np.int32)
        one_row = make_op_inputs(op, jax.random.fold_in(key, 4), (1, *SIZES[1:]))

        def packed_run(b: str) -> Any:
            return jax.jit(lambda *a: fn(*a, cu_seqlens=cu, output_final_state=True,
                                         mode="chunk", backend=b))(*one_row)

        return tree_err(packed_run(backend), once("packed", lambda: packed_run(reference)))

    checks = [_timed(target, "chunk fwd + state", FWD_TOL, forward("chunk")),
              _timed(target, "recurrent fwd + state", FWD_TOL, forward("recurrent")),
              _timed(target, "packed chunk (cu_seqlens)", FWD_TOL, packed)]
    if with_grads:
        checks.insert(1, _timed(target, "chunk grads", GRAD_TOL, backward))
    return checks


def check_block(name: str, key: jax.Array) -> list[Check]:
    """One forward, then one decode step checked against a forward over every token."""
    block, config = build_block(name)
    seq = SIZES[1]
    x = jax.random.normal(key, (2, seq + 1, config.d_model), jnp.float32)

    graphdef, params = nnx.split(block)

    @functools.partial(jax.jit, static_argnums=(0,))
    def call(mode: str, x: jax.Array, state: Any):
        return nnx.merge(graphdef, params)(x, state=state, mode=mode)

    def decode() -> float:
        full, _ = call("chunk", x, None)
        _, state = call("chunk", x[:, :seq], None)
        step, _ = call("recurrent", x[:, seq:], state)
        if step.shape != (2, 1, config.d_model):
            raise ValueError(f"decode step: expected output (2, 1, {config.d_model}), got {step.shape}")
        return rel_err(step[:, 0], full[:, seq])

    return [_timed(f"block {name}", "forward + decode step", FWD_TOL, decode)]


def run_smoke(ops: Sequence[str] | None = None, backends: Sequence[str] | None = None,
              blocks: Sequence[str] | None = None, *, verbose: bool = True) -> list[Check]:
    """Run the checks (all registered ops / backends / blocks when the filters are None)."""
    checks: list[Check] = []
    key = jax.random.PRNGKey(0)

    def report(new: list[Check]) -> None:
        checks.extend(new)
        if verbose:
            for c in new:
                err = "raised" if c.error is None else f"{c.error:.1e}"
                print(f"{'ok  ' if c.ok else 'FAIL'} {c.target:24s} {c.name:24s} err {err:>7s} "
                      f"(tol {c.tol:.0e}) {c.seconds:5.1f}s {c.message}", flush=True)

    grads_checked: list[Any] = []  # backend objects whose gradients were checked
    memo: dict[Any, Any] = {}
    for i, op in enumerate(ops if ops is not None else sorted(OP_REGISTRY)):
        for backend, kernel in sorted(kernels_for(op).items()):
            if kernel is KERNEL_REGISTRY[f"{op}:reference"]:
                continue  # the reference is what the others are checked against
            if backends is not None and backend not in backends:
                continue
            if not runs_here(kernel):
                if verbose:
                    print(f"skip {op}:{backend} (does not run on {current_platform()})")
                continue
            # retention and ssd re-parametrise simple_gla's backend objects: their gradients
            # are checked once, through whichever op reaches them first
            with_grads = not any(kernel is k for k in grads_checked)
            grads_checked.append(kernel)
            report(check_op(op, backend, jax.random.fold_in(key, i), with_grads=with_grads,
                            memo=memo))
    for name in blocks if blocks is not None else sorted(LAYER_REGISTRY):
        report(check_block(name, key))
    return checks


def op_families(ops: Sequence[str]) -> list[list[str]]:
    """``ops`` grouped so that ops sharing a backend object (retention and ssd run on
    simple_gla's) land in one group: one process then checks their gradients once."""
    seen: list[tuple[list[str], list[Any]]] = []
    for op in ops:
        objs = list(kernels_for(op).values())
        for members, known in seen:
            if any(o is k for o in objs for k in known):
                members.append(op)
                known.extend(objs)
                break
        else:
            seen.append(([op], objs))
    return [members for members, _ in seen]


def _run_jobs(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the checks in ``args.jobs`` child processes (op families and blocks dealt out by
    estimated cost); exit 1 if any child failed."""
    import subprocess

    families = op_families(args.ops if args.ops is not None else sorted(OP_REGISTRY))
    blocks = args.blocks if args.blocks is not None else sorted(LAYER_REGISTRY)
    # deal the work out largest first to the least loaded job; the cost unit is one op check
    # (an op has about four per backend, a block's forward + decode step costs about three)
    items = [(4 * sum(len(kernels_for(op)) - 1 for op in fam), fam, []) for fam in families]
    items += [(3, [], [name]) for name in blocks]
    jobs: list[tuple[int, list[str], list[str]]] = [(0, [], []) for _ in range(args.jobs)]
    for cost, ops, names in sorted(items, key=lambda item: -item[0]):
        i = min(range(args.jobs), key=lambda j: jobs[j][0])
        jobs[i] = (jobs[i][0] + cost, jobs[i][1] + ops, jobs[i][2] + names)
    passthrough = [a for a in ("--optimize",) if getattr(args, a[2:])]
    if args.backends:
        passthrough += ["--backends", *args.backends]
    children = []
    start = time.perf_counter()
    for _, job_ops, job_blocks in jobs:
        cmd = [sys.executable, "-m", "linearnexus.tools.smoke", "--ops", *job_ops,
               "--blocks", *job_blocks, *passthrough]
        children.append(subprocess.Popen(cmd))
    codes = [c.wait() for c in children]
    print(f"{args.jobs} jobs finished in {time.perf_counter() - start:.0f}s: "
          f"{'all passed' if not any(codes) else 'FAILURES above'}")
    return 1 if any(codes) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m linearnexus.tools.smoke",
        description="Every op's every backend vs its reference, and every block's forward + "
                    "decode step, at small shapes.")
    parser.add_argument("--ops", nargs="*", choices=sorted(OP_REGISTRY),
                        help="only these ops (no value: none)")
    parser.add_argument("--backends", nargs="+", help="only these backends (e.g. jax pallas)")
    parser.add_argument("--blocks", nargs="*", choices=sorted(LAYER_REGISTRY),
                        help="only these blocks (no value: none)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="split the checks over this many processes (compiling is "
                             "single-threaded: 2 on a 2-core machine halves the wall time)")
    parser.add_argument("--optimize", action="store_true",
                        help="keep XLA's optimisation passes (slower to compile)")
    args = parser.parse_args(argv)
    if args.jobs > 1:
        return _run_jobs(args, argv if argv is not None else sys.argv[1:])
    # float32 checks at 2e-4: GPUs' default float32 matmuls are TF32 (about 1e-3 relative)
    jax.config.update("jax_default_matmul_precision", "highest")
    if not args.optimize:
        # compiling dominates at these sizes; XLA's optimisation passes change no result
        # beyond float rounding (the test suite runs without them too)
        jax.config.update("jax_disable_most_optimizations", True)
    start = time.perf_counter()
    checks = run_smoke(args.ops, args.backends, args.blocks)
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed in "
          f"{time.perf_counter() - start:.0f}s on {current_platform()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
