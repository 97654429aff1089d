"""Quick GPU probe of simple_gla's mosaic backend: what dispatch picks, mosaic vs pallas at
the benchmark shape, and the forward's time per pipeline depth.

    python3 benchmarks/mosaic_probe.py [--shape 8,4096,16,128]

Prints (1) the backend automatic dispatch runs for bf16 dense, bf16 packed and float32 calls
(via ``kernels.base.dispatch`` with the op's own order), (2) ``||mosaic - pallas|| / ||pallas||``
of the output and final state at the shape (bf16, with an initial state), and (3) the
forward's median time per ``MosaicConfig(stages=...)`` with the same host-clock method as
``kernels_gpu.py`` (and fwd+bwd, and the same for the pallas backend). Needs an sm_90 GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels_gpu as kg  # noqa: E402  (input recipe, timing)

from linearnexus.kernels.base import GridConfig, dispatch  # noqa: E402
from linearnexus.kernels.common.mosaic_chunk import MosaicConfig  # noqa: E402
from linearnexus.kernels.simple_gla import api  # noqa: E402


def chosen(dtype, cu_seqlens) -> str:
    """The backend dispatch settles on: the first in order whose ``supports`` says yes and
    whose call does not raise NotImplementedError (the call here: the real op, traced)."""
    q = jnp.ones((1, 128, 2, 64), dtype)
    g = -jnp.ones((1, 128, 2), jnp.float32)

    def call(kernel):
        jax.eval_shape(lambda q, g: kernel.forward_chunk(q, q, q, g, initial_state=None,
                                                         grid=GridConfig(chunk_size=64),
                                                         scale=0.125, cu_seqlens=cu_seqlens), q, g)
        return kernel.name

    return dispatch("simple_gla", api.BACKENDS, api.BACKEND_ORDER, call, backend=None, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="8,4096,16,128")
    args = parser.parse_args()
    B, T, H, D = (int(x) for x in args.shape.split(","))
    cu = jnp.array([0, 50, 128], jnp.int32)
    print("dispatch: bf16 dense ->", chosen(jnp.bfloat16, None), "| bf16 packed ->",
          chosen(jnp.bfloat16, cu), "| float32 dense ->", chosen(jnp.float32, None), flush=True)
    inputs = tuple(kg.jax_inputs("simple_gla", jax.random.PRNGKey(0), B, T, H, D, D,
                                 jnp.bfloat16).values())
    h0 = jax.random.normal(jax.random.PRNGKey(1), (B, H, D, D), jnp.float32)
    outs = {}
    for backend in ("mosaic", "pallas"):
        f = jax.jit(lambda *a, b=backend: api.simple_gla(*a, initial_state=h0, output_final_state=True,
                                                        backend=b, mode="chunk"))
        outs[backend] = [np.asarray(x, np.float64) for x in f(*inputs)]
    for i, name in enumerate(("o", "final")):
        a, b = outs["mosaic"][i], outs["pallas"][i]
        print(f"mosaic vs pallas {name}: {np.linalg.norm(a - b) / np.linalg.norm(b):.2e}", flush=True)
    l2 = 60 * 2 ** 20
    n_sets = kg.input_sets(kg.input_bytes("simple_gla", B, T, H, D, D), l2)
    sets = [tuple(kg.jax_inputs("simple_gla", jax.random.PRNGKey(100 + i), B, T, H, D, D,
                                jnp.bfloat16).values()) for i in range(n_sets)]
    do = jax.random.normal(jax.random.PRNGKey(99), (B, T, H, D), jnp.float32).astype(jnp.bfloat16)
    runs = [("mosaic", MosaicConfig(stages=2)), ("mosaic", MosaicConfig(stages=3)), ("pallas", None)]
    for backend, config in runs:
        kernel = api.BACKENDS[backend]
        kernel.config = config
        label = backend + ("" if config is None else f" stages={config.stages}")
        try:
            def fwd(*a, b=backend):
                return api.simple_gla(*a, backend=b, mode="chunk")[0]

            def loss(do, *a, fwd=fwd):
                return jnp.sum(fwd(*a).astype(jnp.float32) * do.astype(jnp.float32))

            f = jax.jit(fwd)
            fb = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4)))
            t = kg.host_time(lambda i, f=f: f(*sets[i % n_sets]), kg.jax_sync, repeats=5,
                             n_sets=n_sets)
            tb = kg.host_time(lambda i, fb=fb: fb(do, *sets[i % n_sets]), kg.jax_sync, repeats=5,
                              n_sets=n_sets)
            print(f"{label}: fwd {t['ms']:.3f} ms, fwd+bwd {tb['ms']:.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
            print(f"{label}: {kg.short_error(e)}", flush=True)
        finally:
            kernel.config = None

if __name__ == "__main__":
    main()
