"""``train_lm.py``: train a language model on TinyShakespeare (or any text file).

Examples::

    python train_lm.py --model gpt-small --max-steps 600 --out runs/demo
    python train_lm.py --config configs/models/gpt_nanogpt_cpu.yaml --out runs/nanogpt
    python train_lm.py --out runs/nanogpt --resume            # continue a stopped run
    python train_lm.py --model mamba-small --tokenizer bpe --vocab-size 2048 --out runs/m
    python train_lm.py --init-hf ~/models/mamba-130m-hf --lr 1e-4 --out runs/ft   # docs/hf.md

Settings are resolved in this order (later wins): TrainConfig defaults; the preset
(``--model``, default gpt-small) or ``--config`` file; on ``--resume``, the configs saved in
the checkpoint; then every flag given on the command line. ``--config`` is either a
ModelConfig YAML or a file with ``model:`` and ``train:`` sections (see
``linearnexus.train.read_config_file`` and docs/training.md).

Exit status: 0 when training finished, 2 for bad arguments (or a run folder in use by
another run), 1 when a checkpoint could not be written (e.g. a full disk; the earlier ones
are kept), 130 / 143 when SIGINT / SIGTERM stopped it (after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from linearnexus.cli import UsageError, int_at_least, run_reporting_usage_errors

DEFAULT_PRESET = "gpt-small"
DEFAULT_SAMPLE_TOKENS = 200
# TrainConfig's defaults, repeated so --help needs no JAX import (tests check they agree)
TRAIN_DEFAULTS = {"max_steps": 2000, "batch_size": 12, "seq_len": 64, "lr": 1e-3,
                  "optimizer": "adamw", "eval_interval": 250, "eval_batches": 20,
                  "log_interval": 10, "seed": 0, "tokenizer": "char", "verify_checkpoints": "full"}

# flag -> TrainConfig field, for flags that override the train config when given
_TRAIN_FLAGS = {
    "max_steps": "max_steps",
    "batch_size": "batch_size",
    "seq_len": "seq_len",
    "lr": "lr",
    "optimizer": "optimizer",
    "warmup_steps": "warmup_steps",
    "eval_interval": "eval_interval",
    "eval_batches": "eval_batches",
    "checkpoint_interval": "checkpoint_interval",
    "log_interval": "log_interval",
    "seed": "seed",
    "tokenizer": "tokenizer",
    "vocab_size": "bpe_vocab_size",
    "data": "data",
    "verify_checkpoints": "verify_checkpoints",
    "init_hf": "init_hf",
    "mesh": "mesh",
}


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from linearnexus.registry import MODEL_REGISTRY  # cheap: names only, nothing imported

    default = TRAIN_DEFAULTS
    p = argparse.ArgumentParser(
        prog="train_lm.py",
        description="Train a LinearNexus language model (char or BPE tokens) with resumable "
                    "orbax checkpoints. Training flags left out come from --config, the "
                    "resumed run, or the defaults shown. See docs/training.md.")
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="PRESET", default=None,
                   help=f"model preset, one of: {', '.join(sorted(MODEL_REGISTRY))} "
                        f"(default {DEFAULT_PRESET} when no --config names one)")
    m.add_argument("--config", metavar="YAML", default=None,
                   help="a ModelConfig YAML, or a YAML with 'model:' and 'train:' sections")
    m.add_argument("--init-hf", metavar="PATH", default=None,
                   help="fine-tune a Hugging Face checkpoint folder (Mamba, Mamba2, GLA, Gated "
                        "DeltaNet; docs/hf.md): its model, weights and tokenizer")
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="PATH", default=None,
                   help="text file (default: TinyShakespeare: $LINEARNEXUS_SHAKESPEARE, the "
                        "cache, else the copy shipped with the package)")
    d.add_argument("--download-shakespeare", action="store_true",
                   help="download TinyShakespeare into the cache when the cache has no copy "
                        "(refresh it; otherwise the copy shipped with the package is used)")
    d.add_argument("--data-cache", metavar="DIR", default=None,
                   help="where the tokenized data is prepared (default <out>/data)")
    d.add_argument("--tokenizer", choices=("char", "bpe"), default=None,
                   help=f"character-level or byte-level BPE (default {default['tokenizer']})")
    d.add_argument("--vocab-size", type=int_at_least(257), default=None,
                   help="BPE vocabulary size (default 4096; only with --tokenizer bpe)")
    t = p.add_argument_group("training")
    t.add_argument("--max-steps", type=int_at_least(1), default=None,
                   help=f"optimizer steps in total (default {default['max_steps']})")
    t.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help=f"sequences per step (default {default['batch_size']})")
    t.add_argument("--seq-len", type=int_at_least(1), default=None,
                   help=f"tokens per sequence (default {default['seq_len']})")
    t.add_argument("--lr", type=_positive_float, default=None,
                   help=f"peak learning rate (default {default['lr']:g})")
    t.add_argument("--optimizer", choices=("adamw", "muon", "sophia"), default=None,
                   help=f"optimizer (default {default['optimizer']})")
    t.add_argument("--warmup-steps", type=int_at_least(0), default=None,
                   help="linear lr warmup steps (default min(100, max_steps // 10); clamped "
                        "to --max-steps with a warning)")
    t.add_argument("--eval-interval", type=int_at_least(0), default=None,
                   help=f"steps between evaluations, 0 = only at the end "
                        f"(default {default['eval_interval']})")
    t.add_argument("--eval-batches", type=int_at_least(1), default=None,
                   help=f"validation batches per evaluation (default {default['eval_batches']})")
    t.add_argument("--checkpoint-interval", type=int_at_least(0), default=None,
                   help="steps between checkpoints (default: the eval interval)")
    t.add_argument("--log-interval", type=int_at_least(1), default=None,
                   help=f"steps between metric records (default {default['log_interval']})")
    t.add_argument("--seed", type=int_at_least(0), default=None,
                   help=f"seed of the model init and the batch order (default {default['seed']})")
    t.add_argument("--mesh", metavar="SPEC", default=None,
                   help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, context, tensor) "
                        "or auto (all devices on fsdp); default one device, data=2 over 2 CPU "
                        "devices on a CPU-only host (docs/training.md)")
    r = p.add_argument_group("run")
    r.add_argument("--out", metavar="DIR", default=None,
                   help="run folder (default: the config's out_dir, else runs/<model>)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out that verifies (fresh "
                        "start if there is none)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints and metrics already in --out, then start fresh")
    r.add_argument("--verify-checkpoints", choices=("full", "sizes", "off"), default=None,
                   help="check checkpoints against their manifests before reading: SHA-256 "
                        "and sizes, sizes only, or nothing (default "
                        f"{default['verify_checkpoints']})")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--sample-tokens", type=int_at_least(0), default=DEFAULT_SAMPLE_TOKENS,
                   help="print a sample of this many tokens at the end, 0 = none "
                        f"(default {DEFAULT_SAMPLE_TOKENS})")
    r.add_argument("--profile", metavar="STEPS", type=int_at_least(1), default=None,
                   help="write a jax.profiler trace of STEPS training steps (after the first, "
                        "which compiles) to <out>/profile and print the slowest ops (default off)")
    return p


def _check_out_dir(out: str) -> None:
    """--out must be (or become) a folder: no part of it may be a regular file."""
    path = Path(out).expanduser().absolute()
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                what = "is" if part == path else f"lies under {part}, which is"
                raise UsageError(f"--out: {out} {what} a regular file, not a folder")
            return


def _resolve(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[Any, Any, bool]:
    """(ModelConfig without the vocab size settled, TrainConfig, resuming) from the args.
    Takes the run folder's lock (released when ``stack`` closes) before reading it."""
    from linearnexus.core.config import ConfigError
    from linearnexus.models import list_presets
    from linearnexus.train import (
        CHECKPOINT_DIR,
        CheckpointError,
        RunLock,
        RunLockedError,
        TrainConfig,
        read_checkpoint_meta,
        read_config_file,
        resolve_model_config,
    )
    from linearnexus.train.integrity import step_folders

    if args.model is not None and args.model not in list_presets():
        raise UsageError(f"--model: unknown preset {args.model!r}; choose one of "
                         f"{', '.join(list_presets())}")
    model_section: dict[str, Any] = {}
    train_section: dict[str, Any] = {}
    if args.config is not None:
        try:
            model_section, train_section = read_config_file(args.config)
        except (FileNotFoundError, ConfigError) as e:
            raise UsageError(f"--config: {e}") from None
    overrides = {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items()
                 if getattr(args, flag) is not None}
    if args.init_hf is not None:
        if args.model is not None or model_section:
            raise UsageError("--init-hf: the model comes from the checkpoint; drop --model and "
                             "the config file's model section")
        if args.tokenizer is not None or args.vocab_size is not None:
            raise UsageError("--init-hf: the checkpoint's tokenizer is used; drop --tokenizer / --vocab-size")
        overrides["init_hf"] = str(Path(args.init_hf).expanduser().absolute())
    if args.no_progress:
        overrides["progress"] = False

    # the run folder decides whether there is something to resume
    out = args.out or train_section.get("out_dir")
    if out is None:
        name = args.model or model_section.get("preset") or (
            Path(args.config).stem if args.config else
            Path(args.init_hf).name if args.init_hf else DEFAULT_PRESET)
        out = os.path.join("runs", name)
    overrides["out_dir"] = str(out)
    _check_out_dir(str(out))
    try:
        stack.enter_context(RunLock(out, warn=lambda line: print(line, file=sys.stderr)))
    except RunLockedError as e:
        raise UsageError(f"--out: {str(e).removeprefix('out_dir: ')}") from None
    ckpt_dir = Path(out) / CHECKPOINT_DIR
    steps = [s for s, _ in step_folders(ckpt_dir)]
    if steps and not (args.resume or args.overwrite):
        raise UsageError(f"--out: {out} already holds a run (checkpoints at steps {steps}); "
                         "pass --resume to continue it or --overwrite to start over")
    auto_mesh = _plan_cpu_devices(out, bool(steps and args.resume), train_section, overrides)
    saved = None
    if steps and args.resume:
        try:  # the newest checkpoint that verifies; failing ones are moved aside
            saved = read_checkpoint_meta(
                ckpt_dir, verify=args.verify_checkpoints or TRAIN_DEFAULTS["verify_checkpoints"],
                move_aside=True, warn=lambda line: print(line, file=sys.stderr))
        except CheckpointError as e:
            raise UsageError(f"--resume: {e}") from None

    try:
        if args.resume and saved is not None:
            from linearnexus.models import ModelConfig

            model_config = ModelConfig.from_dict(saved["model_config"])
            if args.model is not None or model_section:
                asked = resolve_model_config(model_section, args.model or None)
                mine = {k: v for k, v in asked.to_dict().items() if k != "vocab_size"}
                theirs = {k: v for k, v in model_config.to_dict().items() if k != "vocab_size"}
                if mine != theirs:
                    raise UsageError(f"--resume: the model asked for differs from the one in {out}; "
                                     "drop --model/--config or use another --out")
            saved_train = {k: v for k, v in saved["train_config"].items() if k != "progress"}
            train = TrainConfig.from_dict({**saved_train, **train_section, **overrides})
            if saved_train.get("optimizer", train.optimizer) != train.optimizer:
                raise UsageError(f"--optimizer: the run in {out} was trained with "
                                 f"{saved_train['optimizer']!r}, whose state cannot become "
                                 f"{train.optimizer!r}'s; drop --optimizer or use another --out")
        elif args.init_hf is not None:
            from linearnexus import hf

            try:
                model_config = hf.pretrained_config(args.init_hf)
            except (FileNotFoundError, hf.UnsupportedCheckpointError) as e:
                raise UsageError(f"--init-hf: {e}") from None
            train = TrainConfig.from_dict({**train_section, **overrides})
        else:
            model_config = resolve_model_config(
                model_section, args.model or (None if model_section else DEFAULT_PRESET))
            train = TrainConfig.from_dict({**train_section, **overrides})
    except ConfigError as e:
        raise UsageError(str(e)) from None
    except KeyError as e:  # unknown preset named in a config file
        raise UsageError(f"--config: {e.args[0]}") from None
    if train.bpe_vocab_size is not None and train.tokenizer != "bpe":
        raise UsageError("--vocab-size: only meaningful with --tokenizer bpe")
    if train.seq_len > model_config.max_seq_len:
        raise UsageError(f"--seq-len: {train.seq_len} exceeds the model's max_seq_len="
                         f"{model_config.max_seq_len}")
    if train.mesh is None and auto_mesh is not None:
        train = train.replace(mesh=auto_mesh)
    if train.mesh is not None:  # before the data is prepared or anything compiles
        from linearnexus.parallel import MeshError, make_mesh, validate_model

        try:
            validate_model(make_mesh(train.mesh), model_config, batch_size=train.batch_size,
                           seq_len=train.seq_len)
        except MeshError as e:
            raise UsageError(f"--mesh: {e}") from None
    return model_config, train, args.resume and saved is not None


