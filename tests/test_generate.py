"""Sampling filters, cached generation vs a no-cache greedy loop, batching, stops, compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus import generate as G
from linearnexus.core.config import ConfigError
from linearnexus.data import CharTokenizer
from linearnexus.generate import SamplingConfig
from linearnexus.models import create_model

VOCAB = 32
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


def tiny_model(family: str, **overrides):
    """A 2-layer, 32-wide model of each family with a 128-slot cache."""
    kw = dict(vocab_size=VOCAB, d_model=32, n_layers=2, max_seq_len=128)
    # Mamba chunk 4: the chunk body is unrolled, so small chunks compile fast
    if family == "gpt":
        kw.update(block_options={"attention": {"n_heads": 2}})
    elif family == "mamba":
        kw.update(block_options={"mamba": {"chunk_size": 4}})
    elif family == "hybrid":  # one mamba and one attention layer (the preset has 2 + 1)
        kw.update(block_pattern=("mamba", "attention"),
                  block_options={"attention": {"n_heads": 2}, "mamba": {"chunk_size": 4}})
    elif family == "mla":
        kw.update(block_options={"mla": {"n_heads": 2, "kv_lora_rank": 8, "qk_nope_head_dim": 6,
                                         "qk_rope_head_dim": 4, "v_head_dim": 6}})
    kw.update(overrides)
    return create_model(f"{family}-small", seed=3, **kw)


FAMILIES = ("gpt", "mamba", "hybrid", "mla")


class _Models(dict):
    """Builds each family's shared model on first use (test workers build only theirs)."""

    def __missing__(self, family):
        self[family] = tiny_model(family)
        return self[family]


_MODELS = _Models()


@pytest.fixture
def models():
    return _MODELS


