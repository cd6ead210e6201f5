"""A site's side of secure aggregation, stage by stage, with its session kept on the site's disk.

Flower may run each message in a fresh process, so the session (private round keys, held
shares, the pending masked contribution) is saved after every stage in the site's state dir,
owner-only (0600), and never sent. A stage that arrives out of order, twice, or for parameters
other than the ones the site agreed to at stage 1 is refused (ProtocolError).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import RunSettings
from common.files import write_private
from common.registry import FederationRegistry
from common.secagg import ClientSession, ProtocolError, SecAggParams, SiteIdentity, UnmaskRequest
from common.secure_update import Contribution, encode_contribution, params_from_bytes, params_to_bytes, round_params

SESSIONS_DIR = "secagg-sessions"


@dataclass(frozen=True)
class SiteKeys:
    site_id: int
    identity: SiteIdentity
    registry: FederationRegistry


class SessionStore:
    """One file per round under the site's state dir; only the latest few rounds are kept."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / SESSIONS_DIR

    def _path(self, round_id: bytes) -> Path:
        return self.directory / f"{round_id.hex()}.json"

    def save(self, session: ClientSession, values: np.ndarray | None = None, counts: list[int] | None = None,
             previous: dict | None = None) -> None:
        record = dict(previous or {})
        record["params"] = params_to_bytes(session.params).decode()
        record["session"] = session.export_state().decode()
        if values is not None:
            record["values"] = base64.b64encode(values.astype(np.float64).tobytes()).decode()
            record["counts"] = counts
        write_private(self._path(session.params.round_id), json.dumps(record).encode())

    def load(self, round_id: bytes, keys: SiteKeys) -> tuple[ClientSession, dict]:
        path = self._path(round_id)
        if not path.exists():
            raise ProtocolError(f"no secure-aggregation session for round {round_id!r}: stage 1 never ran here")
        record = json.loads(path.read_text())
        params = params_from_bytes(record["params"].encode())
        session = ClientSession.from_state(params, keys.identity, keys.registry.keys, record["session"].encode())
        return session, record

    def prune(self, keep: int = 3) -> None:
        files = sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for stale in files[:-keep]:
            stale.unlink(missing_ok=True)


def accept_params(raw: bytes, settings: RunSettings, keys: SiteKeys, *, run_id: int, server_round: int,
                  vector_length: int, num_labels: int) -> SecAggParams:
    """The round's parameters, only if they are exactly what this site's own config implies."""
    offered = params_from_bytes(raw)
    if keys.site_id not in offered.site_ids:
        raise ProtocolError(f"site {keys.site_id} is not among the round's sites {offered.site_ids}")
    unknown = [s for s in offered.site_ids if s not in keys.registry.keys]
    if unknown:
        raise ProtocolError(f"the round invites sites {unknown} that are not in the federation's registry")
    if len(offered.site_ids) < max(2, settings.federation.min_sites):
        raise ProtocolError(f"the round invites {len(offered.site_ids)} sites, fewer than min-sites="
                            f"{settings.federation.min_sites}: the sum would expose too few sites")
    expected = round_params(settings.secagg, run_id=run_id, server_round=server_round,
                            site_ids=list(offered.site_ids), vector_length=vector_length, num_labels=num_labels)
    if offered != expected:
        raise ProtocolError("the round's secure-aggregation parameters differ from this site's configuration "
                            f"(offered {params_to_bytes(offered)!r}, expected {params_to_bytes(expected)!r})")
    return expected


def stage_advertise(store: SessionStore, params: SecAggParams, keys: SiteKeys, contribution: Contribution,
                    settings: RunSettings) -> bytes:
    """Stage 1 (after local training): sign fresh round keys; keep the contribution for stage 3."""
    session = ClientSession(params, keys.site_id, keys.identity, keys.registry.keys)
    bundle = session.advertise_keys().to_bytes()
    values, counts, _ = encode_contribution(contribution, settings.secagg)
    store.prune()
    store.save(session, values, counts)
    return bundle


@contextmanager
def _stage(store: SessionStore, round_id: bytes, keys: SiteKeys) -> Iterator[tuple[ClientSession, dict]]:
    """Load the session; save it afterwards, also when the stage fails (an aborted session stays aborted)."""
    session, record = store.load(round_id, keys)
    try:
        yield session, record
    finally:
        store.save(session, previous=record)


def stage_share(store: SessionStore, round_id: bytes, keys: SiteKeys, bundles: dict[str, bytes]) -> dict[str, bytes]:
    with _stage(store, round_id, keys) as (session, _):
        ciphertexts = session.share_keys({int(site): bundle for site, bundle in bundles.items()})
    return {str(receiver): ct for receiver, ct in ciphertexts.items()}


def stage_mask(store: SessionStore, round_id: bytes, keys: SiteKeys, inbox: dict[str, bytes]) -> bytes:
    with _stage(store, round_id, keys) as (session, record):
        if "values" not in record:
            raise ProtocolError("no pending contribution for this round (already uploaded?)")
        values = np.frombuffer(base64.b64decode(record.pop("values")), dtype=np.float64)
        counts = record.pop("counts")  # the unmasked contribution never outlives this stage
        return session.masked_input({int(site): ct for site, ct in inbox.items()}, values, counts)


def stage_unmask(store: SessionStore, round_id: bytes, keys: SiteKeys, request: bytes) -> bytes:
    with _stage(store, round_id, keys) as (session, _):
        return session.unmask(UnmaskRequest.from_bytes(request)).to_bytes()
