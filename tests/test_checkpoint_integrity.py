"""Fault injection on checkpoints and run folders: damaged files, kills between a
checkpoint's files, a full disk, two writers on one folder, and the command line's
usage errors around them.

One tiny run (8 steps, checkpoints at 4 and 8) is trained once per module; each case
damages a copy of its folder and resumes it. "Same losses as a run that never had the
newer checkpoint" is checked against that run's own steps 5..8, which it computed from
the state checkpoint 4 holds.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus.core.fileio import build_manifest, verify_manifest
from linearnexus.data import DataLoader
from linearnexus.train import (
    CheckpointError,
    CheckpointWriteError,
    RunLock,
    RunLockedError,
    SFTTrainer,
    TrainConfig,
    read_checkpoint_meta,
    verify_checkpoint,
)
from linearnexus.train.integrity import LOCK_FILE, MANIFEST_FILE
from tests.test_train import BASE, ROOT, _losses, base_model, corpus, txs  # noqa: F401

RUN = dict(BASE, max_steps=8, eval_interval=4, checkpoint_interval=4, keep_last_n=3)


@pytest.fixture(scope="module")
def build(corpus, base_model, txs):  # noqa: F811 - pytest fixtures imported above
    """``build(out_dir, **overrides) -> (SFTTrainer, log lines)`` for a tiny model."""
    _, prepared = corpus
    graphdef, params, rest = base_model

    def make(out_dir, **overrides):
        cfg = TrainConfig(**{**RUN, **overrides, "out_dir": str(out_dir)})
        model = nnx.merge(graphdef, jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, rest))
        tx, schedule = txs(**{**RUN, **overrides})
        loader = DataLoader(prepared.train_dataset(), cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        lines: list[str] = []
        trainer = SFTTrainer(model, tx, loader, prepared.val_dataset(), cfg,
                             lr_schedule=schedule, tokenizer=prepared.load_tokenizer(),
                             log=lines.append)
        return trainer, lines

    return make


@pytest.fixture(scope="module")
def reference(build, tmp_path_factory):
    """(run folder with checkpoints 4 and 8, losses of steps 1..8)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    trainer, _ = build(out)
    result = trainer.train()
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
    assert steps == [4, 8]
    return out, _losses(result.history)


