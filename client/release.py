"""What leaves the site, sealed: the DP update released for one (round, received adapter).

A round is released at most once. When the coordinator asks again for a round the site has
already released (the coordinator crashed and resumed, a message was retried), the site resends
the sealed update instead of training again: the same DP output costs no new ε, and a resumed
run ends with exactly the ε it would have spent without the crash. Sealed updates live on the
site's disk, owner-only; only the newest few are kept.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np

from common.adapter import AdapterState
from common.files import write_private

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
    """One file per released round, named by the round and the adapter it answered."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / RELEASES_DIR

    def _path(self, server_round: int, received: str) -> Path:
        return self.directory / f"round-{server_round:06d}-{received[:32]}.npy"

    def find(self, server_round: int, received: str) -> np.ndarray | None:
        path = self._path(server_round, received)
        try:
            return np.load(path, allow_pickle=False) if path.exists() else None
        except (OSError, ValueError):  # cut short by a crash: not released, so train (and charge) again
            log.warning("sealed update %s is unreadable; the round will be trained again", path)
            return None

    def seal(self, server_round: int, received: str, update: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(update, dtype=np.float32), allow_pickle=False)
        write_private(self._path(server_round, received), buffer.getvalue())
        for stale in sorted(self.directory.glob("round-*.npy"), key=lambda p: p.stat().st_mtime)[:-KEEP]:
            stale.unlink(missing_ok=True)
