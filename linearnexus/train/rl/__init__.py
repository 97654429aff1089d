"""RL post-training with verifiable rewards: GRPO and PPO on top of an SFT checkpoint.

See ``docs/rl.md``. Pieces:

* :mod:`.losses`: group advantages, the clipped surrogate, k1 / k3 KL, GAE, value loss.
* :mod:`.rollout`: sampling through ``generate``, the rollout layout, per-token log-probs.
* :mod:`.rewards`: reward callables ``reward(prompts, completions) -> [B] floats``.
* :mod:`.grpo` / :mod:`.ppo`: the two algorithms' updates.
* :mod:`.trainer`: :class:`RLTrainer`, the loop with checkpoints, resume and metrics.
* :mod:`.tasks`: tasks (prompt pools + rewards), e.g. ``addition``.
"""

from linearnexus.train.rl.config import ALGOS, GRPOConfig, PPOConfig, RLConfig
from linearnexus.train.rl.rewards import RewardFn, check_reward, combine_rewards
from linearnexus.train.rl.tasks import TASKS, Task, get_task
from linearnexus.train.rl.trainer import RLResult, RLTrainer

__all__ = [
    "ALGOS", "GRPOConfig", "PPOConfig", "RLConfig", "RLResult", "RLTrainer", "RewardFn", "TASKS",
    "Task", "check_reward", "combine_rewards", "get_task",
]
