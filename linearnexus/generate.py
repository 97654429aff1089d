"""Sampling from an :class:`~linearnexus.models.LMModel`: batched, cached, compiled once.

How a batch of prompts is decoded::

    prompts (lists of ids, any lengths)
      -> left-pad to a bucket length P (extra pads are masked out)   [B, P] ids + [B, P] mask
      -> prefill: ONE model call in chunk mode over the whole batch  -> state, logits[:, -1]
      -> sample the first token of every row
      -> decode loop: lax.while_loop of step(tokens [B, 1], state, key) in recurrent mode,
         sampling, stop check, finished mask, [B, LOOP_CHUNK] token buffer: all on the
         device, one host sync per LOOP_CHUNK tokens (``loop="host"``: one jitted step per
         token from Python, the reference; same tokens for the same seed)

Left padding puts the last real token of every row in the last column, so the prefill's
``logits[:, -1]`` is the next-token distribution of every row. The blocks compact valid
tokens out of the padding (KV caches hold only real tokens, SSM states never see pads).

Compilation: the prefill compiles once per (model structure, batch size, bucket length), the
decode loop and step once per batch size for one model structure and one (temperature,
top_k, top_p) setting; other sampling fields (seed, max_new_tokens, stop_tokens) never
recompile. Weights: see :func:`inference_params` (``weights="compute"`` stores Linear and
embedding weights in their compute dtype once, e.g. bf16). Continuous batching:
:mod:`linearnexus.serving`. Guide: ``docs/generation.md``. Prompt buckets
(:func:`prompt_bucket`) are 16, 32, 64, 128, 256, 512, then multiples of 512, capped at the
model's ``max_seq_len`` for models with attention caches. :func:`trace_counts` reports how
many times each function was traced (= compiled) in this process.

Stop tokens: a row stops at the first stop token it samples; the stop token is NOT part of
the returned ids (so ``len(out) < max_new_tokens`` means the row stopped). Finished rows
are fed ``pad_id`` until every row is done or ``max_new_tokens`` is reached.

Dimension letters as in :mod:`linearnexus.core.types`, plus ``V`` = vocabulary size here.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linearnexus.core.cache import RECURRENT_DTYPES, cast_recurrent, recurrent_dtype_name
from linearnexus.core.compile_cache import CompileCache
from linearnexus.core.config import ConfigBase, ConfigError, field
from linearnexus.core.types import Array
from linearnexus.models import LMModel, ModelState
from linearnexus.modules.common import (
    Embedding,
    decode_weights,
    fused_decode_enabled,
    using_decode_weights,
)

PAD_ID = 0  # token fed to padding slots and finished rows; masked out or cut, so any id works

_TRACES: collections.Counter[str] = collections.Counter()

#: ``LINEARNEXUS_DECODE_GRAPH=while`` compiles the on-device decode loop on a GPU with XLA's
#: command buffers (CUDA graphs) for the while loop and its condition too, so a whole chunk
#: of steps launches as one graph instead of kernel by kernel (docs/generation.md, "Speed")
DECODE_GRAPH_ENV = "LINEARNEXUS_DECODE_GRAPH"
_GRAPH_COMMANDS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"


#: ``LINEARNEXUS_DECODE_BLOCK=U`` runs the on-device decode loop's steps in counted blocks
#: of ``U`` (an inner ``fori_loop``) inside the ``while_loop`` that checks the budget and
#: the stop rule: on a GPU each ``while`` iteration reads its condition back on the host
#: (~17 us on an H100, docs/benchmarks.md), a counted loop does not. Read when the loop is
#: traced. Default: :data:`GPU_DECODE_BLOCK` on a GPU, 1 elsewhere.
DECODE_BLOCK_ENV = "LINEARNEXUS_DECODE_BLOCK"
#: the default block on a GPU: on an H100 (JAX 0.11.2, 2026-12-07) blocks of 8 took the
#: batch-1 step from 0.473 to 0.452 ms (GDN) and 0.289 to 0.262 ms (Mamba2); on the CPU
#: they changed nothing beyond noise, so the CPU keeps one step an iteration
GPU_DECODE_BLOCK = 8


def decode_block() -> int:
    """Steps per counted block of the on-device loop (``LINEARNEXUS_DECODE_BLOCK``).

    Raises:
        ValueError: a value that is not an integer in ``[1, LOOP_CHUNK]``.
    """
    raw = os.environ.get(DECODE_BLOCK_ENV, "")
    if raw == "":
        return GPU_DECODE_BLOCK if jax.default_backend() == "gpu" else 1
    try:
        block = int(raw)
    except ValueError:
        block = 0
    if not 1 <= block <= LOOP_CHUNK:
        raise ValueError(f"{DECODE_BLOCK_ENV}: expected an integer in [1, {LOOP_CHUNK}], "
                         f"got {raw!r}")
    return block


def counted_while(keep_going: Callable[[Any], Array], body: Callable[[Any], Any], carry: Any,
                  n: Array, block: int) -> Any:
    """``while carry[0] < n and keep_going(carry): carry = body(carry)`` (``carry[0]`` the
    step index, which ``body`` advances by one), run as counted blocks of ``block`` steps
    while whole blocks fit in ``n`` (``keep_going`` checked between blocks only), then step
    by step (:func:`decode_block`: the on-device decode loops of this module and of
    ``serving``)."""
    if block > 1:
        carry = jax.lax.while_loop(
            lambda c: (c[0] + block <= n) & keep_going(c),
            lambda c: jax.lax.fori_loop(0, block, lambda _, c: body(c), c), carry)
    return jax.lax.while_loop(lambda c: (c[0] < n) & keep_going(c), body, carry)


def _loop_compiler_options() -> dict[str, str] | None:
    """XLA options of the decode loop's compile (read when the loop is built)."""
    choice = os.environ.get(DECODE_GRAPH_ENV, "")
    if choice not in ("", "while", "default"):
        raise ValueError(f"{DECODE_GRAPH_ENV}: expected 'while' or 'default', got {choice!r}")
    if choice != "while" or jax.default_backend() != "gpu":
        return None
    return {"xla_gpu_enable_command_buffer": _GRAPH_COMMANDS}


