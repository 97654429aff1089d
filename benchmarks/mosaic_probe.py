"""Quick GPU probe of simple_gla's mosaic backend: what dispatch picks, its checks without an
initial state, mosaic vs pallas at the benchmark shape, and times per backward.

    python3 benchmarks/mosaic_probe.py [--shape 8,4096,16,128] [--check-seqs 63 1000 4096]
        [--check-dims 64 128]

Prints (1) the backend automatic dispatch runs for bf16 dense, bf16 packed and float32 calls
(via ``kernels.base.dispatch`` with the op's own order), (2) mosaic (Mosaic backward) against
the per-step reference WITHOUT an initial state (``kernels_gpu.py``'s checks always pass
one) at every check length and head dim, bf16, ``kernels_gpu.py``'s metric and thresholds,
(3) ``||mosaic - pallas|| / ||pallas||`` of the output, final state and every gradient at
the shape (bf16, with an initial state), and (4) the median time of the forward and of
fwd+bwd for mosaic with each backward (``MosaicConfig(backward=...)``) and for pallas, with
the same host-clock method as ``kernels_gpu.py``, plus the Mosaic backward's two kernels
alone. Needs an sm_90 GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels_gpu as kg  # noqa: E402  (input recipe, timing)

from linearnexus.kernels.base import GridConfig, dispatch  # noqa: E402
from linearnexus.kernels.common.mosaic_chunk import MosaicConfig  # noqa: E402
from linearnexus.kernels.simple_gla import api  # noqa: E402

#: one pipeline stage in every Mosaic kernel: two programs per SM
ONE_STAGE = MosaicConfig(stages=1, bwd_stages=1, dqk_stages=1, backward="mosaic")


def chosen(dtype, cu_seqlens) -> str:
    """The backend dispatch settles on: the first in order whose ``supports`` says yes and
    whose call does not raise NotImplementedError (the call here: the real op, traced)."""
    q = jnp.ones((1, 128, 2, 64), dtype)
    g = -jnp.ones((1, 128, 2), jnp.float32)

    def call(kernel):
        jax.eval_shape(lambda q, g: kernel.forward_chunk(q, q, q, g, initial_state=None,
                                                         grid=GridConfig(chunk_size=64),
                                                         scale=0.125, cu_seqlens=cu_seqlens), q, g)
        return kernel.name

    return dispatch("simple_gla", api.BACKENDS, api.BACKEND_ORDER, call, backend=None, dtype=dtype)


def check_no_state(T: int, D: int, seed: int, config: MosaicConfig | None = None) -> None:
    """mosaic (Mosaic backward) vs the per-step reference, no initial state, bf16 inputs
    (``config``: the mosaic backend's overrides for this check)."""
    B, H = 2, 4
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    inputs = kg.jax_inputs("simple_gla", k1, B, T, H, D, D, jnp.bfloat16)
    names = list(inputs)
    do = jax.random.normal(k2, (B, T, H, D), jnp.float32)
    dht = jax.random.normal(k3, (B, H, D, D), jnp.float32)

    def make(backend):
        def loss(args):
            o, ht = api.simple_gla(*args, output_final_state=True, backend=backend,
                                   **({"mode": "chunk"} if backend != "naive" else {}))
            return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(ht * dht), (o, ht)
        return jax.jit(jax.grad(loss, has_aux=True))

    api.BACKENDS["mosaic"].config = config
    try:
        g, (o, ht) = make("mosaic")(tuple(inputs[n] for n in names))
    finally:
        api.BACKENDS["mosaic"].config = None
    with jax.default_matmul_precision("highest"):
        rg, (ro, rht) = make("naive")(tuple(inputs[n].astype(jnp.float32) for n in names))
    errors = {"o": kg.rel_err(o, ro), "ht": kg.rel_err(ht, rht)}
    errors.update({f"d{n}": kg.rel_err(a, b) for n, a, b in zip(names, g, rg, strict=True)})
    ok, bad = kg.judge(errors, {f"d{n}" for n in names}, "bfloat16")
    print(f"{'PASS' if ok else 'FAIL'} no initial state T={T} D={D} {config or ''}: "
          + " ".join(f"{n}={e:.1e}" for n, e in errors.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="8,4096,16,128")
    parser.add_argument("--check-seqs", nargs="*", type=int, default=[63, 1000, 4096])
    parser.add_argument("--check-dims", nargs="*", type=int, default=[64, 128])
    args = parser.parse_args()
    B, T, H, D = (int(x) for x in args.shape.split(","))
    cu = jnp.array([0, 50, 128], jnp.int32)
    print("dispatch: bf16 dense ->", chosen(jnp.bfloat16, None), "| bf16 packed ->",
          chosen(jnp.bfloat16, cu), "| float32 dense ->", chosen(jnp.float32, None), flush=True)
    for i, (cd, cs) in enumerate((d, s) for d in args.check_dims for s in args.check_seqs):
        try:
            check_no_state(cs, cd, 7000 + i)
        except Exception as e:  # noqa: BLE001 - report and go on to the timing
            print(f"ERROR no initial state T={cs} D={cd}: {kg.short_error(e)}", flush=True)
    for i, (cs, cd) in enumerate(((63, 64), (1000, 128), (4096, 128))):  # one stage everywhere
        try:
            check_no_state(cs, cd, 7100 + i, ONE_STAGE)
        except Exception as e:  # noqa: BLE001
            print(f"ERROR no initial state T={cs} D={cd} {ONE_STAGE}: {kg.short_error(e)}",
                  flush=True)
    inputs = tuple(kg.jax_inputs("simple_gla", jax.random.PRNGKey(0), B, T, H, D, D,
                                 jnp.bfloat16).values())
    h0 = jax.random.normal(jax.random.PRNGKey(1), (B, H, D, D), jnp.float32)
    do = jax.random.normal(jax.random.PRNGKey(99), (B, T, H, D), jnp.float32).astype(jnp.bfloat16)
    outs = {}
    for backend, config in (("mosaic", None), ("mosaic1", ONE_STAGE), ("pallas", None)):
        api.BACKENDS["mosaic"].config = config

        def full(args, h0, b=backend.rstrip("1")):
            o, ht = api.simple_gla(*args, initial_state=h0, output_final_state=True, backend=b,
                                   mode="chunk")
            return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(ht), (o, ht)

        grads, (o, ht) = jax.jit(jax.grad(full, argnums=(0, 1), has_aux=True))(inputs, h0)
        outs[backend] = [np.asarray(x, np.float64) for x in (o, ht, *grads[0], grads[1])]
        api.BACKENDS["mosaic"].config = None
    for which in ("mosaic", "mosaic1"):
        errs = []
        for i, name in enumerate(("o", "final", "dq", "dk", "dv", "dg", "dh0")):
            a, b = outs[which][i], outs["pallas"][i]
            errs.append(f"{name}={np.linalg.norm(a - b) / np.linalg.norm(b):.2e}")
        print(f"{which} vs pallas: {' '.join(errs)}", flush=True)
    del outs
    l2 = 60 * 2 ** 20
    n_sets = kg.input_sets(kg.input_bytes("simple_gla", B, T, H, D, D), l2)
    sets = [tuple(kg.jax_inputs("simple_gla", jax.random.PRNGKey(100 + i), B, T, H, D, D,
                                jnp.bfloat16).values()) for i in range(n_sets)]
    best = time_parts(B, T, H, D, sets, n_sets, do)
    runs = [("mosaic", MosaicConfig(backward="mosaic")), ("mosaic", best), ("mosaic", ONE_STAGE),
            ("mosaic", MosaicConfig(backward="pallas")), ("pallas", None)]
    for backend, config in runs:
        kernel = api.BACKENDS[backend]
        kernel.config = config
        label = backend + ("" if config is None else f" {config}")
        try:
            def fwd(*a, b=backend):
                return api.simple_gla(*a, backend=b, mode="chunk")[0]

            def loss(do, *a, fwd=fwd):
                return jnp.sum(fwd(*a).astype(jnp.float32) * do.astype(jnp.float32))

            f = jax.jit(fwd)
            fb = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4)))
            t = kg.host_time(lambda i, f=f: f(*sets[i % n_sets]), kg.jax_sync, repeats=5,
                             n_sets=n_sets)
            tb = kg.host_time(lambda i, fb=fb: fb(do, *sets[i % n_sets]), kg.jax_sync, repeats=5,
                              n_sets=n_sets)
            print(f"{label}: fwd {t['ms']:.3f} ms, fwd+bwd {tb['ms']:.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
            print(f"{label}: {kg.short_error(e)}", flush=True)
        finally:
            kernel.config = None


def time_parts(B: int, T: int, H: int, D: int, sets, n_sets: int, do) -> MosaicConfig:
    """The Mosaic kernels alone, in the chunk layout (T a multiple of 64), at their deepest
    pipeline and at one stage (two programs per SM): the forward, the forward that stores
    the states, the reverse walk (dv, dS), the dq / dk kernel. Returns the config of the
    fastest depth of each knob."""
    import dataclasses

    from linearnexus.kernels.common import mosaic_bwd, mosaic_chunk
    from linearnexus.kernels.common.pallas_chunk import CoreStatic, in_chunk_cumsum

    core = CoreStatic(gate="scalar", delta=False, has_h0=False, scale=D ** -0.5, rows=B,
                      n_chunks=T // 64, chunk=64, heads=H, key_dim=D, value_dim=D, n_seqs=B,
                      block_k=64, block_v=64, num_warps=4, num_stages=2, interpret=False,
                      packed=False)
    cfg = mosaic_chunk.default_mosaic_config(rows=B, heads=H, key_dim=D, value_dim=D,
                                             n_chunks=T // 64)
    base = mosaic_chunk.MosaicStatic(core=core, block_v=cfg.block_v, stages=cfg.stages,
                                     backward="mosaic")
    dfinal = jnp.zeros((B, H, D, D), jnp.float32)
    b = in_chunk_cumsum(sets[0][3], 64)
    gates = mosaic_chunk.gate_rows(b, 64, D)
    best: dict[str, tuple[float, int | None]] = {}

    def timed(name: str, knob: str, value: int | None, call) -> None:
        try:
            t = kg.host_time(call, kg.jax_sync, repeats=5, n_sets=n_sets)
            print(f"  {name} {knob}={value}: {t['ms']:.3f} ms", flush=True)
            if knob not in best or t["ms"] < best[knob][0]:
                best[knob] = (t["ms"], value)
        except Exception as e:  # noqa: BLE001
            print(f"  {name} {knob}={value}: {kg.short_error(e)}", flush=True)

    h = dh = None
    for stages in (3, 1):
        st = dataclasses.replace(base, stages=stages, bwd_stages=stages)
        fwd = jax.jit(lambda q, k, v, g, st=st: mosaic_chunk.mosaic_forward(
            st, q, k, v, in_chunk_cumsum(g, 64), None))
        timed("forward", "stages", stages, lambda i, f=fwd: f(*sets[i % n_sets]))
        fwd_states = jax.jit(lambda q, k, v, g, st=st: mosaic_chunk.mosaic_forward(
            st, q, k, v, in_chunk_cumsum(g, 64), None, store_states=True))
        timed("forward + states", "bwd_stages (forward)", stages,
              lambda i, f=fwd_states: f(*sets[i % n_sets]))
        h = fwd_states(*sets[0])[2]
    for stages in (None, 1):
        st = dataclasses.replace(base, bwd_stages=stages)
        state_grad = jax.jit(lambda q, k, st=st: mosaic_bwd.run_state_grad(st, q, k, do, gates,
                                                                           dfinal))
        timed("state_grad (dv, dS)", "bwd_stages", stages,
              lambda i, f=state_grad: f(*sets[i % n_sets][:2]))
        dh = state_grad(*sets[0][:2])[1]
    for stages in (None, 1):
        st = dataclasses.replace(base, dqk_stages=stages)
        dqk = jax.jit(lambda q, k, v, st=st: mosaic_bwd.run_dqk(st, q, k, v, do, h, dh, gates))
        timed("dqk (dq, dk, dg terms)", "dqk_stages", stages,
              lambda i, f=dqk: f(*sets[i % n_sets][:3]))
    # bwd_stages sets the forward that stores the states and the reverse walk together: the
    # walk's best is taken (compare the two "forward + states" lines by eye)
    pick = {knob: value for knob, (_, value) in best.items() if " " not in knob}
    print(f"  fastest: {pick}", flush=True)
    return MosaicConfig(backward="mosaic", **pick)


if __name__ == "__main__":
    main()