def _plan_cpu_devices(out: str, resuming: bool, train_section: dict[str, Any],
                      overrides: dict[str, Any]) -> str | None:
    """On a CPU-only host, ask JAX for 2 CPU devices to split the batch over (or for as many
    as the run's mesh names; ``core/cpu_flags.py`` says why and when). Runs before anything
    starts JAX's backend (verifying a checkpoint does), so the run's mesh and batch size are
    read here as the resolution in ``_resolve`` will settle them: flags over the config file
    over the training config in the newest checkpoint's metadata (the one a resume restores
    unless it fails verification; the run folder's ``config.yaml`` where no metadata parses).
    Returns the automatic mesh (``"data=2"``) or None."""
    from linearnexus.core.cpu_flags import plan_cpu_devices, use_cpu_devices
    from linearnexus.train import read_config_file
    from linearnexus.train.integrity import read_step_meta, step_folders
    from linearnexus.train.sft import CHECKPOINT_DIR, CONFIG_FILE

    known: dict[str, Any] = {**train_section, **overrides}
    if resuming:
        saved_train = None
        for _, step_dir in step_folders(Path(out) / CHECKPOINT_DIR):
            meta = read_step_meta(step_dir)
            if meta is not None and isinstance(meta.get("train_config"), dict):
                saved_train = meta["train_config"]
                break
        saved_config = Path(out) / CONFIG_FILE
        if saved_train is None and saved_config.is_file():
            with contextlib.suppress(Exception):  # a broken file is reported by the resume
                saved_train = read_config_file(saved_config)[1]
        known = {**(saved_train or {}), **known}
    mesh, batch = known.get("mesh"), known.get("batch_size")
    if not isinstance(batch, int) or batch < 1:  # a bad value is TrainConfig's to report
        batch = TRAIN_DEFAULTS["batch_size"]
    try:
        n_devices, planned = plan_cpu_devices(mesh, batch)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if n_devices:
        use_cpu_devices(n_devices)
    return planned if mesh is None else None


