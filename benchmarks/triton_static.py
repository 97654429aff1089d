"""What the Pallas GPU kernels compile to, read on a machine without a GPU.

    PYTHONPATH=/tmp/tsite:$PWD python benchmarks/triton_static.py OP [--packed]
        [--shape B T H D] [--sass-dir DIR]

Lowers OP's forward + backward (``backend="pallas"``, bf16, the gradient w.r.t. every input)
for CUDA on the CPU, captures every Triton kernel's TTIR, compiles each with Triton 3.6 for
sm_90 with the launch's own warps and stages, and prints per kernel: registers, spill bytes
(``ptxas -v``) and the SASS instruction count with its most frequent opcodes
(``cuobjdump -sass``). OP is one of the linear-attention ops of
``benchmarks/kernels_gpu.py`` or ``selective_scan`` (shape ``B T C N``); ``--packed`` runs
B = 1 with ``cu_seqlens``. Shapes default to the benchmark's (8, 4096, 16, 128) /
(8, 4096, 2048, 16).

Triton is not a dependency of the project; install its wheel outside the venv first:
``pip download --no-deps -d /tmp/twhl triton==3.6.0`` (the venv's Python version) and
``pip install --no-deps --target /tmp/tsite /tmp/twhl/*.whl``. The kernels compile with
``enable_fp_fusion=False`` because XLA's Triton pipeline does not contract ``mul`` + ``add``
either (``docs/benchmarks.md``, GPU kernel work log, session 6: the counts then match Nsight Compute's).
Counts are static: a loop body counts once, whatever its trip count.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["LINEARNEXUS_PALLAS_INTERPRET"] = "0"  # lower for the GPU, not interpret mode

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels_gpu as kg  # noqa: E402

from linearnexus.kernels.common.gpu_lowering import lower_for_gpu  # noqa: E402


def capture_ttir() -> list[str]:
    """Record the TTIR of every Pallas kernel lowered from now on (in lowering order)."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    captured: list[str] = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def recording(*args, **kwargs):
        result = lower(*args, **kwargs)
        # the debug-info form does not parse back
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = recording
    return captured


def loss_and_args(op: str, shape: tuple[int, ...], packed: bool):
    """``(loss, args)``: a scalar of the op's outputs and the inputs' ShapeDtypeStructs."""
    bf16 = jnp.bfloat16
    B, T = shape[:2]
    if packed:  # four sequences, one empty, lengths not multiples of any chunk
        B = 1
        cu = jnp.asarray([0, T // 4 + 3, T // 4 + 3, T // 2 + 7, T], jnp.int32)
    else:
        cu = None
    n_states = 4 if packed else B
    key = jax.random.key(0)
    if op == "selective_scan":
        _, _, C, N = shape
        inputs = jax.eval_shape(lambda k: kg.mamba_inputs(k, B, T, C, N, bf16), key)
        h0 = jax.ShapeDtypeStruct((n_states, C, N), jnp.float32)
        names = list(inputs)

        def loss(*arrays):
            args = dict(zip(names, arrays[:-1], strict=True))
            y, h = kg.mamba_call("pallas", {"mode": "chunk"}, cu)(args, arrays[-1], True)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

        return loss, [*inputs.values(), h0]
    _, _, H, D = shape
    inputs = jax.eval_shape(lambda k: kg.jax_inputs(op, k, B, T, H, D, D, bf16), key)
    # eval_shape hands dicts back with sorted keys; the op takes them in the recipe's order
    order = list(kg.jax_inputs(op, key, 1, 1, 1, 1, 1, bf16))
    inputs = {name: inputs[name] for name in order}
    h0 = jax.ShapeDtypeStruct((n_states, H, D, D), jnp.float32)
    fn = kg.ln_api(op)

    def loss(*arrays):
        o, h = fn(*arrays[:-1], initial_state=arrays[-1], output_final_state=True,
                  cu_seqlens=cu, backend="pallas", mode="chunk")
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(h)

    return loss, [*inputs.values(), h0]


def compile_and_count(ttir: str, warps: int, stages: int, workdir: Path) -> dict:
    """Compile one kernel's TTIR for sm_90; registers, spills and SASS opcode counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile

    source = workdir / "kernel.ttir"
    source.write_text(ttir)
    compiled = triton_compile(str(source), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages,
                                       "enable_fp_fusion": False})
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    (workdir / "kernel.ptx").write_text(compiled.asm["ptx"])
    (workdir / "kernel.cubin").write_bytes(compiled.asm["cubin"])
    report = subprocess.run([str(bindir / "ptxas"), "-v", "-arch=sm_90a", str(workdir / "kernel.ptx"),
                             "-o", str(workdir / "check.cubin")], capture_output=True, text=True).stderr
    sass = subprocess.run([str(bindir / "cuobjdump"), "-sass", str(workdir / "kernel.cubin")],
                          capture_output=True, text=True).stdout
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores", report)
    opcodes = collections.Counter(
        m.group(1).split(".")[0]
        for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) if spill else None,
            "sass": sum(opcodes.values()), "opcodes": opcodes, "sass_text": sass}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", choices=[*kg.OPS, "selective_scan"])
    parser.add_argument("--packed", action="store_true", help="B = 1 with cu_seqlens")
    parser.add_argument("--shape", nargs=4, type=int, default=None,
                        help="B T H D (selective_scan: B T C N)")
    parser.add_argument("--sass-dir", default=None, help="also save each kernel's SASS here")
    args = parser.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("triton: not importable; install the 3.6.0 wheel outside the venv and put it "
                 "on PYTHONPATH (this file's docstring)")
    shape = tuple(args.shape) if args.shape else (
        kg.MAMBA_SHAPE_GPU if args.op == "selective_scan" else (8, 4096, 16, 128))
    captured = capture_ttir()
    loss, structs = loss_and_args(args.op, shape, args.packed)
    grad = jax.grad(loss, argnums=tuple(range(len(structs))))
    text = lower_for_gpu(grad, *structs)
    warps = [int(w) for w in re.findall(r"num_warps = (\d+) : i32", text)]
    stages = [int(s) for s in re.findall(r"num_stages = (\d+) : i32", text)]
    names = re.findall(r'name = "([^"]+)"', text)
    if not (len(warps) == len(stages) == len(names) == len(captured)):
        sys.exit(f"could not pair {len(captured)} kernels with their launch parameters "
                 f"({len(names)} names, {len(warps)} warps) in the lowered module")
    print(f"{args.op} {'packed ' if args.packed else ''}{shape}: {len(captured)} kernels")
    for ttir, name, w, s in zip(captured, names, warps, stages, strict=True):
        with tempfile.TemporaryDirectory() as tmp:
            r = compile_and_count(ttir, w, s, Path(tmp))
        top = ", ".join(f"{k} {v}" for k, v in r["opcodes"].most_common(8))
        print(f"  {name}: {w} warps, {s} stages, {r['registers']} registers, "
              f"{r['spill_bytes']} B spilled, {r['sass']} SASS ({top})")
        if args.sass_dir:
            out = Path(args.sass_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.sass").write_text(r["sass_text"])


if __name__ == "__main__":
    main()
