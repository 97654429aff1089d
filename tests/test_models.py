"""ModelConfig, presets and LMModel over every registered block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus.core.config import ConfigError
from linearnexus.models import LMModel, ModelConfig, create_model, get_preset, list_presets
from linearnexus.registry import LAYER_REGISTRY, MODEL_PRESETS
from tests.helpers.parity import assert_close, jit_block

VOCAB = 29


def tiny_model(pattern, **kw) -> LMModel:
    options = {name: LAYER_REGISTRY[name].config.tiny().to_dict() for name in set(pattern)}
    for opts in options.values():  # the model sets these itself
        for k in ("d_model", "dtype", "param_dtype", "max_seq_len"):
            opts.pop(k, None)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=len(pattern), block_pattern=tuple(pattern),
                      block_options=options, max_seq_len=64, **kw)
    return LMModel(cfg, rngs=nnx.Rngs(0))


def test_every_preset_builds_from_registered_blocks():
    assert list_presets() == sorted(MODEL_PRESETS)
    for name in list_presets():
        pattern = get_preset.__globals__["_PRESETS"][name]["block_pattern"]
        assert set(pattern) <= set(LAYER_REGISTRY), f"{name}: unregistered blocks in {pattern}"
        cfg = get_preset(name, vocab_size=VOCAB)
        assert cfg.layer_types[: len(pattern)] == tuple(pattern)
    with pytest.raises(ConfigError, match="nonesuch"):  # an override naming no block
        get_preset("gpt-small", block_pattern=("nonesuch",))


def test_unknown_preset_and_bad_config_fields():
    with pytest.raises(KeyError, match="unknown model preset 'gpt-huge'"):
        get_preset("gpt-huge")
    with pytest.raises(ConfigError, match="block_pattern: block 'lstm' is not available"):
        ModelConfig(block_pattern=("lstm",))
    with pytest.raises(ConfigError, match=r"block_options.attention.*n_heads"):
        ModelConfig(d_model=16, block_options={"attention": {"n_heads": 3}})
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({"n_layer": 3})


def test_pattern_repeats_to_n_layers():
    cfg = ModelConfig(n_layers=5, block_pattern=("mamba", "mamba", "attention"))
    assert cfg.layer_types == ("mamba", "mamba", "attention", "mamba", "mamba")


def test_config_yaml_round_trip(tmp_path):
    cfg = get_preset("hybrid-small", vocab_size=65)
    cfg.save_yaml(tmp_path / "m.yaml")
    assert ModelConfig.load_yaml(tmp_path / "m.yaml") == cfg


@pytest.mark.parametrize("pattern", [["attention"], ["mamba"], ["mla"], ["mamba", "attention"]])
def test_step_by_step_decoding_equals_full_forward(pattern):
    model = tiny_model(pattern)
    rng = np.random.default_rng(len(pattern))
    tokens = jnp.asarray(rng.integers(0, VOCAB, (2, 11)), jnp.int32)
    full, _ = jit_block(model, "chunk")(tokens)
    step = jit_block(model, "recurrent")
    state = model.init_state(2)
    # prefill 4 tokens, then one token at a time
    logits, state = jit_block(model, None)(tokens[:, :4], state)
    outs = [logits]
    for t in range(4, 11):
        logits, state = step(tokens[:, t : t + 1], state)
        outs.append(logits)
    assert_close(jnp.concatenate(outs, 1), full, 1e-5, f"{pattern} decode vs full")


def test_left_padded_batch_matches_single_rows():
    model = tiny_model(["mamba", "attention"])
    rng = np.random.default_rng(5)
    a = rng.integers(0, VOCAB, 9)
    b = rng.integers(0, VOCAB, 4)
    tokens = jnp.asarray(np.stack([a, np.concatenate([np.zeros(5, int), b])]), jnp.int32)
    mask = jnp.asarray(np.stack([np.ones(9, bool), np.arange(9) >= 5]))
    # jitted: eager NNx calls of the mamba + attention stack took ~20 s of the suite's time
    run = nnx.jit(lambda m, t, mask: m(t, mask=mask)[0])
    logits = run(model, tokens, mask)
    la = run(model, jnp.asarray(a[None], jnp.int32), None)
    lb = run(model, jnp.asarray(b[None], jnp.int32), None)
    assert_close(logits[0], la[0], 1e-5, "row a")
    assert_close(logits[1, 5:], lb[0], 1e-5, "row b")


def test_tied_and_untied_heads():
    tied = tiny_model(["attention"])
    untied = tiny_model(["attention"], tie_embeddings=False)
    assert untied.num_params() == tied.num_params() + 16 * VOCAB
    logits, _ = untied(jnp.zeros((1, 3), jnp.int32))
    assert logits.shape == (1, 3, VOCAB) and logits.dtype == jnp.float32


def test_token_errors():
    model = tiny_model(["mamba"])
    with pytest.raises(ValueError, match=r"tokens: expected rank 2"):
        model(jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="tokens: expected an integer dtype"):
        model(jnp.zeros((1, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"tokens: ids must be in \[0, 29\), got min 0, max 29"):
        model(jnp.array([[0, 29]], jnp.int32))
    with pytest.raises(ValueError, match="state: expected 1 layer states"):
        model(jnp.zeros((1, 3), jnp.int32), state=())


def test_create_model_from_name_with_overrides():
    model = create_model("mamba-small", vocab_size=VOCAB, d_model=16, n_layers=2)
    assert isinstance(model, LMModel) and len(model.layers) == 2
    logits, state = model(jax.random.randint(jax.random.PRNGKey(0), (2, 5), 0, VOCAB))
    assert logits.shape == (2, 5, VOCAB) and len(state) == 2
