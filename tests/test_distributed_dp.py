"""The distributed-DP mechanism (common/distributed_dp.py): rounding bound, rotation, ring, noise, accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.distributed_dp import (
    RDP_ORDERS,
    DistributedDpError,
    DistributedDpSettings,
    centred,
    check_participants,
    conditional_round,
    decode_sum,
    encode_units,
    fwht,
    l1_bound,
    noise_share,
    plan_distributed_dp,
    rdp_to_epsilon,
    rotate,
    rotation_seed,
    site_contribution,
    skellam_epsilon,
    skellam_rdp,
    subsampled_rdp,
    sum_norm_bound,
    to_ring,
    unrotate,
    variance_for_epsilon,
)
from common.secagg.fixedpoint import MAX_MODULUS_BITS

SMALL = DistributedDpSettings(dimension=1000, clip=1.0, sample_rate=0.05, steps=200, epsilon=8.0, delta=1e-5,
                              sites=3, min_honest_sites=3, expected_batch=10.0)


def adversarial_units(dimension: int, clip: float) -> np.ndarray:
    """Units at the clip that are hard to round: all mass in one coordinate, spread evenly, half-integers after
    scaling are left to the rotation, random directions."""
    rows = [np.eye(dimension)[0] * clip, -np.eye(dimension)[dimension - 1] * clip,
            np.full(dimension, clip / math.sqrt(dimension)), np.zeros(dimension)]
    random = np.random.default_rng(0).normal(size=(60, dimension))
    rows.extend(random / np.linalg.norm(random, axis=1, keepdims=True) * clip)
    return np.stack(rows)


def test_conditional_rounding_stays_within_the_l2_and_l1_bounds() -> None:
    # Prepare: a plan, units at the clip (adversarial and random), and worst-case fractional parts (all ½)
    plan = plan_distributed_dp(SMALL)
    units = adversarial_units(SMALL.dimension, SMALL.clip)
    scaled = rotate(units, rotation_seed(0, 1), plan.padded_dimension) * plan.scale
    level = plan.scale * SMALL.clip / math.sqrt(plan.padded_dimension)  # norm γC when every coordinate is this
    level = math.floor(level) + 0.5 if math.floor(level) + 0.5 <= level else math.floor(level) - 0.5
    halves = np.full((20, plan.padded_dimension), level)  # every coordinate exactly between two integers, norm ≤ γC
    generator = np.random.default_rng()
    for rows in (scaled, halves):
        for _ in range(5):
            # Execute
            rounded = conditional_round(rows, plan.unit_l2_bound, generator)
            # Assert: every unit's integer vector is within Δ₂ and Δ₁, and no unit was zeroed
            assert np.linalg.norm(rounded, axis=1).max() <= plan.unit_l2_bound
            assert np.abs(rounded).sum(axis=1).max() <= plan.unit_l1_bound
            assert (np.abs(rounded - rows) < 1).all()


def test_encoding_one_unit_is_within_the_bound_whatever_it_holds() -> None:
    plan = plan_distributed_dp(SMALL)
    seed = rotation_seed(3, 7)
    hostile = [np.full(SMALL.dimension, 1e6), np.full(SMALL.dimension, np.nan),
               adversarial_units(SMALL.dimension, SMALL.clip)[0]]
    for unit in hostile:
        encoded = encode_units(plan, unit[None, :], seed)
        assert np.linalg.norm(encoded) <= plan.unit_l2_bound
    assert not encode_units(plan, hostile[1][None, :], seed).any()  # not finite: contributes zero


def test_walsh_hadamard_matches_the_matrix_and_rotation_inverts_exactly() -> None:
    # The fast transform equals the explicit orthonormal Hadamard matrix (Sylvester), factor splits included.
    for bits in (0, 1, 3, 7, 8, 9):
        size = 1 << bits
        matrix = np.ones((1, 1))
        while matrix.shape[0] < size:
            matrix = np.block([[matrix, matrix], [matrix, -matrix]])
        vectors = np.random.default_rng(bits).normal(size=(3, size))
        np.testing.assert_allclose(fwht(vectors), vectors @ matrix.T / math.sqrt(size), atol=1e-12)
    # Rotation: the same public seed gives the same rotation, another seed another, and the inverse is exact.
    units = np.random.default_rng(1).normal(size=(4, 1000))
    seed = rotation_seed(5, 2)
    rotated = rotate(units, seed, 1024)
    np.testing.assert_array_equal(rotated, rotate(units, rotation_seed(5, 2), 1024))
    assert not np.allclose(rotated, rotate(units, rotation_seed(5, 3), 1024))
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=1), np.linalg.norm(units, axis=1), rtol=1e-12)
    np.testing.assert_allclose(unrotate(rotated, seed, 1000), units, atol=1e-12)


def test_sites_sum_decodes_to_the_clipped_gradient_sum_within_the_noise() -> None:
    # Prepare: 3 sites with 8 clipped units each, all in one direction (the largest sum)
    plan = plan_distributed_dp(SMALL)
    seed = rotation_seed(0, 4)
    direction = np.random.default_rng(2).normal(size=SMALL.dimension)
    direction /= np.linalg.norm(direction)
    sites = [np.tile(direction, (8, 1)) * SMALL.clip for _ in range(3)]
    # Execute: each site uploads mod 2^b; the secure sum adds mod 2^b; the server decodes
    ring_sum = np.zeros(plan.padded_dimension, dtype=np.uint64)
    for units in sites:
        ring_sum = (ring_sum + site_contribution(plan, units, seed)) & np.uint64((1 << plan.ring_bits) - 1)
    decoded = decode_sum(plan, ring_sum, seed, participants=3, honest_sites=3)
    assert not decoded.clipped
    decoded = decoded.noisy_sum
    # Assert: the error is the noise (3 shares of μ/3) and the rounding, nothing else
    error = decoded - 24 * direction * SMALL.clip
    expected = math.sqrt(plan.total_variance + 24 / 4) / plan.scale
    assert 0.85 * expected < error.std() < 1.15 * expected
    assert abs(error.mean()) < 5 * expected / math.sqrt(SMALL.dimension)
    # Without the noise, the sum is exact up to the rounding (below 1 per unit and rotated coordinate).
    exact = decode_sum(plan, to_ring(encode_units(plan, np.concatenate(sites), seed), plan.ring_bits), seed,
                       participants=3, honest_sites=3).noisy_sum
    assert np.linalg.norm(exact - 24 * direction) <= 24 * math.sqrt(plan.padded_dimension) / plan.scale


NORM_CASE = DistributedDpSettings(dimension=1 << 14, clip=1.0, sample_rate=0.05, steps=200, epsilon=8.0, delta=1e-5,
                                  sites=3, min_honest_sites=3, expected_batch=20.0)


def _honest_ring_sum(plan, units: np.ndarray, seed: int) -> np.ndarray:
    """3 honest sites' uploads of ``units`` (split among them), each with its share μ/3, summed mod 2^b."""
    ring_sum = np.zeros(plan.padded_dimension, dtype=np.uint64)
    for part in np.array_split(units, 3):
        ring_sum = (ring_sum + site_contribution(plan, part, seed)) & np.uint64((1 << plan.ring_bits) - 1)
    return ring_sum


