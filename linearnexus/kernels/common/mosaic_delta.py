"""The delta rules' chunk core on Mosaic GPU (Hopper, sm_90+): forward kernel, and a Triton
or Mosaic GPU backward (``MosaicConfig.backward``).

Checked on the H200 and an H100 (``benchmarks/mosaic_gdn_check.py``): forward and every
gradient through the api against the reference at T = 63, 1000, 4096, head dims 64 and
128, with and without an initial state, gated and ungated (bf16, outputs <= 4.0e-3,
gradients <= 5.6e-3), and in JAX 0.11's Mosaic GPU interpreter on the CPU
(``mosaic_chunk.gpu_interpret``). A 211M Gated DeltaNet LM trains 1.08x faster through it
than through the Triton kernels (H200, :data:`AUTOMATIC`), so automatic dispatch takes it
first on sm_90+ for bf16 / f16 (``LINEARNEXUS_MOSAIC_GDN=0``, :data:`OPT_IN_ENV`, keeps it
out).
``benchmarks/mosaic_gdn_check.py`` is the GPU check (docs/mosaic.md).

``delta_rule`` and ``gated_delta_rule`` share it (``g`` None: no gate). The per-chunk WY
preparation stays the Triton kernels of ``pallas_wy.py`` (a forward substitution over the
rows of ``I + A`` does not map onto wgmma tiles, and it is a parallel pass that reads each
chunk once): ``w = M^{-1} (beta e^{b} k)``, ``u = M^{-1} (beta v)``. The sequential walk is
``mosaic_chunk.py``'s forward kernel with ``core.delta`` set, which per chunk, entering with
``S_c`` (float32 registers, bf16 copy in SMEM)::

    ws  = w S_c,  qk = q k^T,  qs = q S_c            three wgmmas issued together
    vn  = u - ws                                     registers -> SMEM (bf16) twice:
                                                     vn, and e^{b_L - b} vn
    o   = scale [ e^{b} qs + ((qk) * Gamma) vn ]     wgmma, A the register operand
    S_{c+1} = e^{b_L} S_c + k^T (e^{b_L - b} vn)     wgmma into the state accumulator

The plain forward (no gradient; ``MosaicConfig.fused_wy``, the default) does not form ``w``,
``u`` at all: the preparation writes ``M^{-1}`` only (``pallas_wy.wy_inverse``) and the walk
takes ``k S_c`` in place of ``w S_c`` and forms ``vn = M^{-1} (beta (v - e^{b} k S_c))`` with
one more wgmma (:func:`mosaic_delta_fused`; 0.704 ms against 0.885 at (8, 4096, 16, 128)
bf16 on an H100, with lower errors).

The backward (``jax.custom_vjp``): under a gradient the kernel also stores every chunk's
entering state ``S_c`` (the bf16 tile of the ``w S_c`` / ``q S_c`` matmuls becomes a
pipeline output slot, as simple_gla's ``store_states``) and ``vn`` (likewise): exactly the
two residuals the Triton ``pallas`` backend keeps from its ``fwd_h``, so no recompute and no
more memory than that backend. Two backwards read them:

* ``backward="pallas"``: the Triton core backward (``pallas_chunk._core_bwd``: ``bwd_dv``,
  ``bwd_dh``, ``bwd_dqk``);
* ``backward="mosaic"``: simple_gla's two Mosaic kernels (``mosaic_bwd.mosaic_delta_backward``):
  the reverse walk with ``w`` as one more input (``dvn`` is its ``dv``, and the state
  gradient takes ``- w^T dvn`` per chunk as a second wgmma into its accumulator), ``dq / dk``
  with ``vn`` as the values, and ``dw = -dvn S_c^T`` in a Mosaic kernel of its own
  (``mosaic_bwd.run_dw``; ``LINEARNEXUS_MOSAIC_DW_KERNEL=0``: one batched XLA matmul).

Either way the WY preparation's own ``custom_vjp`` (``pallas_wy.py``) then carries ``dw``,
``du`` back to ``k``, ``v``, ``beta`` and ``g``.

With ``MosaicConfig.fused_grad`` (the default with the Mosaic backward) the gradient is
formed from ``M^{-1}`` as well: the forward under a gradient is the fused walk storing ``S_c`` and ``vn``,
the reverse walk forms ``dy = M^{-T} dvn`` and takes ``k^T (beta e^b dy)`` off the state
gradient, and the WY backward finishes: by default the Mosaic GPU kernel of ``mosaic_wy.py``
(:data:`WY_MOSAIC`; the reverse walk then writes ``dv = beta dy``), with
:data:`WY_MOSAIC_ENV` "0" (or where it does not fit) ``pallas_wy.wy_fused_backward``, forming
``-dy S_c^T`` from the stored states itself (:data:`DKS_IN_WY`; else the ``dw`` kernel forms
it, ``mosaic_bwd.mosaic_delta_fused_backward``); ``w`` and ``u`` are never formed: fwd+bwd
2.786 ms against 3.081 at (8, 4096, 16, 128) bf16 on an H100 (:data:`DEFAULT_FUSED_GRAD`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from linearnexus.core.types import Array
from linearnexus.kernels.common import mosaic_bwd
from linearnexus.kernels.common.mosaic_bwd import (
    mosaic_delta_backward,
    mosaic_delta_fused_backward,
)
from linearnexus.kernels.common.mosaic_chunk import (
    HOPPER_SMS,
    SMEM_LIMIT,
    MosaicConfig,
    MosaicStatic,
    env_switch,
    mosaic_backward_fits,
    mosaic_forward,
    pass_empty,
    small_grid,
    smem_bytes,
    triton_layout,
)
from linearnexus.kernels.common.mosaic_wy import wy_fused_backward_mosaic, wy_mosaic_fits
from linearnexus.kernels.common.pallas_chunk import _core_bwd, in_chunk_cumsum
from linearnexus.kernels.common.pallas_wy import (
    WyStatic,
    wy_fused_backward,
    wy_inverse,
    wy_prepare,
)

F32 = jnp.float32
#: "0" keeps the delta rules' mosaic backend out of automatic dispatch ("1" puts it in when
#: :data:`AUTOMATIC` is off); by name it always runs
OPT_IN_ENV = "LINEARNEXUS_MOSAIC_GDN"
#: automatic without the variable: yes. A 211M Gated DeltaNet LM (K = 64, V = 128, T = 2048,
#: batch 8, bf16 compute) trained at 80.8 ms/step through it against 87.7 through pallas
#: (1.08x the tokens/s; benchmarks/lm_train_gpu.py, H200, 2026-12-05: the Mosaic backward,
#: dw still in XLA; an earlier version had trained at 0.93x, 2026-12-04); the gated rule's fwd /
#: fwd+bwd 0.68x / 0.82x FLA 0.6.0's at (8, 4096, 16, 128) on an H100; the ungated
#: delta_rule 0.55x / 0.74x FLA's chunk_delta_rule there (with the gradient from M^{-1})
AUTOMATIC = True
#: the feature table's note on the backend
MOSAIC_STATUS = ("sm_90+, batches and packed sequences: Triton M^{-1}, Mosaic GPU forward walk "
                 "forming the WY products, Mosaic GPU backward (Triton at V > 128); GDN LM "
                 "training 1.08x pallas's tokens/s (H200); LINEARNEXUS_MOSAIC_GDN=0 keeps it out "
                 "of automatic dispatch")


#: the gradient the heuristic picks where the Mosaic backward fits (V <= 128): "mosaic" (the
#: reverse walk and dq / dk on Mosaic GPU). bf16 gated_delta_rule fwd+bwd on an H100
#: (benchmarks/mosaic_gdn_check.py, 2026-12-05): (8, 4096, 16, 128) 3.284 ms against the
#: Triton backward's 3.346, (8, 4096, 16, 64) 1.538 against 1.669 (FLA 0.6.0: 4.023 / 2.948);
#: one earlier run had them level (3.491 / 3.477)
DEFAULT_BACKWARD = "mosaic"


#: the plain forward's WY products in the walk (MosaicConfig.fused_wy) by default: yes.
#: bf16 gated_delta_rule forward on an H100 (2026-12-05): (8, 4096, 16, 128) 0.704 ms against
#: 0.888-0.897 with w, u through HBM (FLA 0.6.0: 1.038), (8, 4096, 16, 64) 0.468 against
#: 0.522 (FLA 0.713); errors against the reference equal or lower (delta_rule o 3.6e-3
#: against 4.0e-3)
DEFAULT_FUSED_WY = True

#: "1" runs the gradient from M^{-1} too (MosaicConfig.fused_grad) where a call's config does
#: not say, "0" keeps it off; unset: :data:`DEFAULT_FUSED_GRAD`
FUSED_GRAD_ENV = "LINEARNEXUS_MOSAIC_FUSED_GRAD"
#: the gradient from M^{-1} (MosaicConfig.fused_grad) by default: yes. It drops w, u from the
#: gradient for one more wgmma a chunk in the reverse walk. bf16 (8, 4096, 16, 128) fwd+bwd
#: on an H100 (benchmarks/mosaic_gdn_check.py, 2026-12-05): gated_delta_rule 2.786 ms against
#: 3.081, delta_rule 2.658 against 2.895 (FLA 0.6.0's chunk_delta_rule: 3.607); errors equal
#: to the separate form's (9 of 9 checks); the 211M GDN LM 81.1 ms/step against 83.5
#: (pallas 84.3), its first 50 losses within 2.7e-4 of the jax backend's
DEFAULT_FUSED_GRAD = True

#: "1": in the gradient from M^{-1}, the Triton WY backward forms dks = -dy S_c^T from the
#: stored states (pallas_wy.wy_fused_backward's ``states``) and the Mosaic dw kernel does not
#: run; "0" the dw kernel forms it; unset: :data:`DKS_IN_WY`. Read only where the Triton WY
#: backward runs (``LINEARNEXUS_MOSAIC_WY_BWD=0``, or the Mosaic one does not fit): the Mosaic
#: WY backward forms dks from the states itself. By bytes: the dw kernel reads dy
#: and S_c and writes dks, the WY backward reads dks (~0.67 GB at (8, 4096, 16, 128) bf16),
#: against the WY backward reading S_c (0.27 GB)
DKS_IN_WY_ENV = "LINEARNEXUS_MOSAIC_DKS_IN_WY"
#: on: bf16 gated_delta_rule (8, 4096, 16, 128) fwd+bwd on an H200 (2026-12-06,
#: mosaic_gdn_check.py, one process per setting, the default timed before and after):
#: 2.318 / 2.328 ms against 2.351 / 2.370 and 2.369 / 2.364 with the dw kernel; checked on
#: that GPU at T = 1000 (with and without an initial state) and in the 0.11 interpreter
DKS_IN_WY = True

#: "1": in the gradient from M^{-1}, the WY backward is the Mosaic GPU kernel
#: (mosaic_wy.wy_fused_backward_mosaic: dks from the states, dk, dbeta, dg; the reverse walk
#: writes dv = beta dy) where it fits (mosaic_wy.wy_mosaic_fits), "0" the Triton one
#: (pallas_wy.wy_fused_backward); unset: :data:`WY_MOSAIC`
WY_MOSAIC_ENV = "LINEARNEXUS_MOSAIC_WY_BWD"
#: on. On an H100 (bf16, 2026-12-06) the kernel alone took 0.581 ms against the Triton one's
#: 0.742 at (8, 4096, 16, 128) but gained nothing through the api while its key blocks ran in
#: different waves (each read dy, vn, v and the states' rows twice from HBM); launched side by
#: side (mosaic_chunk.program_grid) it took 0.41 ms of the gradient's kernels against the
#: Triton kernel's 0.62 (profile_gpu.py, 2.036 against 2.245 ms of kernels in all), and at
#: (2, 16384, 16, 128) forward + backward 2.567 ms against 2.788 (with the small-grid
#: switches of mosaic_bwd). Its checks pass on that GPU, dense and packed (worst 4.1e-3)
WY_MOSAIC = True


def delta_opted_in() -> bool:
    """Whether automatic dispatch may pick the delta rules' Mosaic kernel."""
    return env_switch(OPT_IN_ENV, AUTOMATIC)


