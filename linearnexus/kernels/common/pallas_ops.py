"""The ``pallas`` backend of the chunked linear-attention ops: layout glue around the core.

The Pallas kernels (``pallas_chunk.py``) work in the chunk layout ``[R, NC * L, H, D]``
with power-of-two head dims; this module gets inputs there and back:

* batch inputs are padded at the end to whole chunks (no copy when T is a multiple of L);
  packed inputs (``cu_seqlens``) are gathered so each sequence starts on a fresh chunk;
* head dims that are not powers of two >= 16 are zero-padded (zeros are inert);
* the delta rules' WY preparation (``w``, ``u``: the per-chunk triangular solve) is its own
  pair of Pallas kernels (``pallas_wy.py``), then the sequential core (``pallas_chunk.py``).

Decoding: a one-token call (``T == 1``, recurrent mode, no ``cu_seqlens``) on a GPU runs
the fused step kernel of ``pallas_step.py`` (one launch per layer, the input guard folded
in; ``LINEARNEXUS_FUSED_STEP=0`` turns it off); other recurrent-mode calls run the op's
pure-JAX recurrent form. The ``pallas_step`` backend names the fused step explicitly (any
platform; interpret mode off a GPU).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import jax.numpy as jnp

from linearnexus.core.types import Array, DType
from linearnexus.kernels.base import GridConfig, UnsupportedArgument
from linearnexus.kernels.common.chunking import plan_chunks, to_chunks
from linearnexus.kernels.common.pallas import TritonConfig, interpret_mode, next_pow2
from linearnexus.kernels.common.pallas_chunk import (
    CoreStatic,
    chunk_core,
    chunk_layout_info,
    default_config,
)
from linearnexus.kernels.common.pallas_step import StepSpec, fused_step_enabled, linear_step
from linearnexus.kernels.common.pallas_wy import WyStatic, wy_prepare

F32 = jnp.float32
#: warps of the parallel kernels (whole 64 x 128 tiles); module-level so benchmarks can sweep it
PAR_WARPS = 4
#: log-gates below this are raised to it before the kernels: ``e^-105`` is 0 in float32, so a
#: gate of exactly 0 (``g = -inf``, a hard reset of the state) keeps its meaning, where the
#: in-chunk sums would otherwise form ``-inf - -inf`` (NaN everywhere after it). Gradients
#: with respect to such gates are 0, as the reference's.
LOG_GATE_FLOOR = -105.0
_SUPPORTED = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def floor_log_gate(g: Array, mark_positive: bool = False) -> Array:
    """``g`` (float32) with every entry below :data:`LOG_GATE_FLOOR` (``-inf`` included) raised
    to it; NaN stays NaN. ``mark_positive``: a positive log-gate (not a decay) becomes NaN,
    which then reaches the state and its final value (the Mosaic walks, whose final state
    marks every bad input for the api's guard: ``mosaic_chunk``'s "Finite outputs")."""
    g = g.astype(F32)
    floored = jnp.maximum(g, LOG_GATE_FLOOR)
    if not mark_positive:
        return floored
    # g <= 0 is false for NaN too, whatever max does with it (Triton's maxnumf drops NaN).
    # The mark is ADDED, a constant: the gradient still reaches a bad gate through the max
    # (a where selecting NaN would give it a zero there, so the api guard's NaN cotangent
    # would leave a finite dg at exactly the bad entry)
    return floored + jnp.where(g <= 0, 0.0, jnp.nan)


def check_pallas_dtype(op: str, *arrays: Array) -> None:
    """Raise ``NotImplementedError`` for dtypes the Triton kernels do not take (float64)."""
    for a in arrays:
        if a is not None and jnp.dtype(a.dtype) not in _SUPPORTED:
            raise NotImplementedError(
                f"{op}: the pallas backend takes float32 / bfloat16 / float16 inputs, got "
                f"{a.dtype}; use backend='jax' (chunked) or 'naive' for {a.dtype}")


def _pad_last(x: Array | None, size: int) -> Array | None:
    if x is None or x.shape[-1] == size:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _layout(x: Array, plan) -> Array:
    """``[B, T, H, ...]`` -> ``[R, NC * L, H, ...]`` with zero padding slots."""
    c = to_chunks(x, plan)  # [R, NC, L, H, ...]
    return c.reshape(plan.rows, plan.n_chunks * plan.chunk, *c.shape[3:])


def _unlayout(y: Array, plan) -> Array:
    """``[R, NC * L, H, ...]`` -> ``[B, T, H, ...]``."""
    if not plan.packed:
        return y[:, : plan.seq]
    return jnp.take(y[0], plan.dst, axis=0)[None]


def _chunk_of(config: TritonConfig | None, chunk_size: int | None) -> TritonConfig:
    """``config`` with ``chunk`` set: the config's own, else ``chunk_size``, else 64."""
    cfg = config or TritonConfig()
    if cfg.chunk is None:
        chunk = 64 if chunk_size is None else chunk_size
        if chunk < 16 or chunk & (chunk - 1):
            raise UnsupportedArgument(
                f"chunk_size: the pallas backend needs a power of two >= 16, got {chunk}")
        cfg = dataclasses.replace(cfg, chunk=chunk)
    return cfg


