"""Training: :class:`SFTTrainer` (next-token loss, compiled donated steps, orbax
checkpoints, resume, metrics) and :func:`load_checkpoint` for sampling.

See ``docs/training.md``. The public names are listed once, in ``sft.__all__``.
"""

from linearnexus.train.sft import *  # noqa: F403
from linearnexus.train.sft import __all__  # noqa: F401
