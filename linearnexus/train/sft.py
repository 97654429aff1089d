"""Next-token training of an :class:`~linearnexus.models.LMModel` with resumable checkpoints.

The loop, nanoGPT style::

    trainer = SFTTrainer(model, None, DataLoader(train, B, T, seed), val, TrainConfig(...),
                         tokenizer=tok)
    result = trainer.train(resume=True)          # SIGINT / SIGTERM: checkpoint, then return
    model, model_config, extra = load_checkpoint("runs/x")    # for sampling

Training state lives outside the model as pure pytrees (``TrainState``: the model's
``nnx.Param`` arrays, its other nnx state, the optax state and a PRNG key). One jitted
step ``(state, inputs, targets) -> (state, loss)`` donates the old state, so XLA updates
the buffers in place; the trainer always holds the only live copy, and the model object
passed in never aliases it (``trainer.model`` copies the trained weights into it). Sophia's Hessian
estimate runs in a second compiled step, every ``sophia_hessian_interval`` steps.

A run folder (``config.out_dir``)::

    config.yaml        model + train sections (re-runnable with ``train_lm.py --config``)
    metrics.jsonl      one JSON record per log / eval step, flushed as written
    loss.png           train / val loss curves (written at the end of ``train``)
    checkpoints/<step>/{model,opt,meta,tokenizer}   orbax; the last N and the best kept
    checkpoints/<step>/integrity.json   size + SHA-256 of each file, written last

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact (temporary leftovers are removed
when the manager opens). Then an integrity manifest is written last; restore takes the
newest checkpoint that verifies against it, moving failing ones aside (train/integrity.py).
A run holds ``out_dir/run.lock`` while it trains.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import SingleDeviceSharding

from linearnexus.core.compile_cache import CompileCache
from linearnexus.core.config import ConfigBase, ConfigError, field
from linearnexus.core.fileio import VERIFY_MODES, atomic_write, atomic_write_text
from linearnexus.data import DataLoader, TextDataset, load_tokenizer
from linearnexus.kernels.common.chunking import maybe_tune_cpu_malloc
from linearnexus.models import LMModel, ModelConfig, get_preset
from linearnexus.optim import (
    OPTIMIZERS,
    SCHEDULES,
    SOPHIA_HESSIAN_INTERVAL,
    create_optimizer,
    create_schedule,
    gnb_hessian_estimate,
    sophia_should_update_hessian,
)
from linearnexus.train.integrity import (
    MANIFEST_FILE,
    CheckpointError,
    CheckpointWriteError,
    RunLock,
    RunLockedError,
    select_checkpoint,
    step_folders,
    verify_checkpoint,
    write_checkpoint_manifest,
)

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointError",
    "CheckpointWriteError",
    "RunLock",
    "RunLockedError",
    "select_checkpoint",
    "verify_checkpoint",
    "EVAL_SEED",
    "SFTTrainer",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "build_optimizer",
    "clear_run",
    "cross_entropy_loss",
    "find_checkpoint",
    "load_checkpoint",
    "load_run_config",
    "read_checkpoint_meta",
    "read_config_file",
    "resolve_model_config",
]

CHECKPOINT_DIR = "checkpoints"  # under out_dir
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
CONFIG_FILE = "config.yaml"
EVAL_SEED = 0  # eval windows are the same for every run on the same data, whatever its seed
_FORMAT_VERSION = 2  # 2: each checkpoint has an integrity manifest (train/integrity.py)
# meta["opt_layout"]: "flat" = the "opt" item holds the optimizer state and RNG key as one
# vector per dtype (_flat_by_dtype), "tree" (or absent: older checkpoints) = as a pytree
_ITEMS = ("model", "opt", "meta", "tokenizer")


# ---- config ------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig(ConfigBase):
    """One training run: steps, batches, optimizer, evaluation, checkpoints, data.

    The defaults are close to nanoGPT's shakespeare_char CPU recipe; the recipe itself
    (beta2 0.99 included) is ``configs/models/gpt_nanogpt_cpu.yaml``.

    Attributes:
        max_steps: optimizer steps in total (also the end of the lr schedule).
        batch_size / seq_len: B sequences of T tokens per step (the model sees T inputs).
        optimizer: ``adamw``, ``muon`` or ``sophia`` (``linearnexus.optim``).
        lr: peak learning rate (of the AdamW part for muon). min_lr_ratio: final lr / lr.
        warmup_steps: linear warmup from 0; None = min(100, max_steps // 10).
        schedule: cosine, linear or constant decay.
        weight_decay: decoupled decay of weight matrices (not embeddings, norms, biases).
        beta1 / beta2: moment rates; None = the optimizer's default (AdamW 0.9 / 0.95).
        grad_clip: global-norm clip; 0 = off.
        muon_lr: peak lr of the Muon part. sophia_gamma / sophia_hessian_interval: SophiaG's
            gamma and k (a Gauss-Newton-Bartlett Hessian estimate every k steps).
        eval_interval: evaluate every this many steps (and at step 0 and the end); 0 = only
            at the end. eval_batches: fixed val windows per evaluation, batch_size each.
        log_interval: steps between metric records (train loss = mean since the last one).
        checkpoint_interval: steps between checkpoints; None = eval_interval; 0 = only at
            the end (and on SIGINT / SIGTERM).
        keep_last_n: newest checkpoints kept. keep_best: also keep the lowest-val-loss one.
        background_checkpoints: write the periodic checkpoints in a background thread
            while training goes on (the last one, and one on SIGINT / SIGTERM, are always
            waited for). Off by default: on a CPU whose cores train, orbax's save work
            slowed the steps more than the wait it saved (docs/benchmarks.md, "CPU training
            speed, round 6"); meant for hosts whose CPU is idle while an accelerator trains.
        tokenizer / bpe_vocab_size / val_fraction / data: how the command line prepares
            data (``char`` or ``bpe``; BPE vocabulary; held-out share; text file, None =
            TinyShakespeare). The trainer itself does not read them.
        init_hf: a Hugging Face checkpoint folder the run started from (``train_lm.py
            --init-hf``): its weights at step 0, its tokenizer for the data; None = none.
        seed: model init, batch order and Sophia's label sampling.
        out_dir: run folder (metrics, plot, checkpoints).
        progress: show a tqdm bar when stderr is a terminal.
        mesh: device mesh spec (``"data=2,fsdp=4"``, ``"auto"``; ``linearnexus.parallel``);
            None = one device. A run may resume on another mesh.
        verify_checkpoints: how a checkpoint is checked against its manifest before it is
            read: ``full`` (sizes, and SHA-256 of files up to 1 GiB), ``sizes`` or ``off``.
    """

    max_steps: int = field(2000, gt=0)
    batch_size: int = field(12, gt=0)
    seq_len: int = field(64, gt=0)
    optimizer: str = field("adamw", choices=OPTIMIZERS)
    lr: float = field(1e-3, gt=0)
    min_lr_ratio: float = field(0.1, ge=0, le=1)
    warmup_steps: int | None = field(None, ge=0)
    schedule: str = field("cosine", choices=SCHEDULES)
    weight_decay: float = field(0.1, ge=0)
    beta1: float | None = field(None, ge=0, lt=1)
    beta2: float | None = field(None, ge=0, lt=1)
    grad_clip: float = field(1.0, ge=0)
    muon_lr: float = field(0.02, gt=0)
    sophia_gamma: float = field(0.05, gt=0)
    sophia_hessian_interval: int = field(SOPHIA_HESSIAN_INTERVAL, gt=0)
    eval_interval: int = field(250, ge=0)
    eval_batches: int = field(20, gt=0)
    log_interval: int = field(10, gt=0)
    checkpoint_interval: int | None = field(None, ge=0)
    keep_last_n: int = field(2, gt=0)
    keep_best: bool = True
    background_checkpoints: bool = False
    tokenizer: str = field("char", choices=("char", "bpe"))
    bpe_vocab_size: int | None = field(None, ge=257)
    val_fraction: float = field(0.1, gt=0, lt=1)
    data: str | None = None
    seed: int = field(0, ge=0)
    out_dir: str = "runs/default"
    progress: bool = True
    verify_checkpoints: str = field("full", choices=VERIFY_MODES)
    init_hf: str | None = None
    mesh: str | None = None

    def validate(self) -> None:
        if self.warmup_steps is not None and self.warmup_steps > self.max_steps:
            # e.g. a recipe's warmup 100 with --max-steps 50 for a quick try: clamp, not refuse
            warnings.warn(f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}; "
                          f"warming up over all {self.max_steps} steps instead", stacklevel=4)

    @property
    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps is None:
            return min(100, self.max_steps // 10)
        return min(self.warmup_steps, self.max_steps)

    @property
    def resolved_checkpoint_interval(self) -> int:
        return self.eval_interval if self.checkpoint_interval is None else self.checkpoint_interval


# fields that may differ between a run and its resumption without changing the losses
# (max_steps too when the schedule is constant; otherwise it moves the lr schedule)
_HARMLESS_FIELDS = ("out_dir", "progress", "log_interval", "eval_interval", "eval_batches",
                    "checkpoint_interval", "keep_last_n", "keep_best", "background_checkpoints",
                    "data",
                    "verify_checkpoints", "mesh")


# ---- run-config files --------------------------------------------------------------------


def read_config_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a YAML run config into ``(model_section, train_section)`` dicts.

    Two layouts are accepted:

    * sectioned: top-level ``model:`` and/or ``train:`` mappings (ModelConfig / TrainConfig
      fields). ``model:`` may name a base preset with ``preset: gpt-small``; the other
      model keys override it.
    * flat: the file is a ModelConfig (its fields, optionally with ``preset:``); the train
      section is then empty.

    An empty file (or one holding only comments) is refused: it would silently train the
    default model, which is never what a config file was meant to say.

    Raises:
        FileNotFoundError: no such file. ConfigError: not UTF-8 YAML, empty, not a mapping,
            or a section that is not (each names the file).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a YAML file ({first})") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; give ModelConfig fields (e.g. "
                          "'preset: gpt-small') or 'model:' / 'train:' sections")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    if data and set(data) <= {"model", "train"}:
        model, train = data.get("model") or {}, data.get("train") or {}
    else:
        model, train = data, {}
    for name, section in (("model", model), ("train", train)):
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section {name!r} must be a mapping, got {section!r}")
    return dict(model), dict(train)


def resolve_model_config(model_section: Mapping[str, Any], preset: str | None = None) -> ModelConfig:
    """A ModelConfig from a config-file model section.

    The base is ``preset`` if given (e.g. ``--model``), else the section's ``preset:`` key,
    else the ModelConfig defaults; the section's other keys override it.

    Raises:
        KeyError: unknown preset. ConfigError: a bad field (named).
    """
    section = dict(model_section)
    preset = preset or section.pop("preset", None)
    section.pop("preset", None)
    base = get_preset(preset) if preset else ModelConfig()
    return base.replace(**section) if section else base


def load_run_config(path: str | os.PathLike, *, preset: str | None = None,
                    **train_overrides: Any) -> tuple[ModelConfig, TrainConfig]:
    """``(ModelConfig, TrainConfig)`` from a YAML file (see :func:`read_config_file`).

    ``train_overrides`` replace train fields (e.g. ``max_steps=100``). The model's
    ``vocab_size`` is whatever the file says; the command line sets it from the tokenizer.
    """
    model_section, train_section = read_config_file(path)
    return (resolve_model_config(model_section, preset),
            TrainConfig.from_dict({**train_section, **train_overrides}))


# ---- loss and state ----------------------------------------------------------------------


def cross_entropy_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy: ``logits [B, T, V]`` float, ``targets [B, T]`` int -> []."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.mean(losses)


class TrainState(NamedTuple):
    """Everything a step reads and writes (one pytree, donated to the compiled step).

    Attributes:
        params: the model's ``nnx.Param`` arrays as a pure nested dict.
        rest: the model's other nnx state (pure dict; empty for the built-in blocks).
        opt_state: the optax state.
        rng: ``[2]`` uint32 PRNG key (Sophia's label sampling).
    """

    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass
class TrainResult:
    """What :meth:`SFTTrainer.train` did.

    Attributes:
        step: optimizer steps completed (over all sessions of the run).
        start_step: the step this session started from (> 0 after a resume).
        train_loss / val_loss: the last recorded values (None if never recorded).
        val_step: the step ``val_loss`` was measured at.
        best_val_loss: lowest val loss seen in this session (or the resumed checkpoint's).
        interrupted: ``"SIGINT"`` / ``"SIGTERM"`` when a signal stopped the run, else None.
        elapsed_s: wall time of this session. tokens_per_s: training tokens per second
            over this session (compilation and evaluation included).
        history: this session's metric records (as written to metrics.jsonl).
        checkpoint: folder of the last checkpoint written (or restored), if any.
    """

    step: int
    start_step: int
    train_loss: float | None
    val_loss: float | None
    val_step: int | None
    best_val_loss: float | None
    interrupted: str | None
    elapsed_s: float
    tokens_per_s: float
    history: list[dict[str, Any]]
    checkpoint: Path | None


# ---- optimizer and compiled steps ----------------------------------------------------------


def build_optimizer(config: TrainConfig, params: Any
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, lr_schedule)`` for ``config``: ``linearnexus.optim.create_optimizer`` with the
    config's optimizer, warmup + decay schedule, weight decay, betas and clipping."""
    tx = create_optimizer(
        config.optimizer, params, lr=config.lr, total_steps=config.max_steps,
        warmup_steps=config.resolved_warmup_steps, weight_decay=config.weight_decay, b1=config.beta1,
        b2=config.beta2, min_lr_ratio=config.min_lr_ratio, schedule=config.schedule,
        grad_clip=config.grad_clip, muon_lr=config.muon_lr, sophia_gamma=config.sophia_gamma)
    schedule = create_schedule(config.lr, warmup_steps=config.resolved_warmup_steps,
                               total_steps=config.max_steps, min_lr_ratio=config.min_lr_ratio,
                               kind=config.schedule)
    return tx, schedule


class _Steps(NamedTuple):
    graphdef: Any
    tx: Any
    step: Callable[..., tuple[TrainState, jax.Array]]
    step_hessian: Callable[..., tuple[TrainState, jax.Array]]
    eval: Callable[..., jax.Array]


# jitted functions per model structure (eval) and per (structure, tx object) (steps); the
# same helper keeps generate.py's decode functions. jax.jit compiles lazily, on the first call.
_STEPS: CompileCache[_Steps] = CompileCache(max_entries=8)
_EVALS: CompileCache[Callable[..., jax.Array]] = CompileCache(max_entries=8)


def _loss_fn(graphdef: Any, params: Any, rest: Any, inputs: jax.Array, targets: jax.Array):
    model = nnx.merge(graphdef, params, rest)
    logits, _ = model(inputs)  # [B, T, V]
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return cross_entropy_loss(logits, targets), nnx.to_pure_dict(new_rest)


def _eval_fn(graphdef: Any, placement: Any = None) -> Callable[..., jax.Array]:
    def mean_loss(params, rest, inputs, targets):  # [N, B, T] each -> []
        losses = jax.lax.map(lambda xy: _loss_fn(graphdef, params, rest, *xy)[0],
                             (inputs, targets))
        return jnp.mean(losses)

    if placement is not None:  # shardings pinned per trainer; not cached
        return placement.jit_eval(mean_loss)
    return _EVALS.get(graphdef, None, lambda: jax.jit(mean_loss))


#: set to "0" to let XLA place the data-parallel gradient all-reduce (see flat_data_parallel)
FLAT_ALLREDUCE_ENV = "LINEARNEXUS_FLAT_ALLREDUCE"


def flat_data_parallel(placement: Any) -> bool:
    """Whether a mesh step reduces its gradients as one flat buffer (``_flat_reduced_grads``).

    True on CPU meshes that split only the batch (``data`` and ``fsdp`` are the only axes
    above 1, every parameter is replicated and the model keeps no other state); the step
    takes it for float32 / float64 parameters (low-precision gradients would be rounded
    per device before the sum, where XLA sums them in float32). There XLA:CPU's all-reduce of the
    gradients is one collective per parameter array, each a rendezvous of the devices'
    threads: measured ~110 us per array on a 2-core host, 4.7 ms for gpt-small's 40
    gradients against 0.8 ms for the same floats as one array (docs/benchmarks.md, "CPU
    training speed, round 6"). GPU meshes keep XLA's placement, which overlaps the
    reductions with the backward pass. ``LINEARNEXUS_FLAT_ALLREDUCE=0`` turns it off.
    """
    if os.environ.get(FLAT_ALLREDUCE_ENV, "1") == "0":
        return False
    mesh = placement.mesh
    if mesh.devices.flat[0].platform != "cpu" or mesh.size == 1:
        return False
    if any(size > 1 for name, size in mesh.shape.items() if name not in ("data", "fsdp")):
        return False
    if jax.tree.leaves(placement.state.rest):  # the step keeps XLA's path then
        return False
    return all(s.is_fully_replicated for s in jax.tree.leaves(placement.state.params))


def _flat_reduced_grads(loss_and_grads: Callable[..., Any], mesh: Any, state: TrainState,
                        inputs: jax.Array, targets: jax.Array) -> Any:
    """``((loss, rest), grads)`` of the whole batch, each device differentiating its rows
    and the gradients averaged as one flat vector (one ``pmean``).

    The loss is a mean over equally many tokens per device (``cross_entropy_loss`` has no
    mask and the batch splits evenly), so the mean of the devices' means is the batch's.
    """
    from jax.flatten_util import ravel_pytree
    from jax.sharding import PartitionSpec

    axes = tuple(name for name in ("data", "fsdp") if mesh.shape[name] > 1)
    rows = PartitionSpec(axes)

    def local(state, inputs, targets):  # inputs, targets: this device's [B / n, T]
        (loss, rest), grads = loss_and_grads(state, inputs, targets)
        vector, unravel = ravel_pytree(grads)  # [P] every gradient, concatenated
        vector = jax.lax.pmean(vector, axes)
        return (jax.lax.pmean(loss, axes), rest), unravel(vector)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), rows, rows),
                           out_specs=PartitionSpec(), check_vma=False)
    return mapped(state, inputs, targets)


def _compiled(graphdef: Any, tx: optax.GradientTransformation, placement: Any = None) -> _Steps:
    if placement is not None:  # shardings pinned per trainer; not cached
        return _build_steps(graphdef, tx, placement)
    return _STEPS.get(graphdef, tx, lambda: _build_steps(graphdef, tx))


def _build_steps(graphdef: Any, tx: optax.GradientTransformation,
                 placement: Any = None) -> _Steps:
    def loss_and_grads(state: TrainState, inputs, targets):
        return jax.value_and_grad(
            lambda p: _loss_fn(graphdef, p, state.rest, inputs, targets), has_aux=True)(
            state.params)

    flat = placement is not None and flat_data_parallel(placement)

    def step(state: TrainState, inputs, targets, with_hessian: bool):
        if flat and not jax.tree.leaves(state.rest) and all(
                x.dtype in (jnp.float32, jnp.float64) for x in jax.tree.leaves(state.params)):
            (loss, rest), grads = _flat_reduced_grads(loss_and_grads, placement.mesh, state,
                                                      inputs, targets)
        else:
            (loss, rest), grads = loss_and_grads(state, inputs, targets)
        rng = state.rng
        extra = {}
        if with_hessian:  # static: a separate compiled step
            rng, sub = jax.random.split(rng)

            def logits_fn(p, x):
                return nnx.merge(graphdef, p, state.rest)(x)[0]

            extra["hessian"] = gnb_hessian_estimate(logits_fn, state.params, inputs, sub)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, rest, opt_state, rng), loss

    # donated: XLA writes the new state into the old state's buffers (on a mesh, the
    # placement also pins the state's and batches' shardings at the program's boundary)
    jit = (functools.partial(jax.jit, donate_argnums=(0,)) if placement is None
           else placement.jit_step)
    return _Steps(
        graphdef, tx, jit(lambda s, x, y: step(s, x, y, False)),
        jit(lambda s, x, y: step(s, x, y, True)), _eval_fn(graphdef, placement))


