"""CPU training settings: train_lm.py's XLA:CPU flags (linearnexus.core.cpu_flags), added and
never overriding the user's; the bfloat16 variant of the nanoGPT recipe."""

from __future__ import annotations

from pathlib import Path

from linearnexus.core.cpu_flags import CPU_TRAINING_FLAGS, DISABLE_ENV, apply_cpu_flags


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
