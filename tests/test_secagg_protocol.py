"""The SecAgg+ protocol end to end: correctness, dropouts, and a malicious server or peer."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.secagg import (
    ClientSession,
    LocalFederation,
    MaskedUpload,
    ParameterError,
    ProtocolError,
    RoundAborted,
    SecAggParams,
    SignedKeyBundle,
    SiteIdentity,
    Stage,
    SurvivorSet,
    UnmaskRequest,
    UnmaskResponse,
    decode_sum,
    neighbour_graph,
    quantize,
    unpack_bits,
)
from common.secagg.group import Q
from common.secagg.identity import sign_key_bundle
from common.secagg.shamir import SHARE_BYTES, Share

STAGES = ("advertise", "share", "upload", "confirm", "unmask")
LATE = ("confirm", "unmask")  # a site that stops answering after its upload is still counted


def _setup(n: int, length: int = 32, **kwargs: object) -> tuple[SecAggParams, LocalFederation]:
    params = SecAggParams(round_id=b"run-1/round-1", site_ids=tuple(range(n)), vector_length=length, **kwargs)  # type: ignore[arg-type]
    return params, LocalFederation.create(params)


def _updates(params: SecAggParams, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = params.clip / np.sqrt(params.vector_length)
    return {s: rng.uniform(-scale, scale, params.vector_length).astype(np.float32) for s in params.site_ids}


def _assert_sum(result: object, updates: dict[int, np.ndarray], survivors: set[int]) -> None:
    assert result.survivors == frozenset(survivors)  # type: ignore[attr-defined]
    true = np.sum([updates[s].astype(np.float64) for s in sorted(survivors)], axis=0)
    assert np.abs(result.sum_vector - true).max() <= result.error_bound  # type: ignore[attr-defined]


def _to_confirm(fed: LocalFederation, updates: dict[int, np.ndarray]) -> SurvivorSet:
    return fed.upload(fed.share(fed.advertise()), updates)


def _to_unmask(fed: LocalFederation, updates: dict[int, np.ndarray]) -> UnmaskRequest:
    return fed.confirm(_to_confirm(fed, updates))


# ---------------------------------------------------------------- correctness


@settings(max_examples=20, deadline=None)
@given(
    site_ids=st.lists(st.integers(0, 2**32 - 2), min_size=2, max_size=8, unique=True),
    length=st.integers(1, 40),
    all_pairs=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_masks_cancel_exactly(site_ids: list[int], length: int, all_pairs: bool, seed: int) -> None:
    # Prepare: deterministic rounding, so the expected integer sum is known exactly.
    params = SecAggParams(round_id=f"r{seed}".encode(), site_ids=tuple(site_ids), vector_length=length,
                          count_slots=2, rounding="nearest", all_pairs=all_pairs)
    rng = np.random.default_rng(seed)
    updates = {s: rng.uniform(-1, 1, length) / np.sqrt(length) for s in params.site_ids}
    counts = {s: [int(rng.integers(0, 1000)), int(rng.integers(0, params.max_count + 1))] for s in params.site_ids}
    # Execute
    result = LocalFederation.create(params).run(updates, counts)
    # Assert: every mask cancels; the result is exactly the decoded sum of the quantised inputs.
    quantised = [quantize(u, value_bits=params.value_bits, clip=params.clip, rounding="nearest")
                 for u in updates.values()]
    qsum = np.asarray(np.sum(quantised, axis=0, dtype=np.uint64), dtype=np.uint64)
    expected = decode_sum(qsum, len(site_ids), value_bits=params.value_bits, clip=params.clip)
    np.testing.assert_array_equal(result.sum_vector, expected)
    assert result.counts == [sum(c[i] for c in counts.values()) for i in range(2)]


@pytest.mark.slow  # 15 whole rounds of 5-9 sites (about 5 s); test_dropout_at_each_stage covers each stage fast
@settings(max_examples=15, deadline=None)
@given(n=st.integers(5, 9), stage=st.sampled_from(STAGES), data=st.data())
def test_any_single_dropout_is_survived(n: int, stage: str, data: st.DataObject) -> None:
    # A sparse graph (n = 8, 9) needs every stage-1 bundle (test_dropout_at_each_stage): all pairs there.
    params, fed = _setup(n, length=16, all_pairs=stage == "advertise")
    victim = data.draw(st.integers(0, n - 1))
    updates = _updates(params, seed=victim)
    result = fed.run(updates, drop={stage: {victim}})
    _assert_sum(result, updates, set(params.site_ids) - ({victim} if stage not in LATE else set()))


@pytest.mark.parametrize("n", [5, 10, pytest.param(40, marks=pytest.mark.slow)])
def test_aggregate_equals_plain_sum_within_error_bound(n: int) -> None:
    params, fed = _setup(n, length=500, count_slots=1)
    updates = _updates(params)
    result = fed.run(updates, {s: [s + 1] for s in params.site_ids})
    _assert_sum(result, updates, set(params.site_ids))
    assert result.counts == [n * (n + 1) // 2]
    assert result.dropped == frozenset()


def test_weighted_mean_recipe() -> None:
    # Recommended use: u_i = (n_i / N_cap) * delta_i (clipped), count slot n_i; mean = N_cap * sum / sum n_i.
    params, fed = _setup(6, length=200, count_slots=1)
    n_cap = 1000
    rng = np.random.default_rng(1)
    deltas = {s: rng.uniform(-1, 1, 200) / np.sqrt(200) for s in params.site_ids}
    n_i = {s: int(rng.integers(1, n_cap)) for s in params.site_ids}
    result = fed.run({s: n_i[s] / n_cap * deltas[s] for s in params.site_ids}, {s: [n_i[s]] for s in params.site_ids})
    mean = n_cap * result.sum_vector / result.counts[0]
    true = sum(n_i[s] * deltas[s] for s in params.site_ids) / sum(n_i.values())
    assert np.abs(mean - true).max() <= n_cap * result.error_bound / result.counts[0]


def test_full_lora_size_round_trip() -> None:
    params, fed = _setup(5, length=74_883, count_slots=3)
    updates = _updates(params)
    inboxes = fed.share(fed.advertise())
    uploads = fed.masked_uploads(inboxes, updates, {s: [1, 2, 3] for s in params.site_ids})
    assert all(len(u) <= 1.1 * 4 * params.vector_length for u in uploads.values())
    request = fed.confirm(fed.server.collect_masked(uploads))
    _assert_sum(fed.unmask(request.to_bytes()), updates, set(params.site_ids))


# ---------------------------------------------------------------- dropouts


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("n", "dropped"), [(5, {3}), (10, {2, 7})])
@pytest.mark.parametrize("all_pairs", [True, False])
def test_dropout_at_each_stage(n: int, dropped: set[int], stage: str, all_pairs: bool) -> None:
    params, fed = _setup(n, count_slots=1, all_pairs=all_pairs)
    updates = _updates(params)
    if stage == "advertise" and not params.all_pairs:
        # A sparse graph is seeded by EVERY invited site's bundle: a missing one ends the round.
        with pytest.raises(RoundAborted, match="every invited site's key bundle"):
            fed.run(updates, {s: [1] for s in params.site_ids}, drop={stage: dropped})
        return
    result = fed.run(updates, {s: [1] for s in params.site_ids}, drop={stage: dropped})
    # A site that stops answering after its upload has already sent its input: it is counted.
    survivors = set(params.site_ids) - (dropped if stage not in LATE else set())
    _assert_sum(result, updates, survivors)
    assert result.counts == [len(survivors)]


@pytest.mark.parametrize("stage", STAGES)
def test_too_many_dropouts_abort_without_partial_result(stage: str) -> None:
    params, fed = _setup(5)  # all pairs, t = 4: at most one dropout
    with pytest.raises(RoundAborted):
        fed.run(_updates(params), drop={stage: {0, 4}})
    with pytest.raises(RoundAborted):
        fed.server.finish({})


def test_client_refuses_to_share_with_too_few_valid_neighbours() -> None:
    _, fed = _setup(5)
    routed = fed.advertise()
    client = fed.clients[0]
    with pytest.raises(ProtocolError, match="threshold"):
        client.share_keys({p: routed[0][p] for p in (1, 2)})
    assert client.stage is Stage.ABORTED


# ---------------------------------------------------------------- consistency round and unmask requests


def _signed_request(fed: LocalFederation, survivors: set[int], signers: set[int]) -> UnmaskRequest:
    """What a server holding ``signers``' signatures on ``survivors`` can send."""
    shown = SurvivorSet(fed.params.round_id, frozenset(survivors)).to_bytes()
    sigs = fed.signatures(dict.fromkeys(signers, shown))
    return UnmaskRequest(fed.params.round_id, frozenset(survivors), sigs)


