"""Whether the delta rules' ``M^{-1}`` could move onto tensor-core products (CPU, numpy).

The WY preparation's ``M^{-1}`` (``kernels/common/pallas_wy.py``) is the one latency-bound
kernel of the gated rule's forward (0.28 ms of ~0.7 at (8, 4096, 16, 128) on an H200). A
Mosaic GPU form would build it from warpgroup matmuls, whose operands are 16-bit (bf16) or
TF32. This script emulates that: per chunk of L = 64 tokens, ``M = I + A`` with
``A_ij = beta_i (k_i . k_j) exp(b_i - b_j)`` (j < i), inverted in the only product-only
form, the 16 x 16 diagonal blocks by the nilpotent product ``(I - a)(I + a^2)(I + a^4)
(I + a^8)`` and then two levels of ``D - D L D`` (exact for block-lower ``L``), every
product's operands rounded to bf16 or TF32 and accumulated in float64, against the float64
inverse. The keys are L2-normalised, drawn around a shared direction of growing weight
(``--corr``): trained models' keys are far from independent.

Result (2026-12-06, 200 trials a weight; numbers as fractions of ``M^{-1}``'s largest
entry): with independent keys the bf16 products' error is about the bf16 rounding of
``M^{-1}`` itself (9.5e-4 against 8.8e-4); with correlated keys it grows to 0.18-0.31
(cancellation between the large powers of ``-A``: the products amplify their operands'
rounding ~60-fold), TF32 reaches 2.8e-2-3.7e-2, and the split bf16 products (three matmuls
each) stay at 2.8e-4-5.9e-4, under the 2.0e-3 that storing ``M^{-1}`` in bf16 costs anyway.
So a tensor-core ``M^{-1}`` needs three bf16 products for each of its ten dependent
``[64, 64]`` products (~31 warpgroup matmuls a chunk, ~0.14 ms of the H100's bf16 peak at
(8, 4096, 16, 128) before any latency), against the Triton kernel's 0.28 ms: too little to
gain for a kernel whose chain of dependent steps is its bound. ``M^{-1}`` stays on float32
CUDA-core products (docs/mosaic.md, "What bounds it").

    python benchmarks/minv_precision.py [--trials 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

L, K, SUB = 64, 128, 16


def round_mantissa(x: np.ndarray, bits: int | None) -> np.ndarray:
    """``x`` rounded to ``bits`` explicit mantissa bits (bf16: 7, TF32: 10; None: as is)."""
    if bits is None:
        return x
    m, e = np.frexp(x)  # x = m 2^e, 0.5 <= |m| < 1
    scale = 2.0 ** (bits + 1)
    return np.ldexp(np.round(m * scale) / scale, e)


def product_inverse(a: np.ndarray, bits: int | None, split: bool = False) -> np.ndarray:
    """``(I + a)^{-1}`` for strictly lower ``a [L, L]`` from products alone, each product's
    operands rounded to ``bits``: the 16 x 16 diagonal blocks by the nilpotent product, then
    ``D - D L D`` at 32 and 64 (``L`` the block below the diagonal of each doubled block).
    ``split``: each operand as a rounded pair ``hi + lo`` and three products (``hi hi' +
    hi lo' + lo hi'``), three times the matmuls."""
    def mm(x, y):
        xh, yh = round_mantissa(x, bits), round_mantissa(y, bits)
        if not split:
            return xh @ yh
        return xh @ yh + xh @ round_mantissa(y - yh, bits) + round_mantissa(x - xh, bits) @ yh

    eye = np.eye(L)
    within = np.kron(np.eye(L // SUB), np.ones((SUB, SUB)))  # [L, L] 16-blocks on the diagonal
    n = -(a * within)
    p, nk = eye + n, n
    for _ in range(3):  # (I + n)(I + n^2)(I + n^4)(I + n^8): n^16 = 0
        nk = mm(nk, nk)
        p = p + mm(p, nk)
    inner = within
    for size in (2 * SUB, 4 * SUB):
        outer = np.kron(np.eye(L // size), np.ones((size, size)))
        low = a * outer * (1 - inner)  # the lower-left block of each doubled block
        p = p - mm(mm(p, low), p)
        inner = outer
    return p


def chunk(rng: np.random.Generator, corr: float) -> np.ndarray:
    """One chunk's strictly lower ``A [L, L]``: L2-normalised keys around a shared direction
    of weight ``corr``, ``beta = sigmoid(2 z)``, log-gates ``-|0.05 z|``."""
    k = rng.standard_normal((L, K)) + corr * rng.standard_normal((1, K))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    k = round_mantissa(k, 7)  # bf16 keys, as the kernels read them
    beta = 1.0 / (1.0 + np.exp(-2.0 * rng.standard_normal(L)))
    b = np.cumsum(-np.abs(0.05 * rng.standard_normal(L)))
    return np.tril(beta[:, None] * (k @ k.T) * np.exp(b[:, None] - b[None, :]), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corr", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0])
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    forms = {"float32 products": 23, "tf32 products": 10, "bf16 products": 7,
             "bf16 x 3 products": (7, True), "bf16 rounding of M^-1 alone": "round"}
    rows = []
    for corr in args.corr:
        worst = dict.fromkeys(forms, 0.0)
        for _ in range(args.trials):
            a = chunk(rng, corr)
            exact = np.linalg.inv(np.eye(L) + a)
            top = np.abs(exact).max()
            for name, bits in forms.items():
                if bits == "round":
                    got = round_mantissa(exact, 7)
                elif isinstance(bits, tuple):
                    got = product_inverse(a, *bits)
                else:
                    got = product_inverse(a, bits)
                worst[name] = max(worst[name], float(np.abs(got - exact).max() / top))
        rows.append({"corr": corr, **worst})
        print(f"corr {corr}: " + ", ".join(f"{n} {e:.1e}" for n, e in worst.items()))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
