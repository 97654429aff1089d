"""One-device checks of ``linearnexus.parallel`` (the 8-device ones are in tests/multidevice)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from linearnexus.parallel import MeshError, make_mesh, param_shardings, parse_mesh_spec
from linearnexus.parallel.rules import ShardingRuleError, logical_axes


def test_parse_mesh_spec():
    assert parse_mesh_spec("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4, "context": 1,
                                                   "tensor": 1}
    assert parse_mesh_spec(" tensor=2 , context=2 ", 4)["tensor"] == 2
    assert parse_mesh_spec("auto", 16)["fsdp"] == 16
    assert parse_mesh_spec(None, 8) == dict.fromkeys(("data", "fsdp", "context", "tensor"), 1)
    assert parse_mesh_spec({"data": 4}, 4)["data"] == 4


@pytest.mark.parametrize("spec, match", [
    ("data=2,pipeline=4", "unknown axis 'pipeline'"),
    ("data=2,fsdp=2", "multiply to 4, but there are 8 devices"),
    ("tensor=0,data=8", "axis 'tensor' needs a positive integer"),
    ("data=2.0,fsdp=4", "axis 'data' needs a positive integer"),
    ("fsdp=4,fsdp=2", "axis 'fsdp' named twice"),
    ("data:8", "AXIS=SIZE"),
])
def test_bad_specs_name_the_axis(spec, match):
    with pytest.raises(MeshError, match=match):
        parse_mesh_spec(spec, 8)


def test_one_device_mesh():
    """No spec: one device, still with the four axes (size 1), so rules never branch."""
    mesh = make_mesh(None)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}
    sharding = param_shardings({"embed": {"embedding": jnp.zeros((8, 4))}}, mesh)
    assert sharding["embed"]["embedding"].spec == jax.sharding.PartitionSpec(None, None)


def test_rules_name_uncovered_parameters():
    assert logical_axes("layers/0/mixer/q_proj/kernel", 2) == ("embed", "heads")
    assert logical_axes("layers/2/mlp/w_down/kernel", 2) == ("mlp", "embed")
    with pytest.raises(ShardingRuleError, match="'layers/0/mixer/new_weight'"):
        logical_axes("layers/0/mixer/new_weight", 2)


def test_cli_rejects_a_bad_mesh_before_preparing_data(tmp_path, capsys):
    from linearnexus.cli.train_lm import main

    code = main(["--mesh", "data=2,pipeline=2", "--out", str(tmp_path / "run"),
                 "--data", str(tmp_path / "missing.txt")])
    assert code == 2
    assert "--mesh: mesh: unknown axis 'pipeline'" in capsys.readouterr().err
    # (the run folder may exist: the CLI takes its lock first) nothing was prepared
    assert not (tmp_path / "run" / "data").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
