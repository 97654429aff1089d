"""``sample.py``: print text sampled from a checkpoint written by ``train_lm.py``.

Examples::

    python sample.py --checkpoint runs/demo                       # latest checkpoint of a run
    python sample.py --checkpoint runs/demo/checkpoints/500 --prompt "ROMEO:" --num-samples 3
    python sample.py --checkpoint runs/demo --stream --max-tokens 1000 --temperature 0.7
    python sample.py --hf ~/models/mamba-130m-hf --prompt "The capital of France"   # HF checkpoint
    python sample.py --serve-bench 64 --preset mamba-small --slots 16 --max-tokens 128

The model config and the tokenizer come from the checkpoint itself. An empty prompt starts
from the tokenizer's end-of-text token, or a newline for character-level models. Models
with attention sample with a sliding context no longer than their training ``seq_len``
(``--window``), since they never learned positions past it.
Exit status: 0, or 2 for bad arguments (including a prompt the tokenizer cannot encode).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from linearnexus.cli import UsageError, int_at_least, run_reporting_usage_errors

SEPARATOR = "---------------"


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0 = greedy), got {text}")
    return value


def _top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py", description="Sample text from a LinearNexus checkpoint.")
    # one model source; checked in _run, since --serve-bench may take --preset instead
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH",
                     help="a run folder (its newest checkpoint that verifies) or a step folder "
                          "<run>/checkpoints/<step>")
    src.add_argument("--hf", metavar="PATH",
                     help="a Hugging Face checkpoint folder (Mamba, Mamba2, GLA, Gated DeltaNet: "
                          "config.json, *.safetensors, tokenizer.json); see docs/hf.md")
    p.add_argument("--prompt", default="",
                   help="text to continue (default '': the start of a text)")
    p.add_argument("--max-tokens", type=int_at_least(1), default=500,
                   help="new tokens per sample (default 500)")
    p.add_argument("--temperature", type=_temperature, default=0.8,
                   help="sampling temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int_at_least(0), default=200,
                   help="sample from the k likeliest tokens, 0 = off (default 200)")
    p.add_argument("--top-p", type=_top_p, default=None,
                   help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--num-samples", type=int_at_least(1), default=1,
                   help="samples to print (default 1)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are sampled")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="sampling seed (default 0)")
    p.add_argument("--window", type=int_at_least(0), default=None,
                   help="context window in tokens, 0 = unlimited (default: the training "
                        "seq_len for models with attention, unlimited for recurrent ones)")
    p.add_argument("--state-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="recurrent states' dtype between decode steps: bfloat16 / float16 halve "
                        "their bytes per step and round the state once a token (default: "
                        "float32); see docs/generation.md")
    p.add_argument("--verify-checkpoints", choices=("full", "sizes", "off"), default="full",
                   help="check the checkpoint against its manifest first: SHA-256 and sizes, "
                        "sizes only, or nothing (default full)")
    bench = p.add_argument_group("serving benchmark (continuous batching, linearnexus.serving)")
    bench.add_argument("--serve-bench", type=int_at_least(1), default=None, metavar="N",
                       help="time N random requests (prompts of 1..64 tokens, 1..--max-tokens new "
                            "tokens) through continuous batching vs static batches; prints JSON "
                            "(default: off)")
    bench.add_argument("--slots", type=int_at_least(1), default=16,
                       help="batch slots of the continuous batcher and static batch size "
                            "(default 16)")
    bench.add_argument("--preset", default=None,
                       help="with --serve-bench: a randomly initialised model preset instead of "
                            "--checkpoint (default: none)")
    return p


def default_window(model: Any, train_config: dict[str, Any] | None) -> int | None:
    """The context window to sample with: the training ``seq_len`` for models with
    attention layers (positions past it were never trained, and quality drops there:
    a char GPT trained at T=64 has ~1.6 nats/char loss at positions < 64 but ~2.6 past 128),
    None (unlimited) for purely recurrent models or when the training length is unknown."""
    from linearnexus.generate import cache_limit

    if cache_limit(model) is None or not train_config or not train_config.get("seq_len"):
        return None
    return int(train_config["seq_len"])


def _windows(prompt_len: int, max_new: int, window: int | None) -> Iterator[tuple[int, int]]:
    """``(context tokens to keep, tokens to generate)`` per round. One round when it all
    fits the window; else the context slides: each later round keeps the last
    ``window // 2`` tokens (like nanoGPT's crop to block_size, but re-prompting every half
    window instead of every token, so the KV cache is reused in between)."""
    if window is None or prompt_len + max_new <= window:
        yield prompt_len, max_new
        return
    if window < 2:
        raise ValueError(f"window: must be >= 2, got {window}")
    keep = min(prompt_len, window - 1)
    produced = 0
    while produced < max_new:
        n = min(window - keep, max_new - produced)
        yield keep, n
        produced += n
        keep = window // 2


def sample_texts(model: Any, tokenizer: Any, prompt: str, cfg: Any, num_samples: int = 1,
                 window: int | None = None, state_dtype: str | None = None) -> list[str]:
    """``generate_text`` with a sliding context of at most ``window`` tokens (None = the
    whole text) and ``generate``'s ``state_dtype``. Returns ``prompt`` + continuation per
    sample."""
    from linearnexus.generate import generate, start_tokens

    ids = list(tokenizer.encode(prompt)) if prompt else start_tokens(tokenizer)
    rows = [list(ids) for _ in range(num_samples)]
    new: list[list[int]] = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    for i, (keep, n) in enumerate(_windows(len(ids), cfg.max_new_tokens, window)):
        outs = generate(model, [r[-keep:] for r in rows],
                        cfg.replace(max_new_tokens=n, seed=cfg.seed + i), state_dtype=state_dtype)
        for r, out in enumerate(outs):
            if not done[r]:
                rows[r].extend(out)
                new[r].extend(out)
                done[r] = len(out) < n  # sampled a stop token
        if all(done):
            break
    return [prompt + tokenizer.decode(t) for t in new]


def stream_ids(model: Any, ids: list[int], cfg: Any, window: int | None = None,
               state_dtype: str | None = None) -> Iterator[int]:
    """``generate.stream`` with a sliding context of at most ``window`` tokens."""
    from linearnexus.generate import stream

    rows = list(ids)
    for i, (keep, n) in enumerate(_windows(len(ids), cfg.max_new_tokens, window)):
        got = 0
        for tok in stream(model, rows[-keep:], cfg.replace(max_new_tokens=n, seed=cfg.seed + i),
                          state_dtype=state_dtype):
            rows.append(tok)
            got += 1
            yield tok
        if got < n:  # a stop token
            return


def _stream_text(tokenizer: Any, ids: Iterator[int]) -> Iterator[str]:
    """Decoded text pieces as ids arrive. Decodes the whole tail each time and holds back a
    trailing partial UTF-8 character (BPE tokens can split one)."""
    out: list[int] = []
    shown = 0
    for tok in ids:
        out.append(tok)
        text = tokenizer.decode(out)
        if text.endswith("\ufffd"):
            continue
        yield text[shown:]
        shown = len(text)
    text = tokenizer.decode(out) if out else ""
    if len(text) > shown:
        yield text[shown:]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stream and args.num_samples > 1:
        parser.error("--stream: prints one sample; drop --num-samples")
    return run_reporting_usage_errors(parser, args, _run)


def _serve_bench(args: argparse.Namespace) -> int:
    import json

    from linearnexus.generate import SamplingConfig
    from linearnexus.serving import serve_bench

    if args.hf:
        model = _load_hf(args.hf)[0]
    elif args.preset:
        from linearnexus.models import create_model

        try:
            model = create_model(args.preset, seed=args.seed)
        except KeyError as e:
            raise UsageError(f"--preset: {e.args[0]}") from None
    else:
        from linearnexus.train import load_checkpoint

        try:
            model = load_checkpoint(args.checkpoint, verify=args.verify_checkpoints)[0]
        except FileNotFoundError as e:
            raise UsageError(f"--checkpoint: {e}") from None
    cfg = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=args.seed)
    print(json.dumps(serve_bench(model, args.serve_bench, slots=args.slots, cfg=cfg,
                                 max_new=args.max_tokens, state_dtype=args.state_dtype), indent=1))
    return 0


def _run(args: argparse.Namespace) -> int:
    from linearnexus.generate import SamplingConfig, start_tokens

    sources = [name for name in ("checkpoint", "hf", "preset") if getattr(args, name)]
    if args.serve_bench is None and args.preset:
        raise UsageError("--preset: only with --serve-bench (sampling text needs --checkpoint)")
    if args.serve_bench is not None:
        if len(sources) != 1:
            raise UsageError("--serve-bench: give exactly one of --checkpoint, --hf and --preset")
        return _serve_bench(args)
    if not sources:
        raise UsageError("--checkpoint: required (a run folder or <run>/checkpoints/<step>), "
                         "or --hf PATH")
    if args.hf is not None:
        model, extra = _load_hf(args.hf)
    else:
        from linearnexus.train import load_checkpoint

        try:  # a checkpoint that fails verification is skipped with a warning
            model, _, extra = load_checkpoint(args.checkpoint, verify=args.verify_checkpoints)
        except FileNotFoundError as e:
            raise UsageError(f"--checkpoint: {e}") from None
    tokenizer = extra["tokenizer"]
    if tokenizer is None:
        raise UsageError(f"--checkpoint: {extra['path']} holds no tokenizer (it was not trained "
                         "with train_lm.py); cannot turn the prompt into ids")
    eos = tokenizer.eos_id
    cfg = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         max_new_tokens=args.max_tokens, seed=args.seed,
                         stop_tokens=() if eos is None else (eos,))
    window = (default_window(model, extra["train_config"]) if args.window is None
              else args.window or None)
    val = extra["metrics"].get("val_loss")
    print(f"# {extra['path']} (step {extra['step']}, val loss "
          f"{'n/a' if val is None else f'{val:.4f}'}, window {window or 'off'})", file=sys.stderr)
    try:
        if args.stream:
            ids = tokenizer.encode(args.prompt) if args.prompt else start_tokens(tokenizer)
            pieces = _stream_text(tokenizer, stream_ids(model, ids, cfg, window, args.state_dtype))
            sys.stdout.write(args.prompt)
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            for text in sample_texts(model, tokenizer, args.prompt, cfg, args.num_samples, window,
                                     args.state_dtype):
                print(text)
                print(SEPARATOR)
    except ValueError as e:  # unencodable prompt, prompt + max tokens over the cache size
        raise UsageError(str(e)) from None
    return 0


def _load_hf(path: str) -> tuple[Any, dict[str, Any]]:
    """(model, the ``extra`` dict of a run checkpoint) for a Hugging Face checkpoint folder."""
    from linearnexus import hf

    try:
        model = hf.from_pretrained(path)
        tokenizer = hf.load_tokenizer(path)
    except (FileNotFoundError, hf.UnsupportedCheckpointError) as e:
        raise UsageError(f"--hf: {e}") from None
    return model, {"tokenizer": tokenizer, "path": path, "step": "pretrained", "metrics": {},
                   "train_config": None}


if __name__ == "__main__":
    sys.exit(main())