def _harvest(fed: LocalFederation, views: dict[int, frozenset[int]]) -> tuple[dict, dict]:
    """A malicious server's best effort: show each site its own survivor set (``views``), then send
    each signer an unmask request for its set with EVERY signature collected on that set. Returns
    all the shares it gets: (self-mask shares by owner, key shares by owner)."""
    sigs: dict[frozenset[int], dict[int, bytes]] = {}
    for site, view in views.items():
        try:
            sigs.setdefault(view, {})[site] = fed.clients[site].confirm_survivors(
                SurvivorSet(fed.params.round_id, view).to_bytes())
        except ProtocolError:
            pass
    seeds: dict[int, list[Share]] = {}
    keys: dict[int, list[Share]] = {}
    for view, signed in sigs.items():
        request = UnmaskRequest(fed.params.round_id, view, signed).to_bytes()
        for site in signed:
            try:
                resp = fed.clients[site].unmask(request)
            except ProtocolError:
                continue
            for shares, out in ((resp.self_mask_shares, seeds), (resp.key_shares, keys)):
                for owner, blob in shares.items():
                    out.setdefault(owner, []).append(Share.from_bytes(blob[:SHARE_BYTES]))
    return seeds, keys


def _few_partners_attack(n: int, victim: int = 0) -> tuple[LocalFederation, set[int]]:
    """Issue #7 attack, stages 1-3: the server relays honestly except that the victim receives the
    share ciphertexts of only t - 1 partners (so it masks with them alone), while its own shares
    reach every other site."""
    params, fed = _setup(n, all_pairs=True)
    t = params.threshold
    inboxes = fed.share(fed.advertise())
    partners = set(sorted(set(params.site_ids) - {victim})[: t - 1])
    inboxes[victim] = {p: ct for p, ct in inboxes[victim].items() if p in partners}
    uploads = fed.masked_uploads(inboxes, _updates(params))
    assert fed.clients[victim].masked_with == frozenset(partners)
    assert victim in uploads  # the victim's masked input is in the server's hands
    return fed, partners


