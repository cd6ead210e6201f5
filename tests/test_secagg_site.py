"""A site owns its safety parameters: accept_params checks the coordinator's offer against the
site's OWN policy, refuses replayed rounds, and sparse graphs are not the coordinator's choice."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest

from client.policy import SitePolicy
from client.secure import ParamsRefused, SessionStore, SiteKeys, accept_params
from common.config import SecureAggSettings
from common.registry import FederationRegistry
from common.secagg import (
    ClientSession,
    LocalFederation,
    ProtocolError,
    SecAggParams,
    SiteIdentity,
    SiteRegistry,
    default_degree,
    neighbour_graph,
)
from common.secure_update import COUNT_SLOTS, params_to_bytes, round_params

LENGTH = 16


@functools.cache
def _federation(n: int) -> tuple[dict[int, SiteIdentity], FederationRegistry]:
    """n sites' identities and the member list every one of them pinned."""
    identities = {i: SiteIdentity.generate() for i in range(n)}
    return identities, FederationRegistry({f"site-{i}": i for i in range(n)},
                                          SiteRegistry({i: ident.public_bytes() for i, ident in identities.items()}))


def _keys(n: int, me: int = 0) -> SiteKeys:
    identities, members = _federation(n)
    return SiteKeys(me, identities[me], members)


def _offer(n: int, settings: SecureAggSettings | None = None, server_round: int = 3, **changes) -> bytes:
    params = round_params(settings or SecureAggSettings(registry="x"), run_id=7, server_round=server_round,
                          site_ids=list(range(n)), vector_length=LENGTH, members_digest=_federation(n)[1].digest)
    if changes:
        fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}
        params = SecAggParams(**{**fields, **changes})
    return params_to_bytes(params)


def _accept(raw: object, tmp_path: Path, n: int = 10, policy: SitePolicy | None = None, server_round: int = 3,
            keys: SiteKeys | None = None) -> SecAggParams:
    return accept_params(raw, policy or SitePolicy(), keys or _keys(n), store=SessionStore(tmp_path), run_id=7,
                         server_round=server_round, vector_length=LENGTH)


def test_default_offer_is_all_pairs_up_to_64_sites_and_accepted(tmp_path: Path) -> None:
    for n in (3, 10, 64):
        params = _accept(_offer(n), tmp_path / str(n), n)
        assert params.all_pairs and params.degree == n - 1 and params.count_slots == COUNT_SLOTS
    # A run config tuned for sparse graphs does not weaken small rounds.
    sparse = SecureAggSettings(registry="x", degree=4, threshold=3)
    assert _accept(_offer(10, sparse), tmp_path / "s", 10).all_pairs
    big = round_params(sparse, run_id=1, server_round=1, site_ids=list(range(100)), vector_length=LENGTH,
                       members_digest=bytes(32))
    assert not big.all_pairs and big.degree == 4  # the config keys still work above 64 sites


@pytest.mark.parametrize(("why", "offer", "match"), [
    ("too few sites", lambda: _offer(2), "fewer than this site's min-sites"),
    ("sparse below all-pairs-up-to", lambda: _offer(10, degree=4, threshold=4, all_pairs=False),
     "every pair must mask"),
    ("low threshold", lambda: _offer(10, threshold=6), "at most 2/3"),
    ("other round id", lambda: _offer(10, round_id=b"fedtune/run-7/round-4"), "round id"),
    ("other vector length", lambda: _offer(10, vector_length=LENGTH + 1), "vector of"),
    ("other count slots", lambda: _offer(10, count_slots=5), "vector of"),
    ("not bytes", lambda: 12345, "not bytes"),
    ("malformed", lambda: b'{"round_id": 5}', "malformed"),
    ("wrong types", lambda: _offer(10).replace(b'"vector_length": 16', b'"vector_length": 16.5'), "malformed"),
])
def test_offers_below_the_site_policy_are_refused(tmp_path: Path, why: str, offer, match: str) -> None:
    with pytest.raises(ParamsRefused, match=match):
        _accept(offer(), tmp_path, 10)
    assert issubclass(ParamsRefused, ProtocolError)


