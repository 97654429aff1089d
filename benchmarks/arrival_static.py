"""What the one-launch projection and layer kernels (``kernels/fused_decode/arrival.py``)
compile to for sm_90, read on a machine without a GPU.

    PYTHONPATH=/tmp/tsite:$PWD python benchmarks/arrival_static.py [--sass]

Lowers ``ssd_in_layer`` and ``delta_in_layer`` at the ~200M decode models' shapes (Mamba2: 32
heads of P = N = 64 over d_model 1024; Gated DeltaNet: 16 heads of K = 64, V = 128, value
blocks of 32 as batch 1 runs them) and the separate projection kernel (``one_row_conv``) for
CUDA on the CPU, compiles each Triton kernel with Triton 3.6 for sm_90 at the launch's warps
and stages (``triton_static.compile_and_count``), and prints a table row per kernel and
setting: rows of ``W^T`` a program (``arrival.PROJ_ROWS``), a Mamba2 head's value blocks
(``arrival.SSD_BLOCKS``), registers, spilled bytes and SASS instructions. ``--sass`` also
prints the launch's fences and atomics in program order (what the design relies on: the
column stores, a CTA barrier, then a release fence, the add and the L1 invalidation).
Triton is installed outside the venv as ``triton_static.py``'s docstring says.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ["LINEARNEXUS_PALLAS_INTERPRET"] = "0"  # lower for the GPU, not interpret mode

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_static import capture_ttir, compile_and_count  # noqa: E402

from linearnexus.kernels.common.gpu_lowering import lower_for_gpu  # noqa: E402
from linearnexus.kernels.fused_decode import arrival, gemv  # noqa: E402
from linearnexus.kernels.fused_decode.pallas import DeltaLayerSpec, SsdLayerSpec  # noqa: E402

BF16, F32 = jnp.bfloat16, jnp.float32
D = 1024
SSD = SsdLayerSpec(heads=32, head_dim=64, groups=1, d_state=64, conv_width=None,
                   d_per_channel=False, dt_limit=None)
DELTA = DeltaLayerSpec(heads=16, key_dim=64, value_dim=128, conv_width=None,
                       silu_without_conv=False, gated=True, output_gate=True,
                       allow_neg_eigval=False, qk_eps=1e-6, norm_eps=1e-5, scale=0.125,
                       norm_out=False, value_blocks=4)


def _operands(kind: str) -> dict[str, jax.ShapeDtypeStruct]:
    s = jax.ShapeDtypeStruct
    sp = SSD if kind == "ssd" else DELTA
    channels = sp.conv_channels if kind == "ssd" else sp.qkv_width
    ops = dict(x=s((1, D), BF16), norm1_scale=s((D,), F32), w_in_t=s((sp.width, D), BF16),
               conv_cache=s((1, 3, channels), BF16), conv_weight=s((4, channels), F32),
               conv_bias=s((channels,), F32), a_log=s((sp.heads,), F32),
               dt_bias=s((sp.heads,), F32))
    if kind == "ssd":
        return dict(ops, state=s((1, 32, 64, 64), F32), d=s((32,), F32))
    return dict(ops, state=s((1, 16, 64, 128), F32), norm_scale=s((128,), F32))


CASES = {
    "one_row_conv (Mamba2 in_proj)": ("ssd", lambda **k: gemv.one_row_conv(
        k["x"], k["w_in_t"], k["conv_cache"], k["conv_weight"], k["conv_bias"],
        conv_start=SSD.inner, transposed=True, norm_scale=k["norm1_scale"], norm_eps=1e-5)),
    "ssd_in_layer": ("ssd", lambda **k: arrival.ssd_in_layer(**k, spec=SSD, norm1_eps=1e-5)),
    "delta_in_layer": ("delta", lambda **k: arrival.delta_in_layer(**k, spec=DELTA,
                                                                   norm1_eps=1e-5)),
}
SETTINGS = ((2, 1), (2, 4), (8, 1), (8, 4))  # (PROJ_ROWS, SSD_BLOCKS)


def compiled(name: str) -> dict:
    """The first Triton kernel of case ``name`` compiled for sm_90 (``compile_and_count``)."""
    kind, fn = CASES[name]
    ops = _operands(kind)
    names = list(ops)
    captured = capture_ttir()
    text = lower_for_gpu(lambda *a: fn(**dict(zip(names, a, strict=True))), *ops.values())
    warps = int(re.search(r"num_warps = (\d+) : i32", text).group(1))
    stages = int(re.search(r"num_stages = (\d+) : i32", text).group(1))
    with tempfile.TemporaryDirectory() as tmp:
        return compile_and_count(captured[0], warps, stages, Path(tmp))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sass", action="store_true", help="print the launch's fences and atomics")
    args = p.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("triton: not importable; install the 3.6.0 wheel outside the venv "
                 "(benchmarks/triton_static.py's docstring)")
    print("| kernel | rows of W^T a program | Mamba2 head's value blocks | registers | "
          "spilled bytes | SASS instructions |")
    print("|---|---:|---:|---:|---:|---:|")
    for rows, blocks in SETTINGS:
        arrival.PROJ_ROWS, arrival.SSD_BLOCKS = rows, blocks
        for name in CASES:
            if name.startswith("one_row") and (rows, blocks) != SETTINGS[0]:
                continue
            if name == "delta_in_layer" and blocks != SETTINGS[0][1]:
                continue  # a Mamba2 setting
            r = compiled(name)
            shown_rows = 2 if name.startswith("one_row") else rows
            shown_blocks = blocks if name == "ssd_in_layer" else "-"
            print(f"| {name} | {shown_rows} | {shown_blocks} | {r['registers']} | "
                  f"{r['spill_bytes']} | {r['sass']} |", flush=True)
            if args.sass and name != "one_row_conv (Mamba2 in_proj)":
                keys = ("BAR.SYNC", "MEMBAR", "ATOM", "RED.", "CCTL")
                for line in r["sass_text"].splitlines():
                    if any(k in line for k in keys):
                        print("    " + line.strip()[:100])


if __name__ == "__main__":
    main()
