"""CPU matmuls through a BLAS by an XLA FFI custom call, against XLA's own dots.

    python benchmarks/cpu_ffi_gemm.py                  # the chain below, BLAS on 1 and 2 threads
    python benchmarks/cpu_ffi_gemm.py --threads 2 --rounds 40 --json out.json

Issue 22's CPU targets are bound by XLA:CPU's matmul rate at small sizes
(``cpu_matmul_rates.py``). This measures the way around it that stays inside a jitted
program: ``cpu_ffi_gemm.cc`` (an XLA FFI handler, compiled here with ``g++`` against
``jax.ffi.include_dir()``) runs each product as one ``cblas_sgemm`` of NumPy's bundled
OpenBLAS (``numpy.libs``; ILP64, ``scipy_`` prefixed). The chain is ``step_chain``, run by
``cpu_matmul_rates.py --callback``: a training step's 84 products for the nanoGPT recipe's
GPT (768 tokens, width 128, hidden 384, 4 layers), the transposes as the GEMM's flags (no
copies). Both programs are called in turns, ``--rounds`` times, median ms. Not a library
feature: the handler has no batching, no gradient rule and float32 only.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cpu_matmul_rates as rates  # noqa: E402  (the chain and its inputs)


def build(out_dir: Path) -> Path:
    """Compile ``cpu_ffi_gemm.cc`` into ``out_dir``; returns the shared library's path."""
    import jax

    compiler = shutil.which("g++")
    if compiler is None:
        raise SystemExit("cpu_ffi_gemm.py: needs g++ on PATH to build the FFI handler")
    lib = out_dir / "libcpu_ffi_gemm.so"
    subprocess.run([compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
                    f"-I{jax.ffi.include_dir()}", str(HERE / "cpu_ffi_gemm.cc"), "-o", str(lib)],
                   check=True)
    return lib


def find_openblas() -> str | None:
    """The path of NumPy's bundled OpenBLAS (``numpy.libs/libscipy_openblas64_*.so``), or
    None (a NumPy not from a PyPI wheel)."""
    import numpy as np

    found = glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs",
                                   "libscipy_openblas64_*.so"))
    return found[0] if found else None


def register(lib_path: Path, threads: int):
    """Load the handler, point it at OpenBLAS's sgemm on ``threads`` threads, register it
    as the CPU FFI target ``ln_gemm``; returns ``gemm(a, b, ta=False, tb=False)``."""
    import jax

    found = find_openblas()
    if found is None:
        raise SystemExit("cpu_ffi_gemm.py: NumPy's bundled OpenBLAS (numpy.libs/"
                         "libscipy_openblas64_*.so) was not found")
    blas = ctypes.CDLL(found)
    blas.scipy_openblas_set_num_threads64_(ctypes.c_int(threads))
    lib = ctypes.CDLL(str(lib_path))
    lib.ln_set_sgemm(ctypes.cast(blas.scipy_cblas_sgemm64_, ctypes.c_void_p))
    jax.ffi.register_ffi_target("ln_gemm", jax.ffi.pycapsule(lib.LnGemm), platform="cpu")

    def gemm(a, b, ta=False, tb=False):
        m = a.shape[1] if ta else a.shape[0]
        n = b.shape[0] if tb else b.shape[1]
        return jax.ffi.ffi_call("ln_gemm", jax.ShapeDtypeStruct((m, n), a.dtype))(
            a, b, ta=ta, tb=tb)

    return gemm


def race(fns: dict, args: tuple, rounds: int) -> dict[str, float]:
    """Median ms of each function, called in turns ``rounds`` times after one warm-up."""
    import jax

    for f in fns.values():
        jax.block_until_ready(f(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="OpenBLAS threads, one process each")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--json", type=Path)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: this thread count
    args = p.parse_args(argv)
    if min(args.threads) < 1 or args.rounds < 1:
        p.error(f"--threads and --rounds must be >= 1, got {args.threads} and {args.rounds}")
    if args.one is None:  # OpenBLAS's thread count is per process: one child each
        rows = []
        for n in args.threads:
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--rounds",
                                  str(args.rounds)], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"OpenBLAS on {n} thread(s): XLA {r['ms']['xla']:.2f} ms, FFI sgemm "
                  f"{r['ms']['ffi']:.2f} ms a step's 84 products (largest relative difference "
                  f"{r['max_rel_diff']:.1e})")
        if args.json:
            rates.write_json(args.json, {"rows": rows})
        return 0

    import jax
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        gemm = register(build(Path(tmp)), args.one)
        weights, x = rates.chain_inputs()
        fns = {"xla": jax.jit(lambda w, x: rates.step_chain(rates.xla_dot, w, x)),
               "ffi": jax.jit(lambda w, x: rates.step_chain(gemm, w, x))}
        diff = rates.max_rel_diff(fns["xla"](weights, x), fns["ffi"](weights, x))
        if diff > 1e-4:  # the handler must compute XLA's products
            raise SystemExit(f"cpu_ffi_gemm.py: FFI and XLA differ by {diff:.1e} (relative)")
        ms = race(fns, (weights, x), args.rounds)
    print(json.dumps({"threads": args.one, "jax": jax.__version__, "numpy": np.__version__,
                      "ms": ms, "max_rel_diff": diff}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