def _resolve(cfg: TritonConfig, *, rows, heads, key_dim, value_dim, delta, dtype,
             n_chunks: int = 64) -> TritonConfig:
    """Fill ``cfg``'s None fields from the heuristic and check the blocks fit the shape."""
    cfg = cfg.merged(default_config(rows=rows, heads=heads, key_dim=key_dim, value_dim=value_dim,
                                    delta=delta, n_chunks=n_chunks, dtype=dtype))
    if key_dim % cfg.block_k or value_dim % cfg.block_v:
        raise ValueError(f"config: block_k={cfg.block_k} / block_v={cfg.block_v} must divide the "
                         f"padded head dims K={key_dim} / V={value_dim}")
    if delta and cfg.block_k != key_dim:
        raise ValueError(f"config: the delta rules need block_k == K ({key_dim}), got {cfg.block_k}")
    if cfg.par_block_k is not None and key_dim % cfg.par_block_k:
        raise ValueError(f"config: par_block_k={cfg.par_block_k} must divide the padded key dim "
                         f"K={key_dim}")
    return cfg


def _static(cfg: TritonConfig, *, gate, delta, has_h0, scale, plan, heads, key_dim, value_dim,
            n_seqs) -> CoreStatic:
    return CoreStatic(gate=gate, delta=delta, has_h0=has_h0, scale=float(scale), rows=plan.rows,
                      n_chunks=plan.n_chunks, chunk=plan.chunk, heads=heads, key_dim=key_dim,
                      value_dim=value_dim, n_seqs=n_seqs, block_k=cfg.block_k, block_v=cfg.block_v,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages, interpret=interpret_mode(),
                      par_block_k=cfg.par_block_k or par_block_k(key_dim, delta=delta,
                                                                 gated=gate == "scalar"),
                      par_block_v=min(value_dim, 128), par_warps=PAR_WARPS, packed=plan.packed)


def par_block_k(key_dim: int, *, delta: bool, gated: bool) -> int:
    """K block of the parallel kernels (``fwd_o``, ``bwd_dv``, ``bwd_dqk``).

    Whole K up to 128, so ``q k^T`` is formed once per chunk; 64 for the delta rules when
    ``bwd_dqk`` holds the gate-gradient terms besides its three ``[L, K]`` accumulators, or
    when K = 256. Measured on an H200 (bf16, fwd+bwd, 2026-11-23): gated_delta_rule at
    (8, 4096, 16, 128) 4.22 -> 3.55 ms (``bwd_dqk`` alone 1.42 ms at 255 registers per
    thread, against 0.49 ms ungated), at (1, 8192, 96, 128) 7.30 -> 6.20 ms; the ungated rule
    is faster whole (2.85 vs 2.91 ms); at K = 256 10.4 -> 10.0 ms (ungated), 13.3 -> 11.8 ms
    (gated). ``TritonConfig(par_block_k=...)`` overrides it.

    Eight warps for ``bwd_dqk`` remove its spills (194 registers, none, where 4 warps compile
    to 255 and 192 bytes of spills) but were slower on the H200 (session 8, fwd+bwd at
    (2, 16384, 16, 128): ``bwd_dqk`` 0.50 -> 0.64 ms ungated, 0.77 -> 1.20 ms gated; whole op
    2.64 -> 2.77 / 2.87 -> 3.28 ms), and the gated rule at K blocks of 128 with 8 warps was
    slower too (3.20 ms): all parallel kernels keep 4 warps.
    """
    if delta and (gated or key_dim >= 256):
        return min(key_dim, 64)
    return min(key_dim, 128)