def naive_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy loop with no cache: every step re-runs the whole model on each sequence so far,
    in recurrent mode (the per-step reference scan / absorbed MLA; generate prefills in chunk
    mode, so the two paths differ). A sequence sits at the front of a fixed-length buffer so
    the forward compiles once; the model is causal, so the unused tail cannot change the
    logits read."""
    graphdef, params = nnx.split(model)
    total = max(map(len, prompts)) + n

    @jax.jit
    def forward(params, tokens):
        return nnx.merge(graphdef, params)(tokens, mode="recurrent")[0]

    outs = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(n):
            buf = np.zeros((1, total), np.int32)
            buf[0, : len(seq)] = seq
            logits = forward(params, buf)  # [1, total, V]
            seq.append(int(np.argmax(np.asarray(logits[0, len(seq) - 1]))))
        outs.append(seq[len(prompt):])
    return outs


def random_prompts(key, lengths):
    keys = jax.random.split(key, len(lengths))
    return [jax.random.randint(k, (n,), 0, VOCAB).tolist() for k, n in zip(keys, lengths, strict=True)]


# ---- pure sampling functions -------------------------------------------------------------


def test_top_k_keeps_exactly_k_largest(key):
    logits = jax.random.normal(key, (3, 10))
    out = np.asarray(G.apply_top_k(logits, 4))
    for row, ref in zip(out, np.asarray(logits), strict=True):
        kept = set(np.flatnonzero(np.isfinite(row)).tolist())
        assert kept == set(np.argsort(-ref)[:4].tolist())
        np.testing.assert_array_equal(row[list(kept)], ref[list(kept)])
    ties = G.apply_top_k(jnp.array([[1.0, 1.0, 1.0, 0.0]]), 2)
    assert int(jnp.isfinite(ties).sum()) == 2  # exactly k even with ties
    for off in (None, 0, 10, 99):
        np.testing.assert_array_equal(G.apply_top_k(logits, off), logits)


def test_top_p_keeps_minimal_nucleus(key):
    probs = np.array([0.15, 0.5, 0.05, 0.3])
    logits = jnp.log(jnp.asarray(probs))[None]
    for p, expect in ((0.4, {1}), (0.75, {1, 3}), (0.85, {1, 3, 0}), (0.99, {0, 1, 2, 3}),
                      (1e-6, {1})):
        kept = set(np.flatnonzero(np.isfinite(np.asarray(G.apply_top_p(logits, p))[0])).tolist())
        assert kept == expect, p
    # random rows: the kept set has mass >= p and dropping its least likely token breaks that
    logits = jax.random.normal(key, (16, 12)) * 2
    for p in (0.3, 0.6, 0.9):
        out = np.asarray(G.apply_top_p(logits, p))
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        for row, pr in zip(out, probs, strict=True):
            kept = np.isfinite(row)
            assert pr[kept].sum() >= p - 1e-6
            assert pr[kept].sum() - pr[kept].min() < p + 1e-6
    np.testing.assert_array_equal(G.apply_top_p(logits, 1.0), logits)


def test_greedy_is_argmax(key):
    logits = jax.random.normal(key, (5, 17))
    np.testing.assert_array_equal(G.sample_next(logits, key, SamplingConfig(temperature=0)),
                                  jnp.argmax(logits, -1))
    assert G.sample_next(logits, key, SamplingConfig(temperature=0)).dtype == jnp.int32


@pytest.mark.parametrize("top_k", [None, 3])
def test_temperature_sampling_matches_softmax(top_k):
    logits = jnp.array([1.0, -0.5, 0.3, 2.0, 0.0, -1.2])
    temperature, n = 0.7, 40000
    cfg = SamplingConfig(temperature=temperature, top_k=top_k)
    draws = G.sample_next(jnp.broadcast_to(logits, (n, 6)), jax.random.key(1234), cfg)
    counts = np.bincount(np.asarray(draws), minlength=6)
    probs = np.asarray(jax.nn.softmax(G.apply_top_k(logits / temperature, top_k)))
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support] * n
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    assert chi2 < 30.0, (chi2, counts, expected)  # df <= 5: p-value ~1e-5


def test_prompt_bucket():
    assert [G.prompt_bucket(n) for n in (1, 16, 17, 33, 200, 512, 513, 1025)] == \
        [16, 16, 32, 64, 256, 512, 1024, 1536]
    assert G.prompt_bucket(100, limit=110) == 110
    with pytest.raises(ValueError, match="length"):
        G.prompt_bucket(0)


# ---- generation against the no-cache loop ------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_equals_naive_loop_and_batching(models, family, key):
    # one test per family so the compiled prefill / step are shared by both checks
    model = models[family]
    prompts = random_prompts(key, [3, 13, 9])  # one bucket (16): B=1 and B=3 compile once each
    alone = [G.generate(model, [p], GREEDY)[0] for p in prompts]
    naive = naive_greedy(model, prompts, GREEDY.max_new_tokens)
    assert alone == naive, "cached decode differs from re-running the model without a cache"
    assert G.generate(model, prompts, GREEDY) == alone, "batched differs from one at a time"


def test_array_prompts(models, key):
    model = models["gpt"]
    prompts = jax.random.randint(key, (3, 5), 0, VOCAB)
    assert G.generate(model, prompts, GREEDY) == G.generate(model, prompts.tolist(), GREEDY)


def test_stop_tokens_end_rows(models, key, monkeypatch):
    model = models["gpt"]
    prompts = random_prompts(key, [4, 9, 14])
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=16)
    full = G.generate(model, prompts, cfg)
    stop = full[0][3]
    cut = [row[: row.index(stop)] if stop in row else row for row in full]
    assert G.generate(model, prompts, cfg.replace(stop_tokens=[stop])) == cut

    # a lone row that stops: no decode step after its stop token (per-step host loop)
    calls = []
    step = G.Decoder.step
    monkeypatch.setattr(G.Decoder, "step", lambda self, *a: calls.append(1) or step(self, *a))
    out = G.generate(model, prompts[:1], cfg.replace(stop_tokens=[stop]), loop="host")
    assert out == cut[:1] and len(calls) == len(cut[0])


def test_stream_yields_generate_tokens(models, key):
    model = models["gpt"]
    prompt = random_prompts(key, [6])[0]
    full = G.generate(model, [prompt], GREEDY)[0]
    assert list(G.stream(model, prompt, GREEDY)) == full
    # blocks of 5 tokens per host sync (later blocks start with a step, not the prefill token)
    assert list(G.stream(model, prompt, GREEDY, sync_every=5)) == full
    with pytest.raises(ValueError, match="sync_every"):
        G.stream(model, prompt, GREEDY, sync_every=0)
    stopped = list(G.stream(model, prompt, GREEDY.replace(stop_tokens=[full[2]])))
    assert stopped == full[: full.index(full[2])]


def test_decode_step_compiles_once(key):
    model = tiny_model("gpt", n_layers=1)  # a fresh model: nothing compiled for it yet
    before = G.trace_counts()
    cfg = SamplingConfig(temperature=0.8, top_k=5, max_new_tokens=20, seed=4)
    p1, p2 = random_prompts(key, [5, 13])  # both in the 16 bucket
    out1 = G.generate(model, [p1], cfg)[0]
    # seed, length, stop ids: no recompile
    G.generate(model, [p2], cfg.replace(seed=1, max_new_tokens=7, stop_tokens=(3,)))
    assert list(G.stream(model, p1, cfg)) == out1  # same seed: the same sampled tokens
    after = G.trace_counts()
    assert after["loop"] - before["loop"] == 1
    assert after["decode"] - before["decode"] == 1  # stream's per-step path
    assert after["prefill"] - before["prefill"] == 1
    G.generate(model, [p1, p2], cfg)  # a new batch size: one more of each
    assert G.trace_counts()["loop"] - after["loop"] == 1


def test_generate_text(models):
    tok = CharTokenizer(sorted("abcdefghijklmnopqrstuvwxyz .,!?\n"))  # 32 chars: the gpt's vocab
    model = models["gpt"]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=6)
    a, b = G.generate_text(model, tok, "hel", cfg, num_samples=2)
    assert a == b and a.startswith("hel") and len(a) == 9
    (empty,) = G.generate_text(model, tok, "", cfg)
    assert len(empty) == 6
    assert G.start_tokens(tok) == tok.encode("\n")


# ---- on-device loop vs the per-step host loop, weights, continuous batching --------------


def every_block_model():
    """One layer of every registered block (registry-driven: a new block joins by itself),
    so a single compile covers attention / MLA caches and every recurrent state."""
    from linearnexus.registry import LAYER_REGISTRY

    names = tuple(sorted(LAYER_REGISTRY))
    return tiny_model("gpt", n_layers=len(names), block_pattern=names, max_seq_len=48,
                      block_options={"attention": {"n_heads": 2}, "mamba": {"chunk_size": 4},
                                     "mla": {"n_heads": 2, "kv_lora_rank": 8,
                                             "qk_nope_head_dim": 6, "qk_rope_head_dim": 4,
                                             "v_head_dim": 6}})


SAMPLED = SamplingConfig(temperature=0.9, top_k=12, top_p=0.95, max_new_tokens=12, seed=7)


# greedy through every block's state; sampling (block-independent) on the hybrid family
@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_device_loop_equals_host_loop_every_block(models, cfg, key):
    model = models.setdefault("every", every_block_model()) if cfg is GREEDY else models["hybrid"]
    prompts = random_prompts(key, [5, 14, 1])
    device = G.generate(model, prompts, cfg)
    assert device == G.generate(model, prompts, cfg, loop="host")
    assert all(len(row) == cfg.max_new_tokens for row in device)
    # rows stop at different steps: finished rows are masked while the others go on
    stop = device[1][4]
    stopped = G.generate(model, prompts, cfg.replace(stop_tokens=(stop,)))
    assert stopped == G.generate(model, prompts, cfg.replace(stop_tokens=(stop,)), loop="host")
    assert stopped[1] == device[1][: device[1].index(stop)]


def test_blocked_device_loop_equals_host_loop(models, key, monkeypatch):
    """LINEARNEXUS_DECODE_BLOCK: steps in counted blocks, the stop rule between blocks.
    Same tokens as the host loop when rows stop mid-block, when the budget is not a
    multiple of the block, and through continuous batching's early returns."""
    from linearnexus.serving import ContinuousBatcher

    model = models["hybrid"]
    prompts = random_prompts(key, [5, 14, 1])
    host = G.generate(model, prompts, SAMPLED, loop="host")
    stop = host[1][4]
    stopped_host = G.generate(model, prompts, SAMPLED.replace(stop_tokens=(stop,)), loop="host")
    monkeypatch.setenv(G.DECODE_BLOCK_ENV, "5")
    before = G.trace_counts()["loop"]
    assert G.generate(model, prompts, SAMPLED) == host  # 12 tokens: blocks of 5, 1 step
    assert G.trace_counts()["loop"] == before + 1  # the block size is part of the cache key
    assert G.generate(model, prompts, SAMPLED.replace(stop_tokens=(stop,))) == stopped_host
    row = host[0]
    assert list(G.stream(model, prompts[0], SAMPLED, sync_every=7)) == row
    # every row stops inside a block: the count ends at the stop, not the block's end
    only = G.generate(model, prompts[:1], SAMPLED.replace(stop_tokens=(row[2],)))
    assert only == [row[: row.index(row[2])]]

    def run(block: str):  # Decoder.run's own outputs: the count and the token columns
        monkeypatch.setenv(G.DECODE_BLOCK_ENV, block)
        cfg = SAMPLED.replace(stop_tokens=(row[2],))
        dec = G.Decoder(model, cfg)
        tokens, mask = G.left_pad(prompts[:1], 16, G.PAD_ID)
        nxt, state, key = dec.prefill(tokens, mask, jax.random.key(cfg.seed))
        buf, count, *_ = dec.run(nxt, state, key, jnp.zeros(1, bool),
                                 G.stop_array(cfg.stop_tokens), 12, first=True)
        return int(count), np.asarray(buf)[:, : int(count)].tolist()

    one_step = run("1")
    assert one_step == run("5") and one_step[0] == row.index(row[2]) + 1  # the stop's column

    requests = [(p, n, s) for p, n, s in zip(random_prompts(key, [3, 9, 2, 7]), (9, 2, 12, 5),
                                             (1, 2, 3, 4), strict=True)]
    server = ContinuousBatcher(model, slots=2, cfg=SAMPLED, sync_every=8)
    ids = [server.submit(p, max_new_tokens=n, seed=s) for p, n, s in requests]
    out = server.run()
    monkeypatch.delenv(G.DECODE_BLOCK_ENV)
    for rid, (p, n, s) in zip(ids, requests, strict=True):
        assert out[rid] == G.generate(model, [p], SAMPLED.replace(max_new_tokens=n, seed=s))[0]
    for bad in ("0", "x", str(G.LOOP_CHUNK + 1)):
        monkeypatch.setenv(G.DECODE_BLOCK_ENV, bad)
        with pytest.raises(ValueError, match="LINEARNEXUS_DECODE_BLOCK: expected an integer"):
            G.decode_block()


