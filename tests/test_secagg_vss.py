"""Rounds a cheat cannot end (issue 19, finding 5): verifiable shares, provable accusations, a dealing
that a restored session cannot change. Attacks through the real ClientSession and ServerAggregator.

Before: a dealer whose signed mask-key shares did not open its key, then went silent or uploaded,
made every round it was in abort at unmask (RoundAborted), and nothing kept it out of the next one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator

import numpy as np
import pytest

import common.secagg.client as client_module
from common.secagg import (
    CheatProof,
    ClientSession,
    Deal,
    LocalFederation,
    MaskedUpload,
    PayloadError,
    RoundAborted,
    SecAggParams,
    SiteIdentity,
    decode_sum,
    quantize,
)
from common.secagg.group import Q
from common.secagg.identity import decrypt_from_peer
from common.secagg.messages import SHARE_CIPHERTEXT_BYTES
from common.secagg.proof import check_proof
from common.secagg.shamir import Share
from server.secure_agg import Standing


def _setup(n: int, **kwargs: object) -> tuple[SecAggParams, LocalFederation]:
    params = SecAggParams(round_id=b"run-1/round-1", site_ids=tuple(range(n)), vector_length=16, count_slots=1,
                          rounding="nearest", **kwargs)  # type: ignore[arg-type]
    return params, LocalFederation.create(params, {s: SiteIdentity.generate() for s in params.site_ids})


def _updates(params: SecAggParams) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(5)
    return {s: rng.uniform(-1, 1, params.vector_length) / np.sqrt(params.vector_length) / 2 for s in params.site_ids}


def _assert_exact(result: object, params: SecAggParams, updates: dict[int, np.ndarray], sites: Collection[int]) -> None:
    """The result is EXACTLY the decoded sum of ``sites``' quantised inputs, and their count."""
    assert result.survivors == frozenset(sites)  # type: ignore[attr-defined]
    quantised = [quantize(updates[s], value_bits=params.value_bits, clip=params.clip, rounding="nearest")
                 for s in sorted(sites)]
    expected = decode_sum(np.sum(quantised, axis=0, dtype=np.uint64), len(sites), value_bits=params.value_bits,
                          clip=params.clip)
    np.testing.assert_array_equal(result.sum_vector, expected)  # type: ignore[attr-defined]
    assert result.counts == [len(sites)]  # type: ignore[attr-defined]


@contextlib.contextmanager
def _dealing_off_commitments(monkeypatch: pytest.MonkeyPatch, fed: LocalFederation, dealer: int, kind: str,
                             holders: Collection[int] | None = None) -> Iterator[None]:
    """``dealer`` signs and sends ``kind`` shares that are NOT on the polynomial it committed to (to
    ``holders``, or to every holder): the issue's "shares that do not open its key"."""
    honest = client_module.evaluate
    secret = fed.clients[dealer]._secrets[kind]

    def evaluate(coefficients: list[int], xs: list[int]) -> list[Share]:
        shares = honest(coefficients, xs)
        if coefficients[0] != secret:
            return shares
        return [Share(s.x, (s.y + 1) % Q) if holders is None or s.x - 1 in holders else s for s in shares]

    with monkeypatch.context() as patch:
        patch.setattr(client_module, "evaluate", evaluate)
        yield


def _name(site: int) -> str:
    return f"site-{site}"


