"""Two-digit addition: prompts ``"23+58="``, the answer ``"81"`` then a newline.

Every pair of two-digit operands (10..99, 8100 pairs) is one example; a fixed shuffle
(``split_seed``) puts ``held_out`` of them in the held-out set, never used for training
(neither SFT text nor RL prompts). Rewards:

* ``exact``: 1.0 when the completion is exactly the sum's digits (after the model
  stopped: a completion truncated before its stop token scores 0), else 0.0.
* ``format``: 1.0 when the completion is 1-3 digits and nothing else, else 0.0; a
  shaping term that gives a gradient even when no sample in a group is right.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from linearnexus.train.rl.tasks import Task

_PROMPT = re.compile(r"^(\d+)\+(\d+)=$")
_DIGITS = re.compile(r"^\d{1,3}$")
STOP = "\n"


def _answer(prompt: str) -> str:
    m = _PROMPT.match(prompt)
    if m is None:
        raise ValueError(f"prompts: expected 'A+B=', got {prompt!r}")
    return str(int(m.group(1)) + int(m.group(2)))


def exact_match(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """1.0 where the completion is the sum (no spaces, no extra characters), else 0.0."""
    return np.array([float(c == _answer(p)) for p, c in zip(prompts, completions, strict=True)])


def format_reward(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """1.0 where the completion is 1-3 digits, else 0.0."""
    return np.array([float(_DIGITS.match(c) is not None) for c in completions])


def make_task(*, held_out: float = 0.2, split_seed: int = 1234, format_weight: float = 0.1
              ) -> Task:
    """The addition task (see the module docstring).

    Args:
        held_out: share of the 8100 operand pairs kept for evaluation (0 < held_out < 1).
        split_seed: seed of the train / held-out shuffle.
        format_weight: weight of the format reward (0 = exact match only).

    Raises:
        ValueError: ``held_out`` outside (0, 1) or a negative ``format_weight``.
    """
    if not 0 < held_out < 1:
        raise ValueError(f"held_out: expected a share in (0, 1), got {held_out}")
    if format_weight < 0:
        raise ValueError(f"format_weight: expected >= 0, got {format_weight}")
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    order = np.random.default_rng(split_seed).permutation(len(pairs))
    n_eval = int(round(held_out * len(pairs)))
    eval_pairs = [pairs[i] for i in order[:n_eval]]
    train_pairs = [pairs[i] for i in order[n_eval:]]

    def sft_text(n_examples: int, seed: int) -> str:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(train_pairs), size=n_examples)
        return "".join(f"{a}+{b}={a + b}{STOP}" for a, b in (train_pairs[i] for i in picks))

    rewards = {"exact": exact_match}
    weights = {"exact": 1.0}
    if format_weight > 0:
        rewards["format"] = format_reward
        weights["format"] = format_weight
    return Task(
        name="addition",
        train_prompts=[f"{a}+{b}=" for a, b in train_pairs],
        eval_prompts=[f"{a}+{b}=" for a, b in eval_pairs],
        rewards=rewards, weights=weights, score=exact_match, stop=STOP, sft_text=sft_text,
        max_new_tokens=4)  # up to 3 digits (198) + the newline
