"""The pure loss pieces of GRPO and PPO, on small arrays (no model inside).

Dimension letters: ``N`` prompts, ``G`` completions per prompt (the group), ``B = N * G``
completions, ``C`` completion tokens (padded; ``mask [B, C]`` is 1 at real tokens, the
stop token included, 0 after it). Every function here is jit-friendly and written so a
reader can check it against the equations in ``docs/rl.md``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array

__all__ = [
    "LOSS_AGGREGATIONS",
    "aggregate",
    "clipped_policy_loss",
    "gae",
    "group_advantages",
    "k1_kl",
    "k3_kl",
    "masked_mean",
    "masked_whiten",
    "sequence_log_ratio",
    "value_loss",
]

# how a per-token loss [B, C] becomes a scalar (see ``aggregate``)
LOSS_AGGREGATIONS = ("sequence", "token", "constant")


def mean_metrics(metrics: list[dict[str, Array]]) -> dict[str, float]:
    """The mean of each scalar metric over several updates, as Python floats. One
    ``device_get`` for them all: a ``float()`` per metric per update would wait for the
    device after every update instead of queueing the next one."""
    totals: dict[str, float] = {}
    for record in jax.device_get(metrics):
        for key, value in record.items():
            totals[key] = totals.get(key, 0.0) + float(value) / len(metrics)
    return totals


def masked_mean(x: Array, mask: Array, axis: int | None = None) -> Array:
    """Mean of ``x`` over the entries where ``mask`` is 1 (0 where the mask is empty)."""
    mask = mask.astype(x.dtype)
    total = jnp.sum(x * mask, axis=axis)
    count = jnp.sum(mask, axis=axis)
    return total / jnp.maximum(count, 1.0)


def masked_whiten(x: Array, mask: Array, eps: float = 1e-8, *, shift_mean: bool = True) -> Array:
    """``(x - mean) / std`` over the masked entries (population std); masked-out entries
    come back as 0. ``shift_mean=False`` only rescales (keeps the sign of every entry)."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean if shift_mean else x) * jax.lax.rsqrt(var + eps)
    return out * mask.astype(x.dtype)


def group_advantages(rewards: Array, group_size: int, *, scale_std: bool = True,
                     eps: float = 1e-4) -> Array:
    """GRPO's advantage: each completion's reward minus its group's mean, optionally over
    the group's (population) standard deviation.

    Args:
        rewards: ``[B]`` float, ``B = N * G``, the G completions of a prompt adjacent.
        group_size: ``G`` (>= 2: a group of one has no baseline).
        scale_std: divide by ``std + eps`` (the original GRPO); False keeps the raw
            difference (Dr. GRPO: no per-question difficulty re-weighting).
        eps: keeps all-equal groups (std 0) at advantage 0 instead of 0 / 0.

    Returns:
        ``[B]`` float32 advantages (0 for every member of a group whose rewards are equal).

    Raises:
        ValueError: ``group_size < 2`` or ``B`` not a multiple of it.
    """
    if group_size < 2:
        raise ValueError(f"group_size: expected >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards: expected shape [N * {group_size}], got {rewards.shape}")
    r = rewards.astype(jnp.float32).reshape(-1, group_size)  # [B] -> [N, G]
    adv = r - jnp.mean(r, axis=1, keepdims=True)
    if scale_std:
        adv = adv / (jnp.std(r, axis=1, keepdims=True) + eps)
    # a group of equal rewards carries no signal: exactly 0 (the float32 mean of G copies of
    # 0.1 is not always 0.1, and the std scaling would blow that rounding up)
    tied = jnp.all(r == r[:, :1], axis=1, keepdims=True)  # [N, 1]
    return jnp.where(tied, 0.0, adv).reshape(-1)  # [N, G] -> [B]


def sequence_log_ratio(logp: Array, old_logp: Array, mask: Array) -> Array:
    """Length-normalised sequence log importance ratio (GSPO):
    ``mean_t (logp - old_logp)`` over each row's real tokens, ``[B, C] -> [B]``."""
    return masked_mean(logp - old_logp, mask, axis=1)