@pytest.mark.parametrize("n", [20, pytest.param(40, marks=pytest.mark.slow)])  # 40 sites: about 25 s
def test_few_partners_attack_recovers_nothing(n: int) -> None:
    # Before the consistency round, a server with NO colluder recovered the victim's update: it
    # named each partner "dropped" to exactly t of its holders (rebuilding the partners' mask keys)
    # and never named the victim dropped (every holder returned the victim's self-mask share).
    fed, partners = _few_partners_attack(n)
    everyone = frozenset(fed.params.site_ids)
    t, victim = fed.params.threshold, 0
    # Stripping the victim's pairwise masks needs every partner's key, so every partner must be
    # out of the survivor set the holders act on; the victim itself must stay in.
    attacks = {
        "one set without the partners": dict.fromkeys(everyone, everyone - partners),
        "split view: partners see all": {s: everyone if s in partners else everyone - partners for s in everyone},
        "split view: half and half": {s: everyone if s % 2 else everyone - partners for s in everyone},
    }
    saved = {s: c.export_state() for s, c in fed.clients.items()}  # each attack starts from these same sessions

    def fresh() -> LocalFederation:
        clients = {s: ClientSession.from_state(fed.params, c._identity, fed.registry, saved[s])
                   for s, c in fed.clients.items()}
        return LocalFederation(fed.params, fed.registry, clients, fed.server)

    for name, views in attacks.items():
        seeds, keys = _harvest(fresh(), views)
        victim_seed = len(seeds.get(victim, [])) >= t
        partner_keys = all(len(keys.get(p, [])) >= t for p in partners)
        assert not (victim_seed and partner_keys), f"{name}: the victim's update is exposed"
    # Control: the same harvest with the honest survivor set does get every self-mask seed, so the
    # refusals above are what protects the victim.
    seeds, keys = _harvest(fresh(), dict.fromkeys(everyone, everyone))
    assert len(seeds[victim]) >= t and not any(len(keys.get(p, [])) >= t for p in partners)


