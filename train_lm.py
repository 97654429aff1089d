#!/usr/bin/env python
"""Train a language model: ``python train_lm.py --help``; see docs/training.md."""

import sys

from linearnexus.cli.train_lm import main

if __name__ == "__main__":
    sys.exit(main())
