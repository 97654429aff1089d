"""A whole DeltaNet-family + SwiGLU layer's batch-1 decode step in ONE persistent kernel.

Experimental (``LINEARNEXUS_DECODE_PERSISTENT=1``, read at trace time; off by default: on an
H100 it made a batch-1 step 48-57% slower than the separate kernels, ``docs/benchmarks.md``,
"The persistent layer kernel and counted loop blocks"). A batch-1 decode step on a GPU is a
chain of small dependent kernels: per Gated DeltaNet layer with an MLP, five Pallas (Triton)
kernels (the input projection with the pre-norm and short conv folded in, the layer kernel,
``o_proj`` with the per-head norm and gate, the MLP's gate | up with its norm and the MLP's
down with the residual sums). Each pays its launch, the latency of its first loads and the
drain of its grid: on an H100 ~2.6 us a projection beyond its bytes (``docs/benchmarks.md``,
"A Mosaic GPU few-row matmul"), and the step stays at ~3x the weight-read time.

Here one kernel of ``P`` programs (one per SM, all resident) runs the same five kernels'
programs as **phases**: in phase ``s`` program ``p`` runs the phase's programs ``p, p + P,
p + 2P, ...`` with the very bodies of the separate kernels (``gemv._kernel`` and
``pallas._delta_kernel``, given their program ids), so the arithmetic is theirs, rounding
for rounding. Between phases the programs meet at a **grid barrier**: a counter in global
memory that each program increments after a CTA barrier (an acquire-release atomic at GPU
scope; every thread's stores precede it) and then polls until all ``P`` have arrived. Each
phase reads what the previous ones wrote in global memory (the projection row, ``o``, the
MLP's input), after the barrier's acquire (which also drops stale L1 lines, as
cooperative groups' grid sync relies on).

A barrier whose poll spins :data:`SPIN_LIMIT` times (programs not all resident, which
cannot happen at one program per SM unless another kernel holds SMs) sets the counter's
:data:`RELEASE` bit, which frees every later barrier: the launch then finishes (wrong
values, no hang) and its counter output tells: :func:`delta_mlp_layer` and
:func:`ssd_layer` turn the output, the conv cache and the state NaN.

Off a GPU (Pallas interpret mode runs programs one after another, where a barrier could
never be met) the kernel runs each program's share of each phase in turn (``virtual``):
the same bodies and index arithmetic, which the tests check against the separate kernels
(equal bit for bit) and through a model's decode step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common.pallas import (
    binary_switch,
    compiler_params,
    interpret_mode,
    named_pallas_call,
)
from linearnexus.kernels.fused_decode import gemv
from linearnexus.kernels.fused_decode.pallas import (
    DeltaLayerSpec,
    SsdLayerSpec,
    _delta_kernel,
    _ssd_kernel,
)

#: "1" turns on the persistent layer kernel for batch-1 decoding (read at trace time)
PERSISTENT_ENV = "LINEARNEXUS_DECODE_PERSISTENT"
#: polls before a barrier gives up (seconds of spinning; never reached on a healthy launch)
SPIN_LIMIT = 1 << 22
#: the counter's flag bit, set (atomic or: idempotent, however many programs give up) by a
#: program that gave up: every later barrier is met at once and the launch reads as failed.
#: Arrivals count far below it (programs x barriers < 2^30).
RELEASE = 1 << 30
#: programs on a GPU whose device does not report its SM count (an H100 / H200 has 132)
DEFAULT_PROGRAMS = 132
F32 = jnp.float32


#: "rows=R,per_sm=S": rows of W^T per phase program of the projections (R, a power of two)
#: and programs per SM (S) of the persistent layer kernel (read at trace time)
CONFIG_ENV = "LINEARNEXUS_PERSISTENT_CONFIG"


@dataclasses.dataclass(frozen=True)
class PersistentConfig:
    """Tiles of the persistent layer kernel.

    Attributes:
        rows: rows of ``W^T`` (output columns) a projection phase's program reads, a power
            of two. The separate kernels take 2 and rely on thousands of programs in flight
            for the memory's parallelism; one resident program per SM has one tile in
            flight at a time, so it needs larger tiles: 16 rows of a 1024-wide weight are
            32 KB a program, ~4 MB in flight over 132 SMs.
        per_sm: programs per SM (all must be resident at once for the barriers).
    """

    rows: int = 16
    per_sm: int = 1

    def __post_init__(self) -> None:
        if self.rows < 1 or self.rows & (self.rows - 1):
            raise ValueError(f"rows: expected a power of two >= 1, got {self.rows}")
        if self.per_sm < 1:
            raise ValueError(f"per_sm: expected >= 1, got {self.per_sm}")


def persistent_config() -> PersistentConfig:
    """:class:`PersistentConfig` from ``LINEARNEXUS_PERSISTENT_CONFIG`` ("rows=16,per_sm=1";
    unset: the defaults).

    Raises:
        ValueError: an unknown name or a value that is not an integer, naming it.
    """
    raw = os.environ.get(CONFIG_ENV, "")
    fields = {}
    for part in filter(None, raw.split(",")):
        name, _, value = part.partition("=")
        if name not in ("rows", "per_sm") or not value.strip().isdigit():
            raise ValueError(f"{CONFIG_ENV}: expected 'rows=R,per_sm=S' with integers, got "
                             f"{raw!r}")
        fields[name] = int(value)
    return PersistentConfig(**fields)


def persistent_enabled() -> bool:
    """Whether ``LINEARNEXUS_DECODE_PERSISTENT`` asks for the persistent layer kernel.

    Raises:
        ValueError: a value other than "0" / "1" (or unset).
    """
    return binary_switch(PERSISTENT_ENV)


def device_programs() -> int:
    """One program per SM of the first device (:data:`DEFAULT_PROGRAMS` where it does not
    say)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or DEFAULT_PROGRAMS)


