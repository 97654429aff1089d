"""Continuous batching: a request queue decoded in fixed batch slots that are refilled as
requests finish, with no recompilation.

How it runs::

    submit(prompt, ...) -> queue
    loop until the queue is empty and every slot is free:
      refill: for each free slot, prefill one queued prompt alone ([1, P] chunk mode),
              record its first token, write its state into the slot      (jitted, slot traced)
      decode: up to ``sync_every`` steps of every busy slot in one ``lax.while_loop``; the
              loop exits early when a slot finishes, so the host can refill it
      collect: one host sync; finished requests leave their slot

Each slot has its own PRNG key, token budget and stop ids, so a request's tokens do not
depend on which other requests share the batch: they equal
``generate(model, [prompt], cfg)`` with that request's ``seed``, ``max_new_tokens`` and
``stop_tokens`` (greedy and sampled). Free slots are fed pad tokens and their state is
overwritten (reset) when a new request moves in. Works for every block: recurrent states
and slot KV caches both keep the batch on their leading axis.

Compilation: one decode loop and one insert per (model structure, sampler setting, number
of slots), one prefill per prompt bucket (:func:`linearnexus.generate.prompt_bucket`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearnexus.core.compile_cache import CompileCache
from linearnexus.core.types import Array
from linearnexus.generate import (
    _TRACES,
    LOOP_CHUNK,
    PAD_ID,
    WEIGHTS,
    Decoder,
    SamplingConfig,
    _as_prompts,
    _checked_cfg,
    _sampler,
    cache_limit,
    check_capacity,
    left_pad,
    prompt_bucket,
    sample_next,
    stop_array,
)
from linearnexus.models import LMModel, ModelState


class _Serve(NamedTuple):
    insert: Any
    loop: Any


_SERVE: CompileCache[_Serve] = CompileCache(max_entries=8)


class _Slots(NamedTuple):
    """Per-slot decode state, all on the device (leading axis = slot)."""

    nxt: Array  # [B] int32, last sampled token
    state: ModelState  # the model state of every slot
    keys: Array  # [B] PRNG keys
    active: Array  # [B] bool, the slot holds an unfinished request
    left: Array  # [B] int32, tokens the request may still produce
    stops: Array  # [B, S] int32 stop ids, -1 padded


def _build(graphdef: Any, cfg: SamplingConfig) -> _Serve:
    sampler = _sampler(cfg)

    def insert(slots: _Slots, state1: ModelState, first: Array, key: Array, left: Array,
               stops: Array, slot: Array) -> _Slots:
        """Move a prefilled request (batch-1 ``state1``) into ``slot``; resets that slot."""
        _TRACES["serve_insert"] += 1  # runs at trace time only

        def put(big: Array, one: Array) -> Array:  # [B, ...] <- [1, ...] at row `slot`
            return jax.lax.dynamic_update_slice_in_dim(big, one.astype(big.dtype), slot, 0)

        return _Slots(slots.nxt.at[slot].set(first[0]), jax.tree.map(put, slots.state, state1),
                      slots.keys.at[slot].set(key), slots.active.at[slot].set(True),
                      slots.left.at[slot].set(left), slots.stops.at[slot].set(stops))

    def loop(params: Any, slots: _Slots, n: Array, pad_id: Array):
        """Up to ``n`` decode steps of every active slot; stops early when one finishes."""
        _TRACES["serve_loop"] += 1  # runs at trace time only
        batch = slots.nxt.shape[0]
        buf = jnp.full((batch, LOOP_CHUNK), -1, jnp.int32)

        def cond(carry):
            i, s, _, finished = carry
            return (i < n) & jnp.any(s.active) & ~finished

        def body(carry):
            i, s, buf, _ = carry
            model = nnx.merge(graphdef, params)
            feed = jnp.where(s.active, s.nxt, pad_id)[:, None]  # [B, 1]; free slots get pads
            logits, state = model(feed, state=s.state, mode="recurrent")  # [B, 1, V]
            # each slot splits its own key as generate does for a batch of one
            pairs = jax.vmap(jax.random.split)(s.keys)  # [B, 2]
            new = jax.vmap(lambda lg, k: sample_next(lg[None], k, sampler)[0])(
                logits[:, -1], pairs[:, 1])  # [B]
            nxt = jnp.where(s.active, new, s.nxt)
            stop = s.active & jnp.any(nxt[:, None] == s.stops, axis=-1)  # [B]
            left = s.left - s.active.astype(jnp.int32)
            finish = s.active & (stop | (left <= 0))
            col = jnp.where(s.active & ~stop, nxt, -1)[:, None]  # [B, 1]
            buf = jax.lax.dynamic_update_slice(buf, col, (0, i))
            s = _Slots(nxt, state, pairs[:, 0], s.active & ~finish, left, s.stops)
            return i + 1, s, buf, jnp.any(finish)

        i, slots, buf, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, buf, False))
        return buf, i, slots

    return _Serve(jax.jit(insert, donate_argnums=(0,)), jax.jit(loop, donate_argnums=(1,)))


@dataclasses.dataclass
class Request:
    """One queued request (see :meth:`ContinuousBatcher.submit`)."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    seed: int
    stop_tokens: tuple[int, ...]
    tokens: list[int] = dataclasses.field(default_factory=list)


