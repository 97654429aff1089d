"""Public entry point of the Mamba-1 selective scan, its backends and input validation."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from linearnexus.core.hooks import overridable
from linearnexus.core.mode import KernelMode
from linearnexus.core.types import Array, DType, is_float_dtype
from linearnexus.kernels.base import GridConfig, current_platform, dispatch, resolve_mode
from linearnexus.kernels.common.backends import JaxKernel, NaiveKernel
from linearnexus.kernels.common.pallas import TritonConfig
from linearnexus.kernels.common.validation import (
    as_cu_seqlens,
    check_cu_seqlens,
    cu_seqlens_ok,
)
from linearnexus.kernels.mamba.chunked import ChunkForm, default_chunk_form, selective_scan_chunked
from linearnexus.kernels.mamba.reference import selective_scan_reference

DEFAULT_CHUNK_SIZE = 16  # measured best on the CPU for the "scan" chunk form (docs/features/mamba.md)


def _chunked(x, dt, A, B, C, *, chunk_form: ChunkForm | None = None, **kwargs) -> tuple[Array, Array]:
    """The chunked form; ``chunk_form`` None picks the platform's best (``default_chunk_form``)."""
    form = chunk_form or default_chunk_form(current_platform())
    return selective_scan_chunked(x, dt, A, B, C, form=form, **kwargs)


def jax_backend(chunk_form: ChunkForm | None = None) -> JaxKernel:
    """The ``"jax"`` backend (``kernels/common/backends.py``): the chunked form in chunk mode
    (``chunk_form`` pins its variant; None: per platform), the per-step scan in recurrent mode."""
    return JaxKernel(functools.partial(_chunked, chunk_form=chunk_form), selective_scan_reference)


class MambaPallasKernel:
    """Pallas (Triton) GPU kernels in chunk mode (``pallas.py``); the per-step scan in recurrent mode.

    Claims float32 / bfloat16 / float16 on a GPU only, so automatic dispatch picks it there
    and keeps the pure-JAX path everywhere else. Asked for by name it runs on any platform
    (Pallas interpret mode off the GPU: slow, for tests). Recurrent (decoding) calls are a
    few tokens long: one-token calls on a GPU run the fused step kernel (``step.py``: one
    launch, the state read and written once; ``LINEARNEXUS_FUSED_STEP=0`` turns it off),
    others the reference per-step scan.

    Launch knobs, first set wins: ``grid.block_c`` / ``grid.num_warps`` / ``grid.num_stages``
    of the call, then this object's ``config``, then ``pallas.default_config`` (a heuristic
    on the shape). ``grid.chunk_size`` is the chunked-JAX form's knob and is not used here
    (``config.chunk``, a power of two >= 16, is the backward's time tile and checkpoint
    interval; the forward walks fixed 8-step sub-tiles).
    """

    name: ClassVar[str] = "pallas"
    dtypes: ClassVar[tuple[DType, ...]] = (jnp.float32, jnp.bfloat16, jnp.float16)
    #: chunk mode takes the raw ``dt`` with ``dt_bias`` / ``dt_softplus`` and applies them in
    #: the kernels (the other backends get the step size computed by the api)
    fuses_step_size: ClassVar[bool] = True

    def __init__(self, config: TritonConfig | None = None) -> None:
        if config is not None and not isinstance(config, TritonConfig):
            raise TypeError(f"config: expected TritonConfig or None, got {type(config).__name__}")
        self.config = config

    def supports(self, *, platform: str, dtype: DType) -> bool:
        return platform == "gpu" and jnp.dtype(dtype) in [jnp.dtype(d) for d in self.dtypes]

    def launch_config(self, grid: GridConfig, tuned: TritonConfig | None = None) -> TritonConfig:
        """This backend's config (else ``tuned``, the tuning cache's entry) with the call's
        explicit ``grid`` fields on top."""
        base = self.config or tuned or TritonConfig()
        if grid.block_c is not None and (grid.block_c < 16 or grid.block_c & (grid.block_c - 1)):
            raise ValueError(f"grid.block_c: the Pallas selective scan takes a power of two >= 16 "
                             f"channels per program, got {grid.block_c}")
        return dataclasses.replace(
            base,
            block_v=grid.block_c if grid.block_c is not None else base.block_v,
            num_warps=grid.num_warps if grid.num_warps is not None else base.num_warps,
            num_stages=grid.num_stages if grid.num_stages is not None else base.num_stages)

    def forward_chunk(self, x, dt, A, B, C, *, D=None, z=None, initial_state=None,
                      cu_seqlens=None, dt_bias=None, dt_softplus: bool = False,
                      grid: GridConfig) -> tuple[Array, Array]:
        from linearnexus.kernels import tuning
        from linearnexus.kernels.mamba.pallas import selective_scan_pallas  # imports Pallas

        tuned = None if self.config is not None else tuning.tuned_config(
            "mamba", self.name, (*x.shape, A.shape[1]), x.dtype)  # [B, T, C] + N
        return selective_scan_pallas(x, dt, A, B, C, D=D, z=z, initial_state=initial_state,
                                     cu_seqlens=cu_seqlens, dt_bias=dt_bias,
                                     dt_softplus=dt_softplus, config=self.launch_config(grid, tuned))

    def forward_recurrent(self, x, dt, A, B, C, *, D=None, z=None, initial_state=None,
                          cu_seqlens=None) -> tuple[Array, Array]:
        from linearnexus.kernels.common.pallas import interpret_mode
        from linearnexus.kernels.common.pallas_step import fused_step_enabled

        if (x.shape[1] == 1 and cu_seqlens is None and fused_step_enabled()
                and not interpret_mode()):  # decoding on a GPU: the fused one-token kernel
            from linearnexus.kernels.mamba.step import selective_scan_step

            return selective_scan_step(x, dt, A, B, C, D=D, z=z, initial_state=initial_state)
        return selective_scan_reference(x, dt, A, B, C, D=D, z=z, initial_state=initial_state,
                                        cu_seqlens=cu_seqlens)