def test_the_largest_honest_sum_stays_within_the_norm_bound_which_is_tight() -> None:
    # Prepare: the worst honest round: as many units as the batch bound allows, all at the clip, one direction
    plan = plan_distributed_dp(NORM_CASE)
    seed = rotation_seed(0, 2)
    direction = np.random.default_rng(4).normal(size=NORM_CASE.dimension)
    units = np.tile(direction / np.linalg.norm(direction), (plan.batch_bound, 1))
    bound = sum_norm_bound(plan, participants=3, honest_sites=3)
    # Execute: the sites' ring sum, decoded by the server
    ring_sum = _honest_ring_sum(plan, units, seed)
    decoded = decode_sum(plan, ring_sum, seed, participants=3, honest_sites=3)
    # Assert: nothing scaled down, and the bound is at most 10 % above the norm that round reached
    norm = float(np.linalg.norm(centred(ring_sum, plan.ring_bits)))
    assert not decoded.clipped and norm <= bound < 1.1 * norm


def test_a_hostile_upload_moves_the_sum_at_most_twice_the_honest_bound() -> None:
    """In the ring every vector mod 2^b is a possible upload, so one site can add anything; the server scales a sum
    beyond what honest uploads reach down to that bound. Without it one site moves the sum by up to 2^(b−1)·√d' (12-18×
    the bound in the BANKING77 plans; here, at half that, 8×); with it by at most twice the bound, in a direction it
    chooses."""
    plan = plan_distributed_dp(NORM_CASE)
    seed = rotation_seed(0, 3)
    units = np.random.default_rng(5).normal(size=(20, NORM_CASE.dimension)) * 0.01
    honest = _honest_ring_sum(plan, units, seed)
    target = np.where(np.arange(plan.padded_dimension) % 3 == 0, 1, -1) << (plan.ring_bits - 2)
    attacked = (honest + to_ring(target, plan.ring_bits)) & np.uint64((1 << plan.ring_bits) - 1)
    bound = sum_norm_bound(plan, participants=3, honest_sites=3)
    before = decode_sum(plan, honest, seed, participants=3, honest_sites=3)
    after = decode_sum(plan, attacked, seed, participants=3, honest_sites=3)
    assert not before.clipped and after.clipped
    influence = float(np.linalg.norm(after.noisy_sum - before.noisy_sum)) * plan.scale
    unbounded = float(np.linalg.norm(centred(attacked, plan.ring_bits) - centred(honest, plan.ring_bits)))
    assert influence <= 2 * bound < unbounded / 4
    # The site still aims: within the bound it chose the direction
    aimed = unrotate(target[None, :].astype(np.float64), seed, NORM_CASE.dimension)[0]
    cosine = float(after.noisy_sum @ aimed / (np.linalg.norm(after.noisy_sum) * np.linalg.norm(aimed)))
    assert cosine > 0.9


