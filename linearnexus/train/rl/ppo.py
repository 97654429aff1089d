"""PPO for language models (the InstructGPT recipe): a value head, GAE over completion
tokens, clipped policy and value losses, an entropy bonus, and a per-token KL penalty to a
frozen reference folded into the reward. The equations are in ``docs/rl.md``.

The trained module is :class:`ActorCritic`: the policy (an :class:`LMModel`) plus a value
head on the policy's own trunk (``value_model="shared"``) or on a separate copy of the
initial model (``"separate"``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from linearnexus.core.types import Array
from linearnexus.models import LMModel
from linearnexus.train.rl._cache import cached
from linearnexus.train.rl.config import RLConfig
from linearnexus.train.rl.losses import (
    aggregate,
    clipped_policy_loss,
    gae,
    k1_kl,
    k3_kl,
    masked_mean,
    masked_whiten,
    mean_metrics,
    value_loss,
)
from linearnexus.train.rl.rollout import Rollout, completion_logprobs
from linearnexus.train.sft import TrainState

__all__ = ["PPO", "ActorCritic", "token_rewards"]


class ActorCritic(nnx.Module):
    """The policy plus a scalar value head.

    Args:
        policy: the policy LMModel (kept as ``self.policy``).
        value_trunk: None = the value head reads the policy's final hidden states; an
            LMModel = its own trunk (only its ``hidden_states`` are used).
        rngs: for the head (its weights start at zero, so the first values are 0).
    """

    def __init__(self, policy: LMModel, value_trunk: LMModel | None = None, *,
                 rngs: nnx.Rngs) -> None:
        self.policy = policy
        self.value_trunk = value_trunk
        d = policy.config.d_model
        self.value_head = nnx.Linear(d, 1, kernel_init=nnx.initializers.zeros,
                                     bias_init=nnx.initializers.zeros,
                                     param_dtype=jnp.dtype(policy.config.param_dtype), rngs=rngs)

    def __call__(self, tokens: Array, mask: Array | None = None) -> tuple[Array, Array]:
        """``tokens [B, T]`` -> ``(logits [B, T, V], values [B, T])``; ``values[:, t]`` is
        the value of the state after token t (before token t + 1)."""
        hidden, _ = self.policy.hidden_states(tokens, mask=mask)  # [B, T, D]
        logits = self.policy.logits(hidden)
        if self.value_trunk is not None:
            hidden, _ = self.value_trunk.hidden_states(tokens, mask=mask)
        values = self.value_head(hidden)[..., 0].astype(jnp.float32)  # [B, T, 1] -> [B, T]
        return logits, values


def token_rewards(scores: Array, lengths: Array, mask: Array, logp: Array | None,
                  ref_logp: Array | None, kl_coef: float) -> Array:
    """Per-token rewards: ``-kl_coef * (logp - ref_logp)`` at every completion token, plus
    the sequence's score at its last token.

    Args:
        scores: ``[B]``; lengths: ``[B]`` int (>= 1); mask: ``[B, C]``;
        logp / ref_logp: ``[B, C]`` or None (no KL term).

    Returns:
        ``[B, C]`` float32, 0 outside the mask.
    """
    c = mask.shape[1]
    last = jax.nn.one_hot(lengths - 1, c, dtype=jnp.float32)  # [B, C]
    r = scores.astype(jnp.float32)[:, None] * last
    if kl_coef > 0 and logp is not None and ref_logp is not None:
        r = r - kl_coef * k1_kl(logp, ref_logp)
    return r * mask.astype(jnp.float32)


class PPO:
    """The PPO update of :class:`~linearnexus.train.rl.trainer.RLTrainer`.

    Args:
        config: the run config.
        policy: the policy model; with ``value_model="separate"`` a copy of it (weights
            included) becomes the critic's trunk.

    :meth:`set_optimizer` compiles the update for an optax transformation (over the whole
    ActorCritic's parameters); call it before :meth:`update`.
    """

    name = "ppo"

    def __init__(self, config: RLConfig, policy: LMModel) -> None:
        self.config = config
        trunk = None
        if config.ppo.value_model == "separate":
            gd, state = nnx.split(policy)
            trunk = nnx.merge(gd, jax.tree.map(jnp.copy, state))
        self.module = ActorCritic(policy, trunk, rngs=nnx.Rngs(config.seed))
        self.graphdef, _, _ = nnx.split(self.module, nnx.Param, ...)

    def set_optimizer(self, tx: optax.GradientTransformation) -> None:
        """Build the jitted rollout forward and update step for ``tx``."""
        graphdef, temperature, p = self.graphdef, self.config.temperature, self.config.ppo

        def forward(params, rest, tokens, attn, prompt_len):
            model = nnx.merge(graphdef, params, rest)
            logits, values = model(tokens, attn)  # [B, P + C, V], [B, P + C]
            logp, ent = completion_logprobs(logits, tokens, prompt_len, temperature)
            return logp, ent, values[:, prompt_len - 1: -1]  # the value before each token

        def step(state: TrainState, batch: dict[str, Any], prompt_len: int):
            def loss_fn(params):
                logp, ent, values = forward(params, state.rest, batch["tokens"], batch["attn"],
                                            prompt_len)
                mask = batch["mask"]
                pg, ratio, clipped = clipped_policy_loss(
                    logp, batch["old_logp"], batch["adv"], mask, eps_low=p.clip_eps,
                    eps_high=p.clip_eps)
                pg_loss = aggregate(pg, mask, "token")
                vf = aggregate(value_loss(values, batch["old_values"], batch["returns"], mask,
                                          p.value_clip), mask, "token")
                entropy = masked_mean(ent, mask)
                loss = pg_loss + p.vf_coef * vf - p.ent_coef * entropy
                return loss, {"policy_loss": pg_loss, "value_loss": vf, "entropy": entropy,
                              "clip_frac": masked_mean(clipped.astype(jnp.float32), mask),
                              "ratio": masked_mean(ratio, mask)}

            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return TrainState(params, state.rest, opt_state, state.rng), {**metrics, "loss": loss}

        key = ("ppo", self.config.temperature, p.to_dict(), tx)
        self._forward, self._step = cached(graphdef, key, lambda: (
            jax.jit(forward, static_argnums=(4,)),
            jax.jit(step, static_argnums=(2,), donate_argnums=(0,))))

    @staticmethod
    def policy_state(params: Any, rest: Any) -> tuple[Any, Any]:
        """The policy's ``(params, rest)`` inside the ActorCritic's state."""
        return params["policy"], rest.get("policy", {})

    @staticmethod
    def extra_state(params: Any, rest: Any) -> dict[str, Any]:
        """The value head (and separate trunk): everything that is not the policy."""
        return {"params": {k: v for k, v in params.items() if k != "policy"},
                "rest": {k: v for k, v in rest.items() if k != "policy"}}

    def update(self, state: TrainState, rollout: Rollout, rewards: np.ndarray, *,
               logprob_fn: Any, ref_logp: jax.Array | None, rng: np.random.Generator
               ) -> tuple[TrainState, dict[str, float]]:
        """``epochs`` passes of ``num_minibatches`` updates over one rollout batch.

        Args: as :meth:`GRPO.update` (``logprob_fn`` unused: the ActorCritic's own forward
        gives the old log-probs and values); ``rng`` draws the minibatch order.
        """
        cfg, p = self.config, self.config.ppo
        tokens = jnp.asarray(rollout.tokens)
        attn = None if rollout.attn_mask is None else jnp.asarray(rollout.attn_mask)
        mask = jnp.asarray(rollout.mask)
        old_logp, ent, old_values = self._forward(state.params, state.rest, tokens, attn,
                                                  rollout.prompt_len)
        rewards_tok = token_rewards(jnp.asarray(rewards, jnp.float32), jnp.asarray(rollout.lengths),
                                    mask, old_logp, ref_logp, p.kl_coef)
        adv, returns = gae(rewards_tok, old_values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = masked_whiten(adv, mask)
        loss_mask = mask * (jnp.asarray(rollout.stopped)[:, None] if cfg.mask_truncated else 1.0)
        batch = {"tokens": tokens, "attn": attn, "mask": loss_mask, "adv": adv,
                 "old_logp": old_logp, "old_values": old_values, "returns": returns}
        n, mb = rollout.batch_size, rollout.batch_size // p.num_minibatches
        records = []
        for _ in range(p.epochs):
            order = rng.permutation(n)
            for k in range(p.num_minibatches):
                idx = jnp.asarray(order[k * mb:(k + 1) * mb])
                sub = {key: None if v is None else v[idx] for key, v in batch.items()}
                state, metrics = self._step(state, sub, rollout.prompt_len)
                records.append(metrics)
        totals = mean_metrics(records)
        totals["rollout_entropy"] = float(masked_mean(ent, mask))
        totals["value_mean"] = float(masked_mean(old_values, mask))
        totals["return_mean"] = float(masked_mean(returns, mask))
        if ref_logp is not None:
            totals["kl"] = float(masked_mean(k3_kl(old_logp, ref_logp), mask))
        return state, totals
