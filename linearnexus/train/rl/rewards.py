"""Reward functions: plain callables ``reward(prompts, completions) -> float array``.

A reward function gets the decoded prompts and completions (lists of ``B`` strings; a
completion is the text the policy produced, without its stop token) and returns ``B``
finite floats. :func:`combine_rewards` calls several, checks what each returned (shape,
dtype, NaN / inf, naming the function that was wrong) and sums them with weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["RewardFn", "check_reward", "combine_rewards"]

RewardFn = Callable[[Sequence[str], Sequence[str]], "np.ndarray | Sequence[float]"]


def check_reward(name: str, value: object, batch: int) -> np.ndarray:
    """``value`` as a ``[batch]`` float64 array, or a ``ValueError`` / ``TypeError`` that
    names the reward function ``name`` and says what it returned instead."""
    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype.kind not in "fiub":
        raise TypeError(f"reward {name!r}: expected {batch} floats, got an array of dtype "
                        f"{arr.dtype} (e.g. {arr.reshape(-1)[:1].tolist()})")
    if arr.dtype.kind != "f":
        # ints and bools are accepted as exact numbers; anything else needs a float
        arr = arr.astype(np.float64)
    if arr.shape != (batch,):
        raise ValueError(f"reward {name!r}: expected shape ({batch},) (one reward per completion), "
                         f"got {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"reward {name!r}: returned {arr[i]} for completion {i} "
                         f"({int(bad.sum())} of {batch} not finite); rewards must be finite")
    return arr.astype(np.float64)


def combine_rewards(rewards: Mapping[str, RewardFn], weights: Mapping[str, float] | None,
                    prompts: Sequence[str], completions: Sequence[str]
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Call every reward function and sum them: ``total = sum_k w_k * reward_k``.

    Args:
        rewards: name -> reward function.
        weights: name -> weight (missing names weigh 1.0; None = all 1.0).
        prompts / completions: ``B`` strings each.

    Returns:
        ``(total [B] float64, {name: [B] float64})`` (the unweighted parts, for metrics).

    Raises:
        ValueError: no reward functions, a weight for an unknown name, prompts and
            completions of different lengths, or a function returning the wrong shape or a
            non-finite value (named). TypeError: a function returning non-numbers (named).
    """
    if not rewards:
        raise ValueError("rewards: expected at least one reward function, got none")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(rewards))
    if unknown:
        raise ValueError(f"weights: no reward function named {unknown} (rewards: {sorted(rewards)})")
    if len(prompts) != len(completions):
        raise ValueError(f"completions: expected {len(prompts)} (one per prompt), got {len(completions)}")
    batch = len(completions)
    total = np.zeros(batch, np.float64)
    parts: dict[str, np.ndarray] = {}
    for name, fn in rewards.items():
        if not callable(fn):
            raise TypeError(f"reward {name!r}: expected a callable, got {type(fn).__name__}")
        parts[name] = check_reward(name, fn(list(prompts), list(completions)), batch)
        total += float(weights.get(name, 1.0)) * parts[name]
    return total, parts