# ---- the grid barrier ------------------------------------------------------------------


def _counter_add(counter_ref, value) -> Array:
    """``counter[0] += value`` atomically (acquire-release at GPU scope), the old value
    returned; one thread of the program performs it (a scalar atomic)."""
    from jax.experimental.pallas import triton as plt

    return plt.atomic_add(counter_ref, (jnp.int32(0),), jnp.asarray(value, jnp.int32))


def arrive(counter_ref) -> None:
    """This program is done with the phase: after a CTA barrier (every thread's stores
    issued), one release-ordered increment."""
    from jax.experimental.pallas import triton as plt

    plt.debug_barrier()
    _counter_add(counter_ref, 1)


def wait(counter_ref, target: Array | int) -> None:
    """Poll (acquire) until the counter reaches ``target``, then a CTA barrier so no thread
    reads the next phase's inputs earlier. After :data:`SPIN_LIMIT` polls, set the
    :data:`RELEASE` bit (the launch's results are then marked bad by its caller)."""
    from jax.experimental.pallas import triton as plt

    def cond(c):
        return (c[0] < target) & (c[1] < SPIN_LIMIT)

    def body(c):
        return _counter_add(counter_ref, 0), c[1] + 1

    seen, _ = jax.lax.while_loop(cond, body, (_counter_add(counter_ref, 0), jnp.int32(0)))
    flag = jnp.where(seen < target, jnp.int32(RELEASE), jnp.int32(0)).astype(jnp.int32)
    plt.atomic_or(counter_ref, (jnp.int32(0),), flag)
    plt.debug_barrier()


def launch_ok(counter: Array, programs: int, phases: int) -> Array:
    """Whether a launch of ``programs`` programs over ``phases`` phases met every barrier:
    its final counter is one arrival per program per barrier, the flag bit clear."""
    return counter[0] == programs * (phases - 1)


@dataclasses.dataclass(frozen=True)
class Phase:
    """``count`` programs of one of the separate kernels; ``body(i)`` runs program ``i``."""

    count: int
    body: Callable[[Array], None]


