"""Bad values through the ``mosaic`` backend's guard on a GPU: the same NaN as the reference.

The Mosaic GPU kernels fold a non-finite q row into the final state (``(q S_c) * 0`` added
to the state update; ``kernels/common/mosaic_chunk.py``, "Finite outputs") and a positive
log-gate too (made NaN with the floor), so the api's guard (``validation.run_guarded``)
reads only the final states, not the outputs or the log-gates. Whether ``x * 0`` survives the
compiler and the tensor cores' NaN handling is a question for the hardware: this script
injects bad values and compares, exactly, where the outputs, final states and gradients are
NaN against the ``jax`` backend (float32, the chunked form under the same guard, which
still reads its outputs), and the finite values within 5e-3 (outputs, states) / 1e-2
(gradients), under ``jax.value_and_grad`` and in a plain forward call. For a bad q the
outputs alone cannot tell (the walk's own output is already causal for q): the gradients
can (all NaN only if the guard saw the bad row), and so can the raw kernel's final state,
checked NaN for that row and head (``raw final``; likewise after a positive log-gate, which
the kernels mark too, GLA's ``[B, T, H, K]`` ones included)::

    python3 benchmarks/guard_nan_gpu.py [--ops simple_gla gated_delta_rule delta_rule gla]
        [--seq-split N [--seq-split-grad]] [--out DIR]

``--seq-split N`` runs simple_gla's plain forward split in N segments by entering states
(``MosaicConfig(seq_split=N)`` on the mosaic backend; under a gradient one walk runs, or
with ``--seq-split-grad`` the split's own backward), the raw final state then the split's;
packed cases are skipped (the split takes batch rows).

Cases per op, bf16 (2, 1000, 4, 64) and packed (1, 1000) in sequences of 300, 1 and 699: a
NaN in one q entry and +inf in one (the cases the state marks for the guard; the second
in the padded last chunk), NaN in k, +inf in v, a positive log-gate and a NaN one (traced;
GLA's in one key dim), and clean inputs. Prints one PASS / FAIL line per case and
writes ``guard_nan_gpu.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels_gpu as kg  # noqa: E402  (the shared input recipe)

OPS = ("simple_gla", "gated_delta_rule", "delta_rule", "gla")
CASES = ("clean", "q_nan", "q_inf", "k_nan", "v_inf", "g_positive", "g_nan")
#: (input, head, column, value) of each bad case; the step is the script's row / step, or
#: for "q_inf" one in the padded last chunk (T = 1000 is not a multiple of 64)
BAD = {"q_nan": ("q", 1, 5, jnp.nan), "q_inf": ("q", 0, 1, jnp.inf), "k_nan": ("k", 2, 0, jnp.nan),
       "v_inf": ("v", 0, 7, jnp.inf), "g_positive": ("g", 3, None, 0.5),
       "g_nan": ("g", 2, None, jnp.nan)}
LATE_STEP = 995


def _bad(case: str, inputs: dict[str, jax.Array], row: int, t: int) -> dict[str, jax.Array]:
    out = dict(inputs)
    if case in BAD and BAD[case][0] in out:
        name, head, col, value = BAD[case]
        if name == "g" and out[name].ndim == 4:  # GLA: one key dim's gate
            col = 5
        step = LATE_STEP if case == "q_inf" else t
        at = (row, step, head) if col is None else (row, step, head, col)
        out[name] = out[name].at[at].set(value)
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    keep = np.isfinite(b)
    if not keep.any():
        return 0.0
    return float(np.linalg.norm(a[keep] - b[keep]) / max(np.linalg.norm(b[keep]), 1e-30))


#: the mosaic backend's config for simple_gla (``--seq-split``), None: its own
SPLIT_CONFIG: dict[str, object] = {"config": None}


def _raw_final(op: str, inputs: dict[str, jax.Array], cu: jax.Array | None) -> np.ndarray:
    """The mosaic kernel's final states called directly (no guard): NaN after a bad q row or
    a positive log-gate."""
    from linearnexus.kernels.common.mosaic_ops import delta_rule_mosaic, linear_attention_mosaic
    from linearnexus.kernels.gla.mosaic import gla_mosaic

    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    scale = q.shape[-1] ** -0.5
    if op == "gla":
        _, final = gla_mosaic(q, k, v, inputs["g"], scale=scale, cu_seqlens=cu)
    elif op == "simple_gla":
        _, final = linear_attention_mosaic(q, k, v, inputs["g"], scale=scale, cu_seqlens=cu,
                                           config=SPLIT_CONFIG["config"])
    else:
        _, final = delta_rule_mosaic(q, k, v, inputs["beta"], inputs.get("g"), scale=scale,
                                     cu_seqlens=cu)
    return np.asarray(final)


def check(op: str, packed: bool, backend: str = "mosaic") -> list[dict]:
    fn = getattr(importlib.import_module(f"linearnexus.kernels.{op}.api"), op)
    B, T, H, D = (1, 1000, 4, 64) if packed else (2, 1000, 4, 64)
    cu = jnp.array([0, 300, 301, 1000], jnp.int32) if packed else None
    clean = kg.jax_inputs(op, jax.random.PRNGKey(7), B, T, H, D, D, jnp.bfloat16)
    names = list(clean)
    row, t = (0, 640) if packed else (1, 500)

    def make(backend: str):
        def call(arrays, cu):
            return fn(*arrays, backend=backend, mode="chunk", output_final_state=True,
                      cu_seqlens=cu)

        def loss(arrays, cu):
            o, final = call(arrays, cu)
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final), (o, final)

        return jax.jit(jax.value_and_grad(loss, has_aux=True)), jax.jit(call)

    runs = {"mosaic": make(backend), "jax": make("jax")}
    rows = []
    for case in CASES:
        if case in BAD and BAD[case][0] not in clean:
            continue
        inputs = _bad(case, clean, row, t)
        arrays = [inputs[n] for n in names]
        got = {}
        for name, (grad_run, plain_run) in runs.items():
            xs = arrays if name == "mosaic" else [
                a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in arrays]
            (_, (o, final)), grads = grad_run(xs, cu)
            o_plain, final_plain = plain_run(xs, cu)
            got[name] = [np.asarray(x, np.float32)
                         for x in (o, final, *grads, o_plain, final_plain)]
        labels = ["o", "final", *(f"d{n}" for n in names), "o (plain)", "final (plain)"]
        result = {"op": op, "packed": packed, "case": case, "ok": True, "errors": {}}
        for label, a, b in zip(labels, got["mosaic"], got["jax"], strict=True):
            same_nan = np.array_equal(np.isnan(a), np.isnan(b))
            err = _rel(a, b)
            tol = 1e-2 if label.startswith("d") else 5e-3
            result["errors"][label] = {"same_nan": same_nan, "nan": int(np.isnan(b).sum()),
                                       "rel": err}
            result["ok"] &= bool(same_nan and err <= tol)
        if case in ("q_nan", "q_inf", "g_positive", "g_nan") and backend == "mosaic":
            head = BAD[case][1]
            state = 2 if packed else row  # packed: the third sequence holds both steps
            raw = _raw_final(op, inputs, cu)
            result["raw final NaN"] = bool(np.isnan(raw[state, head]).all())
            result["ok"] &= result["raw final NaN"]
        rows.append(result)
        print(("PASS " if result["ok"] else "FAIL ") + f"{op:17s} {'packed' if packed else 'dense '} "
              f"{case:11s} " + " ".join(
                  f"{k}={v['rel']:.1e}{'' if v['same_nan'] else ' NaN-MISMATCH'}(nan {v['nan']})"
                  for k, v in result["errors"].items())
              + (f" raw-final-NaN={result['raw final NaN']}" if "raw final NaN" in result else ""),
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--backend", default="mosaic",
                        help="the backend checked against jax (another one: a CPU dry run)")
    parser.add_argument("--seq-split", type=int, default=None,
                        help="simple_gla's plain forward split in this many segments")
    parser.add_argument("--seq-split-grad", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="with --seq-split: the gradient split too, or not (seq_split_grad; "
                             "unset: the default, mosaic_ops.SPLIT_GRAD)")
    args = parser.parse_args()
    if args.seq_split_grad is not None and args.seq_split is None:
        parser.error("--seq-split-grad: needs --seq-split N")
    if args.seq_split is not None:
        if args.seq_split < 2 or args.ops != ["simple_gla"]:
            parser.error(f"--seq-split: expected >= 2 with --ops simple_gla, got "
                         f"{args.seq_split} with {args.ops}")
        from linearnexus.kernels.common.mosaic_chunk import MosaicConfig
        from linearnexus.kernels.simple_gla.api import BACKENDS

        SPLIT_CONFIG["config"] = MosaicConfig(seq_split=args.seq_split,
                                              seq_split_grad=args.seq_split_grad)
        BACKENDS["mosaic"].config = SPLIT_CONFIG["config"]
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}", flush=True)
    rows = []
    for op in args.ops:
        for packed in ((False,) if args.seq_split else (False, True)):
            try:
                rows += check(op, packed, args.backend)
            except Exception as exc:  # noqa: BLE001  (a failed op is reported, the rest run)
                print(f"ERROR {op} packed={packed}: {type(exc).__name__}: {str(exc)[:300]}")
                rows.append({"op": op, "packed": packed, "error": f"{type(exc).__name__}: {exc}"})
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "guard_nan_gpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
