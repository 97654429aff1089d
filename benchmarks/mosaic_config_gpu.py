"""Time one op's ``mosaic`` backend at several tile configs, through the api, in one process.

    python3 benchmarks/mosaic_config_gpu.py [--op simple_gla] [--shapes 2,16384,16,128 ...]
        [--configs "" block_v=32 "block_v=32,stages=1" ...] [--fwd-only] [--budget 200]
        [--out DIR]

Each config is ``name=value`` pairs of :class:`MosaicConfig` fields, comma-separated (``""``:
the heuristic's own); a pair whose name starts with ``LINEARNEXUS_`` sets that environment
variable while the config's functions trace and run (the kernels' switches, e.g.
``LINEARNEXUS_MOSAIC_WY_BWD=1``). Per shape and config: the forward and the forward + backward (the
gradient of ``sum(o * do)`` w.r.t. every input) through ``<op>(..., backend="mosaic")``
with the config set on the backend (as the tuning cache would), on
``kernels_gpu.host_time`` (host clock around back-to-back calls, median of 5, inputs
rotated past L2), bf16, ``kernels_gpu.jax_inputs``'s recipe; and the output's distance to
the first config's, ``||o - o_0|| / ||o_0||`` (configs change tiling, not math). A config
that the backend refuses is reported with its error. Cells not started inside ``--budget``
seconds are marked skipped; the JSON (``mosaic_config_gpu.json`` under ``--out``) is
rewritten after every cell.

The question it was written for (docs/benchmarks.md, "Mosaic GPU beside FLA in one run"):
at (2, 16384, 16, 128) simple_gla's walk has 64 programs for 132 SMs at value blocks of 64;
value blocks of 32 double them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels_gpu as kg  # noqa: E402  (the shared input recipe and timing)

from linearnexus.kernels.common.mosaic_chunk import MosaicConfig  # noqa: E402

OPS = ("simple_gla", "gla", "delta_rule", "gated_delta_rule")


#: config parts naming an environment variable (:func:`config_env`)
ENV_PREFIX = "LINEARNEXUS_"


def config_env(text: str) -> dict[str, str]:
    """The ``LINEARNEXUS_*=value`` parts of a config's text, as ``{name: value}``."""
    pairs = (p.strip().partition("=") for p in text.split(","))
    return {name: value for name, sep, value in pairs if sep and name.startswith(ENV_PREFIX)}


def parse_config(text: str) -> MosaicConfig:
    """``"block_v=32,stages=1"`` -> ``MosaicConfig(block_v=32, stages=1)``; ``""``: all None.

    Raises:
        ValueError: an unknown field or a value that is not an int, a bool or a name.
    """
    fields = {f.name for f in dataclasses.fields(MosaicConfig)}
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if sep and name.startswith(ENV_PREFIX):
            continue  # (config_env's)
        if not sep or name not in fields:
            raise ValueError(f"--configs: expected name=value with a MosaicConfig field "
                             f"({', '.join(sorted(fields))}), got {part!r}")
        if value in ("True", "False"):
            kwargs[name] = value == "True"
        elif value.isdigit():
            kwargs[name] = int(value)
        else:
            kwargs[name] = value
    return MosaicConfig(**kwargs)


def time_config(op: str, shape: tuple[int, ...], config: Any, sets: list, n_sets: int,
                do: Any, fwd_only: bool, backend: str = "mosaic") -> dict[str, Any]:
    """``{"fwd": timing, "fwd_bwd": timing, "o": output}`` of ``op`` through the api on
    ``backend`` with ``config`` set on that backend (None: its own resolution)."""
    api = importlib.import_module(f"linearnexus.kernels.{op}.api")
    fn = getattr(api, op)
    kernel = api.BACKENDS[backend]
    before, kernel.config = kernel.config, config
    try:
        def fwd(*a):
            return fn(*a, backend=backend, mode="chunk")[0]

        def loss(do, *a):
            return jnp.sum(fwd(*a).astype(jnp.float32) * do.astype(jnp.float32))

        f = jax.jit(fwd)
        out = {"fwd": kg.host_time(lambda i: f(*sets[i % n_sets]), kg.jax_sync, repeats=5,
                                   n_sets=n_sets)}
        if not fwd_only:
            fb = jax.jit(jax.grad(loss, argnums=tuple(range(1, len(sets[0]) + 1))))
            out["fwd_bwd"] = kg.host_time(lambda i: fb(do, *sets[i % n_sets]), kg.jax_sync,
                                          repeats=5, n_sets=n_sets)
        out["o"] = f(*sets[0])
        return out
    finally:
        kernel.config = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=OPS, default="simple_gla")
    parser.add_argument("--shapes", nargs="+", default=["2,16384,16,128"], help="B,T,H,D each")
    parser.add_argument("--configs", nargs="+", default=["", "block_v=32"])
    parser.add_argument("--fwd-only", action="store_true")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    try:
        configs = [(text or "heuristic", parse_config(text), config_env(text))
                   for text in args.configs]
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    except ValueError as e:
        parser.error(str(e))
    for shape in shapes:
        if len(shape) != 4 or min(shape) < 1:
            parser.error(f"--shapes: expected B,T,H,D of positive integers, got {shape}")
    start = time.perf_counter()
    results: dict[str, Any] = {"op": args.op, "device": str(jax.devices()[0].device_kind),
                               "jax": jax.__version__,
                               "linearnexus_source": kg.source_digest(), "rows": []}

    def save() -> None:
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "mosaic_config_gpu.json"), "w") as f:
                json.dump(results, f, indent=1)

    for shape in shapes:
        B, T, H, D = shape
        inputs = kg.jax_inputs(args.op, jax.random.PRNGKey(0), B, T, H, D, D, jnp.bfloat16)
        n_sets = kg.input_sets(kg.input_bytes(args.op, B, T, H, D, D), 50 * 2**20)
        sets = [tuple(inputs.values())]
        for _ in range(1, n_sets):  # fresh copies, so that no call reads another's from L2
            sets.append(tuple(x + 0 for x in sets[0]))
        do = jax.random.normal(jax.random.PRNGKey(1), (B, T, H, D), jnp.bfloat16)
        first = None
        for name, config, env in configs:
            row: dict[str, Any] = {"shape": list(shape), "config": name}
            saved = {k: os.environ.get(k) for k in env}
            if time.perf_counter() - start > args.budget:
                row["skipped"] = "budget spent"
            else:
                os.environ.update(env)  # read when the functions trace
                try:
                    out = time_config(args.op, shape, config, sets, n_sets, do, args.fwd_only)
                    row["fwd_ms"] = round(out["fwd"]["ms"], 4)
                    if "fwd_bwd" in out:
                        row["fwd_bwd_ms"] = round(out["fwd_bwd"]["ms"], 4)
                    o = out["o"].astype(jnp.float32)
                    if first is None:
                        first = o
                    row["rel_to_first"] = float(jnp.linalg.norm(o - first)
                                                / jnp.linalg.norm(first))
                except (NotImplementedError, ValueError) as e:
                    row["error"] = kg.short_error(e)
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
            results["rows"].append(row)
            print(row, flush=True)
            save()


if __name__ == "__main__":
    main()