def _prepare(q, k, v, initial_state, cu_seqlens, chunk: int):
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[3]
    plan = plan_chunks(batch, seq, chunk, cu_seqlens)
    kp, vp = next_pow2(key_dim), next_pow2(value_dim)
    h0 = initial_state
    if h0 is not None:
        h0 = jnp.pad(h0.astype(F32), [(0, 0), (0, 0), (0, kp - key_dim), (0, vp - value_dim)])
    n_seqs = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return plan, kp, vp, h0, n_seqs


def _run_chunked(name: str, q: Array, k: Array, v: Array, g: Array | None, beta: Array | None, *,
                 scale: float, initial_state: Array | None, cu_seqlens: Array | None,
                 chunk_size: int | None, config: TritonConfig | None) -> tuple[Array, Array]:
    """The glue both public functions share: layout in, (WY preparation,) core, layout out.

    ``beta`` given means the delta rule (``g`` then optional); otherwise gated linear
    attention with a scalar gate ``g`` (or none).
    """
    delta = beta is not None
    check_pallas_dtype(name, q, k, v, g, beta)
    heads, key_dim, value_dim = q.shape[2], q.shape[3], v.shape[3]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    cfg = _chunk_of(config, chunk_size)
    plan, kp, vp, h0, n_seqs = _prepare(q, k, v, initial_state, cu_seqlens, cfg.chunk)
    cfg = _resolve(cfg, rows=plan.rows, heads=heads, key_dim=kp, value_dim=vp, delta=delta,
                   dtype=dtype, n_chunks=plan.n_chunks)
    qc = _layout(_pad_last(q.astype(dtype), kp), plan)
    kc = _layout(_pad_last(k.astype(dtype), kp), plan)
    vc = _layout(_pad_last(v.astype(dtype), vp), plan)
    gc = None if g is None else _layout(floor_log_gate(g), plan)
    w = None
    if delta:  # the values the core sees are u; w corrects them by the entering state
        wst = WyStatic(gated=g is not None, rows=plan.rows, n_chunks=plan.n_chunks,
                       chunk=plan.chunk, heads=heads, key_dim=kp, value_dim=vp,
                       exact=dtype == F32, num_warps=8 if max(kp, vp) >= 256 else 4,
                       interpret=interpret_mode())
        # k passes through so that the core's dk is added inside the WY backward kernel
        w, vc, kc = wy_prepare(wst, kc, vc, _layout(beta, plan), gc)
    seq_info, flags = chunk_layout_info(plan)
    st = _static(cfg, gate="none" if g is None else "scalar", delta=delta, has_h0=h0 is not None,
                 scale=scale, plan=plan, heads=heads, key_dim=kp, value_dim=vp, n_seqs=n_seqs)
    o, final = chunk_core(st, qc, kc, vc, w, gc, h0, seq_info, flags)
    o = _unlayout(o, plan)[..., :value_dim].astype(v.dtype)
    return o, final[:, :, :key_dim, :value_dim]