def default_delta_config(*, rows: int, heads: int, key_dim: int, value_dim: int,
                         n_chunks: int, itemsize: int = 2, packed: bool = False,
                         fused_wy: bool | None = None, fused_grad: bool | None = None,
                         backward: str | None = None, block_v: int | None = None) -> MosaicConfig:
    """The heuristic of the delta rules' kernels: chunk 64, value blocks of 64 (the
    ``[K, 64]`` float32 state, 64 registers a thread at K = 128, plus three ``[64, 64]``
    accumulators), the WY products in the plain forward's walk (:data:`DEFAULT_FUSED_WY`;
    ``fused_wy`` a call's own choice) and the Mosaic backward where it fits
    (:data:`DEFAULT_BACKWARD`), else the Triton one. Stages of the plain forward, fused:
    2 where they fit (measured on an H100, bf16 (8, 4096, 16, D), 2026-12-05: D = 64 1 / 2 /
    3 stages 0.516 / 0.468 / 0.471 ms, D = 128 0.707 / 0.704 / 0.719); with ``w``, ``u``
    through HBM: one when the grid has more programs than the 132 SMs and the walk is long
    (two programs share an SM), else the deepest of 3 (walks of >= 8 chunks) or 2 that fits
    (level within 1% at those shapes). ``bwd_stages`` (the forward that stores the states
    under a gradient, and the Mosaic reverse walk): None, the deepest that fits up to 3.
    ``fused_grad`` (a call's own choice, else :data:`FUSED_GRAD_ENV` /
    :data:`DEFAULT_FUSED_GRAD`) only with the fused forward and the Mosaic backward;
    ``backward`` a call's own choice, which the default ``fused_grad`` then follows (an
    explicit ``"pallas"`` turns it off rather than clash with it). ``block_v`` a call's own
    (32 or 64): the stages are sized and the programs counted for it; else 32 where blocks of
    64 would leave at least half the SMs idle on a walk of >= 8 chunks (batch rows; as
    simple_gla's :func:`~linearnexus.kernels.common.mosaic_chunk.default_mosaic_config`).
    Measured at (2, 16384, 16, 128) bf16 gated_delta_rule on an H100 (2026-12-06, through the
    api): forward 0.902 ms against 0.979 at 64, forward + backward 3.409 against 3.539. Not
    32 merely for a fuller last wave (``mosaic_chunk.balances_waves``, which the backward
    kernels take): at (1, 8192, 96, 128) the gated forward took 1.32 ms at 32 against 1.15
    at 64 (H100, 2026-12-06)."""
    if block_v is None:
        block_v = min(64, value_dim)
        if n_chunks >= 8 and small_grid(rows=rows, heads=heads, value_dim=value_dim,
                                        packed=packed):
            block_v = 32  # at most half the SMs busy at 64: twice the programs
    fused = DEFAULT_FUSED_WY if fused_wy is None else fused_wy

    def fits(stages: int) -> bool:
        return smem_bytes(chunk=64, key_dim=key_dim, block_v=block_v, stages=stages,
                          itemsize=itemsize, delta=True, packed=packed,
                          fused_wy=fused) <= SMEM_LIMIT

    if fused:
        stages = 2 if fits(2) else 1
    else:
        stages = 3 if n_chunks >= 8 and fits(3) else 2 if fits(2) else 1
        if n_chunks >= 8 and (value_dim // block_v) * rows * heads > HOPPER_SMS:
            stages = 1
    if backward is None:
        backward = DEFAULT_BACKWARD
    if backward == "mosaic" and not delta_backward_fits(key_dim=key_dim, value_dim=value_dim,
                                                        itemsize=itemsize, packed=packed):
        backward = "pallas"
    grad = env_switch(FUSED_GRAD_ENV, DEFAULT_FUSED_GRAD) if fused_grad is None else fused_grad
    return MosaicConfig(chunk=64, block_v=block_v, stages=stages, backward=backward,
                        fused_wy=fused, fused_grad=grad and fused and backward == "mosaic")


def delta_backward_fits(*, key_dim: int, value_dim: int, itemsize: int = 2,
                        packed: bool = False) -> bool:
    """Whether the delta rules' Mosaic backward fits shared memory at 2 stages (chunk 64,
    value blocks of 64): ``mosaic_chunk.mosaic_backward_fits`` with the delta rules' tiles."""
    return mosaic_backward_fits(chunk=64, key_dim=key_dim, value_dim=value_dim, block_v=64,
                                itemsize=itemsize, packed=packed, delta=True)


def check_delta_config(cfg: MosaicConfig, *, key_dim: int, value_dim: int,
                       packed: bool = False) -> None:
    """Raise ``ValueError`` naming ``config`` for knobs the delta rules' kernel does not take
    (``cfg`` resolved: no None field but ``bwd_stages`` / ``dqk_stages``)."""
    if cfg.fused_grad and not (cfg.fused_wy and cfg.backward == "mosaic"):
        raise ValueError(f"config: fused_grad=True takes fused_wy=True and backward='mosaic' "
                         f"(the gradient from M^{{-1}} runs the fused walk and the Mosaic "
                         f"reverse walk), got fused_wy={cfg.fused_wy}, backward={cfg.backward!r}")
    if cfg.backward == "pallas" and cfg.dqk_stages is not None:
        raise ValueError("config: dqk_stages sets the Mosaic backward's dq / dk kernel, which "
                         "backward='pallas' does not run; leave it None")
    if cfg.seq_split not in (None, 1) or cfg.seq_split_grad:
        raise ValueError(f"config: seq_split={cfg.seq_split} (seq_split_grad="
                         f"{cfg.seq_split_grad}) is simple_gla's (a segment's entering "
                         "state from one matmul over the segments before); the delta rules carry "
                         "a state through products of (I - beta k k^T) factors: leave it None")
    if cfg.backward == "mosaic" and not delta_backward_fits(key_dim=key_dim, value_dim=value_dim,
                                                            packed=packed):
        raise ValueError(f"config: backward='mosaic' at K={key_dim}, V={value_dim}: the dq / dk "
                         "kernel holds whole [L, V] tiles, which do not fit shared memory past "
                         "V = 128; use backward='pallas'")
    if cfg.block_v not in (32, 64) or value_dim % cfg.block_v:
        raise ValueError(f"config: block_v={cfg.block_v}: the delta rules' walk takes 64 or 32 "
                         "dividing the padded value dim (at 128 the [K, 128] float32 state and "
                         f"three accumulators exceed a warpgroup's registers); padded V={value_dim}")
    for name, stored in (("stages", False), ("bwd_stages", True)):
        stages = getattr(cfg, name)
        if stages is None:
            continue
        need = smem_bytes(chunk=cfg.chunk, key_dim=key_dim, block_v=cfg.block_v, stages=stages,
                          itemsize=2, delta=True, store_states=stored, packed=packed,
                          fused_wy=bool(cfg.fused_wy) and (not stored or bool(cfg.fused_grad)))
        if stored and cfg.backward == "mosaic":  # bwd_stages is the reverse walk's depth too
            # (with the Mosaic WY backward the walk's beta dy slot too: the stricter count)
            need = max(need, mosaic_bwd.state_smem_bytes(
                chunk=cfg.chunk, key_dim=key_dim, block_v=min(value_dim, mosaic_bwd.STATE_BLOCK_V),
                stages=stages, itemsize=2, delta=True, packed=packed,
                fused=bool(cfg.fused_grad),
                scaled_dy=bool(cfg.fused_grad) and env_switch(WY_MOSAIC_ENV, WY_MOSAIC)))
        if need > SMEM_LIMIT:
            raise ValueError(f"config: {name}={stages} at K={key_dim} needs {need} bytes of "
                             f"shared memory with the delta rule's WY and vn tiles, over the "
                             f"{SMEM_LIMIT} a block may use; use fewer stages")
    if cfg.dqk_stages is not None:
        need = mosaic_bwd.dqk_smem_bytes(chunk=cfg.chunk, key_dim=key_dim, value_dim=value_dim,
                                         stages=cfg.dqk_stages, itemsize=2)
        if need > SMEM_LIMIT:
            raise ValueError(f"config: dqk_stages={cfg.dqk_stages} at K={key_dim}, V={value_dim} "
                             f"needs {need} bytes of shared memory, over the {SMEM_LIMIT} a "
                             "block may use; use fewer stages")


def _gates(st: MosaicStatic, g: Array | None, like: Array) -> tuple[Array, Array | None]:
    """``(b for the kernel, b for the Triton backward)``: the in-chunk cumsum of ``g``, or
    zeros for the kernel and None for the Triton backward without a gate."""
    if g is None:
        return jnp.zeros(like.shape[:3], F32), None
    b = in_chunk_cumsum(g, st.core.chunk)
    return b, b


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mosaic_delta_core(st: MosaicStatic, q: Array, k: Array, u: Array, w: Array,
                      g: Array | None, h0: Array | None,
                      layout: tuple[Array, Array] | None = None) -> tuple[Array, Array]:
    """The delta rules' chunk core in the chunk layout: Mosaic GPU forward, Triton or Mosaic
    GPU backward (``st.backward``).

    Args:
        st: static description (``st.core.delta`` True; ``core.gate`` "scalar" or "none").
        q, k, w: ``[R, TP, H, K]`` (bf16 / f16). u: ``[R, TP, H, V]``. w, u: the WY form's.
        g: ``[R, TP, H]`` float32 log-gates, or None (the ungated delta rule).
        h0: ``[N, H, K, V]`` or None (N = R for batch rows).
        layout: ``(seq_info, flags)`` ``[R, NC]`` int32 for packed rows, else None.

    Returns:
        ``(o [R, TP, H, V], final [N, H, K, V] float32)``.
    """
    b, _ = _gates(st, g, q)
    h0f = None if h0 is None else h0.astype(F32)
    o, final = mosaic_forward(st, q, k, u, b, h0f, w=w, layout=layout)
    return o, pass_empty(st, layout, final, h0f)


def _fwd_rule(st: MosaicStatic, q, k, u, w, g, h0, layout):
    # under a gradient the kernel also stores every chunk's entering state and vn, the two
    # residuals the Triton backward reads (the pallas backend keeps the same two)
    b, _ = _gates(st, g, q)
    h0f = None if h0 is None else h0.astype(F32)
    o, final, h, vn = mosaic_forward(st, q, k, u, b, h0f, w=w, store_states=True, layout=layout)
    final = pass_empty(st, layout, final, h0f)
    return (o, final), (q, k, u, w, g, h0, h, vn, final, layout)


def _bwd_rule(st: MosaicStatic, res, cts):
    q, k, u, w, g, h0, h, vn, final, layout = res
    core = st.core
    if st.backward == "mosaic":
        b, _ = _gates(st, g, q)  # zeros without a gate: the kernels read gate rows regardless
        do, dfinal = cts
        dq, dk, du, dw, dg, dh0 = mosaic_delta_backward(st, q, k, w, b, h, vn, do, dfinal,
                                                        layout=layout)
        if h0 is not None:
            dh0 = pass_empty(st, layout, dh0, dfinal.astype(F32)).astype(h0.dtype)
        return (dq, dk, du, dw, None if g is None else dg, None if h0 is None else dh0, None)
    _, b = _gates(st, g, q)
    seq_info, flags = triton_layout(core, layout)
    full = (q, k, u, w, b, h0, seq_info, flags, h, vn, final)
    dq, dk, du, dw, dg, dh0, _, _ = _core_bwd(core, full, cts)
    return dq, dk, du, dw, None if g is None else dg, None if h0 is None else dh0, None


mosaic_delta_core.defvjp(_fwd_rule, _bwd_rule)


def _separate(st: MosaicStatic, wst: WyStatic, q: Array, k: Array, v: Array, beta: Array,
              g: Array | None, h0: Array | None,
              layout: tuple[Array, Array] | None) -> tuple[Array, Array]:
    """The WY preparation's ``w``, ``u`` then the walk that reads them (k passes through the
    preparation so that the core's ``dk`` is added inside the WY backward kernel)."""
    w, u, k = wy_prepare(wst, k, v, beta, g)
    return mosaic_delta_core(st, q, k, u, w, g, h0, layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def mosaic_delta_fused(st: MosaicStatic, wst: WyStatic, q: Array, k: Array, v: Array,
                       beta: Array, g: Array | None, h0: Array | None,
                       layout: tuple[Array, Array] | None = None) -> tuple[Array, Array]:
    """The delta rules from the chunk layout with the WY products in the walk
    (``MosaicConfig.fused_wy``): the preparation writes only ``M^{-1}``
    (``pallas_wy.wy_inverse``) and the walk forms ``vn = M^{-1} (beta v - beta e^b (k S_c))``
    per chunk, so ``w`` and ``u`` never reach HBM. Under a gradient with ``st.fused_grad``
    (the default with the Mosaic backward) the forward is this walk storing ``S_c`` and
    ``vn`` and the backward :func:`mosaic_bwd.mosaic_delta_fused_backward` then the WY
    backward (``mosaic_wy.wy_fused_backward_mosaic`` by default, :data:`WY_MOSAIC`; else
    :func:`pallas_wy.wy_fused_backward`), still without ``w``, ``u``; without it both are
    :func:`_separate`'s (its backward reads ``w`` and the stored ``vn``, ``S_c``).

    Args:
        st: static description (``st.core.delta``). wst: the WY preparation's.
        q, k: ``[R, TP, H, K]``; v: ``[R, TP, H, V]`` (bf16 / f16); beta: ``[R, TP, H]``;
        g, h0, layout: as :func:`mosaic_delta_core`.

    Returns:
        ``(o [R, TP, H, V], final [N, H, K, V] float32)``.
    """
    minv = wy_inverse(wst, k, beta, g)
    b, _ = _gates(st, g, q)
    h0f = None if h0 is None else h0.astype(F32)
    o, final = mosaic_forward(dataclasses.replace(st, fused_wy=True), q, k, v, b, h0f,
                              layout=layout, minv=minv, beta=beta)
    return o, pass_empty(st, layout, final, h0f)


def _fused_fwd(st, wst, q, k, v, beta, g, h0, layout):
    if st.fused_grad:  # the walk stores S_c and vn, as the separate one does
        minv = wy_inverse(wst, k, beta, g)
        b, _ = _gates(st, g, q)
        h0f = None if h0 is None else h0.astype(F32)
        o, final, h, vn = mosaic_forward(dataclasses.replace(st, fused_wy=True), q, k, v, b, h0f,
                                         store_states=True, layout=layout, minv=minv, beta=beta)
        final = pass_empty(st, layout, final, h0f)
        return (o, final), (q, k, v, beta, g, h0, minv, h, vn, layout)
    out, pullback = jax.vjp(lambda *xs: _separate(st, wst, *xs, layout), q, k, v, beta, g, h0)
    return out, pullback  # (a jax.tree_util.Partial: a pytree of the residual arrays)


def _fused_bwd(st, wst, res, cts):
    if not st.fused_grad:
        return (*res(cts), None)
    q, k, v, beta, g, h0, minv, h, vn, layout = res
    b, _ = _gates(st, g, q)  # zeros without a gate: the kernels read gate rows regardless
    do, dfinal = cts
    core = st.core
    if env_switch(WY_MOSAIC_ENV, WY_MOSAIC) and wy_mosaic_fits(
            chunk=core.chunk, key_dim=core.key_dim, value_dim=core.value_dim,
            itemsize=jnp.dtype(k.dtype).itemsize):
        dq, dk_core, dy, _, dv, dg_core, dh0 = mosaic_delta_fused_backward(
            st, q, k, minv, beta, b, h, vn, do, dfinal, layout=layout, dks=False,
            scaled_dy=True)
        dk, dbeta, dg_wy = wy_fused_backward_mosaic(st, k, v, beta, b, vn, dy, h, dk_core)
        dv = dv.astype(v.dtype)
    else:
        in_wy = env_switch(DKS_IN_WY_ENV, DKS_IN_WY)
        dq, dk_core, dy, dks, _, dg_core, dh0 = mosaic_delta_fused_backward(
            st, q, k, minv, beta, b, h, vn, do, dfinal, layout=layout, dks=not in_wy)
        dk, dv, dbeta, dg_wy = wy_fused_backward(wst, k, v, beta, g, vn, dy, dks, dk_core,
                                                 states=h if in_wy else None)
    if h0 is not None:
        dh0 = pass_empty(st, layout, dh0, dfinal.astype(F32)).astype(h0.dtype)
    return (dq, dk, dv, dbeta, None if g is None else dg_core + dg_wy,
            None if h0 is None else dh0, None)


mosaic_delta_fused.defvjp(_fused_fwd, _fused_bwd)