def run_phases(phases: Sequence[Phase], *, programs: int, counter_ref,
               virtual: bool) -> None:
    """Inside a kernel of grid ``(programs,)`` (``(1,)`` with ``virtual``): every phase's
    programs, the phases in order. Program ``p`` runs programs ``p, p + P, ...`` of each
    phase; on a GPU a grid barrier separates the phases, ``virtual`` runs the ``P``
    programs' shares in turn with no barrier (interpret mode)."""
    from jax.experimental import pallas as pl

    def share(pid, ph: Phase) -> None:  # program pid's part of a phase: pid, pid + P, ...
        rounds = (ph.count - pid + programs - 1) // programs  # 0 for pid >= count

        def one(r, c):
            ph.body(pid + r * programs)
            return c

        jax.lax.fori_loop(0, rounds, one, 0)

    for s, ph in enumerate(phases):
        if virtual:  # the programs in turn, each its own share
            jax.lax.fori_loop(0, programs, lambda pid, c, ph=ph: (share(pid, ph), c)[1], 0)
            continue
        share(pl.program_id(0), ph)
        if s + 1 < len(phases):
            arrive(counter_ref)
            wait(counter_ref, (s + 1) * programs)


def _placement(virtual: bool | None, programs: int | None, rows: int | None
               ) -> tuple[bool, int, Callable[[int], tuple[int, int] | None]]:
    """``(virtual, programs, blocks)`` with the defaults filled in: virtual in interpret
    mode or off a GPU; one program per SM on a GPU (one in turn when virtual); ``blocks(K)``
    the one-row kernel's ``(BK, BN)`` for a contraction of K: the separate kernels' BK and
    ``rows`` rows (None: their own tiles)."""
    if virtual is None:
        virtual = interpret_mode() or jax.default_backend() != "gpu"
    if programs is None:
        programs = 1 if virtual else device_programs()

    def blocks(k: int) -> tuple[int, int] | None:
        return None if rows is None else (gemv.tiles(k)[0], rows)

    return virtual, programs, blocks


def _launch(kernel: Callable[..., None], inputs: dict[str, Any], buffers: dict[str, Any], *,
            programs: int, virtual: bool, phases: int,
            name: str) -> tuple[Array, Array, Array]:
    """One persistent layer launch: ``inputs`` (with ``cache`` and ``h0``, updated in place)
    and the phases' ``buffers`` (``out`` among them), plus the barrier counter. Returns
    ``(out, new_cache, final)``, all NaN where a barrier gave up (the values, the cache and
    the state alike: a bad state must not feed later steps)."""
    out = named_pallas_call(
        kernel, inputs={**inputs, "count0": jnp.zeros((1,), jnp.int32)},
        outputs={**buffers,
                 "new_cache": jax.ShapeDtypeStruct(inputs["cache"].shape,
                                                   inputs["cache"].dtype),
                 "final": jax.ShapeDtypeStruct(inputs["h0"].shape, inputs["h0"].dtype),
                 "counter": jax.ShapeDtypeStruct((1,), jnp.int32)},
        aliases={"cache": "new_cache", "h0": "final", "count0": "counter"},
        grid=(1 if virtual else programs,), interpret=interpret_mode(),
        compiler_params=None if interpret_mode() else compiler_params(4, 3), name=name)
    results = out["out"], out["new_cache"], out["final"]
    if virtual:
        return results
    ok = launch_ok(out["counter"], programs, phases)
    return tuple(jnp.where(ok, r, jnp.nan).astype(r.dtype) for r in results)


# ---- the DeltaNet-family + SwiGLU layer ------------------------------------------------


_GEMV_REFS = ("x_ref", "add_ref", "scale_ref", "gate_ref", "w_ref", "res_ref", "res_add_ref",
              "cache_ref", "cw_ref", "cb_ref", "y_ref", "new_cache_ref")


def _gemv(st: Any, j: Array, **refs: Any) -> None:
    """Program ``j`` of a one-row matmul kernel (``gemv._kernel``) on the given refs (the
    others absent)."""
    gemv._kernel(**{name: refs.get(name) for name in _GEMV_REFS}, st=st, j=j)


@dataclasses.dataclass(frozen=True)
class DeltaMlpStatics:
    """The five kernels' static parts (as their separate launches build them)."""

    proj: Any  # gemv._Static: pre-norm, input projection, short conv
    layer: DeltaLayerSpec  # the layer kernel (no conv, o written unnormalised)
    out: Any  # gemv._Static: per-head norm and gate, o_proj
    gate_up: Any  # gemv._Static: x + h, RMSNorm, gate | up, SwiGLU
    down: Any  # gemv._Static: down, (x + h) + .