class MambaStepKernel:
    """The ``pallas_step`` backend: the fused one-token kernel (``step.py``) by name, on any
    platform (interpret mode off a GPU); never picked automatically (``pallas`` runs it for
    one-token calls on a GPU). Other calls raise ``NotImplementedError``."""

    name: ClassVar[str] = "pallas_step"
    #: what the feature table lists (it refuses every other call)
    modes: ClassVar[tuple[str, ...]] = ("recurrent, one token (T == 1)",)
    by_name_dtypes: ClassVar[tuple[DType, ...]] = (jnp.float32, jnp.bfloat16, jnp.float16)

    def supports(self, *, platform: str, dtype: DType) -> bool:
        return False

    def forward_chunk(self, x, *args, cu_seqlens=None, **kwargs) -> tuple[Array, Array]:
        raise NotImplementedError("backend 'pallas_step' runs one-token calls (T == 1) in "
                                  "recurrent mode: use backend='pallas' or 'jax'")

    def forward_recurrent(self, x, dt, A, B, C, *, D=None, z=None, initial_state=None,
                          cu_seqlens=None) -> tuple[Array, Array]:
        from linearnexus.kernels.mamba.step import selective_scan_step

        if cu_seqlens is not None:
            raise NotImplementedError("backend 'pallas_step' runs one-token calls without "
                                      "cu_seqlens: use backend='pallas' or 'jax'")
        return selective_scan_step(x, dt, A, B, C, D=D, z=z, initial_state=initial_state)


BACKENDS = {"pallas": MambaPallasKernel(), "jax": jax_backend(),
            "naive": NaiveKernel(selective_scan_reference), "pallas_step": MambaStepKernel()}
# Preference order for automatic choice; the last entry is the always-available fallback.
BACKEND_ORDER = ("pallas", "jax", "naive")


def _check(name: str, array: Array | None, shape: tuple[int, ...], legend: str) -> None:
    if array is None:
        return
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} {legend}, got {tuple(array.shape)}")
    if not is_float_dtype(array.dtype):
        raise TypeError(f"{name}: expected a float dtype, got {array.dtype}")


def validate_selective_scan_inputs(x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                   initial_state=None, cu_seqlens=None) -> None:
    """Shape / dtype checks shared by every backend; errors name the argument.

    Raises:
        ValueError: wrong rank or shape, T == 0, or bad ``cu_seqlens`` (B != 1, not
        ``[N+1]`` offsets from 0 to T, decreasing). TypeError: non-float arrays, or
        non-integer ``cu_seqlens``.
    """
    if x.ndim != 3:
        raise ValueError(f"x: expected rank 3 [B, T, C], got shape {tuple(x.shape)}")
    if not is_float_dtype(x.dtype):
        raise TypeError(f"x: expected a float dtype, got {x.dtype}")
    batch, seq, channels = x.shape
    if seq == 0:
        raise ValueError("x: sequence length T must be >= 1, got T=0")
    if A.ndim != 2 or A.shape[0] != channels:
        raise ValueError(f"A: expected shape ({channels}, N) [C, N], got {tuple(A.shape)}")
    n_state = A.shape[1]
    _check("A", A, (channels, n_state), "[C, N]")
    _check("dt", dt, (batch, seq, channels), "[B, T, C]")
    _check("B", B, (batch, seq, n_state), "[B, T, N]")
    _check("C", C, (batch, seq, n_state), "[B, T, N]")
    _check("D", D, (channels,), "[C]")
    _check("z", z, (batch, seq, channels), "[B, T, C]")
    _check("dt_bias", dt_bias, (channels,), "[C]")
    n_seqs = check_cu_seqlens(cu_seqlens, batch, seq)
    _check("initial_state", initial_state, (n_seqs, channels, n_state),
           "[B, C, N]" if cu_seqlens is None else "[N_seq, C, N] (one per packed sequence)")