def _copy(reference, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    return out


def _assert_continues_from_4(build, out, reference, **overrides):
    trainer, lines = build(out, **overrides)
    result = trainer.train(resume=True)
    assert result.start_step == 4 and result.step == 8
    want, got = reference[1], _losses(result.history)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
    assert verify_checkpoint(out / "checkpoints" / "8") is None  # rewritten, with a manifest
    return lines


def _largest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# which file of checkpoint 8 each part names
PARTS = {
    "model": lambda d: _largest(d / "model"),
    "optimizer": lambda d: _largest(d / "opt"),
    "metadata": lambda d: d / "model" / "_METADATA",
    "manifest": lambda d: d / MANIFEST_FILE,
    "tokenizer": lambda d: d / "tokenizer" / "metadata",
    "loader": lambda d: d / "meta" / "metadata",  # loader position, step, configs
}


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    else:
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
@pytest.mark.parametrize("part", sorted(PARTS))
def test_damaged_newest_checkpoint_falls_back(build, reference, tmp_path, part, how):
    out = _copy(reference, tmp_path)
    target = PARTS[part](out / "checkpoints" / "8")
    rel = target.relative_to(out / "checkpoints" / "8").as_posix()
    _damage(target, how)
    lines = _assert_continues_from_4(build, out, reference)
    warning = next(line for line in lines if "failed verification" in line)
    assert "checkpoints/8" in warning and "8.corrupt" in warning and "using step 4" in warning
    named = MANIFEST_FILE if part == "manifest" else rel
    assert named in warning, warning
    assert (out / "checkpoints" / "8.corrupt" / (rel if how != "delete" else "")).exists()


def test_sizes_mode_and_legacy_and_none_verifies(build, reference, tmp_path):
    out = _copy(reference, tmp_path)
    ckpts = out / "checkpoints"
    flipped = PARTS["model"](ckpts / "8")
    _damage(flipped, "flip")
    assert verify_checkpoint(ckpts / "8", "sizes") is None  # same size: only a hash sees it
    assert "SHA-256" in verify_checkpoint(ckpts / "8", "full")
    assert verify_checkpoint(ckpts / "8", "off") is None
    _damage(PARTS["optimizer"](ckpts / "4"), "truncate")
    assert "bytes, expected" in verify_checkpoint(ckpts / "4", "sizes")
    trainer, _ = build(out)
    with pytest.raises(CheckpointError, match=r"none of the checkpoints.*8: model/.*4: opt/"):
        trainer.train(resume=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["4", "8"]  # nothing moved
    # the reader (sample.py) neither moves nor accepts them
    with pytest.raises(FileNotFoundError, match="none of the checkpoints"):
        read_checkpoint_meta(out)
    # a checkpoint from before manifests (format_version 1) is read unverified
    legacy = tmp_path / "legacy"
    shutil.copytree(reference[0] / "checkpoints" / "4", legacy / "4")
    (legacy / "4" / MANIFEST_FILE).unlink()
    meta_path = legacy / "4" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    assert "missing" in verify_checkpoint(legacy / "4")
    meta_path.write_text(json.dumps({**meta, "format_version": 1}))
    assert verify_checkpoint(legacy / "4") is None


def test_reader_skips_a_damaged_checkpoint_without_moving_it(reference, tmp_path):
    out = _copy(reference, tmp_path)
    (out / "checkpoints" / "8" / "model" / "_METADATA").unlink()
    with pytest.warns(UserWarning, match="checkpoints/8 failed verification.*_METADATA: missing"):
        meta = read_checkpoint_meta(out)
    assert meta["step"] == 4 and (out / "checkpoints" / "8").is_dir()


def test_manifest_helpers(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"12345")
    manifest = build_manifest(tmp_path)
    assert list(manifest) == ["a/x.bin"] and manifest["a/x.bin"]["size"] == 5
    assert verify_manifest(tmp_path, manifest) is None
    (tmp_path / "a" / "x.bin").write_bytes(b"12346")
    assert verify_manifest(tmp_path, manifest, hash_limit=4) is None  # over the limit: size only
    assert "SHA-256" in verify_manifest(tmp_path, manifest)
    with pytest.raises(ValueError, match="mode"):
        verify_manifest(tmp_path, manifest, "fast")


# ---- a kill between a checkpoint's files -------------------------------------------------

_KILLER = textwrap.dedent("""
    import os, signal, sys
    import orbax.checkpoint as ocp
    import tests.test_checkpoint_integrity as T

    handler = ocp.handlers.JsonCheckpointHandler
    original = handler._save_fn

    async def save_then_die(self, x, directory):
        await original(self, x, directory)
        if isinstance(x, dict) and x.get("step") == 8:  # step 8's meta file written, not the rest
            os.kill(os.getpid(), signal.SIGKILL)

    handler._save_fn = save_then_die
    T.train_once(sys.argv[1])
""")


class _Killed(BaseException):
    """Stands for SIGKILL in-process: raised where the kill would land; nothing of ours
    cleans up on it, so the files on disk are those a kill there leaves."""


def train_once(out: str) -> None:
    """The reference run, built outside pytest (for the kill subprocesses)."""
    import tempfile

    from linearnexus.data import prepare_dataset
    from linearnexus.models import create_model, get_preset
    from tests.test_train import TINY, _text

    folder = Path(tempfile.mkdtemp())
    (folder / "input.txt").write_text(_text(), encoding="utf-8")
    prepared = prepare_dataset(folder / "input.txt", folder / "data")
    cfg = TrainConfig(**{**RUN, "out_dir": out})
    model = create_model(get_preset("gpt-small", vocab_size=prepared.vocab_size, **TINY), seed=0)
    loader = DataLoader(prepared.train_dataset(), cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    SFTTrainer(model, None, loader, prepared.val_dataset(), cfg,
               tokenizer=prepared.load_tokenizer(), log=lambda line: None).train()


def test_sigkill_between_a_checkpoints_files_leaves_it_ignored(build, reference, tmp_path,
                                                               monkeypatch):
    from linearnexus.train import sft

    # inside orbax's save of step 8 (a real SIGKILL, in a subprocess): only orbax's temporary
    # folder for step 8 exists; it is never picked, and orbax removes it on open
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    mid = tmp_path / "orbax"
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(mid)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in (mid / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]
    _assert_continues_from_4(build, mid, reference)

    # after orbax renamed step 8 into place, before its manifest: complete to orbax, but
    # not to us; it is set aside on resume
    late = _copy(reference, tmp_path)
    shutil.rmtree(late / "checkpoints" / "8")

    def killed(step_dir, step):
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(sft, "write_checkpoint_manifest", killed)
        trainer, _ = build(late)
        with pytest.raises(_Killed):
            trainer.train(resume=True)
    (late / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname()}))
    assert (late / "checkpoints" / "8" / "meta").is_dir()
    lines = _assert_continues_from_4(build, late, reference)
    assert any(f"{MANIFEST_FILE}: missing (the save did not finish)" in line for line in lines)
    assert (late / "checkpoints" / "8.corrupt").is_dir()


# ---- a full disk ---------------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["orbax", "manifest"])
def test_full_disk_keeps_earlier_checkpoints_and_ends_clearly(build, reference, tmp_path,
                                                              monkeypatch, where):
    from linearnexus.train import integrity

    out = _copy(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / "8")
    with monkeypatch.context() as patch:
        if where == "orbax":  # orbax's last file of step 8 (the items' writers are done)
            from orbax.checkpoint._src.path import async_path

            write_text = async_path.write_text

            async def no_space_for_step_8(path, text):
                if path.name == "commit_success.txt" and path.parent.name.startswith("8."):
                    _no_space()
                return await write_text(path, text)

            patch.setattr(async_path, "write_text", no_space_for_step_8)
        else:  # the manifest write
            write = integrity.atomic_write_text
            patch.setattr(integrity, "atomic_write_text", lambda path, text: _no_space()
                          if Path(path).name == MANIFEST_FILE else write(path, text))
        trainer, _ = build(out)
        with pytest.raises(CheckpointWriteError, match=r"step 8 .*No space left.*\[4\] are intact") as e:
            trainer.train(resume=True)
        assert e.value.errno == errno.ENOSPC
    assert verify_checkpoint(out / "checkpoints" / "4") is None
    assert not (out / LOCK_FILE).exists()  # released on the way out
    _assert_continues_from_4(build, out, reference)


# ---- the optimizer state's layout -----------------------------------------------------


def test_both_optimizer_state_layouts_resume_exactly(build, reference, tmp_path, monkeypatch):
    """One process with a whole optimizer state writes it as one vector per dtype ("flat",
    the reference run's checkpoints); sharded states and older checkpoints have it array by
    array ("tree"). Either resumes to the same losses; vectors that do not fit this run's
    optimizer are refused, naming the sizes."""
    from linearnexus.train import sft

    assert read_checkpoint_meta(reference[0] / "checkpoints" / "4")["opt_layout"] == "flat"
    out = _copy(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / "8")
    trainer, _ = build(out)
    assert trainer.restore_checkpoint() == 4  # from the flat layout
    shutil.rmtree(out / "checkpoints" / "4")
    with monkeypatch.context() as patch:  # written again, array by array
        patch.setattr(sft, "_opt_layout", lambda opt: "tree")
        trainer.save_checkpoint({"val_loss": trainer.restored_metrics.get("val_loss")})
    assert read_checkpoint_meta(out / "checkpoints" / "4")["opt_layout"] == "tree"
    _assert_continues_from_4(build, out, reference)

    flat = {"float32": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"optimizer state: the checkpoint holds \{'float32': 3\}"):
        sft._unflat_by_dtype(flat, {"mu": jnp.zeros((2, 2))})


# ---- checkpoints written in the background ---------------------------------------------


def test_a_background_checkpoint_holds_its_step_while_training_goes_on(build, tmp_path,
                                                                       monkeypatch):
    """``save_checkpoint(wait=False)`` returns before the write is done; the steps after it
    (which donate, so overwrite, the trainer's buffers) do not reach what it writes; the
    checkpoint is complete (manifest) only once waited for, and holds step 4's state."""
    import threading

    from linearnexus.train import sft

    trainer, _ = build(tmp_path / "run")
    for _ in range(4):
        trainer.train_step(*next(trainer.train_loader))
    at_4 = jax.tree.map(lambda x: jnp.array(x, copy=True), trainer.state.params)
    release, writing = threading.Event(), threading.Event()
    write = sft.write_checkpoint_manifest

    def held(step_dir, step):
        writing.set()
        assert release.wait(60)
        return write(step_dir, step)

    monkeypatch.setattr(sft, "write_checkpoint_manifest", held)
    step_dir = trainer.save_checkpoint({"val_loss": 2.0}, wait=False)
    assert writing.wait(60)  # orbax's files are down; the manifest waits
    assert "missing" in verify_checkpoint(step_dir)
    for _ in range(2):
        trainer.train_step(*next(trainer.train_loader))
    pending = trainer._background_save
    with monkeypatch.context() as patch:  # a Ctrl-C during the wait leaves the save pending
        def interrupted(self):
            raise KeyboardInterrupt
        patch.setattr(sft._BackgroundSave, "wait", interrupted)
        with pytest.raises(KeyboardInterrupt):
            trainer.wait_for_checkpoint()
    assert trainer._background_save is pending
    release.set()
    trainer.wait_for_checkpoint()
    assert trainer._background_save is None
    assert verify_checkpoint(step_dir) is None
    again, _ = build(tmp_path / "run")
    assert again.restore_checkpoint() == 4
    for a, b in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(at_4), strict=True):
        assert jnp.array_equal(a, b)