def trace_counts() -> dict[str, int]:
    """How many times the prefill and decode-step functions were traced in this process.

    ``jax.jit`` traces once per new input signature and compiles what it traces, so this
    counts compilations: ``{"prefill", "decode", "loop", "serve_insert", "serve_loop"}``
    (the per-step host path compiles ``decode``, the on-device loop ``loop``, continuous
    batching (:mod:`linearnexus.serving`) the last two).
    """
    return {name: _TRACES[name] for name in ("prefill", "decode", "loop", "serve_insert",
                                             "serve_loop")}


# ---- sampling config and pure sampling functions -----------------------------------------


@dataclasses.dataclass
class SamplingConfig(ConfigBase):
    """How to pick tokens.

    Attributes:
        temperature: divides the logits; 0 = greedy (argmax; top_k / top_p are then unused).
        top_k: keep only the k most likely tokens; None or 0 = off.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose
            probability mass is >= top_p (the top token always stays); None or 1.0 = off.
        max_new_tokens: tokens to generate per row (fewer when a stop token is sampled).
        stop_tokens: ids that end a row; the stop token itself is not returned.
        seed: PRNG seed of the sampling noise (generation is deterministic given the seed).
    """

    temperature: float = field(1.0, ge=0, doc="0 = greedy")
    top_k: int | None = field(None, ge=0, doc="None / 0 = off")
    top_p: float | None = field(None, gt=0, le=1, doc="None / 1.0 = off")
    max_new_tokens: int = field(100, ge=0, doc="tokens generated per row")
    stop_tokens: tuple[int, ...] = field((), doc="ids that end a row (excluded from the output)")
    seed: int = field(0, doc="PRNG seed")

    def validate(self) -> None:
        for i, tok in enumerate(self.stop_tokens):
            if tok < 0:
                raise ConfigError(f"stop_tokens[{i}]: expected a token id >= 0, got {tok}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampler_key(self) -> tuple[float, int | None, float | None]:
        """The fields that change the compiled step: ``(temperature, top_k, top_p)`` with
        "off" values normalised to None (greedy ignores top_k / top_p)."""
        if self.greedy:
            return (0.0, None, None)
        top_k = self.top_k if self.top_k else None
        top_p = self.top_p if self.top_p is not None and self.top_p < 1.0 else None
        return (float(self.temperature), top_k, top_p)


def apply_top_k(logits: Array, k: int | None) -> Array:
    """Keep the ``k`` largest logits of the last axis, set the rest to ``-inf``.

    Exactly ``k`` entries survive even when values tie (ties go to the lower index).

    Args:
        logits: ``[..., V]`` float.
        k: a Python int; None, 0 or ``k >= V`` returns ``logits`` unchanged.

    Returns:
        ``[..., V]`` same dtype.

    Raises:
        ValueError: ``k < 0``.
    """
    if k is not None and k < 0:
        raise ValueError(f"k: expected None or an int >= 0, got {k}")
    vocab = logits.shape[-1]
    if not k or k >= vocab:
        return logits
    flat = logits.reshape(-1, vocab)  # [..., V] -> [N, V]
    _, idx = jax.lax.top_k(flat, k)  # [N, k]
    rows = jnp.arange(flat.shape[0])[:, None]  # [N, 1]
    keep = jnp.zeros(flat.shape, bool).at[rows, idx].set(True)
    return jnp.where(keep, flat, -jnp.inf).reshape(logits.shape)


def apply_top_p(logits: Array, p: float | None) -> Array:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass
    (of ``softmax(logits)``) is ``>= p``; the rest become ``-inf``.

    Token ``i`` (in descending order) is kept iff the mass of the tokens before it is
    ``< p``, so the top token is always kept.

    Args:
        logits: ``[..., V]`` float (``-inf`` entries allowed, at least one finite per row).
        p: a Python float in ``(0, 1]``; None or ``p >= 1`` returns ``logits`` unchanged.

    Returns:
        ``[..., V]`` same dtype.

    Raises:
        ValueError: ``p <= 0``.
    """
    if p is None or p >= 1.0:
        return logits
    if p <= 0:
        raise ValueError(f"p: expected a value in (0, 1], got {p}")
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # [..., V] -> [N, V]
    order = jnp.argsort(-flat, axis=-1)  # descending, stable
    sorted_logits = jnp.take_along_axis(flat, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [N, V]
    keep_sorted = mass_before < p
    rows = jnp.arange(flat.shape[0])[:, None]
    keep = jnp.zeros(flat.shape, bool).at[rows, order].set(keep_sorted)  # back to vocab order
    return jnp.where(keep, flat, -jnp.inf).reshape(logits.shape)


def sample_next(logits: Array, key: Array, cfg: SamplingConfig) -> Array:
    """Pick one token per row.

    Greedy (argmax) when ``cfg.temperature == 0``; otherwise ``logits / temperature``, then
    top-k, then top-p, then a categorical draw (independent noise per row).

    Args:
        logits: ``[B, V]`` float.
        key: a PRNG key (unused when greedy).
        cfg: the sampling config (only temperature, top_k, top_p are read).

    Returns:
        ``[B]`` int32 token ids.
    """
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / cfg.temperature
    scaled = apply_top_p(apply_top_k(scaled, cfg.top_k), cfg.top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


# ---- prompt layout -----------------------------------------------------------------------


def prompt_bucket(length: int, limit: int | None = None) -> int:
    """The padded prompt length for a longest prompt of ``length`` tokens.

    16 for ``length <= 16``, the next power of two up to 512, then the next multiple of 512;
    capped at ``limit`` (a cache size) when given. Few buckets = few prefill compilations.

    Raises:
        ValueError: ``length < 1`` or ``length > limit``.
    """
    if length < 1:
        raise ValueError(f"length: expected >= 1, got {length}")
    if limit is not None and length > limit:
        raise ValueError(f"length: {length} exceeds the limit {limit}")
    if length <= 16:
        bucket = 16
    elif length <= 512:
        bucket = 1 << (length - 1).bit_length()
    else:
        bucket = -(-length // 512) * 512
    return bucket if limit is None else min(bucket, limit)


def left_pad(prompts: Sequence[Sequence[int]], length: int,
             pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
    """Right-align prompts in a ``[B, length]`` grid.

    Returns:
        ``(tokens [B, length] int32, mask [B, length] bool)``, True at real tokens.

    Raises:
        ValueError: a prompt longer than ``length``.
    """
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, row in enumerate(prompts):
        if len(row) > length:
            raise ValueError(f"prompts[{i}]: length {len(row)} exceeds the padded length {length}")
        if len(row):
            tokens[i, length - len(row):] = row
            mask[i, length - len(row):] = True
    return tokens, mask


def _as_prompts(prompts: Any, vocab_size: int) -> list[list[int]]:
    """Normalise ``prompts`` to non-empty lists of in-vocabulary ids (errors name them)."""
    if hasattr(prompts, "ndim"):
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"prompts: expected a [B, T] array or a list of id lists, "
                             f"got an array of shape {arr.shape}")
        rows = [row.tolist() for row in arr]
    else:
        if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)):
            raise TypeError(f"prompts: expected a list of id lists, got {type(prompts).__name__}")
        rows = []
        for i, row in enumerate(prompts):
            if isinstance(row, (int, np.integer)):
                raise TypeError("prompts: expected a list of prompts (lists of ids), got a flat "
                                "list of ids; for one prompt pass [prompt]")
            rows.append(np.asarray(row).reshape(-1).tolist() if hasattr(row, "ndim") else list(row))
            if not rows[-1]:
                raise ValueError(f"prompts[{i}]: empty prompt; give at least one token "
                                 "(e.g. a start / end-of-text token)")
    if not rows:
        raise ValueError("prompts: expected at least one prompt, got none")
    for i, row in enumerate(rows):
        for tok in row:
            if not isinstance(tok, (int, np.integer)) or not 0 <= tok < vocab_size:
                raise ValueError(f"prompts[{i}]: token {tok!r} is not an id in [0, {vocab_size})")
    return [[int(t) for t in row] for row in rows]


def cache_limit(model: LMModel) -> int | None:
    """The most tokens any layer's cache holds (min ``max_seq_len`` over layers that have
    one, i.e. attention / MLA caches), or None when every layer is recurrent."""
    limits = [getattr(getattr(layer.mixer, "config", None), "max_seq_len", None)
              for layer in model.layers]
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def check_capacity(model: LMModel, prompt_len: int, max_new_tokens: int) -> None:
    """Raise ``ValueError`` when ``prompt_len + max_new_tokens`` exceeds the cache size."""
    limit = cache_limit(model)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
            f"{prompt_len + max_new_tokens} exceeds the model's max_seq_len={limit} (the KV-cache "
            f"size); shorten the prompt, lower max_new_tokens or build the model with a larger "
            f"max_seq_len")


# ---- compiled prefill, decode step and on-device decode loop -----------------------------

LOOP_CHUNK = 256  # most decode steps one device call runs (its token buffer's width)
_STOP_SLOTS = 8  # stop ids are padded with -1 to a multiple of this (few shapes, few compiles)


class _Compiled(NamedTuple):
    sample_first: Callable[..., tuple[Array, Array]]
    step: Callable[..., tuple[Array, ModelState, Array]]
    loop: Callable[..., tuple[Array, Array, Array, ModelState, Array, Array]]


# (model structure, sampler setting) -> compiled functions; models of one structure share
# them. The prefill (the costliest compile) does not depend on the sampler: cached apart.
_COMPILED: CompileCache[_Compiled] = CompileCache(max_entries=16)
_PREFILL: CompileCache[Callable[..., tuple[Array, ModelState]]] = CompileCache(max_entries=16)


def _build_prefill(graphdef: Any, state_dtype: str | None = None
                   ) -> Callable[..., tuple[Array, ModelState]]:
    def prefill(params: Any, tokens: Array, mask: Array) -> tuple[Array, ModelState]:
        _TRACES["prefill"] += 1  # runs at trace time only
        model = nnx.merge(graphdef, params)
        logits, state = model(tokens, state=None, mask=mask, mode="chunk")  # [B, P, V]
        if state_dtype is not None:  # in the program: no float32 copy beside the 16-bit one
            state = cast_recurrent(state, state_dtype)
        # left padding: column -1 is every row's last real token
        return logits[:, -1], state

    return jax.jit(prefill)


def _sampler(cfg: SamplingConfig) -> SamplingConfig:
    return SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)


def decode_step(graphdef: Any, sampler: SamplingConfig, params: Any, tokens: Array,
                state: ModelState, key: Array) -> tuple[Array, ModelState, Array]:
    """One recurrent-mode model call on ``tokens [B, 1]`` and one sampled token per row.

    Pure (traceable): the body of :attr:`Decoder.step_fn` and of the on-device loop.

    ``params`` is the model's ``nnx.State`` or a :class:`DecodeParams` (the state and the
    fused projections' concatenated weights, computed once).

    Returns:
        ``(next [B] int32, new_state, key)``; ``key`` is split once, the sample drawn with
        the second half.
    """
    fused = None
    if isinstance(params, DecodeParams):
        params, fused = params
    model = nnx.merge(graphdef, params)
    with using_decode_weights(model, fused):
        logits, new_state = model(tokens, state=state, mode="recurrent")  # [B, 1, V]
    key, sub = jax.random.split(key)
    return sample_next(logits[:, -1], sub, sampler), new_state, key


class DecodeParams(NamedTuple):
    """What the decode step and loop read: the model's ``nnx.State`` and its decode weight
    table (``modules.common.decode_weights``: the concatenated weights of its one-token
    fused projections, and with the batch-1 Pallas matmuls every projection stored
    transposed; ``{}`` with ``LINEARNEXUS_FUSED_DECODE=0``), so no step builds them again."""

    state: Any
    fused: dict[str, tuple[Array, Array | None]]


# model -> (the params its fused weights were computed from, DecodeParams)
_DECODE_PARAMS: weakref.WeakKeyDictionary[LMModel, tuple[Any, DecodeParams]] = (
    weakref.WeakKeyDictionary())


def decode_params(model: LMModel, params: Any) -> DecodeParams:
    """``DecodeParams(params, decode weight table)``: the table computed once for these
    ``params`` (cached with them: the same ``params`` object gives the same result). It is
    a second copy of the fused projections' weights (q, k, v, gates and output gate of
    the DeltaNet-family blocks, gate and up of the MLPs), of every projection's in the
    ``pallas`` and ``table`` modes of ``LINEARNEXUS_DECODE_GEMV`` on a GPU, while the model
    lives."""
    cached = _DECODE_PARAMS.get(model)
    if cached is not None and cached[0] is params:
        return cached[1]
    graphdef, _ = nnx.split(model)
    fused = decode_weights(nnx.merge(graphdef, params)) if fused_decode_enabled() else {}
    out = DecodeParams(params, fused)
    _DECODE_PARAMS[model] = (params, out)
    return out


def _build(graphdef: Any, cfg: SamplingConfig, block: int = 1) -> _Compiled:
    """jit the decode step and the decode loop for one model structure and sampler setting;
    the loop runs its steps in counted blocks of ``block`` (:func:`decode_block`)."""
    sampler = _sampler(cfg)

    def sample_first(logits: Array, key: Array) -> tuple[Array, Array]:
        key, sub = jax.random.split(key)
        return sample_next(logits, sub, sampler), key

    def step(params: Any, tokens: Array, state: ModelState, key: Array):
        _TRACES["decode"] += 1  # runs at trace time only
        return decode_step(graphdef, sampler, params, tokens, state, key)

    def loop(params: Any, nxt: Array, state: ModelState, key: Array, done: Array, stops: Array,
             n: Array, first: Array, pad_id: Array):
        """Up to ``n`` tokens per row in one program (see :meth:`Decoder.run`)."""
        _TRACES["loop"] += 1  # runs at trace time only
        batch = nxt.shape[0]
        # first call: `nxt` is the prefill's token, recorded in column 0; later calls: `nxt`
        # was recorded by the previous call and the loop starts with a step
        done = jnp.where(first, done | jnp.isin(nxt, stops), done)
        buf = jnp.full((batch, LOOP_CHUNK), -1, jnp.int32)
        buf = buf.at[:, 0].set(jnp.where(first & ~done, nxt, -1))

        never = jnp.int32(LOOP_CHUNK + 1)  # "not every row has finished yet"

        def body(carry):
            i, nxt, state, key, done, buf, end = carry
            feed = jnp.where(done, pad_id, nxt)[:, None]  # [B, 1]; finished rows get pads
            nxt, state, key = decode_step(graphdef, sampler, params, feed, state, key)
            done = done | jnp.isin(nxt, stops)
            col = jnp.where(done, -1, nxt)[:, None]  # [B, 1]
            # the count a one-step loop would stop at: the step after which every row is done
            end = jnp.where((end == never) & jnp.all(done), i + 1, end)
            buf = jax.lax.dynamic_update_slice(buf, col, (0, i))
            return i + 1, nxt, state, key, done, buf, end

        # the stop rule is checked between blocks, so a block that finishes every row runs
        # its remaining steps on pads (their columns are -1 and past the returned count)
        i, nxt, state, key, done, buf, end = counted_while(
            lambda c: ~jnp.all(c[4]), body,
            (first.astype(jnp.int32), nxt, state, key, done, buf, never), n, block)
        return buf, jnp.minimum(i, end), nxt, state, key, done

    # donating the state lets XLA update KV caches in place instead of copying them per token
    return _Compiled(jax.jit(sample_first), jax.jit(step, donate_argnums=(2,)),
                     jax.jit(loop, donate_argnums=(2,), compiler_options=_loop_compiler_options()))


def stop_array(stop_tokens: Sequence[int]) -> Array:
    """``[S]`` int32 stop ids padded with -1 (never sampled) to a multiple of 8, so the
    number of stop tokens rarely changes a compiled shape."""
    size = max(_STOP_SLOTS, -(-len(stop_tokens) // _STOP_SLOTS) * _STOP_SLOTS)
    out = np.full(size, -1, np.int32)
    out[: len(stop_tokens)] = stop_tokens
    return jnp.asarray(out)


# ---- inference weights -------------------------------------------------------------------

WEIGHTS = ("compute", "stored")

# modules that cast their parameters to their own ``dtype`` on every call: storing those
# parameters in that dtype once gives the same result without the per-step conversion
_CASTING_MODULES: tuple[type, ...] = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv,
                                      Embedding)
# (model -> (stored leaves, weakly), cast params) so repeated calls reuse one cast copy
_CAST: weakref.WeakKeyDictionary[LMModel, tuple[list[Any], Any]] = weakref.WeakKeyDictionary()


def inference_params(model: LMModel, weights: str = "compute") -> Any:
    """The model's ``nnx.State`` for decoding.

    Args:
        model: the language model.
        weights: ``"compute"``: the weights of modules that compute in another dtype than
            they store (``nnx.Linear``, ``nnx.Einsum``, ``nnx.Conv``, the embedding: a bf16
            model trained with float32 master weights) are cast to that compute dtype once
            here, so a decode step reads half the bytes and does not convert them per step;
            the outputs are bit-identical, as those modules cast the same way on every call.
            Scalars and vectors the blocks use in float32 (norm scales, decay rates) keep
            their stored dtype. ``"stored"``: the parameters as stored.

    Returns:
        ``nnx.State`` of ``model`` (the cast copy is cached until a parameter changes).

    Raises:
        ValueError: unknown ``weights``.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {WEIGHTS}, got {weights!r}")
    _, params = nnx.split(model)
    if weights == "stored":
        return params
    targets: dict[tuple, Any] = {}
    for path, node in nnx.iter_graph(model):
        dtype = getattr(node, "dtype", None)
        if isinstance(node, _CASTING_MODULES) and dtype is not None:
            targets[tuple(path)] = jnp.dtype(dtype)
    flat = nnx.to_flat_state(params)
    leaves = [v.get_value() for _, v in flat]
    cached = _CAST.get(model)
    if cached is not None and len(cached[0]) == len(leaves) and all(
            ref() is leaf for ref, leaf in zip(cached[0], leaves, strict=True)):
        return cached[1]
    to_cast = {path: targets[path[:-1]] for path, v in flat
            if path[:-1] in targets and isinstance(v, nnx.Param)
            and jnp.issubdtype(v.get_value().dtype, jnp.floating)
            and v.get_value().dtype != targets[path[:-1]]}
    if not to_cast:
        return params
    cast = {path: v.replace(v.get_value().astype(to_cast[path])) if path in to_cast else v
            for path, v in flat}
    out = nnx.from_flat_state(cast)
    _CAST[model] = ([weakref.ref(leaf) for leaf in leaves], out)
    return out


