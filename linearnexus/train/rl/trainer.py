"""The RL loop shared by GRPO and PPO: rollouts, rewards, updates, held-out evaluation,
metrics, orbax checkpoints with exact resume, and SIGINT / SIGTERM saves.

::

    policy, model_config, extra = load_checkpoint("runs/sft")     # an SFT run
    trainer = RLTrainer(policy, extra["tokenizer"], get_task("addition"), RLConfig(...))
    result = trainer.train(resume=True)

One step: draw ``prompts_per_step`` training prompts (a function of ``(seed, step)``),
repeat each ``group_size`` times, sample completions with ``generate`` (temperature
``config.temperature``, the task's stop token), decode and score them with the task's
reward functions, then hand the batch to the algorithm (:class:`~.grpo.GRPO` or
:class:`~.ppo.PPO`), which updates the trained state.

A run folder is laid out as an SFT run's (``linearnexus.train.sft``), reusing its
checkpoint manager: ``checkpoints/<step>/{model,opt,meta,tokenizer}`` where ``model`` is
the policy alone (so ``load_checkpoint`` / ``sample.py`` read an RL run like an SFT run),
and ``opt`` the optimizer state plus, for PPO, the value head (and separate critic trunk).
``metrics.jsonl`` holds one record per logged step and ``rl.png`` the reward and held-out
accuracy curves. The reference model of a KL term is the initial policy (the ``--init``
checkpoint); it is not stored again.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from linearnexus.core.fileio import atomic_write_text
from linearnexus.generate import SamplingConfig, check_capacity, generate
from linearnexus.models import LMModel
from linearnexus.train.integrity import (
    RunLock,
    select_checkpoint,
    step_folders,
    write_checkpoint_manifest,
)
from linearnexus.train.rl._cache import cached
from linearnexus.train.rl.config import RLConfig
from linearnexus.train.rl.grpo import GRPO
from linearnexus.train.rl.ppo import PPO
from linearnexus.train.rl.rewards import check_reward, combine_rewards
from linearnexus.train.rl.rollout import (
    Rollout,
    build_rollout,
    completion_logprobs,
    sample_completions,
)
from linearnexus.train.rl.tasks import Task
from linearnexus.train.sft import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    TrainConfig,
    TrainState,
    _abstract,
    _checkpoint_manager,
    _read_jsonl,
    _tokenizer_json,
    build_optimizer,
    catch_stop_signals,
    plot_curves,
)

__all__ = ["RLResult", "RLTrainer"]

PLOT_FILE = "rl.png"
_FORMAT_VERSION = 2  # as SFT checkpoints: with an integrity manifest


@dataclasses.dataclass
class RLResult:
    """What :meth:`RLTrainer.train` did.

    Attributes:
        step / start_step: rollout steps done in all, and where this session started.
        reward_mean: the last logged mean reward. eval_accuracy: the last held-out accuracy.
        interrupted: ``"SIGINT"`` / ``"SIGTERM"`` when a signal stopped the run, else None.
        elapsed_s: this session's wall time. history: this session's metric records.
        checkpoint: the last checkpoint folder written or restored, if any.
    """

    step: int
    start_step: int
    reward_mean: float | None
    eval_accuracy: float | None
    interrupted: str | None
    elapsed_s: float
    history: list[dict[str, Any]]
    checkpoint: Path | None


def _seed(*parts: int) -> int:
    """A 31-bit seed from integers (one stream per (seed, step, purpose))."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


