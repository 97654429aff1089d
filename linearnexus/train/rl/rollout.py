"""Rollouts: sample completions with :func:`linearnexus.generate.generate`, lay them out
for a teacher-forced forward, and compute per-token log-probs.

Layout of a rollout batch (``B`` rows, prompts left-padded to ``P``, completions
right-padded to ``C = max_new_tokens``)::

    tokens [B, P + C]   pad pad p0 p1 p2 | c0 c1 c2 STOP pad pad
    attn   [B, P + C]   0   0   1  1  1  | 1  1  1  1    1   1      (None when no prompt pads)
    mask   [B, C]                        | 1  1  1  1    0   0      (completion tokens + stop)

Token ``c_j`` sits at column ``P + j`` and is predicted by the logits at column
``P + j - 1``, so the log-probs of the completion are one slice of one forward pass. The
pads after a completion are not masked in ``attn``: the model is causal, so nothing before
them sees them, and their positions are masked out of every loss by ``mask``.

The sampler never returns log-probs (``generate`` returns ids only); the log-probs of the
old policy, the reference and the policy being trained all come from the same
teacher-forced forward (``completion_logprobs``), so at the first update the importance
ratio is exactly 1 for every block type (chunked and recurrent forms of a block differ by
rounding; sampling with one and scoring with the other does not enter the ratio).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from linearnexus.core.types import Array
from linearnexus.generate import PAD_ID, SamplingConfig, generate
from linearnexus.models import LMModel

__all__ = ["Rollout", "build_rollout", "completion_logprobs", "sample_completions"]


@dataclasses.dataclass
class Rollout:
    """One batch of sampled completions, laid out for the teacher-forced forward.

    Attributes:
        tokens: ``[B, P + C]`` int32 (see the module docstring).
        attn_mask: ``[B, P + C]`` bool, or None when every prompt has length ``P``.
        mask: ``[B, C]`` float32, 1 at completion tokens (the stop token included).
        prompt_len: ``P``.
        lengths: ``[B]`` int32 completion lengths (stop token included).
        stopped: ``[B]`` bool, True where the completion ended with a stop token (False =
            truncated at ``C`` tokens).
        prompt_ids / completion_ids: per row, the ids (completion with its stop token).
    """

    tokens: np.ndarray
    attn_mask: np.ndarray | None
    mask: np.ndarray
    prompt_len: int
    lengths: np.ndarray
    stopped: np.ndarray
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def completion_len(self) -> int:
        return int(self.mask.shape[1])


def sample_completions(model: LMModel, prompt_ids: Sequence[Sequence[int]], *,
                       max_new_tokens: int, temperature: float, stop_tokens: Sequence[int],
                       seed: int, pad_id: int = PAD_ID) -> tuple[list[list[int]], np.ndarray]:
    """Sample one completion per prompt (batched, compiled, recurrent states for linear
    blocks: all of that is :func:`generate`).

    Returns:
        ``(completions, stopped [B] bool)``; each completion ends with the stop token it
        sampled when ``stopped`` (``generate`` cuts it; it is put back here because the
        policy chose it and the losses train it).

    With one stop token ``generate`` stops rows itself. With several, ``generate`` runs
    without them and rows are cut here at the first one (``generate`` does not say which
    stop token ended a row, and the losses need the id), which costs decoding to
    ``max_new_tokens``.
    """
    stops = tuple(int(t) for t in stop_tokens)
    one = len(stops) == 1
    cfg = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens,
                         stop_tokens=stops if one else (), seed=seed)
    outs = generate(model, [list(p) for p in prompt_ids], cfg, pad_id=pad_id)
    completions: list[list[int]] = []
    stopped = np.zeros(len(outs), bool)
    for i, ids in enumerate(outs):
        if one:
            if len(ids) < max_new_tokens:
                ids = [*ids, stops[0]]
                stopped[i] = True
        else:
            for j, tok in enumerate(ids):
                if tok in stops:
                    ids, stopped[i] = ids[: j + 1], True
                    break
        completions.append(list(ids))
    return completions, stopped


def build_rollout(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                  stopped: np.ndarray, max_new_tokens: int, pad_id: int = PAD_ID) -> Rollout:
    """Lay prompts and completions out as in the module docstring.

    Raises:
        ValueError: empty prompts, a completion longer than ``max_new_tokens``, or
            different numbers of prompts and completions.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"completion_ids: expected {len(prompt_ids)} rows, got {len(completion_ids)}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token")
    batch = len(prompt_ids)
    p_len = max(len(p) for p in prompt_ids)
    tokens = np.full((batch, p_len + max_new_tokens), pad_id, np.int32)
    attn = np.ones((batch, p_len + max_new_tokens), bool)
    mask = np.zeros((batch, max_new_tokens), np.float32)
    lengths = np.zeros(batch, np.int32)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if len(c) > max_new_tokens:
            raise ValueError(f"completion_ids[{i}]: {len(c)} tokens, more than max_new_tokens="
                             f"{max_new_tokens}")
        tokens[i, p_len - len(p): p_len] = p
        attn[i, : p_len - len(p)] = False
        tokens[i, p_len: p_len + len(c)] = c
        mask[i, : len(c)] = 1.0
        lengths[i] = len(c)
    return Rollout(tokens=tokens, attn_mask=None if attn.all() else attn, mask=mask,
                   prompt_len=p_len, lengths=lengths, stopped=np.asarray(stopped, bool),
                   prompt_ids=[list(p) for p in prompt_ids],
                   completion_ids=[list(c) for c in completion_ids])


def completion_logprobs(logits: Array, tokens: Array, prompt_len: int, temperature: float
                        ) -> tuple[Array, Array]:
    """Log-probs and entropies of the completion tokens under ``logits / temperature``.

    The sampling distribution is ``softmax(logits / temperature)``, so the ratio and KL
    terms use the same temperature (a greedy ``temperature == 0`` rollout is not a
    distribution; temperature must be > 0).

    Args:
        logits: ``[B, P + C, V]`` from one forward over ``tokens``.
        tokens: ``[B, P + C]`` int ids.
        prompt_len: ``P`` (static).
        temperature: > 0 (static).

    Returns:
        ``(logp [B, C], entropy [B, C])`` float32.
    """
    pred = logits[:, prompt_len - 1: -1].astype(jnp.float32) / temperature  # [B, C, V]
    targets = tokens[:, prompt_len:]  # [B, C]
    logz = jax.nn.log_softmax(pred, axis=-1)  # [B, C, V]
    logp = jnp.take_along_axis(logz, targets[..., None], axis=-1)[..., 0]  # [B, C, 1] -> [B, C]
    entropy = -jnp.sum(jnp.exp(logz) * logz, axis=-1)  # [B, C]
    return logp, entropy