class Decoder:
    """The compiled prefill, decode step and decode loop of one model under one sampling
    setting.

    The parameters are read from ``model`` when the Decoder is made; make a new one after
    changing them (the compiled functions are cached per model structure and reused).

    Example::

        dec = Decoder(model, cfg)
        nxt, state, key = dec.prefill(tokens, mask, jax.random.key(0))   # [B], state, key
        nxt, state, key = dec.step(nxt[:, None], state, key)            # one more token

    ``state_dtype`` (None, ``"float32"``, ``"bfloat16"``, ``"float16"``) keeps every
    recurrent state (linear attention, SSM scans) in that dtype between steps: a 16-bit
    state halves the bytes a step reads and writes for it, which at large batches is most
    of a step; each step still updates it in float32 and rounds the new state once, so it
    drifts from the float32 state (see ``docs/generation.md``). KV caches are unchanged.
    """

    def __init__(self, model: LMModel, cfg: SamplingConfig | None = None, *,
                 weights: str = "compute", state_dtype: str | None = None) -> None:
        if not isinstance(model, LMModel):
            raise TypeError(f"model: expected an LMModel, got {type(model).__name__}")
        state_dtype = check_state_dtype(state_dtype)
        cfg = SamplingConfig() if cfg is None else cfg
        self.model = model
        self.cfg = cfg
        #: the recurrent states' dtype between steps (a name; None: as the blocks make them,
        #: float32, float64 for a float64 model)
        self.state_dtype = state_dtype
        graphdef, _ = nnx.split(model)
        self.params = inference_params(model, weights)
        #: what the step and the loop take: the params and the fused projections' weights
        self.inputs = decode_params(model, self.params)
        # the loop's block size is part of the key: a new LINEARNEXUS_DECODE_BLOCK compiles anew
        block = decode_block()
        self._compiled = _COMPILED.get(graphdef, (cfg.sampler_key(), block),
                                       lambda: _build(graphdef, cfg, block))
        self._prefill = _PREFILL.get(graphdef, state_dtype,
                                     lambda: _build_prefill(graphdef, state_dtype))

    @property
    def step_fn(self) -> Callable[..., tuple[Array, ModelState, Array]]:
        """The jitted ``(params, tokens [B, 1], state, key) -> (next [B], state, key)``
        (``params``: :attr:`inputs`, or the model's ``nnx.State``); ``state`` is donated
        (invalid after the call)."""
        return self._compiled.step

    def prefill(self, tokens: Array | np.ndarray, mask: Array | np.ndarray,
                key: Array) -> tuple[Array, ModelState, Array]:
        """Run left-padded prompts and sample the first new token.

        Args:
            tokens: ``[B, P]`` int32 ids, prompts right-aligned. mask: ``[B, P]`` bool.
            key: PRNG key.

        Returns:
            ``(next [B] int32, state, key)``; the state holds only the real tokens.
        """
        last, state = self.prefill_logits(tokens, mask)
        nxt, key = self._compiled.sample_first(last, key)
        return nxt, state, key

    def prefill_logits(self, tokens: Array | np.ndarray,
                       mask: Array | np.ndarray) -> tuple[Array, ModelState]:
        """:meth:`prefill` without the sampling: ``(next-token logits [B, V], state)``,
        the state's recurrent parts in :attr:`state_dtype` (cast in the compiled program;
        compiled once per model structure, state dtype and shape, whatever the sampler)."""
        return self._prefill(self.params, jnp.asarray(tokens, jnp.int32),
                             jnp.asarray(mask, bool))

    def init_state(self, batch_size: int) -> ModelState:
        """The model's empty state for ``batch_size`` rows, its recurrent states in
        :attr:`state_dtype`."""
        return self._cast(self.model.init_state(batch_size))

    def _cast(self, state: ModelState) -> ModelState:
        return state if self.state_dtype is None else cast_recurrent(state, self.state_dtype)

    def step(self, tokens: Array | np.ndarray, state: ModelState,
             key: Array) -> tuple[Array, ModelState, Array]:
        """Feed ``tokens [B, 1]`` int32 and sample the next token of every row.

        Returns ``(next [B] int32, new_state, key)``; ``state`` is donated (do not reuse it).
        Its recurrent states are cast to :attr:`state_dtype` first (a no-op for states from
        :meth:`prefill` or :meth:`init_state`).
        """
        return self._compiled.step(self.inputs, jnp.asarray(tokens, jnp.int32),
                                   self._cast(state), key)

    def run(self, nxt: Array, state: ModelState, key: Array, done: Array, stops: Array, n: int,
            *, first: bool, pad_id: int = PAD_ID
            ) -> tuple[Array, Array, Array, ModelState, Array, Array]:
        """Decode up to ``n`` tokens per row in one compiled program (``lax.while_loop``).

        Same tokens, PRNG stream and stop rule as calling :meth:`step` ``n`` times from the
        host: a row is done at its first stop token; done rows are fed ``pad_id``; the loop
        ends early once every row is done.

        Args:
            nxt: ``[B]`` int32, the last sampled token (from :meth:`prefill` or the last run).
            state, key: as returned with ``nxt``; ``state`` is donated.
            done: ``[B]`` bool, rows already finished (all False on the first run).
            stops: ``[S]`` int32 stop ids padded with -1 (:func:`stop_array`).
            n: tokens to produce this call, ``1 <= n <= LOOP_CHUNK`` (traced: no recompile).
            first: ``nxt`` comes from the prefill and is recorded as this run's first token.
            pad_id: the id fed to finished rows.

        Returns:
            ``(buf [B, LOOP_CHUNK] int32, count [] int32, nxt, state, key, done)``: the first
            ``count`` columns of ``buf`` hold this run's tokens, -1 where a row had finished
            (its stop token included). With ``LINEARNEXUS_DECODE_BLOCK`` above 1
            (:func:`decode_block`), ``nxt``, ``state`` and ``key`` returned after every row
            has finished may be up to ``block - 1`` pad steps further along.

        Raises:
            ValueError: ``n`` outside ``[1, LOOP_CHUNK]``.
        """
        if not 1 <= n <= LOOP_CHUNK:
            raise ValueError(f"n: expected 1 <= n <= {LOOP_CHUNK}, got {n}")
        return self._compiled.loop(self.inputs, nxt, self._cast(state), key, done, stops,
                                   jnp.int32(n),
                                   jnp.asarray(first), jnp.int32(pad_id))


