"""Writing files safely: atomic JSON, owner-only secrets, checksums, locks. No torch here (light to import)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("fedtune.files")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (the directory entry itself is fsynced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: Path, target: Path) -> None:
    """``os.replace``, then fsync the directory so the rename survives a power loss."""
    os.replace(source, target)
    fsync_dir(target.parent)


def write_json(path: Path, payload: Any, *, mode: int = 0o600) -> None:
    """Atomic and durable: a reader never sees half a file, a crash never leaves one, and the rename is
    fsynced. Owner-only unless ``mode`` says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True, default=str, ensure_ascii=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        replace_durably(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_durably(path: Path, data: bytes) -> None:
    """Owner-only (0600, in a 0700 directory), atomic and fsynced, file and directory, before returning."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        replace_durably(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _owner_only(fd: int, path: Path, mode: int) -> None:
    """Force ``mode`` on an open file or directory, saying so when an existing one was wider."""
    was = stat.S_IMODE(os.fstat(fd).st_mode)
    if was != mode:
        os.fchmod(fd, mode)
        if was & 0o077:
            log.warning("%s was mode %04o, readable by others than its owner: now %04o", path, was, mode)


def write_private(path: Path, data: bytes) -> None:
    """A secret file, readable by its owner only (0600) from the moment it exists; an existing file of a wider
    mode is forced to 0600 before it is written (and logged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    _owner_only(fd, path, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (0700), created if missing; an existing one of a wider
    mode is forced to 0700 (and logged)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _owner_only(fd, path, 0o700)
    finally:
        os.close(fd)
    return path


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (an owner-only lock file): across processes and threads,
    since every call opens its own file description. Released on exit, or by the kernel if the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def default_receipts_dir(state_dir: Path) -> Path:
    """Beside the state directory, never inside it: a backup of the state does not carry it."""
    state_dir = state_dir.resolve()
    return state_dir.parent / f"{state_dir.name}.receipts"