def linear_attention_pallas(q: Array, k: Array, v: Array, g: Array | None, *, scale: float,
                            initial_state: Array | None = None, cu_seqlens: Array | None = None,
                            chunk_size: int | None = None,
                            config: TritonConfig | None = None) -> tuple[Array, Array]:
    """Gated linear attention with a scalar gate (simple_gla) through the Pallas kernels.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``. g: ``[B, T, H]`` log-gates or None.
        scale: multiplies q. initial_state: ``[N, H, K, V]`` or None.
        cu_seqlens: ``[N+1]`` offsets of packed sequences (B == 1) or None.
        chunk_size: L (power of two >= 16); default from the heuristic (64).
        config: launch-knob overrides (:class:`TritonConfig`); None fields use the heuristic.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.
    """
    return _run_chunked("simple_gla", q, k, v, g, None, scale=scale, initial_state=initial_state,
                        cu_seqlens=cu_seqlens, chunk_size=chunk_size, config=config)


def delta_rule_pallas(q: Array, k: Array, v: Array, beta: Array, g: Array | None, *, scale: float,
                      initial_state: Array | None = None, cu_seqlens: Array | None = None,
                      chunk_size: int | None = None,
                      config: TritonConfig | None = None) -> tuple[Array, Array]:
    """The (gated) delta rule through the Pallas kernels.

    Args:
        q, k: ``[B, T, H, K]`` (k L2-normalised). v: ``[B, T, H, V]``. beta: ``[B, T, H]``.
        g: ``[B, T, H]`` log-gates, or None (ungated delta rule).
        Others: as :func:`linear_attention_pallas`.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.
    """
    name = "delta_rule" if g is None else "gated_delta_rule"
    return _run_chunked(name, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                        cu_seqlens=cu_seqlens, chunk_size=chunk_size, config=config)


class PallasKernel:
    """The ``pallas`` backend of a linear-attention op.

    Chunk mode runs the Pallas kernels (compiled through Triton on an NVIDIA GPU, Pallas
    interpret mode elsewhere); recurrent mode (decoding) runs the op's pure-JAX recurrent
    form. Automatic dispatch picks it on a GPU only, for float32 / bfloat16 / float16.

    Args:
        chunked: the op's pallas function, called as ``fn(*arrays, scale=..., initial_state=...,
            cu_seqlens=..., chunk_size=..., config=...)``.
        recurrent: the op's pure-JAX recurrent form.
        config: launch-knob overrides for every call (None: the heuristic).
    """

    name: ClassVar[str] = "pallas"

    def __init__(self, chunked: Callable[..., tuple[Array, Array]],
                 recurrent: Callable[..., tuple[Array, Array]], config: TritonConfig | None = None,
                 step: StepSpec | None = None):
        self.chunked = chunked
        self.recurrent = recurrent
        self.config = config
        self.step = step

    def step_ready(self, dtype: DType) -> bool:
        """Whether a one-token call runs the fused step kernel: compiled (a GPU, not interpret
        mode), a dtype it takes, and not turned off (``LINEARNEXUS_FUSED_STEP=0``)."""
        return (self.step is not None and fused_step_enabled() and not interpret_mode()
                and jnp.dtype(dtype) in _SUPPORTED)

    def fused_step(self, *arrays: Array, initial_state: Array | None, scale: float,
                   fallback: Callable[..., tuple[Array, Array]]) -> tuple[Array, Array]:
        """One token through :func:`pallas_step.linear_step` (the guard folded in)."""
        return linear_step(self.step, arrays, scale=scale, initial_state=initial_state,
                           fallback=fallback)

    def supports(self, *, platform: str, dtype: DType) -> bool:
        return platform == "gpu" and jnp.dtype(dtype) in _SUPPORTED

    def forward_chunk(self, *arrays: Array, initial_state: Array | None, grid: GridConfig,
                      **kwargs: Any) -> tuple[Array, Array]:
        config, cached = self.config, None
        if config is None:  # the tuning cache (benchmarks/run.py --tune), before the heuristic
            q, _, v = arrays[:3]
            op = self.chunked.__module__.split(".")[-2]  # kernels/<op>/<backend>.py
            config = cached = self.cached_config(op, (*q.shape, v.shape[-1]), q.dtype)

        def run(config):
            return self.chunked(*arrays, initial_state=initial_state, chunk_size=grid.chunk_size,
                                config=config, **kwargs)

        if cached is None:
            return run(config)
        try:
            return run(cached)
        except ValueError as err:
            # a cached config this call's shape, or this version's kernels, do not take (one
            # over a shared-memory budget that grew, say): the heuristic runs instead; a
            # config given by the caller still raises
            if not str(err).startswith("config"):
                raise
            warnings.warn(f"{self.name}: the tuning cache's {cached} does not fit this call "
                          f"({err}); the heuristic's config runs (benchmarks/run.py --tune "
                          "refreshes the cache)", stacklevel=2)
            return run(None)

    def cached_config(self, op: str, dims: tuple[int, ...], dtype: Any) -> TritonConfig | None:
        """This backend's tuning-cache entry for the call, or None."""
        from linearnexus.kernels import tuning

        return tuning.tuned_config(op, self.name, dims, dtype)

    def forward_recurrent(self, *arrays: Array, initial_state: Array | None,
                          **kwargs: Any) -> tuple[Array, Array]:
        return self.recurrent(*arrays, initial_state=initial_state, **kwargs)


