#!/usr/bin/env python
"""RL post-training (GRPO / PPO): ``python train_rl.py --help``; see docs/rl.md."""

import sys

from linearnexus.cli.train_rl import main

if __name__ == "__main__":
    sys.exit(main())