class RLTrainer:
    """GRPO / PPO training of a policy on a task's verifiable rewards.

    Args:
        policy: the starting :class:`LMModel` (an SFT checkpoint's). Its weights are copied
            in; the object is then used for rollouts (its weights are replaced by the
            current ones before each) and updated to the trained weights at the end.
        tokenizer: turns prompts into ids and completions into text (the SFT run's).
        task: prompts and rewards (:func:`~linearnexus.train.rl.tasks.get_task`).
        config: the :class:`RLConfig`.
        init: where the policy came from (``{"path": ..., "step": ...}``), recorded in
            checkpoints so a resume can rebuild the reference model.
        reference: the frozen reference of the KL term (None = a copy of ``policy``; give
            the initial model when ``policy`` is not it, e.g. on a resume). Not kept when
            the KL weight is 0.
        tx: an optax transformation, or None for the config's optimizer and schedule.
        log: where progress lines go (default: print, through tqdm when a bar is shown).

    Raises:
        TypeError: wrong argument types. ValueError: a prompt the tokenizer cannot encode,
            a stop text that is not exactly one token, prompts + completions longer than
            an attention cache, or a reward function that returns the wrong shape, NaN or
            non-numbers on a probe batch (all before any training work).
    """

    def __init__(self, policy: LMModel, tokenizer: Any, task: Task, config: RLConfig, *,
                 init: dict[str, Any] | None = None, reference: LMModel | None = None,
                 tx: optax.GradientTransformation | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        if not isinstance(config, RLConfig):
            raise TypeError(f"config: expected RLConfig, got {type(config).__name__}")
        if not isinstance(policy, LMModel):
            raise TypeError(f"policy: expected an LMModel, got {type(policy).__name__}")
        if not isinstance(task, Task):
            raise TypeError(f"task: expected a Task, got {type(task).__name__}")
        if tokenizer is None:
            raise TypeError("tokenizer: expected the policy's tokenizer, got None (an SFT "
                            "checkpoint saved without one cannot start an RL run)")
        self.config = config
        self.task = task
        self.tokenizer = tokenizer
        self.init = dict(init or {})
        self._log_fn = log
        self._bar: Any = None
        self.max_new_tokens = config.max_new_tokens or task.max_new_tokens
        self.out_dir = Path(config.out_dir).expanduser().absolute()  # orbax wants absolute paths
        self.checkpoint_dir = self.out_dir / CHECKPOINT_DIR
        self.metrics_path = self.out_dir / METRICS_FILE
        self.model_config = policy.config

        self.stop_id = self._stop_id()
        self.train_ids = self._encode_all(task.train_prompts, "train_prompts")
        self.eval_prompts = list(task.eval_prompts)[: config.eval_prompts]
        self.eval_ids = (self._encode_all(self.eval_prompts, "eval_prompts")
                         if config.eval_prompts != 0 else [])
        longest = max(map(len, self.train_ids + self.eval_ids))
        check_capacity(policy, longest, self.max_new_tokens)
        self._probe_rewards()

        self._policy = policy
        self.algo: GRPO | PPO = (GRPO if config.algo == "grpo" else PPO)(config, policy)
        _, params, rest = nnx.split(self.algo.module, nnx.Param, ...)
        # copies: the update donates its input buffers, which must not be the model's own
        params = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))
        rest = jax.tree.map(jnp.copy, nnx.to_pure_dict(rest))
        self.lr_schedule: optax.Schedule | None = None
        if tx is None:
            optim = self._optim_config()
            # one tx object per optimizer setting and parameter structure, so that trainers
            # alike (a run and its resumption) share the compiled update
            tx, self.lr_schedule = cached(
                self.algo.graphdef, ("tx", optim.to_dict(), jax.tree.structure(params)),
                lambda: build_optimizer(optim, params))
        self.algo.set_optimizer(tx)
        self.tx = tx
        self.state = TrainState(params, rest, tx.init(params), jax.random.PRNGKey(config.seed))

        pol_graphdef, _, _ = nnx.split(policy, nnx.Param, ...)
        ref_model = policy if reference is None else reference
        if not isinstance(ref_model, LMModel) or ref_model.config != policy.config:
            raise ValueError("reference: expected an LMModel with the policy's config")
        _, ref_params, ref_rest = nnx.split(ref_model, nnx.Param, ...)
        temperature = config.temperature

        def logprobs(params, rest, tokens, attn, prompt_len):
            model = nnx.merge(pol_graphdef, params, rest)
            logits, _ = model(tokens, mask=attn)  # [B, P + C, V]
            return completion_logprobs(logits, tokens, prompt_len, temperature)

        self._logprobs = cached(pol_graphdef, ("logprobs", temperature),
                                lambda: jax.jit(logprobs, static_argnums=(4,)))
        # the reference is the initial policy, frozen; none is kept when the KL weight is 0
        self.ref = ((jax.tree.map(jnp.copy, nnx.to_pure_dict(ref_params)),
                     jax.tree.map(jnp.copy, nnx.to_pure_dict(ref_rest)))
                    if config.uses_reference else None)
        self.step = 0
        self.elapsed_before = 0.0

    # -- setup checks ----------------------------------------------------------------------

    def _optim_config(self) -> TrainConfig:
        cfg = self.config
        total = cfg.max_steps * cfg.updates_per_step
        return TrainConfig(optimizer=cfg.optimizer, lr=cfg.lr, schedule=cfg.schedule,
                           max_steps=total, warmup_steps=min(cfg.warmup_steps, total),
                           weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2,
                           grad_clip=cfg.grad_clip, min_lr_ratio=0.1)

    def _stop_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_id", None)
        try:
            ids = list(self.tokenizer.encode(self.task.stop))
        except ValueError as e:
            if eos is not None:
                return int(eos)
            raise ValueError(f"task.stop: {self.task.stop!r} cannot be encoded ({e})") from None
        if len(ids) != 1:
            if eos is not None:
                return int(eos)
            raise ValueError(f"task.stop: {self.task.stop!r} is {len(ids)} tokens; the stop text "
                             "must be exactly one token of the tokenizer")
        return ids[0]

    def _encode_all(self, prompts: Any, name: str) -> list[list[int]]:
        if not prompts:
            raise ValueError(f"task.{name}: empty")
        out = []
        for i, p in enumerate(prompts):
            try:
                ids = list(self.tokenizer.encode(p))
            except ValueError as e:
                raise ValueError(f"task.{name}[{i}]: {p!r} cannot be encoded by the policy's "
                                 f"tokenizer ({e})") from None
            if not ids:
                raise ValueError(f"task.{name}[{i}]: empty prompt")
            out.append(ids)
        return out

    def _probe_rewards(self) -> None:
        """Call every reward function on two held-out prompts, so a wrong return type or
        shape is reported now and not after the first rollout."""
        prompts = list((self.eval_prompts or self.task.train_prompts)[:2])
        completions = [""] * len(prompts)
        for name, fn in {**self.task.rewards, "score": self.task.score}.items():
            if not callable(fn):
                raise TypeError(f"reward {name!r}: expected a callable, got {type(fn).__name__}")
            check_reward(name, fn(prompts, completions), len(prompts))

    # -- one step --------------------------------------------------------------------------

    def _sync_policy(self) -> LMModel:
        """The policy object with the current weights (no copies: only read until the next
        update donates them)."""
        params, rest = self.algo.policy_state(self.state.params, self.state.rest)
        nnx.update(self._policy, params, rest)
        return self._policy

    def rollout(self, step: int) -> tuple[Rollout, list[str], list[str]]:
        """Sample the rollout of ``step`` with the current policy:
        ``(rollout, prompts, completion texts)``; a function of (weights, seed, step)."""
        cfg = self.config
        rng = np.random.default_rng(_seed(cfg.seed, step, 0))
        picks = rng.integers(0, len(self.train_ids), size=cfg.prompts_per_step)
        rows = np.repeat(picks, cfg.group_size)  # the G samples of a prompt adjacent
        prompt_ids = [self.train_ids[i] for i in rows]
        completions, stopped = sample_completions(
            self._sync_policy(), prompt_ids, max_new_tokens=self.max_new_tokens,
            temperature=cfg.temperature, stop_tokens=(self.stop_id,),
            seed=_seed(cfg.seed, step, 1))
        texts = [self.tokenizer.decode(c[:-1] if s else c)
                 for c, s in zip(completions, stopped, strict=True)]
        prompts = [self.task.train_prompts[i] for i in rows]
        return build_rollout(prompt_ids, completions, stopped, self.max_new_tokens), prompts, texts

    def train_step(self) -> dict[str, Any]:
        """One rollout + update; returns the step's metrics (host floats)."""
        cfg = self.config
        rollout, prompts, texts = self.rollout(self.step)
        total, parts = combine_rewards(self.task.rewards, self.task.weights, prompts, texts)
        ref_logp = None
        if self.ref is not None:
            attn = None if rollout.attn_mask is None else jnp.asarray(rollout.attn_mask)
            ref_logp, _ = self._logprobs(*self.ref, jnp.asarray(rollout.tokens), attn,
                                         rollout.prompt_len)
        self.state, metrics = self.algo.update(
            self.state, rollout, total, logprob_fn=self._logprobs, ref_logp=ref_logp,
            rng=np.random.default_rng(_seed(cfg.seed, self.step, 2)))
        self.step += 1
        rec: dict[str, Any] = {"reward_mean": float(total.mean()), "reward_std": float(total.std())}
        rec.update({f"reward_{k}": float(v.mean()) for k, v in parts.items()})
        rec["completion_len"] = float(rollout.lengths.mean())
        rec["truncated_frac"] = float(1.0 - rollout.stopped.mean())
        rec.update(metrics)
        return rec

    def evaluate(self) -> float | None:
        """Held-out accuracy: greedy completions of ``eval_prompts`` scored by
        ``task.score`` (mean of 0 / 1); None when evaluation is off."""
        if not self.eval_ids:
            return None
        cfg = SamplingConfig(temperature=0.0, max_new_tokens=self.max_new_tokens,
                             stop_tokens=(self.stop_id,))
        outs = generate(self._sync_policy(), self.eval_ids, cfg)
        texts = [self.tokenizer.decode(o) for o in outs]
        truncated = [len(o) >= self.max_new_tokens for o in outs]
        scores = check_reward("score", self.task.score(self.eval_prompts, texts), len(texts))
        # a completion that never stopped is not an answer
        return float(np.mean(np.where(truncated, 0.0, scores)))

    @property
    def model(self) -> LMModel:
        """The policy passed in, updated to the current weights (copies)."""
        params, rest = self.algo.policy_state(self.state.params, self.state.rest)
        nnx.update(self._policy, jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, rest))
        return self._policy

    # -- checkpoints -------------------------------------------------------------------------

    def _opt_item(self) -> dict[str, Any]:
        item = {"opt_state": self.state.opt_state, "rng": self.state.rng}
        extra = self.algo.extra_state(self.state.params, self.state.rest)
        if extra:
            item["extra"] = extra
        return item

    def save_checkpoint(self, *, elapsed: float, manager: Any) -> Path:
        """Write the current step (policy, optimizer, value head, meta, tokenizer)."""
        import orbax.checkpoint as ocp

        if self.step not in manager.all_steps():
            params, rest = self.algo.policy_state(self.state.params, self.state.rest)
            meta = {"format_version": _FORMAT_VERSION, "kind": "rl", "step": self.step,
                    "model_config": self.model_config.to_dict(),
                    "train_config": self.config.to_dict(), "init": self.init, "loader": None,
                    "metrics": {}, "elapsed_s": elapsed,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            manager.save(self.step, args=ocp.args.Composite(
                model=ocp.args.StandardSave({"params": params, "rest": rest}),
                opt=ocp.args.StandardSave(self._opt_item()),
                meta=ocp.args.JsonSave(meta),
                tokenizer=ocp.args.JsonSave(_tokenizer_json(self.tokenizer))))
            manager.wait_until_finished()
            write_checkpoint_manifest(self.checkpoint_dir / str(self.step), self.step)
        return self.checkpoint_dir / str(self.step)

    def restore_checkpoint(self, manager: Any, step: int | None = None) -> int | None:
        """Load checkpoint ``step`` (None = the latest) of ``out_dir``; returns its step
        (None if there is none).

        Raises:
            ValueError: it was written by another algorithm or for another model.
        """
        import orbax.checkpoint as ocp

        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        where = self.checkpoint_dir / str(step)
        if meta.get("kind") != "rl":
            raise ValueError(f"checkpoint {where} is not an RL checkpoint")
        saved_algo = meta["train_config"].get("algo")
        if saved_algo != self.config.algo:
            raise ValueError(f"algo: the checkpoint {where} was written by {saved_algo!r}, "
                             f"not {self.config.algo!r}")
        if meta["model_config"] != self.model_config.to_dict():
            raise ValueError(f"checkpoint {where} was written for a different model config")
        params, rest = self.algo.policy_state(self.state.params, self.state.rest)
        restored = manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract({"params": params, "rest": rest})),
            opt=ocp.args.StandardRestore(_abstract(self._opt_item()))))
        opt = restored.opt
        policy = restored.model
        if self.config.algo == "ppo":
            new_params = {**opt["extra"]["params"], "policy": policy["params"]}
            new_rest = {**opt["extra"]["rest"]}
            if policy["rest"]:
                new_rest["policy"] = policy["rest"]
        else:
            new_params, new_rest = policy["params"], policy["rest"]
        self.state = TrainState(new_params, new_rest, opt["opt_state"], opt["rng"])
        self.step = int(meta["step"])
        self.elapsed_before = float(meta.get("elapsed_s", 0.0))
        return self.step

    # -- the loop ----------------------------------------------------------------------------

    def _log(self, line: str) -> None:
        if self._log_fn is not None:
            self._log_fn(line)
        elif self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def lr_at(self, step: int) -> float | None:
        """Learning rate of the first update of rollout step ``step`` (0-based)."""
        if self.lr_schedule is None:
            return None
        return float(self.lr_schedule(step * self.config.updates_per_step))

    def train(self, *, resume: bool = False) -> RLResult:
        """Train to ``config.max_steps`` rollout steps.

        Args:
            resume: continue from the latest checkpoint in ``out_dir`` (fresh start if
                none); prompts, sampling noise and minibatch order are functions of
                (seed, step), so the metrics equal an uninterrupted run's.

        SIGINT / SIGTERM stop after the current step and save a checkpoint; a second
        Ctrl-C raises ``KeyboardInterrupt`` at once.

        Raises:
            FileExistsError: ``out_dir`` holds checkpoints and ``resume`` is False.
            RunLockedError: another live process is training in ``out_dir``.
            CheckpointError: ``resume`` and checkpoints exist, but none verifies.
        """
        import yaml

        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.out_dir, warn=self._log):
            chosen = None
            if self.step == 0:
                existing = [s for s, _ in step_folders(self.checkpoint_dir)]
                if existing and not resume:
                    raise FileExistsError(f"{self.checkpoint_dir} already holds checkpoints (latest "
                                          f"step {existing[0]}); resume, or use a fresh out_dir")
                if resume:  # the newest that verifies; failing ones are moved aside
                    chosen = select_checkpoint(self.checkpoint_dir, move_aside=True,
                                               warn=self._log)
            mgr = _checkpoint_manager(self.checkpoint_dir, cfg)
            try:
                if chosen is not None:
                    self.restore_checkpoint(mgr, chosen)
                    self._log(f"resumed from {self.checkpoint_dir / str(self.step)} "
                              f"(step {self.step})")
                kept = [r for r in _read_jsonl(self.metrics_path) if r.get("step", 0) <= self.step]
                if self.step == 0:
                    kept = []
                atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
                atomic_write_text(self.out_dir / CONFIG_FILE, yaml.safe_dump(
                    {"model": self.model_config.to_dict(), "rl": cfg.to_dict(), "init": self.init},
                    sort_keys=False))
                return self._loop(mgr)
            finally:
                mgr.close()

    def _loop(self, mgr: Any) -> RLResult:
        cfg = self.config
        start_step, session_start = self.step, time.perf_counter()
        history: list[dict[str, Any]] = []
        last_ckpt = self.checkpoint_dir / str(self.step) if self.step in mgr.all_steps() else None
        last_acc: float | None = None
        last_reward: float | None = None
        ckpt_every = cfg.resolved_checkpoint_interval

        def elapsed() -> float:
            return self.elapsed_before + time.perf_counter() - session_start

        stop = SimpleNamespace(stop=None)  # catch_stop_signals sets .stop
        restore_signals = catch_stop_signals(stop)
        metrics_file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115

        def record(rec: dict[str, Any]) -> None:
            history.append(rec)
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()

        if cfg.progress and sys.stderr.isatty() and self._log_fn is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step",
                             dynamic_ncols=True, desc=cfg.algo)
        try:
            if self.step == 0 and self.eval_ids:
                last_acc = self.evaluate()
                record({"step": 0, "eval_accuracy": last_acc, "elapsed_s": round(elapsed(), 3)})
                self._log(f"step 0: held-out accuracy {last_acc:.3f}")
            while self.step < cfg.max_steps and stop.stop is None:
                lr = self.lr_at(self.step)
                t0 = time.perf_counter()
                rec = self.train_step()
                step = self.step
                last_reward = rec["reward_mean"]
                rec = {"step": step, **rec, "lr": lr, "step_s": round(time.perf_counter() - t0, 3)}
                is_last = step == cfg.max_steps
                do_eval = bool(self.eval_ids) and (
                    is_last or (cfg.eval_interval > 0 and step % cfg.eval_interval == 0))
                if do_eval:
                    last_acc = rec["eval_accuracy"] = self.evaluate()
                if do_eval or is_last or step % cfg.log_interval == 0:
                    rec["elapsed_s"] = round(elapsed(), 3)
                    record(rec)
                if self._bar is not None:
                    self._bar.update(1)
                    post = {"reward": f"{rec['reward_mean']:.3f}"}
                    if last_acc is not None:
                        post["acc"] = f"{last_acc:.3f}"
                    self._bar.set_postfix(post, refresh=False)
                if do_eval or is_last:
                    acc = "" if last_acc is None else f", held-out accuracy {last_acc:.3f}"
                    self._log(f"step {step}/{cfg.max_steps}: reward {rec['reward_mean']:.3f} "
                              f"(+- {rec['reward_std']:.3f}){acc}, completion length "
                              f"{rec['completion_len']:.2f}, elapsed {elapsed():.0f}s")
                if is_last or (ckpt_every > 0 and step % ckpt_every == 0):
                    last_ckpt = self.save_checkpoint(elapsed=elapsed(), manager=mgr)
            if stop.stop is not None:
                if self.step > start_step or (self.step > 0 and last_ckpt is None):
                    last_ckpt = self.save_checkpoint(elapsed=elapsed(), manager=mgr)
                    self._log(f"{stop.stop}: stopped at step {self.step}; checkpoint "
                              f"saved to {last_ckpt}")
                else:
                    self._log(f"{stop.stop}: stopped before the first step; nothing saved")
        finally:
            metrics_file.close()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            restore_signals()
            self.elapsed_before = elapsed()
        self.write_plot()
        self.model  # noqa: B018 - leave the caller's policy object with the trained weights
        return RLResult(step=self.step, start_step=start_step, reward_mean=last_reward,
                        eval_accuracy=last_acc, interrupted=stop.stop,
                        elapsed_s=time.perf_counter() - session_start, history=history,
                        checkpoint=last_ckpt)

    def write_plot(self, path: str | Path | None = None) -> Path | None:
        """Plot mean reward and held-out accuracy from metrics.jsonl (``rl.png``)."""
        records = _read_jsonl(self.metrics_path)
        reward = [(r["step"], r["reward_mean"]) for r in records if "reward_mean" in r]
        acc = [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
        return plot_curves(
            Path(path) if path is not None else self.out_dir / PLOT_FILE,
            [("reward (mean)", reward, {"linewidth": 1.0}),
             ("held-out accuracy", acc, {"fmt": "o-", "markersize": 4})],
            title=f"{self.out_dir.name}: {self.config.algo} on {self.config.task}, "
                  f"{self.config.prompts_per_step}x{self.config.group_size} samples / step")
