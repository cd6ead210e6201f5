"""What leaves the site, sealed: the DP update released for one (round, received adapter).

A round is released at most once. When the coordinator asks again for a round the site has
already released (the coordinator crashed and resumed, a message was retried), the site resends
the sealed update instead of training again: the same DP output costs no new ε, and a resumed
run ends with exactly the ε it would have spent without the crash.

Under secure aggregation a resent update must not let the server subtract one sum from another:
the server can sum a site's masked upload without that site's help (its holders reveal its seed),
so once a sealed update's masked upload has left the site it is never resent; the site trains
afresh (a new DP release, charged). Sealed updates live on the site's disk, owner-only and
durable; only the newest few are kept.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np

from common.adapter import AdapterState
from common.files import write_durably

log = logging.getLogger("fedtune.client")
RELEASES_DIR = "released"
KEEP = 4


def adapter_digest(state: AdapterState) -> str:
    """sha256 over the received adapter's keys, dtypes, shapes and bytes, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = np.ascontiguousarray(state[key], dtype=np.float32)
        digest.update(f"{key}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


class ReleasedUpdates:
    """Per released round: ``<name>.npy`` (the update) and, once its masked upload left the site,
    ``<name>.uploaded``; named by the round and the adapter it answered."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / RELEASES_DIR

    @staticmethod
    def name(server_round: int, received: str) -> str:
        return f"round-{server_round:06d}-{received[:32]}"

    def find(self, server_round: int, received: str) -> np.ndarray | None:
        """The sealed update to resend, or None: never released, unreadable, or already in a secure sum."""
        name = self.name(server_round, received)
        path = self.directory / f"{name}.npy"
        if not path.exists() or (self.directory / f"{name}.uploaded").exists():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # unreadable: treat as never released, so train (and charge) again
            log.warning("sealed update %s is unreadable; the round will be trained again", path)
            return None

    def seal(self, server_round: int, received: str, update: np.ndarray) -> str:
        """Store the update durably before it leaves; returns the release's name."""
        name = self.name(server_round, received)
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(update, dtype=np.float32), allow_pickle=False)
        (self.directory / f"{name}.uploaded").unlink(missing_ok=True)
        write_durably(self.directory / f"{name}.npy", buffer.getvalue())
        for stale in sorted(self.directory.glob("round-*.npy"), key=lambda p: p.stat().st_mtime)[:-KEEP]:
            stale.unlink(missing_ok=True)
            stale.with_suffix(".uploaded").unlink(missing_ok=True)
        return name

    def mark_uploaded(self, name: str) -> None:
        """Durably, before the masked upload built from release ``name`` leaves the site."""
        write_durably(self.directory / f"{name}.uploaded", b"")
