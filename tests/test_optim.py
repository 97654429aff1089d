"""Optimizers, schedules and parameter masks (linearnexus.optim)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from linearnexus import optim
from linearnexus.optim import (
    create_optimizer,
    create_schedule,
    gnb_hessian_estimate,
    muon_mask,
    sophia,
    sophia_should_update_hessian,
    weight_decay_mask,
)

V, D, C, N = 11, 6, 10, 4


def _normal(key: jax.Array, salt: int = 0):
    """numpy normal draws seeded from ``key``: no per-shape XLA compiles for test data."""
    rng = np.random.default_rng([*np.asarray(jax.random.key_data(key)).tolist(), salt])
    return lambda *shape: rng.standard_normal(shape).astype(np.float32)


def lm_param_tree(key: jax.Array) -> dict:
    """A realistic LM parameter tree: embedding, one block (attn + norm + SSM mixer), head."""
    r = _normal(key)
    return {
        "embed": {"embedding": r(V, D)},
        "blocks": {
            "0": {
                "attn": {"q_proj": {"kernel": r(D, D), "bias": r(D)}},
                "norm": {"scale": r(D)},
                "mixer": {"A_log": r(C, N), "D": r(C), "dt_bias": r(C),
                          "x_proj": {"kernel": r(C, 3 * N)}},
            }
        },
        "lm_head": {"kernel": r(D, V)},
    }


# path -> (decays, goes to muon)
EXPECTED = {
    ("embed", "embedding"): (False, False),
    ("blocks", "0", "attn", "q_proj", "kernel"): (True, True),
    ("blocks", "0", "attn", "q_proj", "bias"): (False, False),
    ("blocks", "0", "norm", "scale"): (False, False),
    ("blocks", "0", "mixer", "A_log"): (False, False),
    ("blocks", "0", "mixer", "D"): (False, False),
    ("blocks", "0", "mixer", "dt_bias"): (False, False),
    ("blocks", "0", "mixer", "x_proj", "kernel"): (True, True),
    ("lm_head", "kernel"): (True, False),
}


def _by_path(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(k.key) for k in path): leaf for path, leaf in flat}


def test_masks_on_lm_tree(key):
    params = lm_param_tree(key)
    decay, muon = _by_path(weight_decay_mask(params)), _by_path(muon_mask(params))
    assert set(decay) == set(muon) == set(EXPECTED)
    for path, (want_decay, want_muon) in EXPECTED.items():
        assert decay[path] is want_decay, path
        assert muon[path] is want_muon, path


def test_masks_shape_only_and_3d():
    # Shapes are all that is read; a stacked [L, D, D] weight decays but is not Muon's.
    params = {"stack": {"kernel": jax.ShapeDtypeStruct((2, D, D), jnp.float32)},
              "proj": {"kernel": jax.ShapeDtypeStruct((D, D), jnp.float32)},
              "wte": jax.ShapeDtypeStruct((V, D), jnp.float32),
              "head": {"kernel": jax.ShapeDtypeStruct((D, V), jnp.float32)}}
    assert weight_decay_mask(params) == {"stack": {"kernel": True}, "proj": {"kernel": True},
                                         "wte": False, "head": {"kernel": True}}
    assert muon_mask(params) == {"stack": {"kernel": False}, "proj": {"kernel": True},
                                 "wte": False, "head": {"kernel": False}}


def test_masks_on_nnx_state():
    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.embed = nnx.Embed(V, D, rngs=rngs)
            self.proj = nnx.Linear(D, D, rngs=rngs)
            self.norm = nnx.RMSNorm(D, rngs=rngs)
            self.A_log = nnx.Param(jnp.zeros((C, N)))

    state = nnx.state(nnx.eval_shape(lambda: Block(nnx.Rngs(0))), nnx.Param)  # shapes only
    for tree in (state, nnx.as_pure(state)):  # what nnx.Optimizer's init / update see
        decay = {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in p): m
                 for p, m in jax.tree_util.tree_flatten_with_path(weight_decay_mask(tree))[0]}
        decay = {k[:-1] if k[-1] == "value" else k: m for k, m in decay.items()}
        assert decay == {("embed", "embedding"): False, ("proj", "kernel"): True,
                         ("proj", "bias"): False, ("norm", "scale"): False, ("A_log",): False}


def test_rules_are_extensible(monkeypatch):
    params = {"mixer": {"log_decay": np.ones((3, 4), np.float32)}}
    assert weight_decay_mask(params)["mixer"]["log_decay"] is True
    monkeypatch.setattr(optim, "NO_DECAY_PARAM_NAMES", (*optim.NO_DECAY_PARAM_NAMES, "log_decay"))
    assert weight_decay_mask(params)["mixer"]["log_decay"] is False
    assert muon_mask(params)["mixer"]["log_decay"] is False


def test_schedule_nanogpt_cosine():
    # nanoGPT shakespeare-char: lr 1e-3, warmup 100, lr_decay_iters 5000, min_lr 1e-4
    sched = create_schedule(1e-3, warmup_steps=100, total_steps=5000, min_lr=1e-4)
    np.testing.assert_allclose(float(sched(0)), 0.0, atol=1e-12)
    np.testing.assert_allclose(float(sched(50)), 5e-4, rtol=1e-5)
    np.testing.assert_allclose(float(sched(100)), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(float(sched(2550)), 5.5e-4, rtol=1e-5)  # halfway: (lr+min)/2
    step = 1000
    cos = 0.5 * (1 + math.cos(math.pi * (step - 100) / 4900))
    np.testing.assert_allclose(float(sched(step)), 1e-4 + cos * 9e-4, rtol=1e-5)
    np.testing.assert_allclose(float(sched(5000)), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(sched(8000)), 1e-4, rtol=1e-5)
    by_ratio = create_schedule(1e-3, warmup_steps=100, total_steps=5000)  # default ratio 0.1
    for s in (0, 100, 2550, 5000):
        np.testing.assert_allclose(float(by_ratio(s)), float(sched(s)), rtol=1e-6)


def test_schedule_other_kinds():
    lin = create_schedule(1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.0, kind="linear")
    np.testing.assert_allclose([float(lin(s)) for s in (5, 10, 60, 110, 200)],
                               [0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
    const = create_schedule(2.0, warmup_steps=4, total_steps=50, kind="constant")
    np.testing.assert_allclose([float(const(s)) for s in (0, 2, 4, 49, 99)],
                               [0.0, 1.0, 2.0, 2.0, 2.0], atol=1e-6)
    no_warm = create_schedule(1.0, total_steps=10)
    np.testing.assert_allclose(float(no_warm(0)), 1.0)
    all_warm = create_schedule(1.0, warmup_steps=10, total_steps=10)  # optax cosine rejects this
    np.testing.assert_allclose([float(all_warm(s)) for s in (5, 10, 20)], [0.5, 0.1, 0.1],
                               atol=1e-6)


# --- a tiny classification problem shared by the convergence tests --------------------------

DIN, HID, NCLS = 8, 32, 6


def _problem(key: jax.Array):
    r = _normal(key)
    x = r(8, 16, DIN)  # [B, T, Din]
    y = jnp.asarray(np.argmax(x @ r(DIN, NCLS), -1))  # [B, T], labels of a linear teacher
    x = jnp.asarray(x)
    params = jax.tree.map(jnp.asarray, {
        "hidden": {"kernel": r(DIN, HID) / DIN**0.5, "bias": np.zeros((HID,), np.float32)},
        "lm_head": {"kernel": r(HID, NCLS) / HID**0.5},
    })

    def logits_fn(p, inputs):  # -> [B, T, NCLS]
        h = jnp.tanh(inputs @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        return h @ p["lm_head"]["kernel"]

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x), y).mean()

    return params, x, logits_fn, loss_fn


@pytest.mark.parametrize("name,kwargs", [
    ("adamw", dict(lr=3e-2)),
    ("muon", dict(lr=3e-2, muon_lr=0.1)),
    ("sophia", dict(lr=3e-2)),
])
def test_optimizer_reduces_loss(key, name, kwargs):
    params, x, logits_fn, loss_fn = _problem(key)
    steps, k = 100, optim.SOPHIA_HESSIAN_INTERVAL
    tx = create_optimizer(name, params, total_steps=steps, warmup_steps=5, weight_decay=0.0,
                          **kwargs)

    def step(carry, inp):
        p, state = carry
        i, rng = inp
        grads = jax.grad(loss_fn)(p)

        def with_hessian():
            h = gnb_hessian_estimate(logits_fn, p, x, rng)
            return tx.update(grads, state, p, hessian=h)

        if name == "sophia":  # the trainer's two step variants, as one program here
            updates, state = jax.lax.cond(sophia_should_update_hessian(i, k), with_hessian,
                                          lambda: tx.update(grads, state, p))
        else:
            updates, state = tx.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    train = jax.jit(lambda p, s: jax.lax.scan(
        step, (p, s), (jnp.arange(steps), jax.random.split(key, steps)))[0][0])
    before, after = float(loss_fn(params)), float(loss_fn(train(params, tx.init(params))))
    assert np.isfinite(after) and after < before / 5, (before, after)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_weight_decay_respects_mask(key, name):
    # Zero gradients: the only movement is decay. Matrices shrink, the bias stays put.
    r = _normal(key)
    params = {"proj": {"kernel": r(4, 4), "bias": r(4)}}
    tx = create_optimizer(name, params, lr=0.1, muon_lr=0.1, total_steps=10, weight_decay=0.5,
                          schedule="constant")
    zeros = jax.tree.map(jnp.zeros_like, params)
    state, update = tx.init(params), jax.jit(tx.update)
    new = params
    for _ in range(3):
        updates, state = update(zeros, state, new)
        new = optax.apply_updates(new, updates)
    np.testing.assert_array_equal(np.asarray(new["proj"]["bias"]),
                                  np.asarray(params["proj"]["bias"]))
    np.testing.assert_allclose(np.asarray(new["proj"]["kernel"]),
                               np.asarray(params["proj"]["kernel"]) * (1 - 0.1 * 0.5) ** 3,
                               rtol=1e-5)


def test_muon_routes_leaves(key):
    params = lm_param_tree(key)
    r = _normal(key, salt=1)
    lr, muon_lr, wd = 1e-3, 0.02, 0.1
    tx = create_optimizer("muon", params, lr=lr, muon_lr=muon_lr, weight_decay=wd,
                          total_steps=10, grad_clip=0.0)
    grads = jax.tree.map(lambda p: r(*p.shape), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    flat_u, flat_g, flat_p = _by_path(updates), _by_path(grads), _by_path(params)
    for path, (decays, to_muon) in EXPECTED.items():
        u, g, p = (np.asarray(t[path]) for t in (flat_u, flat_g, flat_p))
        if to_muon:
            # Orthogonalised: singular values (near-)equal, unlike any elementwise rule.
            # Default muon decay is wd * lr / muon_lr, the same per-step shrink as AdamW.
            ortho = -u / muon_lr - wd * lr / muon_lr * p
            sv = np.linalg.svd(ortho, compute_uv=False)
            assert sv.max() / sv.min() < 2.0, path
        else:
            # AdamW's first step is -lr * (sign(g) + wd * p), decay only on masked-in leaves.
            want = -lr * (np.sign(g) + (wd * p if decays else 0.0))
            np.testing.assert_allclose(u, want, rtol=1e-4, atol=1e-8, err_msg=str(path))


def test_sophia_hessian_estimate(key):
    params, x, logits_fn, _ = _problem(key)

    @jax.jit
    def estimates(params, x, key):
        h = gnb_hessian_estimate(logits_fn, params, x, key)
        h_mask = gnb_hessian_estimate(logits_fn, params, x, key, loss_mask=jnp.ones(x.shape[:2]))
        # The scaling: B*T times the squared gradient of the mean sampled-label loss.
        labels = jax.random.categorical(key, logits_fn(params, x))

        def sampled(p):
            return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x), labels).mean()

        want = jax.tree.map(lambda g: x.shape[0] * x.shape[1] * g**2, jax.grad(sampled)(params))
        return h, h_mask, want

    h, h_mask, want = estimates(params, x, key)
    assert jax.tree.structure(h) == jax.tree.structure(params)
    for leaf, p in zip(jax.tree.leaves(h), jax.tree.leaves(params), strict=True):
        assert leaf.shape == p.shape and leaf.dtype == p.dtype
        assert np.all(np.isfinite(leaf)) and np.all(np.asarray(leaf) >= 0)
    assert sum(np.sum(leaf) for leaf in jax.tree.leaves(h)) > 0
    for got, ref, masked in zip(*map(jax.tree.leaves, (h, want, h_mask)), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-12)
        # A mask counting every token is the same as no mask.
        np.testing.assert_allclose(np.asarray(masked), np.asarray(got), rtol=1e-5, atol=1e-12)


def test_sophia_update_clipped_and_hessian_ema(key):
    r = _normal(key)
    params = {"w": {"kernel": r(5, 7)}}
    lr, b2 = 0.01, 0.99
    tx = sophia(lr, weight_decay=0.0, b2=b2)
    state, update = tx.init(params), jax.jit(tx.update)
    grads = {"w": {"kernel": 1e3 * r(5, 7)}}  # huge: every entry clips
    hess = {"w": {"kernel": np.abs(r(5, 7))}}

    updates, state = update(grads, state, params, hessian=hess)
    u = np.asarray(updates["w"]["kernel"])
    assert np.all(np.abs(u) <= lr * (1 + 1e-6))
    np.testing.assert_allclose(np.abs(u), lr, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state[0].h["w"]["kernel"]),
                               (1 - b2) * np.asarray(hess["w"]["kernel"]), rtol=1e-6)
    assert int(state[0].hessian_count) == 1

    h_before = state[0].h
    small = {"w": {"kernel": 1e-6 * r(5, 7)}}
    updates, state = update(small, state, params)  # no estimate: h kept
    np.testing.assert_array_equal(np.asarray(state[0].h["w"]["kernel"]),
                                  np.asarray(h_before["w"]["kernel"]))
    assert int(state[0].hessian_count) == 1 and int(state[0].count) == 2
    assert np.all(np.abs(np.asarray(updates["w"]["kernel"])) <= lr * (1 + 1e-6))

    # Through create_optimizer (clipping and a schedule in front) the bound still holds.
    tx = create_optimizer("sophia", params, lr=lr, total_steps=10, weight_decay=0.0,
                          schedule="constant")
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, hessian=hess)
    assert np.all(np.abs(np.asarray(updates["w"]["kernel"])) <= lr * (1 + 1e-6))


def test_sophia_should_update_hessian():
    assert [sophia_should_update_hessian(s, 10) for s in (0, 1, 9, 10, 20, 25)] == [
        True, False, False, True, True, False]
    assert bool(sophia_should_update_hessian(jnp.asarray(30), 10))
    assert sophia_should_update_hessian(3, 1)
    with pytest.raises(ValueError, match="k"):
        sophia_should_update_hessian(0, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="sgd"), "adamw.*muon.*sophia"),
    (dict(lr=0.0), "lr"),
    (dict(lr=-1e-3), "lr"),
    (dict(total_steps=0), "total_steps"),
    (dict(warmup_steps=20), "warmup_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(b1=1.0), "b1"),
    (dict(name="muon", muon_lr=0.0), "muon_lr"),
    (dict(name="sophia", sophia_gamma=-1.0), "gamma"),
    (dict(schedule="step"), "kind"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio"),
])
def test_create_optimizer_errors(kwargs, match):
    args = dict(name="adamw", lr=1e-3, total_steps=10)
    args.update(kwargs)
    name = args.pop("name")
    with pytest.raises(ValueError, match=match):
        create_optimizer(name, {"w": jnp.ones((2, 2))}, **args)


def test_create_schedule_errors():
    with pytest.raises(ValueError, match="min_lr"):
        create_schedule(1e-3, total_steps=10, min_lr=1e-4, min_lr_ratio=0.1)
    with pytest.raises(ValueError, match="min_lr"):
        create_schedule(1e-3, total_steps=10, min_lr=1e-2)
    with pytest.raises(ValueError, match="lr"):
        create_schedule(0.0, total_steps=10)


class TinyLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(NCLS, DIN, rngs=rngs)
        self.hidden = nnx.Linear(DIN, HID, rngs=rngs)
        self.norm = nnx.RMSNorm(HID, rngs=rngs)
        self.lm_head = nnx.Linear(HID, NCLS, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, NCLS]
        return self.lm_head(self.norm(jnp.tanh(self.hidden(self.embed(tokens)))))


@pytest.fixture(scope="module")
def tiny_lm() -> TinyLM:
    return nnx.jit(lambda: TinyLM(nnx.Rngs(0)))()  # one compile instead of per-op dispatch


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_nnx_optimizer(key, tiny_lm, name):
    model = nnx.clone(tiny_lm)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, NCLS, (4, 8)))  # [B, T]
    targets = jnp.asarray(np.roll(np.asarray(tokens), -1, axis=1))
    params = nnx.state(model, nnx.Param)
    tx = create_optimizer(name, params, lr=1e-2, total_steps=3, warmup_steps=1)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(tokens), targets).mean()

    @nnx.jit
    def step(model, optimizer, rng):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        extra = {}
        if name == "sophia":
            graphdef, p, rest = nnx.split(model, nnx.Param, ...)
            extra["hessian"] = gnb_hessian_estimate(
                lambda pp, inp: nnx.merge(graphdef, pp, rest)(inp), p, tokens, rng)
        optimizer.update(model, grads, **extra)
        return loss

    before = jax.tree.map(np.array, nnx.as_pure(nnx.state(model, nnx.Param)))
    for i in range(3):
        loss = step(model, optimizer, jax.random.fold_in(key, i))
        assert np.isfinite(float(loss))
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    assert int(optimizer.step[...]) == 3
    moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, after)
    assert all(jax.tree.leaves(moved)), moved
    np.testing.assert_array_equal(  # the shared fixture is untouched (clone)
        np.asarray(tiny_lm.hidden.kernel[...]), before["hidden"]["kernel"])


def test_muon_skips_conv_kernels_and_thin_matrices():
    import numpy as np

    params = {"mixer": {"conv_weight": np.zeros((4, 256)), "dt_proj": {"kernel": np.zeros((8, 256))},
                        "in_proj": {"kernel": np.zeros((128, 512))}}}
    muon = muon_mask(params)
    assert muon["mixer"]["conv_weight"] is False
    assert muon["mixer"]["dt_proj"]["kernel"] is False
    assert muon["mixer"]["in_proj"]["kernel"] is True
