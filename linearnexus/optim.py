"""Optimizers and learning-rate schedules.

Everything here works on parameter pytrees: the ``nnx.State`` of ``nnx.Param``s
from ``nnx.split(model, nnx.Param, ...)`` / ``nnx.state(model, nnx.Param)``, the
pure-array trees ``nnx.Optimizer`` passes to optax, or plain dicts of arrays.
Which leaves decay and which go to Muon is decided from each leaf's *path* and
*shape*, never from a precomputed mask tree: ``nnx.Optimizer`` calls ``tx.init``
with a State of ``Variable``s but ``tx.update`` with pure arrays (same paths,
different tree structure), so the masks are callables evaluated on whatever
tree the transformation is given.

Public API::

    create_schedule(lr, *, warmup_steps, total_steps, min_lr=None, min_lr_ratio=None,
                    kind="cosine") -> optax.Schedule
    weight_decay_mask(params) -> pytree of bool
    muon_mask(params) -> pytree of bool
    create_optimizer(name, params, *, lr, total_steps, ...) -> optax.GradientTransformation
    sophia(learning_rate, ...) / scale_by_sophia_g(...)      # SophiaG, hand-written
    gnb_hessian_estimate(logits_fn, params, inputs, rng) -> pytree like params
    sophia_should_update_hessian(step, k) -> bool

AdamW, Muon, gradient clipping and the schedules are optax's own
(``optax.adamw``, ``optax.contrib.muon``, ``optax.clip_by_global_norm``,
``optax.*_schedule``); only the SophiaG scaling is written by hand (see the
Sophia section for why).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.contrib

__all__ = [
    "HEAD_PARAM_NAMES",
    "NO_DECAY_PARAM_NAMES",
    "NO_DECAY_PATH_SUBSTRINGS",
    "OPTIMIZERS",
    "SCHEDULES",
    "SOPHIA_HESSIAN_INTERVAL",
    "SophiaState",
    "create_optimizer",
    "create_schedule",
    "gnb_hessian_estimate",
    "muon_mask",
    "scale_by_sophia_g",
    "sophia",
    "sophia_should_update_hessian",
    "weight_decay_mask",
]

PyTree = Any

OPTIMIZERS: tuple[str, ...] = ("adamw", "muon", "sophia")
SCHEDULES: tuple[str, ...] = ("cosine", "constant", "linear")

# ---------------------------------------------------------------------------
# Parameter-path rules
# ---------------------------------------------------------------------------
# A leaf's path is the tuple of its key names, e.g. ("blocks", "0", "mixer", "A_log")
# (the trailing "value" attribute of an nnx.Variable is dropped). The rules below are
# read at call time, so a module that introduces a new kind of parameter can extend
# them, e.g. ``optim.NO_DECAY_PARAM_NAMES += ("log_decay",)``; prefer adding the name
# here, next to the others, so the whole policy stays in one place.

#: Case-insensitive substrings: a leaf whose path has a component containing one of
#: these never decays and never goes to Muon. Token / position embeddings ("embed"
#: also covers "embedding", "embeddings", "unembed"; "wte"/"wpe" are GPT-2 names) and
#: anything under a norm module (a per-head [H, K] norm weight is still a gain).
NO_DECAY_PATH_SUBSTRINGS: tuple[str, ...] = ("embed", "wte", "wpe", "norm")

#: Exact, case-sensitive path-component names that never decay and never go to Muon:
#: biases, norm gains, and SSM parameters that are not weights in the usual sense
#: (Mamba's A_log [C, N] is 2-D but is a log decay rate; D and dt_bias are per
#: channel). Exact matching, because "D" as a substring would match everything.
NO_DECAY_PARAM_NAMES: tuple[str, ...] = (
    "bias", "scale", "conv_bias", "A_log", "D", "dt_bias",
)

#: Exact path-component names of the output projection to the vocabulary. It decays
#: like any matrix but goes to AdamW under Muon (Muon is for hidden matrices; the
#: Muon authors use Adam for the embedding and the head). Exact matching, because a
#: substring "head" would also catch "heads" / "multihead" modules.
HEAD_PARAM_NAMES: tuple[str, ...] = ("lm_head", "head")


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    names = tuple(_key_name(k) for k in path)
    # nnx.Variable flattens to its array under GetAttrKey("value"); it is not a name.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return names


def _ndim(leaf: Any) -> int:
    return len(getattr(leaf, "shape", ()))


def _excluded_by_name(names: tuple[str, ...]) -> bool:
    if any(n in NO_DECAY_PARAM_NAMES for n in names):
        return True
    lowered = [n.lower() for n in names]
    return any(s in n for n in lowered for s in NO_DECAY_PATH_SUBSTRINGS)


def _decays(path: tuple[Any, ...], leaf: Any) -> bool:
    return _ndim(leaf) >= 2 and not _excluded_by_name(_path_names(path))


#: Exact path names of 2-D parameters Muon should not orthogonalise: a depthwise conv
#: kernel ``[W, C]`` is not a linear map, and Mamba's ``dt_proj`` ``[R, C]`` (R = D/16) is so
#: thin that Muon's orthogonalised, sqrt(fan_out / fan_in)-scaled step is far larger than
#: AdamW's. They go to AdamW under Muon.
NO_MUON_PARAM_NAMES: tuple[str, ...] = ("conv_weight", "dt_proj")


def _is_muon(path: tuple[Any, ...], leaf: Any) -> bool:
    names = _path_names(path)
    return (_ndim(leaf) == 2 and not _excluded_by_name(names)
            and not any(n in HEAD_PARAM_NAMES or n in NO_MUON_PARAM_NAMES for n in names))


def weight_decay_mask(params: PyTree) -> PyTree:
    """Which leaves get decoupled weight decay.

    Args:
      params: a parameter pytree (``nnx.State``, pure-array state, nested dict); only
        the paths and leaf shapes are read, so ``jax.ShapeDtypeStruct`` leaves work.

    Returns:
      A pytree of Python bools with the structure of ``params``: True for weight
      matrices (>= 2-D) whose path matches none of ``NO_DECAY_PATH_SUBSTRINGS``
      (embeddings, norms) or ``NO_DECAY_PARAM_NAMES`` (biases, gains, SSM ``A_log``,
      ``D``, ``dt_bias``); False for everything else, including all 0-D / 1-D leaves.
    """
    return jax.tree_util.tree_map_with_path(_decays, params)


def muon_mask(params: PyTree) -> PyTree:
    """Which leaves Muon updates: 2-D hidden weight matrices only.

    True where ``weight_decay_mask`` is True, the leaf is exactly 2-D, and no path
    component is in ``HEAD_PARAM_NAMES``. Embeddings, the LM head, norms, biases,
    SSM parameters and 1-D / 3-D+ leaves are False (``create_optimizer("muon", ...)``
    sends them to AdamW). Same argument and return conventions as ``weight_decay_mask``.
    """
    return jax.tree_util.tree_map_with_path(_is_muon, params)


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> None:
    try:
        ok = math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_steps(warmup_steps: int, total_steps: int) -> None:
    if not _is_int(total_steps) or total_steps <= 0:
        raise ValueError(f"total_steps must be an int > 0, got {total_steps!r}")
    if not _is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")


def create_schedule(
    lr: float,
    *,
    warmup_steps: int = 0,
    total_steps: int,
    min_lr: float | None = None,
    min_lr_ratio: float | None = None,
    kind: str = "cosine",
) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then decay to ``min_lr`` at ``total_steps``.

    As nanoGPT: ``lr * step / warmup_steps`` for ``step < warmup_steps``; then, over
    the remaining ``total_steps - warmup_steps`` steps, ``kind`` = ``"cosine"``:
    ``min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * progress))``; ``"linear"``: a straight
    line to ``min_lr``; ``"constant"``: ``lr`` (``min_lr`` unused). The value stays at
    its end point after ``total_steps``. Note the value at step 0 is 0 when
    ``warmup_steps > 0`` (optax's warmup; the first step only fills the moments).

    Args:
      lr: peak learning rate, > 0.
      warmup_steps: steps of linear warmup, ``0 <= warmup_steps <= total_steps``.
      total_steps: step at which the decay reaches ``min_lr`` (warmup included, like
        nanoGPT's ``lr_decay_iters``), > 0.
      min_lr: final learning rate, ``0 <= min_lr <= lr``. Give this or ``min_lr_ratio``.
      min_lr_ratio: final learning rate as a fraction of ``lr`` in [0, 1]; the default
        when neither is given is 0.1 (nanoGPT: 1e-3 -> 1e-4).
      kind: one of ``SCHEDULES``.

    Returns:
      An ``optax.Schedule``: step (int or int array) -> learning rate (float32 array).

    Raises:
      ValueError: naming the bad argument (non-positive ``lr`` or ``total_steps``,
        ``warmup_steps`` outside [0, total_steps], both ``min_lr`` and ``min_lr_ratio``
        given or out of range, unknown ``kind``).
    """
    _check_positive("lr", lr)
    _check_steps(warmup_steps, total_steps)
    if kind not in SCHEDULES:
        raise ValueError(f"kind must be one of {SCHEDULES}, got {kind!r}")
    if min_lr is not None and min_lr_ratio is not None:
        raise ValueError("give min_lr or min_lr_ratio, not both")
    if min_lr is None:
        ratio = 0.1 if min_lr_ratio is None else min_lr_ratio
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {ratio!r}")
        min_lr = lr * ratio
    elif not 0.0 <= min_lr <= lr:
        raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr!r}")

    decay_steps = total_steps - warmup_steps
    if kind == "constant":
        decay = optax.constant_schedule(lr)
    elif decay_steps == 0:
        # optax.cosine_decay_schedule rejects decay_steps=0; nanoGPT holds min_lr.
        decay = optax.constant_schedule(min_lr)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr / lr)
    else:
        decay = optax.linear_schedule(lr, min_lr, decay_steps)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