def test_split_view_server_cannot_get_both_secrets_of_a_site() -> None:
    # Flower's flaw: a server listing site 4 as dropped to some sites and survived to others.
    params, fed = _setup(5)  # 5 holders per site, t = 4
    _to_confirm(fed, _updates(params))
    everyone = frozenset(params.site_ids)
    seeds, keys = _harvest(fed, {0: everyone - {4}, 1: everyone - {4}, 2: everyone, 3: everyone, 4: everyone})
    assert len(seeds.get(4, [])) < params.threshold or len(keys.get(4, [])) < params.threshold
    for owner in everyone:
        assert not (seeds.get(owner) and keys.get(owner)), "a site's two secrets were both revealed"


def test_unmask_needs_threshold_signatures_on_the_same_set(caplog: pytest.LogCaptureFixture) -> None:
    params, fed = _setup(5)  # t = 4
    _to_confirm(fed, _updates(params))
    everyone = set(params.site_ids)
    short = _signed_request(fed, everyone, {0, 1, 2})  # only 3 of the 4 needed signatures
    with caplog.at_level(logging.WARNING), pytest.raises(ProtocolError, match="only 3 valid survivor-set signatures"):
        fed.clients[0].unmask(short)
    assert "refused unmask request" in caplog.text
    # The session is over: not even a well-formed request is answered afterwards.
    full = _signed_request(fed, everyone, {3, 4})
    full = UnmaskRequest(full.round_id, full.survivors, {**short.signatures, **full.signatures})
    with pytest.raises(ProtocolError, match="aborted-session"):
        fed.clients[0].unmask(full)
    assert fed.clients[0].stage is Stage.ABORTED and not fed.clients[0].holds_secrets
    assert set(fed.clients[1].unmask(full).self_mask_shares) == everyone


def test_forged_or_foreign_signatures_do_not_count() -> None:
    params, fed = _setup(5)
    _to_confirm(fed, _updates(params))
    everyone = frozenset(params.site_ids)
    good = _signed_request(fed, set(everyone), {0, 1, 2})
    mallory = SiteIdentity.generate()
    from common.secagg.identity import sign_survivors
    forged = {3: sign_survivors(mallory, params.digest, everyone), 4: good.signatures[0]}
    with pytest.raises(ProtocolError, match="only 3 valid"):
        fed.clients[1].unmask(UnmaskRequest(params.round_id, everyone, {**good.signatures, **forged}))


def test_site_unmasks_only_the_set_it_signed() -> None:
    params, fed = _setup(6)  # t = 5
    _to_confirm(fed, _updates(params))
    everyone = set(params.site_ids)
    _signed_request(fed, everyone, {0, 1, 2, 3, 4})
    other = everyone - {5}  # five signatures on another set would exist only from sites that signed twice
    request = UnmaskRequest(params.round_id, frozenset(other), _signed_request(fed, everyone, set()).signatures)
    with pytest.raises(ProtocolError, match="differs from the one this site signed"):
        fed.clients[0].unmask(request)


def test_each_site_signs_once() -> None:
    params, fed = _setup(5)
    _to_confirm(fed, _updates(params))
    fed.clients[0].confirm_survivors(SurvivorSet(params.round_id, frozenset(params.site_ids)))
    with pytest.raises(ProtocolError, match="replayed"):
        fed.clients[0].confirm_survivors(SurvivorSet(params.round_id, frozenset({0, 1, 2, 3})))


@pytest.mark.parametrize(
    ("survivors", "reason"),
    [
        ({1, 2, 3, 4}, "not listed as a survivor"),
        ({0, 1, 2}, "below the threshold"),
        ({0, 1, 2, 3, 4, 9}, "not invited"),
    ],
)
def test_unsafe_survivor_sets_are_not_signed(survivors: set[int], reason: str) -> None:
    params, fed = _setup(5)
    _to_confirm(fed, _updates(params))
    with pytest.raises(ProtocolError, match=reason):
        fed.clients[0].confirm_survivors(SurvivorSet(params.round_id, frozenset(survivors)))
    assert not fed.clients[0].holds_secrets


