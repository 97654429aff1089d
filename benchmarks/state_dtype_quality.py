"""What a 16-bit decode state costs in quality: a trained checkpoint reads held-out text
one token per recurrent-mode call (teacher forcing, the call a decode step makes), from an
empty state kept in float32, bfloat16 or float16 between calls
(``core.cache.cast_recurrent``, what ``Decoder(state_dtype=...)`` does after its float32
prefill; here there is no prefill, so every token goes through the 16-bit state), and
reports per dtype the mean next-token loss, its difference from float32's, how often the
greedy token agrees with float32's, the largest logit difference at a few depths and the
largest state entry met (float16 overflows past 65,504).

Usage (any machine; seconds to minutes on a CPU for the small presets)::

    python train_lm.py --model mamba2-small --max-steps 600 --out runs/m2   # a checkpoint
    python benchmarks/state_dtype_quality.py --checkpoint runs/m2 --tokens 2048 --batch 8

The text is the end of the repository's TinyShakespeare copy (the part ``train_lm.py``
holds out for validation: its last 10%), cut into ``--batch`` rows of ``--tokens``. The
chunked (parallel) forward's loss over the same rows is printed beside them: float32's
recurrent loss should equal it.
``--quick``: a random 2-layer Mamba2, a few hundred tokens (a smoke test; no checkpoint).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from linearnexus.core.cache import RecurrentState, cast_recurrent  # noqa: E402

TEXT = ROOT / "linearnexus" / "assets" / "tinyshakespeare.txt"
DTYPES = ("float32", "bfloat16", "float16")


def held_out_rows(tokenizer: Any, batch: int, tokens: int) -> np.ndarray:
    """``[batch, tokens + 1]`` int32 ids from the last 10% of TinyShakespeare."""
    text = TEXT.read_text(encoding="utf-8")
    ids = np.asarray(tokenizer.encode(text[int(len(text) * 0.9):]), np.int32)
    need = batch * (tokens + 1)
    if ids.size < need:
        raise ValueError(f"--batch x (--tokens + 1) = {need} tokens: the held-out text has "
                         f"{ids.size}")
    return ids[:need].reshape(batch, tokens + 1)  # [B, T + 1]


def teacher_forced(model: Any, rows: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """Feed ``rows[:, :-1]`` one token a step from an empty state kept in ``dtype``:
    per-position losses ``[B, T]``, greedy tokens ``[B, T]`` and logits at a few depths."""
    graphdef, params = nnx.split(model)
    inputs = jnp.asarray(rows[:, :-1])  # [B, T]
    targets = jnp.asarray(rows[:, 1:])

    @jax.jit
    def run(params, inputs, targets):
        state = cast_recurrent(nnx.merge(graphdef, params).init_state(inputs.shape[0]), dtype)

        def step(state, xs):
            tok, target = xs  # [B] each
            logits, state = nnx.merge(graphdef, params)(tok[:, None], state=state,
                                                        mode="recurrent")  # [B, 1, V]
            logits = logits[:, 0].astype(jnp.float32)  # [B, V]
            loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], 1)[:, 0]
            big = jnp.max(jnp.stack([  # the largest |entry| of every recurrent state
                jnp.max(jnp.abs(r.state.astype(jnp.float32))) for r in jax.tree.leaves(
                    state, is_leaf=lambda v: isinstance(v, RecurrentState))
                if isinstance(r, RecurrentState)]))
            return state, (loss, jnp.argmax(logits, -1), logits, big)

        _, (loss, greedy, logits, big) = jax.lax.scan(step, state, (inputs.T, targets.T))
        return loss.T, greedy.T, logits, jnp.max(big)  # [B, T], [B, T], [T, B, V], []

    loss, greedy, logits, big = run(params, inputs, targets)
    return {"loss": np.asarray(loss), "greedy": np.asarray(greedy), "logits": np.asarray(logits),
            "max_abs_state": float(big)}


def chunked_loss(model: Any, rows: np.ndarray) -> float:
    """Mean next-token loss of the parallel (chunked) forward over the same rows."""
    logits, _ = model(jnp.asarray(rows[:, :-1]))  # [B, T, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(rows[:, 1:])[..., None], -1)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a train_lm.py run folder")
    p.add_argument("--tokens", type=int, default=2048, help="tokens decoded per row")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--quick", action="store_true", help="a random tiny model (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="folder for state_dtype_quality.json")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.batch < 1:
        p.error("--tokens, --batch: expected >= 1")
    if args.quick:
        from linearnexus.data import CharTokenizer
        from linearnexus.models import create_model

        tokenizer = CharTokenizer.from_text(TEXT.read_text(encoding="utf-8"))
        model = create_model("mamba2-small", seed=0, vocab_size=tokenizer.vocab_size,
                             n_layers=2, d_model=64)
        args.tokens, args.batch, source = min(args.tokens, 200), min(args.batch, 2), "random"
    else:
        if args.checkpoint is None:
            p.error("--checkpoint: required (or --quick)")
        from linearnexus.train import load_checkpoint

        model, _, extra = load_checkpoint(args.checkpoint)
        tokenizer, source = extra["tokenizer"], str(extra["path"])
    rows = held_out_rows(tokenizer, args.batch, args.tokens)
    runs = {dtype: teacher_forced(model, rows, dtype) for dtype in args.dtypes}
    base = runs.get("float32")
    depths = [d for d in (1, 10, 100, 1000, 10000) if d <= args.tokens]
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__, "device": jax.devices()[0].device_kind,
        "machine": platform.processor() or platform.machine(), "checkpoint": source,
        "params": model.num_params(), "batch": args.batch, "tokens": args.tokens,
        "chunked_loss": chunked_loss(model, rows), "dtypes": {}}
    print(f"{source}: {model.num_params():,} parameters, {args.batch} x {args.tokens} held-out "
          f"tokens; chunked forward loss {result['chunked_loss']:.4f}")
    print("| state dtype | loss | vs float32 | greedy agrees | max |logit diff| at depth "
          + " / ".join(map(str, depths)) + " | max |state| |")
    print("|---|---:|---:|---:|---|---:|")
    for dtype, run in runs.items():
        loss = float(run["loss"].mean())
        row = {"loss": loss, "max_abs_state": run["max_abs_state"]}
        if base is not None:
            row["loss_minus_float32"] = loss - float(base["loss"].mean())
            row["greedy_agreement"] = float((run["greedy"] == base["greedy"]).mean())
            row["max_logit_diff_at_depth"] = {
                str(d): float(np.abs(run["logits"][d - 1] - base["logits"][d - 1]).max())
                for d in depths}
        result["dtypes"][dtype] = row
        diffs = " / ".join(f"{v:.2e}" for v in row.get("max_logit_diff_at_depth", {}).values())
        print(f"| {dtype} | {loss:.4f} | {row.get('loss_minus_float32', 0.0):+.5f} | "
              f"{100 * row.get('greedy_agreement', 1.0):.2f}% | {diffs} | "
              f"{row['max_abs_state']:.3g} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "state_dtype_quality.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
