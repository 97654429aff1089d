"""Whole-LM training on the GPU through the ``mosaic`` backend (issue 26): the same losses as
the ``jax`` backend, and training tokens/s against the Triton (``pallas``) kernels and FLA
0.6.0's ``GatedDeltaNetForCausalLM``, in one call.

On the H200 (FLA carried as wheels in .whl/, as benchmarks/kernels_gpu.py does)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    PYTHONUNBUFFERED=1 python3 benchmarks/lm_train_gpu.py --out $OUT     # ~240 s

CPU check of the whole script (tiny sizes, jax against jax and naive, no FLA, ~60 s)::

    python benchmarks/lm_train_gpu.py --quick --cpu --out /tmp/lm_train_gpu

What it does, in order (``--parts``; a run not started when ``--budget`` seconds are spent is
skipped, and said so; the JSON and markdown under ``--out`` are rewritten after every run,
so a killed call keeps what it finished):

1. **Losses** (``losses``). For each of ``--loss-models`` (gdn, mamba2) a small LM (d_model
   256, 2 layers, vocab 256: TinyShakespeare bytes, T = 1000, not a multiple of the chunk,
   batch 4; GDN 4 heads of K = 64, V = 128; Mamba2 d_state 64, headdim 64, 8 heads: the head
   shapes of the throughput model), float32 parameters and bf16 compute (as ``train_lm.py``
   trains on a GPU), ``SFTTrainer``'s AdamW (lr 1e-3, 5 warm-up steps, cosine, clip 1.0),
   trained ``--loss-steps`` (50) steps from the same init (seed 0) on the same batches
   (``common.shakespeare_batches``), once per backend: the reference (``jax``, pinned through
   the block option ``kernel_backend``), ``jax`` again (the run-to-run noise floor: XLA's
   scatter-add in the embedding gradient is not deterministic on a GPU), then the first of
   ``--loss-backends`` (``mosaic``). Per step ``|loss_b - loss_jax| / loss_jax``; PASS when
   its maximum over the steps is <= ``--loss-tol``. The other ``--loss-backends``
   (``pallas``) run after FLA, if time is left. (Mamba2's ``v = dt * x`` is float32; the
   mosaic backend rounds it to bf16, ``mosaic_ops.mosaic_dtype``.)
2. **Throughput** (``throughput``). A Gated DeltaNet LM: d_model 1024, 12 layers, vocab 8192,
   16 heads of K = 64, V = 128, SwiGLU MLP (hidden 2752), tied embeddings (~211M
   parameters), T = 2048, batch 8, float32 parameters, bf16 compute, AdamW; per backend in
   ``--backends`` (``mosaic``, ``pallas``; ``mosaic-bwd`` and ``mosaic-fused-grad`` are
   ``mosaic`` with a config on the delta rules' kernel, :data:`VARIANTS`, which
   ``--loss-backends`` also takes): ``--warmup`` steps (the first compiles), then
   ``--steps`` steps each blocked with ``jax.block_until_ready``: median ms/step and
   tokens/s = B T / median. The first step's seconds are split (``first_step_parts``, from
   JAX's compile-phase events) into tracing, lowering (the Pallas kernels' own lowering
   included), XLA's compile and the first run.
3. **FLA** (``fla``). FLA 0.6.0's ``GatedDeltaNetForCausalLM`` of the same sizes (16 heads
   of ``head_dim`` 64, ``expand_v`` 2, ``intermediate_size`` 2752, tied embeddings), float32
   parameters under ``torch.autocast(bfloat16)``, ``labels=`` (FLA's fused cross-entropy),
   ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW(fused=True)``, the same batches, in a child
   process bounded by what is left of the budget; the same warm-up (its first steps
   autotune its Triton kernels) and timing, with ``torch.cuda.synchronize``. On Hopper with
   Triton < 3.7.1 FLA 0.6.0 refuses its gated backward (FLA issue #640); as kernels_gpu.py
   does, the child sets ``TRITON_ABOVE_3_7_1`` for timing only, and says so. Skipped with a
   note when torch or fla is not importable or there is no CUDA GPU.

The tolerance (``--loss-tol`` 2e-2). Two correct bf16 implementations differ at step 0 by
the forward's rounding averaged over B T tokens (well under the kernels' 5e-3 output
threshold); after that the runs follow slightly different parameters (gradients agree to
~1e-2 per kernel, AdamW normalises each update), and the difference grows slowly with the
steps. 2e-2 is twice the kernels' gradient threshold; a real defect (a wrong gate, a lost
term, a state not carried across chunks) moves the losses by far more within a few steps
(the loss of a byte-level LM drops from ~5.5 to ~2.5 over these 50 steps). The jax-again
row and the CPU's jax-vs-naive row (``--quick --cpu``) show the measured noise next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: sizes of each part: the GPU defaults and the ``--quick`` ones (a CPU check of the code)
SIZES = {
    "full": {"loss_d": 256, "loss_layers": 2, "loss_vocab": 256, "loss_seq": 1000,
             "loss_batch": 4, "loss_heads": 4, "head_dim": 64, "d_state": 64,
             "d_model": 1024, "layers": 12, "vocab": 8192, "heads": 16, "seq": 2048,
             "batch": 8, "dtype": "bfloat16"},
    "quick": {"loss_d": 32, "loss_layers": 1, "loss_vocab": 64, "loss_seq": 65,
              "loss_batch": 2, "loss_heads": 2, "head_dim": 16, "d_state": 16,
              "d_model": 32, "layers": 1, "vocab": 64, "heads": 2, "seq": 128,
              "batch": 2, "dtype": "bfloat16"},
}
PARTS = ("losses", "throughput", "fla")


#: backend names beyond the ops' own (timed and loss runs): ``mosaic`` with a
#: ``MosaicConfig`` on the delta rules' kernel: ``mosaic-bwd`` the Mosaic backward (the
#: default now), ``mosaic-fused-grad`` the gradient from ``M^{-1}`` (``fused_grad``)
MOSAIC_BWD = "mosaic-bwd"
MOSAIC_FUSED_GRAD = "mosaic-fused-grad"
VARIANTS = {MOSAIC_BWD: {"backward": "mosaic"},
            MOSAIC_FUSED_GRAD: {"backward": "mosaic", "fused_wy": True, "fused_grad": True}}


@contextlib.contextmanager
def _variant(backend: str):
    """Yields the op backend to name: ``backend`` itself, or for a :data:`VARIANTS` name
    ``"mosaic"`` with that variant's config set on the delta rules' mosaic kernel for the
    duration."""
    if backend not in VARIANTS:
        yield backend
        return
    from linearnexus.kernels.common.mosaic_chunk import MosaicConfig
    from linearnexus.kernels.gated_delta_rule import api

    kernel = api.BACKENDS["mosaic"]
    before, kernel.config = kernel.config, MosaicConfig(**VARIANTS[backend])
    try:
        yield "mosaic"
    finally:
        kernel.config = before


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module doc); ``--quick`` / ``--cpu`` fill in their defaults."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--loss-models", nargs="+", default=["gdn", "mamba2"], choices=["gdn", "mamba2"])
    p.add_argument("--loss-backends", nargs="+", default=None,
                   help="compared with jax; the first runs before the throughput, the others "
                   "after FLA (default: mosaic pallas; --cpu: naive)")
    p.add_argument("--loss-steps", type=int, default=50)
    p.add_argument("--loss-tol", type=float, default=2e-2,
                   help="max relative loss difference per step that passes (module doc)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="timed LinearNexus backends (default: mosaic pallas; --cpu: jax); "
                        f"{', '.join(VARIANTS)}: mosaic with a config (VARIANTS)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--budget", type=float, default=240.0,
                   help="seconds; runs not started by then are skipped")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a code-path check)")
    p.add_argument("--cpu", action="store_true", help="run JAX on the CPU (no FLA)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for lm_train_gpu.json / .md (default $OUT, else benchmarks/results)")
    p.add_argument("--fla-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("loss_steps", "warmup", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if args.budget <= 0:
        p.error(f"--budget: expected positive seconds, got {args.budget}")
    if args.loss_backends is None:
        args.loss_backends = ["naive"] if args.cpu else ["mosaic", "pallas"]
    if args.backends is None:
        args.backends = ["jax"] if args.cpu else ["mosaic", "pallas"]
    if args.quick and args.steps == 10:
        args.steps, args.warmup = 2, 1
    if args.out is None:
        args.out = Path(os.environ.get("OUT") or HERE / "results")
    args.sizes = dict(SIZES["quick" if args.quick else "full"])
    return args


# ---- LinearNexus side ----------------------------------------------------------------------


def lm_config(kind: str, backend: str, *, d: int, layers: int, vocab: int, heads: int,
              head_dim: int, d_state: int, seq: int, dtype: str) -> Any:
    """A GDN or Mamba2 LM whose every layer runs its op on ``backend`` (block option
    ``kernel_backend``: a call that backend cannot run raises instead of falling back)."""
    from linearnexus.models import ModelConfig

    common = dict(vocab_size=vocab, d_model=d, n_layers=layers, dtype=dtype,
                  param_dtype="float32", max_seq_len=seq)
    if kind == "gdn":
        return ModelConfig(block_pattern=("gated_deltanet",), block_options={"gated_deltanet": {
            "num_heads": heads, "head_dim": head_dim, "expand_v": 2.0, "kernel_backend": backend}},
            **common)
    if kind == "mamba2":
        return ModelConfig(block_pattern=("mamba2",), mlp=False, block_options={"mamba2": {
            "d_state": d_state, "headdim": head_dim, "expand": 2, "kernel_backend": backend}},
            **common)
    raise ValueError(f"kind: expected gdn or mamba2, got {kind!r}")


def trainer(cfg: Any, *, batch: int, seq: int, steps: int, tx: Any = None) -> Any:
    """An ``SFTTrainer`` (no loader, no val set) over ``create_model(cfg, seed=0)``."""
    from linearnexus.models import create_model
    from linearnexus.train import SFTTrainer, TrainConfig

    tc = TrainConfig(max_steps=steps, batch_size=batch, seq_len=seq, progress=False,
                     out_dir=tempfile.mkdtemp(prefix="lm_train_gpu-"), lr=1e-3,
                     warmup_steps=max(1, steps // 10))
    return SFTTrainer(create_model(cfg, seed=0), tx, None, None, tc)


def loss_run(kind: str, backend: str, args: argparse.Namespace, txs: dict) -> dict[str, Any]:
    """``--loss-steps`` losses of the small ``kind`` LM on ``backend``. Runs of one kind share
    their optax object, so a repeated backend reuses the compiled step."""
    import jax
    from common import shakespeare_batches

    s = args.sizes
    with _variant(backend) as op_backend:
        cfg = lm_config(kind, op_backend, d=s["loss_d"], layers=s["loss_layers"],
                        vocab=s["loss_vocab"], heads=s["loss_heads"], head_dim=s["head_dim"],
                        d_state=s["d_state"], seq=s["loss_seq"], dtype=s["dtype"])
        # (a variant's own optax object: the step compiled for another config is not reused)
        t = trainer(cfg, batch=s["loss_batch"], seq=s["loss_seq"], steps=args.loss_steps,
                    tx=None if backend in VARIANTS else txs.get(kind))
        if backend not in VARIANTS:
            txs.setdefault(kind, t.tx)
        batch_of = shakespeare_batches(s["loss_batch"], s["loss_seq"], s["loss_vocab"])
        start = time.perf_counter()
        losses = [float(jax.device_get(t.train_step(*batch_of(i))))
                  for i in range(args.loss_steps)]
    return {"model": kind, "backend": backend, "losses": losses,
            "seconds": round(time.perf_counter() - start, 1)}


def compare(ref: dict[str, Any], run: dict[str, Any], tol: float) -> dict[str, Any]:
    """Per-step ``|l - l_ref| / |l_ref|``, its maximum and step, and the verdict (a
    non-finite loss fails)."""
    rel = [abs(a - b) / abs(b) if math.isfinite(a) and math.isfinite(b) and b else math.inf
           for a, b in zip(run["losses"], ref["losses"], strict=True)]
    worst = max(range(len(rel)), key=rel.__getitem__)
    return {"rel_diff": rel, "max_rel_diff": rel[worst], "at_step": worst,
            "status": "PASS" if rel[worst] <= tol else "FAIL"}


#: JAX's compile-phase duration events (``jax._src.dispatch``; the same names on 0.10 and
#: 0.11) and the short name each gets in a row's ``first_step_parts``
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "compile"}
_phases: dict[str, float] | None = None  # summed durations while a first step is measured
_listening = False  # the listener is registered (once per process)


def _on_event(event: str, duration: float, **_: Any) -> None:
    if _phases is not None and event in COMPILE_EVENTS:
        name = COMPILE_EVENTS[event]
        _phases[name] = _phases.get(name, 0.0) + duration


@contextlib.contextmanager
def compile_phases() -> Any:
    """Yields a dict that fills, during the block, with the seconds JAX spent tracing,
    lowering to StableHLO (the Pallas kernels' own lowering included) and in XLA's compile;
    what the block took beyond their sum is the first run (a Mosaic GPU kernel whose module
    is compiled when first launched shows there). The listener is registered once per
    process (jax.monitoring has no public way to remove one)."""
    global _phases, _listening
    import jax

    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listening = True
    _phases = {}
    try:
        yield _phases
    finally:
        _phases = None


def throughput_run(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """ms/step and tokens/s of the GDN LM on ``backend`` (module doc, part 2)."""
    with _variant(backend) as op_backend:
        return {**_throughput_run(op_backend, args), "backend": backend}


def _throughput_run(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    import jax
    from common import shakespeare_batches

    s = args.sizes
    cfg = lm_config("gdn", backend, d=s["d_model"], layers=s["layers"], vocab=s["vocab"],
                    heads=s["heads"], head_dim=s["head_dim"], d_state=s["d_state"],
                    seq=s["seq"], dtype=s["dtype"])
    t = trainer(cfg, batch=s["batch"], seq=s["seq"], steps=args.warmup + args.steps)
    params = sum(int(x.size) for x in jax.tree.leaves(t.state.params))
    batch_of = shakespeare_batches(s["batch"], s["seq"], s["vocab"])
    start = time.perf_counter()
    with compile_phases() as phases:
        jax.block_until_ready(t.train_step(*batch_of(0)))
    first = time.perf_counter() - start
    parts = {k: round(phases.get(k, 0.0), 1) for k in ("trace", "lower", "compile")}
    parts["run"] = round(first - sum(phases.values()), 1)  # the first run, launches' own work
    for i in range(1, args.warmup):
        jax.block_until_ready(t.train_step(*batch_of(i)))
    times, loss = [], None
    for i in range(args.steps):
        x, y = batch_of(args.warmup + i)
        t0 = time.perf_counter()
        loss = jax.block_until_ready(t.train_step(x, y))
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    row = {"framework": "linearnexus", "backend": backend, "params": params,
           "ms_per_step": sec * 1e3, "tokens_per_s": s["batch"] * s["seq"] / sec,
           "first_step_s": round(first, 1), "first_step_parts": parts,
           "last_loss": float(loss)}
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    if "peak_bytes_in_use" in stats:
        row["peak_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 1)
    return row


# ---- FLA side (child process) -------------------------------------------------------------


def fla_child(args: argparse.Namespace) -> None:
    """(child) FLA's GatedDeltaNetForCausalLM trained as part 2 times ours; JSON to the file
    (``{"error": ...}`` when torch, a CUDA GPU or fla is missing)."""
    try:
        import fla.models as fm
        import torch
        if not torch.cuda.is_available():
            raise ImportError("torch sees no CUDA GPU")
    except Exception as e:  # noqa: BLE001 - any import failure: report it, skip FLA
        Path(args.fla_child).write_text(json.dumps(
            {"framework": "fla", "error": f"FLA not importable: {type(e).__name__}: {e}"}))
        return
    import kernels_gpu as kg
    from common import shakespeare_batches

    from linearnexus.modules.common import swiglu_hidden_size

    s = args.sizes
    env = kg.environment(torch)
    notes = []
    if kg.unlock_fla_gated_backward(env):  # as kernels_gpu.py: timing only (FLA issue #640)
        notes.append("fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 forced True (Triton "
                     f"{env.get('triton')} < 3.7.1 on Hopper; timing only: FLA issue #640)")
    d = s["d_model"]
    config = fm.GatedDeltaNetConfig(
        hidden_size=d, num_hidden_layers=s["layers"], vocab_size=s["vocab"],
        head_dim=s["head_dim"], num_heads=s["heads"], expand_v=2.0,
        intermediate_size=swiglu_hidden_size(d, 64), tie_word_embeddings=True,  # as ours
        max_position_embeddings=s["seq"], use_cache=False)
    model = fm.GatedDeltaNetForCausalLM(config).cuda().train()  # float32 master weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)
    batch_of = shakespeare_batches(s["batch"], s["seq"], s["vocab"])

    last_loss: list[float] = []

    def step(i: int) -> float:
        x = torch.from_numpy(batch_of(i)[0]).long().cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss  # FLA shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        last_loss[:] = [float(loss)]
        return time.perf_counter() - t0

    first = step(0)
    for i in range(1, args.warmup):
        step(i)
    times = [step(args.warmup + i) for i in range(args.steps)]
    sec = statistics.median(times)
    row = {"framework": "fla", "backend": "fla 0.6.0 (Triton)",
           "params": sum(p.numel() for p in model.parameters()), "ms_per_step": sec * 1e3,
           "tokens_per_s": s["batch"] * s["seq"] / sec, "first_step_s": round(first, 1),
           "last_loss": last_loss[0], "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1),
           "notes": notes, "versions": {k: env.get(k) for k in (
               "torch", "triton", "fla_core", "flash_linear_attention")}}
    Path(args.fla_child).write_text(json.dumps(row))


def run_fla(args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """Part 3 in a child process given ``seconds`` at most."""
    result = Path(tempfile.mkdtemp(prefix="lm_train_gpu-")) / "fla.json"
    cmd = [sys.executable, __file__, "--fla-child", str(result), "--warmup", str(args.warmup),
           "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
    try:
        proc = subprocess.run(cmd, timeout=seconds)
    except subprocess.TimeoutExpired:
        return {"framework": "fla", "error": f"not done within the {seconds:.0f} s left "
                "(first-call autotuning); rerun with --parts fla"}
    if proc.returncode or not result.exists():
        return {"framework": "fla", "error": f"child exited with {proc.returncode} (its log above)"}
    return json.loads(result.read_text())


# ---- report -------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    env, s = res["env"], res["sizes"]
    lines = ["## Whole-LM training through the mosaic backend (issue 26)", "",
             f"{env.get('date_utc')}, {env.get('gpu')}, JAX {env.get('jax')}, torch "
             f"{env.get('torch')}, Triton {env.get('triton')}, FLA "
             f"{env.get('flash_linear_attention')}; `python3 benchmarks/lm_train_gpu.py "
             f"{' '.join(res['argv'])}`.", ""]
    if res["losses"]:
        lines += [f"Losses: small LMs (d_model {s['loss_d']}, {s['loss_layers']} layers, vocab "
                  f"{s['loss_vocab']}, T = {s['loss_seq']}, batch {s['loss_batch']}, bf16 "
                  f"compute), {res['loss_steps']} AdamW steps from the same init and batches; "
                  f"relative loss difference to the jax backend, tolerance {res['loss_tol']:g}.",
                  "", "| model | backend | first loss | last loss | max rel. diff | at step | |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for r in res["losses"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['backend']} | error: {r['error'][:90]} | | | | |")
                continue
            c = r.get("vs_jax")
            lines.append(f"| {r['model']} | {r['label']} | {r['losses'][0]:.4f} | "
                         f"{r['losses'][-1]:.4f} | "
                         + (f"{c['max_rel_diff']:.2e} | {c['at_step']} | {c['status']} |" if c
                            else "(reference) | | |"))
        lines.append("")
    if res["throughput"]:
        lines += [f"Throughput: GDN LM d_model {s['d_model']}, {s['layers']} layers, vocab "
                  f"{s['vocab']}, {s['heads']} heads of K = {s['head_dim']}, V = "
                  f"{2 * s['head_dim']}, T = {s['seq']}, batch {s['batch']}, bf16 compute, float32 "
                  f"AdamW; median of {res['steps']} steps after {res['warmup']}.", "",
                  "| framework | backend | params | ms/step | tokens/s | vs pallas | first step s "
                  "| peak GiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        base = next((r["tokens_per_s"] for r in res["throughput"]
                     if r.get("backend") == "pallas" and "tokens_per_s" in r), None)
        for r in res["throughput"]:
            if "error" in r:
                lines.append(f"| {r['framework']} | {r.get('backend', '')} | error: "
                             f"{r['error'][:90]} | | | | | |")
                continue
            rel = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
            lines.append(f"| {r['framework']} | {r['backend']} | {r['params'] / 1e6:.0f}M | "
                         f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {rel} | "
                         f"{r['first_step_s']} | {r.get('peak_gib', '')} |")
        for r in res["throughput"]:
            if "first_step_parts" in r:
                lines.append(f"* {r['backend']}'s first step, s: " + ", ".join(
                    f"{k} {v}" for k, v in r["first_step_parts"].items()))
            lines += [f"* {n}" for n in r.get("notes", [])]
        lines.append("")
    lines += [f"* skipped: {n}" for n in res["skipped"]]
    lines.append(f"\nElapsed {res['elapsed_s']} s.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the FLA child shares it
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    if args.fla_child:
        fla_child(args)
        return 0
    import kernels_gpu as kg

    start = time.perf_counter()
    deadline = start + args.budget
    res: dict[str, Any] = {
        "env": kg.environment(None), "argv": sys.argv[1:] if argv is None else argv,
        "sizes": args.sizes, "loss_steps": args.loss_steps, "loss_tol": args.loss_tol,
        "steps": args.steps, "warmup": args.warmup, "losses": [], "throughput": [],
        "skipped": [], "elapsed_s": 0.0}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        res["elapsed_s"] = round(time.perf_counter() - start, 1)
        (args.out / "lm_train_gpu.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "lm_train_gpu.md").write_text(markdown(res) + "\n")

    def out_of_time(what: str) -> bool:
        if time.perf_counter() < deadline:
            return False
        res["skipped"].append(f"{what}: --budget {args.budget:g} s spent")
        kg.log(f"budget spent: skipping {what}")
        return True

    txs: dict[str, Any] = {}
    refs: dict[str, dict[str, Any]] = {}

    def losses(backends: list[str], labels: list[str]) -> None:
        for kind in args.loss_models:
            for backend, label in zip(backends, labels, strict=True):
                if out_of_time(f"losses {kind} {label}"):
                    continue
                if backend != "jax" and kind not in refs:
                    res["skipped"].append(f"losses {kind} {label}: no jax reference")
                    continue
                if backend in VARIANTS and kind != "gdn":  # (configs of the delta rules' kernel)
                    res["skipped"].append(f"losses {kind} {label}: the same run as mosaic")
                    continue
                try:
                    row = loss_run(kind, backend, args, txs)
                    row["label"] = label
                    if kind in refs:
                        row["vs_jax"] = compare(refs[kind], row, args.loss_tol)
                    else:
                        refs[kind] = row
                    c = row.get("vs_jax")
                    kg.log(f"losses {kind} {label}: first {row['losses'][0]:.4f} last "
                           f"{row['losses'][-1]:.4f}" + (
                               f", max rel diff to jax {c['max_rel_diff']:.2e} at step "
                               f"{c['at_step']}: {c['status']}" if c else " (reference)")
                           + f"  [{time.perf_counter() - start:.0f} s]")
                    if c:
                        kg.log("  per step: " + " ".join(f"{x:.1e}" for x in c["rel_diff"]))
                except Exception as e:  # noqa: BLE001 - one failing run must not lose the others
                    row = {"model": kind, "backend": backend, "label": label,
                           "error": kg.short_error(e)}
                    kg.log(f"losses {kind} {label}: {row['error']}")
                res["losses"].append(row)
                save()

    first, later = args.loss_backends[:1], args.loss_backends[1:]
    if "losses" in args.parts:
        losses(["jax", "jax", *first], ["jax", "jax (again)", *first])
    if "throughput" in args.parts:
        for backend in args.backends:
            if out_of_time(f"throughput {backend}"):
                continue
            try:
                row = throughput_run(backend, args)
                kg.log(f"throughput {backend}: {row['ms_per_step']:.1f} ms/step, "
                       f"{row['tokens_per_s']:,.0f} tokens/s  [{time.perf_counter() - start:.0f} s]")
            except Exception as e:  # noqa: BLE001
                row = {"framework": "linearnexus", "backend": backend, "error": kg.short_error(e)}
                kg.log(f"throughput {backend}: {row['error']}")
            res["throughput"].append(row)
            gc.collect()  # the last trainer's buffers go before the next model is built
            save()
    if "fla" in args.parts:
        left = deadline - time.perf_counter()
        if args.cpu:
            res["skipped"].append("FLA: --cpu")
        elif not out_of_time("FLA"):
            row = run_fla(args, left)
            res["throughput"].append(row)
            said = row.get("error") or f"{row['ms_per_step']:.1f} ms/step"
            kg.log(f"FLA: {said}  [{time.perf_counter() - start:.0f} s]")
        save()
    if "losses" in args.parts and later:
        losses(later, later)
    save()
    kg.log("\n" + markdown(res))
    kg.log(f"wrote {args.out / 'lm_train_gpu.json'} and lm_train_gpu.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