def test_compute_dtype_weights(key):
    """bf16 compute with float32 master weights: Linear / embedding weights are cast once
    (same tokens as casting per call), vectors the blocks read in float32 stay float32."""
    model = tiny_model("gpt", n_layers=1, dtype="bfloat16")
    params = G.inference_params(model)
    flat = dict(nnx.to_flat_state(params))
    assert flat[("embed", "embedding")].get_value().dtype == jnp.bfloat16
    kernels = [v for k, v in flat.items() if k[-1] == "kernel"]
    assert kernels and all(v.get_value().dtype == jnp.bfloat16 for v in kernels)
    assert flat[("norm", "scale")].get_value().dtype == jnp.float32
    assert G.inference_params(model) is params  # cached while the parameters are unchanged
    prompts = random_prompts(key, [4, 9])
    cfg = GREEDY.replace(max_new_tokens=6)
    assert G.generate(model, prompts, cfg) == G.generate(model, prompts, cfg, weights="stored")
    model.norm.scale[...] = model.norm.scale[...] * 2  # a parameter changed: cast again
    assert G.inference_params(model) is not params
    with pytest.raises(ValueError, match="weights"):
        G.generate(model, prompts, GREEDY, weights="bf16")


def test_continuous_batching_equals_alone(models, key):
    from linearnexus.serving import ContinuousBatcher

    # a KV cache with per-row lengths, a conv + scan state, RetNet's per-row offsets: the
    # slot scatter is the same pytree code for every state
    model = models.setdefault("serve", tiny_model(
        "gpt", n_layers=3, block_pattern=("attention", "mamba", "retnet"), max_seq_len=48,
        block_options={"attention": {"n_heads": 2}, "mamba": {"chunk_size": 4}}))
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))
    requests = [dict(prompt=rng.integers(0, VOCAB, rng.integers(1, 16)).tolist(),
                     max_new_tokens=int(rng.integers(1, 10)), seed=int(rng.integers(0, 99)),
                     stop_tokens=(int(rng.integers(0, VOCAB)),) if i % 2 else ())
                 for i in range(5)]
    server = ContinuousBatcher(model, slots=2, cfg=SAMPLED, sync_every=4)
    before = G.trace_counts()
    ids = [server.submit(**r) for r in requests]
    out = server.run()
    for rid, r in zip(ids, requests, strict=True):
        alone = G.generate(model, [r["prompt"]], SAMPLED.replace(
            max_new_tokens=r["max_new_tokens"], seed=r["seed"], stop_tokens=r["stop_tokens"]))[0]
        assert out[rid] == alone, rid
    # a second wave reuses the slots and the compiled loop
    traced = G.trace_counts()
    more = [server.submit(r["prompt"], max_new_tokens=r["max_new_tokens"], seed=r["seed"])
            for r in requests[:3]]
    again = server.run()
    assert sorted(again) == more
    assert G.trace_counts()["serve_loop"] == traced["serve_loop"] == before["serve_loop"] + 1
    assert server.stats["decode_calls"] > 2
    with pytest.raises(ValueError, match="slots"):
        ContinuousBatcher(model, slots=0)
    with pytest.raises(ValueError, match=r"prompts\[0\]: token"):
        server.submit([VOCAB])