# ---- small file helpers ------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: drop it
            continue
    return records


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) to restore ``tree``'s structure into."""
    import orbax.checkpoint as ocp

    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


@jax.jit
def _copy_arrays(tree: Any) -> Any:
    """Fresh buffers holding ``tree``'s arrays (same shardings), for a background save."""
    return jax.tree.map(jnp.copy, tree)


def _flat_by_dtype(tree: Any) -> dict[str, jax.Array]:
    """``tree``'s leaves raveled and concatenated per dtype, in leaf order:
    ``{dtype name: [n] array}`` (see :func:`_unflat_by_dtype`)."""
    groups: dict[str, list[jax.Array]] = {}
    for leaf in jax.tree.leaves(tree):
        groups.setdefault(jnp.dtype(leaf.dtype).name, []).append(jnp.ravel(leaf))
    return {name: jnp.concatenate(parts) for name, parts in groups.items()}


_flat_by_dtype_jit = jax.jit(_flat_by_dtype)


def _opt_layout(opt: Any) -> str:
    """How a checkpoint stores ``opt``: ``"flat"`` (one vector per dtype) in one process
    when every array is whole on each device, else ``"tree"`` (array by array)."""
    whole = all(x.sharding.is_fully_replicated for x in jax.tree.leaves(opt))
    return "flat" if jax.process_count() == 1 and whole else "tree"


