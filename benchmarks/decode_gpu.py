"""Decode speed on a GPU: tokens/s and ms per step at several batch sizes, for LinearNexus
Gated DeltaNet, Mamba2 and GPT (KV cache) models of ~200M parameters and for FLA's HF
models of the same sizes, against the weight-read floor.

On the GPU machine (FLA carried as wheels in .whl/, as benchmarks/kernels_gpu.py does;
transformers is on the image)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    PYTHONUNBUFFERED=1 python3 benchmarks/decode_gpu.py      # table on stdout, JSON to $OUT

CPU smoke test (tiny models, seconds): ``python benchmarks/decode_gpu.py --quick --skip-fla``.

Method
------
Models: d_model 1024, vocab 8192, tied embeddings; GDN (``gated_deltanet``, head_dim 64, 16
heads, expand_v 2; 211M) and GPT (16 heads; 160M), 12 layers with a SwiGLU MLP (hidden
2752), and Mamba2 (d_state 64, headdim 64, expand 2) without an MLP and with twice the
layers, 24 (164M; ``--mamba2-layers``: runs before 2026-12-07 10:30 UTC used 12, 86M);
float32 master weights, bfloat16 compute
(as ``train_lm.py`` trains them), decoded with ``weights="compute"`` (Linear and embedding
weights cast to bf16 once). GPT's KV cache has ``max_seq_len = 512`` slots.

LinearNexus: the decode loop of ``generate`` (``Decoder.run``: ``--steps`` greedy steps in
one ``lax.while_loop``), from a zeroed state (decode cost does not depend on the prompt for
the recurrent models; GPT's cache reads all its slots every step whatever they hold), one
warm-up call (compile), then the median of ``--repeats`` timed calls; ms/step = time /
steps. Also the per-step host loop (``generate(..., loop="host")``'s jitted step called
from Python, ``block_until_ready`` at the end) at batch 1 (``--host-batches``), the way the
issue's 3.4 ms/step was measured.

FLA (``fla.models.*ForCausalLM``, bf16, ``model.generate(do_sample=False)``, a 16-token
prompt): ms/step = (time of ``max_new_tokens=N`` - time of ``max_new_tokens=1``) / (N - 1),
each the median of ``--repeats`` after a warm-up call (Triton autotuning); then its GPU
kernels' time per step, the same difference over two ``torch.profiler`` runs (the kernels,
copies and fills of the chrome trace; ``--no-fla-kernel-time`` skips it): FLA's step is
mostly its host loop, which the kernel time leaves out. Each FLA cell
runs in a process of its own (``--fla-cell``, JAX kept off the GPU there, PyTorch's
allocator with expandable segments): in one process with JAX, FLA's Mamba2 at batch 64 ran
out of memory on an H100 (its prompt path asks for 32 GiB at once, beside what JAX and
the earlier cells held).

Floors: ``weights`` = the inference parameter bytes read once per step at the measured
device-to-device bandwidth (torch copy of 2 GiB, read + write bytes; 4.3 TB/s when torch
is absent); ``+ state`` adds the recurrent state (or KV cache) read and written once.
``--state-dtype bfloat16`` keeps our recurrent states in bf16 between steps
(``Decoder(state_dtype=...)``; FLA's Mamba2 keeps its HF cache in the model's bf16 too); the
row's ``state_dtype`` and ``state_bytes`` say which.

Runs past ``--budget`` seconds skip the cells not started; everything measured is printed
and written (``$OUT/decode_gpu.json`` when ``OUT`` is set, and ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from linearnexus.generate import (  # noqa: E402
    LOOP_CHUNK,
    Decoder,
    SamplingConfig,
    stop_array,
)
from linearnexus.models import ModelConfig, create_model  # noqa: E402

DEFAULT_BW = 4.3e12  # H200 device-to-device copy, bytes read + written per second
MLP_HIDDEN = 2752  # 8/3 * 1024 rounded up to 64: the ModelConfig default, set for FLA too


def our_config(kind: str, *, d: int, layers: int, vocab: int, dtype: str,
               max_seq_len: int) -> ModelConfig:
    common = dict(vocab_size=vocab, d_model=d, n_layers=layers, dtype=dtype,
                  param_dtype="float32", max_seq_len=max_seq_len)
    if kind == "gdn":
        # the heads FLA's model gets below (16 of K = 64 at d 1024: 211M parameters); the
        # block's own default would be 12 (0.75 d / K), a smaller model than FLA's
        return ModelConfig(block_pattern=("gated_deltanet",), block_options={"gated_deltanet": {
            "num_heads": max(1, d // 64), "head_dim": 64, "expand_v": 2.0}}, **common)
    if kind == "mamba2":
        return ModelConfig(block_pattern=("mamba2",), mlp=False, **common)
    if kind == "gpt":
        return ModelConfig(block_pattern=("attention",),
                           block_options={"attention": {"n_heads": max(1, d // 64)}}, **common)
    raise ValueError(f"kind: expected gdn, mamba2 or gpt, got {kind!r}")


def model_layers(kind: str, args: argparse.Namespace) -> int:
    """Layers of the ``kind`` model: ``--mamba2-layers`` for Mamba2 (blocks without an MLP;
    by default twice ``--layers``, as the Mamba papers size a Mamba model against a
    Transformer), ``--layers`` for the others."""
    mamba2 = getattr(args, "mamba2_layers", None)
    return (mamba2 or 2 * args.layers) if kind == "mamba2" else args.layers


def tree_bytes(tree: Any) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree)
               if hasattr(x, "dtype"))


def time_ours(kind: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """ms/step of the on-device loop (and of the host loop at batch 1 / 64)."""
    cfg = our_config(kind, d=args.d_model, layers=model_layers(kind, args), vocab=args.vocab,
                     dtype=args.dtype, max_seq_len=args.max_seq_len)
    model = create_model(cfg, seed=0)
    dec = Decoder(model, SamplingConfig(temperature=0.0), weights="compute",
                  state_dtype=args.state_dtype)
    stops = stop_array(())
    rng = np.random.default_rng(0)
    steps = args.steps

    def fresh():
        tok = jnp.asarray(rng.integers(0, args.vocab, batch), jnp.int32)
        return tok, dec.init_state(batch), jax.random.key(0), jnp.zeros(batch, bool)

    def once() -> float:
        tok, state, key, done = fresh()
        jax.block_until_ready((tok, state))
        t0 = time.perf_counter()
        buf, count, *_ = dec.run(tok, state, key, done, stops, steps, first=False)
        jax.block_until_ready(buf)
        dt = time.perf_counter() - t0
        if int(count) != steps:
            raise RuntimeError(f"loop ran {int(count)} of {steps} steps")
        return dt

    t_compile = time.perf_counter()
    once()
    t_compile = time.perf_counter() - t_compile
    times = [once() for _ in range(args.repeats)]
    loop_s = statistics.median(times) / steps
    state_bytes = tree_bytes(jax.eval_shape(lambda: dec.init_state(batch)))
    row: dict[str, Any] = {
        "framework": "linearnexus", "model": kind, "batch": batch,
        "state_dtype": args.state_dtype or "float32",
        "params": model.num_params(), "weight_bytes": tree_bytes(dec.params),
        "state_bytes": state_bytes, "ms_per_step": loop_s * 1e3,
        "tokens_per_s": batch / loop_s, "first_call_s": t_compile,
    }
    if batch in args.host_batches:
        tok, state, key, _ = fresh()
        feed = tok[:, None]
        for _ in range(3):  # warm-up (compile)
            nxt, state, key = dec.step(feed, state, key)
        jax.block_until_ready(nxt)
        n = min(steps, 64)
        t0 = time.perf_counter()
        for _ in range(n):
            nxt, state, key = dec.step(np.asarray(nxt)[:, None], state, key)  # host round trip
        jax.block_until_ready(nxt)
        row["host_loop_ms_per_step"] = (time.perf_counter() - t0) / n * 1e3
    return row


def fla_model(kind: str, args: argparse.Namespace, torch: Any) -> Any:
    """FLA's HF model of ``kind`` at our models' sizes (``args``), bf16 on the GPU, eval."""
    import fla.models as fm

    d, layers, vocab = args.d_model, model_layers(kind, args), args.vocab
    if kind == "gdn":
        config = fm.GatedDeltaNetConfig(hidden_size=d, num_hidden_layers=layers, vocab_size=vocab,
                                        head_dim=64, num_heads=d // 64, expand_v=2.0,
                                        intermediate_size=MLP_HIDDEN, tie_word_embeddings=True)
        model = fm.GatedDeltaNetForCausalLM(config)
    elif kind == "mamba2":
        config = fm.Mamba2Config(hidden_size=d, num_hidden_layers=layers, vocab_size=vocab,
                                 head_dim=64, state_size=64, expand=2, n_groups=1,
                                 tie_word_embeddings=True)
        model = fm.Mamba2ForCausalLM(config)
    else:
        config = fm.TransformerConfig(hidden_size=d, num_hidden_layers=layers, vocab_size=vocab,
                                      num_heads=d // 64, intermediate_size=MLP_HIDDEN,
                                      max_position_embeddings=args.max_seq_len,
                                      tie_word_embeddings=True)
        model = fm.TransformerForCausalLM(config)
    return model.to(device="cuda", dtype=torch.bfloat16).eval()


def fla_generate(model: Any, ids: Any, k: int, torch: Any) -> float:
    """Seconds of ``model.generate`` of exactly ``k`` greedy tokens after the prompt ``ids``
    (synchronised before and after)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                       use_cache=True, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


