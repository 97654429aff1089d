"""Tests for linearnexus.train.rl: loss pieces against hand-computed values, rollout layout,
reward checks, a few GRPO / PPO steps on tiny attention / Gated DeltaNet policies
that must move the policy towards the reward, exact resume, and train_rl.py's errors.

Policies are 1-layer, 16-wide models over a 13-character vocabulary; every run is a few
steps of a handful of rollouts, so the file is dominated by XLA compiling small programs.
"""

from __future__ import annotations

import dataclasses
import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linearnexus.core.config import ConfigError
from linearnexus.data import CharTokenizer
from linearnexus.models import ModelConfig, create_model
from linearnexus.train.rl import GRPOConfig, PPOConfig, RLConfig, RLTrainer, Task, get_task, losses
from linearnexus.train.rl.ppo import token_rewards
from linearnexus.train.rl.rewards import combine_rewards
from linearnexus.train.rl.rollout import build_rollout, completion_logprobs

CHARS = sorted(set("0123456789+=\n"))
TOK = CharTokenizer(CHARS)
SEVEN = TOK.encode("7")[0]

# jitted (eager dispatch compiles every primitive separately, which is slower here)
group_advantages = jax.jit(losses.group_advantages, static_argnums=(1,),
                           static_argnames=("scale_std", "eps"))
clipped_policy_loss = jax.jit(losses.clipped_policy_loss,
                              static_argnames=("eps_low", "eps_high", "level"))
aggregate = jax.jit(losses.aggregate, static_argnums=(2, 3))
gae = jax.jit(losses.gae, static_argnums=(3, 4))
value_loss = jax.jit(losses.value_loss, static_argnames=("clip",))
k3_kl = jax.jit(losses.k3_kl)
masked_whiten = jax.jit(losses.masked_whiten)
token_rewards = jax.jit(token_rewards, static_argnames=("kl_coef",))


# ---- loss pieces ---------------------------------------------------------------------------


def test_group_advantages_by_hand():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    # group 1: mean 0.5, std 0.5; group 2: all equal; group 3: mean 0.75, std sqrt(1.6875)
    scaled = group_advantages(r, 4, eps=0.0 + 1e-12)
    s3 = np.sqrt(((3 - 0.75) ** 2 + 3 * 0.75 ** 2) / 4)
    want = [1, -1, -1, 1, 0, 0, 0, 0, 2.25 / s3, -0.75 / s3, -0.75 / s3, -0.75 / s3]
    np.testing.assert_allclose(scaled, want, rtol=1e-5, atol=1e-6)
    raw = group_advantages(r, 4, scale_std=False)
    np.testing.assert_allclose(raw, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 2.25, -0.75, -0.75, -0.75],
                               atol=1e-6)
    tied = group_advantages(jnp.full((8,), 0.1), 8)
    assert np.all(np.asarray(tied) == 0.0)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 1)
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(r, 5)


def test_clipped_policy_loss_both_epsilons_by_hand():
    ratios = np.array([[1.5, 0.5, 0.5, 1.5, 1.1]])
    adv = jnp.array([[1.0, -1.0, 1.0, -1.0, 1.0]])
    old = jnp.array([[-1.0, -2.0, -0.5, -3.0, -1.5]])
    logp = old + jnp.log(ratios)
    mask = jnp.ones((1, 5))
    loss, ratio, clipped = clipped_policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.3)
    # r=1.5,A=+1 -> clipped to 1.3; r=0.5,A=-1 -> clipped to 0.8; the other side of each bound
    # keeps the unclipped (more pessimistic) value; 1.1 is inside [0.8, 1.3]
    np.testing.assert_allclose(loss, [[-1.3, 0.8, -0.5, 1.5, -1.1]], rtol=1e-6)
    np.testing.assert_allclose(ratio, ratios, rtol=1e-6)
    assert clipped.tolist() == [[True, True, False, False, False]]
    # a clipped token passes no gradient; an unclipped one passes -A * ratio
    grad = jax.grad(lambda lp: jnp.sum(clipped_policy_loss(lp, old, adv, mask, eps_low=0.2,
                                                           eps_high=0.3)[0]))(logp)
    np.testing.assert_allclose(grad, [[0.0, 0.0, -0.5, 1.5, -1.1]], rtol=1e-6)
    # masked tokens: zero loss, ratio 1, never clipped
    m = jnp.array([[1.0, 0.0, 1.0, 1.0, 0.0]])
    loss_m, ratio_m, clipped_m = clipped_policy_loss(logp, old, adv, m, eps_low=0.2, eps_high=0.3)
    assert float(loss_m[0, 1]) == 0.0 and float(ratio_m[0, 4]) == 1.0 and not clipped_m[0, 1]