def _kernel(*, x_ref, n1_ref, w_in_ref, cache_ref, cw_ref, cb_ref, h0_ref, a_log_ref,
            dt_bias_ref, o_scale_ref, w_o_ref, n2_ref, w_gu_ref, w_dn_ref, count0_ref,
            proj_ref, o_ref, h_ref, hid_ref, out_ref, new_cache_ref, final_ref, counter_ref,
            st: DeltaMlpStatics, programs: int, virtual: bool):
    from jax.experimental import pallas as pl

    del count0_ref  # aliased to counter_ref
    sp = st.layer
    zero, blocks = jnp.int32(0), jnp.int32(sp.value_blocks)
    conv = dict(cache_ref=cache_ref, cw_ref=cw_ref, cb_ref=cb_ref, new_cache_ref=new_cache_ref)

    def projection(j):
        _gemv(st.proj, j, x_ref=x_ref, scale_ref=n1_ref, w_ref=w_in_ref, y_ref=proj_ref, **conv)

    def layer(i):
        _delta_kernel(proj_ref=proj_ref, cache_ref=None, w_ref=None, bias_ref=None,
                      h0_ref=h0_ref, a_log_ref=a_log_ref, dt_bias_ref=dt_bias_ref,
                      scale_ref=o_scale_ref, y_ref=o_ref, new_cache_ref=None,
                      final_ref=final_ref, sp=sp,
                      # lax.div / rem (i >= 0): the Triton lowering of jnp's floor
                      # remainder fails on its sign fix-up (i1 against i32)
                      ids=(zero, jax.lax.div(i, blocks), jax.lax.rem(i, blocks)))

    def out_proj(j):
        _gemv(st.out, j, x_ref=o_ref, scale_ref=o_scale_ref, w_ref=w_o_ref, y_ref=h_ref,
              gate_ref=proj_ref if sp.output_gate else None)

    def gate_up(j):
        _gemv(st.gate_up, j, x_ref=x_ref, add_ref=h_ref, scale_ref=n2_ref, w_ref=w_gu_ref,
              y_ref=hid_ref)

    def down(j):
        _gemv(st.down, j, x_ref=hid_ref, res_ref=x_ref, res_add_ref=h_ref, w_ref=w_dn_ref,
              y_ref=out_ref)

    def grid(s):
        return pl.cdiv(s.width, s.block_n)

    run_phases([Phase(grid(st.proj), projection), Phase(sp.heads * sp.value_blocks, layer),
                Phase(grid(st.out), out_proj), Phase(grid(st.gate_up), gate_up),
                Phase(grid(st.down), down)], programs=programs, counter_ref=counter_ref,
               virtual=virtual)


