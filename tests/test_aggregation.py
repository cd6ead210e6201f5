"""Aggregation arithmetic, checked by hand: weighted means, deltas, and why FFA-LoRA is exact."""

import numpy as np
import pytest

from common.adapter import apply_delta, delta, flatten, trainable_keys, unflatten
from server.strategy import weighted_mean


def test_weighted_mean_by_hand():
    # Prepare: two sites, 1 and 3 examples.  Execute.  Assert: (1*[0,4] + 3*[4,0]) / 4 = [3, 1].
    mean = weighted_mean([np.array([0, 4], np.float32), np.array([4, 0], np.float32)], [1, 3])
    np.testing.assert_array_equal(mean, [3, 1])


def test_applying_a_ones_delta_twice_at_zero_start_gives_exactly_two():
    state = {"x.lora_B.weight": np.zeros((2, 2), np.float32), "x.lora_A.weight": np.zeros((2, 2), np.float32)}
    keys = trainable_keys(state, "ffa")
    assert keys == ["x.lora_B.weight"]  # A is frozen under FFA-LoRA and never sent
    for _ in range(2):
        state = apply_delta(state, np.ones(4, np.float32), keys)
    np.testing.assert_array_equal(state["x.lora_B.weight"], 2 * np.ones((2, 2)))
    np.testing.assert_array_equal(state["x.lora_A.weight"], np.zeros((2, 2)))


def test_flatten_unflatten_and_delta_round_trip():
    rng = np.random.default_rng(1)
    before = {k: rng.normal(size=s).astype(np.float32) for k, s in [("b", (3, 2)), ("a", (2,)), ("c", (1, 4))]}
    after = {k: v + 1 for k, v in before.items()}
    keys = trainable_keys(before, "plain")
    assert keys == ["a", "b", "c"]
    np.testing.assert_allclose(delta(after, before, keys), np.ones(12))
    back = unflatten(flatten(before, keys), before, keys)
    assert all(np.array_equal(back[k], before[k]) for k in keys)


def test_ffa_mean_is_exact_and_plain_averaging_is_not():
    rng = np.random.default_rng(2)
    sites, d, r = 4, 16, 4
    shared_a = rng.normal(size=(r, d))
    site_b = [rng.normal(size=(d, r)) for _ in range(sites)]
    site_a = [shared_a + rng.normal(scale=0.5, size=(r, d)) for _ in range(sites)]
    weights = [5, 1, 3, 7]
    exact = sum(w * b @ shared_a for w, b in zip(weights, site_b, strict=True)) / sum(weights)
    # FFA: A identical everywhere, so mean(B)·A equals the mean of the sites' B·A.
    ffa = weighted_mean([b.ravel().astype(np.float32) for b in site_b], weights).reshape(d, r) @ shared_a
    np.testing.assert_allclose(ffa, exact, rtol=1e-5, atol=1e-5)
    # Plain: sites trained A too; mean(B)·mean(A) differs from mean(B·A).
    wanted = sum(w * b @ a for w, b, a in zip(weights, site_b, site_a, strict=True)) / sum(weights)
    mean_b = sum(w * b for w, b in zip(weights, site_b, strict=True)) / sum(weights)
    mean_a = sum(w * a for w, a in zip(weights, site_a, strict=True)) / sum(weights)
    gap = np.linalg.norm(mean_b @ mean_a - wanted) / np.linalg.norm(wanted)
    assert gap > 0.05


def test_weights_above_the_cap_count_as_the_cap_in_update_and_sum_alike():
    """Two sites declaring more than W with the same delta must average to that delta (not half of it):
    the cap applies to the weight in the update and to the weight it is divided by."""
    from common.config import SecureAggSettings
    from common.secagg import LocalFederation
    from common.secure_update import decode_sum, encode_contribution, round_params, site_weight

    settings = SecureAggSettings(registry="r.json", max_examples=100, clip=5.0)
    delta = np.linspace(-0.5, 0.5, 12)
    params = round_params(settings, run_id=1, server_round=1, site_ids=[0, 1, 2], vector_length=12,
                          members_digest=bytes(32))
    weights = {0: site_weight(20_000, settings), 1: site_weight(30_000, settings), 2: site_weight(None, settings)}
    assert weights == {0: 100, 1: 100, 2: 100}
    encoded = {site: encode_contribution(delta, w, settings)[0] for site, w in weights.items()}
    result = LocalFederation.create(params).run(encoded)
    total = decode_sum(result, settings, params, sum(weights.values()))
    assert total.total_weight == 300 and total.clamped_elements == 0
    np.testing.assert_allclose(total.mean_delta, delta, atol=total.error_bound + 1e-7)


def test_declared_weights_below_the_cap_weigh_the_mean():
    from common.config import SecureAggSettings
    from common.secagg import LocalFederation
    from common.secure_update import decode_sum, encode_contribution, round_params

    settings = SecureAggSettings(registry="r.json", max_examples=100, clip=5.0)
    deltas = {0: np.full(4, 1.0), 1: np.full(4, 0.0), 2: np.full(4, 0.0)}
    params = round_params(settings, run_id=1, server_round=1, site_ids=[0, 1, 2], vector_length=4,
                          members_digest=bytes(32))
    weights = {0: 50, 1: 25, 2: 25}
    encoded = {s: encode_contribution(deltas[s], w, settings)[0] for s, w in weights.items()}
    result = LocalFederation.create(params).run(encoded)
    total = decode_sum(result, settings, params, sum(weights.values()))
    np.testing.assert_allclose(total.mean_delta, np.full(4, 0.5), atol=total.error_bound + 1e-7)