def _hf_tokenizer(path: str) -> Any:
    from linearnexus import hf

    try:
        return hf.load_tokenizer(path)
    except FileNotFoundError as e:
        raise UsageError(f"--init-hf: {e}") from None


def _print_sample(model: Any, tokenizer: Any, n_tokens: int, seed: int, window: int) -> None:
    from linearnexus.cli.sample import default_window, sample_texts
    from linearnexus.generate import SamplingConfig

    eos = tokenizer.eos_id
    cfg = SamplingConfig(temperature=0.8, top_k=200, max_new_tokens=n_tokens, seed=seed,
                         stop_tokens=() if eos is None else (eos,))
    text = sample_texts(model, tokenizer, "", cfg, 1,
                        default_window(model, {"seq_len": window}))[0]
    print("---------- sample ----------")
    print(text)
    print("----------------------------")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.download_shakespeare and args.data is not None:
        parser.error("--download-shakespeare: not with --data (that names the text file)")
    return run_reporting_usage_errors(parser, args, _run)


def _run(args: argparse.Namespace) -> int:
    from linearnexus.core.cpu_flags import apply_cpu_flags

    apply_cpu_flags()  # before JAX starts its backend (core/cpu_flags.py says why)
    with contextlib.ExitStack() as stack:
        return _train(args, stack)