class ContinuousBatcher:
    """Decode a stream of requests in ``slots`` fixed batch rows, refilling rows as
    requests finish.

    Example::

        server = ContinuousBatcher(model, slots=16, cfg=SamplingConfig(temperature=0.8))
        ids = [server.submit(p, max_new_tokens=n) for p, n in requests]
        outs = server.run()            # {request id: new token ids}

    Args:
        model: the language model.
        slots: batch rows decoded together (a compiled shape: fixed for the server's life).
        cfg: sampling settings; ``temperature`` / ``top_k`` / ``top_p`` apply to every
            request, ``max_new_tokens`` / ``seed`` / ``stop_tokens`` are per-request defaults.
        sync_every: decode steps per device call at most (1 ..
            :data:`~linearnexus.generate.LOOP_CHUNK`); a call also returns as soon as a
            request finishes, so its slot is refilled without waiting.
        weights: see :func:`linearnexus.generate.inference_params`.
        pad_id: the id fed to free slots.

    Raises:
        ValueError / TypeError: bad arguments, named.
    """

    def __init__(self, model: LMModel, *, slots: int = 8, cfg: SamplingConfig | None = None,
                 sync_every: int = 32, weights: str = "compute", pad_id: int = PAD_ID) -> None:
        if not isinstance(model, LMModel):
            raise TypeError(f"model: expected an LMModel, got {type(model).__name__}")
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots: expected an int >= 1, got {slots!r}")
        if not isinstance(sync_every, int) or not 1 <= sync_every <= LOOP_CHUNK:
            raise ValueError(f"sync_every: expected an int in [1, {LOOP_CHUNK}], got {sync_every!r}")
        if weights not in WEIGHTS:
            raise ValueError(f"weights: expected one of {WEIGHTS}, got {weights!r}")
        self.model = model
        self.cfg = _checked_cfg(cfg, model.config.vocab_size)
        self.n_slots = slots
        self.sync_every = sync_every
        self.pad_id = pad_id
        self._decoder = Decoder(model, self.cfg, weights=weights)
        graphdef, _ = nnx.split(model)
        self._fns = _SERVE.get(graphdef, (self.cfg.sampler_key(), "serve"),
                               lambda: _build(graphdef, self.cfg))
        self._queue: collections.deque[Request] = collections.deque()
        self._next_id = 0
        self._slots: _Slots | None = None
        self._owner: list[Request | None] = [None] * slots
        self.stats = {"decode_calls": 0, "prefills": 0, "tokens": 0}

    def submit(self, prompt: list[int] | np.ndarray, *, max_new_tokens: int | None = None,
               seed: int | None = None, stop_tokens: tuple[int, ...] | None = None) -> int:
        """Queue a prompt; returns its request id. Unset fields come from ``cfg``.

        Raises:
            ValueError: empty / out-of-vocabulary prompt, bad field values, or a prompt
                plus ``max_new_tokens`` over an attention cache's size (checked here).
        """
        cfg = self.cfg.replace(**{k: v for k, v in (("max_new_tokens", max_new_tokens),
                                                    ("seed", seed), ("stop_tokens", stop_tokens))
                                  if v is not None})
        cfg = _checked_cfg(cfg, self.model.config.vocab_size)
        (row,) = _as_prompts([prompt], self.model.config.vocab_size)
        check_capacity(self.model, len(row), cfg.max_new_tokens)
        req = Request(self._next_id, row, cfg.max_new_tokens, cfg.seed, tuple(cfg.stop_tokens))
        self._next_id += 1
        self._queue.append(req)
        return req.id

    def _empty_slots(self) -> _Slots:
        b = self.n_slots
        width = int(stop_array(()).shape[0])
        return _Slots(jnp.zeros(b, jnp.int32), self.model.init_state(b),
                      jax.random.split(jax.random.key(0), b), jnp.zeros(b, bool),
                      jnp.zeros(b, jnp.int32), jnp.full((b, width), -1, jnp.int32))

    def _start(self, req: Request, slot: int) -> bool:
        """Prefill ``req`` alone and move it into ``slot``; False when it already finished
        (its first token is a stop token, or it wanted one token)."""
        tokens, mask = left_pad([req.prompt], prompt_bucket(len(req.prompt),
                                                            cache_limit(self.model)), self.pad_id)
        first, state1, key = self._decoder.prefill(tokens, mask, jax.random.key(req.seed))
        self.stats["prefills"] += 1
        if req.max_new_tokens == 0:
            return False
        tok = int(first[0])
        if tok in req.stop_tokens:
            return False
        req.tokens.append(tok)
        self.stats["tokens"] += 1
        if req.max_new_tokens == 1:
            return False
        stops = stop_array(req.stop_tokens)
        if stops.shape[0] != self._slots.stops.shape[1]:
            raise ValueError(f"stop_tokens: at most {self._slots.stops.shape[1]} stop ids per "
                             f"request in one server, got {len(req.stop_tokens)}")
        self._slots = self._fns.insert(self._slots, state1, first, key,
                                       jnp.int32(req.max_new_tokens - 1), stops, jnp.int32(slot))
        self._owner[slot] = req
        return True

    def run(self) -> dict[int, list[int]]:
        """Decode until the queue is empty and every slot is free.

        Returns:
            ``{request id: new token ids}`` for the requests finished in this call (stop
            tokens excluded, as :func:`~linearnexus.generate.generate`).
        """
        done: dict[int, list[int]] = {}
        if self._slots is None:
            self._slots = self._empty_slots()
        while self._queue or any(r is not None for r in self._owner):
            for slot in range(self.n_slots):
                while self._owner[slot] is None and self._queue:
                    req = self._queue.popleft()
                    if not self._start(req, slot):
                        done[req.id] = req.tokens
            if all(r is None for r in self._owner):
                continue
            buf, count, self._slots = self._fns.loop(self._decoder.params, self._slots,
                                                     jnp.int32(self.sync_every),
                                                     jnp.int32(self.pad_id))
            self.stats["decode_calls"] += 1
            block = np.asarray(buf[:, : int(count)])  # the host sync of this call
            active = np.asarray(self._slots.active)
            for slot, req in enumerate(self._owner):
                if req is None:
                    continue
                new = [t for t in block[slot].tolist() if t >= 0]
                req.tokens.extend(new)
                self.stats["tokens"] += len(new)
                if not active[slot]:
                    done[req.id] = req.tokens
                    self._owner[slot] = None
        return done


__all__ = ["ContinuousBatcher", "Request"]