class PallasStepKernel:
    """The ``pallas_step`` backend: the fused one-token step by name, on any platform
    (compiled on a GPU, interpret mode elsewhere). Never picked automatically (the ``pallas``
    backend runs the same kernel for one-token calls on a GPU); calls it cannot run (``T !=
    1``, ``cu_seqlens``) raise ``NotImplementedError``.

    Args:
        step: the op's gate kind and delta flag. recurrent: the op's pure-JAX recurrent form
            (its VJP is the step's backward pass).
    """

    name: ClassVar[str] = "pallas_step"
    #: what the feature table lists (it refuses every other call)
    modes: ClassVar[tuple[str, ...]] = ("recurrent, one token (T == 1)",)
    by_name_dtypes: ClassVar[tuple[DType, ...]] = (jnp.float32, jnp.bfloat16, jnp.float16)

    def __init__(self, step: StepSpec, recurrent: Callable[..., tuple[Array, Array]]) -> None:
        self.step = step
        self.recurrent = recurrent

    def supports(self, *, platform: str, dtype: DType) -> bool:
        return False

    def step_ready(self, dtype: DType) -> bool:
        return True

    def fused_step(self, *arrays: Array, initial_state: Array | None, scale: float,
                   fallback: Callable[..., tuple[Array, Array]]) -> tuple[Array, Array]:
        return linear_step(self.step, arrays, scale=scale, initial_state=initial_state,
                           fallback=fallback)

    def _refuse(self, arrays: tuple[Array, ...], cu_seqlens: Any) -> None:
        raise NotImplementedError(
            "backend 'pallas_step' runs one-token calls (T == 1, recurrent mode, no cu_seqlens); "
            f"got T={arrays[0].shape[1]}{' with cu_seqlens' if cu_seqlens is not None else ''}: "
            "use backend='pallas' or 'jax'")

    def forward_chunk(self, *arrays: Array, initial_state: Array | None, grid: GridConfig,
                      cu_seqlens: Any = None, **kwargs: Any) -> tuple[Array, Array]:
        self._refuse(arrays, cu_seqlens)

    def forward_recurrent(self, *arrays: Array, initial_state: Array | None,
                          cu_seqlens: Any = None, **kwargs: Any) -> tuple[Array, Array]:
        self._refuse(arrays, cu_seqlens)


def pallas_backends(chunked: Callable[..., tuple[Array, Array]],
                    recurrent: Callable[..., tuple[Array, Array]], step: StepSpec) -> dict[str, Any]:
    """``{"pallas": ..., "pallas_step": ...}`` for one linear-attention op."""
    return {"pallas": PallasKernel(chunked, recurrent, step=step),
            "pallas_step": PallasStepKernel(step, recurrent)}
