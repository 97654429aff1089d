"""Context parallelism for the linear ops: the sequence split over the mesh's ``context`` axis.

Every op here is a linear recurrence in its state, so the map a device's slice of the
sequence applies to the state that enters it is affine::

    S_out = M S_in + B          linear ops: S [K, V] per head, M [K, K] (diagonal for
                                simple_gla / gla, dense for the delta rules' (I - b k k^T))
    h_out = M * h_in + B        Mamba-1: h [C, N] per channel, M elementwise

and affine maps compose (``(M2, B2) o (M1, B1) = (M2 M1, M2 B1 + B2)``). Inside
``shard_map`` each device:

1. gets its summary ``(M, B)`` from ONE call of the op's public api function on its local
   tokens, with the value input widened by K zero columns and the initial state
   ``[0 | I]``: the zero columns carry no input, so those state columns end as ``M I = M``,
   while the first V columns start from 0 and end as ``B`` (for Mamba-1, the channels are
   doubled with zero input and an initial state of ones);
2. all-gathers the summaries over ``context`` (P x (K K + K V) numbers per head and state:
   independent of T) and composes them in device order from the global initial state, so
   it knows the state entering its slice (and every device knows the final state);
3. runs the op again on its tokens from that entering state, which gives outputs equal to
   the single-device op.

Packed sequences (``cu_seqlens``, B = 1) that cross device boundaries work the same way per
sequence: each device clips the global offsets to its slice (sequences outside it become
empty segments, whose map is the identity), so the op returns one summary per sequence and
the composition runs per sequence. Gradients come from autodiff through ``shard_map`` (the
all-gather transposes to a reduce-scatter).

Compute is about 2x the op (plus a K-wider value in the summary call); communication is an
all-gather of the summaries, whatever the sequence length. Attention layers are not
wrapped: with the activations split over ``context``, XLA's partitioner all-gathers their
keys and values, which is what a hybrid model needs.

Use it around tracing (the training step does this for a mesh with ``context > 1``)::

    with context_parallel(mesh):
        o, state = jax.jit(lambda *a: gla(*a, output_final_state=True))(q, k, v, g)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from linearnexus.core.hooks import op_override

__all__ = ["CONTEXT_OPS", "collective_bytes", "context_parallel", "summary_bytes"]

AXIS = "context"
# op -> names of its arrays with the sequence at dimension 1 (split over context)
CONTEXT_OPS: dict[str, tuple[str, ...]] = {
    "simple_gla": ("q", "k", "v", "g"),
    "gla": ("q", "k", "v", "g"),
    "delta_rule": ("q", "k", "v", "beta"),
    "gated_delta_rule": ("q", "k", "v", "g", "beta"),
    "selective_scan": ("x", "dt", "B", "C", "z"),
}


@functools.cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)


def _float_dtype(*arrays: Any) -> Any:
    out = jnp.float32
    for a in arrays:
        if a is not None:
            out = jnp.promote_types(out, a.dtype)
    return out


# -- per-family pieces: summary call and composition ------------------------------------------


def _linear_summary(fn, args: dict[str, Any], n_states: int) -> tuple[jax.Array, jax.Array]:
    """``(M [N, H, K, K], B [N, H, K, V])`` of this device's tokens (one op call)."""
    q, v = args["q"], args["v"]
    heads, key_dim, value_dim = q.shape[2], q.shape[3], v.shape[3]
    dtype = _float_dtype(q, v)
    v_ext = jnp.concatenate([v, jnp.zeros(v.shape[:3] + (key_dim,), v.dtype)], -1)  # [B, T, H, V+K]
    eye = jnp.broadcast_to(jnp.eye(key_dim, dtype=dtype), (n_states, heads, key_dim, key_dim))
    init = jnp.concatenate([jnp.zeros((n_states, heads, key_dim, value_dim), dtype), eye], -1)
    call = {**args, "v": v_ext, "initial_state": init, "output_final_state": True}
    _, final = fn(**call)  # [N, H, K, V+K]
    return final[..., value_dim:], final[..., :value_dim]


def _linear_apply(m: jax.Array, s: jax.Array) -> jax.Array:
    return jnp.einsum("nhij,nhjv->nhiv", m, s.astype(m.dtype))  # [N,H,K,K] x [N,H,K,V]