# ---- generation loops --------------------------------------------------------------------


def _checked_cfg(cfg: SamplingConfig | None, vocab_size: int) -> SamplingConfig:
    if cfg is None:
        return SamplingConfig()
    if not isinstance(cfg, SamplingConfig):
        raise TypeError(f"cfg: expected SamplingConfig, got {type(cfg).__name__}")
    cfg = cfg.replace()  # re-validate: fields may have been assigned after construction
    for i, tok in enumerate(cfg.stop_tokens):
        if tok >= vocab_size:
            raise ConfigError(f"stop_tokens[{i}]: id {tok} is outside the vocabulary [0, {vocab_size})")
    return cfg


def check_state_dtype(state_dtype: Any) -> str | None:
    """``state_dtype`` as a dtype name (None stays None): a name or dtype of
    ``RECURRENT_DTYPES`` (``"bfloat16"``, ``jnp.bfloat16``, ``np.dtype("float16")``...).

    Raises:
        ValueError: anything else, naming ``state_dtype``.
    """
    if state_dtype is None:
        return None
    name = recurrent_dtype_name(state_dtype)
    if name is None:
        raise ValueError(f"state_dtype: expected None or one of {RECURRENT_DTYPES}, "
                         f"got {state_dtype!r}")
    return name


def _host_steps(model: LMModel, rows: list[list[int]], cfg: SamplingConfig, pad_id: int,
                weights: str, state_dtype: str | None = None) -> Iterator[np.ndarray]:
    """The per-step host loop (the reference the device loop is tested against): yield each
    step's new tokens ``[B, 1]`` int32, -1 for rows that have finished (a row's stop token is
    reported as -1 too). Ends when all rows finished or after ``max_new_tokens`` steps."""
    dec = Decoder(model, cfg, weights=weights, state_dtype=state_dtype)
    tokens, mask = left_pad(rows, prompt_bucket(max(map(len, rows)), cache_limit(model)), pad_id)
    nxt, state, key = dec.prefill(tokens, mask, jax.random.key(cfg.seed))
    stops = np.asarray(cfg.stop_tokens, np.int32)
    done = np.zeros(len(rows), bool)
    for i in range(cfg.max_new_tokens):
        host = np.asarray(nxt)
        done |= np.isin(host, stops)
        yield np.where(done, -1, host).astype(np.int32)[:, None]
        if done.all() or i == cfg.max_new_tokens - 1:
            return
        feed = np.where(done, pad_id, host).astype(np.int32)[:, None]  # [B, 1]
        nxt, state, key = dec.step(feed, state, key)