def test_sixteen_bit_decode_state(models, key):
    """``state_dtype="bfloat16"``: every recurrent state (Mamba's scan, RetNet's) stays bf16
    through the prefill, the loop and continuous batching's slots, KV caches unchanged;
    the batcher's rows equal generate's; bad values are refused before any work."""
    from linearnexus.core.cache import RecurrentState, cast_recurrent
    from linearnexus.serving import ContinuousBatcher

    model = models.setdefault("serve", tiny_model(
        "gpt", n_layers=3, block_pattern=("attention", "mamba", "retnet"), max_seq_len=48,
        block_options={"attention": {"n_heads": 2}, "mamba": {"chunk_size": 4}}))
    prompts = random_prompts(key, [5, 11])
    cfg = GREEDY.replace(max_new_tokens=6)
    half = G.generate(model, prompts, cfg, state_dtype="bfloat16")
    assert all(len(row) == 6 for row in half)
    assert G.generate(model, prompts, cfg, loop="host", state_dtype=jnp.bfloat16) == half
    # the first token comes from the float32 prefill, before the state is cast
    assert [r[0] for r in half] == [r[0] for r in G.generate(model, prompts, cfg)]
    dec = G.Decoder(model, cfg, state_dtype="bfloat16")
    tokens, mask = G.left_pad(prompts, G.prompt_bucket(11, G.cache_limit(model)), G.PAD_ID)
    nxt, state, k = dec.prefill(tokens, mask, jax.random.key(0))
    buf, count, _, state, _, _ = dec.run(nxt, state, k, jnp.zeros(2, bool), G.stop_array(()),
                                         5, first=True)
    assert np.asarray(buf)[:, : int(count)].tolist() == [r[:5] for r in half]
    leaves = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, RecurrentState))
    recurrent = [v.state for v in leaves if isinstance(v, RecurrentState)]
    assert len(recurrent) == 2 and all(r.dtype == jnp.bfloat16 for r in recurrent)
    assert state[0].k.dtype == jnp.float32  # the KV cache as the model keeps it
    # a state built elsewhere is cast by the step (float16 here: the other 16-bit dtype)
    dec16 = G.Decoder(model, cfg, state_dtype="float16")
    _, stepped, _ = dec16.step(nxt[:, None], model.init_state(2), k)
    leaves = jax.tree.leaves(stepped, is_leaf=lambda v: isinstance(v, RecurrentState))
    assert {v.state.dtype for v in leaves if isinstance(v, RecurrentState)} == {
        jnp.dtype(jnp.float16)}
    server = ContinuousBatcher(model, slots=2, cfg=cfg, sync_every=4, state_dtype="bfloat16")
    ids = [server.submit(p) for p in prompts]
    out = server.run()
    assert [out[i] for i in ids] == half
    for bad in ("int8", "float64"):
        with pytest.raises(ValueError, match="state_dtype: expected None or one of"):
            G.generate(model, prompts, cfg, state_dtype=bad)
        with pytest.raises(ValueError, match="state_dtype"):
            ContinuousBatcher(model, slots=2, state_dtype=bad)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        cast_recurrent(state, "int8")


