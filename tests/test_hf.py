"""linearnexus.hf without torch: FLA's GLA / Gated DeltaNet layouts, tokenizers, refusals.

FLA's models need Triton GPU kernels, so they cannot run here. Instead each test writes a
checkpoint with FLA's exact ``config.json`` fields and parameter names and shapes (random
values, ``safetensors.numpy``), imports it, and compares the logits with a per-step
float64 numpy reference of FLA's equations written below (layer by layer, from
``fla/layers/gla.py``, ``fla/layers/gated_deltanet.py``, ``fla/modules``): the prefill and
20 decode steps after it.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from linearnexus import hf
from linearnexus.data import BPETokenizer, PretrainedTokenizer, load_tokenizer
from tests.helpers.models import compiled_model
from tests.helpers.parity import rel_err

TOL = 1e-4
VOCAB = 53




# ---- the reference: FLA's model, one token at a time, float64 numpy ----------------------

def _silu(x):
    return x / (1.0 + np.exp(-x))


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _conv_step(buf, x, w):
    """Causal depthwise conv (torch ``[C, 1, W]`` weight) + silu: ``buf`` holds the last W inputs."""
    buf = np.concatenate([buf[1:], x[None]], 0)  # [W, C]
    return buf, _silu(np.einsum("wc,cw->c", buf, w[:, 0, :]))


class FLAReference:
    """FLA's GLAForCausalLM / GatedDeltaNetForCausalLM, per token, from a tensor dict."""

    def __init__(self, cfg: dict, w: dict, arch: str):
        self.cfg, self.w, self.arch = cfg, {k: v.astype(np.float64) for k, v in w.items()}, arch
        self.L = cfg["num_hidden_layers"]
        self.H = cfg["num_heads"]
        d = cfg["hidden_size"]
        if arch == "gla":
            self.K = int(d * cfg["expand_k"]) // self.H
            self.V = int(d * cfg["expand_v"]) // self.H
        else:
            self.K = cfg["head_dim"]
            self.V = int(cfg["head_dim"] * cfg["expand_v"])
        self.eps = cfg["norm_eps"]

    def init(self, batch):
        hk, hv, conv = self.H * self.K, self.H * self.V, self.cfg["conv_size"]
        return [dict(S=np.zeros((batch, self.H, self.K, self.V)),
                     cq=np.zeros((batch, conv, hk)), ck=np.zeros((batch, conv, hk)),
                     cv=np.zeros((batch, conv, hv))) for _ in range(self.L)]

    def _attn(self, i, x, st, b):
        w, p = self.w, f"model.layers.{i}.attn."
        q, k, v = (x @ w[p + n + "_proj.weight"].T for n in "qkv")
        if self.cfg["use_short_conv"]:
            st["cq"][b], q = _conv_step(st["cq"][b], q, w[p + "q_conv1d.weight"])
            st["ck"][b], k = _conv_step(st["ck"][b], k, w[p + "k_conv1d.weight"])
            st["cv"][b], v = _conv_step(st["cv"][b], v, w[p + "v_conv1d.weight"])
        elif self.arch == "gdn":
            q, k, v = _silu(q), _silu(k), _silu(v)
        q, k, v = q.reshape(self.H, self.K), k.reshape(self.H, self.K), v.reshape(self.H, self.V)
        S = st["S"][b]
        if self.arch == "gla":
            gk = (x @ w[p + "gk_proj.0.weight"].T) @ w[p + "gk_proj.1.weight"].T + w[p + "gk_proj.1.bias"]
            gk = -np.logaddexp(0.0, -gk) / 16.0  # logsigmoid / gate_logit_normalizer
            if self.cfg.get("clamp_min") is not None:
                gk = np.maximum(gk, self.cfg["clamp_min"])
            S = np.exp(gk.reshape(self.H, self.K))[..., None] * S + k[..., None] * v[:, None, :]
        else:
            q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
            k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
            beta = 1.0 / (1.0 + np.exp(-(x @ w[p + "b_proj.weight"].T)))  # [H]
            if self.cfg.get("allow_neg_eigval"):
                beta = 2.0 * beta
            a = x @ w[p + "a_proj.weight"].T + w[p + "dt_bias"]
            g = -np.exp(w[p + "A_log"]) * np.logaddexp(0.0, a)  # [H]
            S = np.exp(g)[:, None, None] * S
            v_new = (v - np.einsum("hkv,hk->hv", S, k)) * beta[:, None]  # delta rule
            S = S + k[..., None] * v_new[:, None, :]
        st["S"][b] = S
        o = np.einsum("hk,hkv->hv", q * self.K ** -0.5, S)
        norm_w = w.get(p + "g_norm_swish_gate.weight", w.get(p + "o_norm.weight"))
        o = _rms(o, norm_w, self.eps)
        if "g_proj.weight" in "".join(k for k in w if k.startswith(p)):
            o = o * _silu((x @ w[p + "g_proj.weight"].T).reshape(self.H, self.V))
        return o.reshape(-1) @ w[p + "o_proj.weight"].T

    def step(self, tokens, state):
        """``tokens [B]`` -> logits ``[B, V]``, updating ``state`` in place."""
        w, out = self.w, []
        for b, tok in enumerate(tokens):
            h = w["model.embeddings.weight"][tok]
            for i in range(self.L):
                p = f"model.layers.{i}."
                h = h + self._attn(i, _rms(h, w[p + "attn_norm.weight"], self.eps), state[i], b)
                m = _rms(h, w[p + "mlp_norm.weight"], self.eps)
                h = h + (_silu(m @ w[p + "mlp.gate_proj.weight"].T) * (m @ w[p + "mlp.up_proj.weight"].T)
                         ) @ w[p + "mlp.down_proj.weight"].T
            head = w.get("lm_head.weight", w["model.embeddings.weight"])
            out.append(_rms(h, w["model.norm.weight"], self.eps) @ head.T)
        return np.stack(out)