@pytest.mark.parametrize("kind", ["key", "seed"])
@pytest.mark.parametrize("then", ["silent", "uploads"])
def test_a_dealer_of_shares_off_its_commitments_is_dropped_proven_and_kept_out(
        monkeypatch: pytest.MonkeyPatch, kind: str, then: str) -> None:
    params, fed = _setup(7)  # every pair masks, t = 5
    updates, cheat = _updates(params), 3
    routed = fed.advertise()
    with _dealing_off_commitments(monkeypatch, fed, cheat, kind):
        inboxes = fed.share(routed)
    survivors = fed.upload(inboxes, updates, {s: [1] for s in params.site_ids},
                           drop={cheat} if then == "silent" else ())
    result = fed.unmask(fed.confirm(survivors))  # before: RoundAborted at unmask ("dropped site 3 cheated")
    honest = set(params.site_ids) - {cheat}
    _assert_exact(result, params, updates, honest)
    assert all(cheat not in fed.clients[s].masked_with for s in honest)  # checked BEFORE anyone masked with it
    proof = fed.server.proofs[cheat]
    assert cheat in fed.server.cheats and proof.kind == kind and proof.holder in honest
    check_proof(proof, params, fed.registry[cheat], fed.server._bundles[cheat], fed.server._commitments[cheat])
    assert not fed.server.unproven and not fed.server.false_accusers
    # The run keeps it out of its later rounds, with the proof; nobody else is blamed.
    standing = Standing()
    standing.record(1, fed.server, _name)
    assert set(standing.kept_out()) == {"site-3"} and not standing.strikes
    assert standing.proven["site-3"]["proof"]["share"] == proof.share.hex()


def test_a_dealer_cheating_only_some_holders_is_dropped_and_its_key_recovered(monkeypatch: pytest.MonkeyPatch) -> None:
    # Site 2 gives a bad key share to site 0 only: five of its six holders accept (t = 5) and mask with
    # it, so once it is proven (by site 0) and dropped, its mask key is rebuilt from their checked shares.
    params, fed = _setup(7)
    updates = _updates(params)
    routed = fed.advertise()
    with _dealing_off_commitments(monkeypatch, fed, 2, "key", holders={0}):
        inboxes = fed.share(routed)
    result = fed.unmask(fed.confirm(fed.upload(inboxes, updates, {s: [1] for s in params.site_ids})))
    _assert_exact(result, params, updates, set(params.site_ids) - {2})
    assert fed.server.proofs[2].holder == 0 and 2 in fed.clients[1].masked_with


def test_limit_a_dealer_cheating_too_many_holders_ends_one_round_and_is_proven(monkeypatch: pytest.MonkeyPatch) -> None:
    # Limit, stated in the README: bad shares to two of six holders (t = 5) leave four that masked with
    # the cheat and hold too few shares of its key; they must go too, and the round ends. The cheat is
    # proven all the same, so it ends at most this one round of the run.
    params, fed = _setup(7)
    routed = fed.advertise()
    with _dealing_off_commitments(monkeypatch, fed, 2, "key", holders={0, 1}):
        inboxes = fed.share(routed)
    with pytest.raises(RoundAborted):
        fed.upload(inboxes, _updates(params), {s: [1] for s in params.site_ids})
    assert set(fed.server.cheats) == {2}


def test_a_cheat_helped_by_a_holder_that_skips_its_check_is_caught_at_unmask(monkeypatch: pytest.MonkeyPatch) -> None:
    # Site 4 deals a bad self-mask share to its accomplice, site 0, which skips its check and reveals
    # the share at unmask: the server's recovered secret fails the commitment, each share is checked,
    # the bad one convicts site 4, and the good ones still open its committed secret (its input counts).
    params, fed = _setup(7)
    updates = _updates(params)
    routed = fed.advertise()
    with _dealing_off_commitments(monkeypatch, fed, 4, "seed", holders={0}):
        inboxes = fed.share(routed)
    monkeypatch.setattr(fed.clients[0], "_check_commitments", lambda received: ())
    result = fed.unmask(fed.confirm(fed.upload(inboxes, updates, {s: [1] for s in params.site_ids})))
    _assert_exact(result, params, updates, set(params.site_ids))
    assert fed.server.proofs[4].holder == 0 and fed.server.proofs[4].kind == "seed"


def test_a_restored_session_deals_the_same_shares() -> None:
    # Before: a session restored from a copy saved after stage 1 drew fresh coefficients, so a server
    # replaying the share stage got two different deals (and could mix them to frame the site).
    params, fed = _setup(5)
    routed = fed.advertise()
    dealer = fed.clients[0]
    saved = dealer.export_state()
    deals = [dealer.share_keys(routed[0])]
    deals.append(ClientSession.from_state(params, dealer._identity, fed.registry, saved).share_keys(routed[0]))
    assert deals[0].commitments == deals[1].commitments and deals[0].ciphertexts != deals[1].ciphertexts  # nonces
    for holder in range(1, 5):
        opened = [decrypt_from_peer(fed.clients[holder]._share_key, fed.server._bundles[0].share_public,
                                    round_id=params.round_id, sender=0, receiver=holder,
                                    ciphertext=deal.ciphertexts[holder]) for deal in deals]
        assert opened[0] == opened[1]  # the same shares and the same (deterministic Ed25519) signatures