@overridable("selective_scan")  # context parallelism re-routes it (linearnexus.parallel)
def selective_scan(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    D: Array | None = None,
    z: Array | None = None,
    dt_bias: Array | None = None,
    dt_softplus: bool = False,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: Array | None = None,
    chunk_size: int | None = None,
    mode: KernelMode | str | None = None,
    backend: str | None = None,
    grid: GridConfig | None = None,
) -> tuple[Array, Array | None]:
    """Mamba-1 selective scan (S6).

    ``h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t``, ``y_t = C_t . h_t + D x_t``, then
    ``y_t *= silu(z_t)`` when ``z`` is given. With ``dt_softplus`` the step is
    ``softplus(dt + dt_bias)``, else ``dt + dt_bias``.

    Args:
        x: ``[B, T, C]`` float input (C = d_inner channels).
        dt: ``[B, T, C]`` step sizes (raw when ``dt_softplus``).
        A: ``[C, N]`` continuous-time decay (negative for stability).
        B, C: ``[B, T, N]`` input / output projections.
        D: ``[C]`` skip. z: ``[B, T, C]`` gate. dt_bias: ``[C]``.
        initial_state: ``[B, C, N]`` (``[N_seq, C, N]`` with ``cu_seqlens``) or None (zeros).
        output_final_state: return the final state (else None).
        cu_seqlens: ``[N_seq + 1]`` int offsets of packed sequences (requires B == 1): the
            state restarts at each sequence from its own initial state, and the final state
            is one per sequence. Offsets may be traced (under ``jit``) in every backend.
        chunk_size: tokens per chunk in chunk mode (default 16); overrides ``grid``.
        mode: CHUNK, RECURRENT or None (``select_mode(T)``).
        backend: "jax" (chunked / per-step pure JAX), "naive" (per-step truth), "pallas"
            (Triton kernels on a GPU, interpret mode elsewhere; one-token calls on a GPU run
            the fused step kernel), "pallas_step" (that kernel by name, T == 1 only), or None
            (best available: "pallas" on a GPU, else "jax").
        grid: launch config for kernels (chunk size, blocks, warps).

    Returns:
        ``(y [B, T, C] in x's dtype, final_state [B or N_seq, C, N] float32 or None)``.

    Raises:
        ValueError / TypeError: bad shapes or dtypes, naming the argument (concrete
            ``cu_seqlens`` values too; traced invalid offsets make every output NaN, see
            :mod:`linearnexus.kernels.common.validation`).
        NotImplementedError: the named backend cannot run this call.
    """
    cu_seqlens = as_cu_seqlens(cu_seqlens)
    validate_selective_scan_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)
    if grid is None:
        grid = GridConfig(chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size)
    elif chunk_size is not None:  # an explicit chunk_size wins over grid.chunk_size
        grid = GridConfig(chunk_size=chunk_size, block_c=grid.block_c,
                          num_warps=grid.num_warps, num_stages=grid.num_stages)
    run_mode = resolve_mode(mode, x.shape[1])
    raw_dt = dt

    def step_size():
        if dt_bias is None and not dt_softplus:
            return raw_dt
        # computed in at least float32 and kept there (bf16 dt loses ~3 digits)
        s = raw_dt.astype(jnp.promote_types(raw_dt.dtype, jnp.float32))
        if dt_bias is not None:
            s = s + dt_bias.astype(s.dtype)
        return jax.nn.softplus(s) if dt_softplus else s

    def call(kernel):
        if run_mode is KernelMode.CHUNK:
            if getattr(kernel, "fuses_step_size", False):  # no float32 dt pass in memory
                return kernel.forward_chunk(x, raw_dt, A, B, C, D=D, z=z,
                                            initial_state=initial_state, cu_seqlens=cu_seqlens,
                                            dt_bias=dt_bias, dt_softplus=dt_softplus, grid=grid)
            return kernel.forward_chunk(x, step_size(), A, B, C, D=D, z=z,
                                        initial_state=initial_state, cu_seqlens=cu_seqlens,
                                        grid=grid)
        return kernel.forward_recurrent(x, step_size(), A, B, C, D=D, z=z,
                                        initial_state=initial_state, cu_seqlens=cu_seqlens)

    y, final_state = dispatch("mamba", BACKENDS, BACKEND_ORDER, call, backend=backend,
                              dtype=x.dtype)
    ok = cu_seqlens_ok(cu_seqlens, x.shape[1])
    if ok is not None:  # traced offsets that turn out invalid: NaN, not a plausible answer
        # a scalar factor, not a where on y: where(ok, y, y * nan) gives NaN gradients even
        # when ok (its unused branch's cotangent 0 times nan); this gives them only when not
        poison = jnp.where(ok, 1.0, jnp.nan).astype(y.dtype)
        y = y * poison
        final_state = final_state * poison.astype(final_state.dtype)
    return y, (final_state if output_final_state else None)
