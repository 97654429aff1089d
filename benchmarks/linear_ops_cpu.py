"""Linear-attention ops on the CPU: chunked form vs the per-step reference.

    python benchmarks/linear_ops_cpu.py [--quick] [--ops simple_gla gla ...] [--docs]

A wrapper of ``python benchmarks/run.py --preset linear-ops-cpu --blocks`` (no blocks): every
linear-attention op at B=2, T=2048, H=4, K=V=64, float32, per-step reference (backend
"naive") and chunked form (backend "jax", mode "chunk") at chunk sizes 16, 32, 64 and the
op's default, forward and forward+backward, with the speed-up over the reference. Other
``run.py`` flags pass through.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import main  # noqa: E402

if __name__ == "__main__":
    main(["--preset", "linear-ops-cpu", "--blocks", *sys.argv[1:]])