def test_requests_for_another_round_are_refused() -> None:
    params, fed = _setup(5)
    _to_confirm(fed, _updates(params))
    everyone = frozenset(params.site_ids)
    with pytest.raises(ProtocolError, match="another round"):
        fed.clients[2].confirm_survivors(SurvivorSet(b"another", everyone).to_bytes())
    request = _signed_request(fed, set(everyone), {0, 1, 3, 4})
    with pytest.raises(ProtocolError, match="another round"):
        fed.clients[1].unmask(UnmaskRequest(b"another", request.survivors, request.signatures))


def test_replayed_request_is_refused_and_secrets_are_wiped() -> None:
    params, fed = _setup(5)
    request = _to_unmask(fed, _updates(params))
    response = fed.clients[0].unmask(request)
    assert set(response.self_mask_shares) == set(params.site_ids) and not response.key_shares
    # Every secret is gone, the other sites' shares too (nothing is kept for a later stage).
    client = fed.clients[0]
    assert not client.holds_secrets and client.stage is Stage.DONE
    assert b'"secrets": {}' in client.export_state() and b'"held_key": {}' in client.export_state()
    with pytest.raises(ProtocolError, match="replayed"):
        client.unmask(request)


@pytest.mark.slow  # a recovery per corrupted share (about 6 s)
def test_corrupted_unmask_shares_are_discarded_one_by_one() -> None:
    # Each revealed share carries its dealer's signature: the server drops bad ones individually,
    # with no subset search (which 3 corrupt holders at t = 15 used to exhaust).
    params, fed = _setup(21, all_pairs=True)  # 21 holders, t = 15: six spare
    updates = _updates(params)
    responses = fed.unmask_responses(_to_unmask(fed, updates))
    for liar in range(5):
        bad = UnmaskResponse.from_bytes(responses[liar])
        shifted = {o: Share(Share.from_bytes(b[:SHARE_BYTES]).x, (Share.from_bytes(b[:SHARE_BYTES]).y + 1) % Q)
                   .to_bytes() + b[SHARE_BYTES:] for o, b in bad.self_mask_shares.items()}
        responses[liar] = UnmaskResponse(bad.round_id, liar, shifted, {}).to_bytes()
    responses[5] = b"garbage"
    _assert_sum(fed.server.finish(responses), updates, set(params.site_ids))


# ---------------------------------------------------------------- malicious relays and peers


def test_substituted_public_key_is_detected(caplog: pytest.LogCaptureFixture) -> None:
    params, fed = _setup(5)
    updates = _updates(params)
    routed = fed.advertise()
    mallory = SiteIdentity.generate()  # the server's own key, not in the registry
    routed[0][3] = sign_key_bundle(mallory, round_id=params.round_id, site_id=3, params_digest=params.digest,
                                   share_public=bytes(range(32)), commitments_digest=bytes(32)).to_bytes()
    with caplog.at_level(logging.WARNING):
        result = fed.unmask(fed.confirm(fed.upload(fed.share(routed), updates)))
    assert "neighbour 3 treated as dropped" in caplog.text
    assert 3 not in fed.clients[0].masked_with and 0 not in fed.clients[3].masked_with
    _assert_sum(result, updates, set(params.site_ids))


def test_signed_low_order_key_is_rejected() -> None:
    # A malicious site signs a bundle whose share key is a low-order point (all-zero DH secret).
    params = SecAggParams(round_id=b"r", site_ids=tuple(range(5)), vector_length=8)
    identities = {s: SiteIdentity.generate() for s in params.site_ids}
    fed = LocalFederation.create(params, identities)
    updates = _updates(params)
    up = {s: c.advertise_keys().to_bytes() for s, c in fed.clients.items()}
    good = SignedKeyBundle.from_bytes(up[3])
    up[3] = sign_key_bundle(identities[3], round_id=b"r", site_id=3, params_digest=params.digest,
                            share_public=bytes(32), commitments_digest=good.commitments_digest).to_bytes()
    routed = {s: {p: b.to_bytes() for p, b in v.items()} for s, v in fed.server.collect_bundles(up).items()}
    result = fed.unmask(fed.confirm(fed.upload(fed.share(routed), updates)))
    _assert_sum(result, updates, {0, 1, 2, 4})


