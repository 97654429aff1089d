"""The delta rules' WY part in plain JAX, for the tests of the WY backward kernels
(``pallas_wy.wy_fused_backward``, ``mosaic_wy.wy_fused_backward_mosaic``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def fused_wy_reference(k, v, beta, g, s, L):
    """``vn = M^{-1} beta (v - e^b (k S_c))`` per chunk in plain JAX (float32, exact
    products): k ``[R, TP, H, K]``, v ``[R, TP, H, V]``, beta / g ``[R, TP, H]``, s
    ``[R, NC, H, K, V]`` the entering states; returns vn ``[R, TP, H, V]`` and ``M``."""
    R, TP, H, K = k.shape
    NC, V = TP // L, v.shape[-1]
    hi = jax.lax.Precision.HIGHEST
    kc = k.reshape(R, NC, L, H, K)  # [R, TP, H, K] -> [R, NC, L, H, K]
    vc = v.reshape(R, NC, L, H, V)  # [R, TP, H, V] -> [R, NC, L, H, V]
    bc = beta.reshape(R, NC, L, H)  # [R, TP, H] -> [R, NC, L, H]
    b = (jnp.cumsum(g.reshape(R, NC, L, H), axis=2) if g is not None
         else jnp.zeros((R, NC, L, H)))
    low = jnp.tril(jnp.ones((L, L), bool), -1)
    diff = b[:, :, :, None, :] - b[:, :, None, :, :]  # [R, NC, i, j, H]: b_i - b_j
    decay = jnp.where(low[None, None, :, :, None], jnp.exp(jnp.where(
        low[None, None, :, :, None], diff, 0.0)), 0.0)
    # [R, NC, i, H, K] x [R, NC, j, H, K] -> [R, NC, i, j, H]: k_i . k_j
    kk = jnp.einsum("rcihk,rcjhk->rcijh", kc, kc, precision=hi)
    m = jnp.eye(L)[None, None, :, :, None] + bc[:, :, :, None, :] * kk * decay
    # [R, NC, L, H, K] x [R, NC, H, K, V] -> [R, NC, L, H, V]: k S_c per chunk
    ks = jnp.einsum("rclhk,rchkv->rclhv", kc, s, precision=hi)
    y = bc[..., None] * (vc - jnp.exp(b)[..., None] * ks)
    mt = jnp.moveaxis(m, 4, 2)  # [R, NC, i, j, H] -> [R, NC, H, i, j]
    vn = jax.scipy.linalg.solve_triangular(mt, jnp.moveaxis(y, 3, 2), lower=True,
                                           unit_diagonal=True)  # [R, NC, H, L, V]
    return jnp.moveaxis(vn, 2, 3).reshape(R, TP, H, V), mt  # -> [R, TP, H, V]


def fused_wy_case(seed: int, R: int, NC: int, H: int, K: int, V: int, gated: bool,
                  dtype: Any, L: int = 64) -> dict[str, Any]:
    """Fresh random inputs of the WY backward and what it must return, by autodiff of
    :func:`fused_wy_reference` with the entering states held fixed.

    Returns ``{"k", "v", "beta", "g", "states", "vn", "dy", "dks", "dk_core"}`` (k, v, the
    states, vn, dy, dks and dk_core rounded to ``dtype``'s grid, float32 arrays; ``dy = M^{-T}
    dvn`` and ``dks = -dy S_c^T`` in the token layout ``[R, TP, H, .]``) and ``"want"``:
    ``(dk + dk_core, dv, dbeta, dg)`` (dg None without a gate)."""
    ks = jax.random.split(jax.random.key(seed), 7)
    k = jax.random.normal(ks[0], (R, NC * L, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[1], (R, NC * L, H, V))
    beta = jax.nn.sigmoid(jax.random.normal(ks[2], (R, NC * L, H)))
    g = jax.nn.log_sigmoid(2.0 + jax.random.normal(ks[3], (R, NC * L, H))) if gated else None
    s = 0.3 * jax.random.normal(ks[4], (R, NC, H, K, V))
    dvn = jax.random.normal(ks[5], (R, NC * L, H, V))
    dk_core = jax.random.normal(ks[6], (R, NC * L, H, K))
    grid = lambda x: x.astype(dtype).astype(jnp.float32)  # noqa: E731
    k, v, beta, s, dk_core = (grid(x) for x in (k, v, beta, s, dk_core))

    def f(k, v, beta, g):
        return fused_wy_reference(k, v, beta, g, s, L)[0]

    vn, pull = jax.vjp(f, k, v, beta, g)
    want = pull(dvn)
    mt = fused_wy_reference(k, v, beta, g, s, L)[1]  # [R, NC, H, L, L]
    dvn_c = jnp.moveaxis(dvn.reshape(R, NC, L, H, V), 3, 2)  # -> [R, NC, H, L, V]
    dy = jax.scipy.linalg.solve_triangular(mt, dvn_c, lower=True, unit_diagonal=True,
                                           trans=1)  # M^{-T} dvn
    # [R, NC, H, L, V] x [R, NC, H, K, V] -> [R, NC, H, L, K]: -dy S_c^T
    dks = -jnp.einsum("rchlv,rchkv->rchlk", dy, s, precision=jax.lax.Precision.HIGHEST)

    def tok(x):  # [R, NC, H, L, X] -> [R, NC, L, H, X] -> [R, TP, H, X]
        return jnp.moveaxis(x, 2, 3).reshape(R, NC * L, H, x.shape[-1])

    return {"k": k, "v": v, "beta": beta, "g": g, "states": s, "vn": grid(vn),
            "dy": grid(tok(dy)), "dks": grid(tok(dks)), "dk_core": dk_core,
            "want": (want[0] + dk_core, want[1], want[2], want[3] if gated else None)}