def delta_mlp_layer(x: Array, *, norm1_scale: Array, norm1_eps: float, w_in_t: Array,
                    conv_cache: Array, conv_weight: Array, conv_bias: Array | None,
                    spec: DeltaLayerSpec, state: Array, a_log: Array | None,
                    dt_bias: Array | None, o_norm_scale: Array, o_norm_eps: float,
                    w_o_t: Array, norm2_scale: Array, norm2_eps: float, w_gu_t: Array,
                    w_down_t: Array, programs: int | None = None,
                    virtual: bool | None = None,
                    rows: int | None = None) -> tuple[Array, Array, Array]:
    """One batch-1 token through a pre-norm DeltaNet-family layer and its SwiGLU MLP.

    The same computation as the five separate kernels of the fused decode path
    (``modules.common.conv_dense``, ``delta_layer_step``, ``head_normed_dense``,
    ``SwiGLU.residual_step``): ``h = o_proj(norm_o(layer(conv(norm1(x) W_in))))``, then
    ``(x + h) + down(silu(gate) * up)`` of ``norm2(x + h)``.

    Args:
        x: ``[1, D]`` residual stream in the compute dtype.
        norm1_scale, norm2_scale: ``[D]`` RMSNorm scales (epsilons beside them).
        w_in_t: ``[F, D]`` the fused input projection, transposed (q | k | v | beta |
            decay | output gate columns as rows).
        conv_cache: ``[1, W - 1, C]`` the short conv's cache over the first C = 2HK + HV
            rows' outputs; conv_weight ``[W, C]``, conv_bias ``[C]`` or None.
        spec: the layer kernel's spec as the block's batch-1 path makes it (no conv:
            ``conv_width=None``; ``norm_out=False``).
        state: ``[1, H, K, V]`` float32; a_log, dt_bias: ``[H]`` (gated) or None.
        o_norm_scale: ``[V]`` the per-head output norm's scale (epsilon beside it).
        w_o_t: ``[D, HV]``; w_gu_t: ``[2M, D]`` (gate rows then up rows); w_down_t
            ``[D, M]``.
        programs: the grid on a GPU (default one per SM: :func:`device_programs`).
        virtual: run every phase's programs in turn, no barriers (default: in interpret
            mode).
        rows: rows of ``W^T`` per projection program (a power of two; :class:`
            PersistentConfig`); None: the separate kernels' own tiles (2).

    Returns:
        ``(out [1, D], new conv cache, new state [1, H, K, V] float32)``; the cache and the
        state are updated in place (their buffers are the outputs').

    Raises:
        ValueError: a spec with a conv or with the output norm in the layer kernel, a batch
            other than 1, or operands whose shapes disagree (named).
    """
    if spec.conv_width is not None or spec.norm_out:
        raise ValueError("spec: expected conv_width=None and norm_out=False (the conv in the "
                         f"input projection, the output norm in o_proj), got {spec}")
    depth = x.shape[-1]
    if x.ndim != 2 or x.shape[0] != 1:
        raise ValueError(f"x: expected [1, D], got shape {tuple(x.shape)}")
    hv = spec.heads * spec.value_dim
    width = conv_weight.shape[0]
    checks = (("w_in_t", w_in_t, (spec.width, depth)), ("w_o_t", w_o_t, (depth, hv)),
              ("conv_cache", conv_cache, (1, width - 1, spec.qkv_width)),
              ("conv_weight", conv_weight, (width, spec.qkv_width)),
              ("state", state, (1, spec.heads, spec.key_dim, spec.value_dim)),
              ("norm1_scale", norm1_scale, (depth,)), ("norm2_scale", norm2_scale, (depth,)),
              ("o_norm_scale", o_norm_scale, (spec.value_dim,)),
              ("w_down_t", w_down_t, (depth, w_gu_t.shape[0] // 2)))
    for name, arr, shape in checks:
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(arr.shape)}")
    if w_gu_t.ndim != 2 or w_gu_t.shape[1] != depth or w_gu_t.shape[0] % 2:
        raise ValueError(f"w_gu_t: expected [2M, D={depth}], got {tuple(w_gu_t.shape)}")
    dtype = jnp.dtype(w_in_t.dtype)
    channels = conv_cache.shape[-1]
    if rows is not None and (rows < 1 or rows & (rows - 1) or channels % rows):
        raise ValueError(f"rows: expected a power of two dividing the conv's C={channels}, "
                         f"got {rows}")
    virtual, programs, blocks = _placement(virtual, programs, rows)

    st = DeltaMlpStatics(
        proj=gemv.static_for(depth, spec.width, conv_cache, conv_weight, glu=False,
                             norm_eps=float(norm1_eps), out_dtype=dtype, blocks=blocks(depth)),
        layer=spec,
        out=gemv.static_for(hv, depth, None, None, glu=False, norm_eps=float(o_norm_eps),
                            out_dtype=dtype, group=spec.value_dim,
                            gate_offset=spec.gate_offset if spec.output_gate else None,
                            blocks=blocks(hv)),
        gate_up=gemv.static_for(depth, w_gu_t.shape[0], None, None, glu=True,
                                norm_eps=float(norm2_eps), out_dtype=dtype,
                                blocks=blocks(depth)),
        down=gemv.static_for(w_down_t.shape[1], depth, None, None, glu=False, norm_eps=None,
                             out_dtype=dtype, blocks=blocks(w_down_t.shape[1])))
    row = functools.partial(jax.ShapeDtypeStruct, dtype=dtype)
    return _launch(
        functools.partial(_kernel, st=st, programs=programs, virtual=virtual),
        {"x": x, "n1": norm1_scale, "w_in": w_in_t, "cache": conv_cache, "cw": conv_weight,
         "cb": conv_bias, "h0": state, "a_log": a_log, "dt_bias": dt_bias,
         "o_scale": o_norm_scale, "w_o": w_o_t, "n2": norm2_scale, "w_gu": w_gu_t,
         "w_dn": w_down_t},
        {"proj": row((1, spec.width)), "o": row((1, hv)), "h": row((1, depth)),
         "hid": row((1, w_gu_t.shape[0] // 2)), "out": row((1, depth))},
        programs=programs, virtual=virtual, phases=5, name="delta_mlp_layer_persistent")


def delta_mlp_layer_separate(x: Array, *, norm1_scale: Array, norm1_eps: float,
                             w_in_t: Array, conv_cache: Array, conv_weight: Array,
                             conv_bias: Array | None, spec: DeltaLayerSpec, state: Array,
                             a_log: Array | None, dt_bias: Array | None, o_norm_scale: Array,
                             o_norm_eps: float, w_o_t: Array, norm2_scale: Array,
                             norm2_eps: float, w_gu_t: Array, w_down_t: Array,
                             layer_fallback: Callable[..., Any]) -> tuple[Array, Array, Array]:
    """:func:`delta_mlp_layer` as the five separate kernels the fused decode path launches
    (each differentiable through its own reference), on the same operands: the persistent
    kernel's backward pass, and what the tests hold it to. ``layer_fallback``: the layer
    kernel's reference (``delta_layer_step``'s ``fallback``)."""
    from linearnexus.kernels.fused_decode.api import delta_layer_step

    proj, cache = gemv.one_row_conv(x, w_in_t, conv_cache, conv_weight, conv_bias,
                                    transposed=True, norm_scale=norm1_scale,
                                    norm_eps=norm1_eps)  # [1, F], [1, W-1, C]
    o, _, final = delta_layer_step(spec, proj, None, None, None, state, a_log, dt_bias,
                                   o_norm_scale, fallback=layer_fallback)  # [1, HV]
    h = gemv.one_row_group_norm(o, w_o_t, group=spec.value_dim, norm_scale=o_norm_scale,
                                norm_eps=o_norm_eps, gate=proj if spec.output_gate else None,
                                gate_offset=spec.gate_offset if spec.output_gate else 0,
                                transposed=True)  # [1, D]
    hidden = gemv.one_row_fused(x, w_gu_t, transposed=True, glu=True, add=h,
                                norm_scale=norm2_scale, norm_eps=norm2_eps)  # [1, M]
    out = gemv.one_row_fused(hidden, w_down_t, transposed=True, residual=x,
                             residual_add=h)  # [1, D]
    return out, cache, final


# ---- the Mamba2 layer (no MLP) ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SsdStatics:
    """The three kernels' static parts (as their separate launches build them)."""

    proj: Any  # gemv._Static: pre-norm, in_proj, short conv over x | B | C
    layer: SsdLayerSpec  # the layer kernel (no conv)
    out: Any  # gemv._Static: gated RMSNorm (over y * silu(z)), out_proj, + x


def _ssd_persistent_kernel(*, x_ref, n1_ref, w_in_ref, cache_ref, cw_ref, cb_ref, h0_ref,
                           a_log_ref, dt_bias_ref, d_ref, n_out_ref, w_out_ref, count0_ref,
                           proj_ref, y_ref, out_ref, new_cache_ref, final_ref, counter_ref,
                           st: SsdStatics, programs: int, virtual: bool):
    from jax.experimental import pallas as pl

    del count0_ref  # aliased to counter_ref
    zero = jnp.int32(0)
    conv = dict(cache_ref=cache_ref, cw_ref=cw_ref, cb_ref=cb_ref, new_cache_ref=new_cache_ref)

    def projection(j):
        _gemv(st.proj, j, x_ref=x_ref, scale_ref=n1_ref, w_ref=w_in_ref, y_ref=proj_ref, **conv)

    def layer(h):
        _ssd_kernel(proj_ref=proj_ref, cache_ref=None, w_ref=None, bias_ref=None,
                    h0_ref=h0_ref, a_log_ref=a_log_ref, dt_bias_ref=dt_bias_ref, d_ref=d_ref,
                    y_ref=y_ref, new_cache_ref=None, final_ref=final_ref, sp=st.layer,
                    ids=(zero, h))

    def out_proj(j):
        _gemv(st.out, j, x_ref=y_ref, scale_ref=n_out_ref, w_ref=w_out_ref, res_ref=x_ref,
              y_ref=out_ref)

    def grid(s):
        return pl.cdiv(s.width, s.block_n)

    run_phases([Phase(grid(st.proj), projection), Phase(st.layer.heads, layer),
                Phase(grid(st.out), out_proj)], programs=programs, counter_ref=counter_ref,
               virtual=virtual)


def ssd_layer(x: Array, *, norm1_scale: Array, norm1_eps: float, w_in_t: Array,
              conv_cache: Array, conv_weight: Array, conv_bias: Array | None,
              spec: SsdLayerSpec, state: Array, a_log: Array, dt_bias: Array, d: Array,
              out_norm_scale: Array, out_norm_eps: float, w_out_t: Array,
              programs: int | None = None, virtual: bool | None = None,
              rows: int | None = None) -> tuple[Array, Array, Array]:
    """One batch-1 token through a pre-norm Mamba2 layer without an MLP, in one kernel.

    The same computation as the three separate kernels of the fused decode path
    (``conv_dense``, ``ssd_layer_step``, ``normed_dense``) and the residual sum:
    ``x + out_proj(gated_norm(ssd(conv(norm1(x) W_in))))``.

    Args:
        x: ``[1, D]``; norm1_scale ``[D]``; w_in_t ``[F, D]`` (z | x | B | C | dt rows).
        conv_cache: ``[1, W - 1, C]`` over x | B | C (``C = E + 2GN``, from row E on);
            conv_weight ``[W, C]``, conv_bias ``[C]`` or None.
        spec: the layer kernel's spec without a conv (``conv_width=None``).
        state: ``[1, H, N, P]`` float32; a_log, dt_bias ``[H]``; d ``[H]`` or ``[H, P]``.
        out_norm_scale: ``[E]`` the gated RMSNorm's scale (over the whole row).
        w_out_t: ``[D, E]``.
        programs, virtual, rows: as :func:`delta_mlp_layer`.

    Returns:
        ``(x + out [1, D], new conv cache, new state)``, the last two in place.

    Raises:
        ValueError: a spec with a conv, a batch other than 1, operands whose shapes
            disagree, or ``rows`` that do not tile the conv's channels (named).
    """
    if spec.conv_width is not None:
        raise ValueError(f"spec: expected conv_width=None (the conv in in_proj), got {spec}")
    depth = x.shape[-1]
    if x.ndim != 2 or x.shape[0] != 1:
        raise ValueError(f"x: expected [1, D], got shape {tuple(x.shape)}")
    for name, arr, shape in (("w_in_t", w_in_t, (spec.width, depth)),
                             ("w_out_t", w_out_t, (depth, spec.inner)),
                             ("state", state, (1, spec.heads, spec.d_state, spec.head_dim)),
                             ("norm1_scale", norm1_scale, (depth,)),
                             ("out_norm_scale", out_norm_scale, (spec.inner,)),
                             ("conv_cache", conv_cache, (1, conv_cache.shape[1],
                                                         spec.conv_channels))):
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(arr.shape)}")
    dtype = jnp.dtype(w_in_t.dtype)
    if rows is not None and (rows < 1 or rows & (rows - 1) or spec.conv_channels % rows
                             or spec.inner % rows):
        raise ValueError(f"rows: expected a power of two dividing the conv's start E="
                         f"{spec.inner} and C={spec.conv_channels}, got {rows}")
    virtual, programs, blocks = _placement(virtual, programs, rows)

    st = SsdStatics(
        proj=gemv.static_for(depth, spec.width, conv_cache, conv_weight, glu=False,
                             norm_eps=float(norm1_eps), out_dtype=dtype,
                             conv_start=spec.inner, blocks=blocks(depth)),
        layer=spec,
        out=gemv.static_for(spec.inner, depth, None, None, glu=False,
                            norm_eps=float(out_norm_eps), out_dtype=dtype,
                            blocks=blocks(spec.inner)))
    return _launch(
        functools.partial(_ssd_persistent_kernel, st=st, programs=programs, virtual=virtual),
        {"x": x, "n1": norm1_scale, "w_in": w_in_t, "cache": conv_cache, "cw": conv_weight,
         "cb": conv_bias, "h0": state, "a_log": a_log, "dt_bias": dt_bias, "d": d,
         "n_out": out_norm_scale, "w_out": w_out_t},
        {"proj": jax.ShapeDtypeStruct((1, spec.width), dtype),
         "y": jax.ShapeDtypeStruct((1, spec.inner), F32),
         "out": jax.ShapeDtypeStruct((1, depth), dtype)},
        programs=programs, virtual=virtual, phases=3, name="ssd_layer_persistent")


def ssd_layer_separate(x: Array, *, norm1_scale: Array, norm1_eps: float, w_in_t: Array,
                       conv_cache: Array, conv_weight: Array, conv_bias: Array | None,
                       spec: SsdLayerSpec, state: Array, a_log: Array, dt_bias: Array,
                       d: Array, out_norm_scale: Array, out_norm_eps: float, w_out_t: Array,
                       layer_fallback: Callable[..., Any]) -> tuple[Array, Array, Array]:
    """:func:`ssd_layer` as the separate kernels and the residual sum (its backward pass,
    and what the tests hold it to)."""
    from linearnexus.kernels.fused_decode.api import ssd_layer_step

    proj, cache = gemv.one_row_conv(x, w_in_t, conv_cache, conv_weight, conv_bias,
                                    conv_start=spec.inner, transposed=True,
                                    norm_scale=norm1_scale, norm_eps=norm1_eps)  # [1, F]
    y, _, final = ssd_layer_step(spec, proj, None, None, None, state, a_log, dt_bias, d,
                                 fallback=layer_fallback)  # [1, E] float32
    h = gemv.one_row_fused(y, w_out_t, transposed=True, norm_scale=out_norm_scale,
                           norm_eps=out_norm_eps)  # [1, D]
    return x + h, cache, final


def input_operands(x: Array, input_norm: Any, w_in_t: Array, conv: Any, conv_cache: Array,
                   state: Array) -> dict[str, Any]:
    """The operands every persistent layer kernel takes first, from a block's batch-1 call:
    the residual row ``x [1, 1, D]`` as ``[1, D]``, the pre-norm's scale, the input
    projection's transposed weight, the short conv (``modules.common.ShortConv``: weight,
    bias or None) and its cache, and the recurrent state (float32, or a 16-bit decode state
    as it is: ``api.kept_state_dtype``)."""
    from linearnexus.kernels.fused_decode.api import kept_state_dtype

    return dict(x=x.reshape(1, x.shape[-1]), norm1_scale=input_norm.scale[...], w_in_t=w_in_t,
                conv_cache=conv_cache, conv_weight=conv.conv_weight[...],
                conv_bias=None if conv.conv_bias is None else conv.conv_bias[...],
                state=kept_state_dtype(state))


def layer_call(kernel: Callable[..., Any], separate: Callable[..., Any],
               operands: dict[str, Any], *, tiled: Sequence[int],
               layer_fallback: Callable[..., Any], **statics: Any
               ) -> tuple[Array, Array, Array] | None:
    """A block's persistent layer: ``kernel(**operands, **statics)`` (:func:`delta_mlp_layer`
    or :func:`ssd_layer`) at :func:`persistent_config`'s tiles, differentiated as
    ``separate`` (the separate kernels, the layer kernel's backward from
    ``layer_fallback``); None where ``rows`` does not divide every size in ``tiled`` (the
    caller then runs the separate kernels)."""
    from linearnexus.kernels.common.pallas import with_reference_vjp

    config = persistent_config()
    if any(size % config.rows for size in tiled):
        return None
    names = tuple(operands)
    tiles = dict(rows=config.rows,
                 programs=None if interpret_mode() else config.per_sm * device_programs())

    def fused(*a):
        return kernel(**dict(zip(names, a, strict=True)), **statics, **tiles)

    def reference(*a):
        return separate(**dict(zip(names, a, strict=True)), **statics,
                        layer_fallback=layer_fallback)

    return with_reference_vjp(fused, reference, *operands.values())


__all__ = ["CONFIG_ENV", "PERSISTENT_ENV", "DeltaMlpStatics", "PersistentConfig", "Phase",
           "SsdStatics", "arrive", "delta_mlp_layer", "delta_mlp_layer_separate",
           "device_programs", "input_operands", "launch_ok", "layer_call", "persistent_config",
           "persistent_enabled", "run_phases", "ssd_layer", "ssd_layer_separate", "wait"]
