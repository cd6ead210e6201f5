"""What leaves the site, sealed: the DP update released for one (round, received adapter).

A round is released at most once. When the coordinator asks again for a round the site has
already released (the coordinator crashed and resumed, a message was retried), the site resends
the sealed update instead of training again: the same DP output costs no new ε, and a resumed
run ends with exactly the ε it would have spent without the crash.

Under secure aggregation a resent update must not let the server subtract one sum from another:
the server can sum a site's masked upload without that site's help (its holders reveal its seed),
so once a sealed update's masked upload has left the site it is never resent; the site trains
afresh (a new DP release, charged), and the update itself is deleted from the site's disk. Sealed
updates live on the site's disk, owner-only and durable; only the newest few are kept.

Every release also leaves a small record (its run, round and the ε after its charge), kept after
the update is gone: evidence of what the site spent that a rolled-back ledger cannot account for
(client/rollback.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.adapter import AdapterState
from common.files import private_dir, write_durably

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


@dataclass(frozen=True)
class ReleaseRecord:
    """What stays of a release: the run and round it was trained (and charged) for, and the ε after the charge
    (None without DP)."""

    name: str
    run_id: int | None
    round: int
    epsilon: float | None


class ReleasedUpdates:
    """Per released round: ``<name>.json`` (its record), ``<name>.npy`` (the update) until its masked upload left
    the site, then ``<name>.uploaded`` instead; named by the round and the adapter it answered."""

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

    def seal(self, server_round: int, received: str, update: np.ndarray, *, run_id: int | None = None,
             epsilon: float | None = None) -> str:
        """Store the update and its record durably before it leaves; returns the release's name."""
        name = self.name(server_round, received)
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(update, dtype=np.float32), allow_pickle=False)
        private_dir(self.directory)
        (self.directory / f"{name}.uploaded").unlink(missing_ok=True)
        write_durably(self.directory / f"{name}.json",
                      json.dumps({"run_id": run_id, "round": server_round, "epsilon": epsilon}).encode())
        write_durably(self.directory / f"{name}.npy", buffer.getvalue())
        for stale in sorted(self.directory.glob("round-*.npy"), key=lambda p: p.stat().st_mtime)[:-KEEP]:
            stale.unlink(missing_ok=True)
            stale.with_suffix(".uploaded").unlink(missing_ok=True)
        return name

    def mark_uploaded(self, name: str) -> None:
        """Durably, before the masked upload built from release ``name`` leaves the site; the update itself is
        deleted (it is never resent), its record stays."""
        write_durably(self.directory / f"{name}.uploaded", b"")
        (self.directory / f"{name}.npy").unlink(missing_ok=True)

    def records(self) -> list[ReleaseRecord]:
        """Every release's record (an unreadable one is skipped, and logged)."""
        found = []
        for path in sorted(self.directory.glob("round-*.json")):
            try:
                saved = json.loads(path.read_text())
                found.append(ReleaseRecord(path.stem, saved["run_id"], int(saved["round"]), saved["epsilon"]))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("release record %s is unreadable", path)
        return found