def test_noise_shares_add_up_to_the_accountants_variance() -> None:
    # Prepare: h = 4 honest sites' shares over 2^16 coordinates, from OS entropy (not seeded)
    settings = DistributedDpSettings(dimension=1 << 16, clip=1.0, sample_rate=0.05, steps=200, epsilon=8.0,
                                     delta=1e-5, sites=4, min_honest_sites=4, expected_batch=10.0)
    plan = plan_distributed_dp(settings)
    # Execute: what the server reads when every unit is absent: the sum of the shares, through the ring
    ring_sum = np.zeros(plan.padded_dimension, dtype=np.uint64)
    for _ in range(4):
        ring_sum = (ring_sum + to_ring(noise_share(plan), plan.ring_bits)) & np.uint64((1 << plan.ring_bits) - 1)
    noise = centred(ring_sum, plan.ring_bits).astype(np.float64)
    # Assert: a Skellam of variance μ has mean 0, 4th cumulant μ; the sample variance of N draws has standard
    # deviation √((μ + 2μ²)/N), the mean √(μ/N). Normal approximation at N = 65,536: |z| > 5.33 (variance) or
    # 5.33 (mean) has probability < 1e-7 each, so the test fails wrongly with probability < 1e-6.
    n, mu = noise.size, plan.total_variance
    assert abs(noise.var() - mu) < 5.33 * math.sqrt((mu + 2 * mu**2) / n)
    assert abs(noise.mean()) < 5.33 * math.sqrt(mu / n)