@pytest.mark.parametrize("tamper", ["flip", "garbage", "truncate", "swap"])
@pytest.mark.parametrize(("n", "drops_sender"), [(5, False), (10, True)])
def test_tampered_share_is_rejected_without_crashing(tamper: str, n: int, drops_sender: bool) -> None:
    params, fed = _setup(n)
    updates = _updates(params)
    inboxes = fed.share(fed.advertise())
    sender = min(inboxes[0])  # one of site 0's neighbours
    ct = inboxes[0][sender]
    inboxes[0][sender] = {
        "flip": ct[:20] + bytes([ct[20] ^ 1]) + ct[21:],
        "garbage": b"garbage",
        "truncate": ct[:10],
        "swap": inboxes[0][next(p for p in inboxes[0] if p != sender)],  # another sender's valid ciphertext
    }[tamper]
    result = fed.unmask(fed.confirm(fed.upload(inboxes, updates)))
    # Site 0 rejects the sender's shares and does not mask with it, but the sender masked with 0.
    # The server drops the sender when its key stays recoverable (n = 10), else the receiver 0
    # (n = 5, t = 4: only 3 sites hold the sender's key), so the round goes on either way.
    assert sender not in fed.clients[0].masked_with and 0 in fed.clients[sender].masked_with
    _assert_sum(result, updates, set(params.site_ids) - {sender if drops_sender else 0})


@pytest.mark.parametrize("all_pairs", [True, False])
def test_site_sending_garbage_shares_to_everyone_is_the_one_dropped(all_pairs: bool) -> None:
    # Before: the honest receivers were dropped and the garbage sender stayed in.
    params, fed = _setup(10, all_pairs=all_pairs)
    updates = _updates(params)
    inboxes = fed.share(fed.advertise())
    for box in inboxes.values():
        if 4 in box:
            box[4] = bytes(len(box[4]))
    result = fed.unmask(fed.confirm(fed.upload(inboxes, updates)))
    _assert_sum(result, updates, set(params.site_ids) - {4})
    assert "rejected by sites" in fed.server.dropped_reasons[4]


@pytest.mark.parametrize("damage", ["truncated", "oversized", "other-round", "other-params", "other-site",
                                    "bad-partners", "not-bytes"])
def test_malformed_upload_drops_its_sender(damage: str) -> None:
    params, fed = _setup(10)
    updates = _updates(params)
    uploads = fed.masked_uploads(fed.share(fed.advertise()), updates)
    up = MaskedUpload.from_bytes(uploads[4], params)
    uploads[4] = {
        "truncated": uploads[4][:-1],
        "oversized": uploads[4] + b"\x00",
        "other-round": MaskedUpload(4, up.masked_with, up.body).to_bytes(
            SecAggParams(round_id=b"other", site_ids=params.site_ids, vector_length=params.vector_length)),
        "other-params": MaskedUpload(4, up.masked_with, up.body).to_bytes(
            SecAggParams(round_id=params.round_id, site_ids=params.site_ids, vector_length=params.vector_length,
                         clip=2.0)),
        "not-bytes": 2**40,
        "other-site": MaskedUpload(5, up.masked_with, up.body).to_bytes(params),
        "bad-partners": MaskedUpload(4, up.masked_with | {4}, up.body).to_bytes(params),
    }[damage]
    request = fed.confirm(fed.server.collect_masked(uploads))
    _assert_sum(fed.unmask(request), updates, set(params.site_ids) - {4})


def test_server_view_of_a_masked_vector_looks_uniform() -> None:
    params, fed = _setup(5, length=20_000)
    zeros = {s: np.zeros(params.vector_length, np.float32) for s in params.site_ids}
    uploads = fed.masked_uploads(fed.share(fed.advertise()), zeros)
    seen = unpack_bits(MaskedUpload.from_bytes(uploads[0], params).body, params.total_length, params.modulus_bits)
    quantised = quantize(zeros[0], value_bits=params.value_bits, clip=params.clip, rounding="nearest")
    assert np.mean(seen == quantised) < 1e-3
    length, m = seen.size, params.modulus_bits
    assert abs(float((seen / 2.0**m).mean()) - 0.5) < 5 * (1 / 12 / length) ** 0.5
    bits = (seen[:, None] >> np.arange(m, dtype=np.uint64)) & np.uint64(1)
    assert np.all(np.abs(bits.mean(axis=0) - 0.5) < 5 * 0.5 / length**0.5)
    top = (seen >> np.uint64(m - 4)).astype(np.int64)  # chi-square over 16 buckets, df = 15
    expected = length / 16
    assert float((((np.bincount(top, minlength=16) - expected) ** 2) / expected).sum()) < 45.0