# ---- checkpoints with FLA's names and shapes --------------------------------------------

GLA_CFG = dict(architectures=["GLAForCausalLM"], model_type="gla", vocab_size=VOCAB, hidden_size=24,
               num_hidden_layers=2, num_heads=2, expand_k=0.5, expand_v=1.0, use_short_conv=True,
               conv_size=4, hidden_ratio=4, intermediate_size=None, norm_eps=1e-6, clamp_min=-0.03,
               tie_word_embeddings=False, hidden_act="swish", fuse_norm=True)
GDN_CFG = dict(architectures=["GatedDeltaNetForCausalLM"], model_type="gated_deltanet", vocab_size=VOCAB,
               hidden_size=24, num_hidden_layers=2, num_heads=2, head_dim=6, expand_v=1.5,
               use_gate=True, use_short_conv=True, conv_size=3, allow_neg_eigval=True,
               intermediate_size=40, norm_eps=1e-5, tie_word_embeddings=True, hidden_act="swish")


def _fla_tensors(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    gla = cfg["model_type"] == "gla"
    d, h = cfg["hidden_size"], cfg["num_heads"]
    kd = int(d * cfg["expand_k"]) if gla else h * cfg["head_dim"]
    vd = int(d * cfg["expand_v"]) if gla else h * int(cfg["head_dim"] * cfg["expand_v"])
    hv = vd // h
    f = cfg["intermediate_size"] or 256 * ((int(d * cfg["hidden_ratio"] * 2 / 3) + 255) // 256)

    def r(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    t = {"model.embeddings.weight": r(cfg["vocab_size"], d, scale=1.0),
         "model.norm.weight": 1 + r(d, scale=0.1)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = r(cfg["vocab_size"], d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "attn_norm.weight": 1 + r(d, scale=0.1), p + "mlp_norm.weight": 1 + r(d, scale=0.1),
              p + "mlp.gate_proj.weight": r(f, d), p + "mlp.up_proj.weight": r(f, d),
              p + "mlp.down_proj.weight": r(d, f),
              p + "attn.q_proj.weight": r(kd, d), p + "attn.k_proj.weight": r(kd, d),
              p + "attn.v_proj.weight": r(vd, d), p + "attn.g_proj.weight": r(vd, d),
              p + "attn.o_proj.weight": r(d, vd)}
        if cfg["use_short_conv"]:
            w = cfg["conv_size"]
            t |= {p + f"attn.{c}_conv1d.weight": r(n, 1, w) for c, n in zip("qkv", (kd, kd, vd), strict=True)}
        if gla:
            t |= {p + "attn.gk_proj.0.weight": r(16, d), p + "attn.gk_proj.1.weight": r(kd, 16),
                  p + "attn.gk_proj.1.bias": r(kd, scale=1.0) + 1.0,
                  p + "attn.g_norm_swish_gate.weight": 1 + r(hv, scale=0.1)}
        else:
            t |= {p + "attn.a_proj.weight": r(h, d), p + "attn.b_proj.weight": r(h, d),
                  p + "attn.A_log": np.log(rng.uniform(0.5, 4, h)).astype(np.float32),
                  p + "attn.dt_bias": r(h, scale=1.0), p + "attn.o_norm.weight": 1 + r(hv, scale=0.1)}
    return t


def _write(folder, cfg, tensors, shard: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if not shard:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for j, part in enumerate(parts):
        file = f"model-{j + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def fla_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fla")
    gla, gdn = _fla_tensors(GLA_CFG, 0), _fla_tensors(GDN_CFG, 1)
    return [("gla", GLA_CFG, gla, _write(root / "gla", GLA_CFG, gla)),
            ("gdn", GDN_CFG, gdn, _write(root / "gdn", GDN_CFG, gdn, shard=True))]




def test_fla_import_matches_reference_prefill_and_decode(fla_checkpoints):
    rng = np.random.default_rng(2)
    for name, cfg, tensors, folder in fla_checkpoints:
        model = hf.from_pretrained(folder)
        ref = FLAReference(cfg, tensors, name)
        ids = rng.integers(0, VOCAB, (2, 19))  # chunk mode: T = 19 is not a multiple of 64
        steps = rng.integers(0, VOCAB, (2, 20))
        state = ref.init(2)
        want = np.stack([ref.step(ids[:, t], state) for t in range(ids.shape[1])], 1)
        run = compiled_model(model)
        logits, st = run(ids, mode="chunk")
        assert rel_err(logits, want) < TOL, name
        for t in range(steps.shape[1]):
            logits, st = run(steps[:, t:t + 1], st)
            assert rel_err(logits[:, 0], ref.step(steps[:, t], state)) < TOL, (name, t)


def test_fla_save_round_trip(fla_checkpoints, tmp_path):
    """Saving an imported FLA model writes FLA's names, shapes and values back."""
    for name, cfg, tensors, folder in fla_checkpoints:
        out = hf.save_pretrained(hf.from_pretrained(folder), tmp_path / name)
        saved = load_file(str(out / "model.safetensors"))
        assert sorted(saved) == sorted(tensors), name
        for key, value in tensors.items():
            np.testing.assert_array_equal(saved[key], value, err_msg=key)
        written = json.loads((out / "config.json").read_text())
        for key in ("hidden_size", "num_heads", "use_short_conv", "conv_size", "norm_eps",
                    "tie_word_embeddings", "architectures"):
            assert written[key] == cfg[key], (name, key)


@pytest.mark.parametrize("field, value, arch", [
    ("feature_map", "relu", GLA_CFG), ("num_kv_heads", 1, GLA_CFG), ("use_output_gate", False, GLA_CFG),
    ("attn", {"layers": [1]}, GLA_CFG), ("hidden_act", "gelu", GLA_CFG),
    ("num_v_heads", 4, GDN_CFG), ("output_gate_activation", "sigmoid", GDN_CFG),
    ("attnres_block_size", 2, GDN_CFG)])
def test_unmappable_fields_are_refused_by_name(field, value, arch):
    with pytest.raises(hf.UnsupportedCheckpointError, match=field):
        hf.model_config_from_hf({**arch, field: value})


def test_bad_checkpoints_fail_clearly(fla_checkpoints, tmp_path):
    _, cfg, tensors, _ = fla_checkpoints[0]
    with pytest.raises(hf.UnsupportedCheckpointError, match="architectures"):
        hf.model_config_from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    # a tensor of the wrong shape (config says 2 layers of width 24)
    bad = dict(tensors, **{"model.layers.0.attn.q_proj.weight": np.zeros((5, 24), np.float32)})
    with pytest.raises(hf.UnsupportedCheckpointError, match="q_proj"):
        hf.from_pretrained(_write(tmp_path / "shape", cfg, bad))
    missing = {k: v for k, v in tensors.items() if "mlp_norm" not in k}
    with pytest.raises(hf.UnsupportedCheckpointError, match="missing"):
        hf.from_pretrained(_write(tmp_path / "missing", cfg, missing))
    extra = dict(tensors, **{"model.layers.0.attn.extra": np.zeros(3, np.float32)})
    with pytest.raises(hf.UnsupportedCheckpointError, match="extra"):
        hf.from_pretrained(_write(tmp_path / "extra", cfg, extra))
    with pytest.raises(FileNotFoundError, match="no folder"):
        hf.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        hf.from_pretrained(tmp_path / "empty")


def test_hub_id_without_folder_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="state-spaces/mamba-130m-hf"):
        hf.from_pretrained("state-spaces/mamba-130m-hf")


def test_save_refuses_what_the_format_cannot_hold(tmp_path):
    from linearnexus.models import create_model

    # shapes only (nnx.eval_shape): the refusal comes before any value is read
    deltanet = nnx.eval_shape(lambda: create_model("deltanet-small", vocab_size=40, d_model=16, n_layers=1))
    with pytest.raises(hf.UnsupportedCheckpointError, match="block_pattern"):
        hf.save_pretrained(deltanet, tmp_path / "h")
    gla = nnx.eval_shape(lambda: create_model(
        "gla-small", vocab_size=40, d_model=16, n_layers=1,
        block_options={"gla": {"num_heads": 2, "gate_low_rank_dim": 4}}))
    with pytest.raises(hf.UnsupportedCheckpointError, match="gate_low_rank_dim"):
        hf.save_pretrained(gla, tmp_path / "g")
    assert not (tmp_path / "g").exists()  # refused before anything is written


def test_pretrained_tokenizer(tmp_path):
    """A checkpoint's tokenizer.json (here BPE without <|endoftext|>, eos named by
    config.json) round-trips through the checkpoint loader's ``load_tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, hello there"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    loaded = hf.load_tokenizer(tmp_path)
    assert isinstance(loaded, PretrainedTokenizer) and loaded.eos_id == 1
    ids = loaded.encode("hello there")
    assert loaded.decode(ids) == "hello there"
    again = load_tokenizer(loaded.save(tmp_path / "copy.json"))  # as a checkpoint reloads it
    assert isinstance(again, PretrainedTokenizer) and again.encode("hello there") == ids
    assert again.eos_id == 2  # without config.json: the "</s>" special token
    bpe = BPETokenizer.train("some text " * 50, vocab_size=270)
    assert isinstance(load_tokenizer(bpe.save(tmp_path / "bpe.json")), BPETokenizer)


def test_mamba2_options_d_has_hdim_and_dt_limit():
    """D per channel equals D per head when its values repeat per head; dt_limit clamps dt."""
    from linearnexus.modules.ssm.mamba2 import Mamba2Block, Mamba2Config

    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    base = Mamba2Block(Mamba2Config.tiny(), rngs=nnx.Rngs(0))
    per_channel = Mamba2Block(Mamba2Config.tiny(D_has_hdim=True), rngs=nnx.Rngs(0))
    assert per_channel.D.shape == (2, 16)
    base.D[...] = jnp.array([0.5, -1.5])
    per_channel.D[...] = jnp.repeat(base.D[...][:, None], 16, axis=1)
    y0 = base(x)[0]
    np.testing.assert_allclose(per_channel(x)[0], y0, rtol=1e-6, atol=1e-6)
    # dt is initialised in [1e-3, 0.1]: a floor of 1 changes every step
    clamped = Mamba2Block(Mamba2Config.tiny(dt_limit=(1.0, 2.0)), rngs=nnx.Rngs(0))
    nnx.update(clamped, nnx.state(base, nnx.Param))
    assert rel_err(clamped(x)[0], y0) > 1e-2
    with pytest.raises(Exception, match="dt_limit"):
        Mamba2Config.tiny(dt_limit=(0.5, 0.1))


def test_cli_hf_flags(fla_checkpoints, tmp_path, capsys):
    """sample.py --hf samples a checkpoint with its own tokenizer; train_lm.py --init-hf
    refuses a second model or tokenizer source."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from linearnexus.cli import sample, train_lm

    _, _, _, folder = fla_checkpoints[1]
    text = "the quick brown fox jumps over the lazy dog . " * 40
    vocab = {w: i for i, w in enumerate(["</s>", "[UNK]", *sorted(set(text.split()))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in folder.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    tok.save(str(ckpt / "tokenizer.json"))
    (tmp_path / "text.txt").write_text(text)
    # the training path itself (a few steps, --resume, sampling the run) was run by hand: a
    # compiled train step costs more than this file's test budget
    args = ["--init-hf", str(ckpt), "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "run")]
    assert train_lm.main(args + ["--model", "gpt-small"]) == 2  # the model is the checkpoint's
    assert train_lm.main(args + ["--tokenizer", "bpe"]) == 2  # and so is the tokenizer
    assert "--init-hf" in capsys.readouterr().err
    assert sample.main(["--hf", str(ckpt), "--prompt", "the", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("the")
    assert sample.main(["--hf", str(tmp_path / "none")]) == 2



def _fla_on_gpu() -> bool:
    try:
        import fla  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _fla_on_gpu(), reason="FLA's models need its Triton kernels on a GPU")
def test_fla_parity_on_gpu(tmp_path):
    """FLA's own GLA / Gated DeltaNet models (random init, perturbed), saved and imported:
    the same logits (float32). Runs only where flash-linear-attention and a GPU are."""
    import torch
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM, GLAConfig, GLAForCausalLM

    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 70))  # > 64: FLA's chunk kernels
    for name, model in (
        ("gla", GLAForCausalLM(GLAConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                         num_heads=2, use_short_conv=True, clamp_min=-0.05))),
        ("gdn", GatedDeltaNetForCausalLM(GatedDeltaNetConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32,
            expand_v=1.5, allow_neg_eigval=True)))):
        model = model.float().cuda().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
            # T <= 64: FLA's layers run their fused recurrent kernels (float32, no tensor-core
            # dots); T = 70: their chunk kernels, whose Triton dots round through TF32
            want_rec = model(torch.from_numpy(ids[:, :48]).cuda()).logits.float().cpu().numpy()
            want = model(torch.from_numpy(ids).cuda()).logits.float().cpu().numpy()
        model.save_pretrained(tmp_path / name)
        got = hf.from_pretrained(tmp_path / name)(jnp.asarray(ids), mode="chunk")[0]
        err_rec, err_chunk = rel_err(got[:, :48], want_rec), rel_err(got, want)
        print(f"{name}: vs FLA recurrent {err_rec:.2e}, vs FLA chunk (TF32) {err_chunk:.2e}")
        assert err_rec < 1e-4, name
        assert err_chunk < 5e-3, name  # measured 1.7e-3 for gdn on an H200: TF32 rounding


def test_train_lm_init_hf_starts_from_the_checkpoint(tmp_path, capsys):
    """train_lm.py --init-hf: the run's model is the checkpoint's (with the lr still 0 after
    one warm-up step its saved weights are the checkpoint's, bit for bit), its data is
    tokenized with the checkpoint's tokenizer, and the run records where it started."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from linearnexus.cli import train_lm
    from linearnexus.models import create_model
    from linearnexus.train import load_checkpoint

    text = "the quick brown fox jumps over the lazy dog . " * 30
    vocab = {w: i for i, w in enumerate(["</s>", "[UNK]", *sorted(set(text.split()))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    source = nnx.jit(lambda: create_model("mamba-small", seed=7, vocab_size=16, d_model=8, n_layers=1,
                                          block_options={"mamba": {"d_state": 2}}))()
    ckpt = hf.save_pretrained(source, tmp_path / "ckpt", tokenizer=PretrainedTokenizer(tok))
    (tmp_path / "text.txt").write_text(text)
    assert train_lm.main(["--init-hf", str(ckpt), "--data", str(tmp_path / "text.txt"),
                          "--max-steps", "1", "--warmup-steps", "1", "--batch-size", "1",
                          "--seq-len", "4", "--eval-interval", "0", "--eval-batches", "1",
                          "--out", str(tmp_path / "run"), "--no-progress", "--sample-tokens", "0"]) == 0
    assert f"pretrained vocab {len(vocab)}" in capsys.readouterr().out
    model, _, extra = load_checkpoint(tmp_path / "run")
    assert extra["train_config"]["init_hf"] == str(ckpt.absolute())
    assert extra["tokenizer"].encode("the lazy dog") == tok.encode("the lazy dog").ids
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(source, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