def test_sequence_level_ratio_by_hand():
    old = jnp.zeros((2, 3))
    logp = jnp.array([[0.3, -0.1, 0.4], [0.2, 9.0, 9.0]])  # row 2: last two tokens masked
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = jnp.array([1.0, -1.0])
    loss, ratio, _ = clipped_policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2,
                                         level="sequence")
    s1, s2 = np.exp(0.2), np.exp(0.2)  # mean log ratios: (0.3 - 0.1 + 0.4) / 3, 0.2 / 1
    np.testing.assert_allclose(ratio, [[s1, s1, s1], [s2, 1.0, 1.0]], rtol=1e-6)
    # row 1: A > 0, s1 = 1.2214 > 1.2 -> clipped to 1.2; row 2: A < 0 -> -min(-s2, -1.2) = s2
    np.testing.assert_allclose(loss, [[-1.2] * 3, [s2, 0, 0]], rtol=1e-6)


def test_k3_kl_by_hand():
    logp = jnp.log(jnp.array([0.5, 0.25, 0.4]))
    ref = jnp.log(jnp.array([0.25, 0.5, 0.4]))
    want = [0.5 - np.log(0.5) - 1, 2.0 - np.log(2.0) - 1, 0.0]
    np.testing.assert_allclose(k3_kl(logp, ref), want, rtol=1e-6, atol=1e-7)


def test_aggregation_modes_by_hand():
    loss = jnp.array([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(aggregate(loss, mask, "sequence")) == pytest.approx((2.0 + 4.0) / 2)
    assert float(aggregate(loss, mask, "token")) == pytest.approx(10.0 / 4)
    assert float(aggregate(loss, mask, "constant", 4)) == pytest.approx(10.0 / 8)
    with pytest.raises(ValueError, match="mode"):
        aggregate(loss, mask, "mean")


def _gae_loop(r, v, lengths, gamma, lam):
    adv = np.zeros_like(r)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            nv = v[b, t + 1] if t + 1 < n else 0.0
            delta = r[b, t] + gamma * nv - v[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, np.where(np.arange(r.shape[1]) < np.array(lengths)[:, None], adv + v, 0.0)


def test_gae_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    lengths = [5, 1, 3, 7]
    r = rng.standard_normal((4, 7)).astype(np.float32)
    v = rng.standard_normal((4, 7)).astype(np.float32)
    mask = (np.arange(7) < np.array(lengths)[:, None]).astype(np.float32)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (0.99, 1.0)):
        adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma, lam)
        want_adv, want_ret = _gae_loop(r * mask, v, lengths, gamma, lam)
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)