# ---------------------------------------------------------------------------
# Sophia
# ---------------------------------------------------------------------------
# SophiaG (Liu, Li, Hall, Liang, Ma 2023, "Sophia: A Scalable Stochastic Second-order
# Optimizer for Language Model Pre-training", Algorithm 3 with the Gauss-Newton-Bartlett
# estimator). Per element, with lr_t from the schedule:
#
#   m_t = b1 * m_{t-1} + (1 - b1) * g_t                         every step
#   h_t = b2 * h_{t-k} + (1 - b2) * h_hat_t                     only when an estimate is given
#   theta <- theta - lr_t * wd * theta                          decoupled, decay-mask leaves only
#   theta <- theta - lr_t * clip(m_t / max(gamma * h_t, eps), -1, 1)
#
# No bias correction on m or h (as the paper and the authors' code). Every |update| is
# at most lr_t (plus the decay term), whatever the curvature estimate says.
#
# Why by hand: optax.contrib.sophia (present in optax 0.2.8) defaults to Sophia-H
# (Hutchinson). Its Hessian function is pluggable, but it owns the "every k steps" gate
# (a lax.cond on its own counter) and calls that function inside the cond on *every*
# trace, so a step without an estimate would still have to feed it one, and the EMA
# cannot simply be kept; it also uses the previous h and bias-corrects m, unlike the
# paper's Algorithm 3. Here the trainer owns
# the gate: ``update(..., hessian=h)`` refreshes the EMA, ``update(...)`` keeps it, and
# whether an estimate is present is a static (trace-time) fact. The moments use optax's
# tree helpers, and decay / lr scaling are optax's own transformations.
#
# Usage from a trainer: see ``sophia``'s docstring. Without any estimate h stays 0,
# max(gamma * h, eps) = eps, and SophiaG degrades to sign-of-momentum descent with step lr.