def clipped_policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, *,
                        eps_low: float, eps_high: float, level: str = "token"
                        ) -> tuple[Array, Array, Array]:
    """The PPO / GRPO clipped surrogate, per token (to be aggregated by :func:`aggregate`).

    ``loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``.

    Args:
        logp / old_logp: ``[B, C]`` log-probs of the sampled tokens under the policy being
            trained and the policy that sampled them (no gradient through ``old_logp``).
        advantages: ``[B, C]`` per token, or ``[B]`` per sequence (broadcast over tokens).
        mask: ``[B, C]`` 1 at real completion tokens.
        eps_low / eps_high: the clip range ``[1 - eps_low, 1 + eps_high]`` (DAPO's
            "clip-higher" sets ``eps_high > eps_low``).
        level: ``"token"``: one ratio per token; ``"sequence"``: one ratio per completion,
            ``exp(mean_t(logp - old_logp))`` (GSPO), shared by its tokens.

    Returns:
        ``(loss [B, C], ratio [B, C], clipped [B, C] bool)``; ``clipped`` marks tokens whose
        gradient the clip removed (ratio past the bound on the side the advantage pushes).
        Entries outside the mask are 0 / 1 / False.

    Raises:
        ValueError: unknown ``level``.
    """
    old_logp = jax.lax.stop_gradient(old_logp)
    if advantages.ndim == 1:
        advantages = advantages[:, None]  # [B] -> [B, 1], one advantage per sequence
    if level == "token":
        log_ratio = logp - old_logp
    elif level == "sequence":
        log_ratio = jnp.broadcast_to(sequence_log_ratio(logp, old_logp, mask)[:, None], logp.shape)
    else:
        raise ValueError(f"level: expected 'token' or 'sequence', got {level!r}")
    m = mask.astype(logp.dtype)
    ratio = jnp.exp(log_ratio * m)  # masked entries: exp(0) = 1, never inf
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    unclipped = ratio * advantages
    clipped_obj = jnp.clip(ratio, lo, hi) * advantages
    loss = -jnp.minimum(unclipped, clipped_obj) * m
    was_clipped = ((ratio > hi) & (advantages > 0)) | ((ratio < lo) & (advantages < 0))
    return loss, ratio, was_clipped & (m > 0)


def k3_kl(logp: Array, ref_logp: Array) -> Array:
    """The k3 estimator of ``KL(policy || ref)`` per sampled token (Schulman):
    ``exp(ref - logp) - (ref - logp) - 1``; unbiased, always >= 0."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def k1_kl(logp: Array, ref_logp: Array) -> Array:
    """The k1 estimator ``logp - ref_logp`` (unbiased, may be negative per token); PPO's
    per-token KL penalty in the reward uses it (InstructGPT)."""
    return logp - ref_logp


def aggregate(loss: Array, mask: Array, mode: str, max_len: int | None = None) -> Array:
    """A per-token loss ``[B, C]`` -> scalar.

    * ``"sequence"``: mean over each completion's tokens, then over completions (GRPO as
      published: a long completion's tokens weigh less each).
    * ``"token"``: sum over every real token / number of real tokens (DAPO: every token
      weighs the same).
    * ``"constant"``: sum / (B * max_len) with a fixed ``max_len`` (Dr. GRPO: no length
      normalisation at all, so no length bias).

    Raises:
        ValueError: unknown mode, or ``"constant"`` without ``max_len``.
    """
    m = mask.astype(loss.dtype)
    if mode == "sequence":
        return jnp.mean(masked_mean(loss, m, axis=1))
    if mode == "token":
        return jnp.sum(loss * m) / jnp.maximum(jnp.sum(m), 1.0)
    if mode == "constant":
        if max_len is None or max_len < 1:
            raise ValueError(f"max_len: expected >= 1 for mode 'constant', got {max_len}")
        return jnp.sum(loss * m) / (loss.shape[0] * max_len)
    raise ValueError(f"mode: expected one of {LOSS_AGGREGATIONS}, got {mode!r}")


def gae(rewards: Array, values: Array, mask: Array, gamma: float, lam: float
        ) -> tuple[Array, Array]:
    """Generalised advantage estimation over completion tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` past the last real token = 0 (the
    completion ends the episode), ``A_t = delta_t + gamma * lam * A_{t+1}``, returns
    ``R_t = A_t + V_t``.

    Args:
        rewards / values: ``[B, C]`` float (``values[:, t]`` = V of the state before token t).
        mask: ``[B, C]``, 1 on a prefix of each row (the completion's tokens).
        gamma / lam: discount and GAE lambda.

    Returns:
        ``(advantages [B, C], returns [B, C])``, 0 outside the mask.
    """
    m = mask.astype(jnp.float32)
    r = rewards.astype(jnp.float32) * m
    v = values.astype(jnp.float32) * m
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)  # [B, C], V_{t+1}
    next_m = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
    delta = (r + gamma * next_v * next_m - v) * m

    def back(carry: Array, xs: tuple[Array, Array]) -> tuple[Array, Array]:
        d, nm = xs  # [B] each
        a = d + gamma * lam * nm * carry
        return a, a

    # scan from the last token to the first: time leading, so [B, C] -> [C, B]
    _, adv_t = jax.lax.scan(back, jnp.zeros(r.shape[0], jnp.float32),
                            (delta.T, next_m.T), reverse=True)
    adv = adv_t.T * m  # [C, B] -> [B, C]
    return adv, (adv + v) * m


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array,
               clip: float | None) -> Array:
    """PPO's value loss per token: ``0.5 * max((V - R)^2, (V_clip - R)^2)`` with
    ``V_clip = V_old + clip(V - V_old, -clip, clip)``; ``clip=None`` (or 0) = unclipped
    ``0.5 * (V - R)^2``. Returns ``[B, C]``, 0 outside the mask."""
    returns = jax.lax.stop_gradient(returns)
    old_values = jax.lax.stop_gradient(old_values)
    loss = jnp.square(values - returns)
    if clip:
        v_clip = old_values + jnp.clip(values - old_values, -clip, clip)
        loss = jnp.maximum(loss, jnp.square(v_clip - returns))
    return 0.5 * loss * mask.astype(loss.dtype)
