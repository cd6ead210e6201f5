"""Audit logs (the coordinator's, and each site's own): append-only JSONL, each line chained to the previous.

Every line carries ``prev`` = sha256 of the previous line's bytes, so deleting or editing a line
breaks the chain from there on (:func:`verify_chain`). Lines are fsynced as they are written, under
an exclusive lock, so writers in several processes extend one chain (owner-only file, 0600).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, **fields: Any) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "r+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # another writer may have appended since we opened
            lines = handle.read().splitlines()
            prev = hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS
            entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event,
                     **fields, "prev": prev}
            handle.write(json.dumps(entry, sort_keys=True, default=str).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())


def verified_entries(path: Path) -> list[dict[str, Any]]:
    """The entries, if every line links to the one before; ValueError naming the first broken line."""
    prev, entries = GENESIS, []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or entry.get("prev") != prev:
            raise ValueError(f"{path}, line {number}: the audit chain is broken (a line was edited or removed)")
        entries.append(entry)
        prev = hashlib.sha256(line).hexdigest()
    return entries


def verify_chain(path: Path) -> int:
    """Number of entries, if every line links to the one before; ValueError naming the first broken line."""
    return len(verified_entries(path))
