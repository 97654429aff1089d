"""Run a Mamba block in chunk and recurrent mode and compare them.

    python examples/run_mamba_reference.py --batch 2 --seq 256 --hidden 64 --chunk 16

Prints the output shape, the chunk-vs-recurrent relative error, and the wall time of each
mode (compiled, median of 5 runs after a warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from linearnexus.modules.ssm.mamba import MambaBlock, MambaConfig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64, help="d_model")
    p.add_argument("--chunk", type=int, default=16, help="chunk size of chunk mode")
    p.add_argument("--state", type=int, default=16, help="d_state")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch", "seq", "hidden", "chunk", "state"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")

    config = MambaConfig(d_model=args.hidden, d_state=args.state, chunk_size=args.chunk)
    block = MambaBlock(config, rngs=nnx.Rngs(args.seed))
    x = jax.random.normal(jax.random.PRNGKey(args.seed + 1), (args.batch, args.seq, args.hidden))
    graphdef, params = nnx.split(block)

    def runner(mode):
        return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, mode=mode))

    results = {}
    for mode in ("chunk", "recurrent"):
        fn = runner(mode)
        jax.block_until_ready(fn(params, x))  # compile
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            y, state = jax.block_until_ready(fn(params, x))
            times.append(time.perf_counter() - t0)
        results[mode] = (y, state, statistics.median(times))

    y_c, s_c, t_c = results["chunk"]
    y_r, s_r, t_r = results["recurrent"]
    err = float(jnp.linalg.norm(y_c - y_r) / jnp.linalg.norm(y_r))
    serr = float(jnp.linalg.norm(s_c.ssm.state - s_r.ssm.state) / jnp.linalg.norm(s_r.ssm.state))
    tokens = args.batch * args.seq
    print(f"Mamba block d_model={args.hidden} d_inner={config.d_inner} d_state={args.state} "
          f"on {jax.default_backend()}")
    print(f"input {tuple(x.shape)} -> output {tuple(y_c.shape)}, state {tuple(s_c.ssm.state.shape)}")
    print(f"chunk vs recurrent: output rel. error {err:.2e}, final state rel. error {serr:.2e}")
    print(f"chunk mode (L={args.chunk}): {t_c * 1e3:8.2f} ms  ({tokens / t_c:,.0f} tokens/s)")
    print(f"recurrent mode:       {t_r * 1e3:8.2f} ms  ({tokens / t_r:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
