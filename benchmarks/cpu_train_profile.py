"""Where one training step's time goes on the CPU, for the nanoGPT Shakespeare-char recipe.

    python benchmarks/cpu_train_profile.py [--models gpt-small mamba2-small gated-deltanet-small]
                                           [--steps 30] [--top 8]

For each model (trained with the settings of ``configs/models/gpt_nanogpt_cpu.yaml``, through
the real :class:`~linearnexus.train.SFTTrainer`): the compile time of the step; the step's
wall time when each step is waited for and when steps are dispatched back to back; the host
time of one ``train_step`` call (Python, argument flattening, dispatch); one batch of the
data loader; the optimizer's update alone (jitted, on a copy of the state); one evaluation
(20 windows); one checkpoint; what logging costs; and the XLA
ops that take the most time in a ``jax.profiler`` trace of a few steps, grouped by kind.
Prints a table per model and the share of a 2000-step run each part takes.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_recipe  # noqa: E402


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _op_kind(name: str) -> str:
    """Coarse kind of an XLA CPU op from its HLO name (``dot.12``, ``loop_add_fusion`` ...);
    ``ynn_fusion``: a YNNPACK fusion (XLA:CPU's matmuls, with the elementwise ops it took in)."""
    base = re.sub(r"[.\d]+$", "", name)
    for kind in ("ynn_fusion", "dot", "convolution", "custom-call", "while", "reduce", "scatter", "gather",
                 "copy", "transpose", "fusion", "sort"):
        if kind in base:
            return kind
    return base


def profile_model(preset: str, steps: int, top: int, root: Path) -> dict:
    import jax

    from linearnexus.tools.profile import op_times

    trainer = cpu_recipe.make_trainer(preset, root / preset)
    cfg = trainer.config
    n_params = sum(int(x.size) for x in jax.tree.leaves(trainer.state.params))
    batches = [next(trainer.train_loader) for _ in range(steps + 8)]
    start = time.perf_counter()
    jax.block_until_ready(trainer.train_step(*batches[0]))
    compile_s = time.perf_counter() - start
    for b in batches[1:4]:  # warm the allocator
        trainer.train_step(*b)
    jax.block_until_ready(trainer.state.params)

    it = iter(batches[4:] * 3)
    sync_ms = _median_ms(lambda: jax.block_until_ready(trainer.train_step(*next(it))), steps)
    host = []
    start = time.perf_counter()
    for b in batches[:steps]:
        t0 = time.perf_counter()
        trainer.train_step(*b)
        host.append(time.perf_counter() - t0)
    jax.block_until_ready(trainer.state.params)
    piped_ms = 1e3 * (time.perf_counter() - start) / steps
    host_ms = 1e3 * statistics.median(host)

    # the optimizer's share: its update (clipping included) and apply alone, jitted, on a
    # copy of the state with a stand-in gradient (every device of a data-parallel step runs
    # it whole: the state is replicated)
    import optax

    state = jax.tree.map(lambda x: x.copy(), trainer.state)
    grads = jax.tree.map(lambda p: 1e-3 * jax.numpy.ones_like(p), state.params)

    @jax.jit
    def update(grads, opt_state, params):
        updates, opt_state = trainer.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    jax.block_until_ready(update(grads, state.opt_state, state.params))
    opt_ms = _median_ms(lambda: jax.block_until_ready(
        update(grads, state.opt_state, state.params)), 30)

    loader = trainer.train_loader
    data_ms = _median_ms(lambda: next(loader), 50)
    start = time.perf_counter()
    trainer.evaluate()
    eval_compile_s = time.perf_counter() - start
    eval_ms = _median_ms(trainer.evaluate, 3)
    losses = [trainer.train_step(*b) for b in batches[:cfg.log_interval]]
    log_ms = _median_ms(lambda: float(sum(float(x) for x in losses)), 5)
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = []
    for _ in range(2):
        trainer.train_step(*batches[0])
        t0 = time.perf_counter()
        trainer.save_checkpoint({"val_loss": 2.0})
        ckpt.append(time.perf_counter() - t0)
    ckpt_ms = 1e3 * ckpt[-1]

    trace = root / f"trace-{preset}"
    jax.block_until_ready(trainer.state.params)
    n_traced = 5
    with jax.profiler.trace(str(trace)):
        for b in batches[:n_traced]:
            trainer.train_step(*b)
        jax.block_until_ready(trainer.state.params)
    ops = [o for o in op_times(trace) if "eval" not in o.module]
    kinds: dict[str, float] = {}
    for o in ops:
        kinds[_op_kind(o.name)] = kinds.get(_op_kind(o.name), 0.0) + o.total_ms / n_traced
    op_total = sum(kinds.values())

    n_evals = cfg.max_steps // cfg.eval_interval + 1 if cfg.eval_interval else 2
    n_ckpt = cfg.max_steps // cfg.resolved_checkpoint_interval
    n_logs = cfg.max_steps // cfg.log_interval
    parts = {
        "steps (device)": cfg.max_steps * piped_ms,
        "data loading": cfg.max_steps * data_ms,
        "evaluation": n_evals * eval_ms,
        "checkpoints": n_ckpt * ckpt_ms,
        "logging": n_logs * log_ms,
        "compile": 1e3 * (compile_s + eval_compile_s),
    }
    tokens = cfg.batch_size * cfg.seq_len
    print(f"\n== {preset}: {n_params:,} parameters, B={cfg.batch_size} T={cfg.seq_len}, "
          f"{jax.local_device_count()} device(s)")
    print(f"step compile {compile_s:.2f} s; eval compile {eval_compile_s:.2f} s")
    print(f"step, waited for each: {sync_ms:.2f} ms ({tokens / sync_ms * 1e3:,.0f} tok/s); "
          f"back to back: {piped_ms:.2f} ms ({tokens / piped_ms * 1e3:,.0f} tok/s)")
    print(f"host time of one train_step call: {host_ms:.3f} ms; one batch from the loader: "
          f"{data_ms:.3f} ms; the optimizer update alone: {opt_ms:.2f} ms")
    print(f"one evaluation ({cfg.eval_batches} batches): {eval_ms:.1f} ms; one checkpoint: "
          f"{ckpt_ms:.1f} ms; one log record ({cfg.log_interval} losses fetched): {log_ms:.3f} ms")
    total = sum(parts.values())
    print(f"a {cfg.max_steps}-step run, estimated {total / 1e3:.1f} s:")
    for name, ms in parts.items():
        print(f"  {name:16s} {ms / 1e3:7.2f} s  {100 * ms / total:5.1f}%")
    print(f"XLA ops per step ({op_total:.2f} ms traced, by kind):")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {kind:24s} {ms:7.2f} ms  {100 * ms / op_total:5.1f}%")
    print("slowest ops:")
    for o in ops[:top]:
        print(f"  {o.name[:48]:48s} {o.total_ms / n_traced:7.3f} ms/step")
    return {"preset": preset, "params": n_params, "compile_s": compile_s, "sync_ms": sync_ms,
            "piped_ms": piped_ms, "host_ms": host_ms, "data_ms": data_ms, "opt_ms": opt_ms,
            "eval_ms": eval_ms,
            "ckpt_ms": ckpt_ms, "log_ms": log_ms, "kinds": kinds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt-small", "mamba2-small",
                                                    "gated-deltanet-small"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--keep", metavar="DIR", default=None,
                   help="write the runs and traces here and keep them (default: a temp folder)")
    args = p.parse_args()
    cpu_recipe.prepare()
    import jax
    from common import machine

    print(machine(), jax.__version__)
    if args.keep is not None:
        for preset in args.models:
            profile_model(preset, args.steps, args.top, Path(args.keep))
        return
    with tempfile.TemporaryDirectory(prefix="ln-cpuprof-") as tmp:
        for preset in args.models:
            profile_model(preset, args.steps, args.top, Path(tmp))


if __name__ == "__main__":
    main()