def _after_upload(n: int, unopenable: tuple[int, int] | None = None
                  ) -> tuple[SecAggParams, LocalFederation, dict[int, np.ndarray], dict[int, bytes]]:
    """A round up to its uploads; ``unopenable`` = (holder, dealer): that ciphertext arrives damaged."""
    params, fed = _setup(n)
    updates = _updates(params)
    inboxes = fed.share(fed.advertise())
    if unopenable:
        holder, dealer = unopenable
        inboxes[holder][dealer] = bytes(20) + inboxes[holder][dealer][20:]
    uploads = fed.masked_uploads(inboxes, updates, {s: [1] for s in params.site_ids})
    return params, fed, updates, uploads


def _accuse(fed: LocalFederation, uploads: dict[int, bytes], accuser: int, dealer: int, proof: CheatProof) -> None:
    """``accuser`` re-uploads as if it had rejected ``dealer``'s shares, with ``proof``."""
    up = MaskedUpload.from_bytes(uploads[accuser], fed.params)
    uploads[accuser] = MaskedUpload(accuser, up.masked_with - {dealer}, up.body, (proof,)).to_bytes(fed.params)


@pytest.mark.parametrize("forged", ["genuine-share", "shifted-share", "other-holder"])
def test_a_false_accusation_is_refused_and_counted_against_the_accuser(forged: str) -> None:
    params, fed, updates, uploads = _after_upload(7)
    share, signature = fed.clients[2]._held_key[5]
    proof = {
        "genuine-share": CheatProof(5, 2, "key", share.to_bytes(), signature),  # on its commitments: no proof
        "shifted-share": CheatProof(5, 2, "key", Share(share.x, (share.y + 1) % Q).to_bytes(), signature),
        "other-holder": CheatProof(5, 2, "key", *_signed(fed, 3, 5)),
    }[forged]
    _accuse(fed, uploads, accuser=2, dealer=5, proof=proof)
    result = fed.unmask(fed.confirm(fed.server.collect_masked(uploads)))
    _assert_exact(result, params, updates, set(params.site_ids) - {2})  # the accused stays, the accuser goes
    assert not fed.server.cheats and fed.server.false_accusers == {2: 5} and not fed.server.unproven
    standing = Standing()
    standing.record(1, fed.server, _name)
    assert standing.strikes == {"site-2": ["round 1: accused site-5 with a share that is on its commitments"]}
    # The same again in the run's next round: the accuser is kept out, the accused is not.
    _, fed, _, uploads = _after_upload(7)
    _accuse(fed, uploads, accuser=2, dealer=5, proof=CheatProof(5, 2, "key", *_signed(fed, 2, 5)))
    fed.server.collect_masked(uploads)
    standing.record(2, fed.server, _name)
    assert set(standing.kept_out()) == {"site-2"}


def _signed(fed: LocalFederation, holder: int, dealer: int) -> tuple[bytes, bytes]:
    share, signature = fed.clients[holder]._held_key[dealer]
    return share.to_bytes(), signature


def test_an_unproven_rejection_is_a_strike_on_both_sides() -> None:
    # No proof (site 2 cannot open site 5's ciphertext): the server cannot tell who lies. The accused
    # dealer leaves this round (its key stays recoverable); both sides get a strike, so an accuser that
    # keeps at the same honest site takes itself out with it, and one with two targets goes alone.
    params, fed, updates, uploads = _after_upload(7, unopenable=(2, 5))
    result = fed.unmask(fed.confirm(fed.server.collect_masked(uploads)))
    _assert_exact(result, params, updates, set(params.site_ids) - {5})
    assert fed.server.unproven == {(2, 5)} and not fed.server.cheats
    standing = Standing()
    standing.record(1, fed.server, _name)
    assert {site: len(lines) for site, lines in standing.strikes.items()} == {"site-2": 1, "site-5": 1}
    _, fed, _, uploads = _after_upload(7, unopenable=(2, 6))
    fed.server.collect_masked(uploads)
    standing.record(2, fed.server, _name)
    assert set(standing.kept_out()) == {"site-2"}


