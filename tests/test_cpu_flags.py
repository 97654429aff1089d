"""train_lm.py's XLA:CPU flags (linearnexus.core.cpu_flags): added, never overriding the user."""

from __future__ import annotations

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
