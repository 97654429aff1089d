"""Configs of an RL run: :class:`RLConfig` (shared) with nested :class:`GRPOConfig` and
:class:`PPOConfig` (only the one of ``algo`` is read). Every option is described in
``docs/rl.md``."""

from __future__ import annotations

import dataclasses

from linearnexus.core.config import ConfigBase, ConfigError, field
from linearnexus.optim import SCHEDULES
from linearnexus.train.rl.losses import LOSS_AGGREGATIONS
from linearnexus.train.sft import TrainConfig

__all__ = ["ALGOS", "GRPOConfig", "PPOConfig", "RLConfig"]

ALGOS = ("grpo", "ppo")


@dataclasses.dataclass
class GRPOConfig(ConfigBase):
    """GRPO's options.

    Attributes:
        scale_rewards: divide group-centred rewards by the group's std (False = Dr. GRPO).
        loss_aggregation: ``sequence`` (per-sequence length normalisation, as published),
            ``token`` (DAPO: all tokens weigh the same) or ``constant`` (Dr. GRPO: sum over
            tokens / (B * max_new_tokens), no length normalisation).
        eps_low / eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` of the ratio.
        beta: coefficient of the k3 KL to the reference; 0 = no reference model is kept.
        num_iterations: policy updates per rollout batch (> 1 stores the sampling policy's
            log-probs as the old policy's).
        importance_level: ``token`` ratios, or one ``sequence`` ratio per completion (GSPO).
    """

    scale_rewards: bool = True
    loss_aggregation: str = field("sequence", choices=LOSS_AGGREGATIONS)
    eps_low: float = field(0.2, gt=0, lt=1)
    eps_high: float = field(0.2, gt=0)
    beta: float = field(0.0, ge=0)
    num_iterations: int = field(1, gt=0)
    importance_level: str = field("token", choices=("token", "sequence"))


@dataclasses.dataclass
class PPOConfig(ConfigBase):
    """PPO's options.

    Attributes:
        value_model: ``shared`` (a value head on the policy's trunk; the value loss also
            trains the trunk) or ``separate`` (a copy of the initial model as the critic's
            trunk, trained only by the value loss).
        gamma / lam: GAE discount and lambda over completion tokens.
        clip_eps: policy ratio clip range ``[1 - clip_eps, 1 + clip_eps]``.
        value_clip: value-change clip around the rollout's values; 0 = unclipped.
        vf_coef: value-loss weight. ent_coef: entropy-bonus weight.
        kl_coef: per-token KL penalty (k1, to the reference) subtracted from the reward;
            0 = no reference model is kept.
        whiten_advantages: normalise advantages to mean 0, std 1 over the batch.
        epochs / num_minibatches: passes over each rollout batch, and the minibatches
            (shuffled rows) each pass is split into; updates per step = their product.
    """

    value_model: str = field("shared", choices=("shared", "separate"))
    gamma: float = field(1.0, ge=0, le=1)
    lam: float = field(0.95, ge=0, le=1)
    clip_eps: float = field(0.2, gt=0, lt=1)
    value_clip: float = field(0.2, ge=0)
    vf_coef: float = field(0.5, ge=0)
    ent_coef: float = field(0.0, ge=0)
    kl_coef: float = field(0.05, ge=0)
    whiten_advantages: bool = True
    epochs: int = field(2, gt=0)
    num_minibatches: int = field(2, gt=0)


@dataclasses.dataclass
class RLConfig(ConfigBase):
    """One RL run.

    Attributes:
        algo: ``grpo`` or ``ppo``.
        task: task name (``linearnexus.train.rl.tasks.TASKS``). task_options: keyword
            arguments of the task's ``make_task`` (e.g. ``{"format_weight": 0.0}``).
        max_steps: rollout steps (each: sample, score, update).
        prompts_per_step: N prompts per step; group_size: G completions per prompt
            (B = N * G rows per rollout). GRPO needs G >= 2; PPO accepts 1.
        max_new_tokens: completion length limit; None = the task's.
        temperature: sampling temperature (> 0; the log-probs use the same).
        mask_truncated: drop completions that hit max_new_tokens without a stop token
            from the loss (their reward still counts in the metrics).
        optimizer / lr / schedule / warmup_steps / weight_decay / beta1 / beta2 /
            grad_clip: as :class:`~linearnexus.train.TrainConfig`; the schedule runs over
            all optimizer updates (max_steps * updates per step).
        eval_interval: steps between held-out evaluations (greedy exact match; also at
            step 0 and the end); 0 = only at the end. eval_prompts: held-out prompts per
            evaluation (None = all; 0 = no evaluation).
        log_interval: steps between metric records. checkpoint_interval: steps between
            checkpoints; None = eval_interval; 0 = only at the end (and on a signal).
        keep_last_n: newest checkpoints kept.
        seed: prompt draws, sampling noise and minibatch order, each a function of
            (seed, step), so a resumed run repeats the uninterrupted one exactly.
        out_dir: run folder. progress: a tqdm bar when stderr is a terminal.
    """

    algo: str = field("grpo", choices=ALGOS)
    task: str = "addition"
    task_options: dict = field(default_factory=dict)
    max_steps: int = field(100, gt=0)
    prompts_per_step: int = field(16, gt=0)
    group_size: int = field(8, gt=0)
    max_new_tokens: int | None = field(None, gt=0)
    temperature: float = field(1.0, gt=0)
    mask_truncated: bool = False
    optimizer: str = field("adamw", choices=("adamw", "muon"))
    lr: float = field(1e-4, gt=0)
    schedule: str = field("constant", choices=SCHEDULES)
    warmup_steps: int = field(0, ge=0)
    weight_decay: float = field(0.0, ge=0)
    beta1: float | None = field(None, ge=0, lt=1)
    beta2: float | None = field(None, ge=0, lt=1)
    grad_clip: float = field(1.0, ge=0)
    eval_interval: int = field(20, ge=0)
    eval_prompts: int | None = field(256, ge=0)
    log_interval: int = field(1, gt=0)
    checkpoint_interval: int | None = field(None, ge=0)
    keep_last_n: int = field(2, gt=0)
    seed: int = field(0, ge=0)
    out_dir: str = "runs/rl"
    progress: bool = True
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    # the checkpoint manager (shared with SFT) reads these; RL keeps no "best" checkpoint
    keep_best = False
    resolved_checkpoint_interval = TrainConfig.resolved_checkpoint_interval

    def validate(self) -> None:
        if self.algo == "grpo" and self.group_size < 2:
            raise ConfigError(f"group_size: GRPO needs >= 2 completions per prompt (the group "
                              f"mean is the baseline), got {self.group_size}")
        if self.algo == "ppo" and self.batch_size % self.ppo.num_minibatches:
            raise ConfigError(
                f"ppo.num_minibatches: {self.ppo.num_minibatches} does not divide the rollout "
                f"batch prompts_per_step * group_size = {self.batch_size}")

    @property
    def batch_size(self) -> int:
        """Rows per rollout: ``prompts_per_step * group_size``."""
        return self.prompts_per_step * self.group_size

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per rollout step."""
        if self.algo == "grpo":
            return self.grpo.num_iterations
        return self.ppo.epochs * self.ppo.num_minibatches

    @property
    def uses_reference(self) -> bool:
        """Whether a frozen reference model is kept (a KL term with a nonzero weight)."""
        return (self.grpo.beta if self.algo == "grpo" else self.ppo.kl_coef) > 0