def test_value_loss_clipping_by_hand():
    v = jnp.array([[1.0, 0.0, 0.5, 2.0]])
    old = jnp.array([[0.0, 0.0, 0.4, 0.0]])
    ret = jnp.array([[2.0, 1.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    got = value_loss(v, old, ret, mask, clip=0.2)
    # token 0: V moved 1.0 from old, clipped to 0.2 -> max((1-2)^2, (0.2-2)^2) = 3.24
    # token 1: no move -> 1.0; token 2: inside the clip -> (0.5)^2 = 0.25; token 3 masked
    np.testing.assert_allclose(got, [[0.5 * 3.24, 0.5, 0.5 * 0.25, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(value_loss(v, old, ret, mask, clip=0.0),
                               [[0.5, 0.5, 0.125, 0.0]], rtol=1e-6)


def test_token_rewards_and_whitening():
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logp = jnp.array([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]])
    ref = jnp.array([[-1.5, -2.0, -0.5], [-0.5, 0.0, 0.0]])
    r = token_rewards(jnp.array([1.0, 2.0]), jnp.array([3, 1]), mask, logp, ref, kl_coef=0.1)
    np.testing.assert_allclose(r, [[-0.05, 0.0, 1.0], [2.0 + 0.05, 0.0, 0.0]], rtol=1e-6)
    w = masked_whiten(jnp.array([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]]), mask)
    x = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(w[mask > 0], (x - x.mean()) / x.std(), rtol=1e-5)
    assert float(w[1, 1]) == 0.0


# ---- rollouts and rewards ------------------------------------------------------------------


def test_rollout_layout_and_logprobs():
    r = build_rollout([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], np.array([True, False]), 3)
    assert r.prompt_len == 3 and r.tokens.shape == (2, 6)
    assert r.tokens.tolist() == [[1, 2, 3, 5, 6, 0], [0, 0, 4, 7, 8, 9]]
    assert r.attn_mask.tolist() == [[True] * 6, [False, False, True, True, True, True]]
    assert r.mask.tolist() == [[1, 1, 0], [1, 1, 1]] and r.lengths.tolist() == [2, 3]
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 11))
    logp, ent = completion_logprobs(logits, jnp.asarray(r.tokens), 3, 0.7)
    lz = jax.nn.log_softmax(logits / 0.7, axis=-1)
    assert float(logp[1, 2]) == pytest.approx(float(lz[1, 4, 9]), rel=1e-6)
    assert float(logp[0, 0]) == pytest.approx(float(lz[0, 2, 5]), rel=1e-6)
    assert float(ent[0, 1]) == pytest.approx(float(-jnp.sum(jnp.exp(lz[0, 3]) * lz[0, 3])), rel=1e-5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        build_rollout([[1]], [[1, 2, 3, 4]], np.array([True]), 3)


def test_combine_rewards_weights_and_bad_returns():
    prompts, comps = ["1+2=", "3+4="], ["3", "8"]
    task = get_task("addition")
    total, parts = combine_rewards(task.rewards, {"exact": 1.0, "format": 0.5}, prompts, comps)
    np.testing.assert_allclose(parts["exact"], [1.0, 0.0])
    np.testing.assert_allclose(total, [1.5, 0.5])
    with pytest.raises(ValueError, match=r"reward 'short'.*shape \(2,\)"):
        combine_rewards({"short": lambda p, c: np.ones(1)}, None, prompts, comps)
    with pytest.raises(ValueError, match=r"reward 'nan'.*not finite"):
        combine_rewards({"nan": lambda p, c: np.array([0.0, np.nan])}, None, prompts, comps)
    with pytest.raises(TypeError, match=r"reward 'text'.*floats"):
        combine_rewards({"text": lambda p, c: ["yes", "no"]}, None, prompts, comps)
    with pytest.raises(TypeError, match=r"reward 'none'.*floats"):
        combine_rewards({"none": lambda p, c: None}, None, prompts, comps)
    with pytest.raises(ValueError, match="weights"):
        combine_rewards(task.rewards, {"exactt": 1.0}, prompts, comps)


def test_addition_task_split_and_rewards():
    task = get_task("addition", held_out=0.25)
    assert len(task.train_prompts) + len(task.eval_prompts) == 8100
    assert not set(task.train_prompts) & set(task.eval_prompts)
    assert len(task.eval_prompts) == 2025
    text = task.sft_text(200, 0)
    held = set(task.eval_prompts)
    assert all(line.split("=")[0] + "=" not in held for line in text.splitlines())
    assert task.rewards["exact"](["23+58="], ["81"]).tolist() == [1.0]
    assert task.rewards["exact"](["23+58="], ["81 "]).tolist() == [0.0]
    assert task.rewards["format"](["1+1="], ["12a"]).tolist() == [0.0]
    with pytest.raises(KeyError, match="unknown task"):
        get_task("sudoku")


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="group_size"):
        RLConfig(algo="grpo", group_size=1)
    RLConfig(algo="ppo", group_size=1, prompts_per_step=4, ppo=PPOConfig(num_minibatches=2))
    with pytest.raises(ConfigError, match="num_minibatches"):
        RLConfig(algo="ppo", group_size=1, prompts_per_step=3, ppo=PPOConfig(num_minibatches=2))
    with pytest.raises(ConfigError, match="temperature"):
        RLConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="eps_low"):
        GRPOConfig(eps_low=1.5)


# ---- a few steps end to end ----------------------------------------------------------------


def _sevens(prompts, completions):
    """Reward: the share of 7s in the completion (a direction every policy can move in)."""
    return np.array([c.count("7") / 3.0 for c in completions])


def _task(**changes) -> Task:
    base = get_task("addition")
    task = dataclasses.replace(base, train_prompts=base.train_prompts[:64],
                               eval_prompts=base.eval_prompts[:8], rewards={"sevens": _sevens},
                               weights={}, max_new_tokens=3)
    return dataclasses.replace(task, **changes)


_POLICIES: dict[str, tuple] = {}


def _policy(block: str):
    """A tiny policy, the same object (reset to its initial weights) for every call with
    ``block``: generate's compiled sampler is cached per model object."""
    if block not in _POLICIES:
        options = {"attention": {"n_heads": 2},
                   "gated_deltanet": {"num_heads": 2, "head_dim": 8, "chunk_size": 8}}
        cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=16, n_layers=1,
                          block_pattern=(block,), block_options={block: options[block]},
                          mlp=block == "attention", max_seq_len=32)
        model = create_model(cfg, seed=0)
        _POLICIES[block] = (model, jax.tree.map(jnp.copy, nnx.state(model)))
    model, init = _POLICIES[block]
    nnx.update(model, jax.tree.map(jnp.copy, init))
    return model


