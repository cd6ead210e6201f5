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
    ServerAggregator,
    SignedKeyBundle,
    SiteIdentity,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
    decode_sum,
    neighbour_graph,
    quantize,
    unpack_bits,
)
from common.secagg.identity import sign_key_bundle
from common.secagg.shamir import PRIME, ShamirError, Share, combine

STAGES = ("advertise", "share", "upload", "unmask")


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


def _to_stage4(fed: LocalFederation, updates: dict[int, np.ndarray]) -> dict[int, bytes]:
    return fed.upload(fed.share(fed.advertise()), updates)


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


@settings(max_examples=15, deadline=None)
@given(n=st.integers(5, 9), stage=st.sampled_from(STAGES), data=st.data())
def test_any_single_dropout_is_survived(n: int, stage: str, data: st.DataObject) -> None:
    params, fed = _setup(n, length=16)
    victim = data.draw(st.integers(0, n - 1))
    updates = _updates(params, seed=victim)
    result = fed.run(updates, drop={stage: {victim}})
    _assert_sum(result, updates, set(params.site_ids) - ({victim} if stage != "unmask" else set()))


@pytest.mark.parametrize("n", [5, 10, 40])
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
    requests = {s: r.to_bytes() for s, r in fed.server.collect_masked(uploads).items()}
    _assert_sum(fed.unmask(requests), updates, set(params.site_ids))


# ---------------------------------------------------------------- dropouts


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("n", "dropped"), [(5, {3}), (10, {2, 7})])
def test_dropout_at_each_stage(n: int, dropped: set[int], stage: str) -> None:
    params, fed = _setup(n, count_slots=1)
    updates = _updates(params)
    result = fed.run(updates, {s: [1] for s in params.site_ids}, drop={stage: dropped})
    # A site that stops answering only at unmasking has already sent its input: it is counted.
    survivors = set(params.site_ids) - (dropped if stage != "unmask" else set())
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


# ---------------------------------------------------------------- unmask requests


def _request(fed: LocalFederation, site: int, survivors: set[int], dropped: set[int]) -> UnmaskRequest:
    return UnmaskRequest(fed.params.round_id, site, frozenset(survivors), frozenset(dropped))


def test_request_listing_a_site_as_survived_and_dropped_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    params, fed = _setup(5)
    _to_stage4(fed, _updates(params))
    with caplog.at_level(logging.WARNING), pytest.raises(ProtocolError, match="both survived and dropped"):
        fed.clients[0].unmask(_request(fed, 0, {0, 1, 2, 3, 4}, {4}))
    assert "refused unmask request" in caplog.text
    # The session is over: not even a well-formed request is answered afterwards.
    with pytest.raises(ProtocolError):
        fed.clients[0].unmask(_request(fed, 0, {0, 1, 2, 3, 4}, set()))


def test_replayed_or_second_request_is_refused() -> None:
    params, fed = _setup(5)
    requests = _to_stage4(fed, _updates(params))
    response = fed.clients[0].unmask(requests[0])
    assert set(response.self_mask_shares) == {0, 1, 2, 3, 4} and not response.key_shares
    with pytest.raises(ProtocolError, match="replayed"):
        fed.clients[0].unmask(requests[0])
    with pytest.raises(ProtocolError, match="replayed"):  # now asking for site 4's key share instead
        fed.clients[0].unmask(_request(fed, 0, {0, 1, 2, 3}, {4}))


@pytest.mark.parametrize(
    ("site", "survivors", "dropped", "reason"),
    [
        (0, {1, 2, 3, 4}, {0}, "not listed as a survivor"),
        (0, {0, 1, 2}, {3, 4}, "below the threshold"),
    ],
)
def test_unsafe_requests_are_refused(site: int, survivors: set[int], dropped: set[int], reason: str) -> None:
    params, fed = _setup(5)
    _to_stage4(fed, _updates(params))
    with pytest.raises(ProtocolError, match=reason):
        fed.clients[site].unmask(_request(fed, site, survivors, dropped))


def test_request_naming_non_neighbours_or_another_round_is_refused() -> None:
    params, fed = _setup(10)  # k = 8: every site has one non-neighbour
    _to_stage4(fed, _updates(params))
    (stranger,) = set(params.site_ids) - params.holders(0)
    with pytest.raises(ProtocolError, match="not neighbours"):
        fed.clients[0].unmask(_request(fed, 0, set(params.holders(0)) - {stranger}, {stranger}))
    other_round = UnmaskRequest(b"another", 1, frozenset(params.holders(1)), frozenset())
    with pytest.raises(ProtocolError, match="another round"):
        fed.clients[1].unmask(other_round)


def test_split_view_server_cannot_get_both_secrets_of_a_site() -> None:
    # Flower's flaw: a server listing site 4 as dropped to some and survived to others.
    params, fed = _setup(5)  # 5 holders per site, t = 4
    _to_stage4(fed, _updates(params))
    key_shares, seed_shares = [], []
    for site in (0, 1):
        resp = fed.clients[site].unmask(_request(fed, site, {0, 1, 2, 3}, {4}))
        key_shares.append(Share.from_bytes(resp.key_shares[4]))
    for site in (2, 3, 4):
        resp = fed.clients[site].unmask(_request(fed, site, {0, 1, 2, 3, 4}, set()))
        seed_shares.append(Share.from_bytes(resp.self_mask_shares[4]))
    for shares in (key_shares, seed_shares):
        with pytest.raises(ShamirError, match="needed"):
            combine(shares, params.threshold)


