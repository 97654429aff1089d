"""Files that are whole or absent: atomic writes, content digests and their checks.

One helper writes every small file the library produces (configs, tokenizers, token
caches, metrics, checkpoint manifests)::

    atomic_write_text(path, text)      # readers see the old file or the new one, never half

It writes a uniquely named temporary file in the same folder (so ``os.replace`` is a rename
within one filesystem), fsyncs it, renames it over ``path`` and fsyncs the folder, so the
rename itself survives a power cut.

A *manifest* records ``{relative path: {"size", "sha256"}}`` for the files under a folder;
:func:`verify_manifest` checks a folder against one (sizes always, SHA-256 digests of
files up to a size limit in ``"full"`` mode) and returns the first problem it finds.

Standard library only (``core/`` imports nothing above jax / numpy / stdlib).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DEFAULT_HASH_LIMIT",
    "VERIFY_MODES",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_manifest",
    "fsync_dir",
    "sha256_file",
    "verify_manifest",
]

VERIFY_MODES = ("full", "sizes", "off")
# files larger than this are checked by size only in "full" mode (hashing costs ~1 s/GB)
DEFAULT_HASH_LIMIT = 1 << 30


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so renames and new entries in it are durable (no-op where folders
    cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename still happened
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Create or replace ``path`` with what ``write(binary_file)`` writes, atomically.

    The parent folder is created. On any error (``write`` raising, a full disk) the
    temporary file is removed, ``path`` keeps its old content and the error propagates.
    Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(root: str | os.PathLike, files: Iterable[str | os.PathLike] | None = None
                   ) -> dict[str, dict[str, Any]]:
    """``{posix path relative to root: {"size": bytes, "sha256": hex}}`` for ``files``
    (paths relative to ``root``), or for every regular file under ``root`` when None."""
    root = Path(root)
    if files is None:
        files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    out: dict[str, dict[str, Any]] = {}
    for rel in files:
        full = root / rel
        out[Path(rel).as_posix()] = {"size": full.stat().st_size, "sha256": sha256_file(full)}
    return out


def verify_manifest(root: str | os.PathLike, manifest: Mapping[str, Mapping[str, Any]],
                    mode: str = "full", *, hash_limit: int = DEFAULT_HASH_LIMIT) -> str | None:
    """Check the files under ``root`` against ``manifest`` (from :func:`build_manifest`).

    Args:
        mode: ``"full"`` (sizes, and SHA-256 of files up to ``hash_limit`` bytes),
            ``"sizes"`` (presence and sizes only) or ``"off"`` (nothing).

    Returns:
        None when everything matches, else ``"<relative path>: <what is wrong>"`` for the
        first file that does not.

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"mode: expected one of {list(VERIFY_MODES)}, got {mode!r}")
    if mode == "off":
        return None
    root = Path(root)
    for rel, entry in manifest.items():
        full = root / rel
        try:
            size = full.stat().st_size
        except FileNotFoundError:
            return f"{rel}: missing"
        except OSError as e:
            return f"{rel}: unreadable ({e.strerror or e})"
        if size != entry["size"]:
            return f"{rel}: {size} bytes, expected {entry['size']}"
        if mode == "full" and size <= hash_limit:
            try:
                digest = sha256_file(full)
            except OSError as e:
                return f"{rel}: unreadable ({e.strerror or e})"
            if digest != entry["sha256"]:
                return f"{rel}: SHA-256 {digest[:12]}... differs from the recorded {entry['sha256'][:12]}..."
    return None