def test_a_failed_background_checkpoint_stops_the_run(build, reference, tmp_path, monkeypatch):
    """Checkpoint 4 (written in the background) fails on a full disk: the run stops with
    its error (as soon as it is known, at the latest before the next checkpoint starts),
    writes no later checkpoint and releases its lock."""
    from linearnexus.train import integrity

    out = tmp_path / "run"
    write = integrity.atomic_write_text
    monkeypatch.setattr(integrity, "atomic_write_text", lambda path, text: _no_space()
                        if Path(path).name == MANIFEST_FILE else write(path, text))
    trainer, _ = build(out, background_checkpoints=True)
    with pytest.raises(CheckpointWriteError, match=r"step 4 .*No space left") as e:
        trainer.train()
    assert e.value.errno == errno.ENOSPC
    assert not (out / LOCK_FILE).exists()
    assert not (out / "checkpoints" / "8").exists()


# ---- one writer per run folder -----------------------------------------------------------


def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(build, reference, tmp_path):
    out = _copy(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / "8")
    lock = out / LOCK_FILE
    host = socket.gethostname()
    lock.write_text(json.dumps({"pid": os.getppid(), "host": host}))  # a live process
    trainer, _ = build(out)
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()} on {host}"):
        trainer.train(resume=True)
    lock.write_text(json.dumps({"pid": 1234, "host": "elsewhere"}))
    with pytest.raises(RunLockedError, match="host elsewhere"):
        RunLock(out).acquire()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": host}))
    lines = _assert_continues_from_4(build, out, reference)
    assert any(f"took over the stale lock {lock} of pid {dead.pid}" in line for line in lines)
    assert not lock.exists()
    with RunLock(out) as outer, RunLock(out):  # re-entrant in one process
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists() and outer is not None


