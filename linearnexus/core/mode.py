"""Kernel execution modes and the default rule that picks one from the sequence length."""

from __future__ import annotations

import enum


class KernelMode(str, enum.Enum):
    """How a sequence is processed.

    CHUNK: chunk-parallel form for training and prefill (matmuls / parallel scans inside
        a chunk, a sequential scan across chunks).
    RECURRENT: one token at a time with the state threaded through, for decoding.
    """

    CHUNK = "chunk"
    RECURRENT = "recurrent"


def as_mode(mode: KernelMode | str | None) -> KernelMode | None:
    """Normalise ``mode`` (a KernelMode, its string value, or None) to a KernelMode or None.

    Raises:
        ValueError: if ``mode`` is a string that names no mode.
    """
    if mode is None or isinstance(mode, KernelMode):
        return mode
    try:
        return KernelMode(str(mode).lower())
    except ValueError:
        choices = [m.value for m in KernelMode]
        raise ValueError(f"mode must be one of {choices} or None, got {mode!r}") from None


def select_mode(seq_len: int, threshold: int = 64) -> KernelMode:
    """Pick RECURRENT for short inputs (decoding) and CHUNK otherwise.

    Args:
        seq_len: number of tokens in the call (T).
        threshold: sequences shorter than this run in recurrent mode. Both modes give the
            same result; the choice is only about speed.

    Raises:
        ValueError: if ``seq_len`` < 0 or ``threshold`` < 1.
    """
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    return KernelMode.RECURRENT if seq_len < threshold else KernelMode.CHUNK
