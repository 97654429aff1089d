"""Command-line tools: ``train_lm`` (training) and ``sample`` (sampling from a checkpoint).

Each module has ``main(argv=None) -> int``; the scripts at the repository root
(``train_lm.py``, ``sample.py``) only call it.
"""