def test_a_hostile_sites_out_of_range_input_is_clamped_not_allowed_to_abort_the_round():
    """A site that skips the encoder and uploads values beyond the quantiser's range: the round still
    ends with a sum, the offending elements clamped into the range honest inputs reach, and said so."""
    from common.config import SecureAggSettings
    from common.secagg import LocalFederation
    from common.secure_update import decode_sum, encode_contribution, round_params

    settings = SecureAggSettings(registry="r.json", max_examples=100, clip=1.0)
    params = round_params(settings, run_id=1, server_round=1, site_ids=[0, 1, 2, 3, 4], vector_length=6,
                          members_digest=bytes(32))
    federation = LocalFederation.create(params)
    hostile = federation.clients[4]
    hostile._encode = lambda update, counts: np.full(params.total_length, params.modulus_mask // 2, dtype=np.uint64)
    updates = {s: encode_contribution(np.full(6, 0.01), 100, settings)[0] for s in range(5)}
    result = federation.run(updates)
    assert result.survivors == frozenset(range(5)) and result.clamped == 6
    total = decode_sum(result, settings, params, 500)
    assert np.all(np.abs(total.mean_delta) <= settings.clip + total.error_bound)


def _steered_mean(sites: int, length: int, clip: float, target: np.ndarray, hostile_steers: bool):
    """A secure round of ``sites`` sites with small honest updates, where the last site either sends an
    honest zero update or skips the encoder and uploads the ring values that set each element of the
    sum to 0.9·clip·target (it knows the others' inputs are near zero, so it can aim)."""
    from common.config import SecureAggSettings
    from common.secagg import LocalFederation
    from common.secagg.fixedpoint import quantization_step
    from common.secure_update import decode_sum, encode_contribution, round_params

    settings = SecureAggSettings(registry="r.json", max_examples=100, clip=clip)
    params = round_params(settings, run_id=1, server_round=1, site_ids=list(range(sites)), vector_length=length,
                          members_digest=bytes(32))
    federation = LocalFederation.create(params)
    if hostile_steers:
        step = quantization_step(params.value_bits, clip)
        honest_levels = (sites - 1) * round(clip / step)  # what the others' near-zero inputs sum to
        wanted = np.rint((sites * 0.9 * clip * target + sites * clip) / step).astype(np.int64)
        ring = (wanted - honest_levels) % (params.modulus_mask + 1)
        federation.clients[sites - 1]._encode = lambda update, counts: ring.astype(np.uint64)
    rng = np.random.default_rng(7)
    updates = {s: encode_contribution(rng.normal(scale=1e-3, size=length), 100, settings)[0] for s in range(sites)}
    updates[sites - 1] = np.zeros(length)
    total = decode_sum(federation.run(updates), settings, params, 100 * sites)
    return total


def test_one_hostile_site_moves_the_mean_at_most_as_far_as_all_honest_sites_could():
    """The steering attack: one site skips the encoder and sets the sum, element by element, to a pattern
    of its choice (per element the sum stays within what n in-range inputs reach, so no element is
    clamped). Its influence on the mean is bounded by the mean's honest L2 bound (C with equal weights):
    at most 2C, i.e. ``sites`` times what one in-range input can do (2C / sites), however long the vector.
    Without the bound it was 0.9·C·√L (45x one in-range input at L = 400)."""
    sites, length, clip = 5, 400, 1.0
    target = np.where(np.arange(length) % 3 == 0, 1.0, -1.0)
    honest = _steered_mean(sites, length, clip, target, hostile_steers=False)
    steered = _steered_mean(sites, length, clip, target, hostile_steers=True)
    assert steered.clamped_elements == 0 and not honest.mean_clipped  # each element looked possible
    assert steered.mean_clipped
    influence = float(np.linalg.norm(steered.mean_delta - honest.mean_delta))
    in_range = 2 * clip / sites  # the most one honest-looking input can move the mean
    slack = steered.error_bound * np.sqrt(length)
    assert influence <= 2 * clip + 2 * slack, influence
    assert influence / in_range <= sites + 1e-3 + 2 * slack / in_range
    # It still aims: what remains is the direction, within the norm honest sites could reach.
    cosine = float(steered.mean_delta @ target / (np.linalg.norm(steered.mean_delta) * np.linalg.norm(target)))
    assert cosine > 0.99


def test_the_plain_mean_clips_each_update_as_a_secure_round_does():
    """--plain-aggregation: a site's oversized update is clipped to C like a secure contribution, so the
    mean's norm stays within the honest bound there too."""
    from common.config import SecureAggSettings
    from common.secure_update import bounded_mean, encode_contribution, honest_mean_norm

    settings = SecureAggSettings(registry="r.json", max_examples=100, clip=1.0)
    updates = [np.full(16, 1e3), np.zeros(16), np.zeros(16)]
    contributions = [encode_contribution(u, 100, settings)[0] for u in updates]
    mean, clipped = bounded_mean(np.sum(contributions, axis=0), settings, 3, 300)
    assert not clipped
    assert np.linalg.norm(mean) == pytest.approx(1.0 / 3, rel=1e-5)
    assert honest_mean_norm(settings, 3, 300) == 1.0
