"""linearnexus.hf against transformers' Mamba and Mamba2 (CPU torch; slow reference paths).

Small random models are built offline with ``MambaConfig`` / ``Mamba2Config``, their
parameters perturbed (so D, norm scales and biases are not their init constants), saved
with ``save_pretrained`` and imported here: the logits of a prefill and of 20 decode steps
after it (transformers' cache API) must match within 1e-4 relative in float32. Models saved
here must load in transformers with the same logits. Skipped without torch / transformers
(both in the ``dev`` extra, so CI runs them).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from linearnexus import hf  # noqa: E402
from linearnexus.models import create_model  # noqa: E402
from tests.helpers.models import compiled_model  # noqa: E402
from tests.helpers.parity import rel_err  # noqa: E402

TOL = 1e-4
DECODE_STEPS = 20




def _perturbed(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """(name, transformers model, folder) for a Mamba and a Mamba2 (ngroups 2, untied head)."""
    torch.manual_seed(0)
    mamba = _perturbed(transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=61, hidden_size=20, state_size=5, num_hidden_layers=2, expand=2,
        conv_kernel=3, time_step_rank=3, layer_norm_epsilon=1e-4)))
    mamba2 = _perturbed(transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=61, hidden_size=20, state_size=6, num_hidden_layers=2, expand=3, head_dim=12,
        num_heads=5, n_groups=5, conv_kernel=4, chunk_size=8, use_conv_bias=True)))
    out = []
    for name, model in (("mamba", mamba), ("mamba2", mamba2)):
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out.append((name, model, folder))
    return out


def _reference_steps(model, ids: np.ndarray, steps: np.ndarray) -> list[np.ndarray]:
    """transformers: prefill logits, then the logits of each cached decode step."""
    with torch.no_grad():
        out = model(torch.from_numpy(ids), use_cache=True)
        logits, cache = [out.logits.numpy()], out.cache
        for t in range(steps.shape[1]):
            out = model(torch.from_numpy(steps[:, t:t + 1]), cache=cache, use_cache=True)
            logits.append(out.logits.numpy())
            cache = out.cache
    return logits




def test_import_prefill_and_decode_match_transformers(hf_models):
    rng = np.random.default_rng(0)
    for name, ref_model, folder in hf_models:
        model = hf.from_pretrained(folder)
        assert model.config.block_pattern == (name,)
        # the prefill in chunk mode: T = 37 spans 2 chunks and a ragged tail for Mamba
        # (chunk 16), one ragged chunk for Mamba2 (64); decode steps run recurrent
        ids = rng.integers(0, 61, (2, 37))
        steps = rng.integers(0, 61, (2, DECODE_STEPS))
        ref = _reference_steps(ref_model, ids, steps)
        run = compiled_model(model)
        logits, state = run(ids, mode="chunk")
        assert rel_err(logits, ref[0]) < TOL, name
        # a one-token prompt (T = 1) from an empty state, with the step's compiled shape
        with torch.no_grad():
            first = ref_model(torch.from_numpy(steps[:, :1])).logits.numpy()
        assert rel_err(run(steps[:, :1])[0], first) < TOL, name
        for t in range(DECODE_STEPS):
            logits, state = run(steps[:, t:t + 1], state)
            assert rel_err(logits, ref[t + 1]) < TOL, (name, t)


def test_save_here_load_in_transformers(tmp_path):
    """Models built (randomly initialised) here load in transformers with the same logits,
    also sharded."""
    ids = np.random.default_rng(1).integers(0, 50, (2, 11))
    cases = [
        ("mamba", transformers.MambaForCausalLM,
         dict(block_pattern=("mamba",), mlp=False, block_options={"mamba": {"d_state": 4, "d_conv": 3}})),
        ("mamba2", transformers.Mamba2ForCausalLM,
         dict(block_pattern=("mamba2",), mlp=False, tie_embeddings=False,
              block_options={"mamba2": {"d_state": 4, "headdim": 8, "ngroups": 2, "chunk_size": 8,
                                        "dt_limit": (0.001, 0.5)}})),
    ]
    for (name, cls, spec), shards in zip(cases, [(None,), (2000,)], strict=True):
        # built and run under jit: eager init and calls dispatch op by op, several times slower
        model = nnx.jit(lambda spec=spec: create_model(
            "gpt-small", seed=3, vocab_size=50, d_model=16, n_layers=1, **spec))()
        mine = np.asarray(compiled_model(model)(ids, mode="chunk")[0])
        for shard in shards:
            folder = tmp_path / f"{name}-{shard}"
            if shard is None:
                hf.save_pretrained(model, folder)
            else:
                hf.save_pretrained(model, folder, max_shard_size=shard)
                assert (folder / "model.safetensors.index.json").is_file()
                assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
            theirs = cls.from_pretrained(folder).eval()
            with torch.no_grad():
                ref = theirs(torch.from_numpy(ids)).logits.numpy()
            assert rel_err(mine, ref) < TOL, (name, shard)
            back = hf.from_pretrained(folder)  # the same parameters, bit for bit
            skip = {"block_options", "max_seq_len", "residual_in_fp32"}  # HF's Mamba default: fp32
            assert {k: v for k, v in back.config.to_dict().items() if k not in skip} == {
                k: v for k, v in model.config.to_dict().items() if k not in skip}
            ours = model.config.block_config(name)
            if name == "mamba":  # saved as the number it resolves to
                ours = ours.replace(dt_rank=ours.resolved_dt_rank)
            got = back.config.block_config(name)  # chunk_size: ours, not the checkpoint's
            assert got == ours.replace(chunk_size=got.chunk_size)
            for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                         nnx.to_flat_state(nnx.state(back, nnx.Param)), strict=True):
                np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_dt_limit_is_read_and_written(hf_models, tmp_path):
    _, _, folder = hf_models[1]
    raw = json.loads((folder / "config.json").read_text())
    assert hf.model_config_from_hf(raw).block_options["mamba2"]["dt_limit"] is None
    raw["time_step_limit"] = [0.01, 0.2]
    cfg = hf.model_config_from_hf(raw)
    assert tuple(cfg.block_options["mamba2"]["dt_limit"]) == (0.01, 0.2)
    raw["hidden_act"] = "gelu"
    with pytest.raises(hf.UnsupportedCheckpointError, match="hidden_act"):
        hf.model_config_from_hf(raw)