_CONTENDER = textwrap.dedent("""
    import importlib.util, os, sys, time
    from pathlib import Path

    # the lock module alone (importing linearnexus.train would pull in JAX: seconds each)
    spec = importlib.util.spec_from_file_location("integrity", sys.argv[1])
    integrity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(integrity)
    out, go, release = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    while not go.exists():
        time.sleep(0.005)
    try:
        lock = integrity.RunLock(out).acquire()
    except integrity.RunLockedError as e:
        print(e)
        sys.exit(3)
    print("owner", os.getpid(), flush=True)
    while not release.exists():
        time.sleep(0.01)
    lock.release()
""")


def test_concurrent_processes_one_owner(tmp_path):
    from linearnexus.train import integrity

    out, go, release = tmp_path / "run", tmp_path / "go", tmp_path / "release"
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, integrity.__file__, str(out),
                               str(go), str(release)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    go.touch()  # all start racing for the lock at once
    deadline = time.monotonic() + 60
    while sum(p.poll() is not None for p in procs) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    losers = [p for p in procs if p.poll() is not None]
    owners = [p for p in procs if p not in losers]
    assert len(owners) == 1 and len(losers) == 3
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == owners[0].pid
    for p in losers:
        assert p.returncode == 3
        assert f"is in use by another run (pid {owners[0].pid} on" in p.stdout.read()
    release.touch()
    assert owners[0].wait(timeout=60) == 0 and not (out / LOCK_FILE).exists()


