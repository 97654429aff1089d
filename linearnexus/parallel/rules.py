"""Logical-axis sharding rules for every parameter, written once per kind of weight.

Each rule matches a parameter's path in the model's pure-dict state (``layers/3/mixer/
q_proj/kernel``) and names the *logical* axis of every dimension; ``LOGICAL_TO_MESH`` then
maps logical axes onto mesh axes. Blocks and models never name a mesh: a new block whose
weights follow the naming here (``q_proj`` / ``o_proj`` / ``in_proj`` / ``conv_weight`` ...)
is covered without a new line; one with a new kind of weight adds one rule.

Logical axes::

    embed   the residual width D          -> fsdp (the weight split across fsdp)
    vocab   token ids                      -> tensor
    heads   heads x head dims, or the channels a mixer splits per head -> tensor
    mlp     the MLP hidden width           -> tensor
    None    replicated

Tensor parallelism is then column-parallel in-projections (q/k/v/in_proj, MLP gate/up)
and row-parallel out-projections (o_proj/out_proj, MLP down) as in Megatron-LM; ``jit``
inserts the reductions. A dimension whose size the mesh axis does not divide stays
replicated (e.g. Mamba-2's fused ``in_proj`` width); under ``fsdp`` a weight with no
``embed`` dimension is split along its largest dimension that divides, so each device
holds ~1/fsdp of every large weight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from linearnexus.parallel.mesh import BATCH_AXES

__all__ = ["LOGICAL_TO_MESH", "RULES", "ShardingRuleError", "batch_sharding", "logical_axes",
           "param_shardings", "path_str", "replicated", "shardings_like"]

# (kind, pattern over the parameter path, logical axis of each dimension)
RULES: tuple[tuple[str, str, tuple[str | None, ...]], ...] = (
    ("embedding", r"(^|/)embed/embedding$", ("vocab", "embed")),
    ("output head", r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    ("mlp in", r"(^|/)mlp/(w_gate|w_up)/kernel$", ("embed", "mlp")),
    ("mlp out", r"(^|/)mlp/w_down/kernel$", ("mlp", "embed")),
    ("residual norm", r"(^|/)(norm|norm1|norm2)/scale$", ("embed",)),
    # q/k/v/gate and fused input projections: D -> heads * head dim (column parallel)
    ("in projection",
     r"(^|/)mixer/(q_proj|k_proj|v_proj|g_proj|in_proj|w_q|a_proj|b_proj|gate_proj)/kernel$",
     ("embed", "heads")),
    # projections into a shared (head-independent) latent: MLA's KV latent and rope key
    ("latent projection", r"(^|/)mixer/(w_dkv|w_kr|gate_down)(/kernel)?$", ("embed", None)),
    ("out projection", r"(^|/)mixer/(o_proj|out_proj|w_o)/kernel$", ("heads", "embed")),
    ("per-head up-projection", r"(^|/)mixer/(w_uk|w_uv)$", (None, "heads", None)),  # [r, H, d]
    ("latent to heads", r"(^|/)mixer/(gate_up|dt_proj/kernel)$", (None, "heads")),
    ("channel mixing", r"(^|/)mixer/x_proj/kernel$", ("heads", None)),  # Mamba [C, R + 2N]
    ("conv", r"(^|/)conv_weight$", (None, "heads")),  # [W, channels]
    ("per-channel state", r"(^|/)mixer/A_log$", ("heads", None)),  # Mamba-1 [C, N]
    ("per-head vector",
     r"(^|/)(conv_bias|gate_bias|dt_bias|D|A_log|dt_proj/bias|gate_proj/bias)$", ("heads",)),
    ("inner norm", r"(^|/)mixer/(norm|kv_norm)/scale$", (None,)),
)
_COMPILED = tuple((kind, re.compile(pattern), axes) for kind, pattern, axes in RULES)

LOGICAL_TO_MESH: Mapping[str, str] = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor",
                                      "mlp": "tensor"}


class ShardingRuleError(KeyError):
    """A parameter no rule covers (or covers with the wrong rank); names its path."""

    def __str__(self) -> str:
        return str(self.args[0])


def path_str(path: tuple[Any, ...]) -> str:
    """A jax key path -> ``"layers/0/mixer/q_proj/kernel"``."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axes of the parameter at ``path`` (of rank ``ndim``).

    Rules are tried in order; the first whose pattern matches and whose rank equals
    ``ndim`` wins.

    Raises:
        ShardingRuleError: no rule matches (add one to ``RULES`` for the new kind of weight).
    """
    matched = []
    for kind, pattern, axes in _COMPILED:
        if pattern.search(path):
            if len(axes) == ndim:
                return axes
            matched.append(f"{kind} (rank {len(axes)})")
    extra = f"; rules matched by name but not by rank: {matched}" if matched else ""
    raise ShardingRuleError(f"sharding rules: no rule for parameter {path!r} of rank {ndim}"
                            f"{extra}; add one to linearnexus.parallel.rules.RULES")


def _spec(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of one parameter: logical axes mapped to mesh axes where they divide."""
    out: list[str | None] = []
    for size, logical in zip(shape, axes, strict=True):
        mesh_axis = LOGICAL_TO_MESH.get(logical) if logical else None
        ways = mesh.shape[mesh_axis] if mesh_axis else 1
        out.append(mesh_axis if ways > 1 and mesh_axis not in out and size % ways == 0 else None)
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and "fsdp" not in out:
        # no embed dim (conv, per-channel vectors, latents): split the largest free dim
        free = [(size, i) for i, size in enumerate(shape) if out[i] is None and size % fsdp == 0]
        if free:
            out[max(free)[1]] = "fsdp"
    return PartitionSpec(*out)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` of every parameter of ``params`` (the model's ``nnx.Param`` state
    as a pure dict, or ShapeDtypeStructs of it), by ``RULES``.

    Raises:
        ShardingRuleError: a parameter no rule covers.
    """
    def one(path, leaf):
        return NamedSharding(mesh, _spec(tuple(leaf.shape),
                                         logical_axes(path_str(path), len(leaf.shape)), mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def replicated(mesh: Mesh) -> NamedSharding:
    """The same array on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def shardings_like(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree that mirrors the parameters (optimizer moments, gradients).

    A leaf whose key path ends with a parameter's path and has its shape gets that
    parameter's sharding (optax states hold ``mu`` / ``nu`` trees shaped like the params);
    anything else (step counts, scalars, factored statistics) is replicated.
    """
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(shardings), strict=True):
        by_path[tuple(path_str(path).split("/"))] = (tuple(leaf.shape), sh)
    depth = max((len(k) for k in by_path), default=0)
    rep = replicated(mesh)

    def one(path, leaf):
        parts = tuple(path_str(path).split("/"))
        for n in range(min(depth, len(parts)), 0, -1):
            hit = by_path.get(parts[-n:])
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2, *, leading: int = 0) -> NamedSharding:
    """Sharding of a token batch ``[..., B, T, ...]``: B over ``data`` x ``fsdp``, T over
    ``context``; ``leading`` dimensions before B (e.g. eval windows ``[N, B, T]``) and
    dimensions after T are replicated."""
    spec = [None] * leading + [BATCH_AXES, "context"] + [None] * (ndim - leading - 2)
    return NamedSharding(mesh, PartitionSpec(*spec))
