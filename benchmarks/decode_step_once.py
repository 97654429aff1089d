"""One batch-1 decode step of a ~200M model, alone, for Nsight Compute (issue 23).

    python3 benchmarks/decode_step_once.py --model gdn [--batch 1]

Builds the model of ``benchmarks/decode_gpu.py`` (``our_config``; parameters initialised on
the host, so their random initialisation launches no GPU kernels), the decoder with
``weights="compute"``, compiles ``Decoder.step_fn`` ahead of time and runs it twice to warm
up. Then, between ``cudaProfilerStart`` / ``cudaProfilerStop`` (so that ``ncu
--profile-from-start off`` sees this call alone) and between two marker kernels (one-program
Pallas kernels named ``step_marker_before`` / ``step_marker_after``, so that a report taken
without the profiler range can still be cut to the step's kernels), it runs one step and
prints its wall time. ``benchmarks/ncu_decode_gpu.sh`` runs it under ``ncu``;
``benchmarks/ncu_summary.py --between step_marker_before step_marker_after`` tabulates the
step's kernels and their summed duration, which against the step's measured time in the
loop (``decode_gpu.py``) separates the kernels' own time from what launching them costs.

On the CPU (no profiler, no markers' meaning) it runs as a smoke test.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_gpu import our_config  # noqa: E402

from linearnexus.generate import Decoder, SamplingConfig  # noqa: E402
from linearnexus.models import create_model  # noqa: E402


def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library (for cudaProfilerStart / Stop), or None."""
    candidates = [ctypes.util.find_library("cudart"), "/usr/local/cuda/lib64/libcudart.so"]
    candidates += sorted(glob.glob("/usr/local/cuda/lib64/libcudart.so*"))
    for site in sys.path:  # the nvidia-cuda-runtime wheels JAX's CUDA plugin depends on
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "lib",
                                                    "libcudart.so*")))
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "cuda_runtime", "lib",
                                                    "libcudart.so*")))
    for path in filter(None, candidates):
        try:
            lib = ctypes.CDLL(path)
            lib.cudaProfilerStart  # noqa: B018 (the symbol must exist)
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _marker(name: str):
    """A one-program Pallas kernel named ``name`` (adds one to a [1, 128] row)."""
    from jax.experimental import pallas as pl

    from linearnexus.kernels.common.pallas import interpret_mode

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((1, 128), jnp.float32),
                          interpret=interpret_mode(), name=name)
    return jax.jit(call)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["gdn", "mamba2", "gpt"], default="gdn")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--quick", action="store_true", help="a tiny model (CPU smoke test)")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch: expected >= 1, got {args.batch}")
    if args.quick:
        args.d_model, args.layers, args.vocab = 64, 2, 256
    on_gpu = jax.default_backend() == "gpu"
    dtype = "bfloat16" if on_gpu else "float32"
    cfg = our_config(args.model, d=args.d_model, layers=args.layers, vocab=args.vocab,
                     dtype=dtype, max_seq_len=512)
    with jax.default_device(jax.devices("cpu")[0]):  # no init kernels on the GPU
        graph, weights = nnx.split(create_model(cfg, seed=0))
    model = nnx.merge(graph, jax.device_put(weights, jax.devices()[0]))
    dec = Decoder(model, SamplingConfig(temperature=0.0), weights="compute")
    params = dec.inputs
    rng = np.random.default_rng(0)

    def inputs():
        tok = jnp.asarray(rng.integers(0, args.vocab, (args.batch, 1)), jnp.int32)
        return tok, model.init_state(args.batch), jax.random.key(0)

    tok, state, key = inputs()
    step = dec.step_fn.lower(params, tok, state, key).compile()
    for _ in range(2):  # warm-up (first-run allocations, autotuned kernels' caches)
        tok, state, key = inputs()
        jax.block_until_ready(step(params, tok, state, key))
    before, after = _marker("step_marker_before"), _marker("step_marker_after")
    row = jnp.zeros((1, 128), jnp.float32)
    jax.block_until_ready((before(row), after(row)))  # compiled before the range
    tok, state, key = inputs()
    jax.block_until_ready((tok, state, key))
    cudart = _cudart() if on_gpu else None
    if on_gpu and cudart is None:
        print("no CUDA runtime library found: profiler range not set (cut the report at the "
              "marker kernels)", flush=True)
    if cudart is not None:
        cudart.cudaProfilerStart()
    t0 = time.perf_counter()
    jax.block_until_ready(before(row))
    out = step(params, tok, state, key)
    jax.block_until_ready(out)
    jax.block_until_ready(after(row))
    wall = time.perf_counter() - t0
    if cudart is not None:
        cudart.cudaProfilerStop()
    print(f"{args.model} batch {args.batch}: one step (with its two markers) took "
          f"{wall * 1e3:.3f} ms wall on {jax.devices()[0].device_kind}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
