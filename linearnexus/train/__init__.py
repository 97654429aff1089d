"""Training: :class:`SFTTrainer` (next-token loss, compiled donated steps, orbax
checkpoints, resume, metrics) and :func:`load_checkpoint` for sampling.

See ``docs/training.md``.
"""

from linearnexus.train.sft import (
    CHECKPOINT_DIR,
    EVAL_SEED,
    SFTTrainer,
    TrainConfig,
    TrainResult,
    TrainState,
    build_optimizer,
    clear_run,
    cross_entropy_loss,
    find_checkpoint,
    load_checkpoint,
    load_run_config,
    read_checkpoint_meta,
    read_config_file,
    resolve_model_config,
)

__all__ = [
    "CHECKPOINT_DIR",
    "EVAL_SEED",
    "SFTTrainer",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "build_optimizer",
    "clear_run",
    "cross_entropy_loss",
    "find_checkpoint",
    "load_checkpoint",
    "load_run_config",
    "read_checkpoint_meta",
    "read_config_file",
    "resolve_model_config",
]
