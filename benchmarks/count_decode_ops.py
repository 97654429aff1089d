"""Ops per layer in a one-token decode step, counted from the compiled programs (no device).

    python3 benchmarks/count_decode_ops.py [--models gdn mamba2] [--d-model 256]

For each model of ``benchmarks/decode_gpu.py`` (small widths: the counts do not depend on
them) it builds the model with 1 and with 2 layers and counts, in the step
``decode_step(params, tokens [B, 1], state, key)``:

* ``stablehlo``: StableHLO ops of the step lowered for CUDA
  (``lower(lowering_platforms=("cuda",))``, before any fusion; on a CPU host the fused
  one-token Pallas kernels are not picked, so the pure-JAX recurrent form is counted);
* ``fusions`` / ``dots`` / ``other`` / ``kernels`` (their sum): the instructions of the
  loop body that XLA compiles from the on-device decode loop (``Decoder.run``) for the
  default backend. On a GPU each is one kernel launch (``dots`` counts dots and custom
  calls: there the Pallas kernels, while XLA:GPU's matmuls are fusions; run with
  ``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` so the body is not wrapped in command
  buffers); on a CPU, XLA:CPU's, a proxy. ``--hlo DIR`` writes the compiled loops.
  Parameters, tuples, constants and bitcasts launch nothing and are not counted.

``--lower-gpu`` (a CPU host): the step lowered for CUDA with the fused Pallas kernels picked
as on a GPU (their Triton lowering runs on the host, so this also checks that they lower):
its StableHLO ops and Pallas kernels, no compiled loop.

The 2-layer count minus the 1-layer count is one layer's share. ``LINEARNEXUS_FUSED_DECODE=0``
counts the unfused one-token path (a projection matmul per weight).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_gpu import our_config  # noqa: E402
from profile_decode import body_opcodes  # noqa: E402

from linearnexus.generate import Decoder, SamplingConfig, decode_step, stop_array  # noqa: E402
from linearnexus.kernels.common.gpu_lowering import abstract_gpu  # noqa: E402
from linearnexus.kernels.common.pallas import INTERPRET_ENV  # noqa: E402
from linearnexus.models import create_model  # noqa: E402

#: XLA:CPU instructions that launch nothing on a GPU
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def counts(kind: str, layers: int, args: argparse.Namespace) -> dict[str, int]:
    cfg = our_config(kind, d=args.d_model, layers=layers, vocab=args.vocab,
                     dtype=args.dtype, max_seq_len=64)
    model = create_model(cfg, seed=0)
    dec = Decoder(model, SamplingConfig(temperature=0.0), weights="compute")
    graphdef, _ = nnx.split(model)
    sampler = SamplingConfig(temperature=0.0)
    tok = jnp.asarray(np.zeros((args.batch, 1)), jnp.int32)
    state = model.init_state(args.batch)
    key = jax.random.key(0)

    def step(params, tokens, state, key):
        return decode_step(graphdef, sampler, params, tokens, state, key)

    # on a CPU host JAX 0.11's Triton lowering needs a GPU to target
    target = abstract_gpu() if args.lower_gpu else contextlib.nullcontext()
    with target:
        text = jax.jit(step).trace(dec.inputs, tok, state, key).lower(
            lowering_platforms=("cuda",)).as_text()
    hlo_ops = len(re.findall(r"^\s*(?:%[\w#:]+(?:, %[\w#:]+)* = )?\"?stablehlo\.", text, re.M))
    if args.lower_gpu:  # no XLA:GPU compile on a CPU host: the lowered step's ops only
        calls = re.findall(r'stablehlo\.custom_call @([\w$.]+)', text)
        pallas = sum("triton" in c for c in calls)
        return {"stablehlo": hlo_ops, "pallas_kernels": pallas,
                "other_custom_calls": len(calls) - pallas}
    hlo = dec._compiled.loop.lower(
        dec.inputs, tok[:, 0], state, key, jnp.zeros(args.batch, bool), stop_array(()),
        jnp.int32(4), jnp.asarray(False), jnp.int32(0)).compile().as_text()
    if args.hlo:
        Path(args.hlo).mkdir(parents=True, exist_ok=True)
        (Path(args.hlo) / f"loop_{kind}_{layers}layers.hlo.txt").write_text(hlo)
    body = body_opcodes(hlo)
    fusions = body.get("fusion", 0)
    dots = body.get("dot", 0) + body.get("custom-call", 0)
    other = sum(n for op, n in body.items() if op not in _FREE) - fusions - dots
    return {"stablehlo": hlo_ops, "fusions": fusions, "dots": dots, "other": other,
            "kernels": fusions + dots + other, "_body": dict(body)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["gdn", "mamba2"],
                   choices=["gdn", "mamba2", "gpt"])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--hlo", default=None, help="folder for the compiled loops' HLO")
    p.add_argument("--verbose", action="store_true", help="print the loop body's opcodes")
    p.add_argument("--lower-gpu", action="store_true",
                   help="on a CPU host: lower the step for CUDA with the fused Pallas kernels "
                        "picked as on a GPU (Triton lowering runs here; checks they lower) and "
                        "count its StableHLO ops and Pallas kernels; no compiled loop")
    args = p.parse_args()
    if args.lower_gpu:
        # the kernels are picked where the platform reads "gpu" and interpret mode is off
        os.environ[INTERPRET_ENV] = "0"
        jax.default_backend = lambda: "cuda"
    rows = {}
    for kind in args.models:
        one, two = counts(kind, 1, args), counts(kind, 2, args)
        per_layer = {k: two[k] - one[k] for k in one if not k.startswith("_")}
        rows[kind] = per_layer
        print(f"{kind}: per layer {json.dumps(per_layer)}", flush=True)
        if args.verbose and not args.lower_gpu:
            diff = collections.Counter(two["_body"])
            diff.subtract(one["_body"])
            print("  body opcodes per layer:", dict(+diff))


if __name__ == "__main__":
    main()
