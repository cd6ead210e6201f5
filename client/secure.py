"""A site's side of secure aggregation, stage by stage, with its session kept on the site's disk.

    train               accept_params (own policy) → train → stage_advertise: signed round keys
    train.secagg_share    stage_share:   neighbours' signed keys   → commitments, encrypted signed shares
    train.secagg_mask     stage_mask:    shares addressed to us    → masked contribution (+ proofs
                                         against dealers whose shares are off their commitments)
    train.secagg_confirm  stage_confirm: the survivor set S        → our signature on S
    train.secagg_unmask   stage_unmask:  S + t signatures on S     → shares for survivors XOR dropped

Flower may run each message in a fresh process, so the session (private round keys, dealing key,
held shares, the pending contribution) is saved after every stage in the site's state dir,
owner-only (0600), durably (fsync), and never sent. Every round secret, the other sites' shares
included, is wiped from that file when unmask is answered (or at any refusal). The "answered" state
is on disk before the reply leaves, so a crash-restart cannot answer twice; a session restored from
an older copy deals the same shares again (deterministic dealing, common.secagg.vss). A stage out of order,
twice, or for parameters other than the ones the site accepted at stage 1 is refused (ProtocolError).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.policy import SitePolicy
from client.release import ReleasedUpdates
from common.config import SecureAggSettings
from common.files import exclusive_lock, private_dir, write_durably
from common.registry import FederationRegistry
from common.secagg import (
    ClientSession,
    ParameterError,
    ProtocolError,
    SecAggParams,
    SiteIdentity,
    Stage,
    SurvivorSet,
    choose_modulus_bits,
    default_degree,
    default_threshold,
)
from common.secure_update import COUNT_SLOTS, encode_contribution, params_from_bytes, params_to_bytes, secure_round_id

log = logging.getLogger("fedtune.client")
SESSIONS_DIR = "secagg-sessions"
ROUNDS_FILE = "last-rounds.json"
_SITE_KEY = re.compile(r"[0-9]{1,10}")


class ParamsRefused(ProtocolError):
    """The coordinator's round parameters break this site's own policy (or replay a round)."""


@dataclass(frozen=True)
class SiteKeys:
    site_id: int
    identity: SiteIdentity
    registry: FederationRegistry
    """The member list this site pinned itself (common.registry.load_members), never the kit's registry:
    peers' keys are verified, and sites counted, only against it."""


class SessionStore:
    """One file per round under the site's state dir (only the latest few kept), and the last
    round number accepted per run."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / SESSIONS_DIR

    def _path(self, round_id: bytes) -> Path:
        return self.directory / f"{round_id.hex()}.json"

    def save(self, session: ClientSession, record: dict | None = None) -> None:
        """Persist the session (and the pending contribution while the round needs it)."""
        record = dict(record or {})
        if session.stage in (Stage.DONE, Stage.ABORTED):
            for pending in ("values", "ring", "counts"):  # the raw contribution never outlives the round
                record.pop(pending, None)
        record["params"] = params_to_bytes(session.params).decode()
        record["session"] = session.export_state().decode()
        write_durably(self._path(session.params.round_id), json.dumps(record).encode())

    def locked(self, round_id: bytes) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock on one round's session, across processes (Flower may run a process per message)."""
        private_dir(self.directory)
        return exclusive_lock(self.directory / f".{round_id.hex()}.lock")

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
            (self.directory / f".{stale.stem}.lock").unlink(missing_ok=True)

    def claim_round(self, run_id: int, server_round: int) -> None:
        """Record ``server_round`` as this run's latest; refuse one that is not strictly later."""
        private_dir(self.directory)
        path = self.directory.parent / ROUNDS_FILE
        with exclusive_lock(self.directory.parent / f".{ROUNDS_FILE}.lock"):
            last = json.loads(path.read_text()) if path.exists() else {}
            previous = last.get(str(run_id))
            if previous is not None and server_round <= previous:
                raise ParamsRefused(f"round {server_round} of run {run_id} is not after round {previous}, "
                                    "which this site already took part in (replayed round)")
            last[str(run_id)] = server_round
            write_durably(path, json.dumps(last).encode())