def _p_seven(model, prompts):
    """Mean probability of '7' as the first completion token."""
    ids = jnp.asarray([TOK.encode(p) for p in prompts])
    logits, _ = model(ids)
    return float(jnp.mean(jax.nn.softmax(logits[:, -1])[:, SEVEN]))


def _config(tmp_path, **kw) -> RLConfig:
    # no held-out evaluation: it would compile a greedy sampler too
    base = dict(max_steps=4, prompts_per_step=8, group_size=4, lr=3e-2, eval_interval=0,
                eval_prompts=0, progress=False, out_dir=str(tmp_path / "run"))
    return RLConfig(**{**base, **kw})


PPO_CASE = {"ppo": PPOConfig(epochs=1, num_minibatches=2, ent_coef=0.01)}


# one attention and one recurrent policy (the trainer reaches blocks only through the
# model's calling convention); each GRPO option is on in one of the two cases
@pytest.mark.parametrize("block,algo,options", [
    ("attention", "grpo", {"grpo": GRPOConfig(beta=0.02, num_iterations=2,
                                              loss_aggregation="constant")}),
    ("gated_deltanet", "grpo", {"grpo": GRPOConfig(scale_rewards=False, loss_aggregation="token",
                                                   importance_level="sequence", eps_high=0.28)}),
    ("attention", "ppo", PPO_CASE),
])
def test_steps_move_the_policy_towards_the_reward(tmp_path, block, algo, options):
    model = _policy(block)
    task = _task()
    probe = list(task.train_prompts[:16])
    before = _p_seven(model, probe)
    lines = []
    trainer = RLTrainer(model, TOK, task, _config(tmp_path, algo=algo, **options), log=lines.append)
    result = trainer.train()
    after = _p_seven(trainer.model, probe)
    assert after > before * 1.5, f"{block}/{algo}: P(7) {before:.4f} -> {after:.4f}"
    rec = result.history[-1]
    for key in ("reward_mean", "reward_std", "entropy", "clip_frac", "completion_len", "loss"):
        assert np.isfinite(rec[key]), key
    if algo == "ppo":
        assert np.isfinite(rec["value_loss"])
    if trainer.config.uses_reference:
        assert rec["kl"] >= 0
    assert (tmp_path / "run" / "rl.png").is_file()


def test_resume_equals_uninterrupted(tmp_path):
    """PPO (value head and optimizer state in the checkpoint) stopped by SIGINT after step
    2, then resumed; the settings are the PPO case above, whose compiled steps it reuses."""
    cfg = dict(PPO_CASE, algo="ppo", checkpoint_interval=0)
    keys = ("reward_mean", "loss", "value_loss", "kl", "clip_frac", "entropy")
    full = RLTrainer(_policy("attention"), TOK, _task(),
                     _config(tmp_path / "a", **cfg), log=lambda s: None).train()

    stopped = RLTrainer(_policy("attention"), TOK, _task(), _config(tmp_path / "b", **cfg),
                        log=lambda s: None)
    real_step = stopped.train_step

    def step_then_interrupt():
        rec = real_step()
        if stopped.step == 2:
            signal.raise_signal(signal.SIGINT)
        return rec

    stopped.train_step = step_then_interrupt
    first = stopped.train()
    assert first.interrupted == "SIGINT" and first.step == 2
    resumed = RLTrainer(_policy("attention"), TOK, _task(), _config(tmp_path / "b", **cfg),
                        log=lambda s: None)
    with pytest.raises(FileExistsError):
        resumed.train(resume=False)
    second = resumed.train(resume=True)
    assert second.start_step == 2 and second.step == 4
    got = {r["step"]: r for r in first.history + second.history if "reward_mean" in r}
    want = {r["step"]: r for r in full.history if "reward_mean" in r}
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        for k in keys:
            assert got[step][k] == pytest.approx(want[step][k], rel=1e-5, abs=1e-7), (step, k)
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    # the run folder's policy loads like an SFT checkpoint
    from linearnexus.train import load_checkpoint

    loaded, _, extra = load_checkpoint(tmp_path / "b" / "run")
    assert extra["step"] == 4 and extra["tokenizer"].chars == CHARS
    want_params = nnx.to_pure_dict(nnx.state(resumed.model, nnx.Param))
    got_params = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got_params, want_params)


