"""Fused one-token (decoding) step of the Mamba-1 selective scan: one Pallas (Triton) kernel.

For ``T == 1``, per row ``b`` and channel ``c``::

    h[c, :] = exp(dt[c] A[c, :]) * h[c, :] + dt[c] x[c] B[:]      # [N] per channel
    y[c]    = (C . h[c, :] + D[c] x[c]) * silu(z[c])

The reference runs this as a scan of one step plus the skip and gate (several XLA kernels
per layer); here one launch reads the ``[C, N]`` state once and writes it once (in place
when the caller donates it). Grid ``(B, C / BC)``, a ``[BC, N']`` float32 tile per program
(``N'`` the state size padded to a power of two >= 16, ``C`` padded to whole blocks, in
the glue: zeros are inert). Differentiable through the reference's VJP.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linearnexus.core.types import Array
from linearnexus.kernels.common import pallas as lp
from linearnexus.kernels.mamba.reference import selective_scan_reference

F32 = jnp.float32
_TILE = 4096  # state-tile elements per program


@dataclasses.dataclass(frozen=True)
class _Static:
    has_h0: bool
    has_d: bool
    has_z: bool
    block_c: int
    n_state: int  # padded N'


def _kernel(*, x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, h0_ref, y_ref, final_ref,
            st: _Static):
    x = x_ref[...].astype(F32)  # [BC]
    dt = dt_ref[...].astype(F32)
    a = a_ref[...].astype(F32)  # [BC, N']
    h = h0_ref[...] if st.has_h0 else jnp.zeros((st.block_c, st.n_state), F32)
    b = b_ref[...].astype(F32)  # [N']
    c = c_ref[...].astype(F32)
    h = jnp.exp(dt[:, None] * a) * h + (dt * x)[:, None] * b[None, :]
    y = jnp.sum(h * c[None, :], axis=1)  # [BC]
    if st.has_d:
        y = y + d_ref[...].astype(F32) * x
    if st.has_z:
        z = z_ref[...].astype(F32)
        y = y * (z / (1.0 + jnp.exp(-z)))  # silu
    y_ref[...] = y.astype(y_ref.dtype)
    final_ref[...] = h



def _launch(x, dt, A, B, C, D, z, h0):
    """``x, dt, z [Bt, Ch]``, ``A [Ch, N]``, ``B, C [Bt, N]``, ``D [Ch]``, ``h0 [Bt, Ch, N]``
    -> ``(y [Bt, Ch] in x's dtype, final [Bt, Ch, N] float32)``."""
    batch, channels = x.shape
    n_state = A.shape[1]
    n_pad = lp.next_pow2(n_state)
    block = min(lp.next_pow2(channels), max(16, _TILE // n_pad))
    c_pad = -(-channels // block) * block
    x, dt, z = (lp.pad_axis(a, 1, c_pad) for a in (x, dt, z))
    A = lp.pad_axis(lp.pad_axis(A, 0, c_pad), 1, n_pad)
    B, C = lp.pad_axis(B, 1, n_pad), lp.pad_axis(C, 1, n_pad)
    D = lp.pad_axis(D, 0, c_pad)
    if h0 is not None:
        h0 = lp.pad_axis(lp.pad_axis(h0.astype(F32), 1, c_pad), 2, n_pad)
    st = _Static(has_h0=h0 is not None, has_d=D is not None, has_z=z is not None,
                 block_c=block, n_state=n_pad)
    row = pl.BlockSpec((None, block), lambda i, j: (i, j))
    tile = pl.BlockSpec((None, block, n_pad), lambda i, j: (i, j, 0))
    vec_n = pl.BlockSpec((None, n_pad), lambda i, j: (i, 0))
    specs = {"x": row, "dt": row, "a": pl.BlockSpec((block, n_pad), lambda i, j: (j, 0)),
             "b": vec_n, "c": vec_n, "d": pl.BlockSpec((block,), lambda i, j: (j,)), "z": row,
             "h0": tile, "y": row, "final": tile}
    interpret = lp.interpret_mode()
    out = lp.named_pallas_call(
        functools.partial(_kernel, st=st),
        inputs={"x": x, "dt": dt, "a": A, "b": B, "c": C, "d": D, "z": z, "h0": h0},
        outputs={"y": jax.ShapeDtypeStruct((batch, c_pad), x.dtype),
                 "final": jax.ShapeDtypeStruct((batch, c_pad, n_pad), F32)},
        in_specs=specs, out_specs=specs, aliases={"h0": "final"} if h0 is not None else None,
        grid=(batch, c_pad // block), interpret=interpret,
        compiler_params=None if interpret else lp.compiler_params(4, 1), name="selective_scan_step")
    return out["y"][:, :channels], out["final"][:, :channels, :n_state]


def selective_scan_step(x: Array, dt: Array, A: Array, B: Array, C: Array, *,
                        D: Array | None = None, z: Array | None = None,
                        initial_state: Array | None = None) -> tuple[Array, Array]:
    """One token of the selective scan in one kernel; arguments as
    :func:`selective_scan_reference` with ``T == 1`` (``dt`` already the step size).

    Returns:
        ``(y [B, 1, C] in x's dtype, final_state [B, C, N] float32)``.

    Raises:
        NotImplementedError: ``T != 1`` or float64 inputs.
    """
    if x.shape[1] != 1:
        raise NotImplementedError(f"the fused selective-scan step runs one-token calls (T == 1), "
                                  f"got T={x.shape[1]}")
    for a in (x, dt, A, B, C, D, z, initial_state):
        if a is not None and jnp.dtype(a.dtype) == jnp.float64:
            raise NotImplementedError("the fused selective-scan step takes float32 / bfloat16 / "
                                      "float16 inputs, got float64: use backend='jax'")
    args = (x, dt, A, B, C, D, z, initial_state)

    def forward(args):
        x, dt, A, B, C, D, z, h0 = args
        y, final = _launch(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D,
                           None if z is None else z[:, 0], h0)  # [B, 1, .] -> [B, .]
        return y[:, None], final  # [B, C] -> [B, 1, C]

    def reference(args):
        x, dt, A, B, C, D, z, h0 = args
        return selective_scan_reference(x, dt, A, B, C, D=D, z=z, initial_state=h0)

    return lp.with_reference_vjp(forward, reference, args)
