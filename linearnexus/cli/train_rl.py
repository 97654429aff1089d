"""``train_rl.py``: RL post-training (GRPO or PPO) of an SFT checkpoint on a task.

Examples::

    python train_rl.py --algo grpo --init runs/sft --task addition --out runs/grpo
    python train_rl.py --out runs/grpo --resume              # continue a stopped run
    python train_rl.py --algo ppo --init runs/sft --kl-coef 0.02 --out runs/ppo

Settings are resolved in this order (later wins): RLConfig defaults; ``--config`` (a YAML
of RLConfig fields, with ``grpo:`` / ``ppo:`` sections); on ``--resume``, the config saved
in the checkpoint; then every flag given. See docs/rl.md for every option.

Exit status: 0 when training finished, 2 for bad arguments, 130 / 143 when SIGINT /
SIGTERM stopped it (after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from linearnexus.cli import UsageError, int_at_least, number_above, run_reporting_usage_errors

# flag -> RLConfig field ("section.field" for the algorithms' options)
_FLAGS = {
    "algo": "algo", "task": "task", "max_steps": "max_steps",
    "prompts_per_step": "prompts_per_step", "group_size": "group_size",
    "max_new_tokens": "max_new_tokens", "temperature": "temperature",
    "mask_truncated": "mask_truncated", "optimizer": "optimizer", "lr": "lr",
    "schedule": "schedule", "warmup_steps": "warmup_steps", "weight_decay": "weight_decay",
    "grad_clip": "grad_clip", "eval_interval": "eval_interval", "eval_prompts": "eval_prompts",
    "log_interval": "log_interval", "checkpoint_interval": "checkpoint_interval",
    "seed": "seed",
    "beta": "grpo.beta", "eps_low": "grpo.eps_low", "eps_high": "grpo.eps_high",
    "num_iterations": "grpo.num_iterations", "loss_aggregation": "grpo.loss_aggregation",
    "scale_rewards": "grpo.scale_rewards", "importance_level": "grpo.importance_level",
    "value_model": "ppo.value_model", "gamma": "ppo.gamma", "lam": "ppo.lam",
    "clip_eps": "ppo.clip_eps", "value_clip": "ppo.value_clip", "vf_coef": "ppo.vf_coef",
    "ent_coef": "ppo.ent_coef", "kl_coef": "ppo.kl_coef",
    "whiten_advantages": "ppo.whiten_advantages", "ppo_epochs": "ppo.epochs",
    "num_minibatches": "ppo.num_minibatches",
}


def _task_option(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_rl.py",
        description="RL post-training (GRPO / PPO) of a LinearNexus SFT checkpoint on a task "
                    "with verifiable rewards. See docs/rl.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pos, nonneg = number_above(0), number_above(0, strict=False)
    r = p.add_argument_group("run")
    r.add_argument("--algo", choices=("grpo", "ppo"), default=None, help="default grpo")
    r.add_argument("--init", metavar="RUN_DIR", default=None,
                   help="the SFT run (or checkpoint folder) to start from; required unless "
                        "resuming")
    r.add_argument("--task", default=None, help="task name (default addition)")
    r.add_argument("--task-option", metavar="KEY=VALUE", type=_task_option, action="append",
                   default=None, help="a task option, e.g. format_weight=0 (repeatable)")
    r.add_argument("--config", metavar="YAML", default=None, help="an RLConfig YAML")
    r.add_argument("--out", metavar="DIR", default=None, help="run folder (default runs/<algo>)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints and metrics already in --out first")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("rollouts")
    s.add_argument("--max-steps", type=int_at_least(1), default=None)
    s.add_argument("--prompts-per-step", type=int_at_least(1), default=None)
    s.add_argument("--group-size", type=int_at_least(1), default=None,
                   help="completions per prompt (GRPO: >= 2)")
    s.add_argument("--max-new-tokens", type=int_at_least(1), default=None)
    s.add_argument("--temperature", type=pos, default=None)
    s.add_argument("--mask-truncated", action="store_true", default=None,
                   help="leave completions without a stop token out of the loss")
    o = p.add_argument_group("optimizer")
    o.add_argument("--optimizer", choices=("adamw", "muon"), default=None)
    o.add_argument("--lr", type=pos, default=None)
    o.add_argument("--schedule", choices=("cosine", "linear", "constant"), default=None)
    o.add_argument("--warmup-steps", type=int_at_least(0), default=None)
    o.add_argument("--weight-decay", type=nonneg, default=None)
    o.add_argument("--grad-clip", type=nonneg, default=None)
    e = p.add_argument_group("evaluation and checkpoints")
    e.add_argument("--eval-interval", type=int_at_least(0), default=None)
    e.add_argument("--eval-prompts", type=int_at_least(0), default=None,
                   help="held-out prompts per evaluation (default 256; 0 = no evaluation)")
    e.add_argument("--log-interval", type=int_at_least(1), default=None)
    e.add_argument("--checkpoint-interval", type=int_at_least(0), default=None)
    e.add_argument("--seed", type=int_at_least(0), default=None)
    gr = p.add_argument_group("GRPO")
    gr.add_argument("--beta", type=nonneg, default=None, help="k3 KL weight (0 = no reference)")
    gr.add_argument("--eps-low", type=pos, default=None)
    gr.add_argument("--eps-high", type=pos, default=None)
    gr.add_argument("--num-iterations", type=int_at_least(1), default=None)
    gr.add_argument("--loss-aggregation", choices=("sequence", "token", "constant"), default=None)
    gr.add_argument("--no-scale-rewards", dest="scale_rewards", action="store_false", default=None,
                    help="do not divide advantages by the group's std")
    gr.add_argument("--importance-level", choices=("token", "sequence"), default=None)
    pp = p.add_argument_group("PPO")
    pp.add_argument("--value-model", choices=("shared", "separate"), default=None)
    pp.add_argument("--gamma", type=nonneg, default=None)
    pp.add_argument("--lam", type=nonneg, default=None)
    pp.add_argument("--clip-eps", type=pos, default=None)
    pp.add_argument("--value-clip", type=nonneg, default=None)
    pp.add_argument("--vf-coef", type=nonneg, default=None)
    pp.add_argument("--ent-coef", type=nonneg, default=None)
    pp.add_argument("--kl-coef", type=nonneg, default=None, help="0 = no reference")
    pp.add_argument("--no-whiten", dest="whiten_advantages", action="store_false", default=None)
    pp.add_argument("--ppo-epochs", type=int_at_least(1), default=None)
    pp.add_argument("--num-minibatches", type=int_at_least(1), default=None)
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag, name in _FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        section, _, key = name.rpartition(".")
        (out.setdefault(section, {}) if section else out)[key] = value
    if args.task_option:
        out["task_options"] = dict(args.task_option)
    if args.no_progress:
        out["progress"] = False
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged.get(k) or {}, v) if k in ("grpo", "ppo") else v
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    return run_reporting_usage_errors(parser, parser.parse_args(argv), _run)


def _run(args: argparse.Namespace) -> int:
    from linearnexus.core.config import ConfigError
    from linearnexus.train import (
        CHECKPOINT_DIR,
        clear_run,
        load_checkpoint,
        read_checkpoint_meta,
    )
    from linearnexus.train.integrity import CheckpointError, step_folders
    from linearnexus.train.rl import RLConfig, RLTrainer, get_task

    file_section: dict[str, Any] = {}
    if args.config is not None:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config: no such file {path}")
        file_section = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(file_section, dict):
            raise UsageError(f"--config: {path} is not a YAML mapping")
    over = _overrides(args)
    out = Path(args.out or file_section.get("out_dir")
               or Path("runs") / (over.get("algo") or file_section.get("algo") or "grpo"))
    over["out_dir"] = str(out)
    steps = [st for st, _ in step_folders(out / CHECKPOINT_DIR)]
    if steps and not (args.resume or args.overwrite):
        raise UsageError(f"--out: {out} already holds a run (checkpoints at steps {steps}); "
                         "pass --resume to continue it or --overwrite to start over")
    saved = None
    if steps and args.resume:
        try:  # the newest checkpoint that verifies (the trainer moves failing ones aside)
            saved = read_checkpoint_meta(out)
        except CheckpointError as e:
            raise UsageError(f"--resume: {e}") from None
    resuming = args.resume and saved is not None
    if resuming and saved.get("kind") != "rl":
        raise UsageError(f"--out: {out} holds a checkpoint that is not an RL run's")
    try:
        base = {k: v for k, v in saved["train_config"].items() if k != "progress"} if resuming else {}
        config = RLConfig.from_dict(_merge(_merge(base, file_section), over))
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if resuming and saved["train_config"].get("algo") != config.algo:
        raise UsageError(f"--algo: the run in {out} is {saved['train_config']['algo']!r}; "
                         "its state cannot continue as another algorithm")

    init_path = args.init or (saved.get("init", {}).get("path") if resuming else None)
    if init_path is None:
        raise UsageError("--init: give the SFT run to start from (train_lm.py's --out folder)")
    try:
        task = get_task(config.task, **config.task_options)
    except KeyError as e:
        raise UsageError(f"--task: {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise UsageError(f"--task-option: {e}") from None
    try:
        init_model, _, init_extra = load_checkpoint(init_path)
    except FileNotFoundError as e:
        hint = " (recorded by the run being resumed)" if resuming and not args.init else ""
        raise UsageError(f"--init: {e}{hint}") from None
    tokenizer = init_extra["tokenizer"]
    if tokenizer is None:
        raise UsageError(f"--init: the checkpoint {init_extra['path']} has no tokenizer")
    if args.overwrite:
        clear_run(out)
    init = {"path": str(Path(init_path).absolute()), "step": init_extra["step"]}
    print(f"init: {init_extra['path']} (step {init_extra['step']}), "
          f"{init_model.num_params():,} parameters, layers {list(init_model.config.layer_types)}")
    print(f"{config.algo}: task {config.task}, {config.max_steps} steps of "
          f"{config.prompts_per_step}x{config.group_size} completions, lr {config.lr:g} -> {out}")
    try:
        trainer = RLTrainer(init_model, tokenizer, task, config, init=init)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        result = trainer.train(resume=resuming)
    except ValueError as e:
        if resuming:
            raise UsageError(f"--resume: {e}") from None
        raise
    except KeyboardInterrupt:
        print("\naborted (second Ctrl-C): no checkpoint written for the current step",
              file=sys.stderr)
        return 130
    acc = "n/a" if result.eval_accuracy is None else f"{result.eval_accuracy:.3f}"
    reward = "n/a" if result.reward_mean is None else f"{result.reward_mean:.3f}"
    print(f"{'stopped' if result.interrupted else 'done'}: step {result.step}, reward {reward}, "
          f"held-out accuracy {acc}, {result.elapsed_s:.1f}s this session; checkpoint "
          f"{result.checkpoint}")
    if result.interrupted:
        print(f"resume with: train_rl.py --out {out} --resume")
        return 130 if result.interrupted == "SIGINT" else 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