def _device_steps(model: LMModel, rows: list[list[int]], cfg: SamplingConfig, pad_id: int,
                  weights: str, sync_every: int | None = None,
                  state_dtype: str | None = None) -> Iterator[np.ndarray]:
    """The on-device loop: yield ``[B, n]`` int32 blocks of new tokens (-1 where a row had
    finished), one host sync per block of at most ``sync_every`` (default
    :data:`LOOP_CHUNK`) tokens."""
    sync_every = LOOP_CHUNK if sync_every is None else sync_every
    dec = Decoder(model, cfg, weights=weights, state_dtype=state_dtype)
    tokens, mask = left_pad(rows, prompt_bucket(max(map(len, rows)), cache_limit(model)), pad_id)
    nxt, state, key = dec.prefill(tokens, mask, jax.random.key(cfg.seed))
    stops = stop_array(cfg.stop_tokens)
    done = jnp.zeros(len(rows), bool)
    produced = 0
    while produced < cfg.max_new_tokens:
        n = min(sync_every, cfg.max_new_tokens - produced)
        buf, count, nxt, state, key, done = dec.run(nxt, state, key, done, stops, n,
                                                    first=produced == 0, pad_id=pad_id)
        block = np.asarray(buf[:, : int(count)])  # the host sync of this block
        yield block
        produced += block.shape[1]
        if block.shape[1] < n or (block[:, -1] < 0).all():  # every row finished
            return


