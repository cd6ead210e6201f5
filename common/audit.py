"""Audit logs (the coordinator's, and each site's own): append-only JSONL, each line chained to the previous.

Every line carries ``prev`` = sha256 of the previous line's bytes, so deleting or editing a line
breaks the chain from there on (:func:`verify_chain`). Lines are fsynced as they are written.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = path.read_bytes().splitlines() if path.exists() else []
        self._prev = hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS

    def record(self, event: str, **fields: Any) -> None:
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event,
                 **fields, "prev": self._prev}
        line = json.dumps(entry, sort_keys=True, default=str).encode()
        with open(self.path, "ab") as handle:
            handle.write(line + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._prev = hashlib.sha256(line).hexdigest()


def verify_chain(path: Path) -> int:
    """Number of entries, if every line links to the one before; ValueError naming the first broken line."""
    prev = GENESIS
    lines = path.read_bytes().splitlines()
    for number, line in enumerate(lines, start=1):
        if json.loads(line).get("prev") != prev:
            raise ValueError(f"{path}, line {number}: the audit chain is broken (a line was edited or removed)")
        prev = hashlib.sha256(line).hexdigest()
    return len(lines)