def _linear_zero_state(args: dict[str, Any], n_states: int) -> jax.Array:
    q, v = args["q"], args["v"]
    return jnp.zeros((n_states, q.shape[2], q.shape[3], v.shape[3]), _float_dtype(q, v))


def _scan_summary(fn, args: dict[str, Any], n_states: int) -> tuple[jax.Array, jax.Array]:
    """``(M [N, C, Ns], B [N, C, Ns])`` for Mamba-1: channels doubled, the copy with zero
    input and a state of ones (its decay is elementwise)."""
    x, A = args["x"], args["A"]
    channels, n_state = A.shape
    dtype = _float_dtype(x)

    def twice(a, axis):
        return None if a is None else jnp.concatenate([a, a], axis)

    init = jnp.concatenate([jnp.zeros((n_states, channels, n_state), dtype),
                            jnp.ones((n_states, channels, n_state), dtype)], 1)  # [N, 2C, Ns]
    call = {**args, "x": jnp.concatenate([x, jnp.zeros_like(x)], -1),  # [B, T, 2C]
            "dt": twice(args["dt"], -1), "A": twice(A, 0), "dt_bias": twice(args["dt_bias"], 0),
            "D": None, "z": None, "initial_state": init, "output_final_state": True}
    _, final = fn(**call)  # [N, 2C, Ns]
    return final[:, channels:], final[:, :channels]


def _scan_zero_state(args: dict[str, Any], n_states: int) -> jax.Array:
    channels, n_state = args["A"].shape
    return jnp.zeros((n_states, channels, n_state), _float_dtype(args["x"]))


_FAMILY = {
    "selective_scan": (_scan_summary, lambda m, s: m * s.astype(m.dtype), _scan_zero_state),
}
_LINEAR = (_linear_summary, _linear_apply, _linear_zero_state)


# -- the wrapper ----------------------------------------------------------------------------


# Mamba-1 arrays without a channel dimension at 2 (their dim 2 is the state size N) and
# per-channel parameters (channel dimension first)
_NO_HEAD_DIM = {"B", "C"}
_PER_CHANNEL = ("A", "D", "dt_bias")


def _run(name: str, fn: Callable[..., Any], args: dict[str, Any], mesh: Mesh) -> Any:
    """The op on ``args`` (bound arguments) with its sequence split over ``mesh``'s context.

    The map is manual over every mesh axis: the batch splits over data x fsdp and heads
    (channels for Mamba-1) over tensor where they divide, as the surrounding activations
    are laid out; otherwise those axes see the whole batch / all heads.
    """
    summary, apply, zero_state = _FAMILY.get(name, _LINEAR)
    seq_names = tuple(n for n in CONTEXT_OPS[name] if args.get(n) is not None)
    parts = mesh.shape[AXIS]
    first = args[seq_names[0]]
    batch, seq, heads = first.shape[:3]
    local = seq // parts
    cu = args.get("cu_seqlens")
    n_states = batch if cu is None else cu.shape[0] - 1
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    b_ax = ("data", "fsdp") if cu is None and data_ways > 1 and batch % data_ways == 0 else None
    tensor = mesh.shape["tensor"]
    h_ax = "tensor" if tensor > 1 and heads % tensor == 0 else None
    want_final = bool(args.get("output_final_state"))
    arrays: dict[str, Any] = {}
    specs: dict[str, PartitionSpec] = {}
    for n in seq_names:
        arrays[n] = args[n]
        specs[n] = PartitionSpec(b_ax, AXIS) if n in _NO_HEAD_DIM else PartitionSpec(b_ax, AXIS, h_ax)
    if name == "selective_scan":
        for n in _PER_CHANNEL:
            if args.get(n) is not None:
                arrays[n], specs[n] = args[n], PartitionSpec(h_ax)
    state_spec = PartitionSpec(b_ax, h_ax)
    if args.get("initial_state") is not None:
        arrays["initial_state"], specs["initial_state"] = args["initial_state"], state_spec
    if cu is not None:
        arrays["cu_seqlens"], specs["cu_seqlens"] = cu, PartitionSpec()
    static = {n: v for n, v in args.items()
              if n not in arrays and n not in ("initial_state", "cu_seqlens")}

    def body(arrays: dict[str, Any]) -> tuple[Any, Any]:
        idx = jax.lax.axis_index(AXIS)
        mine = {**static, **arrays}
        init = mine.pop("initial_state", None)
        n_local = mine[seq_names[0]].shape[0] if cu is None else n_states
        if cu is not None:  # offsets clipped to this slice; sequences outside it are empty
            offsets = mine["cu_seqlens"]
            mine["cu_seqlens"] = jnp.clip(offsets - idx * local, 0, local).astype(offsets.dtype)
        m, b = summary(fn, {**mine, "initial_state": None}, n_local)
        ms = jax.lax.all_gather(m, AXIS)  # [P, N, ...]
        bs = jax.lax.all_gather(b, AXIS)
        state = zero_state(mine, n_local) if init is None else init.astype(b.dtype)
        entering = []
        for i in range(parts):  # P is small: unrolled, in device order
            entering.append(state)
            state = apply(ms[i], state) + bs[i]
        enter = jnp.stack(entering)[idx]
        o, _ = fn(**{**mine, "initial_state": enter, "output_final_state": False})
        return o, state

    out_o = PartitionSpec(b_ax, AXIS, h_ax)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=(out_o, state_spec),
                           check_vma=False)
    with op_override(None):
        o, final = mapped(arrays)
    return o, (final if want_final else None)