def _independent_epsilon(variance: float, l2: float, l1: float, q: float, steps: int, delta: float) -> float:
    """The accountant recomputed independently: a loop over orders in plain floats, Opacus' conversion."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    def skellam(alpha: int) -> float:  # Agarwal, Kairouz, Liu 2021, Theorem 3.5
        return alpha * l2**2 / (2 * variance) + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * variance**2),
                                                    3 * l1 / (2 * variance))

    def log_sum(logs: list[float]) -> float:
        peak = max(logs)
        return peak + math.log(sum(math.exp(x - peak) for x in logs))

    rdps = []
    for alpha in range(2, 257):
        head = math.log((1 - q) ** (alpha - 1) * (alpha * q - q + 1))
        tail = [math.log(math.comb(alpha, k)) + (alpha - k) * math.log(1 - q) + k * math.log(q)
                + (k - 1) * skellam(k) for k in range(2, alpha + 1)]
        rdps.append(min(log_sum([head, *tail]) / (alpha - 1), skellam(alpha)))
    return float(get_privacy_spent(orders=list(range(2, 257)), rdp=[steps * r for r in rdps], delta=delta)[0])


@pytest.mark.parametrize("honest", [1, 2, 3])
def test_epsilons_recomputed_independently(honest: int) -> None:
    # Prepare: small sensitivities, where Skellam's correction to the Gaussian term matters
    settings = DistributedDpSettings(dimension=16, clip=1.0, sample_rate=0.1, steps=50, epsilon=3.0, delta=1e-5,
                                     sites=3, min_honest_sites=honest, expected_batch=5.0, rounding_slack=0.2)
    # Execute
    plan = plan_distributed_dp(settings)
    # Assert: ε against the coordinator is the target; one site's share alone gives the reported local ε
    args = (plan.unit_l2_bound, plan.unit_l1_bound, settings.sample_rate, settings.steps, settings.delta)
    assert plan.epsilon == pytest.approx(_independent_epsilon(plan.total_variance, *args), rel=1e-9)
    assert plan.local_epsilon == pytest.approx(_independent_epsilon(plan.total_variance / honest, *args), rel=1e-9)
    assert plan.epsilon <= settings.epsilon and plan.epsilon == pytest.approx(settings.epsilon, rel=1e-4)
    assert (plan.local_epsilon > plan.epsilon) == (honest > 1)


def test_subsampled_bound_is_exact_for_the_gaussian() -> None:
    # With the Gaussian's RDP, the expansion is Mironov et al.'s exact value (Opacus), at every order.
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = np.arange(2, 65)
    for sigma, q in ((1.0, 0.05), (2.0, 0.01), (0.8, 0.2), (3.0, 0.25)):
        ours = subsampled_rdp(orders, np.arange(2, 65) / (2 * sigma**2), q)
        exact = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[float(a) for a in orders]))
        np.testing.assert_allclose(ours, exact, rtol=1e-9)


def test_removing_a_unit_never_costs_more_than_adding_it_for_a_symmetric_pair() -> None:
    # Exact Rényi divergences of the subsampled pair in 1 and 2 dimensions (the 2-D pmf is the product of the
    # coordinates'): the remove direction D_α(P‖M) is at most the add direction D_α(M‖P) (the argument in
    # subsampled_rdp's docstring), and the add direction is within subsampled_rdp's bound with [Skellam]'s ε(α).
    import functools

    from scipy.special import logsumexp
    from scipy.stats import skellam

    orders = np.arange(2, 21)
    for variance, shift, q in ((20.0, (3,), 0.2), (200.0, (10,), 0.05), (5.0, (4,), 0.5), (0.5, (1, 1), 0.3),
                               (3.0, (2, 1), 0.5)):
        support = np.arange(-(reach := int(10 * variance**0.5 + max(shift) + 15)), reach + 1)
        one = [skellam.logpmf(support - s, variance / 2, variance / 2) for s in (0, *shift)]
        log_p = functools.reduce(np.add, np.ix_(*[one[0]] * len(shift))).ravel()  # the coordinates' sum
        log_shifted = functools.reduce(np.add, np.ix_(*one[1:])).ravel()
        log_mixture = np.logaddexp(np.log1p(-q) + log_p, np.log(q) + log_shifted)
        vector = np.array(shift, dtype=np.float64)
        bound = subsampled_rdp(orders, skellam_rdp(orders, variance=variance, l2_bound=float(np.linalg.norm(vector)),
                                                   l1_bound=float(np.abs(vector).sum())), q)
        for alpha in (2, 3, 5, 10, 20):
            remove = logsumexp(alpha * log_p + (1 - alpha) * log_mixture) / (alpha - 1)
            add = logsumexp(alpha * log_mixture + (1 - alpha) * log_p) / (alpha - 1)
            assert remove <= add + 1e-12 and add <= bound[alpha - 2] + 1e-9, (variance, shift, q, alpha)


def test_skellam_approaches_the_gaussian_from_above_and_falls_with_the_variance() -> None:
    l2, dimension, q, steps, delta = 40.0, 1024, 0.05, 200, 1e-5
    gaps, epsilons = [], []
    for multiplier in (0.5, 0.8, 1.0, 1.5, 2.0):
        for scale in (1, 10, 100):  # the same noise multiplier at a finer scale: Δ₂ and √μ both × scale
            mu = (multiplier * l2 * scale) ** 2
            skellam = skellam_epsilon(mu, delta=delta, l2_bound=l2 * scale, l1_bound=l1_bound(l2 * scale, dimension),
                                      sample_rate=q, steps=steps)
            gaussian = rdp_to_epsilon(RDP_ORDERS, steps * subsampled_rdp(
                RDP_ORDERS, np.arange(2, 257) / (2 * multiplier**2), q), delta)
            assert skellam >= gaussian
            gaps.append(skellam - gaussian)
        assert gaps[-3] >= gaps[-2] >= gaps[-1] and gaps[-1] < 1e-3 * gaussian
        epsilons.append(skellam)
    assert epsilons == sorted(epsilons, reverse=True)


def test_variance_search_hits_the_target() -> None:
    kwargs = dict(delta=1e-5, l2_bound=50.0, l1_bound=50.0 * 32, sample_rate=0.02, steps=300)
    for target in (1.0, 3.0, 8.0):
        mu = variance_for_epsilon(target, **kwargs)
        assert skellam_epsilon(mu, **kwargs) <= target
        assert skellam_epsilon(mu * (1 - 1e-5), **kwargs) > target


def test_ring_is_the_fewest_bits_that_hold_the_worst_aligned_batch() -> None:
    # Prepare: the batch bound's worth of identical units at the clip (the largest sum), every site's noise
    plan = plan_distributed_dp(SMALL)
    seed = rotation_seed(1, 1)
    units = np.tile(adversarial_units(SMALL.dimension, SMALL.clip)[4], (plan.batch_bound, 1))
    # Execute
    total = encode_units(plan, units, seed) + sum(noise_share(plan) for _ in range(SMALL.sites))
    # Assert: within the bound, the bound within the centred ring, and one bit fewer would not hold it
    assert np.abs(total).max() <= plan.coordinate_bound < 2 ** (plan.ring_bits - 1)
    assert plan.coordinate_bound >= 2 ** (plan.ring_bits - 2)
    np.testing.assert_array_equal(centred(to_ring(total, plan.ring_bits), plan.ring_bits), total)
    assert plan.upload_bytes == (plan.padded_dimension * plan.ring_bits + 7) // 8
    assert plan.upload_vs_fp32 == pytest.approx(plan.ring_bits * 1024 / (32 * 1000), rel=1e-3)


def test_a_ring_wider_than_the_secure_sum_is_refused() -> None:
    with pytest.raises(DistributedDpError, match=f"{MAX_MODULUS_BITS}-bit wire"):
        plan_distributed_dp(DistributedDpSettings(dimension=1000, clip=1.0, sample_rate=0.05, steps=200, epsilon=1.0,
                                                  delta=1e-5, sites=3, min_honest_sites=3, expected_batch=1e9))


def test_fewer_participants_than_the_honest_assumption_are_refused() -> None:
    plan = plan_distributed_dp(DistributedDpSettings(**{**SMALL.__dict__, "sites": 5, "min_honest_sites": 3}))
    with pytest.raises(DistributedDpError, match="fewer than the 3 honest"):
        check_participants(plan, 2)
    check_participants(plan, 3)
    check_participants(plan, 5)
    with pytest.raises(DistributedDpError, match="more than the 5"):
        check_participants(plan, 6)


@pytest.mark.parametrize("field, value, message", [
    ("min_honest_sites", 4, "min_honest_sites must be in"),
    ("min_honest_sites", 0, "min_honest_sites must be in"),
    ("sample_rate", 0.0, "sample_rate"),
    ("expected_batch", 0.0, "expected_batch"),
    ("wrap_probability", 1.0, "wrap_probability"),
])
def test_bad_settings_are_refused_by_name(field: str, value: float, message: str) -> None:
    with pytest.raises(DistributedDpError, match=message):
        DistributedDpSettings(**{**SMALL.__dict__, field: value})


def test_an_evaluation_round_widens_the_ring_so_the_sites_counts_sum_exactly() -> None:
    from common.distributed_round import with_count_slots
    from common.secure_update import MAX_COUNT

    plan = plan_distributed_dp(SMALL)
    assert with_count_slots(plan, sites=3, count_slots=0) is plan
    wide = with_count_slots(plan, sites=3, count_slots=2)
    assert 3 * MAX_COUNT >= 1 << plan.ring_bits  # the plan's own ring would wrap the counts
    assert 3 * MAX_COUNT < 1 << wide.ring_bits <= 1 << MAX_MODULUS_BITS
    assert (wide.padded_dimension, wide.scale, wide.total_variance) == (plan.padded_dimension, plan.scale,
                                                                         plan.total_variance)
    # 3 sites upload their noisy gradient sum, then counts at the extremes, mod 2^b'; the ring adds mod 2^b'
    seed, modulus = rotation_seed(0, 1), np.uint64((1 << wide.ring_bits) - 1)
    units = np.random.default_rng(3).normal(size=(5, SMALL.dimension)) * 0.1
    ring_sum = np.zeros(wide.padded_dimension + 2, dtype=np.uint64)
    for counts in ([MAX_COUNT, 0], [MAX_COUNT, 7], [MAX_COUNT, MAX_COUNT]):
        upload = np.concatenate([site_contribution(wide, units, seed), np.asarray(counts, dtype=np.uint64)])
        ring_sum = (ring_sum + upload) & modulus
    assert [int(c) for c in ring_sum[wide.padded_dimension:]] == [3 * MAX_COUNT, MAX_COUNT + 7]
    # The gradient coordinates decode as in the plan's own ring: the same integers, centred
    gradient = ring_sum[:wide.padded_dimension]
    narrow = gradient & np.uint64((1 << plan.ring_bits) - 1)
    np.testing.assert_array_equal(decode_sum(wide, gradient, seed, participants=3, honest_sites=3).noisy_sum,
                                  decode_sum(plan, narrow, seed, participants=3, honest_sites=3).noisy_sum)