def test_separate_critic():
    """value_model="separate": the critic reads its own trunk (a copy of the policy), so
    the value loss leaves the policy's weights alone."""
    from linearnexus.train.rl.ppo import PPO

    policy = _policy("attention")
    algo = PPO(RLConfig(algo="ppo", ppo=PPOConfig(value_model="separate")), policy)
    ac = algo.module
    assert ac.value_trunk is not None and ac.value_trunk is not policy
    ac.value_head.kernel[...] = jnp.ones_like(ac.value_head.kernel[...])
    tokens = jnp.asarray([TOK.encode("12+34=46")])
    graphdef, params, rest = nnx.split(ac, nnx.Param, ...)

    def value_sum(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(tokens)[1])

    grads = nnx.to_pure_dict(jax.jit(jax.grad(value_sum))(params))
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["policy"]))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["value_trunk"]))
    extra = algo.extra_state(nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
    assert set(extra["params"]) == {"value_head", "value_trunk"}


def test_bad_task_input_is_reported_before_training(tmp_path):
    model = _policy("attention")
    cfg = _config(tmp_path)
    bad_shape = _task(rewards={"scalar": lambda p, c: 1.0})
    with pytest.raises(ValueError, match=r"reward 'scalar'.*shape"):
        RLTrainer(model, TOK, bad_shape, cfg)
    with pytest.raises(ValueError, match=r"reward 'nan'.*not finite"):
        RLTrainer(model, TOK, _task(rewards={"nan": lambda p, c: np.full(len(c), np.nan)}), cfg)
    with pytest.raises(TypeError, match=r"reward 'words'"):
        RLTrainer(model, TOK, _task(rewards={"words": lambda p, c: ["good"] * len(c)}), cfg)
    with pytest.raises(ValueError, match=r"train_prompts\[0\].*'a\+b='"):
        RLTrainer(model, TOK, _task(train_prompts=["a+b="]), cfg)
    with pytest.raises(ValueError, match="task.stop"):
        RLTrainer(model, TOK, _task(stop="=\n"), cfg)
    with pytest.raises(ValueError, match="max_seq_len"):
        RLTrainer(model, TOK, _task(max_new_tokens=40), cfg)


def test_train_rl_command_line(tmp_path, capsys):
    from linearnexus.cli import train_rl
    from linearnexus.train import SFTTrainer, TrainConfig

    sft = tmp_path / "sft"
    model = _policy("attention")
    loader = [(np.zeros((1, 4), np.int32), np.zeros((1, 4), np.int32))]
    SFTTrainer(model, None, loader, None, TrainConfig(batch_size=1, seq_len=4, out_dir=str(sft)),
               tokenizer=TOK).save_checkpoint()
    out = tmp_path / "grpo"
    assert train_rl.main(["--init", str(sft), "--out", str(out), "--group-size", "1"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert train_rl.main(["--init", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "--init" in capsys.readouterr().err
    args = ["--init", str(sft), "--out", str(out), "--max-steps", "1", "--prompts-per-step", "2",
            "--group-size", "2", "--eval-prompts", "0", "--max-new-tokens", "3", "--no-progress",
            "--task-option", "held_out=0.5"]
    assert train_rl.main(args) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and np.isfinite(records[0]["reward_mean"])
    assert train_rl.main(args) == 2  # the run exists: --resume or --overwrite
    assert "already holds a run" in capsys.readouterr().err
    assert train_rl.main(["--out", str(out), "--resume", "--algo", "ppo"]) == 2
    assert "--algo" in capsys.readouterr().err
    # done already: a resume with the same max_steps loads the checkpoint and stops
    assert train_rl.main(["--out", str(out), "--resume", "--no-progress"]) == 0
