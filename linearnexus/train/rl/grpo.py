"""GRPO: group-relative policy optimisation (DeepSeekMath), with the later variants as
options (DAPO's clip-higher and token-level aggregation, Dr. GRPO's unscaled advantages
and constant normaliser, GSPO's sequence-level ratio).

For every prompt, G completions are sampled; each completion's advantage is its reward
relative to its group (:func:`~linearnexus.train.rl.losses.group_advantages`), shared by
its tokens; the policy maximises the clipped surrogate, optionally minus ``beta`` times the
k3 KL to a frozen reference. The objective, in full, is in ``docs/rl.md``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from linearnexus.models import LMModel
from linearnexus.train.rl._cache import cached
from linearnexus.train.rl.config import RLConfig
from linearnexus.train.rl.losses import (
    aggregate,
    clipped_policy_loss,
    group_advantages,
    k3_kl,
    masked_mean,
    mean_metrics,
)
from linearnexus.train.rl.rollout import Rollout, completion_logprobs
from linearnexus.train.sft import TrainState

__all__ = ["GRPO", "grpo_loss"]


def grpo_loss(logp: jax.Array, entropy: jax.Array, batch: dict[str, Any], config: RLConfig
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's scalar loss from the policy's completion log-probs.

    Args:
        logp / entropy: ``[B, C]`` of the policy being trained.
        batch: ``mask [B, C]``, ``adv [B]``, ``old_logp [B, C]`` or None (= ``logp``
            without gradient: the first update on a fresh rollout), ``ref_logp [B, C]`` or
            None (needed when ``config.grpo.beta > 0``).
        config: the run config (``config.grpo`` is read).

    Returns:
        ``(loss, metrics)`` with ``clip_frac``, ``entropy``, ``kl`` (0 without reference),
        ``ratio`` (mean over tokens).
    """
    g = config.grpo
    mask = batch["mask"]
    old = batch["old_logp"] if batch["old_logp"] is not None else jax.lax.stop_gradient(logp)
    per_token, ratio, clipped = clipped_policy_loss(
        logp, old, batch["adv"], mask, eps_low=g.eps_low, eps_high=g.eps_high,
        level=g.importance_level)
    kl = jnp.zeros_like(logp)
    if g.beta > 0:
        kl = k3_kl(logp, batch["ref_logp"])
        per_token = per_token + g.beta * kl * mask
    loss = aggregate(per_token, mask, g.loss_aggregation, mask.shape[1])
    metrics = {"clip_frac": masked_mean(clipped.astype(jnp.float32), mask),
               "entropy": masked_mean(entropy, mask), "kl": masked_mean(kl, mask),
               "ratio": masked_mean(ratio, mask)}
    return loss, metrics


class GRPO:
    """The GRPO update of :class:`~linearnexus.train.rl.trainer.RLTrainer` (the trained
    module is the policy itself).

    Args:
        config: the run config.
        policy: the policy model (its structure; weights live in the trainer's state).

    :meth:`set_optimizer` compiles the update for an optax transformation; call it before
    :meth:`update`.
    """

    name = "grpo"

    def __init__(self, config: RLConfig, policy: LMModel) -> None:
        self.config = config
        self.module = policy
        self.graphdef, _, _ = nnx.split(policy, nnx.Param, ...)

    def set_optimizer(self, tx: optax.GradientTransformation) -> None:
        """Build the jitted update step for ``tx``."""
        graphdef, config, temperature = self.graphdef, self.config, self.config.temperature

        def step(state: TrainState, batch: dict[str, Any], prompt_len: int):
            def loss_fn(params):
                model = nnx.merge(graphdef, params, state.rest)
                logits, _ = model(batch["tokens"], mask=batch["attn"])  # [B, P + C, V]
                logp, ent = completion_logprobs(logits, batch["tokens"], prompt_len, temperature)
                return grpo_loss(logp, ent, batch, config)

            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return TrainState(params, state.rest, opt_state, state.rng), {**metrics, "loss": loss}

        # donated: the new state reuses the old state's buffers
        key = ("grpo", config.temperature, config.grpo.to_dict(), tx)
        self._step = cached(graphdef, key, lambda: jax.jit(step, static_argnums=(2,),
                                                           donate_argnums=(0,)))

    @staticmethod
    def policy_state(params: Any, rest: Any) -> tuple[Any, Any]:
        """The policy's ``(params, rest)`` inside the trained state (all of it here)."""
        return params, rest

    @staticmethod
    def extra_state(params: Any, rest: Any) -> dict[str, Any]:
        """Trained state that is not the policy's (none for GRPO)."""
        return {}

    def update(self, state: TrainState, rollout: Rollout, rewards: np.ndarray, *,
               logprob_fn: Any, ref_logp: jax.Array | None, rng: np.random.Generator
               ) -> tuple[TrainState, dict[str, float]]:
        """``num_iterations`` updates on one rollout batch.

        Args:
            state: the trainer's state (donated).
            rollout: the batch; rows ``g * G ... g * G + G - 1`` share a prompt.
            rewards: ``[B]`` total rewards.
            logprob_fn: ``(params, rest, tokens, attn, P) -> (logp, entropy)``, to store
                the sampling policy's log-probs when ``num_iterations > 1``.
            ref_logp: ``[B, C]`` reference log-probs, or None when ``beta == 0``.
            rng: unused (GRPO updates on the whole batch).

        Returns:
            ``(state, metrics)``, metrics averaged over the iterations.
        """
        cfg = self.config
        adv = group_advantages(jnp.asarray(rewards, jnp.float32), cfg.group_size,
                               scale_std=cfg.grpo.scale_rewards)
        mask = rollout.mask * (rollout.stopped[:, None] if cfg.mask_truncated else 1.0)
        tokens = jnp.asarray(rollout.tokens)
        attn = None if rollout.attn_mask is None else jnp.asarray(rollout.attn_mask)
        old = None
        if cfg.grpo.num_iterations > 1:
            old, _ = logprob_fn(state.params, state.rest, tokens, attn, rollout.prompt_len)
        batch = {"tokens": tokens, "attn": attn, "mask": jnp.asarray(mask, jnp.float32),
                 "adv": adv, "old_logp": old, "ref_logp": ref_logp}
        records = []
        for _ in range(cfg.grpo.num_iterations):
            state, metrics = self._step(state, batch, rollout.prompt_len)
            records.append(metrics)
        totals = mean_metrics(records)
        if ref_logp is None:
            totals.pop("kl")
        totals["adv_abs"] = float(jnp.mean(jnp.abs(adv)))
        return state, totals