def _unflat_by_dtype(flat: Mapping[str, np.ndarray], like: Any) -> Any:
    """Invert :func:`_flat_by_dtype` onto ``like``'s structure (host arrays).

    Raises:
        ValueError: the vectors do not hold exactly ``like``'s leaves (another optimizer
            setting wrote them).
    """
    leaves, treedef = jax.tree.flatten(like)
    sizes: dict[str, int] = {}
    for leaf in leaves:
        name = jnp.dtype(leaf.dtype).name
        sizes[name] = sizes.get(name, 0) + int(np.prod(leaf.shape, dtype=np.int64))
    got = {name: int(np.shape(v)[0]) for name, v in flat.items()}
    if got != sizes:
        raise ValueError(f"optimizer state: the checkpoint holds {got} values per dtype, this "
                         f"run's optimizer expects {sizes} (its settings changed?)")
    offsets = dict.fromkeys(sizes, 0)
    out = []
    for leaf in leaves:
        name = jnp.dtype(leaf.dtype).name
        n = int(np.prod(leaf.shape, dtype=np.int64))
        out.append(np.asarray(flat[name][offsets[name]:offsets[name] + n]).reshape(leaf.shape))
        offsets[name] += n
    return jax.tree.unflatten(treedef, out)


def _place_like(host: Any, like: Any) -> Any:
    """Host arrays placed with the dtypes and shardings of ``like``'s arrays (a process
    fills only its own devices' shards when there are several)."""
    from linearnexus.parallel.training import _put  # the Placement's own helper

    return jax.tree.map(lambda h, ref: _put(np.asarray(h, ref.dtype), ref.sharding), host, like)


