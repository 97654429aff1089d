"""`make rl-demo`: SFT a tiny char-level model on two-digit addition, then GRPO and PPO.

1. Writes solved training examples (``23+58=81\\n`` lines, held-out operand pairs never
   included) and trains a small attention model on them with ``train_lm.py`` for a few
   hundred steps: a modest held-out exact-match accuracy.
2. ``train_rl.py --algo grpo --init <sft run>``: held-out accuracy (greedy, exact match)
   should rise by >= 20 points.
3. ``train_rl.py --algo ppo --init <sft run>``: the mean reward should rise.

Both command lines run in this process (one JAX start-up). Results go to
``benchmarks/results/rl_demo.json``; the exit status is 1 when a target was missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULT = ROOT / "benchmarks" / "results" / "rl_demo.json"


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "rl_demo"))
    p.add_argument("--sft-steps", type=int, default=1600)
    p.add_argument("--grpo-steps", type=int, default=300)
    p.add_argument("--ppo-steps", type=int, default=100)
    p.add_argument("--result", default=str(RESULT))
    args = p.parse_args(argv)

    import jax

    from linearnexus.cli import train_lm, train_rl
    from linearnexus.train.rl import get_task

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task("addition")
    data = out / "addition.txt"
    # 40k solved examples drawn from the training pairs only
    data.write_text(task.sft_text(40_000, 0), encoding="utf-8")
    sft_config = ROOT / "configs" / "rl_demo_sft.yaml"
    common = ["--no-progress"]
    status = train_lm.main(["--config", str(sft_config), "--data", str(data), "--out",
                            str(out / "sft"), "--max-steps", str(args.sft_steps), "--overwrite",
                            "--sample-tokens", "0", *common])
    if status:
        return status
    # 32 prompts x 8 samples per step at temperature 0.8, exact-match reward only (within an
    # all-wrong group, std scaling blows the format reward's small differences up);
    # every held-out prompt is evaluated (greedy) every 50 steps
    rl_common = ["--init", str(out / "sft"), "--task", "addition", "--task-option",
                 "format_weight=0", "--prompts-per-step", "32", "--group-size", "8",
                 "--temperature", "0.8", "--eval-prompts", "100000", "--eval-interval", "50",
                 "--overwrite", *common]
    status = train_rl.main(["--algo", "grpo", "--out", str(out / "grpo"), "--max-steps",
                            str(args.grpo_steps), "--lr", "2e-4", *rl_common])
    if status:
        return status
    status = train_rl.main(["--algo", "ppo", "--out", str(out / "ppo"), "--max-steps",
                            str(args.ppo_steps), "--lr", "1e-4", *rl_common])
    if status:
        return status
    seconds = time.perf_counter() - t0

    grpo, ppo = _records(out / "grpo"), _records(out / "ppo")
    acc = [(r["step"], r["eval_accuracy"]) for r in grpo if "eval_accuracy" in r]
    ppo_acc = [(r["step"], r["eval_accuracy"]) for r in ppo if "eval_accuracy" in r]
    ppo_reward = [r["reward_mean"] for r in ppo if "reward_mean" in r]
    window = max(len(ppo_reward) // 5, 1)
    result = {
        "task": "addition",
        "sft_accuracy": acc[0][1],
        "grpo_accuracy": acc[-1][1],
        "ppo_accuracy": ppo_acc[-1][1],
        "grpo_steps": acc[-1][0],
        "ppo_steps": ppo_acc[-1][0],
        "seconds": round(seconds, 1),
        "sft_steps": args.sft_steps,
        "held_out_prompts": len(task.eval_prompts),
        "ppo_reward_first": round(_mean(ppo_reward[:window]), 4),
        "ppo_reward_last": round(_mean(ppo_reward[-window:]), 4),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
        "jax": jax.__version__,
    }
    path = Path(args.result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    gain = result["grpo_accuracy"] - result["sft_accuracy"]
    rising = result["ppo_reward_last"] > result["ppo_reward_first"]
    print(json.dumps(result, indent=2))
    print(f"GRPO: held-out accuracy {result['sft_accuracy']:.3f} -> {result['grpo_accuracy']:.3f} "
          f"({100 * gain:+.1f} points; target >= +20): {'ok' if gain >= 0.2 else 'MISSED'}")
    print(f"PPO: mean reward {result['ppo_reward_first']:.3f} (first fifth) -> "
          f"{result['ppo_reward_last']:.3f} (last fifth): {'ok' if rising else 'MISSED'}")
    print(f"{seconds:.0f}s in all; written {path}")
    return 0 if gain >= 0.2 and rising else 1


if __name__ == "__main__":
    sys.exit(main())
