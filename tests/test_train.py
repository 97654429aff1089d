"""Tests for linearnexus.train and the train_lm.py / sample.py command lines.

Tiny models (2 layers, width 32) on a small synthetic text, so the whole file stays fast.
Trainers built from one shared optax ``tx`` object share compiled steps; the command-line
subprocesses share a persistent XLA compilation cache in a temporary folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from linearnexus.data import DataLoader, prepare_dataset
from linearnexus.models import create_model, get_preset
from linearnexus.train import (
    SFTTrainer,
    TrainConfig,
    build_optimizer,
    load_checkpoint,
    load_run_config,
    read_config_file,
)
from linearnexus.train.integrity import MANIFEST_FILE
from tests.helpers.text import synthetic_text

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(d_model=32, n_layers=1, block_options={"attention": {"n_heads": 2}}, max_seq_len=64)
BASE = dict(max_steps=40, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, eval_interval=10,
            eval_batches=2, log_interval=1, checkpoint_interval=10, progress=False)


def _text(n_chars: int = 20_000) -> str:
    return synthetic_text(n_chars, max_words=10)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    path = folder / "input.txt"
    path.write_text(_text(), encoding="utf-8")
    return path, prepare_dataset(path, folder / "data")


@pytest.fixture(scope="module")
def base_model(corpus):
    """(graphdef, params, rest) of one tiny GPT; models are rebuilt from copies (cheap)."""
    _, prepared = corpus
    model = create_model(get_preset("gpt-small", vocab_size=prepared.vocab_size, **TINY), seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


@pytest.fixture(scope="module")
def txs(base_model):
    """One tx object per optimizer, shared by trainers so their steps compile once."""
    _, params, _ = base_model
    cache = {}

    def get(**overrides):
        cfg = TrainConfig(**{**BASE, **overrides})
        key = (cfg.optimizer, cfg.schedule, cfg.max_steps, cfg.lr, cfg.warmup_steps)
        if key not in cache:
            cache[key] = build_optimizer(cfg, params)
        return cache[key]

    return get


@pytest.fixture
def make_trainer(corpus, base_model, txs, tmp_path):
    _, prepared = corpus
    graphdef, params, rest = base_model

    def make(out: str = "run", **overrides):
        cfg = TrainConfig(**{**BASE, "out_dir": str(tmp_path / out), **overrides})
        overrides.pop("out_dir", None)
        model = nnx.merge(graphdef, jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, rest))
        tx, schedule = txs(**overrides)
        loader = DataLoader(prepared.train_dataset(), cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        return SFTTrainer(model, tx, loader, prepared.val_dataset(), cfg, lr_schedule=schedule,
                          tokenizer=prepared.load_tokenizer(), log=lambda line: None)

    return make


def _losses(records):
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def _read_metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- training ----------------------------------------------------------------------------


def test_training_reduces_loss_and_writes_metrics_and_plot(make_trainer):
    other = make_trainer("other")
    x, y = other.train_loader.get_batch(0)
    old = other.state
    other.train_step(x, y)
    # donation took effect: the old state's buffers were handed to XLA ...
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.params))
    # ... and the caller's model never aliased them
    other._model(jnp.asarray(x))

    trainer = make_trainer()
    model_before = trainer._model
    result = trainer.train()
    losses = [r["train_loss"] for r in result.history if "train_loss" in r]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert result.val_loss < result.history[0]["val_loss"] - 0.5  # step-0 eval first
    assert result.step == 40 and result.interrupted is None

    records = _read_metrics(trainer.out_dir)
    assert records == result.history
    assert records[0] == {"step": 0, "val_loss": records[0]["val_loss"],
                          "elapsed_s": records[0]["elapsed_s"]}
    for r in records[1:]:
        assert {"step", "train_loss", "lr", "tokens_per_s", "elapsed_s"} <= set(r)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20, 30, 40]
    assert records[1]["lr"] == 0.0 and records[2]["lr"] == pytest.approx(1.5e-3)  # warmup
    assert (trainer.out_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    saved = yaml.safe_load((trainer.out_dir / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 40 and saved["model"]["d_model"] == 32
    # trainer.model is the trained model, and it stays valid when training continues
    assert trainer.model is model_before


# muon: its state's structure (masked leaves) only; no steps, to save a compilation
@pytest.mark.parametrize(("optimizer", "steps"), [("adamw", 3), ("sophia", 3), ("muon", 0)])
def test_checkpoint_round_trip(make_trainer, optimizer, steps):
    trainer = make_trainer(optimizer=optimizer, sophia_hessian_interval=1)
    for _ in range(steps):
        trainer.train_step(*next(trainer.train_loader))
    path = trainer.save_checkpoint({"val_loss": 3.0})
    assert path.name == str(steps) and (path / "meta").is_dir()

    fresh = make_trainer(optimizer=optimizer, sophia_hessian_interval=1)
    assert fresh.restore_checkpoint() == steps
    for a, b in zip(jax.tree.leaves(trainer.state), jax.tree.leaves(fresh.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(trainer.state) == jax.tree.structure(fresh.state)
    assert fresh.train_loader.state_dict() == {"seed": 0, "step": steps}
    if optimizer == "sophia":  # the rng moved (an estimate per step), and was restored
        assert not np.array_equal(np.asarray(fresh.state.rng), np.asarray(jax.random.PRNGKey(0)))
    if steps:  # the next step is the same in both
        batch = fresh.train_loader.get_batch(steps)
        assert float(trainer.train_step(*batch)) == float(fresh.train_step(*batch))

    model, model_config, extra = load_checkpoint(path)
    assert model_config == trainer.model_config
    assert extra["step"] == steps and extra["metrics"] == {"val_loss": 3.0}
    assert extra["tokenizer"].vocab_size == model_config.vocab_size
    assert extra["train_config"]["optimizer"] == optimizer


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_and_resume_matches_uninterrupted(make_trainer, sig):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    full = make_trainer("full").train()

    def stop_at_17(step):
        if step == 17:
            os.kill(os.getpid(), sig)

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    first = make_trainer("split").train(on_step=stop_at_17)
    assert first.interrupted == sig.name and first.step == 17
    assert first.checkpoint.name == "17" and first.checkpoint.is_dir()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers

    resumed = make_trainer("split")
    with pytest.raises(FileExistsError, match="resume"):
        resumed.train()
    second = resumed.train(resume=True)
    assert second.start_step == 17 and second.step == 40
    want, got = _losses(full.history), _losses(second.history)
    assert sorted(got) == list(range(18, 41))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
    # metrics of the split run read like one run
    records = _read_metrics(resumed.out_dir)
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 41))
    assert abs(records[-1]["val_loss"] - full.val_loss) < 1e-6


def test_keeps_last_n_and_best(make_trainer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer(keep_last_n=2, keep_best=True, out_dir="relative/run")
    ckpts = tmp_path / "relative" / "run" / "checkpoints"
    batch = trainer.train_loader.get_batch(0)
    for val in (1.0, 3.0, 2.0, 2.5, 2.6):
        trainer.train_step(*batch)
        trainer.save_checkpoint({"val_loss": val})
    assert sorted(int(p.name) for p in ckpts.iterdir()) == [1, 4, 5]
    trainer.train_step(*batch)
    trainer.save_checkpoint(None)  # e.g. Ctrl-C: no val loss, only kept as a recent one
    assert sorted(int(p.name) for p in ckpts.iterdir()) == [1, 5, 6]

    plain = make_trainer("plain", keep_last_n=2, keep_best=False)
    for val in (1.0, 3.0, 2.0):
        plain.train_step(*batch)
        plain.save_checkpoint({"val_loss": val})
    assert sorted(int(p.name) for p in plain.checkpoint_dir.iterdir()) == [2, 3]


def test_load_checkpoint_and_sample_cli(make_trainer, capsys):
    from linearnexus.cli import sample

    trainer = make_trainer(max_steps=40)
    trainer.train()
    model, config, extra = load_checkpoint(trainer.out_dir)  # a run folder: latest step
    assert extra["step"] == 40 and extra["path"] == trainer.out_dir / "checkpoints" / "40"
    tokens = jnp.asarray(trainer.train_loader.get_batch(0)[0])
    np.testing.assert_array_equal(np.asarray(model(tokens)[0]),
                                  np.asarray(trainer.model(tokens)[0]))
    assert load_checkpoint(trainer.out_dir / "checkpoints" / "30")[2]["step"] == 30

    capsys.readouterr()
    assert sample.main(["--checkpoint", str(trainer.out_dir), "--max-tokens", "24",
                        "--num-samples", "2", "--prompt", "the king"]) == 0
    out = capsys.readouterr().out
    texts = out.split(sample.SEPARATOR + "\n")
    assert len(texts) == 3 and texts[0].startswith("the king") and len(texts[0]) > 20
    assert sample.main(["--checkpoint", str(trainer.out_dir), "--max-tokens", "16",
                        "--stream", "--prompt", "my lord", "--state-dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.startswith("my lord")
    # a character the tokenizer has never seen: a clear error, not a traceback
    assert sample.main(["--checkpoint", str(trainer.out_dir), "--prompt", "Zzz"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err
    assert sample.main(["--checkpoint", str(trainer.out_dir / "nope")]) == 2


# ---- configs -----------------------------------------------------------------------------


def test_config_files(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("preset: gpt-small\nd_model: 64\n")
    model_section, train_section = read_config_file(flat)
    assert model_section == {"preset": "gpt-small", "d_model": 64} and train_section == {}
    sectioned = tmp_path / "run.yaml"
    sectioned.write_text("model: {d_model: 48, n_layers: 3}\ntrain: {max_steps: 7}\n")
    model_config, train = load_run_config(sectioned, lr=0.01)
    assert (model_config.d_model, model_config.n_layers) == (48, 3)
    assert (train.max_steps, train.lr) == (7, 0.01)

    nano_model, nano = load_run_config(ROOT / "configs/models/gpt_nanogpt_cpu.yaml")
    assert (nano_model.n_layers, nano_model.d_model) == (4, 128)
    assert nano_model.block_options["attention"]["n_heads"] == 4
    assert (nano.batch_size, nano.seq_len, nano.max_steps, nano.lr, nano.warmup_steps) == (
        12, 64, 2000, 1e-3, 100)
    assert (nano.min_lr_ratio, nano.weight_decay, nano.grad_clip, nano.val_fraction) == (
        0.1, 0.1, 1.0, 0.1)
    assert (nano.eval_interval, nano.eval_batches, nano.tokenizer) == (250, 20, "char")
    mamba_model, _ = load_run_config(ROOT / "configs/models/mamba_tiny.yaml")
    assert set(mamba_model.layer_types) == {"mamba"}


def test_cli_argument_errors(corpus, tmp_path, capsys):
    from linearnexus.cli import train_lm

    text, _ = corpus
    common = ["--data", str(text), "--out", str(tmp_path / "run")]

    def error_of(argv):
        code = train_lm.main(argv)
        assert code == 2
        return capsys.readouterr().err

    assert "unknown preset 'nope'" in error_of(["--model", "nope", *common])
    assert "gpt-small" in error_of(["--model", "nope", *common])
    assert "only meaningful with --tokenizer bpe" in error_of(["--vocab-size", "300", *common])
    assert "no such file" in error_of(["--config", str(tmp_path / "missing.yaml"), *common])
    assert "exceeds the model's max_seq_len" in error_of(
        ["--seq-len", "4096", "--model", "gpt-small", *common])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_stepz: 3}\n")
    assert "did you mean 'max_steps'" in error_of(["--config", str(bad), *common])
    assert "no such file" in error_of(["--data", str(tmp_path / "missing.txt"),
                                       "--out", str(tmp_path / "run")])
    for argv in (["--max-steps", "0"], ["--lr", "-1"], ["--resume", "--overwrite"],
                 ["--optimizer", "sgd"], ["--data", "x", "--download-shakespeare"]):
        with pytest.raises(SystemExit) as exc:
            train_lm.main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


# ---- the command line, killed and resumed ------------------------------------------------


def _cli(args, env, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "train_lm.py"), *args], env=env,
                          capture_output=True, text=True, timeout=240, **kwargs)


def test_sigkilled_cli_run_resumes_like_an_uninterrupted_one(corpus, tmp_path):
    text, _ = corpus
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"preset": "gpt-small", **TINY},
        # constant lr: max_steps only says where to stop, so runs of different lengths agree
        "train": {**BASE, "schedule": "constant", "warmup_steps": 0, "data": str(text)},
    }))
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "PYTHONUNBUFFERED": "1"}
    base = ["--config", str(config), "--no-progress", "--sample-tokens", "0"]

    ref = _cli([*base, "--out", str(tmp_path / "ref"), "--max-steps", "60"], env)
    assert ref.returncode == 0, ref.stderr
    want = _losses(_read_metrics(tmp_path / "ref"))

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_lm.py"), *base, "--out", str(run),
                             "--max-steps", "100000"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        # the manifest is written last: orbax's _CHECKPOINT_METADATA appears first, and a kill
        # between the two leaves a step that does not verify (resume then has none to take)
        while not (run / "checkpoints" / "10" / MANIFEST_FILE).is_file():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # complete saves only: one cut between orbax's rename and its manifest is moved aside
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir()
                   if p.name.isdigit() and (p / MANIFEST_FILE).is_file())
    assert steps and steps[-1] < 60
    # a save cut short leaves only a temporary folder: never picked, removed on resume
    partial = run / "checkpoints" / "99990.orbax-checkpoint-tmp-1234"
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "junk").write_bytes(b"\0" * 10)

    again = _cli([*base, "--out", str(run), "--max-steps", "60"], env)
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = _cli([*base, "--out", str(run), "--max-steps", "60", "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {steps[-1]})" in resumed.stdout  # "resumed from ... (step N)"
    assert not partial.exists()
    got = _losses(_read_metrics(run))
    assert sorted(got) == list(range(1, 61))  # records past the checkpoint were replaced
    for step in range(steps[-1] + 1, 61):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
    assert (run / "loss.png").is_file()


def test_resume_refuses_another_tokenizer(make_trainer):
    from linearnexus.data import CharTokenizer

    first = make_trainer("tok", max_steps=2, eval_interval=2)
    first.train()
    second = make_trainer("tok", max_steps=4, eval_interval=2)
    # same size, another character set: ids would silently change meaning
    chars = list(second.tokenizer.decode(list(range(second.tokenizer.vocab_size))))
    second.tokenizer = CharTokenizer(chars[:-1] + ["\u2603"])
    with pytest.raises(ValueError, match="tokenizer: the checkpoint at .* different tokenizer"):
        second.train(resume=True)