class _BackgroundSave:
    """One checkpoint written by a thread while training goes on (``save_checkpoint(...,
    wait=False)``): ``join`` waits and re-raises what the write raised, in the caller's
    thread. Not a daemon: an interpreter that exits waits for the write to finish."""

    def __init__(self, write: Callable[[], None], step: int) -> None:
        self.step = step
        self._error: BaseException | None = None

        def run() -> None:
            try:
                write()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error = e

        self._thread = threading.Thread(target=run, name=f"checkpoint-{step}")
        self._thread.start()

    def failed(self) -> bool:
        return not self._thread.is_alive() and self._error is not None

    def wait(self) -> BaseException | None:
        """Block until the write is done (a KeyboardInterrupt here leaves it pending);
        returns what it raised."""
        self._thread.join()
        return self._error


def _tokenizer_json(tokenizer: Any) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = tokenizer.save(Path(tmp) / "tokenizer.json")
        return json.loads(Path(path).read_text(encoding="utf-8"))


def _tokenizer_from_json(obj: Any) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(json.dumps(obj), encoding="utf-8")
        return load_tokenizer(path)


def _val_loss(metrics: Mapping[str, Any]) -> float:
    return float(metrics["val_loss"])


class _DropMissingMetricsWarning:
    """Filters orbax's warning for checkpoints saved without metrics (ours on purpose: only
    checkpoints taken at an evaluation have a val loss)."""

    def filter(self, record: Any) -> bool:
        return "did not provide metrics" not in str(record.msg)


_QUIET = _DropMissingMetricsWarning()


def _quiet_orbax() -> None:
    import logging

    logger = logging.getLogger("absl")
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)


def _checkpoint_manager(directory: Path, config: TrainConfig | None, *, read_only: bool = False):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as ocm

    policies: list[Any] = []
    track_best = config is not None and config.keep_best
    if config is not None:
        policies.append(ocm.LatestN(config.keep_last_n))
        if track_best:
            # checkpoints saved at an evaluation carry {"val_loss": v}; reverse=True sorts
            # descending, so BestN's "last n" are the lowest losses
            policies.append(ocm.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False))
    _quiet_orbax()
    # (not orbax's read_only option, which logs warnings; this manager just never saves)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocm.AnyPreservationPolicy(policies) if policies else None,
        # orbax writes the metrics to disk only when best_fn is set; without them a later
        # session (a resume) would not know which old checkpoint was the best
        best_fn=_val_loss if track_best else None,
        best_mode="min",
        # synchronous: the next step donates (frees) the arrays being saved
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,  # drop leftovers of a save that was killed
        create=not read_only,
        save_root_metadata=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=_ITEMS)


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, int | None]:
    """``(checkpoints folder, step or None = latest)`` for a run folder, its
    ``checkpoints/`` folder, or one step folder ``checkpoints/<step>``.

    Raises:
        FileNotFoundError: nothing that looks like a checkpoint at ``path``.
    """
    path = Path(path).expanduser().absolute()  # orbax wants absolute paths
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: no such path {path}")
    if (path / CHECKPOINT_DIR).is_dir():
        return path / CHECKPOINT_DIR, None
    if path.name.isdigit() and ((path / "meta").is_dir() or (path / MANIFEST_FILE).is_file()):
        return path.parent, int(path.name)
    if any(p.name.isdigit() for p in path.iterdir() if p.is_dir()):
        return path, None
    raise FileNotFoundError(
        f"checkpoint: {path} is neither a run folder (with {CHECKPOINT_DIR}/), a checkpoints "
        "folder nor a step folder")