def accept_params(raw: object, policy: SitePolicy, keys: SiteKeys, *, store: SessionStore, run_id: int,
                  server_round: int, vector_length: int, count_slots: int = COUNT_SLOTS,
                  ring_bits: int = 0, noise_plan: bytes = b"") -> SecAggParams:
    """The round's parameters, only if they meet THIS site's policy (never the coordinator's run config).

    Checked: this site and only members it pinned are invited, at least ``policy.min_sites`` of them, and the round
    binds the digest of the pinned member list (so min-sites, the threshold and the graph count only pinned members,
    and sites pinned to different lists never share a round); the round id is
    ``fedtune/run-{run_id}/round-{server_round}`` (in distributed DP mode followed by the digest of the noise plan
    this site computed, ``noise_plan``: common.secure_update.secure_round_id) and the round is strictly later than
    any this site took part in for the run; vector length and count slots (the run's evaluation counts, if any)
    match; the ring (distributed DP: ``ring_bits``, the site's own plan's) is the one the site computed, else the
    modulus holds the sum; up to ``policy.all_pairs_up_to`` sites every pair masks, above it the degree is at least
    ``max(policy.min_degree, 2·ceil(log2 n))``; the threshold exceeds 2h/3 of h holders.
    Raises :class:`ParamsRefused` (a ProtocolError) with the reason.
    """
    if not isinstance(raw, bytes):
        raise ParamsRefused("the round's secure-aggregation parameters are missing or not bytes")
    try:
        offered = params_from_bytes(raw)
    except ParameterError as exc:
        raise ParamsRefused(str(exc)) from exc
    n, ids = offered.n_sites, offered.site_ids
    problems = []
    if keys.site_id not in ids:
        problems.append(f"site {keys.site_id} is not among the round's sites")
    if unknown := [s for s in ids if s not in keys.registry.keys]:
        problems.append(f"the round invites sites {unknown[:10]} that are not among the members this site pinned")
    if offered.members_digest != keys.registry.digest:
        problems.append(f"the round binds member list {offered.members_digest.hex()[:16]}…, not the one this site "
                        f"pinned ({keys.registry.digest.hex()[:16]}…)")
    if n < policy.min_sites:
        problems.append(f"the round invites {n} sites, fewer than this site's min-sites={policy.min_sites}")
    if offered.round_id != secure_round_id(run_id, server_round, noise_plan):
        problems.append(f"round id {offered.round_id!r} is not run {run_id}, round {server_round}"
                        + (" with the noise plan this site computed" if noise_plan else ""))
    if offered.vector_length != vector_length or offered.count_slots != count_slots:
        problems.append(f"vector of {offered.vector_length}+{offered.count_slots}, expected "
                        f"{vector_length}+{count_slots}")
    counts_max = offered.max_count if offered.count_slots else 0
    if offered.ring_bits != ring_bits:
        problems.append(f"a ring of {offered.ring_bits} bits, expected {ring_bits} (0: fixed point)")
    elif not ring_bits and offered.modulus_bits < choose_modulus_bits(n, offered.value_bits, counts_max):
        problems.append("the modulus is too small for the sum")  # SecAggParams checks it too
    if n <= policy.all_pairs_up_to:
        if not offered.all_pairs:
            problems.append(f"{n} sites <= all-pairs-up-to={policy.all_pairs_up_to}: every pair must mask")
    elif offered.degree < max(policy.min_degree, default_degree(n)):
        problems.append(f"degree {offered.degree} is below this site's minimum "
                        f"{max(policy.min_degree, default_degree(n))} for {n} sites")
    if offered.threshold < default_threshold(offered.degree + 1):
        problems.append(f"threshold {offered.threshold} is at most 2/3 of {offered.degree + 1} share holders")
    if problems:
        raise ParamsRefused("secure-aggregation parameters refused: " + "; ".join(problems))
    store.claim_round(run_id, server_round)
    return offered


def stage_advertise(store: SessionStore, params: SecAggParams, keys: SiteKeys, delta: np.ndarray, weight: int,
                    settings: SecureAggSettings, *, release: str, counts: Sequence[int] = ()) -> bytes:
    """Stage 1 (after local training): encode the contribution (``encode_contribution``: the weighted,
    clipped update), sign fresh round keys, and keep the encoded contribution for stage 3 (with the
    name of the sealed release it came from, marked uploaded when the masked input leaves). ``counts``: the
    round's noisy evaluation counts (common.federated_eval.release), summed in the count slots."""
    values, clipped = encode_contribution(np.asarray(delta), weight, settings)
    if clipped:
        log.warning("the update's L2 norm exceeded secagg.clip=%g: it was scaled down", settings.clip)
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (params.vector_length,) or len(counts) != params.count_slots:
        raise ProtocolError("the contribution does not have the round's vector length or count slots")
    return _advertise(store, params, keys, {"values": base64.b64encode(values.tobytes()).decode(),
                                             "counts": [int(c) for c in counts], "release": release})


