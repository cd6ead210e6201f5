"""A site's secure-aggregation stages on its own disk, tried as a coordinator would attack them:
two copies of one stage at once must not deal twice, and an update that entered a secure sum is
never resent into another one (the server could subtract the sums)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from client.policy import SitePolicy
from client.release import ReleasedUpdates
from client.secure import SessionStore, SiteKeys, accept_params, stage_advertise, stage_mask, stage_share
from common.config import SecureAggSettings
from common.registry import create_site_identities, load_identity, load_registry
from common.secagg import ClientSession, Deal, ProtocolError, ServerAggregator
from common.secagg.identity import decrypt_from_peer
from common.secure_update import params_to_bytes, round_params

LENGTH = 8


@pytest.fixture()
def round_of_three(tmp_path: Path):
    """Three sites that advertised keys for one round, their stores, and the server's routed bundles."""
    names = [f"site-{i}" for i in range(3)]
    create_site_identities(names, {n: tmp_path / n for n in names}, tmp_path / "registry.json")
    registry = load_registry(tmp_path / "registry.json")
    settings = SecureAggSettings(registry=str(tmp_path / "registry.json"))
    params = round_params(settings, run_id=1, server_round=1, site_ids=[0, 1, 2], vector_length=LENGTH,
                          members_digest=registry.digest)
    sites = {}
    bundles = {}
    for i, name in enumerate(names):
        keys = SiteKeys(*load_identity(tmp_path / name, name, registry), registry)
        store = SessionStore(tmp_path / name)
        accept_params(params_to_bytes(params), SitePolicy(), keys, store=store, run_id=1, server_round=1,
                      vector_length=LENGTH)
        update = np.full(LENGTH, 0.01 * (i + 1))
        release = ReleasedUpdates(tmp_path / name).seal(1, "adapter", update)
        bundles[i] = stage_advertise(store, params, keys, update, settings.max_examples, settings, release=release)
        sites[i] = (keys, store)
    server = ServerAggregator(params, registry.keys)
    routed = server.collect_bundles(bundles)
    return params, sites, server, routed, tmp_path


def _share(params, sites, routed, site: int) -> bytes:
    keys, store = sites[site]
    return stage_share(store, params.round_id, keys, {str(p): b.to_bytes() for p, b in routed[site].items()})


def test_two_copies_of_a_stage_at_once_deal_once(round_of_three, monkeypatch):
    """Flower may run one process per message: a coordinator that sends the share stage twice must
    not get two different sets of signed shares (it could mix them to frame the site as a liar)."""
    params, sites, _, routed, _ = round_of_three
    original = ClientSession.share_keys

    def slow_share_keys(self, bundles):
        time.sleep(0.3)  # widen the window between loading the session and saving it
        return original(self, bundles)

    monkeypatch.setattr(ClientSession, "share_keys", slow_share_keys)
    results: list[object] = []
    start = threading.Barrier(2)

    def attempt() -> None:
        start.wait()
        try:
            results.append(_share(params, sites, routed, 0))
        except ProtocolError as exc:
            results.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    dealt = [r for r in results if isinstance(r, bytes)]
    refused = [r for r in results if isinstance(r, ProtocolError)]
    assert len(dealt) == 1 and len(refused) == 1, results
    assert "session is at stage SHARED" in str(refused[0])


def test_an_update_in_a_secure_sum_is_never_resent(round_of_three):
    params, sites, server, routed, root = round_of_three
    released = ReleasedUpdates(root / "site-0")
    assert released.find(1, "adapter") is not None  # sealed, not yet uploaded: a resend would be safe
    outgoing = {site: _share(params, sites, routed, site) for site in sites}
    inbox = server.route_shares(outgoing)
    keys, store = sites[0]
    stage_mask(store, params.round_id, keys, {str(s): ct for s, ct in inbox[0].items()})
    # The masked upload has left: the server can now sum it, so the site trains afresh next time.
    assert released.find(1, "adapter") is None
    assert ReleasedUpdates(root / "site-1").find(1, "adapter") is not None  # site-1 has not uploaded
    # The update itself is gone from the disk; what stays is the record that it was released and uploaded.
    name = released.name(1, "adapter")
    assert sorted(p.name for p in released.directory.iterdir()) == [f"{name}.json", f"{name}.uploaded"]
    assert [(r.name, r.round) for r in released.records()] == [(name, 1)]
    assert (root / "site-1" / "released" / f"{name}.npy").is_file()


def test_a_restored_session_directory_deals_the_same_shares_again(round_of_three):
    """Issue 19, finding 7 (its last part): a coordinator that restores a site's session directory to its
    state after stage 1 and sends the share stage again used to get a second, different deal (fresh
    random coefficients), which it could mix with the first to frame the site. Dealing is now a function
    of the dealing key saved at stage 1: the same shares (and signatures) come back."""
    params, sites, _, routed, _ = round_of_three
    keys, store = sites[0]
    saved = {path: path.read_bytes() for path in store.directory.glob("*.json")}
    first = Deal.from_bytes(_share(params, sites, routed, 0))
    for path, content in saved.items():
        path.write_bytes(content)
    second = Deal.from_bytes(_share(params, sites, routed, 0))
    assert first.commitments == second.commitments
    sender = store.load(params.round_id, keys)[0]._own_bundle.share_public
    for holder in (1, 2):
        holder_keys, holder_store = sites[holder]
        share_key = holder_store.load(params.round_id, holder_keys)[0]._share_key
        opened = [decrypt_from_peer(share_key, sender, round_id=params.round_id, sender=0, receiver=holder,
                                    ciphertext=deal.ciphertexts[holder]) for deal in (first, second)]
        assert opened[0] == opened[1]


def test_a_new_site_identity_lives_in_an_owner_only_dir_from_the_start(tmp_path: Path, caplog):
    """The site's state dir holds its private key: created 0700, never first 0755 then corrected."""
    import stat

    create_site_identities(["site-0"], {"site-0": tmp_path / "fresh" / "site-0"}, tmp_path / "registry.json")
    assert stat.S_IMODE((tmp_path / "fresh" / "site-0").stat().st_mode) == 0o700
    assert not [r for r in caplog.records if "readable by others" in r.getMessage()]
