"""Continuous batching: a request queue decoded in fixed batch slots that are refilled as
requests finish, with no recompilation.

How it runs::

    submit(prompt, ...) -> queue
    loop until the queue is empty and every slot is free:
      refill: prefill queued prompts for all free slots in one chunk-mode call ([R, P]),
              sample each one's first token with its own key, scatter their states into
              the free slots (resetting them)                            (jitted, slots traced)
      decode: up to ``sync_every`` steps of every busy slot in one ``lax.while_loop``; the
              loop exits early when a slot finishes, so the host can refill it
      collect: one host sync; finished requests leave their slot

Each slot has its own PRNG key, token budget and stop ids, so a request's tokens do not
depend on which other requests share the batch: they equal
``generate(model, [prompt], cfg)`` with that request's ``seed``, ``max_new_tokens`` and
``stop_tokens`` (greedy and sampled). Free slots are fed pad tokens and their state is
overwritten (reset) when a new request moves in. Works for every block: recurrent states
and slot KV caches both keep the batch on their leading axis.

Compilation: one decode loop per (model structure, sampler setting, number of slots); one
prefill and insert per (prompt bucket (:func:`linearnexus.generate.prompt_bucket`), number of
refilled rows rounded up to a power of two).
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
    counted_while,
    decode_block,
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


def _build(graphdef: Any, cfg: SamplingConfig, block: int = 1) -> _Serve:
    sampler = _sampler(cfg)

    def sample_rows(logits: Array, keys: Array) -> tuple[Array, Array]:
        """One token per row with the row's own key, split as generate splits its key for a
        batch of one: ``[B, V], [B] keys -> ([B] int32, [B] keys)``."""
        pairs = jax.vmap(jax.random.split)(keys)  # [B, 2]
        toks = jax.vmap(lambda lg, k: sample_next(lg[None], k, sampler)[0])(logits, pairs[:, 1])
        return toks, pairs[:, 0]

    def insert(slots: _Slots, state: ModelState, last: Array, keys: Array, left: Array,
               stops: Array, where: Array) -> tuple[_Slots, Array]:
        """Move prefilled requests (row r of ``state`` / ``last`` logits [R, V]) into slots
        ``where[r]`` (``where[r] >= B``: a filler row, dropped); resets those slots.

        Returns the new slots and the requests' first tokens ``[R]``."""
        _TRACES["serve_insert"] += 1  # runs at trace time only
        first, keys = sample_rows(last, keys)
        stopped = jnp.any(first[:, None] == stops, axis=-1)  # [R]

        def put(big: Array, rows: Array) -> Array:  # [B, ...] <- [R, ...] at rows `where`
            return big.at[where].set(rows.astype(big.dtype), mode="drop")

        return _Slots(put(slots.nxt, first), jax.tree.map(put, slots.state, state),
                      put(slots.keys, keys), put(slots.active, ~stopped & (left > 0)),
                      put(slots.left, left), put(slots.stops, stops)), first

    def loop(params: Any, slots: _Slots, n: Array, pad_id: Array):
        """Up to ``n`` decode steps of every active slot; stops early when one finishes."""
        _TRACES["serve_loop"] += 1  # runs at trace time only
        batch = slots.nxt.shape[0]
        buf = jnp.full((batch, LOOP_CHUNK), -1, jnp.int32)

        def body(carry):
            i, s, buf, finished = carry
            model = nnx.merge(graphdef, params)
            feed = jnp.where(s.active, s.nxt, pad_id)[:, None]  # [B, 1]; free slots get pads
            logits, state = model(feed, state=s.state, mode="recurrent")  # [B, 1, V]
            new, keys = sample_rows(logits[:, -1], s.keys)  # each slot with its own key
            nxt = jnp.where(s.active, new, s.nxt)
            stop = s.active & jnp.any(nxt[:, None] == s.stops, axis=-1)  # [B]
            left = s.left - s.active.astype(jnp.int32)
            finish = s.active & (stop | (left <= 0))
            col = jnp.where(s.active & ~stop, nxt, -1)[:, None]  # [B, 1]
            buf = jax.lax.dynamic_update_slice(buf, col, (0, i))
            s = _Slots(nxt, state, keys, s.active & ~finish, left, s.stops)
            return i + 1, s, buf, finished | jnp.any(finish)

        # in blocks of steps (generate.decode_block), a block in which a request finishes
        # runs to its end, the other slots going on
        i, slots, buf, _ = counted_while(lambda c: jnp.any(c[1].active) & ~c[3], body,
                                         (jnp.int32(0), slots, buf, False), n, block)
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
        state_dtype: the recurrent states' dtype between steps (None: as the blocks make
            them, float32; see :class:`~linearnexus.generate.Decoder`).
        pad_id: the id fed to free slots.

    Raises:
        ValueError / TypeError: bad arguments, named.
    """

    def __init__(self, model: LMModel, *, slots: int = 8, cfg: SamplingConfig | None = None,
                 sync_every: int = 32, weights: str = "compute", pad_id: int = PAD_ID,
                 state_dtype: str | None = None) -> None:
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
        self._decoder = Decoder(model, self.cfg, weights=weights, state_dtype=state_dtype)
        graphdef, _ = nnx.split(model)
        block = decode_block()
        self._fns = _SERVE.get(graphdef, (self.cfg.sampler_key(), "serve", block),
                               lambda: _build(graphdef, self.cfg, block))
        self._queue: collections.deque[Request] = collections.deque()
        self._next_id = 0
        self._slots: _Slots | None = None
        self._owner: list[Request | None] = [None] * slots
        self._finished: list[Request] = []  # asked for no tokens: done at submit
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
        if len(cfg.stop_tokens) > int(stop_array(()).shape[0]):
            raise ValueError(f"stop_tokens: at most {int(stop_array(()).shape[0])} stop ids per "
                             f"request, got {len(cfg.stop_tokens)}")
        req = Request(self._next_id, row, cfg.max_new_tokens, cfg.seed, tuple(cfg.stop_tokens))
        self._next_id += 1
        if req.max_new_tokens == 0:
            self._finished.append(req)
        else:
            self._queue.append(req)
        return req.id

    def _empty_slots(self) -> _Slots:
        b = self.n_slots
        width = int(stop_array(()).shape[0])
        return _Slots(jnp.zeros(b, jnp.int32), self._decoder.init_state(b),
                      jax.random.split(jax.random.key(0), b), jnp.zeros(b, bool),
                      jnp.zeros(b, jnp.int32), jnp.full((b, width), -1, jnp.int32))

    def _refill(self) -> list[tuple[Request, Array, int]]:
        """Prefill queued requests into every free slot in one batched call (its batch is
        the number of free slots rounded up to a power of two: few compiles; filler rows
        repeat a real prompt and are dropped). No host sync: the first tokens are read with
        the next decode call's output.

        Returns ``[(request, first tokens [R], row)]``."""
        free = [i for i, r in enumerate(self._owner) if r is None]
        reqs = [self._queue.popleft() for _ in range(min(len(free), len(self._queue)))]
        if not reqs:
            return []
        rows = 1 << (len(reqs) - 1).bit_length()
        prompts = [r.prompt for r in reqs] + [reqs[0].prompt] * (rows - len(reqs))
        tokens, mask = left_pad(prompts, prompt_bucket(max(map(len, prompts)),
                                                       cache_limit(self.model)), self.pad_id)
        last, state = self._decoder.prefill_logits(tokens, mask)  # [R, V], state
        width = self._slots.stops.shape[1]
        stops = np.full((rows, width), -1, np.int32)
        for i, r in enumerate(reqs):  # submit() capped each request's stop ids at the width
            stops[i, : len(r.stop_tokens)] = r.stop_tokens
        seeds = [r.seed for r in reqs] + [0] * (rows - len(reqs))
        keys = jnp.stack([jax.random.key(x) for x in seeds])
        left = np.array([r.max_new_tokens - 1 for r in reqs] + [0] * (rows - len(reqs)), np.int32)
        where = np.array(free[: len(reqs)] + [self.n_slots] * (rows - len(reqs)), np.int32)
        self._slots, first = self._fns.insert(self._slots, state, last, keys, jnp.asarray(left),
                                              jnp.asarray(stops), jnp.asarray(where))
        self.stats["prefills"] += 1
        for req, slot in zip(reqs, free, strict=False):
            self._owner[slot] = req
        return [(req, first, i) for i, req in enumerate(reqs)]

    def run(self) -> dict[int, list[int]]:
        """Decode until the queue is empty and every slot is free.

        Returns:
            ``{request id: new token ids}`` for the requests finished in this call (stop
            tokens excluded, as :func:`~linearnexus.generate.generate`).
        """
        done: dict[int, list[int]] = {r.id: r.tokens for r in self._finished}
        self._finished.clear()
        if self._slots is None:
            self._slots = self._empty_slots()
        while self._queue or any(r is not None for r in self._owner):
            started = self._refill()
            buf, count, self._slots = self._fns.loop(self._decoder.params, self._slots,
                                                     jnp.int32(self.sync_every),
                                                     jnp.int32(self.pad_id))
            self.stats["decode_calls"] += 1
            block = np.asarray(buf[:, : int(count)])  # the host sync of this call
            active = np.asarray(self._slots.active)
            for req, first, row in started:
                tok = int(first[row])
                if tok not in req.stop_tokens:
                    req.tokens.append(tok)
            for slot, req in enumerate(self._owner):
                if req is None:
                    continue
                new = [t for t in block[slot].tolist() if t >= 0]
                req.tokens.extend(new)
                if not active[slot]:
                    done[req.id] = req.tokens
                    self.stats["tokens"] += len(req.tokens)
                    self._owner[slot] = None
        return done


def serve_bench(model: LMModel, n_requests: int, *, slots: int = 16,
                cfg: SamplingConfig | None = None, max_prompt: int = 64, max_new: int = 256,
                sync_every: int = 32, seed: int = 0,
                state_dtype: str | None = None) -> dict[str, Any]:
    """Throughput under a stream of mixed-length requests: continuous batching vs static
    batches.

    ``n_requests`` random requests (prompt lengths uniform in ``[1, max_prompt]``, token
    budgets uniform in ``[1, max_new]``, no stop tokens, so both methods produce the same
    tokens) are decoded twice: by a :class:`ContinuousBatcher` with ``slots`` slots, and by
    :func:`~linearnexus.generate.generate` over consecutive groups of ``slots`` requests,
    where each group runs until its longest request is done. Each method runs once untimed
    (compiles), then once timed. ``state_dtype``: as :class:`ContinuousBatcher`'s, for both.

    Returns:
        ``{"requests", "tokens", "continuous": {"seconds", "tokens_per_s", "decode_calls"},
        "static": {"seconds", "tokens_per_s"}, "speedup"}``.

    Raises:
        ValueError: ``n_requests < 1``, ``max_prompt < 1``, ``max_new < 1`` or an unknown
            ``state_dtype``.
    """
    import time

    from linearnexus.generate import check_state_dtype, generate

    check_state_dtype(state_dtype)

    for name, value in (("n_requests", n_requests), ("max_prompt", max_prompt),
                        ("max_new", max_new)):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    cfg = _checked_cfg(cfg, model.config.vocab_size).replace(stop_tokens=())
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    reqs = [(rng.integers(0, vocab, int(rng.integers(1, max_prompt + 1))).tolist(),
             int(rng.integers(1, max_new + 1))) for _ in range(n_requests)]
    total = sum(n for _, n in reqs)

    def continuous() -> tuple[float, int]:
        server = ContinuousBatcher(model, slots=slots, cfg=cfg, sync_every=sync_every,
                                   state_dtype=state_dtype)
        t0 = time.perf_counter()
        for i, (prompt, n) in enumerate(reqs):
            server.submit(prompt, max_new_tokens=n, seed=cfg.seed + i)
        server.run()
        return time.perf_counter() - t0, server.stats["decode_calls"]

    def static() -> float:
        t0 = time.perf_counter()
        for i in range(0, n_requests, slots):
            group = reqs[i: i + slots]
            generate(model, [p for p, _ in group],
                     cfg.replace(max_new_tokens=max(n for _, n in group), seed=cfg.seed + i),
                     state_dtype=state_dtype)
        return time.perf_counter() - t0

    continuous()
    cont_s, calls = continuous()
    static()
    static_s = static()
    # static batches decode every row to the group's longest budget; only the requested
    # tokens count as useful
    return {"requests": n_requests, "tokens": total, "slots": slots,
            "continuous": {"seconds": cont_s, "tokens_per_s": total / cont_s,
                           "decode_calls": calls},
            "static": {"seconds": static_s, "tokens_per_s": total / static_s},
            "speedup": static_s / cont_s}

__all__ = ["ContinuousBatcher", "Request", "serve_bench"]