@dataclasses.dataclass
class _Session:
    """What one call of :meth:`SFTTrainer.train` tracks (it ends up in its TrainResult)."""

    start_step: int
    start_time: float  # perf_counter
    elapsed_before: float  # wall time of earlier sessions of the run
    metrics_file: Any  # metrics.jsonl, open for appending
    last_ckpt: Path | None
    last_val: float | None
    val_step: int | None
    best_val: float | None
    window_start: float  # perf_counter at the start of the current tokens/s window
    last_train: float | None = None
    window_steps: int = 0
    tokens: int = 0  # training tokens of this session
    stop: str | None = None  # the signal that stopped the loop
    pending: list[jax.Array] = dataclasses.field(default_factory=list)  # losses since the last record
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def record(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        self.metrics_file.write(json.dumps(rec) + "\n")
        self.metrics_file.flush()


def catch_stop_signals(session: Any) -> Callable[[], None]:
    """SIGINT / SIGTERM set ``session.stop`` to the signal's name (a second SIGINT raises
    KeyboardInterrupt). Returns the function that puts the previous handlers back (signal
    handlers can only be set from the main thread; elsewhere this does nothing). Shared by
    the SFT and RL loops."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum: int, frame: Any) -> None:
        if session.stop is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: quit now, no checkpoint
        session.stop = signal.Signals(signum).name

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore


# ---- the trainer -------------------------------------------------------------------------


class SFTTrainer:
    """Next-token cross-entropy training with evaluation, metrics and orbax checkpoints.

    Args:
        model: the :class:`LMModel` to train (its weights are copied in; the object is
            updated from the trained state by :attr:`model` and at the end of ``train``).
        tx: an optax transformation, or None for :func:`build_optimizer` (the config's
            optimizer and schedule). A custom Sophia must accept ``hessian=`` in ``update``
            (``linearnexus.optim.sophia`` does). Trainers sharing one ``tx`` object and the
            same model structure share compiled steps.
        train_loader: a :class:`~linearnexus.data.DataLoader` (or anything iterable yielding
            ``(inputs [B, T], targets [B, T])`` int32 with ``state_dict`` /
            ``load_state_dict``); its position is checkpointed.
        val_dataset: token file for evaluation (``eval_batches`` fixed windows of
            ``[batch_size, seq_len]``), or None to skip evaluation.
        config: the :class:`TrainConfig`.
        model_config: the model's config (None = ``model.config``); stored in checkpoints
            so :func:`load_checkpoint` can rebuild the model.
        tokenizer: optional; stored in checkpoints for sampling.
        lr_schedule: the schedule of a custom ``tx``, to log the lr (None: not logged).
        log: where progress lines go (default: print to stdout, through tqdm when a bar
            is shown).

    Raises:
        TypeError / ValueError: bad arguments (e.g. a loader whose batch shape differs
            from the config, or a val set shorter than ``seq_len + 1`` tokens).
    """

    def __init__(self, model: LMModel, tx: optax.GradientTransformation | None,
                 train_loader: Any, val_dataset: TextDataset | None, config: TrainConfig,
                 model_config: ModelConfig | None = None, *, tokenizer: Any = None,
                 lr_schedule: optax.Schedule | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected TrainConfig, got {type(config).__name__}")
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model: expected an nnx.Module, got {type(model).__name__}")
        model_config = model_config if model_config is not None else getattr(model, "config", None)
        if not isinstance(model_config, ModelConfig):
            raise TypeError("model_config: expected a ModelConfig (none given and model.config "
                            "is not one)")
        for name in ("batch_size", "seq_len"):
            got = getattr(train_loader, name, getattr(config, name))
            if got != getattr(config, name):
                raise ValueError(f"train_loader: {name}={got} differs from config.{name}="
                                 f"{getattr(config, name)}")
        if config.seq_len > model_config.max_seq_len:
            raise ValueError(f"config.seq_len={config.seq_len} exceeds the model's max_seq_len="
                             f"{model_config.max_seq_len}")
        self.config = config
        self.model_config = model_config
        self.train_loader = train_loader
        self.val_dataset = val_dataset
        self.tokenizer = tokenizer
        self._log_fn = log
        self._model = model
        self._background_save: _BackgroundSave | None = None
        if config.background_checkpoints and jax.process_count() > 1:
            raise ValueError("background_checkpoints: needs a single process (orbax's save "
                             f"synchronizes the {jax.process_count()} processes); got True")
        # fixed malloc thresholds on the CPU: without them, the background checkpoints' frees
        # moved glibc's dynamic ones and every later step page-faulted its buffers afresh
        maybe_tune_cpu_malloc()
        self.out_dir = Path(config.out_dir).expanduser().absolute()  # orbax wants absolute paths
        self.checkpoint_dir = self.out_dir / CHECKPOINT_DIR
        self.metrics_path = self.out_dir / METRICS_FILE

        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        # copies: the step donates its input buffers, which must not be the model's own
        params = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))
        rest = jax.tree.map(jnp.copy, nnx.to_pure_dict(rest))
        if tx is None:
            tx, lr_schedule = build_optimizer(config, params)
        self.tx = tx
        self.lr_schedule = lr_schedule
        self.state = TrainState(params, rest, tx.init(params),
                                jax.random.PRNGKey(config.seed))
        self.placement = None  # the state's layout on a device mesh (config.mesh)
        if config.mesh is not None:
            from linearnexus.parallel import Placement

            self.placement = Placement.create(config.mesh, self.state, model_config,
                                              batch_size=config.batch_size, seq_len=config.seq_len)
            self.state = self.placement.place_state(self.state)
        self.step = 0
        self.elapsed_before = 0.0  # wall time of earlier sessions of this run
        self.restored_metrics: dict[str, Any] = {}  # of the checkpoint resumed from
        self.uses_hessian = config.optimizer == "sophia"
        self._fns = _compiled(self.graphdef, tx, self.placement)
        self._eval_batches = self._make_eval_batches()

    def _make_eval_batches(self) -> tuple[jax.Array, jax.Array] | None:
        if self.val_dataset is None:
            return None
        loader = DataLoader(self.val_dataset, self.config.batch_size, self.config.seq_len,
                            seed=EVAL_SEED)
        batches = [loader.get_batch(i) for i in range(self.config.eval_batches)]
        inputs = np.stack([b[0] for b in batches])  # [N, B, T]
        targets = np.stack([b[1] for b in batches])  # [N, B, T]
        if self.placement is not None:
            return self.placement.place_batch(inputs, targets, eval=True)
        return jnp.asarray(inputs), jnp.asarray(targets)

    # -- public pieces -----------------------------------------------------------------------

    def train_step(self, inputs: Any, targets: Any) -> jax.Array:
        """One optimizer step on ``inputs, targets`` (``[B, T]`` int32); returns the loss
        (a device scalar, not synced). Sophia gets a Hessian estimate on its k-th steps."""
        if self.uses_hessian and sophia_should_update_hessian(
                self.step, self.config.sophia_hessian_interval):
            fn = self._fns.step_hessian
        else:
            fn = self._fns.step
        if self.placement is not None:
            inputs, targets = self.placement.place_batch(inputs, targets)
        # the old state is donated (its buffers are reused), so it is replaced whole
        self.state, loss = fn(self.state, inputs, targets)
        self.step += 1
        return loss

    def evaluate(self) -> float | None:
        """Mean loss over the fixed val windows (None without a val set)."""
        if self._eval_batches is None:
            return None
        return float(self._fns.eval(self.state.params, self.state.rest, *self._eval_batches))

    def lr_at(self, step: int) -> float | None:
        """Learning rate of optimizer step ``step`` (0-based), when the trainer built the tx."""
        return None if self.lr_schedule is None else float(self.lr_schedule(step))

    @property
    def model(self) -> LMModel:
        """The model passed in, updated to the current trained weights (copies, so later
        training steps do not invalidate it)."""
        nnx.update(self._model, jax.tree.map(jnp.copy, self.state.params),
                   jax.tree.map(jnp.copy, self.state.rest))
        return self._model

    # -- checkpoints -------------------------------------------------------------------------

    def _meta(self, metrics: dict[str, Any] | None, elapsed: float) -> dict[str, Any]:
        loader_state = (self.train_loader.state_dict()
                        if hasattr(self.train_loader, "state_dict") else None)
        return {
            "format_version": _FORMAT_VERSION,
            "step": self.step,
            "loader": loader_state,
            "model_config": self.model_config.to_dict(),
            "train_config": self.config.to_dict(),
            "metrics": metrics or {},
            "elapsed_s": elapsed,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def save_checkpoint(self, metrics: dict[str, Any] | None = None, *,
                        elapsed: float | None = None, manager: Any = None,
                        wait: bool = True) -> Path:
        """Write a checkpoint of the current step (no-op if that step is already saved).

        ``metrics`` with a ``val_loss`` makes the checkpoint a candidate for "best".
        Orbax writes the items; then an integrity manifest (sizes and SHA-256 of every file)
        is written last, which marks the checkpoint complete. Returns the step folder.

        With ``wait=False`` the state is copied (a few ms) and written by a background
        thread while training goes on (``train`` does this for its periodic checkpoints
        when ``config.background_checkpoints``; one process only). The next
        save, :meth:`wait_for_checkpoint` and the end of ``train`` wait for it and raise its
        error; until its manifest is written it is not a complete checkpoint, so a kill
        before then resumes from the one before, as a kill during a waited save does.

        Raises:
            CheckpointWriteError: a write failed (e.g. a full disk); older checkpoints are
                untouched, and this step's partial files are ignored on resume. (Also an
                earlier background save's failure, raised here before this save starts.)
        """
        if not wait and jax.process_count() > 1:
            raise ValueError("wait: background checkpoints need a single process (orbax's "
                             f"save synchronizes the {jax.process_count()} processes); got "
                             "wait=False")
        self.wait_for_checkpoint()
        own = manager is None
        mgr = manager or _checkpoint_manager(self.checkpoint_dir, self.config)
        step, step_dir = self.step, self.checkpoint_dir / str(self.step)
        try:
            if step in mgr.all_steps():
                return step_dir
            # everything read from the trainer is taken now, in this thread
            args, metrics_arg = self._checkpoint_args(metrics, elapsed, copy=not wait)
        except BaseException:
            if own:
                mgr.close()
            raise

        def write() -> None:
            try:
                self._write_checkpoint(mgr, step, args, metrics_arg)
            finally:
                if own:
                    mgr.close()

        if wait:
            write()
        else:
            self._background_save = _BackgroundSave(write, step)
        return step_dir

    def wait_for_checkpoint(self) -> None:
        """Wait for a checkpoint being written in the background (``save_checkpoint(...,
        wait=False)``), if any.

        Raises:
            CheckpointWriteError (or whatever else the save raised): that save failed.
        """
        pending = self._background_save
        if pending is None:
            return
        error = pending.wait()  # interrupted (Ctrl-C): the save stays pending, not forgotten
        self._background_save = None
        if error is not None:
            raise error

    def _settle_background_save(self) -> None:
        """Wait for a background save without raising its error (logged instead): for paths
        that are failing already, and before the run's manager closes."""
        try:
            self.wait_for_checkpoint()
        except Exception as e:  # noqa: BLE001 - an error of its own is already on its way
            self._log(f"warning: a background checkpoint failed too: {e}")

    def _raise_if_background_save_failed(self) -> None:
        """Raise a background save's error as soon as it is known (checked every step)."""
        pending = self._background_save
        if pending is not None and pending.failed():
            self.wait_for_checkpoint()

    def _checkpoint_args(self, metrics: dict[str, Any] | None, elapsed: float | None, *,
                         copy: bool) -> tuple[Any, dict[str, float] | None]:
        """Orbax's arguments for the current state (its arrays copied first when ``copy``:
        the next training step donates, so overwrites, the trainer's own buffers)."""
        import orbax.checkpoint as ocp

        state = self.state
        if jax.process_count() == 1 and self.placement is not None:
            # one process: replicated arrays go to orbax as one device's copy. Orbax writes
            # a replicated array on N devices in N slices (replica-parallel writes), each an
            # eager slice op: ~25% of a 2-device gpt-small save. Restores take the reader's
            # shardings anyway; sharded arrays are left as they are (no gather).
            first = SingleDeviceSharding(self.placement.mesh.devices.flat[0])
            state = jax.device_put(state, jax.tree.map(
                lambda x: first if x.sharding.is_fully_replicated else x.sharding, state))
        if copy:  # after the move, so only one replica of a replicated array is copied
            state = _copy_arrays(state)
        opt: Any = {"opt_state": state.opt_state, "rng": state.rng}
        # the optimizer state as a few vectors where it is whole on every device (one
        # process): orbax's bookkeeping is per array, ~3 ms each (gpt-small's save 255 ->
        # 110 ms on one device); only this trainer's resume reads it back
        opt_layout = _opt_layout(opt)
        if opt_layout == "flat":
            opt = _flat_by_dtype_jit(opt)
        meta = self._meta(metrics, self.elapsed_before if elapsed is None else elapsed)
        items = {
            "model": ocp.args.StandardSave({"params": state.params, "rest": state.rest}),
            "opt": ocp.args.StandardSave(opt),
            "meta": ocp.args.JsonSave({**meta, "opt_layout": opt_layout}),
        }
        if self.tokenizer is not None:
            items["tokenizer"] = ocp.args.JsonSave(_tokenizer_json(self.tokenizer))
        val = None if not metrics else metrics.get("val_loss")
        return (ocp.args.Composite(**items),
                None if val is None else {"val_loss": float(val)})

    def _write_checkpoint(self, mgr: Any, step: int, args: Any,
                          metrics: dict[str, float] | None) -> None:
        step_dir = self.checkpoint_dir / str(step)
        try:
            mgr.save(step, args=args, metrics=metrics)
            mgr.wait_until_finished()
            write_checkpoint_manifest(step_dir, step)
        except OSError as e:
            raise CheckpointWriteError(
                e.errno, f"checkpoint: writing step {step} to {step_dir} failed "
                f"({e.strerror or e}); the earlier checkpoints "
                f"{[s for s, _ in step_folders(self.checkpoint_dir) if s != step]} are "
                "intact and --resume continues from the newest of them") from e

    def restore_checkpoint(self, step: int | None = None, *, manager: Any = None) -> int | None:
        """Load the newest checkpoint of ``out_dir`` that verifies (or ``step``) into the
        trainer: weights, optimizer state, RNG, step, loader position. Returns the step, or
        None when there is no checkpoint.

        Without ``manager``, checkpoints are first checked against their manifests
        (``config.verify_checkpoints``; failing ones are named in a warning, not moved). With
        one (as :meth:`train` calls it), the caller has already selected a verified step.

        Raises:
            ValueError: the checkpoint was written for a different model config.
            CheckpointError: checkpoints exist but none verifies.
        """
        import orbax.checkpoint as ocp

        self.wait_for_checkpoint()  # never read (or set aside) a checkpoint still being written
        if not self.checkpoint_dir.is_dir():
            return None
        if manager is None:
            step = select_checkpoint(self.checkpoint_dir, self.config.verify_checkpoints,
                                     step=step, warn=self._log)
            if step is None:
                return None
        own = manager is None
        mgr = manager or _checkpoint_manager(self.checkpoint_dir, self.config)
        try:
            step = mgr.latest_step() if step is None else step
            if step is None:
                return None
            meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            saved_model = ModelConfig.from_dict(meta["model_config"])
            if saved_model != self.model_config:
                diff = _config_diff(saved_model.to_dict(), self.model_config.to_dict())
                raise ValueError(f"checkpoint {self.checkpoint_dir / str(step)} was written for a "
                                 f"different model config ({diff})")
            if self.tokenizer is not None and (self.checkpoint_dir / str(step) / "tokenizer").is_dir():
                saved_tok = mgr.restore(step, args=ocp.args.Composite(
                    tokenizer=ocp.args.JsonRestore())).tokenizer
                if saved_tok is not None and saved_tok != _tokenizer_json(self.tokenizer):
                    # same vocab size is not enough: ids would silently mean other tokens
                    raise ValueError(
                        f"tokenizer: the checkpoint at {self.checkpoint_dir / str(step)} was trained "
                        "with a different tokenizer than the prepared data's (the text or the "
                        "tokenizer settings changed); resume on the same data or start a new run")
            saved_train = meta.get("train_config", {})
            if saved_train.get("optimizer", self.config.optimizer) != self.config.optimizer:
                # the optimizer state's structure differs: it cannot be restored
                raise ValueError(
                    f"optimizer: the checkpoint at {self.checkpoint_dir / str(step)} was written by "
                    f"{saved_train['optimizer']!r}, not {self.config.optimizer!r}; resume with "
                    f"--optimizer {saved_train['optimizer']} or start a new run")
            harmless = _HARMLESS_FIELDS + (("max_steps",) if self.config.schedule == "constant"
                                           else ())
            changed = [k for k, v in self.config.to_dict().items()
                       if k not in harmless and k in saved_train and saved_train[k] != v]
            if changed:
                self._log(f"warning: resuming with changed training settings "
                          f"({_config_diff(saved_train, self.config.to_dict(), changed)}); "
                          "the continuation will not match the original run exactly")
            like = {"opt_state": self.state.opt_state, "rng": self.state.rng}
            if meta.get("opt_layout", "tree") == "flat":  # host vectors, placed below
                flat_like = {name: np.zeros(int(np.shape(v)[0]), name)
                             for name, v in jax.eval_shape(_flat_by_dtype, like).items()}
                opt_arg = ocp.args.StandardRestore(flat_like)
            else:
                opt_arg = ocp.args.StandardRestore(_abstract(like))
            restored = mgr.restore(step, args=ocp.args.Composite(
                model=ocp.args.StandardRestore(_abstract({"params": self.state.params,
                                                          "rest": self.state.rest})),
                opt=opt_arg))
        finally:
            if own:
                mgr.close()
        opt = restored.opt
        if meta.get("opt_layout", "tree") == "flat":
            opt = _place_like(_unflat_by_dtype(opt, like), like)
        self.state = TrainState(restored.model["params"], restored.model["rest"],
                                opt["opt_state"], opt["rng"])
        self.step = int(meta["step"])
        self.elapsed_before = float(meta.get("elapsed_s", 0.0))
        self.restored_metrics = dict(meta.get("metrics") or {})
        if meta.get("loader") is not None and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(meta["loader"])
        return self.step

    # -- the loop ------------------------------------------------------------------------------

    def _log(self, line: str) -> None:
        if self._log_fn is not None:
            self._log_fn(line)
        elif getattr(self, "_bar", None) is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def _write_config(self) -> None:
        import yaml

        text = yaml.safe_dump({"model": self.model_config.to_dict(),
                               "train": self.config.to_dict()}, sort_keys=False)
        atomic_write_text(self.out_dir / CONFIG_FILE, text)

    def _truncate_metrics(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint we resume from) and any
        line cut short by a kill, so appended records start on a fresh line."""
        if self.metrics_path.is_file():
            kept = [r for r in _read_jsonl(self.metrics_path) if r.get("step", 0) <= step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def train(self, *, resume: bool = False, on_step: Callable[[int], None] | None = None
              ) -> TrainResult:
        """Train to ``config.max_steps``.

        Args:
            resume: continue from the latest complete checkpoint in ``out_dir`` (a fresh
                start if there is none). Batches, RNG and optimizer state continue exactly,
                so the losses equal those of an uninterrupted run with the same config.
            on_step: called with the step number after every step (e.g. custom logging).

        SIGINT (Ctrl-C) and SIGTERM stop the loop after the current step, save a
        checkpoint and return with ``interrupted`` set; a second Ctrl-C raises
        ``KeyboardInterrupt`` at once (no save).

        On resume, checkpoints are checked against their manifests
        (``config.verify_checkpoints``) newest first; each one that fails is named in a
        warning and moved aside as ``<step>.corrupt``, and the newest that verifies is
        restored. The run holds ``out_dir``'s :class:`~linearnexus.train.integrity.RunLock`
        throughout. ``config.yaml`` is rewritten once the first step of this session ran
        (so a resume that changes a setting but dies before a step leaves it as it was).

        Raises:
            FileExistsError: ``out_dir`` has checkpoints and ``resume`` is False.
            RunLockedError: another live process is training in ``out_dir``.
            CheckpointError: ``resume`` and checkpoints exist, but none verifies.
            CheckpointWriteError: a checkpoint could not be written (e.g. a full disk).
        """
        self.wait_for_checkpoint()  # a save(wait=False) of the caller's lands before the run opens
        with RunLock(self.out_dir, warn=self._log):
            mgr = self._open_run(resume)
            try:
                return self._loop(mgr, on_step)
            finally:
                self._settle_background_save()  # never close the manager under a writer
                mgr.close()

    def _open_run(self, resume: bool) -> Any:
        """Check the folder, restore on resume, reset the metrics; returns the checkpoint
        manager (opened after corrupt checkpoints were moved aside, so it never sees them)."""
        cfg = self.config
        chosen = None
        if self.step == 0:
            existing = [s for s, _ in step_folders(self.checkpoint_dir)]
            if existing and not resume:
                raise FileExistsError(
                    f"{self.checkpoint_dir} already holds checkpoints (latest step "
                    f"{existing[0]}); resume, or use a fresh out_dir")
            if resume:
                chosen = select_checkpoint(self.checkpoint_dir, cfg.verify_checkpoints,
                                           move_aside=True, warn=self._log)
        mgr = _checkpoint_manager(self.checkpoint_dir, cfg)
        try:
            if chosen is not None:
                self.restore_checkpoint(chosen, manager=mgr)
                self._log(f"resumed from {self.checkpoint_dir / str(self.step)} "
                          f"(step {self.step})")
            if self.step == 0:
                self.metrics_path.unlink(missing_ok=True)
            elif chosen is not None:
                self._truncate_metrics(self.step)
            if self.step == 0 or not (self.out_dir / CONFIG_FILE).is_file():
                self._write_config()
        except BaseException:
            mgr.close()
            raise
        return mgr

    def _loop(self, mgr: Any, on_step: Callable[[int], None] | None) -> TrainResult:
        """Steps to ``max_steps`` (or a signal): each step trains, then maybe logs /
        evaluates, then maybe checkpoints."""
        cfg = self.config
        session = self._start_session(mgr)
        restore_signals = catch_stop_signals(session)
        try:
            self._open_bar()
            self._initial_eval(session)
            while self.step < cfg.max_steps and session.stop is None:
                self._run_step(session)
                evaluated = self._maybe_log(session)
                self._maybe_checkpoint(session, mgr, evaluated)
                if on_step is not None:
                    on_step(self.step)
            if session.stop is not None:
                self._save_on_signal(session, mgr)
            self.wait_for_checkpoint()
        except BaseException:
            # the run is failing anyway: a periodic checkpoint still being written finishes
            # (nothing is lost); its own error, if any, is logged, not raised over this one
            self._settle_background_save()
            raise
        finally:
            session.metrics_file.close()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            restore_signals()
            self.elapsed_before = session.elapsed()
        self.write_plot()
        wall = time.perf_counter() - session.start_time
        self.model  # noqa: B018 - sync the caller's model object to the trained weights
        return TrainResult(
            step=self.step, start_step=session.start_step, train_loss=session.last_train,
            val_loss=session.last_val, val_step=session.val_step, best_val_loss=session.best_val,
            interrupted=session.stop, elapsed_s=wall,
            tokens_per_s=session.tokens / max(wall, 1e-9), history=session.history,
            checkpoint=session.last_ckpt)

    def _start_session(self, mgr: Any) -> _Session:
        last_val: float | None = self.restored_metrics.get("val_loss")
        now = time.perf_counter()
        return _Session(
            start_step=self.step, start_time=now, elapsed_before=self.elapsed_before,
            metrics_file=open(self.metrics_path, "a", encoding="utf-8"),  # noqa: SIM115
            last_ckpt=(self.checkpoint_dir / str(self.step)
                       if self.step in mgr.all_steps() else None),
            last_val=last_val, val_step=None if last_val is None else self.step,
            best_val=last_val, window_start=now)

    def _open_bar(self) -> None:
        self._bar = None
        if self.config.progress and sys.stderr.isatty() and self._log_fn is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.config.max_steps, initial=self.step, unit="step",
                             dynamic_ncols=True, desc="train")

    def _initial_eval(self, session: _Session) -> None:
        """The step-0 evaluation of a fresh run."""
        if self.step == 0 and self._eval_batches is not None and self.config.max_steps > 0:
            session.last_val = session.best_val = self.evaluate()
            session.val_step = 0
            session.record({"step": 0, "val_loss": session.last_val,
                            "elapsed_s": round(session.elapsed(), 3)})
            self._log(f"step 0: val loss {session.last_val:.4f}")
            session.window_start = time.perf_counter()

    def _run_step(self, session: _Session) -> None:
        inputs, targets = next(self.train_loader)
        session.pending.append(self.train_step(inputs, targets))
        session.window_steps += 1
        session.tokens += self.config.batch_size * self.config.seq_len
        if self._bar is not None:
            self._bar.update(1)
        if self.step == session.start_step + 1 and session.start_step > 0:
            # a resume records its (possibly changed) settings once a step ran with them
            self._write_config()

    def _maybe_log(self, session: _Session) -> bool:
        """Record train loss (and evaluate) when this step is due; returns whether it
        evaluated."""
        cfg, step = self.config, self.step
        is_last = step == cfg.max_steps
        do_eval = self._eval_batches is not None and (
            is_last or (cfg.eval_interval > 0 and step % cfg.eval_interval == 0))
        if not (do_eval or is_last or step % cfg.log_interval == 0):
            return False
        session.last_train = float(np.mean([float(x) for x in session.pending]))
        session.pending.clear()
        now = time.perf_counter()
        tokens = session.window_steps * cfg.batch_size * cfg.seq_len
        tok_s = tokens / max(now - session.window_start, 1e-9)
        rec: dict[str, Any] = {"step": step, "train_loss": session.last_train,
                               "lr": self.lr_at(step - 1), "tokens_per_s": round(tok_s, 1)}
        if not math.isfinite(session.last_train):
            self._log(f"warning: train loss is {session.last_train} at step {step}")
        if do_eval:
            session.last_val, session.val_step = self.evaluate(), step
            rec["val_loss"] = session.last_val
            session.best_val = (session.last_val if session.best_val is None
                                else min(session.best_val, session.last_val))
        rec["elapsed_s"] = round(session.elapsed(), 3)
        session.record(rec)
        if self._bar is not None:
            post = {"loss": f"{session.last_train:.4f}", "tok/s": f"{tok_s:,.0f}"}
            if session.last_val is not None:
                post["val"] = f"{session.last_val:.4f}"
            self._bar.set_postfix(post, refresh=False)
        if do_eval:
            eta = (cfg.max_steps - step) * (now - session.start_time) / max(
                step - session.start_step, 1)
            self._log(f"step {step}/{cfg.max_steps}: train loss {session.last_train:.4f}, "
                      f"val loss {session.last_val:.4f}, {tok_s:,.0f} tok/s, "
                      f"elapsed {session.elapsed():.0f}s, eta {eta:.0f}s")
        session.window_start, session.window_steps = time.perf_counter(), 0
        return do_eval

    def _maybe_checkpoint(self, session: _Session, mgr: Any, evaluated: bool) -> None:
        self._raise_if_background_save_failed()
        every = self.config.resolved_checkpoint_interval
        last = self.step == self.config.max_steps
        if last or (every > 0 and self.step % every == 0):
            metrics = {"val_loss": session.last_val} if evaluated else None
            # periodic checkpoints may be written while training goes on; the last one never
            session.last_ckpt = self.save_checkpoint(
                metrics, elapsed=session.elapsed(), manager=mgr,
                wait=last or not self.config.background_checkpoints)
            session.window_start = time.perf_counter()

    def _save_on_signal(self, session: _Session, mgr: Any) -> None:
        if session.pending:  # record the partial window so the log reaches the stop point
            session.last_train = float(np.mean([float(x) for x in session.pending]))
            session.record({"step": self.step, "train_loss": session.last_train,
                            "lr": self.lr_at(self.step - 1),
                            "elapsed_s": round(session.elapsed(), 3)})
        if self.step > 0:
            session.last_ckpt = self.save_checkpoint(None, elapsed=session.elapsed(), manager=mgr)
            self._log(f"{session.stop}: stopped at step {self.step}; checkpoint saved to "
                      f"{session.last_ckpt}")
        else:
            self._log(f"{session.stop}: stopped before the first step; nothing saved")

    def write_plot(self, path: str | os.PathLike | None = None) -> Path | None:
        """Plot train / val loss from metrics.jsonl to ``loss.png`` (Agg, no display).
        Returns the path, or None when there is nothing to plot."""
        records = _read_jsonl(self.metrics_path)
        train = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        return plot_curves(
            Path(path) if path is not None else self.out_dir / PLOT_FILE,
            [("train", train, {"linewidth": 1.2}),
             ("val", val, {"fmt": "o-", "linewidth": 1.5, "markersize": 4})],
            title=f"{self.out_dir.name}: {self.config.optimizer}, "
                  f"B={self.config.batch_size}, T={self.config.seq_len}",
            ylabel="cross-entropy (nats / token)")


def plot_curves(out: Path, series: list[tuple[str, list[tuple[int, float]], dict[str, Any]]], *,
                title: str, ylabel: str | None = None) -> Path | None:
    """Plot ``(label, [(step, value), ...], style)`` curves against the step into the PNG
    ``out`` (Agg, no display; written atomically). ``style`` may hold a matplotlib ``fmt``
    and line keywords. Returns ``out``, or None when every series is empty."""
    if not any(points for _, points, _ in series):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points, style in series:
        if points:
            style = dict(style)
            ax.plot(*zip(*points, strict=True), *([style.pop("fmt")] if "fmt" in style else []),
                    label=label, **style)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda fh: fig.savefig(fh, format="png"))
    return out


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                 keys: Any = None) -> str:
    keys = keys if keys is not None else sorted(set(old) | set(new))
    parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(parts)


def clear_run(out_dir: str | os.PathLike) -> None:
    """Delete what a training run wrote into ``out_dir`` (checkpoints, metrics, plot,
    config.yaml) so a fresh run can start there; other files (e.g. a data cache) stay."""
    import shutil

    out_dir = Path(out_dir).expanduser()
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    for name in (METRICS_FILE, PLOT_FILE, CONFIG_FILE):
        (out_dir / name).unlink(missing_ok=True)


def read_checkpoint_meta(path: str | os.PathLike, *, step: int | None = None,
                         verify: str = "full", move_aside: bool = False,
                         warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (``step``, ``model_config``, ``train_config``,
    ``loader``, ``metrics``, ``elapsed_s``); ``path``, ``step`` and ``verify`` as for
    :func:`load_checkpoint`. ``move_aside`` (only for the run's writer, holding its lock):
    rename checkpoints that fail verification to ``<step>.corrupt``.

    Raises:
        FileNotFoundError: no checkpoint there (CheckpointError: none that verifies).
    """
    import orbax.checkpoint as ocp

    directory, named_step = find_checkpoint(path)
    step = _pick_step(directory, step if step is not None else named_step, verify,
                      move_aside=move_aside, warn=warn)
    mgr = _checkpoint_manager(directory, None, read_only=True)
    try:
        return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    finally:
        mgr.close()


def _warn(line: str) -> None:
    warnings.warn(line.removeprefix("warning: "), stacklevel=3)


def _pick_step(directory: Path, step: int | None, verify: str, *, move_aside: bool = False,
               warn: Callable[[str], None] | None = None) -> int:
    """The newest step (or ``step``) in ``directory`` that verifies."""
    picked = select_checkpoint(directory, verify, step=step, move_aside=move_aside,
                               warn=warn or _warn)
    if picked is None:
        raise CheckpointError(f"checkpoint: no checkpoint in {directory}")
    return picked


# ---- loading for sampling ----------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike, *, step: int | None = None, verify: str = "full"
                    ) -> tuple[LMModel, ModelConfig, dict[str, Any]]:
    """Rebuild the model of a checkpoint, for sampling or evaluation.

    Args:
        path: a run folder (``out_dir``; the latest checkpoint), its ``checkpoints/``
            folder, or one step folder ``checkpoints/<step>``.
        step: a specific step (overrides the one a step folder names).
        verify: check the checkpoint against its integrity manifest first: ``full``
            (sizes and SHA-256), ``sizes`` or ``off``. Without a specific step, the newest
            checkpoint that verifies is used; each one skipped is named in a warning.

    Returns:
        ``(model, model_config, extra)`` where ``extra`` has ``step``, ``train_config``
        (a dict), ``metrics``, ``loader`` (position), ``tokenizer`` (the run's tokenizer
        object, or None if it was not saved) and ``path`` (the step folder).

    Raises:
        FileNotFoundError: no checkpoint at ``path`` (or no such step); its subclass
            CheckpointError when checkpoints exist but none (or not ``step``) verifies.
    """
    import orbax.checkpoint as ocp

    directory, named_step = find_checkpoint(path)
    step = _pick_step(directory, step if step is not None else named_step, verify)
    mgr = _checkpoint_manager(directory, None, read_only=True)
    try:
        step_dir = directory / str(step)
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        model_config = ModelConfig.from_dict(meta["model_config"])
        abstract_model = nnx.eval_shape(lambda: LMModel(model_config, rngs=nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def target(tree: Any) -> Any:
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                nnx.to_pure_dict(tree))

        items = {"model": ocp.args.StandardRestore({"params": target(params), "rest": target(rest)})}
        if (step_dir / "tokenizer").is_dir():
            items["tokenizer"] = ocp.args.JsonRestore()
        restored = mgr.restore(step, args=ocp.args.Composite(**items))
    finally:
        mgr.close()
    model = nnx.merge(graphdef, restored.model["params"], restored.model["rest"])
    tokenizer = (_tokenizer_from_json(restored.tokenizer)
                 if "tokenizer" in items and restored.tokenizer is not None else None)
    extra = {
        "step": int(meta["step"]),
        "train_config": meta.get("train_config"),
        "metrics": meta.get("metrics", {}),
        "loader": meta.get("loader"),
        "tokenizer": tokenizer,
        "path": step_dir,
    }
    return model, model_config, extra
