"""Block-agnostic checks used by the registry-driven suite (and by any block's own tests).

Every helper takes a block following the protocol in ``linearnexus/modules/base.py`` and
compares with the relative error ``||a - b|| / ||b||`` (integer leaves must match exactly).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def rel_err(a: Any, b: Any) -> float:
    """``||a - b|| / ||b||`` in float64 numpy (``||a - b||`` when ``b`` is all zeros)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs {b.shape}")
    denom = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    return float(diff / denom) if denom > 0 else float(diff)


def assert_close(a: Any, b: Any, tol: float, what: str) -> None:
    """Fail with a message naming ``what`` when ``rel_err(a, b) > tol`` or ``a`` is not finite."""
    a_np = np.asarray(a, np.float64)
    assert np.all(np.isfinite(a_np)), f"{what}: non-finite values"
    err = rel_err(a_np, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_trees_close(a: Any, b: Any, tol: float, what: str) -> None:
    """Leaf-by-leaf :func:`assert_close`; integer leaves must be equal."""
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert len(leaves_a) == len(leaves_b), f"{what}: trees differ: {tree_a} vs {tree_b}"
    for (path, la), (_, lb) in zip(leaves_a, leaves_b, strict=True):
        name = f"{what}{jax.tree_util.keystr(path)}"
        if jnp.issubdtype(jnp.asarray(la).dtype, jnp.integer):
            np.testing.assert_array_equal(np.asarray(la), np.asarray(lb), err_msg=name)
        else:
            assert_close(la, lb, tol, name)


# (graphdef, mode, jitted call): blocks built alike (same class and config) share compiled
# code across helpers and tests; compiling dominates these tests' run time.
_COMPILED: list[tuple[Any, str | None, Callable[..., Any]]] = []


def _compiled_call(graphdef: Any, mode: str | None) -> Callable[..., Any]:
    for known, known_mode, run in _COMPILED:
        if known_mode == mode and known == graphdef:  # GraphDef equality: same structure
            return run

    @jax.jit
    def run(params, x, state, mask):
        return nnx.merge(graphdef, params)(x, state=state, mask=mask, mode=mode)

    _COMPILED.append((graphdef, mode, run))
    return run


def jit_block(block: nnx.Module, mode: str | None) -> Callable[..., tuple[jax.Array, Any]]:
    """``f(x, state, mask) -> (y, new_state)``, jit-compiled over the block's current params."""
    graphdef, params = nnx.split(block)
    run = _compiled_call(graphdef, mode)
    return lambda x, state=None, mask=None: run(params, x, state, mask)


def run_token_by_token(block: nnx.Module, x: jax.Array, state: Any = None) -> tuple[jax.Array, Any]:
    """Recurrent mode, one token per call, the state threaded through every step."""
    step = jit_block(block, "recurrent")
    if state is None:
        state = block.init_state(x.shape[0])
    outputs = []
    for t in range(x.shape[1]):
        y_t, state = step(x[:, t : t + 1], state)
        outputs.append(y_t)
    return jnp.concatenate(outputs, axis=1), state


def assert_chunk_recurrent_parity(block: nnx.Module, x: jax.Array, *, state: Any = None,
                                  tol: float = 1e-5) -> None:
    """Chunk mode over all of ``x`` equals token-by-token recurrent mode (outputs and state)."""
    y_chunk, s_chunk = jit_block(block, "chunk")(x, state)
    y_rec, s_rec = run_token_by_token(block, x, state)
    assert_close(y_chunk, y_rec, tol, "chunk vs recurrent output")
    assert_trees_close(s_chunk, s_rec, tol, "chunk vs recurrent state")


def assert_prefix_continuation(block: nnx.Module, x: jax.Array, split: int, *,
                               mode: str | None = None, tol: float = 1e-5) -> None:
    """Running ``x[:, :split]`` then ``x[:, split:]`` with the carried state equals running ``x``."""
    run = jit_block(block, mode)
    y_full, s_full = run(x)
    y1, s1 = run(x[:, :split])
    y2, s2 = run(x[:, split:], s1)
    assert_close(jnp.concatenate([y1, y2], axis=1), y_full, tol, "prefix+continuation output")
    assert_trees_close(s2, s_full, tol, "prefix+continuation state")


def padding_mask(lengths: list[int], seq: int, side: str | list[str]) -> np.ndarray:
    """``[B, T]`` bool: row ``b`` keeps ``lengths[b]`` valid tokens at its end
    (``side="left"``: left padding), its start (``"right"``), or in a fixed scattered
    pattern (``"scattered"``: every other position first, then the rest). A list gives
    each row its own side."""
    assert all(1 <= n <= seq for n in lengths)
    if not isinstance(side, str):
        assert len(side) == len(lengths)
        return np.concatenate([padding_mask([n], seq, s) for n, s in zip(lengths, side, strict=True)])
    pos = np.arange(seq)[None, :]
    n = np.asarray(lengths)[:, None]
    if side == "left":
        return pos >= seq - n
    if side == "right":
        return pos < n
    assert side == "scattered", side
    order = np.concatenate([np.arange(0, seq, 2), np.arange(1, seq, 2)])
    rank = np.argsort(order)  # position -> its turn in the order
    return rank[None, :] < n


def row_of(tree: Any, b: int) -> Any:
    """Row ``b`` of every leaf of a batched state (``None`` stays ``None``)."""
    return None if tree is None else jax.tree.map(lambda a: a[b : b + 1], tree)


def assert_mask_behavior(block: nnx.Module, x: jax.Array, lengths: list[int], *,
                         side: str | list[str] = "right", mode: str | None = None, state: Any = None,
                         tol: float = 1e-5) -> None:
    """Padded positions change neither the valid outputs nor the final state.

    Row ``b`` of ``x`` keeps ``lengths[b]`` valid tokens laid out by :func:`padding_mask`
    (``side``); each row's valid outputs and state must equal those of running that row's
    valid tokens alone from the same starting ``state`` (None = empty; a batched state, e.g.
    from a prefix run, is split by row), and outputs at pads must be zero.
    """
    batch, seq, _ = x.shape
    assert len(lengths) == batch
    mask = padding_mask(lengths, seq, side)
    run = jit_block(block, mode)
    y, new_state = run(x, state, jnp.asarray(mask))
    for b in range(batch):
        keep = np.flatnonzero(mask[b])
        y_alone, s_alone = run(x[b : b + 1, keep], row_of(state, b))
        assert_close(y[b : b + 1, keep], y_alone, tol, f"{side}-padded row {b} output")
        assert_trees_close(row_of(new_state, b), s_alone, tol, f"{side}-padded row {b} state")
        pads = np.asarray(y[b])[~mask[b]]
        assert np.all(pads == 0), f"{side}-padded row {b}: outputs at pads are not zero"


def assert_pads_are_inert(block: nnx.Module, x: jax.Array, mask: np.ndarray, *,
                          mode: str | None = None, state: Any = None) -> None:
    """Whatever sits at padded positions, even NaN or inf, cannot reach a valid output.

    Runs ``x`` and a copy whose pads hold NaN, +inf and -inf (cycling over rows) under the
    same ``mask`` and starting ``state``: valid outputs and the returned state must be
    finite and exactly equal, and outputs at pads zero.
    """
    mask = np.asarray(mask, bool)
    poison = np.array([np.nan, np.inf, -np.inf])[np.arange(x.shape[0]) % 3]  # one per row
    bad = jnp.where(jnp.asarray(mask)[..., None], x, jnp.asarray(poison, x.dtype)[:, None, None])
    run = jit_block(block, mode)
    y_clean, s_clean = run(x, state, jnp.asarray(mask))
    y_bad, s_bad = run(bad, state, jnp.asarray(mask))
    y_bad = np.asarray(y_bad)
    assert np.all(np.isfinite(y_bad[mask])), "non-finite pads reached valid outputs"
    assert np.all(y_bad[~mask] == 0), "outputs at pads are not zero"
    np.testing.assert_array_equal(y_bad, np.asarray(y_clean), err_msg="outputs changed by pads")
    flat_bad, _ = jax.tree_util.tree_flatten_with_path(s_bad)
    for (path, leaf_bad), leaf_clean in zip(flat_bad, jax.tree.leaves(s_clean), strict=True):
        name = f"state{jax.tree_util.keystr(path)}"
        leaf_bad = np.asarray(leaf_bad)
        assert np.all(np.isfinite(leaf_bad.astype(np.float64))), f"{name}: non-finite"
        np.testing.assert_array_equal(leaf_bad, np.asarray(leaf_clean),
                                      err_msg=f"{name} changed by pads")


@contextlib.contextmanager
def x64() -> Iterator[None]:
    """Enable float64 inside the block only (JAX 0.10 and 0.11)."""
    enable = getattr(jax, "enable_x64", None)
    if enable is None:  # pragma: no cover - older JAX
        from jax.experimental import enable_x64 as enable  # type: ignore[no-redef]
        with enable():
            yield
        return
    with enable(True):
        yield


def assert_grads_match_finite_differences(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    *,
    key: jax.Array,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    directions: int = 2,
) -> None:
    """Autodiff matches central finite differences for every leaf of ``params`` (float64).

    For each leaf and each of ``directions`` random unit directions ``v`` (zero on the other
    leaves): ``(L(p + eps v) - L(p - eps v)) / (2 eps)`` must equal ``<dL/dp, v>`` within
    ``rtol`` relative to ``max(|<dL/dp, v>|, ||dL/dp_leaf||)``. Call inside :func:`x64`.
    """
    # one compiled function for both: at these sizes compiling costs more than running
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    _, grads = value_and_grad(params)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    grad_leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]

    def loss_jit(p: Any) -> float:
        return float(value_and_grad(p)[0])

    # directions drawn and applied in numpy: eager jax ops would compile per leaf shape
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    base = [np.asarray(leaf) for _, leaf in leaves]
    for i, ((path, leaf), g) in enumerate(zip(leaves, grad_leaves, strict=True)):
        assert leaf.dtype == jnp.float64, f"{jax.tree_util.keystr(path)} is {leaf.dtype}, not float64"
        for d in range(directions):
            v = rng.standard_normal(leaf.shape)
            v = v / np.linalg.norm(v)

            def shifted(sign, i=i, v=v):
                return treedef.unflatten([lf + sign * eps * v if j == i else lf
                                          for j, lf in enumerate(base)])

            fd = (loss_jit(shifted(1.0)) - loss_jit(shifted(-1.0))) / (2 * eps)
            ad = float(np.vdot(g, v))
            scale = max(abs(ad), float(np.linalg.norm(g)), 1e-12)
            err = abs(float(fd) - float(ad)) / scale
            assert err <= rtol, (
                f"gradient of {jax.tree_util.keystr(path)} (direction {d}): autodiff {float(ad):.9e} "
                f"vs finite difference {float(fd):.9e}, relative error {err:.2e} > {rtol:.0e}")