LOOPS = ("device", "host")


def generate(model: LMModel, prompts: Sequence[Sequence[int]] | Array | np.ndarray,
             cfg: SamplingConfig | None = None, *, pad_id: int = PAD_ID, loop: str = "device",
             weights: str = "compute", state_dtype: str | None = None) -> list[list[int]]:
    """Continue a batch of prompts of any lengths.

    Args:
        model: the language model.
        prompts: a list of non-empty id lists, or a ``[B, T]`` int array (B prompts of T).
        cfg: sampling settings (None = ``SamplingConfig()``).
        pad_id: id fed at padding and for finished rows (masked out / cut from the output).
        loop: ``"device"`` (default): the whole generation runs in one compiled
            ``lax.while_loop`` per :data:`LOOP_CHUNK` tokens; ``"host"``: one jitted step
            per token driven from Python (the reference; same tokens for the same seed).
        weights: ``"compute"`` (default) or ``"stored"``, see :func:`inference_params`.
        state_dtype: the recurrent states' dtype between steps (None: as the blocks make
            them, float32; or ``"bfloat16"`` / ``"float16"``: half the state's bytes a
            step, see :class:`Decoder`).

    Returns:
        per prompt, the new ids only (at most ``max_new_tokens``; shorter when the row
        sampled a stop token, which is excluded).

    Raises:
        ValueError: empty or out-of-vocabulary prompts; ``longest prompt + max_new_tokens``
            over ``max_seq_len`` for models with attention caches; unknown ``loop``,
            ``weights`` or ``state_dtype`` (all checked before any work).
        ConfigError (a ValueError): bad sampling settings (names the field).
        TypeError: wrong argument types.
    """
    if loop not in LOOPS:
        raise ValueError(f"loop: expected one of {LOOPS}, got {loop!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {WEIGHTS}, got {weights!r}")
    check_state_dtype(state_dtype)
    cfg = _checked_cfg(cfg, model.config.vocab_size)
    rows = _as_prompts(prompts, model.config.vocab_size)
    check_capacity(model, max(map(len, rows)), cfg.max_new_tokens)
    out: list[list[int]] = [[] for _ in rows]
    if cfg.max_new_tokens == 0:
        return out
    steps = (_device_steps if loop == "device" else _host_steps)(
        model, rows, cfg, pad_id, weights, state_dtype=state_dtype)
    for block in steps:
        for r, toks in enumerate(block.tolist()):
            out[r].extend(t for t in toks if t >= 0)
    return out