def _hook(mesh: Mesh) -> Callable[..., Any]:
    parts = mesh.shape[AXIS]

    def hook(name: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if name not in CONTEXT_OPS or parts == 1:
            return NotImplemented
        bound = _signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        first = a[CONTEXT_OPS[name][0]]
        # sequences the mesh does not divide (e.g. one-token decoding) run unsplit; the
        # result is the same, XLA just gathers the sequence
        if getattr(first, "ndim", 0) < 2 or first.shape[1] % parts or (
                a.get("cu_seqlens") is not None and first.shape[0] != 1):
            return NotImplemented
        return _run(name, fn, a, mesh)

    return hook


@contextlib.contextmanager
def context_parallel(mesh: Mesh) -> Iterator[Mesh]:
    """Inside the block, calls of the linear ops (and of ``ssd`` / ``retention``, built on
    ``simple_gla``) traced under ``jit`` split their sequence over ``mesh``'s ``context``
    axis (see the module docstring). A sequence length the axis does not divide runs
    unsplit. The ops' results equal the single-device ones."""
    if AXIS not in mesh.shape:
        raise ValueError(f"mesh: context parallelism needs an axis named {AXIS!r}, got axes "
                         f"{tuple(mesh.shape)}")
    with op_override(_hook(mesh)):
        yield mesh


def summary_bytes(name: str, *, parts: int, n_states: int, heads: int, key_dim: int,
                  value_dim: int, itemsize: int = 4) -> int:
    """Bytes each device receives in the summary all-gather of one call of op ``name``:
    ``(P - 1)`` summaries of ``M`` and ``B`` (for ``selective_scan``, ``heads`` is the
    channel count C and ``key_dim`` the state size N; ``value_dim`` is ignored).
    Independent of the sequence length."""
    if name == "selective_scan":
        per = 2 * heads * key_dim
    else:
        per = heads * key_dim * (key_dim + value_dim)
    return (parts - 1) * n_states * per * itemsize


_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|collective-permute|"
                         r"all-to-all)(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_ITEMSIZE = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
             "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}


def _talks(line: str) -> bool:
    """False for a collective whose device groups all have one member (moves nothing)."""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2)) > 1
    groups = re.search(r"replica_groups=\{(.*?)\}(,|$|\s)", line)
    if groups:
        return any("," in g for g in re.findall(r"\{([^{}]*)\}", groups.group(1) + "}"))
    return True


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective in a compiled program's HLO text
    (``jit(f).lower(...).compile().as_text()``): per device, per call of the program.
    Collectives within groups of one device (no traffic) are left out."""
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if m is None or not _talks(line):
            continue
        total = 0
        for dtype, dims in _SHAPE.findall(m.group(1)):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * _ITEMSIZE.get(dtype, 4)
        out[m.group(2)] = out.get(m.group(2), 0) + total
    return out