def stage_advertise_ring(store: SessionStore, params: SecAggParams, keys: SiteKeys, ring: np.ndarray, *,
                         min_survivors: int) -> bytes:
    """Stage 1 of a ring-mode round (distributed DP): ``ring`` is the site's upload, integers mod 2^b already
    (client.distributed_step), kept for stage 3 as it is. Nothing is resent in this mode (the site draws a fresh
    step and charges it every round), so there is no sealed release to mark. ``min_survivors``: the honest sites the
    site assumes; it signs no survivor set smaller (stage 4), so its share is never unmasked in a sum with less noise
    than it planned for unless the round's threshold of sites signs without it."""
    if not params.ring_bits or ring.dtype != np.uint64 or ring.shape != (params.vector_length,):
        raise ProtocolError("the contribution is not the round's ring vector")
    return _advertise(store, params, keys, {"ring": base64.b64encode(ring.tobytes()).decode(), "counts": [],
                                            "min_survivors": min_survivors})


def _advertise(store: SessionStore, params: SecAggParams, keys: SiteKeys, pending: dict) -> bytes:
    """Sign fresh round keys and keep the pending contribution for stage 3."""
    session = ClientSession(params, keys.site_id, keys.identity, keys.registry.keys)
    bundle = session.advertise_keys().to_bytes()
    store.prune()
    store.save(session, pending)
    return bundle


@contextmanager
def _stage(store: SessionStore, round_id: bytes, keys: SiteKeys) -> Iterator[tuple[ClientSession, dict]]:
    """Load the session; save it durably afterwards, also when the stage fails (an aborted session
    stays aborted, its secrets wiped)."""
    with store.locked(round_id):  # two messages for one stage never run at once (no second deal)
        session, record = store.load(round_id, keys)
        try:
            yield session, record
        finally:
            store.save(session, record)


def _by_site(blobs: Mapping[str, bytes]) -> dict[int, bytes]:
    """Blobs keyed by decimal site id; anything else is a protocol error."""
    out = {}
    for key, blob in blobs.items():
        if not isinstance(key, str) or not _SITE_KEY.fullmatch(key) or not isinstance(blob, bytes):
            raise ProtocolError(f"stage message has a malformed entry {key!r}")
        out[int(key)] = blob
    return out


def _payload(blobs: Mapping[str, bytes] | bytes) -> bytes:
    payload = blobs if isinstance(blobs, bytes) else blobs.get("payload")
    if not isinstance(payload, bytes):
        raise ProtocolError("stage message lacks its payload")
    return payload


def stage_share(store: SessionStore, round_id: bytes, keys: SiteKeys, blobs: Mapping[str, bytes]) -> bytes:
    """Stage 2: bundles by site id → the deal (commitments, encrypted shares by receiver id)."""
    bundles = _by_site(blobs)
    with _stage(store, round_id, keys) as (session, _):
        return session.share_keys(bundles).to_bytes()


def stage_mask(store: SessionStore, round_id: bytes, keys: SiteKeys, blobs: Mapping[str, bytes]) -> bytes:
    """Stage 3: ciphertext and commitments by sender id → the masked contribution (the raw one is then deleted)."""
    inbox = _by_site(blobs)
    with _stage(store, round_id, keys) as (session, record):
        if "ring" in record:
            values = np.frombuffer(base64.b64decode(record.pop("ring")), dtype=np.uint64)
        elif "values" in record:
            values = np.frombuffer(base64.b64decode(record.pop("values")), dtype=np.float64)
            if not math.isfinite(float(np.sum(np.abs(values)))):
                raise ProtocolError("the stored contribution is not finite")
        else:
            raise ProtocolError("no pending contribution for this round (already uploaded?)")
        upload = session.masked_input(inbox, values, record.pop("counts"))
        if release := record.get("release"):  # from here the server can sum this update: never resend it
            ReleasedUpdates(store.directory.parent).mark_uploaded(release)
        return upload


def stage_confirm(store: SessionStore, round_id: bytes, keys: SiteKeys, blobs: Mapping[str, bytes]) -> bytes:
    """Stage 4 (consistency round): ``payload`` = the survivor set → this site's signature on it."""
    survivors = _payload(blobs)
    with _stage(store, round_id, keys) as (session, record):
        if (least := record.get("min_survivors")) and len(SurvivorSet.from_bytes(survivors).survivors) < least:
            raise ParamsRefused(f"the survivor set has fewer sites than the {least} honest ones this site assumes "
                                "(min-honest-sites): their noise would not reach the target")
        return session.confirm_survivors(survivors)


def stage_unmask(store: SessionStore, round_id: bytes, keys: SiteKeys, blobs: Mapping[str, bytes] | bytes) -> bytes:
    """Stage 5: ``payload`` = the unmask request → the shares this site reveals. The session file
    (every secret wiped, the other sites' shares too; stage DONE) is fsynced before the answer is returned."""
    request = _payload(blobs)
    with _stage(store, round_id, keys) as (session, _):
        return session.unmask(request).to_bytes()