def test_second_cli_run_on_a_folder_names_the_owner(corpus, tmp_path, capsys):  # noqa: F811
    from linearnexus.cli import train_lm

    text, _ = corpus
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    assert train_lm.main(["--data", str(text), "--out", str(out), "--max-steps", "2"]) == 2
    assert f"--out: {out} is in use by another run (pid {os.getppid()}" in capsys.readouterr().err


# ---- command-line usage errors and settings ------------------------------------------------


def test_cli_usage_errors_name_the_file(corpus, tmp_path, capsys):  # noqa: F811
    from linearnexus.cli import train_lm

    text, _ = corpus
    common = ["--data", str(text), "--out", str(tmp_path / "run")]

    def error_of(argv):
        assert train_lm.main(argv) == 2
        return capsys.readouterr().err

    not_yaml = tmp_path / "notes.yaml"
    not_yaml.write_text("model: [unclosed\n  d_model: 3\n")
    assert f"{not_yaml}: not a YAML file" in error_of(["--config", str(not_yaml), *common])
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x89PNG\x00\xff\xfe")
    assert f"{binary}: not a YAML file" in error_of(["--config", str(binary), *common])
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert f"{empty}: the file is empty" in error_of(["--config", str(empty), *common])
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    assert f"lies under {regular}, which is a regular file" in error_of(
        ["--data", str(text), "--out", str(regular / "run")])
    assert "is a regular file, not a folder" in error_of(["--data", str(text), "--out", str(regular)])


def test_resume_with_another_batch_size_records_it_only_after_a_step(build, reference, tmp_path):
    import yaml

    out = _copy(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / "8")
    before = (out / "config.yaml").read_text()

    class Dies:  # a loader that fails before the first step of the session
        batch_size, seq_len = 2, RUN["seq_len"]

        def __next__(self):
            raise RuntimeError("killed before the first step")

        def load_state_dict(self, state):
            pass

    trainer, lines = build(out, batch_size=2)
    trainer.train_loader = Dies()
    with pytest.raises(RuntimeError, match="killed before"):
        trainer.train(resume=True)
    assert (out / "config.yaml").read_text() == before
    assert any("batch_size: 4 -> 2" in line for line in lines)

    class Stop(Exception):
        pass

    def stop(step):
        raise Stop

    # once a step ran with a changed setting, config.yaml records it (log_interval here:
    # a batch size of 2 would only add a compilation to this test)
    trainer, _ = build(out, log_interval=2)
    with pytest.raises(Stop):
        trainer.train(resume=True, on_step=stop)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["log_interval"] == 2


def test_help_shows_each_default_once_and_warmup_clamps():
    import dataclasses

    from linearnexus.cli import sample, train_lm

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert {k: defaults[k] for k in train_lm.TRAIN_DEFAULTS} == train_lm.TRAIN_DEFAULTS
    for module in (train_lm, sample):
        parser = module.build_parser()
        for action in parser._actions:
            assert action.help, action.option_strings
            assert action.help.count("default") <= 1, action.option_strings
            if action.default not in (None, False) and action.dest != "help":
                assert str(action.default) in action.help, action.option_strings
        assert "(default: None)" not in parser.format_help()
    flags = train_lm.build_parser()._option_string_actions
    assert "mamba-small" in flags["--model"].help and "(default 2000)" in flags["--max-steps"].help
    with pytest.warns(UserWarning, match="warmup_steps=50 exceeds max_steps=10"):
        cfg = TrainConfig(max_steps=10, warmup_steps=50)
    assert cfg.resolved_warmup_steps == 10