# ---------------------------------------------------------------- state machines and parameters


def test_out_of_order_calls_are_refused() -> None:
    params, fed = _setup(5)
    client = fed.clients[0]
    with pytest.raises(ProtocolError, match="out-of-order"):
        client.masked_input({}, np.zeros(params.vector_length))
    with pytest.raises(ProtocolError, match="out-of-order"):
        fed.server.finish({})
    client.advertise_keys()
    with pytest.raises(ProtocolError, match="replayed"):
        client.advertise_keys()
    with pytest.raises(ProtocolError, match="out-of-order"):
        client.unmask(b"")


def test_session_state_survives_a_process_boundary() -> None:
    params, _ = _setup(5)
    updates = _updates(params)
    identities = {s: SiteIdentity.generate() for s in params.site_ids}
    fed = LocalFederation.create(params, identities)
    inboxes = fed.share(fed.advertise())
    fed.clients = {
        s: ClientSession.from_state(params, identities[s], fed.registry, c.export_state())
        for s, c in fed.clients.items()
    }
    survivors = fed.upload(inboxes, updates)
    restored = ClientSession.from_state(params, identities[0], fed.registry, fed.clients[0].export_state())
    request = fed.confirm(survivors)
    fed.clients = {
        s: ClientSession.from_state(params, identities[s], fed.registry, c.export_state())
        for s, c in fed.clients.items()
    }
    _assert_sum(fed.unmask(request), updates, set(params.site_ids))
    saved = ClientSession.from_state(params, identities[0], fed.registry, fed.clients[0].export_state())
    with pytest.raises(ProtocolError, match="replayed"):
        saved.unmask(request)
    assert restored.stage is Stage.MASKED and restored.holds_secrets and not saved.holds_secrets


def test_default_degree_and_threshold() -> None:
    for n, k, t in [(2, 1, 2), (3, 2, 3), (5, 4, 4), (10, 8, 7), (100, 14, 11), (1000, 20, 15)]:
        params = SecAggParams(round_id=b"r", site_ids=tuple(range(n)), vector_length=1)
        assert (params.degree, params.threshold) == (k, t)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 2},  # 5 holders: 2 <= 5/2 would let a server collect both secrets
        {"threshold": 6},
        {"degree": 3, "site_ids": tuple(range(10))},
        {"site_ids": (1,)},
        {"site_ids": (1, 1, 2)},
        {"site_ids": (-1, 2)},
        {"clip": 0.0},
        {"value_bits": 31},
        {"modulus_bits": 36},
        {"round_id": ""},
    ],
)
def test_invalid_params_rejected(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"round_id": "r", "site_ids": tuple(range(5)), "vector_length": 4}
    with pytest.raises(ParameterError):
        SecAggParams(**{**base, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [7, 50, 301])
def test_neighbour_graph_is_symmetric_regular_and_deterministic(n: int) -> None:
    ids = tuple(range(100, 100 + n))
    k = SecAggParams(round_id=b"r", site_ids=ids, vector_length=1).degree
    graph = neighbour_graph(ids, k, b"r")
    assert graph == neighbour_graph(ids, k, b"r")
    assert all(len(nbrs) == k and s not in nbrs for s, nbrs in graph.items())
    assert all(s in graph[p] for s, nbrs in graph.items() for p in nbrs)
    seen, frontier = {ids[0]}, [ids[0]]
    while frontier:
        frontier = [p for s in frontier for p in graph[s] if p not in seen and not seen.add(p)]  # type: ignore[func-returns-value]
    assert len(seen) == n
    if k < n - 1:
        assert graph != neighbour_graph(ids, k, b"another round")
