"""Checkpoint integrity, fallback to the newest good checkpoint, and one writer per run folder.

Orbax writes each checkpoint into a temporary folder and renames it when complete; that
guards against a save killed midway but not against what happens to the files afterwards
(a partial copy, a disk that filled during a copy, bit rot). So every checkpoint gets a
manifest, ``checkpoints/<step>/integrity.json``, written last (atomically) with the size
and SHA-256 of every file orbax wrote::

    {"format": 1, "step": 40, "files": {"model/ocdbt.process_0/d/5e27...": {"size": ..,
                                                                          "sha256": ..}}}

Before a checkpoint is read, :func:`select_checkpoint` checks it against its manifest
(``full``: sizes, and digests of files up to a size limit; ``sizes``; ``off``) and falls
back to the newest one that verifies. A writer (the trainer, holding the run lock) moves
each failing checkpoint aside as ``<step>.corrupt`` (never deletes it) and names it in a
warning; readers (``sample.py``) only warn. A step folder with no manifest is a save that
did not finish (killed between orbax's rename and the manifest), unless its metadata says
it was written before manifests existed (format 1), which is accepted unverified.

:class:`RunLock` makes one process the only writer of a run folder.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from linearnexus.core.fileio import (
    DEFAULT_HASH_LIMIT,
    VERIFY_MODES,
    atomic_write_text,
    build_manifest,
    fsync_dir,
    verify_manifest,
)

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "RunLock",
    "RunLockedError",
    "select_checkpoint",
    "step_folders",
    "verify_checkpoint",
    "write_checkpoint_manifest",
]

MANIFEST_FILE = "integrity.json"
LOCK_FILE = "run.lock"
_MANIFEST_FORMAT = 1
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(FileNotFoundError):
    """No usable checkpoint: none there, or none that verifies (the message lists each
    step folder found and why it was rejected)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. a full disk); the previous checkpoints are
    untouched. ``errno`` is the underlying error's."""


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock (the message names it)."""


# ---- manifests ----------------------------------------------------------------------------


def write_checkpoint_manifest(step_dir: str | os.PathLike, step: int) -> Path:
    """Record size + SHA-256 of every file in ``step_dir`` in its manifest (written last,
    atomically). Returns the manifest's path."""
    step_dir = Path(step_dir)
    files = sorted(p.relative_to(step_dir) for p in step_dir.rglob("*")
                   if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {"format": _MANIFEST_FORMAT, "step": int(step),
                "files": build_manifest(step_dir, files)}
    return atomic_write_text(step_dir / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def read_step_meta(step_dir: str | os.PathLike) -> dict | None:
    """The JSON metadata a checkpoint step folder holds (``step``, ``model_config``,
    ``train_config`` ...), read as plain JSON without orbax or JAX; None when it is missing
    or does not parse. Unverified: for decisions taken before JAX starts (the CPU device
    count of a resumed run), not for restoring."""
    try:
        meta = json.loads((Path(step_dir) / "meta" / "metadata").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _legacy_format(step_dir: Path) -> bool:
    """True when the checkpoint's metadata says it predates manifests (format_version 1)."""
    meta = read_step_meta(step_dir)
    try:
        return meta is not None and int(meta.get("format_version", 0)) < 2
    except (ValueError, TypeError):
        return False


def verify_checkpoint(step_dir: str | os.PathLike, mode: str = "full", *,
                      hash_limit: int = DEFAULT_HASH_LIMIT) -> str | None:
    """Check one step folder against its manifest.

    Args:
        mode: ``"full"``, ``"sizes"`` or ``"off"`` (see
            :func:`linearnexus.core.fileio.verify_manifest`).

    Returns:
        None when it verifies, else the reason, naming the file (e.g.
        ``"model/_METADATA: missing"``).
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify_checkpoints: expected one of {list(VERIFY_MODES)}, got {mode!r}")
    if mode == "off":
        return None
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST_FILE
    if not path.is_file():
        if _legacy_format(step_dir):
            return None  # written before manifests existed: nothing to check against
        return f"{MANIFEST_FILE}: missing (the save did not finish)"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no file list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_FILE}: unreadable ({e})"
    if manifest.get("step") != int(step_dir.name):
        return f"{MANIFEST_FILE}: written for step {manifest.get('step')}, not {step_dir.name}"
    stat = path.stat()
    key = (str(step_dir.absolute()), stat.st_ino, stat.st_mtime_ns, mode, hash_limit)
    if time.monotonic() - _VERIFIED.get(key, -math.inf) < _VERIFIED_FOR_S:
        return None
    problem = verify_manifest(step_dir, files, mode, hash_limit=hash_limit)
    if problem is None:
        _VERIFIED[key] = time.monotonic()
    return problem


# checkpoints that verified in this process a moment ago, by their manifest's identity: the
# command line verifies before it builds the trainer, which verifies again, and hashing
# costs ~1 s/GB. Kept briefly, so a long-lived process rechecks what it reads later.
_VERIFIED: dict[tuple[str, int, int, str, int], float] = {}
_VERIFIED_FOR_S = 60.0


def step_folders(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every step folder (a name of digits), newest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(p.name), p) for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, reverse=True)


def _move_aside(step_dir: Path) -> Path:
    """Rename ``<step>`` to ``<step>.corrupt`` (``.corrupt.2``, ... if taken); orbax ignores
    names that are not digits."""
    target = step_dir.with_name(step_dir.name + CORRUPT_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = step_dir.with_name(f"{step_dir.name}{CORRUPT_SUFFIX}.{n}")
    os.replace(step_dir, target)
    fsync_dir(step_dir.parent)
    return target


def select_checkpoint(checkpoint_dir: str | os.PathLike, mode: str = "full", *,
                      step: int | None = None, move_aside: bool = False,
                      warn: Callable[[str], None] | None = None,
                      hash_limit: int = DEFAULT_HASH_LIMIT) -> int | None:
    """The newest step in ``checkpoint_dir`` whose checkpoint verifies.

    Args:
        mode: verification mode (``full`` / ``sizes`` / ``off``).
        step: check only this step (no fallback: it was asked for by name).
        move_aside: rename each failing checkpoint to ``<step>.corrupt`` when an older one
            verifies (only the run's writer should). When none verifies, nothing is moved.
        warn: receives one line per failing checkpoint (folder, file and reason).

    Returns:
        The step, or None when there are no step folders at all.

    Raises:
        CheckpointError: step folders exist but none verifies (or ``step`` does not), or
            ``step`` does not exist; the message lists each one with its reason.
    """
    checkpoint_dir = Path(checkpoint_dir)
    folders = step_folders(checkpoint_dir)
    if step is not None:
        folders = [(s, p) for s, p in folders if s == step]
        if not folders:
            raise CheckpointError(
                f"checkpoint: no step {step} in {checkpoint_dir} (steps: "
                f"{[s for s, _ in step_folders(checkpoint_dir)]})")
    if not folders:
        return None
    failed: list[tuple[Path, str]] = []
    for s, folder in folders:
        reason = verify_checkpoint(folder, mode, hash_limit=hash_limit)
        if reason is None:
            for bad, why in failed:
                line = f"checkpoint {bad} failed verification ({why})"
                if move_aside:
                    line += f"; moved aside to {_move_aside(bad).name}"
                if warn is not None:
                    warn(f"warning: {line}; using step {s}")
            return s
        failed.append((folder, reason))
    if step is not None:
        raise CheckpointError(f"checkpoint: {folders[0][1]} does not verify ({failed[0][1]}); "
                              "--verify-checkpoints off reads it unverified")
    listing = "; ".join(f"{folder.name}: {why}" for folder, why in failed)
    raise CheckpointError(
        f"checkpoint: none of the checkpoints in {checkpoint_dir} verifies ({listing}); "
        "nothing was moved. --verify-checkpoints off reads them unverified (or start over "
        "with train_lm.py --overwrite)")


# ---- the run lock -------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _link_or_create(source: Path, target: Path) -> None:
    """Make ``target`` hold ``source``'s content, failing with FileExistsError if it exists:
    a hard link (atomic, content included), or where the filesystem has none, an exclusive
    create followed by the write."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network / FUSE filesystems)
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(source.read_bytes())
            fh.flush()
            os.fsync(fh.fileno())


class RunLock:
    """Exclusive ownership of a run folder: ``<out_dir>/run.lock`` holds the owner's pid
    and host while a run writes there, and is removed at exit.

    A lock whose owner is a dead process on this host (killed with SIGKILL, or the machine
    rebooted) is taken over with a warning. A lock held by a live process, or by another
    host (whose processes cannot be checked from here), raises :class:`RunLockedError`
    naming the owner. Re-entrant within one process (the command line takes it before
    preparing data; the trainer takes it again).

    Usage::

        with RunLock("runs/x", warn=print):
            ...
    """

    _held: dict[Path, int] = {}  # lock path -> nesting depth in this process

    def __init__(self, out_dir: str | os.PathLike, *,
                 warn: Callable[[str], None] | None = None) -> None:
        self.path = Path(out_dir).expanduser().absolute() / LOCK_FILE
        self._warn = warn
        self._owned = False

    def _owner(self) -> dict[str, Any] | None:
        return self._read(self.path) if self.path.exists() else None

    def acquire(self) -> RunLock:
        """Take the lock (see the class docstring). Raises RunLockedError."""
        if self.path in RunLock._held:
            RunLock._held[self.path] += 1
            self._owned = True
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise NotADirectoryError(errno.ENOTDIR, f"out_dir: {self.path.parent} cannot be a "
                                     f"folder ({e.strerror}: {e.filename})") from None
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        # the lock appears with its content in one step (a link of a finished temporary
        # file; link fails if the name exists), so no reader ever sees a half-written owner
        tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
        atomic_write_text(tmp, json.dumps(me) + "\n")
        try:
            for _ in range(3):
                try:
                    _link_or_create(tmp, self.path)
                except FileExistsError:
                    owner = self._owner()
                    if owner is not None:
                        self._check_stale(owner, me)
                    continue
                fsync_dir(self.path.parent)
                RunLock._held[self.path] = 1
                self._owned = True
                return self
        finally:
            tmp.unlink(missing_ok=True)
        raise RunLockedError(f"out_dir: could not take {self.path} (other processes keep "
                             "taking it); is another run starting in this folder?")

    def _check_stale(self, owner: dict[str, Any], me: dict[str, Any]) -> None:
        """Remove the lock if its owner is a dead process on this host, else raise."""
        pid, host = owner.get("pid"), owner.get("host")
        if host == me["host"] and isinstance(pid, int) and pid != me["pid"] and _pid_alive(pid):
            raise RunLockedError(
                f"out_dir: {self.path.parent} is in use by another run (pid {pid} on {host}, "
                f"lock {self.path}); wait for it to finish or use another --out (if no run is "
                "using it, the pid was reused: delete the lock file)")
        if host is not None and host != me["host"]:
            raise RunLockedError(
                f"out_dir: {self.path.parent} is locked by pid {pid} on host {host} "
                f"({self.path}); if that run is gone, delete the lock file")
        # a dead owner on this host (or a lock cut short by a kill): take it over. Rename
        # it away first so two processes cannot both remove a lock the other just took.
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved != owner:  # another process took the lock between our read and rename
            os.replace(aside, self.path)
            raise RunLockedError(f"out_dir: {self.path.parent} was just taken by another run "
                                 f"({moved}); use another --out")
        aside.unlink(missing_ok=True)
        if self._warn is not None:
            who = f"pid {pid} on {host}" if pid is not None else "an unreadable owner"
            self._warn(f"warning: took over the stale lock {self.path} of {who} (no longer "
                       "running)")

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            owner = json.loads(path.read_text(encoding="utf-8"))
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        """Give the lock back (the file is removed when the outermost holder releases)."""
        if not self._owned:
            return
        self._owned = False
        depth = RunLock._held.get(self.path, 0) - 1
        if depth > 0:
            RunLock._held[self.path] = depth
            return
        RunLock._held.pop(self.path, None)
        if self._read(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
