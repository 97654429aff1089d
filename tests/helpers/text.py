"""Deterministic Shakespeare-flavoured text for tests that must not depend on a data file."""

from __future__ import annotations

import numpy as np

WORDS = ["thou", "art", "the", "king", "of", "Rome", "and", "my", "lord", "speak", "ROMEO:"]


def synthetic_text(n_chars: int, *, max_words: int = 10, truncate: bool = False) -> str:
    """Lines of 3 to ``max_words - 1`` random words (seed 0) until ``n_chars`` is reached.

    With ``truncate`` the result is cut to exactly ``n_chars`` characters.
    """
    rng = np.random.default_rng(0)
    lines, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(WORDS, size=int(rng.integers(3, max_words)))) + ".\n"
        lines.append(line)
        size += len(line)
    text = "".join(lines)
    return text[:n_chars] if truncate else text