# ---- errors ------------------------------------------------------------------------------


def test_prompt_too_long_for_cache(models):
    before = G.trace_counts()
    with pytest.raises(ValueError, match="max_new_tokens 40.*max_seq_len=128"):
        G.generate(models["gpt"], [[1] * 100], SamplingConfig(max_new_tokens=40))
    with pytest.raises(ValueError, match="max_seq_len"):
        G.stream(models["mla"], [1] * 120, SamplingConfig(max_new_tokens=9))
    assert G.trace_counts() == before  # raised before any compile
    assert G.cache_limit(models["mamba"]) is None  # recurrent models have no such limit
    assert G.cache_limit(models["hybrid"]) == 128


@pytest.mark.parametrize("bad, name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(stop_tokens=(3, -1)), "stop_tokens"),
    (dict(top_k=2.5), "top_k"),
])
def test_bad_sampling_params(bad, name):
    with pytest.raises(ConfigError, match=name):
        SamplingConfig(**bad)


def test_bad_prompts_and_stop_ids(models):
    model = models["gpt"]
    with pytest.raises(ValueError, match=r"prompts\[1\]: empty"):
        G.generate(model, [[1, 2], []], GREEDY)
    with pytest.raises(ValueError, match=r"prompts\[0\]: token 32"):
        G.generate(model, [[1, VOCAB]], GREEDY)
    with pytest.raises(TypeError, match="flat list"):
        G.generate(model, [1, 2, 3], GREEDY)
    with pytest.raises(ConfigError, match="stop_tokens"):
        G.generate(model, [[1]], GREEDY.replace(stop_tokens=[VOCAB]))
    assert G.generate(model, [[1], [2, 3]], GREEDY.replace(max_new_tokens=0)) == [[], []]


def test_sample_cli_serve_bench_arguments(capsys):
    from linearnexus.cli import sample

    assert sample.main(["--serve-bench", "2"]) == 2  # no model source
    assert "exactly one of --checkpoint, --hf and --preset" in capsys.readouterr().err
    assert sample.main(["--preset", "gpt-small"]) == 2  # --preset only benchmarks
    assert "--preset: only with --serve-bench" in capsys.readouterr().err
    assert sample.main(["--prompt", "x"]) == 2
    assert "--checkpoint: required" in capsys.readouterr().err
    assert sample.main(["--serve-bench", "2", "--preset", "no-such-model"]) == 2
    assert "--preset: unknown model preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["--serve-bench", "2", "--preset", "gpt-small", "--state-dtype", "int8"])
    assert "--state-dtype: invalid choice" in capsys.readouterr().err
