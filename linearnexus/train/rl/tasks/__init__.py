"""RL tasks: each is a small module with a prompt generator and reward functions.

A task module defines ``make_task(**options) -> Task``; :func:`get_task` looks the name up
in :data:`TASKS` (name -> import path, so importing this package imports no task). Adding
a task means writing a module like ``addition.py`` and one line here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from linearnexus.train.rl.rewards import RewardFn

__all__ = ["TASKS", "Task", "get_task"]

TASKS: dict[str, str] = {
    "addition": "linearnexus.train.rl.tasks.addition:make_task",
}


@dataclasses.dataclass
class Task:
    """A verifiable-reward task.

    Attributes:
        name: the task's name.
        train_prompts / eval_prompts: disjoint prompt pools (strings); training samples
            from the first, held-out accuracy is measured on the second.
        rewards: name -> ``reward(prompts, completions) -> [B] floats``.
        weights: name -> weight in the total reward (missing = 1.0).
        score: ``(prompts, completions) -> [B]`` in {0, 1}; the held-out accuracy metric.
        stop: the text that ends a completion (its token is the rollout's stop token).
        sft_text: ``(n_examples, seed) -> str``, solved training examples as plain text for
            the SFT warm start (``train_lm.py --data``).
        max_new_tokens: a completion length that fits every correct answer plus the stop.
    """

    name: str
    train_prompts: Sequence[str]
    eval_prompts: Sequence[str]
    rewards: Mapping[str, RewardFn]
    weights: Mapping[str, float]
    score: RewardFn
    stop: str
    sft_text: Callable[[int, int], str]
    max_new_tokens: int

    def sample_prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` training prompts drawn with replacement."""
        idx = rng.integers(0, len(self.train_prompts), size=n)
        return [self.train_prompts[i] for i in idx]


def get_task(name: str, **options: Any) -> Task:
    """Build task ``name`` with its options.

    Raises:
        KeyError: unknown task name (lists the known ones).
    """
    if name not in TASKS:
        raise KeyError(f"task: unknown task {name!r}; known tasks: {sorted(TASKS)}")
    module, _, attr = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attr)(**options)