def _train(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    model_config, train, resuming = _resolve(args, stack)

    import numpy as np

    from linearnexus.data import DataLoader, prepare_dataset, resolve_shakespeare
    from linearnexus.models import create_model
    from linearnexus.train import CheckpointWriteError, SFTTrainer, clear_run

    try:
        text_path = resolve_shakespeare(train.data, download=args.download_shakespeare)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    # record the file actually used, so a resume finds it without the same flags / env
    train = train.replace(data=str(Path(text_path).absolute()))
    out_dir = Path(train.out_dir)
    if args.overwrite:
        clear_run(out_dir)
    data_dir = Path(args.data_cache) if args.data_cache else out_dir / "data"
    pretrained_tok = _hf_tokenizer(train.init_hf) if train.init_hf else None
    try:
        prepared = prepare_dataset(text_path, data_dir, tokenizer=pretrained_tok or train.tokenizer,
                                   val_fraction=train.val_fraction, vocab_size=train.bpe_vocab_size)
    except ValueError as e:
        raise UsageError(f"data: {e}") from None
    tokenizer = pretrained_tok or prepared.load_tokenizer()
    print(f"data: {text_path} -> {data_dir} ({'reused' if prepared.reused else 'prepared'}): "
          f"{prepared.train_tokens:,} train / {prepared.val_tokens:,} val tokens, "
          f"{prepared.tokenizer_kind} vocab {prepared.vocab_size}")
    if pretrained_tok is not None:
        # a checkpoint's embedding may be padded past its tokenizer (mamba-130m: 50280 / 50277)
        if tokenizer.vocab_size > model_config.vocab_size:
            raise UsageError(f"--init-hf: the tokenizer has {tokenizer.vocab_size} tokens but the "
                             f"model only {model_config.vocab_size} embeddings")
    elif model_config.vocab_size != tokenizer.vocab_size:
        if resuming:
            raise UsageError(f"data: the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's "
                             f"model has vocab_size={model_config.vocab_size}")
        model_config = model_config.replace(vocab_size=tokenizer.vocab_size)
    for name, n in (("train", prepared.train_tokens), ("val", prepared.val_tokens)):
        if n < train.seq_len + 1:
            raise UsageError(f"data: the {name} split has {n} tokens, fewer than --seq-len + 1 = "
                             f"{train.seq_len + 1}")

    if train.init_hf and not resuming:  # on resume the checkpoint's weights are loaded instead
        from linearnexus import hf

        model = hf.from_pretrained(train.init_hf, dtype=model_config.dtype)
    else:
        model = create_model(model_config, seed=train.seed)
    print(f"model: {model.num_params():,} parameters, layers {list(model_config.layer_types)}, "
          f"d_model {model_config.d_model}")
    print(f"train: {train.optimizer}, lr {train.lr:g}, {train.max_steps} steps of "
          f"{train.batch_size}x{train.seq_len} tokens -> {out_dir}"
          + (f" on mesh {train.mesh}" if train.mesh else ""))
    loader = DataLoader(prepared.train_dataset(), train.batch_size, train.seq_len, seed=train.seed)
    trainer = SFTTrainer(model, None, loader, prepared.val_dataset(), train, model_config,
                         tokenizer=tokenizer)
    profiler = None
    if args.profile is not None:
        import jax

        from linearnexus.tools.profile import StepTrace

        profiler = StepTrace(out_dir / "profile", args.profile,
                             sync=lambda: jax.block_until_ready(trainer.state.params))
    try:
        result = trainer.train(resume=resuming, on_step=profiler)
    except ValueError as e:
        if resuming and str(e).startswith(("tokenizer:", "optimizer:", "checkpoint ")):
            raise UsageError(f"--resume: {e}") from None  # the run folder does not fit these settings
        raise
    except KeyboardInterrupt:
        print("\naborted (second Ctrl-C): no checkpoint written for the current step",
              file=sys.stderr)
        return 130
    except CheckpointWriteError as e:  # e.g. a full disk: not a usage error, but no traceback
        print(f"train_lm.py: error: {e}", file=sys.stderr)
        return 1

    if profiler is not None:
        summary = profiler.close()
        print("profile: no step was traced" if summary is None else summary.table())
    steady = [r["tokens_per_s"] for r in result.history if r.get("tokens_per_s")][1:]
    steady_tok_s = float(np.median(steady)) if steady else result.tokens_per_s

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    val_at = "" if result.val_step in (None, result.step) else f" at step {result.val_step}"
    print(f"{'stopped' if result.interrupted else 'done'}: step {result.step}, train loss "
          f"{fmt(result.train_loss)}, val loss {fmt(result.val_loss)}{val_at} (best "
          f"{fmt(result.best_val_loss)}), {steady_tok_s:,.0f} tok/s, {result.elapsed_s:.1f}s "
          f"this session; checkpoint {result.checkpoint}")
    if result.interrupted:
        print(f"resume with: train_lm.py --out {out_dir} --resume")
        return 130 if result.interrupted == "SIGINT" else 143
    if args.sample_tokens > 0:
        _print_sample(trainer.model, tokenizer, args.sample_tokens, train.seed, train.seq_len)
    return 0


if __name__ == "__main__":
    sys.exit(main())