def test_a_dealer_of_garbage_to_everyone_is_kept_out_not_its_holders() -> None:
    # Why a dispute is a strike on both sides: a dealer can make every honest holder's rejection
    # unprovable (ciphertexts nobody can open). Counted against accusers only, it would get every
    # honest site kept out in two rounds; here it is out after one, and no honest site is.
    params, fed = _setup(7)
    inboxes = fed.share(fed.advertise())
    for box in inboxes.values():
        if 4 in box:
            box[4] = bytes(SHARE_CIPHERTEXT_BYTES) + box[4][SHARE_CIPHERTEXT_BYTES:]
    fed.unmask(fed.confirm(fed.upload(inboxes, _updates(params), {s: [1] for s in params.site_ids})))
    standing = Standing()
    standing.record(1, fed.server, _name)
    assert set(standing.kept_out()) == {"site-4"}


def test_commitments_relayed_differently_to_two_holders_are_detected(caplog: pytest.LogCaptureFixture) -> None:
    # The relay shows holder 1 other (well-formed) commitments for dealer 4 than holder 2 sees: holder 1
    # checks them against dealer 4's signed digest, rejects them and never masks with dealer 4.
    params, fed = _setup(6)
    inboxes = fed.share(fed.advertise())
    inboxes[1][4] = inboxes[1][4][:SHARE_CIPHERTEXT_BYTES] + inboxes[1][3][SHARE_CIPHERTEXT_BYTES:]
    with caplog.at_level(logging.WARNING):
        fed.upload(inboxes, _updates(params), {s: [1] for s in params.site_ids})
    assert "not the ones the dealer signed" in caplog.text
    assert 4 not in fed.clients[1].masked_with and 4 in fed.clients[2].masked_with
    assert not fed.server.cheats  # the dealer's signature convicts nobody here: the relay lied


def test_a_dealer_whose_commitments_are_not_the_signed_ones_is_dropped_when_it_deals() -> None:
    params, fed = _setup(6)
    updates = _updates(params)
    deals = fed.share_outgoing(fed.advertise())
    mine, other = Deal.from_bytes(deals[4]), Deal.from_bytes(deals[3])
    deals[4] = Deal(mine.round_id, other.commitments, mine.ciphertexts).to_bytes()
    inboxes = fed.server.route_shares(deals)
    result = fed.unmask(fed.confirm(fed.upload(inboxes, updates, {s: [1] for s in params.site_ids})))
    _assert_exact(result, params, updates, set(params.site_ids) - {4})
    assert "not the ones its signed key bundle names" in fed.server.dropped_reasons[4]


def test_deal_and_accusation_messages_round_trip_and_reject_garbage() -> None:
    params, fed = _setup(5)
    deal = fed.clients[0].share_keys(fed.advertise()[0])
    assert Deal.from_bytes(deal.to_bytes()) == deal and len(deal.ciphertexts) == 4
    blob = deal.to_bytes()
    for bad in (blob[:-1], blob + b"\x00", b"FSD1", 5):
        with pytest.raises(PayloadError):
            Deal.from_bytes(bad)  # type: ignore[arg-type]
    proof = CheatProof(3, 0, "seed", bytes(260), bytes(64))
    upload = MaskedUpload(0, frozenset({1, 2}), bytes(params.packed_bytes), (proof,))
    assert MaskedUpload.from_bytes(upload.to_bytes(params), params) == upload
    raw = upload.to_bytes(params)
    kind_at = raw.index(bytes([0, 0, 0, 3])) + 4
    with pytest.raises(PayloadError, match="bad kind"):
        MaskedUpload.from_bytes(raw[:kind_at] + b"\x07" + raw[kind_at + 1:], params)