#: chrome-trace categories of work on the GPU itself (kernels, copies, fills)
GPU_TRACE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def trace_gpu_time(trace: dict[str, Any]) -> tuple[float, int]:
    """``(seconds, kernels)``: the summed duration of the GPU's own work in a
    ``torch.profiler`` chrome trace (events of :data:`GPU_TRACE_CATEGORIES`; not the
    profiler's host-side markers such as "Command Buffer Full", which ``key_averages``
    also gives a device time) and the count of kernels among them."""
    events = [e for e in trace.get("traceEvents", [])
              if e.get("ph") == "X" and e.get("cat") in GPU_TRACE_CATEGORIES]
    return (sum(float(e.get("dur", 0.0)) for e in events) * 1e-6,
            sum(e.get("cat") == "kernel" for e in events))


def fla_kernel_time(gen: Any, n: int, torch: Any) -> tuple[float, float]:
    """``(GPU seconds, kernels)`` per decode step of ``gen(k)`` (FLA's ``generate`` of ``k``
    tokens): ``torch.profiler`` over ``gen(n)`` and ``gen(1)``, the difference over
    ``n - 1`` steps as the wall time is taken (the prompt's prefill cancels)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    def traced(k: int) -> tuple[float, int]:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            gen(k)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            return trace_gpu_time(json.loads(path.read_text()))

    (gpu_n, kernels_n), (gpu_1, kernels_1) = traced(n), traced(1)
    return (gpu_n - gpu_1) / (n - 1), (kernels_n - kernels_1) / (n - 1)


def time_fla(kind: str, batch: int, args: argparse.Namespace, torch: Any) -> dict[str, Any]:
    model = fla_model(kind, args, torch)
    ids = torch.randint(0, args.vocab, (batch, 16), device="cuda")
    n = args.fla_steps

    def gen(k: int) -> float:
        return fla_generate(model, ids, k, torch)

    gen(n)  # warm-up: Triton autotuning and compiles
    t_n = statistics.median(gen(n) for _ in range(args.repeats))
    t_1 = statistics.median(gen(1) for _ in range(args.repeats))
    step = (t_n - t_1) / (n - 1)
    row = {"framework": "fla", "model": kind, "batch": batch,
           "params": sum(p.numel() for p in model.parameters()), "ms_per_step": step * 1e3,
           "tokens_per_s": batch / step}
    row["weight_bytes"] = row["params"] * 2
    if not getattr(args, "no_fla_kernel_time", False):  # after the timing: the profiler slows the host
        gpu, kernels = fla_kernel_time(gen, n, torch)
        row.update(kernel_ms_per_step=gpu * 1e3, kernels_per_step=kernels)
    model.to("cpu")  # frees its GPU memory for the next cell
    torch.cuda.empty_cache()
    return row


def fla_cell(kind: str, batch: int, args: argparse.Namespace, budget_s: float
             ) -> dict[str, Any]:
    """:func:`time_fla` in a child process (``--fla-cell``): its row, or an error row."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--fla-cell", kind, str(batch),
           "--d-model", str(args.d_model), "--layers", str(args.layers), "--vocab",
           str(args.vocab), "--fla-steps", str(args.fla_steps), "--repeats",
           str(args.repeats), "--max-seq-len", str(args.max_seq_len), "--mamba2-layers",
           str(model_layers("mamba2", args)),
           *(["--no-fla-kernel-time"] if getattr(args, "no_fla_kernel_time", False) else [])]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF",
                                                      "expandable_segments:True"))
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=max(budget_s, 30.0))
    except subprocess.TimeoutExpired:
        return {"framework": "fla", "model": kind, "batch": batch,
                "error": f"TimeoutExpired: over {max(budget_s, 30.0):.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"framework": "fla", "model": kind, "batch": batch,
                "error": f"exit {done.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def bandwidth(torch: Any) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), torch's copy."""
    if torch is None or not torch.cuda.is_available():
        return DEFAULT_BW
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    bw = 2 * src.numel() * 10 / (time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()
    return bw


def environment(torch: Any) -> dict[str, Any]:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "jax": jax.__version__, "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind, "python": platform.python_version()}
    if torch is not None:
        env["torch"] = torch.__version__
    try:
        import fla
        env["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        pass
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def table(rows: list[dict[str, Any]], bw: float) -> str:
    out = ["| framework | model | params | batch | ms/step | tokens/s | host loop ms/step | "
           "floor: weights | floor: + state | step / floor | GPU kernels ms/step |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['framework']} | {r['model']} | | {r['batch']} | "
                       f"error: {r['error'][:80]} | | | | | | |")
            continue
        w = r["weight_bytes"] / bw * 1e3
        ws = (r["weight_bytes"] + 2 * r.get("state_bytes", 0)) / bw * 1e3
        host = r.get("host_loop_ms_per_step")
        kernels = r.get("kernel_ms_per_step")
        state16 = r.get("state_dtype", "float32") != "float32"
        name = f"{r['framework']} ({r['state_dtype']} state)" if state16 else r["framework"]
        out.append(f"| {name} | {r['model']} | {r['params'] / 1e6:.0f}M | {r['batch']} | "
                   f"{r['ms_per_step']:.3f} | {r['tokens_per_s']:,.0f} | "
                   f"{'' if host is None else f'{host:.3f}'} | {w:.3f} | "
                   f"{ws:.3f} | {r['ms_per_step'] / ws:.1f}x | "
                   f"{'' if kernels is None else f'{kernels:.3f}'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["gdn", "mamba2", "gpt"],
                   choices=["gdn", "mamba2", "gpt"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--host-batches", type=int, nargs="*", default=[1],
                   help="batches where the per-step host loop is timed too")
    p.add_argument("--steps", type=int, default=128, help=f"decode steps per timed call "
                   f"(<= {LOOP_CHUNK})")
    p.add_argument("--fla-steps", type=int, default=32, help="FLA max_new_tokens per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--mamba2-layers", type=int, default=None,
                   help="Mamba2's layers (default: twice --layers; it has no MLP)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--max-seq-len", type=int, default=512, help="GPT's KV-cache slots")
    p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16 on a GPU, "
                   "float32 on the CPU)")
    p.add_argument("--state-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="our recurrent states' dtype between steps (default float32)")
    p.add_argument("--skip-fla", action="store_true")
    p.add_argument("--no-fla-kernel-time", action="store_true",
                   help="skip profiling FLA's GPU kernel time per step (two profiled runs a "
                   "cell)")
    p.add_argument("--quick", action="store_true", help="tiny models (a CPU smoke test)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds; cells not started by then are skipped")
    p.add_argument("--out", type=Path, default=None, help="folder for decode_gpu.json")
    p.add_argument("--fla-cell", nargs=2, metavar=("MODEL", "BATCH"), default=None,
                   help="(internal) time one FLA cell in this process and print its row")
    args = p.parse_args(argv)
    if args.fla_cell:
        import torch

        kind, batch = args.fla_cell[0], int(args.fla_cell[1])
        try:
            row = time_fla(kind, batch, args, torch)
        except Exception as e:  # noqa: BLE001 - the parent reports the cell's error
            row = {"framework": "fla", "model": kind, "batch": batch,
                   "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(row), flush=True)
        return 0
    if args.quick:
        args.d_model, args.layers, args.vocab, args.steps, args.fla_steps = 64, 2, 256, 8, 4
        args.batches, args.host_batches, args.repeats = [1, 4], [1], 1
        args.max_seq_len = 64
    if not 1 <= args.steps <= LOOP_CHUNK:
        p.error(f"--steps: expected 1..{LOOP_CHUNK}, got {args.steps}")
    if args.dtype is None:
        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    start = time.perf_counter()
    torch = None
    if jax.default_backend() == "gpu":
        try:
            import torch
        except ImportError:
            torch = None
    bw = bandwidth(torch)
    env = environment(torch)
    print(json.dumps(env), f"bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows: list[dict[str, Any]] = []
    fla_ok = (not args.skip_fla and torch is not None and torch.cuda.is_available())
    if fla_ok:
        try:
            import fla.models  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure: report and go on
            print(f"FLA not importable ({type(e).__name__}: {e}); skipping it", flush=True)
            fla_ok = False
    # batch-major, ours then FLA's: when the budget runs out, the largest batches go first
    frameworks = ("linearnexus", "fla") if fla_ok else ("linearnexus",)
    cells = [(f, m, b) for b in args.batches for m in args.models for f in frameworks]
    for framework, model, batch in cells:
        if time.perf_counter() - start > args.budget:
            print(f"budget: skipping {framework} {model} B={batch}", flush=True)
            continue
        try:
            row = (time_ours(model, batch, args) if framework == "linearnexus" else
                   fla_cell(model, batch, args, args.budget - (time.perf_counter() - start)))
        except Exception as e:  # noqa: BLE001 - one failing cell must not lose the others
            row = {"framework": framework, "model": model, "batch": batch,
                   "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    text = table(rows, bw)
    print(text)
    result = {"env": env, "bandwidth": bw, "rows": rows, "table": text,
              "seconds": time.perf_counter() - start}
    for folder in filter(None, (args.out, os.environ.get("OUT"))):
        path = Path(folder) / "decode_gpu.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
