"""Rounds a cheat cannot end (issue 19, finding 5): verifiable shares, provable accusations, a dealing
that a restored session cannot change. Attacks through the real ClientSession and ServerAggregator.

Before: a dealer whose signed mask-key shares did not open its key, then went silent or uploaded,
made every round it was in abort at unmask (RoundAborted), and nothing kept it out of the next one.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    ProtocolError,
    RoundAborted,
    SecAggParams,
    SignedKeyBundle,
    SiteIdentity,
    UnmaskRequest,
    UnmaskResponse,
    decode_sum,
    quantize,
)
from common.secagg.dleq import KeyReveal, check_reveal, key_proof_ok, prove_key, prove_shared, shared_proof_ok
from common.secagg.group import ELEMENT_BYTES, G, Q, element_to_bytes, exp, exp_g, new_secret, product
from common.secagg.identity import decrypt_from_peer
from common.secagg.messages import SHARE_CIPHERTEXT_BYTES, ProvenCheat
from common.secagg.proof import check_proof
from common.secagg.shamir import Share
from common.secagg.vss import Commitments
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


@pytest.mark.parametrize("kind", ["key", "seed"])
def test_a_dealer_cheating_too_many_holders_is_proven_and_its_masks_come_off_by_reveals(
        monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    # The former limit: bad shares to two of six holders (t = 5) leave four that masked with the cheat
    # and hold too few shares of its key. Before: RoundAborted at stage 3 (their masks with it could
    # not come off). Now each of the four reveals the element it shares with the proven cheat, with
    # a proof, and the round completes with exactly the honest sites' sum.
    params, fed = _setup(7)
    updates = _updates(params)
    routed = fed.advertise()
    with _dealing_off_commitments(monkeypatch, fed, 2, kind, holders={0, 1}):
        inboxes = fed.share(routed)
    request = fed.confirm(fed.upload(inboxes, updates, {s: [1] for s in params.site_ids}))
    assert [cheat.proof.dealer for cheat in request.cheats] == [2]
    responses = fed.unmask_responses(request)
    revealers = {s for s, raw in responses.items() if UnmaskResponse.from_bytes(raw).reveals}
    assert revealers == {3, 4, 5, 6} == {s for s in range(7) if 2 in fed.clients[s].masked_with} - {2}
    _assert_exact(fed.server.finish(responses), params, updates, set(params.site_ids) - {2})
    assert set(fed.server.cheats) == {2} and not fed.server.bad_reveals
    standing = Standing()
    standing.record(1, fed.server, _name)
    assert set(standing.kept_out()) == {"site-2"} and not standing.strikes


def _limit_round(monkeypatch: pytest.MonkeyPatch, bad_holders: set[int], silent: Collection[int] = ()
                 ) -> tuple[SecAggParams, LocalFederation, dict[int, np.ndarray], UnmaskRequest]:
    """Site 2 deals bad key shares to ``bad_holders``; the round up to its unmask request (``silent``
    sites do not upload)."""
    params, fed = _setup(7)
    updates = _updates(params)
    routed = fed.advertise()
    with _dealing_off_commitments(monkeypatch, fed, 2, "key", holders=bad_holders):
        inboxes = fed.share(routed)
    return params, fed, updates, fed.confirm(fed.upload(inboxes, updates, {s: [1] for s in params.site_ids},
                                                        drop=silent))


def test_a_wrong_element_is_refused_and_proves_its_revealer_a_cheat(monkeypatch: pytest.MonkeyPatch) -> None:
    # Holder 3 reveals, signed, an element that is not the one it shares with the cheat (and a proof made
    # with another key): the server refuses it, and its own signature on it proves site 3 dishonest. Too
    # few key shares of site 2 exist to remove that mask otherwise, so this round ends: with both proven.
    params, fed, _, request = _limit_round(monkeypatch, {0, 1})
    fed.clients[3]._secrets["key"] += 1
    with pytest.raises(RoundAborted, match="mask key"):
        fed.unmask(request)
    assert set(fed.server.cheats) == {2, 3} and set(fed.server.bad_reveals) == {3}
    # The evidence is self-contained: with site 3's registered key anyone can check it; an honest
    # reveal, or one checked against other commitments than the signed ones, proves nothing.
    evidence = fed.server.evidence(3)

    def raw(key: str) -> bytes:
        return bytes.fromhex(str(evidence[key]))

    reveal = KeyReveal.from_bytes(raw("reveal"), 3, 2)
    bundles = (SignedKeyBundle.from_bytes(raw("key_bundle")), SignedKeyBundle.from_bytes(raw("dealer_key_bundle")))
    commitments = (Commitments.from_bytes(raw("commitments"), params.threshold),
                   Commitments.from_bytes(raw("dealer_commitments"), params.threshold))
    check_reveal(reveal, params, fed.registry[3], bundles, commitments)
    with pytest.raises(ProtocolError, match="did not sign"):
        check_reveal(reveal, params, fed.registry[3], bundles, (commitments[1], commitments[0]))
    honest = KeyReveal.make(fed.clients[4]._identity, 7, exp_g(7), commitments[1].mask_public, params.digest, 3, 2)
    with pytest.raises(ProtocolError):
        check_reveal(honest, params, fed.registry[3], bundles, commitments)


def test_a_wrong_element_falls_back_to_the_cheats_key_when_enough_shares_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    # Site 2 cheats holder 0 only: five holders (t = 5) hold its key shares, so holder 3's wrong element
    # costs nothing: the mask comes off with site 2's rebuilt key, and site 3 is proven all the same.
    params, fed, updates, request = _limit_round(monkeypatch, {0})
    fed.clients[3]._secrets["key"] += 1
    _assert_exact(fed.unmask(request), params, updates, set(params.site_ids) - {2})
    assert set(fed.server.cheats) == {2, 3}


@pytest.mark.parametrize("forged", ["challenge", "signature", "unrequested"])
def test_a_forged_reveal_is_refused_without_framing_its_site(monkeypatch: pytest.MonkeyPatch, forged: str) -> None:
    # A reveal altered on its way (its signature no longer checks) or for a site that is no proven cheat
    # is skipped: it proves nothing against the site named in it, and no mask comes off with it.
    _, fed, _, request = _limit_round(monkeypatch, {0, 1})
    responses = fed.unmask_responses(request)
    answer = UnmaskResponse.from_bytes(responses[3])
    blob = bytearray(answer.reveals[2])
    if forged == "challenge":
        blob[ELEMENT_BYTES] ^= 1
    elif forged == "signature":
        blob[-1] ^= 1
    reveals = {5: bytes(blob)} if forged == "unrequested" else {2: bytes(blob)}
    responses[3] = UnmaskResponse(answer.round_id, 3, answer.self_mask_shares, answer.key_shares, reveals).to_bytes()
    with pytest.raises(RoundAborted):
        fed.server.finish(responses)
    assert set(fed.server.cheats) == {2} and 3 in fed.server.dropped_reasons and not fed.server.bad_reveals


def test_no_honest_site_reveals_for_a_dealer_that_is_not_proven(monkeypatch: pytest.MonkeyPatch) -> None:
    # A server that wants the element two honest sites share names an honest, dropped dealer (site 5) a
    # cheat, with no proof that checks: a genuine share of it (on its commitments), a share altered after
    # it was signed, a proven cheat's proof passed off as site 5's, or a real proof of another cheat with
    # site 5's key proof. No honest site reveals anything for site 5.
    params, fed, _, request = _limit_round(monkeypatch, {0, 1}, silent={5})
    assert 5 not in request.survivors and all(5 in fed.clients[s].masked_with for s in (3, 4, 6))
    genuine_share, signature = fed.clients[3]._held_key[5]
    real = request.cheats[0]
    forged = {
        "genuine": CheatProof(5, 3, "key", genuine_share.to_bytes(), signature),
        "altered": CheatProof(5, 3, "key", Share(genuine_share.x, genuine_share.y + 1).to_bytes(), signature),
        "other-dealer's": dataclasses.replace(real.proof, dealer=5),
    }
    notices = [ProvenCheat(proof, fed.server._commitments[5].to_bytes(), fed.server._key_proofs[5])
               for proof in forged.values()]
    notices.append(ProvenCheat(real.proof, real.commitments, fed.server._key_proofs[5]))
    for notice in notices:
        lying = dataclasses.replace(request, survivors=request.survivors, cheats=(notice,))
        for site in (3, 4, 6):  # fresh sessions each time: restore them from before the unmask answer
            saved = fed.clients[site].export_state()
            answer = fed.clients[site].unmask(lying)
            assert not answer.reveals, notice.proof
            fed.clients[site] = ClientSession.from_state(params, fed.clients[site]._identity, fed.registry, saved)
    assert all(not fed.clients[s].unmask(dataclasses.replace(request, cheats=())).reveals for s in (3, 4, 6))


@pytest.mark.parametrize(("borrowed", "reason"), [
    ("key_proof", "proof that it knows its mask key"),
    ("commitments", "not the ones its signed key bundle names"),
])
def test_a_dealer_whose_deal_is_not_its_own_is_dropped_when_it_deals(borrowed: str, reason: str) -> None:
    # key_proof: Feldman commitments do not show that the dealer knows its key: a dealer committing to
    # another site's mask public key could make holders reveal the element they share with THAT site, so
    # each dealer proves knowledge of its key with its deal; one that cannot (another site's proof) goes.
    # commitments: commitments other than the ones its signed bundle names go too.
    params, fed = _setup(6)
    updates = _updates(params)
    deals = fed.share_outgoing(fed.advertise())
    mine, other = Deal.from_bytes(deals[4]), Deal.from_bytes(deals[3])
    deals[4] = dataclasses.replace(mine, **{borrowed: getattr(other, borrowed)}).to_bytes()
    inboxes = fed.server.route_shares(deals)
    result = fed.unmask(fed.confirm(fed.upload(inboxes, updates, {s: [1] for s in params.site_ids})))
    _assert_exact(result, params, updates, set(params.site_ids) - {4})
    assert reason in fed.server.dropped_reasons[4]


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




def test_deal_and_accusation_messages_round_trip_and_reject_garbage() -> None:
    params, fed = _setup(5)
    deal = fed.clients[0].share_keys(fed.advertise()[0])
    assert Deal.from_bytes(deal.to_bytes()) == deal and len(deal.ciphertexts) == 4
    blob = deal.to_bytes()
    for bad in (blob[:-1], blob + b"\x00", b"FSD2", 5):
        with pytest.raises(PayloadError):
            Deal.from_bytes(bad)  # type: ignore[arg-type]
    proof = CheatProof(3, 0, "seed", bytes(260), bytes(64))
    upload = MaskedUpload(0, frozenset({1, 2}), bytes(params.packed_bytes), (proof,))
    assert MaskedUpload.from_bytes(upload.to_bytes(params), params) == upload
    raw = upload.to_bytes(params)
    kind_at = raw.index(bytes([0, 0, 0, 3])) + 4
    with pytest.raises(PayloadError, match="bad kind"):
        MaskedUpload.from_bytes(raw[:kind_at] + b"\x07" + raw[kind_at + 1:], params)


def test_equal_log_proofs_check_only_the_true_statement() -> None:
    digest = bytes(32)
    s_h, s_c = new_secret(), new_secret()
    pk_h, pk_c = exp_g(s_h), exp_g(s_c)
    shared, proof = prove_shared(s_h, pk_h, pk_c, digest, 3, 2)
    assert shared == exp(pk_h, s_c)  # the Diffie-Hellman element, from either side
    assert shared_proof_ok(proof, shared, pk_h, pk_c, digest, 3, 2)
    tampered_challenge = bytes([proof[0] ^ 1]) + proof[1:]
    big_response = proof[:32] + element_to_bytes(Q)
    for bad in (
        shared_proof_ok(proof, product([shared, G]), pk_h, pk_c, digest, 3, 2),  # wrong element
        shared_proof_ok(proof, shared, pk_h, exp_g(new_secret()), digest, 3, 2),  # wrong base
        shared_proof_ok(proof, shared, exp_g(new_secret()), pk_c, digest, 3, 2),  # wrong public key
        shared_proof_ok(tampered_challenge, shared, pk_h, pk_c, digest, 3, 2),
        shared_proof_ok(big_response, shared, pk_h, pk_c, digest, 3, 2),
        shared_proof_ok(proof, shared, pk_h, pk_c, digest, 3, 4),  # another pair of sites
        shared_proof_ok(proof, shared, pk_h, pk_c, bytes([1]) * 32, 3, 2),  # another round
        shared_proof_ok(proof[:-1], shared, pk_h, pk_c, digest, 3, 2),
    ):
        assert not bad
    # A proof for the wrong element made with another key does not check either.
    wrong, forged = prove_shared(s_h + 1, pk_h, pk_c, digest, 3, 2)
    assert not shared_proof_ok(forged, wrong, pk_h, pk_c, digest, 3, 2)
    key_proof = prove_key(s_c, pk_c, digest, 2)
    assert key_proof_ok(key_proof, pk_c, digest, 2)
    assert not key_proof_ok(key_proof, pk_c, digest, 3) and not key_proof_ok(key_proof, pk_h, digest, 2)
    assert not key_proof_ok(prove_key(s_c + 1, pk_c, digest, 2), pk_c, digest, 2)


def test_unmask_messages_with_proven_cheats_and_reveals_round_trip_and_reject_garbage() -> None:
    proof = CheatProof(3, 0, "seed", bytes(260), bytes(64))
    request = UnmaskRequest(b"r", frozenset({0, 1}), {0: bytes(64)}, (ProvenCheat(proof, bytes(7), bytes(288)),))
    assert UnmaskRequest.from_bytes(request.to_bytes()) == request
    for bad in (request.to_bytes()[:-1], request.to_bytes() + b"\x00"):
        with pytest.raises(PayloadError):
            UnmaskRequest.from_bytes(bad)
    reveal = KeyReveal(1, 3, 5, bytes(288), bytes(64)).to_bytes()
    response = UnmaskResponse(b"r", 1, {0: bytes(324)}, {3: bytes(324)}, {3: reveal})
    assert UnmaskResponse.from_bytes(response.to_bytes()) == response
    for bad in (response.to_bytes()[:-1], response.to_bytes() + b"\x00",
                UnmaskResponse(b"r", 1, {3: bytes(324)}, {}, {3: reveal}).to_bytes()):
        with pytest.raises(PayloadError):
            UnmaskResponse.from_bytes(bad)
    with pytest.raises(PayloadError):
        KeyReveal.from_bytes(bytes(256) + reveal[256:], 1, 3)  # 0 is no element
