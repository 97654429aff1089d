#!/usr/bin/env python
"""Sample from a checkpoint: ``python sample.py --checkpoint runs/demo``; see docs/training.md."""

import sys

from linearnexus.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
