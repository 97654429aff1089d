"""Training on meshes of 8 simulated devices equals training on one.

For GPT, Mamba-2, Gated DeltaNet and a Mamba + attention hybrid, each on two of the meshes
data=8, fsdp=8, data=2 fsdp=2 tensor=2 and data=2 context=4 (every mesh on two models or
more, ``MESH_CASES``): 5 AdamW steps give the one-device
losses (1e-5 relative) and parameters (the whole parameter vector within 1e-5 relative;
single tensors within 5e-5, since Adam divides each element's update by its own gradient
scale, so float32 reduction-order noise on near-zero gradients shows up per element).
Also: the weights are really split, each device holds 1/8 of parameters and optimizer
state under fsdp=8, checkpoints move between meshes, bad specs fail before compiling, and
CPU meshes that only split the batch all-reduce one flat gradient vector.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus.models import create_model, get_preset
from linearnexus.parallel import MeshError, Placement, make_mesh, param_shardings
from linearnexus.parallel.rules import path_str
from linearnexus.registry import LAYER_REGISTRY
from linearnexus.train import SFTTrainer, TrainConfig, load_checkpoint
from linearnexus.train.sft import FLAT_ALLREDUCE_ENV, flat_data_parallel

B, T, VOCAB, STEPS = 8, 16, 64, 5
MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "data=2,context=4")
MODELS = {
    "gpt": ("gpt-small", {"block_options": {"attention": {"n_heads": 2}}}),
    "mamba2": ("mamba2-small", {"block_options": {"mamba2": {"headdim": 16, "d_state": 8,
                                                              "chunk_size": 8}}}),
    "gated_deltanet": ("gated-deltanet-small", {"block_options": {"gated_deltanet": {
        "head_dim": 8, "num_heads": 2, "chunk_size": 8}}}),
    "hybrid": ("hybrid-small", {"n_layers": 2, "block_pattern": ("mamba", "attention"),
                                "block_options": {"attention": {"n_heads": 2},
                                                  "mamba": {"d_state": 4}}}),
}


def _model_config(name: str):
    preset, overrides = MODELS[name]
    return get_preset(preset, **{"d_model": 32, "n_layers": 1, "vocab_size": VOCAB,
                                 "max_seq_len": 64, **overrides})


class _Batches:
    """A fixed stream of batches (the trainer only reads batch_size / seq_len here)."""

    batch_size, seq_len = B, T


def _batches(n: int = STEPS):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, VOCAB, (B, T)).astype(np.int32),
             rng.integers(0, VOCAB, (B, T)).astype(np.int32)) for _ in range(n)]


def _trainer(model_config, mesh, out_dir="unused", **kw):
    cfg = TrainConfig(max_steps=STEPS, batch_size=B, seq_len=T, lr=1e-3, warmup_steps=0,
                      progress=False, mesh=mesh, out_dir=str(out_dir), **kw)
    return SFTTrainer(create_model(model_config, seed=0), None, _Batches(), None, cfg)


def _run(model_config, mesh):
    trainer = _trainer(model_config, mesh)
    losses = [float(trainer.train_step(*b)) for b in _batches()]
    return losses, jax.tree.map(np.asarray, trainer.state.params)


@pytest.fixture(scope="module")
def one_device():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _run(_model_config(name), None)
        return cache[name]
    return get


# every model on two meshes, every mesh on two models or more (16 pairs took ~2 minutes of
# the suite): weights split by fsdp, heads by tensor, the sequence by context
MESH_CASES = [("gpt", "data=8"), ("gpt", "data=2,fsdp=2,tensor=2"),
              ("mamba2", "fsdp=8"), ("mamba2", "data=2,context=4"),
              ("gated_deltanet", "data=2,fsdp=2,tensor=2"), ("gated_deltanet", "data=2,context=4"),
              ("hybrid", "fsdp=8"), ("hybrid", "data=2,context=4")]
assert {m for _, m in MESH_CASES} == set(MESHES) and {n for n, _ in MESH_CASES} == set(MODELS)


@pytest.mark.parametrize("name,mesh", MESH_CASES)
def test_mesh_training_equals_one_device(name, mesh, one_device):
    ref_losses, ref_params = one_device(name)
    losses, params = _run(_model_config(name), mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    flat = np.concatenate([x.ravel() for x in jax.tree.leaves(params)])
    flat_ref = np.concatenate([x.ravel() for x in jax.tree.leaves(ref_params)])
    assert np.linalg.norm(flat - flat_ref) / np.linalg.norm(flat_ref) < 1e-5
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(ref_params), strict=True):
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        assert err < 5e-5, f"{path_str(path)}: relative error {err:.2e}"


def test_every_registered_block_has_rules():
    """Every parameter of every registered block (inside a model) is covered by a rule."""
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    for block in LAYER_REGISTRY:
        config = get_preset("gpt-small", d_model=64, n_layers=1, vocab_size=VOCAB,
                            block_pattern=(block,), tie_embeddings=False)
        abstract = nnx.eval_shape(lambda c=config: create_model(c))
        params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
        shardings = param_shardings(params, mesh)  # raises ShardingRuleError if uncovered
        if block == "attention":  # column / row parallel, and FSDP on the model width
            layer = shardings["layers"][0]
            P = jax.sharding.PartitionSpec
            assert layer["mixer"]["q_proj"]["kernel"].spec == P("fsdp", "tensor")
            assert layer["mixer"]["o_proj"]["kernel"].spec == P("tensor", "fsdp")
            assert layer["mlp"]["w_down"]["kernel"].spec == P("tensor", "fsdp")
            assert shardings["lm_head"]["kernel"].spec == P("fsdp", "tensor")


def test_weights_are_split_and_fsdp_holds_one_eighth():
    config = _model_config("gpt")
    trainer = _trainer(config, "fsdp=8")
    params = trainer.state.params
    assert params["embed"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    q = params["layers"][0]["mixer"]["q_proj"]["kernel"]
    assert q.sharding.spec[0] == "fsdp" and len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (32 // 8, q.shape[1])
    mu = trainer.state.opt_state  # Adam moments sharded like their parameters
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(mu) if x.ndim == 2}
    assert specs <= {str(jax.sharding.PartitionSpec("fsdp", None)),
                     str(jax.sharding.PartitionSpec(None, "fsdp"))}
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((trainer.state.params,
                                                         trainer.state.opt_state)))
    batch = _batches(1)[0]
    compiled = trainer._fns.step.lower(trainer.state, *batch).compile()
    per_device = compiled.memory_analysis().argument_size_in_bytes
    # arguments = params + optimizer state (1/8 each) + the batch's slice + replicated
    # scalars (step count, rng, a few per-head vectors that 8 does not divide)
    assert per_device < state_bytes / 8 * 1.05 + 4096, (per_device, state_bytes)
    one = _trainer(config, None)
    full = one._fns.step.lower(one.state, *batch).compile().memory_analysis()
    assert per_device < full.argument_size_in_bytes / 7


def test_checkpoint_moves_between_meshes(tmp_path):
    config = _model_config("gpt")
    batches = _batches(3)
    first = _trainer(config, "fsdp=8", tmp_path / "run")
    for b in batches[:2]:
        first.train_step(*b)
    first.save_checkpoint()
    expected = float(first.train_step(*batches[2]))
    for mesh in ("data=2,fsdp=4", "data=2,fsdp=2,tensor=2", None):
        again = _trainer(config, mesh, tmp_path / "run")
        assert again.restore_checkpoint() == 2
        loss = float(again.train_step(*batches[2]))
        np.testing.assert_allclose(loss, expected, rtol=1e-5, err_msg=str(mesh))
    model, _, _ = load_checkpoint(tmp_path / "run")  # one device, for sampling
    logits, _ = model(jnp.asarray(batches[0][0][:1]))
    assert logits.shape == (1, T, VOCAB)
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_tensor_must_divide_heads_before_compiling(monkeypatch):
    config = _model_config("gpt")  # 2 attention heads
    traced = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: traced.append(a) or (lambda *x: None))
    with pytest.raises(MeshError, match="axis 'tensor' of size 4 does not divide block "
                                        "'attention''s n_heads=2"):
        _trainer(config, "data=2,tensor=4")
    with pytest.raises(MeshError, match="'context' of size 8 does not divide seq_len=12"):
        Placement.create("context=8", None, config, batch_size=8, seq_len=12)
    with pytest.raises(MeshError, match="'data' x 'fsdp' = 8 do not divide batch_size=4"):
        Placement.create("fsdp=8", None, config, batch_size=4, seq_len=16)
    assert not traced


def test_evaluation_on_a_context_mesh(tmp_path):
    """The eval program (a lax.map over windows) splits the sequence too, same loss."""
    from linearnexus.data import DataLoader, prepare_dataset
    from tests.helpers.text import synthetic_text

    (tmp_path / "input.txt").write_text(synthetic_text(4000), encoding="utf-8")
    prepared = prepare_dataset(tmp_path / "input.txt", tmp_path / "data")
    config = _model_config("hybrid").replace(vocab_size=prepared.vocab_size)
    losses = []
    for mesh in (None, "data=2,context=4"):
        cfg = TrainConfig(max_steps=STEPS, batch_size=B, seq_len=T, eval_batches=2,
                          progress=False, mesh=mesh, out_dir=str(tmp_path / "unused"))
        loader = DataLoader(prepared.train_dataset(), B, T, seed=0)
        trainer = SFTTrainer(create_model(config, seed=0), None, loader,
                             prepared.val_dataset(), cfg)
        losses.append(trainer.evaluate())
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def _all_reduces(trainer) -> list[str]:
    """The result shapes of every all-reduce in the compiled train step."""
    inputs, targets = trainer.placement.place_batch(*_batches(1)[0])
    text = trainer._fns.step.lower(trainer.state, inputs, targets).compile().as_text()
    return [line.split(" = ", 1)[1].split(" all-reduce(")[0]
            for line in text.splitlines() if re.search(r" = .* all-reduce\(", line)]


def test_a_batch_split_on_cpus_reduces_its_gradients_as_one_array(monkeypatch):
    """On CPU meshes that only split the batch, the step all-reduces one flat gradient
    vector (XLA:CPU pays a rendezvous per array of a tuple all-reduce); other meshes, and
    the switch, keep XLA's placement. Equality with one device: the data=8 case above."""
    config = _model_config("gpt")
    trainer = _trainer(config, "data=8")
    n_params = sum(int(x.size) for x in jax.tree.leaves(trainer.state.params))
    assert flat_data_parallel(trainer.placement)
    assert _all_reduces(trainer) == [f"(f32[{n_params}]{{0}}, f32[])"]
    for mesh in ("fsdp=8", "data=2,fsdp=2,tensor=2", "data=2,context=4"):
        assert not flat_data_parallel(_trainer(config, mesh).placement), mesh
    monkeypatch.setenv(FLAT_ALLREDUCE_ENV, "0")
    unflat = _trainer(config, "data=8")
    assert not flat_data_parallel(unflat.placement)
    assert len(_all_reduces(unflat)) >= 1 and f"f32[{n_params}]" not in str(_all_reduces(unflat))
