"""CPU training settings: train_lm.py's XLA:CPU flags (linearnexus.core.cpu_flags), added and
never overriding the user's; its split of the batch over CPU devices; the bfloat16 variant of
the nanoGPT recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from linearnexus.core import cpu_flags
from linearnexus.core.cpu_flags import (
    CPU_DEVICES_ENV,
    CPU_TRAINING_FLAGS,
    DISABLE_ENV,
    apply_cpu_flags,
    plan_cpu_devices,
)


def test_flags_are_added_to_an_empty_or_unrelated_xla_flags():
    env: dict[str, str] = {}
    assert apply_cpu_flags(env) == list(CPU_TRAINING_FLAGS)
    assert env["XLA_FLAGS"].split() == list(CPU_TRAINING_FLAGS)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    apply_cpu_flags(env)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                        *CPU_TRAINING_FLAGS]


def test_a_flag_the_user_set_wins_and_the_switch_turns_it_all_off():
    name = CPU_TRAINING_FLAGS[0].split("=")[0]
    env = {"XLA_FLAGS": f"{name}=true"}
    assert apply_cpu_flags(env) == []
    assert env["XLA_FLAGS"] == f"{name}=true"
    env = {DISABLE_ENV: "0"}
    assert apply_cpu_flags(env) == []
    assert "XLA_FLAGS" not in env


def test_the_process_environment_is_left_alone_once_jax_has_started(monkeypatch):
    import jax

    jax.devices()  # the backend is up: flags set now would do nothing
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    assert apply_cpu_flags() == []
    import os

    assert "XLA_FLAGS" not in os.environ


def test_the_bfloat16_recipe_is_the_float32_recipe_with_bfloat16_compute():
    from linearnexus.train import load_run_config

    configs = Path(__file__).resolve().parents[1] / "configs" / "models"
    model32, train32 = load_run_config(configs / "gpt_nanogpt_cpu.yaml")
    model16, train16 = load_run_config(configs / "gpt_nanogpt_cpu_bf16.yaml")
    assert (model16.dtype, model16.param_dtype) == ("bfloat16", "float32")
    assert model16.replace(dtype="float32") == model32
    assert train16.replace(out_dir=train32.out_dir) == train32


@pytest.fixture
def fresh_two_cores(monkeypatch):
    """As in a new train_lm.py process on a 2-core host: JAX's backend not started yet."""
    monkeypatch.setattr(cpu_flags, "_backend_started", lambda: False)
    monkeypatch.setattr(cpu_flags, "_cores", lambda: 2)


def test_the_batch_is_split_over_two_cpu_devices_by_default(fresh_two_cores, monkeypatch):
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert plan_cpu_devices(None, 12, cpu) == (2, "data=2")
    assert plan_cpu_devices(None, 7, cpu) == (0, None)  # an odd batch: one device
    monkeypatch.setattr(cpu_flags, "_cores", lambda: 1)
    assert plan_cpu_devices(None, 12, cpu) == (0, None)


def test_the_user_and_the_mesh_decide_the_cpu_device_count(fresh_two_cores, monkeypatch):
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert plan_cpu_devices(None, 12, {**cpu, CPU_DEVICES_ENV: "1"}) == (0, None)
    assert plan_cpu_devices(None, 12, {**cpu, CPU_DEVICES_ENV: "3"}) == (3, "data=3")
    for bad, said in (("5", "do not divide the batch size 12"), ("two", "positive integer")):
        with pytest.raises(ValueError, match=f"{CPU_DEVICES_ENV}: .*{said}"):
            plan_cpu_devices(None, 12, {**cpu, CPU_DEVICES_ENV: bad})
    # a mesh of N devices gets N CPU devices; "auto" and a one-device mesh leave the count
    assert plan_cpu_devices("data=2,fsdp=2", 12, cpu) == (4, "data=2,fsdp=2")
    assert plan_cpu_devices("auto", 12, cpu) == (0, "auto")
    assert plan_cpu_devices("none", 12, cpu) == (0, "none")
    # a count the user set, an accelerator host, a started backend: nothing is planned
    for env in ({**cpu, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                {**cpu, "JAX_NUM_CPU_DEVICES": "4"}, {"JAX_PLATFORMS": "cuda,cpu"}):
        assert plan_cpu_devices(None, 12, env) == (0, None)
        assert plan_cpu_devices("data=2", 12, env) == (0, "data=2")
    monkeypatch.setattr(cpu_flags, "_backend_started", lambda: True)
    assert plan_cpu_devices(None, 12, cpu) == (0, None)


def test_a_resume_plans_devices_from_the_checkpoint_it_restores(tmp_path, monkeypatch):
    """The resumed run's mesh and batch come from the newest checkpoint's metadata (what
    the resume restores), not from a ``config.yaml`` a later, failed start rewrote."""
    import json

    from linearnexus.cli import train_lm

    asked = []
    monkeypatch.setattr(cpu_flags, "plan_cpu_devices",
                        lambda mesh, batch: asked.append((mesh, batch)) or (0, mesh))
    out = tmp_path / "run"
    for step, mesh, batch in ((100, "data=4", 8), (200, "data=2,fsdp=2", 16)):
        meta_dir = out / "checkpoints" / str(step) / "meta"
        meta_dir.mkdir(parents=True)
        meta = {"step": step, "train_config": {"mesh": mesh, "batch_size": batch}}
        (meta_dir / "metadata").write_text(json.dumps(meta), encoding="utf-8")
    (out / "config.yaml").write_text("train:\n  mesh: data=8\n  batch_size: 24\n",
                                     encoding="utf-8")
    train_lm._plan_cpu_devices(str(out), True, {}, {})
    assert asked[-1] == ("data=2,fsdp=2", 16)  # the newest step's
    train_lm._plan_cpu_devices(str(out), True, {}, {"batch_size": 4})
    assert asked[-1] == ("data=2,fsdp=2", 4)  # a flag still wins
    (out / "checkpoints" / "200" / "meta" / "metadata").write_text("{torn", encoding="utf-8")
    train_lm._plan_cpu_devices(str(out), True, {}, {})
    assert asked[-1] == ("data=4", 8)  # an unreadable newest: the next one
    for step in (100, 200):
        (out / "checkpoints" / str(step) / "meta" / "metadata").unlink()
    train_lm._plan_cpu_devices(str(out), True, {}, {})
    assert asked[-1] == ("data=8", 24)  # no metadata at all: the run's config.yaml
    train_lm._plan_cpu_devices(str(out), False, {"batch_size": 12}, {})
    assert asked[-1] == (None, 12)  # a fresh run reads nothing from the folder