def test_corrupted_unmask_shares_are_skipped() -> None:
    params, fed = _setup(10)  # 9 holders, t = 7: spare shares to route around bad ones
    updates = _updates(params)
    responses = fed.unmask_responses(fed.upload(fed.share(fed.advertise()), updates))
    bad = UnmaskResponse.from_bytes(responses[0])
    shifted = {o: Share(s.x, (s.y + 1) % PRIME).to_bytes() for o, s in
               ((o, Share.from_bytes(b)) for o, b in bad.self_mask_shares.items())}
    responses[0] = UnmaskResponse(bad.round_id, 0, shifted, {}).to_bytes()
    responses[1] = b"garbage"
    _assert_sum(fed.server.finish(responses), updates, set(params.site_ids))


# ---------------------------------------------------------------- malicious relays and peers


def test_substituted_public_key_is_detected(caplog: pytest.LogCaptureFixture) -> None:
    params, fed = _setup(5)
    updates = _updates(params)
    routed = fed.advertise()
    mallory = SiteIdentity.generate()  # the server's own key, not in the registry
    routed[0][3] = sign_key_bundle(mallory, round_id=params.round_id, site_id=3, share_public=bytes(range(32)),
                                   mask_public=bytes(range(1, 33)), seed_commitment=bytes(32)).to_bytes()
    with caplog.at_level(logging.WARNING):
        result = fed.unmask(fed.upload(fed.share(routed), updates))
    assert "neighbour 3 treated as dropped" in caplog.text
    assert 3 not in fed.clients[0].masked_with and 0 not in fed.clients[3].masked_with
    _assert_sum(result, updates, set(params.site_ids))


@pytest.mark.parametrize("with_registry", [True, False])
def test_signed_low_order_key_is_rejected(with_registry: bool) -> None:
    # A malicious site signs a bundle whose mask key is a low-order point (all-zero DH secret).
    params = SecAggParams(round_id=b"r", site_ids=tuple(range(5)), vector_length=8)
    identities = {s: SiteIdentity.generate() for s in params.site_ids}
    fed = LocalFederation.create(params, identities)
    if not with_registry:
        fed.server = ServerAggregator(params)  # the clients must catch it themselves
    updates = _updates(params)
    up = {s: c.advertise_keys().to_bytes() for s, c in fed.clients.items()}
    good = SignedKeyBundle.from_bytes(up[3])
    up[3] = sign_key_bundle(identities[3], round_id=b"r", site_id=3, share_public=good.share_public,
                            mask_public=bytes(32), seed_commitment=good.seed_commitment).to_bytes()
    routed = {s: {p: b.to_bytes() for p, b in v.items()} for s, v in fed.server.collect_bundles(up).items()}
    result = fed.unmask(fed.upload(fed.share(routed), updates))
    _assert_sum(result, updates, {0, 1, 2, 4})


@pytest.mark.parametrize("tamper", ["flip", "garbage", "truncate", "swap"])
@pytest.mark.parametrize(("n", "expected_dropped"), [(5, 0), (10, 3)])
def test_tampered_share_is_rejected_without_crashing(tamper: str, n: int, expected_dropped: int) -> None:
    params, fed = _setup(n)
    updates = _updates(params)
    inboxes = fed.share(fed.advertise())
    ct = inboxes[0][3]
    inboxes[0][3] = {
        "flip": ct[:20] + bytes([ct[20] ^ 1]) + ct[21:],
        "garbage": b"garbage",
        "truncate": ct[:10],
        "swap": inboxes[0][next(p for p in inboxes[0] if p != 3)],  # another sender's valid ciphertext
    }[tamper]
    result = fed.unmask(fed.upload(inboxes, updates))
    # Site 0 rejects 3's shares and does not mask with 3, but 3 masked with 0. The server drops
    # the sender 3 when its key stays recoverable (n = 10), else the receiver 0 (n = 5, t = 4).
    assert 3 not in fed.clients[0].masked_with and 0 in fed.clients[3].masked_with
    _assert_sum(result, updates, set(params.site_ids) - {expected_dropped})


@pytest.mark.parametrize("damage", ["truncated", "oversized", "other-round", "other-site", "bad-partners"])
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
        "other-site": MaskedUpload(5, up.masked_with, up.body).to_bytes(params),
        "bad-partners": MaskedUpload(4, up.masked_with | {4}, up.body).to_bytes(params),
    }[damage]
    requests = {s: r.to_bytes() for s, r in fed.server.collect_masked(uploads).items()}
    _assert_sum(fed.unmask(requests), updates, set(params.site_ids) - {4})


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
    with pytest.raises(ProtocolError, match="out-of-order"):
        client.advertise_keys()


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
    requests = fed.upload(inboxes, updates)
    restored = ClientSession.from_state(params, identities[0], fed.registry, fed.clients[0].export_state())
    _assert_sum(fed.unmask(requests), updates, set(params.site_ids))
    saved = ClientSession.from_state(params, identities[0], fed.registry, fed.clients[0].export_state())
    with pytest.raises(ProtocolError, match="replayed"):
        saved.unmask(requests[0])
    assert restored.stage is Stage.MASKED


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