def test_sites_outside_the_round_or_registry_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ParamsRefused, match="not among the round's sites"):
        _accept(_offer(10), tmp_path, keys=_keys(20, me=15))
    with pytest.raises(ParamsRefused, match="not among the members this site pinned"):
        _accept(_offer(12), tmp_path, keys=_keys(10))


def test_large_rounds_need_the_site_minimum_degree(tmp_path: Path) -> None:
    n = 100
    ok = _offer(n, SecureAggSettings(registry="x"))
    assert _accept(ok, tmp_path / "a", n).degree == default_degree(n)
    with pytest.raises(ParamsRefused, match="degree 8 is below"):
        _accept(_offer(n, SecureAggSettings(registry="x", degree=8)), tmp_path / "b", n)
    with pytest.raises(ParamsRefused, match="below this site's minimum 30"):
        _accept(ok, tmp_path / "c", n, policy=SitePolicy(min_degree=30))
    with pytest.raises(ParamsRefused, match="every pair must mask"):
        _accept(ok, tmp_path / "d", n, policy=SitePolicy(all_pairs_up_to=128))


def test_round_numbers_strictly_increase_per_run(tmp_path: Path) -> None:
    keys = _keys(10)
    _accept(_offer(10, server_round=3), tmp_path, keys=keys, server_round=3)
    for again in (3, 2):
        with pytest.raises(ParamsRefused, match="replayed round"):
            _accept(_offer(10, server_round=again), tmp_path, keys=keys, server_round=again)
    _accept(_offer(10, server_round=4), tmp_path, keys=keys, server_round=4)


def test_sparse_graph_is_seeded_by_every_bundle_not_the_round_id() -> None:
    # Before: the graph was a function of the server-chosen round id, so 5 colluders of 20 found an
    # id surrounding a victim in 73 tries. Now the same round id gives a fresh graph each time
    # (the seed hashes every site's fresh, signed bundle), and server and sites agree on it.
    params = SecAggParams(round_id=b"fixed", site_ids=tuple(range(20)), vector_length=4)
    assert not params.all_pairs
    graphs = []
    for _ in range(2):
        fed = LocalFederation.create(params)
        fed.share(fed.advertise())
        assert all(fed.clients[s].neighbours == fed.server.neighbours(s) for s in params.site_ids)
        graphs.append({s: fed.server.neighbours(s) for s in params.site_ids})
    assert graphs[0] != graphs[1]
    assert graphs[0] != neighbour_graph(params.site_ids, params.degree, params.round_id)


def test_bundle_signed_over_other_parameters_is_dropped() -> None:
    params = SecAggParams(round_id=b"r", site_ids=tuple(range(6)), vector_length=4)
    other = SecAggParams(round_id=b"r", site_ids=tuple(range(6)), vector_length=4, clip=2.0)
    identities = {s: SiteIdentity.generate() for s in params.site_ids}
    fed = LocalFederation.create(params, identities)
    fed.clients[5] = ClientSession(other, 5, identities[5], fed.registry)  # shown other parameters
    updates = {s: np.full(4, 0.1) for s in params.site_ids}
    result = fed.run(updates)
    assert 5 in result.dropped and "other round parameters" in fed.server.dropped_reasons[5]


def test_an_answered_session_file_holds_no_secret(tmp_path: Path) -> None:
    # Issue 19, finding 9 (its last part): the other sites' key shares used to stay in the session file
    # after unmask (for a possible expose stage) until the site's next round. Unmask now wipes them all.
    params = SecAggParams(round_id=b"r", site_ids=tuple(range(5)), vector_length=4)
    identities = {s: SiteIdentity.generate() for s in params.site_ids}
    fed = LocalFederation.create(params, identities)
    fed.run({s: np.full(4, 0.1) for s in params.site_ids})
    registry = FederationRegistry({f"site-{i}": i for i in range(5)}, fed.registry)
    keys, store = SiteKeys(0, identities[0], registry), SessionStore(tmp_path)
    store.save(fed.clients[0])
    session = store.load(b"r", keys)[0]
    assert session.stage.name == "DONE" and not session.holds_secrets