def stream(model: LMModel, prompt: Sequence[int], cfg: SamplingConfig | None = None,
           *, pad_id: int = PAD_ID, sync_every: int = 1, weights: str = "compute",
           state_dtype: str | None = None) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are produced.

    Same compiled functions, seed handling and stop rule as :func:`generate` with a batch of
    one, so ``list(stream(m, p, cfg)) == generate(m, [p], cfg)[0]``.

    Args:
        sync_every: tokens per host sync. 1 (default): the per-step host loop, each token
            as soon as it exists; ``k > 1``: the on-device loop hands over blocks of ``k``
            tokens (``k <= LOOP_CHUNK``), paying one host round trip per block.
        weights, state_dtype: as :func:`generate`.

    Raises:
        as :func:`generate`, at the call (before the first token), not at the first ``next``;
        ValueError: ``sync_every`` outside ``[1, LOOP_CHUNK]``.
    """
    if not isinstance(sync_every, int) or not 1 <= sync_every <= LOOP_CHUNK:
        raise ValueError(f"sync_every: expected an int in [1, {LOOP_CHUNK}], got {sync_every!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {WEIGHTS}, got {weights!r}")
    check_state_dtype(state_dtype)
    cfg = _checked_cfg(cfg, model.config.vocab_size)
    rows = _as_prompts([prompt], model.config.vocab_size)
    check_capacity(model, len(rows[0]), cfg.max_new_tokens)

    def tokens() -> Iterator[int]:
        if cfg.max_new_tokens == 0:
            return
        steps = (_host_steps(model, rows, cfg, pad_id, weights, state_dtype) if sync_every == 1
                 else _device_steps(model, rows, cfg, pad_id, weights, sync_every, state_dtype))
        for block in steps:
            for tok in block[0].tolist():
                if tok < 0:
                    return
                yield tok

    return tokens()


def start_tokens(tokenizer: Any) -> list[int]:
    """What to condition on for an empty prompt: the end-of-text token when the tokenizer
    has one (GPT-2 style), else ``encode("\\n")`` (character level, as nanoGPT).

    Raises:
        ValueError: the tokenizer has neither.
    """
    if getattr(tokenizer, "eos_id", None) is not None:
        return [int(tokenizer.eos_id)]
    try:
        ids = list(tokenizer.encode("\n"))
    except ValueError:
        ids = []
    if not ids:
        raise ValueError("prompt: empty, and the tokenizer has no eos_id and cannot encode '\\n' "
                         "to start from; give a non-empty prompt")
    return ids


def generate_text(model: LMModel, tokenizer: Any, prompt: str, cfg: SamplingConfig | None = None,
                  num_samples: int = 1) -> list[str]:
    """Sample ``num_samples`` continuations of ``prompt`` (one batched :func:`generate`).

    An empty prompt conditions on :func:`start_tokens` instead. Stop tokens come from
    ``cfg`` only (pass ``stop_tokens=(tokenizer.eos_id,)`` to stop at end of text).

    Returns:
        ``num_samples`` strings: ``prompt`` followed by the decoded new tokens (the start
        token of an empty prompt is not included).

    Raises:
        ValueError: ``num_samples < 1``, plus everything :func:`generate` raises.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    ids = list(tokenizer.encode(prompt)) if prompt else start_tokens(tokenizer)
    outs = generate(model, [ids] * num_samples, cfg)
    return [prompt + tokenizer.decode(o) for o in outs]


__all__ = [
    "LOOP_CHUNK", "PAD_ID", "DecodeParams", "Decoder", "SamplingConfig", "apply_top_k",
    "apply_top_p", "cache_limit", "check_capacity", "check_state_dtype", "counted_while", "decode_block",
    "decode_params", "decode_step", "generate", "generate_text", "inference_params", "left_pad",
    "prompt_bucket", "sample_next", "start_tokens", "stop_array", "stream", "trace_counts",
]
