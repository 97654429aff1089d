"""Where a step of FLA's HF ``generate`` goes: host or GPU (issue 23's peer at batch 64).

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/fla_decode_profile_gpu.py [--model mamba2]

FLA's Mamba2 decode step at batch 64 measured 11.1 to 23.7 ms across H100 machines and
calls (``docs/benchmarks.md``) while ours stayed within 3%. This script runs the same model
as ``decode_gpu.py`` (FLA 0.6.0's ``Mamba2ForCausalLM`` or ``GatedDeltaNetForCausalLM``,
d_model 1024, 12 layers, Mamba2 24, bf16) and reports, for ``--steps`` greedy tokens: the
wall time per step, the GPU's kernel time per step (``decode_gpu.fla_kernel_time``: the
kernels, copies and fills of two ``torch.profiler`` chrome traces, one token's run
subtracted from ``--steps`` tokens' to drop the prefill), the kernels launched per step,
and the host's top operators by their own CPU time. A step whose kernel time is a small
part of its wall time is bound by the host, and then the host CPU's speed sets the peer's
number. (The kernel time sums the trace's kernels, not ``key_averages``' device times, which
count a kernel twice and include the profiler's own markers: ``docs/gpu_notes.md``.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["mamba2", "gdn"], default="mamba2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--mamba2-layers", type=int, default=None,
                   help="Mamba2's layers (default: decode_gpu.py's, 24; 2026-12-07's profile "
                   "ran 12)")
    args = p.parse_args()
    # decode_gpu imports JAX: keep it off the GPU, as decode_gpu.py's FLA cells do
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import torch
    from decode_gpu import fla_generate, fla_kernel_time, fla_model
    from torch.profiler import ProfilerActivity, profile

    sizes = argparse.Namespace(d_model=1024, layers=12, vocab=8192, max_seq_len=512,
                               mamba2_layers=args.mamba2_layers)
    model = fla_model(args.model, sizes, torch)
    ids = torch.randint(0, sizes.vocab, (args.batch, 16), device="cuda")

    def gen(k: int) -> float:
        return fla_generate(model, ids, k, torch)

    gen(4)  # warm-up (Triton autotuning)
    wall = (gen(args.steps) - gen(1)) / (args.steps - 1)

    gpu, kernels = fla_kernel_time(gen, args.steps, torch)
    print(json.dumps({"model": args.model, "batch": args.batch, "device":
                      torch.cuda.get_device_name(), "torch": torch.__version__,
                      "wall_ms_per_step": wall * 1e3, "gpu_kernel_ms_per_step": gpu * 1e3,
                      "kernels_per_step": kernels}), flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen(args.steps)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                    max_name_column_width=50))


if __name__ == "__main__":
    main()