#: Default number of steps between Hessian estimates (the paper's k).
SOPHIA_HESSIAN_INTERVAL = 10


class SophiaState(NamedTuple):
    """State of ``scale_by_sophia_g``."""

    count: jax.Array  # [] int32, optimizer steps taken
    hessian_count: jax.Array  # [] int32, Hessian estimates folded into ``h``
    mu: optax.Updates  # EMA of gradients, like params
    h: optax.Updates  # EMA of the diagonal Hessian estimate, like params (>= 0)


def scale_by_sophia_g(
    b1: float = 0.965,
    b2: float = 0.99,
    gamma: float = 0.05,
    eps: float = 1e-12,
    clip_threshold: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """The SophiaG preconditioned, clipped direction (no lr, no weight decay).

    ``update(updates, state, params=None, *, hessian=None)``: when ``hessian`` (a
    pytree like ``updates`` of non-negative diagonal-Hessian estimates, e.g. from
    ``gnb_hessian_estimate``) is given, ``h <- b2 * h + (1 - b2) * hessian`` first;
    otherwise ``h`` is kept. Returns ``clip(m / max(gamma * h, eps), -c, c)`` per
    element with ``m <- b1 * m + (1 - b1) * updates``.

    Args:
      b1: gradient EMA rate (paper: 0.965).
      b2: Hessian EMA rate per *estimate* (paper: 0.99; with k = 10 it spans ~1000 steps).
      gamma: the paper's gamma / the authors' ``rho``: how many update steps' worth of
        clipping the curvature allows. 0.05 as the authors' GPT-2 small SophiaG config;
        their README suggests [0.01, 0.1]. Must pair with ``h`` on the scale of
        ``gnb_hessian_estimate`` (tokens-in-batch times the squared gradient).
      eps: floor of the denominator (where ``h`` is ~0 the update is just clipped).
      clip_threshold: c, the per-element bound of the returned direction.

    Raises:
      ValueError: naming an argument outside its range.
    """
    for name, value in (("b1", b1), ("b2", b2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    _check_positive("gamma", gamma)
    _check_positive("eps", eps)
    _check_positive("clip_threshold", clip_threshold)

    def init_fn(params: optax.Params) -> SophiaState:
        return SophiaState(
            count=jnp.zeros([], jnp.int32),
            hessian_count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            h=optax.tree.zeros_like(params),
        )

    def update_fn(
        updates: optax.Updates,
        state: SophiaState,
        params: optax.Params | None = None,
        *,
        hessian: optax.Updates | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SophiaState]:
        del params, extra_args
        h, hessian_count = state.h, state.hessian_count
        if hessian is not None:  # static: two traces, with and without an estimate
            h = optax.tree.update_moment(hessian, h, b2, 1)
            hessian_count = hessian_count + 1
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        direction = jax.tree.map(
            lambda m, hh: jnp.clip(
                m / jnp.maximum(gamma * hh, eps), -clip_threshold, clip_threshold
            ).astype(m.dtype),
            mu, h,
        )
        new_state = SophiaState(
            count=optax.safe_increment(state.count),
            hessian_count=hessian_count,
            mu=mu,
            h=h,
        )
        return direction, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sophia(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.965,
    b2: float = 0.99,
    gamma: float = 0.05,
    eps: float = 1e-12,
    weight_decay: float = 0.1,
    weight_decay_mask: PyTree | Callable[[PyTree], PyTree] | None = weight_decay_mask,
    clip_threshold: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """SophiaG: ``scale_by_sophia_g``, then masked decoupled weight decay, then ``-lr``.

    ``update(grads, state, params, hessian=None)``; ``params`` is required (decay).
    The per-element step is at most ``lr * (clip_threshold + weight_decay * |theta|)``.
    Defaults follow the paper / the authors' code (b1 0.965, b2 0.99, gamma 0.05 from
    their GPT-2 small config; weight decay 0.1 as their optimizer's default).
    ``weight_decay_mask`` defaults to this module's path rule; ``None`` decays every leaf.

    A trainer passes a fresh ``gnb_hessian_estimate`` every k steps
    (``sophia_should_update_hessian(step, k)``, k = ``SOPHIA_HESSIAN_INTERVAL`` = 10) and
    nothing otherwise. Keep two jitted step functions, so the estimator's extra
    forward/backward pass only runs (and is only compiled into) every k-th step::

        tx = create_optimizer("sophia", nnx.state(model, nnx.Param), lr=..., total_steps=...)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, x, y):
            loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
            optimizer.update(model, grads)  # h kept
            return loss

        @nnx.jit
        def train_step_with_hessian(model, optimizer, x, y, rng):
            loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            logits_fn = lambda p, inp: nnx.merge(graphdef, p, rest)(inp)  # -> [B, T, V]
            h = gnb_hessian_estimate(logits_fn, params, x, rng)
            optimizer.update(model, grads, hessian=h)  # h EMA refreshed, then used
            return loss

        for step in range(total_steps):
            x, y = next(batches)
            if sophia_should_update_hessian(step, SOPHIA_HESSIAN_INTERVAL):
                rng, sub = jax.random.split(rng)
                loss = train_step_with_hessian(model, optimizer, x, y, sub)
            else:
                loss = train_step(model, optimizer, x, y)

    With plain optax: ``updates, state = tx.update(grads, state, params, hessian=h)``.
    ``nnx.Optimizer.update`` forwards keyword arguments to ``tx.update`` (as pure
    arrays), so a Variable-State estimate from ``nnx.split`` params is fine.
    """
    return optax.chain(
        scale_by_sophia_g(b1=b1, b2=b2, gamma=gamma, eps=eps, clip_threshold=clip_threshold),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def gnb_hessian_estimate(
    logits_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    inputs: Any,
    rng: jax.Array,
    *,
    loss_mask: jax.Array | None = None,
) -> PyTree:
    """Gauss-Newton-Bartlett estimate of the diagonal Hessian of the mean token loss.

    Samples labels from the model's own predictive distribution,
    ``y_hat ~ Categorical(softmax(logits))`` (``jax.random.categorical``), takes the
    gradient ``g`` of the *mean* cross-entropy of the logits against ``y_hat``, and
    returns ``N * g**2`` where N is the number of tokens averaged over (``B * T``, or
    ``loss_mask.sum()``).

    Why ``N * g**2`` (the authors' ``bs * hess``, with bs counted in tokens): with
    per-token losses l_i and g = (1/N) sum_i grad l_i(y_hat_i), the per-token gradients
    have zero mean under the model's own labels (Bartlett's identity) and are
    independent, so E[g**2] = (1/N**2) sum_i E[(grad l_i)**2] = (1/N) diag(G), where G is
    the Gauss-Newton matrix of the mean loss. ``N * g**2`` is thus an unbiased estimate
    of diag(G), on the scale of the training loss's Hessian and independent of the
    batch size, which is what ``gamma`` is tuned against. Every element is >= 0.

    Args:
      logits_fn: ``logits_fn(params, inputs) -> logits`` of shape ``[..., V]``
        (``[B, T, V]`` for a language model); differentiable in ``params``.
      params: the pytree to differentiate with respect to (the same structure the
        optimizer sees, e.g. the ``nnx.Param`` state from ``nnx.split``).
      inputs: passed through to ``logits_fn``.
      rng: PRNG key for the label sampling.
      loss_mask: optional ``[...]`` (logits' leading shape) weights, 1 for tokens that
        count, 0 for padding; N is then its sum (clamped to >= 1).

    Returns:
      A pytree like ``params``: ``N * g**2`` per leaf, in the gradient dtype.
      Under data parallelism compute ``g`` over the global batch (average gradients
      across devices before squaring) and use the global token count.
    """

    def sampled_loss(p: PyTree) -> tuple[jax.Array, jax.Array]:
        logits = logits_fn(p, inputs).astype(jnp.float32)  # [..., V]
        labels = jax.random.categorical(rng, jax.lax.stop_gradient(logits))  # [...]
        token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        if loss_mask is None:
            n = jnp.asarray(token_loss.size, jnp.float32)
            return jnp.mean(token_loss), n
        weights = loss_mask.astype(jnp.float32)
        n = jnp.maximum(jnp.sum(weights), 1.0)
        return jnp.sum(token_loss * weights) / n, n

    grads, n = jax.grad(sampled_loss, has_aux=True)(params)
    return jax.tree.map(lambda g: (n * jnp.square(g.astype(jnp.float32))).astype(g.dtype), grads)


def sophia_should_update_hessian(
    step: int | jax.Array, k: int = SOPHIA_HESSIAN_INTERVAL
) -> bool | jax.Array:
    """True on the steps that pass a Hessian estimate: ``step % k == 0`` (0, k, 2k, ...).

    The paper refreshes h at 1-indexed t with t mod k == 1, i.e. 0-indexed steps
    0, k, 2k, ..., so the very first update already has a curvature estimate.
    Returns a Python bool for an int ``step``, a bool array for an array ``step``.

    Raises:
      ValueError: if ``k`` is not an int >= 1.
    """
    if not _is_int(k) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if _is_int(step):
        return bool(step % k == 0)
    return jnp.asarray(step) % k == 0


# ---------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------

# Per-optimizer moment rates used when b1 / b2 are None.
_DEFAULT_BETAS: dict[str, tuple[float, float]] = {
    "adamw": (0.9, 0.95),  # nanoGPT
    "muon": (0.9, 0.95),  # the AdamW part; Muon's own momentum is muon_momentum
    "sophia": (0.965, 0.99),  # Sophia paper
}


def create_optimizer(
    name: str,
    params: PyTree,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.1,
    b1: float | None = None,
    b2: float | None = None,
    eps: float = 1e-8,
    min_lr_ratio: float = 0.1,
    schedule: str = "cosine",
    grad_clip: float = 1.0,
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    muon_weight_decay: float | None = None,
    sophia_gamma: float = 0.05,
) -> optax.GradientTransformation:
    """Build ``adamw``, ``muon`` or ``sophia`` with a warmup/decay schedule and clipping.

    The chain is: ``optax.clip_by_global_norm(grad_clip)`` (when ``grad_clip > 0``),
    then the optimizer. All learning rates follow ``create_schedule(peak, warmup_steps=,
    total_steps=, min_lr_ratio=, kind=schedule)``. Weight decay is decoupled, scaled by
    the scheduled lr (as PyTorch/optax), and applied only where ``weight_decay_mask``
    is True.

    - ``adamw``: ``optax.adamw`` (b1, b2 default 0.9, 0.95 as nanoGPT).
    - ``muon``: ``optax.contrib.muon`` (Nesterov momentum ``muon_momentum``, Newton-Schulz
      orthogonalisation, ``sqrt(max(1, fan_out / fan_in))`` scaling; flax kernels are
      ``[in, out]``, optax's default) on the ``muon_mask`` leaves at peak ``muon_lr``
      (default 0.02, Keller Jordan's), and ``optax.adamw`` at ``lr`` on the rest
      (embeddings, head, norms, biases, SSM / non-2-D parameters), via
      ``optax.partition``. ``muon_weight_decay`` defaults to
      ``weight_decay * lr / muon_lr`` so both parts shrink weights by the same factor
      per step (optax multiplies decay by the lr, and muon_lr is ~20x lr).
    - ``sophia``: ``sophia`` above (SophiaG; b1, b2 default 0.965, 0.99; ``sophia_gamma``
      0.05). Pass ``hessian=gnb_hessian_estimate(...)`` to ``update`` every
      ``SOPHIA_HESSIAN_INTERVAL`` steps (recipe in ``sophia``'s docstring); gradient clipping
      applies to the gradients only, not to the estimate.

    Args:
      name: one of ``OPTIMIZERS`` (case-insensitive).
      params: the parameter pytree the optimizer will see. Only checked here (it must
        have array leaves): the masks are recomputed from each tree the transformation
        receives, so one ``tx`` serves both ``nnx.Optimizer``'s Variable-State ``init``
        and its pure-array ``update``.
      lr: peak learning rate (of the AdamW part for muon), > 0.
      total_steps, warmup_steps, min_lr_ratio, schedule: see ``create_schedule``.
      weight_decay: decoupled decay coefficient, >= 0.
      b1, b2: moment decay rates; None picks the optimizer's default (above).
      eps: AdamW's denominator epsilon (adamw, and muon's AdamW part). Sophia keeps
        its own floor (1e-12, ``scale_by_sophia_g``), which only guards against h == 0.
      grad_clip: global-norm clipping threshold; 0 disables it.
      muon_lr: Muon's peak learning rate, > 0.
      muon_momentum: Muon's momentum, in [0, 1).
      muon_weight_decay: decay coefficient of the Muon part (see above), >= 0.
      sophia_gamma: SophiaG's gamma (the authors' rho), > 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a ``GradientTransformation``).

    Raises:
      ValueError: for an unknown ``name`` (listing the choices) or a bad number
        (naming the argument).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if not any(hasattr(leaf, "shape") for leaf in jax.tree.leaves(params)):
        raise ValueError("params must be a pytree with array leaves")
    _check_positive("lr", lr)
    _check_steps(warmup_steps, total_steps)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {grad_clip!r}")
    _check_positive("eps", eps)
    default_b1, default_b2 = _DEFAULT_BETAS[key]
    b1 = default_b1 if b1 is None else b1
    b2 = default_b2 if b2 is None else b2
    for arg, value in (("b1", b1), ("b2", b2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{arg} must be in [0, 1), got {value!r}")

    def sched(peak: float) -> optax.Schedule:
        return create_schedule(peak, warmup_steps=warmup_steps, total_steps=total_steps,
                               min_lr_ratio=min_lr_ratio, kind=schedule)

    lr_schedule = sched(lr)

    def adamw() -> optax.GradientTransformation:
        return optax.adamw(lr_schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=weight_decay_mask)

    if key == "adamw":
        tx = adamw()
    elif key == "muon":
        _check_positive("muon_lr", muon_lr)
        if not 0.0 <= muon_momentum < 1.0:
            raise ValueError(f"muon_momentum must be in [0, 1), got {muon_momentum!r}")
        if muon_weight_decay is None:
            muon_weight_decay = weight_decay * lr / muon_lr
        elif muon_weight_decay < 0:
            raise ValueError(f"muon_weight_decay must be >= 0, got {muon_weight_decay!r}")

        def labels(tree: PyTree) -> PyTree:
            return jax.tree.map(lambda m: "muon" if m else "adamw", muon_mask(tree))

        # Every leaf reaching the muon branch is 2-D, so optax.contrib.muon's own
        # Adam fallback (for non-2-D leaves, with no decay mask) is never used;
        # ours, with the decay mask, handles the rest.
        tx = optax.partition(
            {
                "muon": optax.contrib.muon(sched(muon_lr), beta=muon_momentum,
                                           weight_decay=muon_weight_decay),
                "adamw": adamw(),
            },
            labels,
        )
    else:
        tx = sophia(lr_schedule, b1=b1, b2=b2, gamma=sophia_gamma, weight_decay=weight_decay)

    if grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    return optax.with_extra_args_support(tx)
