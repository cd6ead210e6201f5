"""Distributed DP-SGD under secure aggregation: the Skellam mechanism, shared by the sites, and its accountant.

One DP-SGD step of the pooled data per round. Every site Poisson-samples its own units at the run's public
rate q, and encodes each sampled unit's clipped gradient g (‖g‖₂ ≤ C) on its own:

1. flatten: pad to d' = 2^k coordinates and rotate, x = H·D·g (H the orthonormal Walsh–Hadamard matrix, D
   random signs from the round's PUBLIC seed, the same at every site and at the server, which inverts it).
   The rotation spreads the mass over the coordinates, so every coordinate of the sum is small (sub-Gaussian
   with variance proxy ‖Σg‖²/d'): the ring can be narrow (Kairouz, Liu, Steinke 2021, "The Distributed
   Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation" [DDG], §4; Agarwal, Kairouz,
   Liu 2021, "The Skellam Mechanism for Differentially Private Federated Learning" [Skellam], §4);
2. scale by γ and round each coordinate up or down at random (unbiased), retried until the rounded vector's
   L2 norm is within Δ₂ = min(γC + √d', √(γ²C² + d'/4 + √(2 ln(1/β))·(γC + √d'/2))) ([DDG], arXiv:2102.06387,
   Proposition 22, conditional randomized rounding, with Δ₂ as in its Theorem 1; one try fails with probability
   ≤ β). The accepted vector's norm is
   CHECKED, so one unit's integer contribution has ‖·‖₂ ≤ Δ₂ and ‖·‖₁ ≤ min(Δ₂², √d'·Δ₂) (integer coordinates:
   |v| ≤ v²) whatever the rounding drew.

The site sums its units' integer vectors, adds its share of the noise, Skellam of variance μ/h per coordinate
(Poisson(μ/2h) − Poisson(μ/2h), OS entropy), and uploads the sum mod 2^b through secure aggregation. A sum of
independent Skellams is Skellam, so the h honest sites' noise alone is Skellam of variance exactly μ, whatever
the other sites do (every site of a round adds μ/h for the round's one h, bound into its secure-aggregation round id:
common.distributed_round): the accountant charges the Skellam mechanism of variance μ against the coordinator
([Skellam], Theorem 3.5), and of variance μ/h for a site's own upload alone (what is left if secure aggregation
or the honesty assumption fails); each step amplified by Poisson sampling (:func:`subsampled_rdp`), T steps
composed, RDP converted to (ε, δ) as Opacus' RDP accountant does. The server centres the ring sum, un-rotates it
and divides by γ: the noisy sum of the clipped gradients.

The denominator is the PUBLIC expected batch q·N (N the sum of the sites' public sizes: declared, or the DP
estimate ñ a site spends ε/50 on, client/privacy.py), as Opacus divides a Poisson batch. No site reports its
sampled count, so nothing it sends pins its size, the sensitivity stays Δ₂ (a count coordinate would add to
it), and the division is by a positive constant, never by a noisy count that can be tiny or negative.

The ring's b bits are the fewest with P(any coordinate of the sum leaves [−2^(b−1), 2^(b−1))) ≤ the plan's
target, bounded by a union of three tails (each a third of it): the Poisson batch beyond its bound (Bernstein),
a rotated coordinate of the signal (Hoeffding over D's signs), and the summed noise (Bernstein: a Skellam is a
Lévy sum of ±1 jumps). A wrap-around is a deterministic function of the noisy sum, so it never weakens privacy
(post-processing): it costs accuracy only, with the reported probability.

ε is for adding or removing one unit (Poisson sampling), not for replacing one.

Pure numpy: sites and server compute the same :class:`DistributedDpPlan` from public settings only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import secrets
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.secagg.fixedpoint import MAX_MODULUS_BITS

__all__ = [
    "RDP_ORDERS",
    "DecodedSum",
    "DistributedDpError",
    "DistributedDpPlan",
    "DistributedDpSettings",
    "Ring",
    "SkellamCharge",
    "batch_bound",
    "bernstein_deviation",
    "centred",
    "check_participants",
    "conditional_round",
    "coordinate_bound",
    "decode_sum",
    "encode_units",
    "fwht",
    "l1_bound",
    "mean_gradient",
    "noise_share",
    "plan_distributed_dp",
    "rdp_to_epsilon",
    "rotate",
    "rotation_seed",
    "rounded_l2_bound",
    "site_contribution",
    "site_share",
    "skellam_charges_epsilon",
    "skellam_epsilon",
    "skellam_rdp",
    "subsampled_rdp",
    "sum_norm_bound",
    "to_ring",
    "unrotate",
    "variance_for_epsilon",
    "with_noise_share",
]

RDP_ORDERS = np.arange(2, 257)
"""Integer Rényi orders: the subsampling expansion below holds for integer α ≥ 2."""
DEFAULT_ROUNDING_BETA = math.exp(-0.5)
"""β of the conditional rounding ([DDG], their experiments' default): a try is retried with probability ≤ β."""
HADAMARD_FACTOR_BITS = 7
"""The Walsh–Hadamard transform is applied as a Kronecker product of Hadamard matrices of at most 2^7 rows."""
ROUNDING_TRIES = 200
"""A unit still outside Δ₂ after this many tries (probability ≤ β^200 < 1e-43) contributes zero."""

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Ring = npt.NDArray[np.uint64]


class DistributedDpError(ValueError):
    """A distributed-DP configuration that cannot be run as asked (the message says what to change)."""


@dataclass(frozen=True)
class DistributedDpSettings:
    """The public settings a plan is computed from: every site and the server know them all."""

    dimension: int
    """d: the trainable parameters' count (the flattened update)."""
    clip: float
    """C: each unit's gradient is clipped to this L2 norm."""
    sample_rate: float
    """q: each unit joins a step with this probability (Poisson sampling at its own site)."""
    steps: int
    """T: DP-SGD steps over the run (one per round)."""
    epsilon: float
    delta: float
    sites: int
    """n: the most sites that upload in a round (the ring must hold all their noise)."""
    min_honest_sites: int
    """h: the fewest sites assumed honest in a round; their noise shares alone reach the target ε."""
    expected_batch: float
    """q·N, N the sum of the sites' public sizes: the divisor, and the mean of the Poisson batch."""
    rounding_slack: float = 0.01
    """γ is the smallest scale at which rounding grows the norm bound by at most this share (Δ₂ ≤ (1 + s)·γC)."""
    wrap_probability: float = 1e-9
    """Target bound on the probability that any coordinate of a round's sum wraps around the ring."""
    rounding_beta: float = DEFAULT_ROUNDING_BETA

    def __post_init__(self) -> None:
        checks = [
            (self.dimension >= 1, f"dimension must be ≥ 1, got {self.dimension}"),
            (self.clip > 0 and math.isfinite(self.clip), f"clip must be a positive number, got {self.clip}"),
            (0 < self.sample_rate <= 1, f"sample_rate must be in (0, 1], got {self.sample_rate}"),
            (self.steps >= 1, f"steps must be ≥ 1, got {self.steps}"),
            (self.epsilon > 0, f"epsilon must be > 0, got {self.epsilon}"),
            (0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}"),
            (1 <= self.min_honest_sites <= self.sites,
             f"min_honest_sites must be in [1, sites={self.sites}], got {self.min_honest_sites}"),
            (self.expected_batch > 0, f"expected_batch (q × the public total size) must be > 0, "
                                      f"got {self.expected_batch}"),
            (0 < self.rounding_slack < 1, f"rounding_slack must be in (0, 1), got {self.rounding_slack}"),
            (0 < self.wrap_probability < 1, f"wrap_probability must be in (0, 1), got {self.wrap_probability}"),
            (0 < self.rounding_beta < 1, f"rounding_beta must be in (0, 1), got {self.rounding_beta}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DistributedDpError(message)


@dataclass(frozen=True)
class DistributedDpPlan:
    """What every party derives from :class:`DistributedDpSettings` (:func:`plan_distributed_dp`)."""

    settings: DistributedDpSettings
    padded_dimension: int
    """d' = the smallest power of two ≥ d: the Walsh–Hadamard rotation's size, and the upload's length."""
    scale: float
    """γ: a rotated gradient is multiplied by γ before rounding to integers."""
    unit_l2_bound: float
    """Δ₂: the L2 norm of one unit's integer vector, enforced by the conditional rounding."""
    unit_l1_bound: float
    """Δ₁ = min(Δ₂², √d'·Δ₂): its L1 norm (integer coordinates)."""
    total_variance: float
    """μ: the Skellam variance per coordinate that the h honest sites' noise reaches together."""
    batch_bound: int
    """The Poisson batch exceeds this with probability ≤ wrap_probability/3 (Bernstein)."""
    coordinate_bound: float
    """A coordinate of the ring sum exceeds this in magnitude with probability ≤ wrap_probability."""
    ring_bits: int
    """b: the fewest bits whose centred range [−2^(b−1), 2^(b−1)) holds coordinate_bound."""
    epsilon: float
    """ε against the coordinator: the Skellam mechanism of variance μ (at most n − h sites colluding)."""
    local_epsilon: float
    """ε of one site's upload alone (its own share μ/h): what is left if secure aggregation or the assumption fails."""

    @property
    def site_variance(self) -> float:
        """Each site's noise share per coordinate: μ/h."""
        return self.total_variance / self.settings.min_honest_sites

    @property
    def noise_std(self) -> float:
        """The noise's standard deviation per coordinate of the decoded sum, in gradient units: √μ/γ."""
        return math.sqrt(self.total_variance) / self.scale

    @property
    def noise_multiplier(self) -> float:
        """√μ/Δ₂: the noise over the (rounded) sensitivity, comparable with DP-SGD's σ."""
        return math.sqrt(self.total_variance) / self.unit_l2_bound

    @property
    def upload_bytes(self) -> int:
        """A site's upload: d' coordinates of b bits (as common.secagg.fixedpoint packs them)."""
        return (self.padded_dimension * self.ring_bits + 7) // 8

    @property
    def upload_vs_fp32(self) -> float:
        """The upload's size over the d fp32 values of the update (padding to d' included)."""
        return self.upload_bytes / (4 * self.settings.dimension)


def plan_distributed_dp(settings: DistributedDpSettings) -> DistributedDpPlan:
    """γ, Δ₂, Δ₁, μ, the ring and both ε of ``settings``; DistributedDpError when the ring would exceed the secure
    sum's wire (common.secagg.fixedpoint.MAX_MODULUS_BITS)."""
    s = settings
    padded = 1 << max(0, (s.dimension - 1).bit_length())
    scale = _smallest_scale(s.clip, padded, s.rounding_beta, s.rounding_slack)
    l2 = rounded_l2_bound(scale * s.clip, padded, s.rounding_beta)
    l1 = l1_bound(l2, padded)
    mu = variance_for_epsilon(s.epsilon, delta=s.delta, l2_bound=l2, l1_bound=l1, sample_rate=s.sample_rate,
                              steps=s.steps)
    batch = batch_bound(s.expected_batch, s.wrap_probability / 3)
    # The noise of all n sites (n/h · μ) sits in the ring, not only the honest sites'.
    bound = coordinate_bound(scale=scale, clip=s.clip, batch=batch, padded_dimension=padded,
                             noise_variance=s.sites * mu / s.min_honest_sites, failure=s.wrap_probability)
    bits = (math.floor(bound) + 1).bit_length() + 1  # 2^(b−1) > bound: the centred range holds ±bound
    if bits > MAX_MODULUS_BITS:
        raise DistributedDpError(
            f"the ring sum needs {bits} bits per coordinate (|coordinate| ≤ {bound:.3g} at wrap-around probability "
            f"{s.wrap_probability:g}: expected batch {s.expected_batch:g}, {s.sites} sites' noise), over the secure "
            f"sum's {MAX_MODULUS_BITS}-bit wire: lower the sample rate, the number of sites per round or raise "
            "wrap_probability")
    local = skellam_epsilon(mu / s.min_honest_sites, delta=s.delta, l2_bound=l2, l1_bound=l1,
                            sample_rate=s.sample_rate, steps=s.steps)
    epsilon = skellam_epsilon(mu, delta=s.delta, l2_bound=l2, l1_bound=l1, sample_rate=s.sample_rate, steps=s.steps)
    return DistributedDpPlan(s, padded, scale, l2, l1, mu, batch, bound, bits, epsilon, local)


def site_share(plan: DistributedDpPlan, min_honest_sites: int) -> DistributedDpPlan:
    """The public plan as a site that assumes ``min_honest_sites`` honest sites runs it: its share μ/h and the ε of
    that share alone. The ring stays the public plan's, which must hold the noise of every site's share (a plan for
    h = 1 holds any)."""
    settings = dataclasses.replace(plan.settings, min_honest_sites=min_honest_sites)
    s = settings
    local = skellam_epsilon(plan.total_variance / s.min_honest_sites, delta=s.delta, l2_bound=plan.unit_l2_bound,
                            l1_bound=plan.unit_l1_bound, sample_rate=s.sample_rate, steps=s.steps)
    return dataclasses.replace(plan, settings=settings, local_epsilon=local)


def check_participants(plan: DistributedDpPlan, participants: int) -> None:
    """Refuse a round with fewer uploading sites than the honest sites the plan assumes: their shares could not
    add up to μ."""
    if participants < plan.settings.min_honest_sites:
        raise DistributedDpError(
            f"{participants} site(s) upload in this round, fewer than the {plan.settings.min_honest_sites} honest "
            f"site(s) the noise plan assumes: their noise would not reach the target ε={plan.settings.epsilon:g}. "
            "Wait for more sites, or lower the assumed honest sites (each site's share then grows)")
    if participants > plan.settings.sites:
        raise DistributedDpError(f"{participants} sites upload in this round, more than the {plan.settings.sites} "
                                 "the ring was sized for: plan with more sites")


# --- rounding and the ring ------------------------------------------------------------------------------------


def rounded_l2_bound(norm: float, dimension: int, beta: float) -> float:
    """Δ₂ of a vector of L2 norm ≤ ``norm`` after conditional randomized rounding ([DDG], Proposition 22; Δ₂ as in
    its Theorem 1): a try is accepted when its norm is within min(norm + √d, √(norm² + d/4 + √(2 ln(1/β))·(norm +
    √d/2))), which unbiased rounding meets with probability ≥ 1 − β."""
    squared = norm**2 + dimension / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dimension) / 2)
    return min(norm + math.sqrt(dimension), math.sqrt(squared))


def l1_bound(l2: float, dimension: int) -> float:
    """‖v‖₁ ≤ min(√d·‖v‖₂, ‖v‖₂²) for an integer vector v (|vᵢ| ≤ vᵢ²) ([Skellam], §4)."""
    return l2 * min(math.sqrt(dimension), l2)


def _smallest_scale(clip: float, dimension: int, beta: float, slack: float) -> float:
    """The smallest γ with Δ₂(γC) ≤ (1 + slack)·γC (the ratio falls as γ grows): bisection in log γ."""
    low, high = 1e-9 / clip, 1e12 / clip
    for _ in range(200):
        middle = math.sqrt(low * high)
        if rounded_l2_bound(middle * clip, dimension, beta) <= (1 + slack) * middle * clip:
            high = middle
        else:
            low = middle
    return high


def bernstein_deviation(log_term: float, variance: float, jump: float = 1.0) -> float:
    """t with exp(−t²/(2(variance + jump·t/3))) = exp(−``log_term``): Bernstein's one-sided deviation for a sum of
    independent centred terms (or a Lévy sum) of total ``variance`` and jumps at most ``jump``."""
    return jump * log_term / 3 + math.sqrt(jump**2 * log_term**2 / 9 + 2 * log_term * variance)


def batch_bound(expected_batch: float, failure: float) -> int:
    """B with P(Poisson batch > B) ≤ ``failure``: Bernstein, P(B ≥ m + t) ≤ exp(−t²/(2(m + t/3))) for a sum of
    independent Bernoulli draws of mean m."""
    return math.ceil(expected_batch + bernstein_deviation(math.log(1 / failure), expected_batch))


def coordinate_bound(*, scale: float, clip: float, batch: int, padded_dimension: int, noise_variance: float,
                     failure: float) -> float:
    """A bound on every coordinate of the ring sum that fails with probability ≤ ``failure`` (a third for the batch,
    counted in :func:`batch_bound`, a third each here):

    - signal: the sum of ≤ ``batch`` rounded units is γ·H·D·Σg plus rounding errors below 1 per unit and
      coordinate; with ‖Σg‖ ≤ batch·C, Hoeffding over D's signs gives P(|(HDΣg)ⱼ| ≥ t) ≤ 2exp(−t²d'/(2‖Σg‖²));
    - noise: a Skellam of variance V has the moment generating function exp(V(cosh s − 1)) ≤ that of a Lévy sum
      of jumps bounded by 1, so Bernstein: P(|Z| ≥ t) ≤ 2exp(−t²/(2(V + t/3)));
    - a union bound over the d' coordinates."""
    log_term = math.log(6 * padded_dimension / failure)
    signal = scale * batch * clip * math.sqrt(2 * log_term / padded_dimension) + batch
    return signal + bernstein_deviation(log_term, noise_variance)


# --- the rotation ---------------------------------------------------------------------------------------------


def rotation_seed(run_id: int, server_round: int) -> int:
    """The round's PUBLIC rotation seed, from the run and round ids (not privacy randomness: the server inverts the
    rotation with it)."""
    digest = hashlib.sha256(f"fedtune distributed-dp rotation {run_id} {server_round}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def _signs(seed: int, dimension: int) -> Floats:
    return np.random.default_rng(seed).integers(0, 2, dimension).astype(np.float64) * 2 - 1


@functools.lru_cache(maxsize=8)
def _hadamard(size: int) -> Floats:
    """The (unnormalised) Sylvester–Hadamard matrix of a power-of-two size."""
    matrix = np.ones((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


def fwht(vectors: Floats) -> Floats:
    """The orthonormal Walsh–Hadamard transform of each row (length a power of two); it is its own inverse.

    H_(2^k) = H_(2^k1) ⊗ H_(2^k2) ⊗ …: each factor (≤ 2^7 rows) multiplies the row's last tensor axis, which then
    moves to the front; after every factor the axes are back in their order. O(d·Σ 2^ki) per row, at BLAS speed."""
    rows, length = vectors.shape
    if length & (length - 1):
        raise DistributedDpError(f"the Walsh–Hadamard transform needs a power-of-two length, got {length}")
    bits = length.bit_length() - 1
    factors = [HADAMARD_FACTOR_BITS] * (bits // HADAMARD_FACTOR_BITS) + (
        [bits % HADAMARD_FACTOR_BITS] if bits % HADAMARD_FACTOR_BITS else [])
    out = np.asarray(vectors, dtype=np.float64)
    for factor_bits in factors:
        size = 1 << factor_bits
        out = (out.reshape(-1, size) @ _hadamard(size)).reshape(rows, -1, size).transpose(0, 2, 1).copy()
    return out.reshape(rows, length) / math.sqrt(length)


def rotate(vectors: Floats, seed: int, padded_dimension: int) -> Floats:
    """H·D·x for each row x (zero-padded to d'), D the random signs of ``seed``."""
    padded = np.zeros((vectors.shape[0], padded_dimension))
    padded[:, :vectors.shape[1]] = vectors
    return fwht(padded * _signs(seed, padded_dimension))


def unrotate(vectors: Floats, seed: int, dimension: int) -> Floats:
    """D·H·y for each row y, truncated to the first ``dimension`` coordinates: the inverse of :func:`rotate`."""
    return (fwht(vectors) * _signs(seed, vectors.shape[1]))[:, :dimension]


# --- a site's contribution ------------------------------------------------------------------------------------


def _os_generator() -> np.random.Generator:
    """Rounding and noise draw from fresh OS entropy: no seed anyone else knows."""
    return np.random.default_rng(secrets.randbits(128))


def conditional_round(scaled: Floats, l2_bound: float, generator: np.random.Generator) -> Ints:
    """Each row rounded coordinate-wise up with probability equal to its fractional part (unbiased), retried until
    its L2 norm is ≤ ``l2_bound`` ([DDG], Algorithm 1's conditional randomized rounding). A row still outside
    after ROUNDING_TRIES tries contributes zero: whatever is returned is within the bound."""
    floor = np.floor(scaled)
    fraction = scaled - floor
    rounded = floor + (generator.random(scaled.shape) < fraction)
    accepted = np.einsum("ij,ij->i", rounded, rounded) <= l2_bound**2
    pending = np.flatnonzero(~accepted)
    for _ in range(ROUNDING_TRIES - 1):
        if not pending.size:
            break
        tries = floor[pending] + (generator.random(fraction[pending].shape) < fraction[pending])
        accepted = np.einsum("ij,ij->i", tries, tries) <= l2_bound**2
        rounded[pending[accepted]] = tries[accepted]
        pending = pending[~accepted]
    rounded[pending] = 0.0
    return rounded.astype(np.int64)


def encode_units(plan: DistributedDpPlan, clipped: Floats, seed: int, *, chunk: int = 64) -> Ints:
    """The sum over units of each unit's integer encoding, [d']: rotate, scale by γ, round conditionally. Each row of
    ``clipped`` [units, d] is one unit's clipped gradient; a row over C (float slack) is scaled back to C, a row
    that is not finite contributes zero. ``chunk`` units are rotated at a time (memory: chunk × d' floats)."""
    s = plan.settings
    if clipped.ndim != 2 or clipped.shape[1] != s.dimension:
        raise DistributedDpError(f"expected per-unit gradients of shape [units, {s.dimension}], "
                                 f"got {tuple(clipped.shape)}")
    generator = _os_generator()
    total = np.zeros(plan.padded_dimension, dtype=np.int64)
    for start in range(0, clipped.shape[0], chunk):
        rows = np.asarray(clipped[start:start + chunk], dtype=np.float64)
        finite = np.logical_and.reduce(np.isfinite(rows), axis=1)
        rows = np.where(finite[:, None], rows, 0.0)
        norms = np.linalg.norm(rows, axis=1)
        rows = rows * np.minimum(1.0, s.clip / np.maximum(norms, 1e-300))[:, None]
        scaled = rotate(rows, seed, plan.padded_dimension) * plan.scale
        total += conditional_round(scaled, plan.unit_l2_bound, generator).sum(axis=0)
    return total


def noise_share(plan: DistributedDpPlan) -> Ints:
    """A site's noise share, [d']: Skellam of variance μ/h per coordinate, Poisson(μ/2h) − Poisson(μ/2h), from OS
    entropy ([Skellam], §3: independent Skellams add up to a Skellam)."""
    generator, rate = _os_generator(), plan.site_variance / 2
    return (generator.poisson(rate, plan.padded_dimension).astype(np.int64)
            - generator.poisson(rate, plan.padded_dimension).astype(np.int64))


def with_noise_share(plan: DistributedDpPlan, encoded: Ints) -> Ring:
    """What a site uploads through secure aggregation: (Σ its encoded units + its noise share) mod 2^b, [d'] uint64."""
    return to_ring(encoded + noise_share(plan), plan.ring_bits)


def site_contribution(plan: DistributedDpPlan, clipped: Floats, seed: int) -> Ring:
    """A site's upload from its sampled units' clipped gradients [units, d] (all at once)."""
    return with_noise_share(plan, encode_units(plan, clipped, seed))


def to_ring(values: Ints, bits: int) -> Ring:
    """Integers mod 2^b as uint64 in [0, 2^b)."""
    return (values.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint64)


def centred(ring_sum: Ring, bits: int) -> Ints:
    """A sum mod 2^b read as the integer in [−2^(b−1), 2^(b−1))."""
    values = (ring_sum.astype(np.uint64) & np.uint64((1 << bits) - 1)).astype(np.int64)
    return np.where(values >= 1 << (bits - 1), values - (1 << bits), values)


# --- the server -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedSum:
    """What the server reads from a round's ring sum."""

    noisy_sum: Floats
    """The noisy sum of the sampled units' clipped gradients, [d] float64."""
    clipped: bool
    """The sum's L2 norm was beyond what honest uploads reach (:func:`sum_norm_bound`: a hostile upload) and was
    scaled down to it."""


def sum_norm_bound(plan: DistributedDpPlan, *, participants: int, honest_sites: int) -> float:
    """A bound on the L2 norm of ``participants`` honest uploads' ring sum s + Z (centred integers; the rotation keeps
    norms), each upload with its share μ/``honest_sites`` of the noise, that fails with probability ≤ the plan's
    wrap_probability (the units' tail a third, each of the noise's three a ninth):

    - the units: at most B of them (the Poisson batch's bound, :func:`batch_bound`), each integer vector within Δ₂
      (the conditional rounding), so ‖s‖ ≤ S = B·Δ₂;
    - the noise Z, V = participants·μ/h per coordinate, is independent of s (OS entropy), and a Skellam is a Lévy sum
      of ±1 jumps, so Bernstein bounds ⟨s, Z⟩ (jumps of at most ‖s‖, variance V‖s‖²) by ‖s‖·t, and every |Zⱼ| by
      t' (a union over the d' coordinates, as in :func:`coordinate_bound`); on that event ‖Z‖² is a sum of d'
      independent terms in [0, t'²] of variance ≤ E Zⱼ⁴ = 3V² + V (a Skellam's even cumulants all equal V), so
      Bernstein again: ‖Z‖² ≤ d'V + r;
    - ‖s + Z‖² = ‖s‖² + 2⟨s, Z⟩ + ‖Z‖² ≤ S² + 2S·t + d'V + r.

    Secure aggregation hides uploads, it does not check them: a site that skips the encoder can upload any vector
    mod 2^b. Scaling a sum beyond this bound down to it (:func:`decode_sum`) leaves a hostile site at most twice the
    bound of influence, what the honest sites' own sum can reach, instead of anything the ring holds."""
    failure = plan.settings.wrap_probability / 9
    dimension = plan.padded_dimension
    variance = participants * plan.total_variance / honest_sites
    units = plan.batch_bound * plan.unit_l2_bound
    cross = bernstein_deviation(math.log(1 / failure), variance)  # per unit of ‖s‖
    coordinate = bernstein_deviation(math.log(2 * dimension / failure), variance)
    squares = bernstein_deviation(math.log(1 / failure), dimension * (3 * variance**2 + variance), coordinate**2)
    return math.sqrt(units**2 + 2 * units * cross + dimension * variance + squares)


def decode_sum(plan: DistributedDpPlan, ring_sum: Ring, seed: int, *, participants: int,
               honest_sites: int) -> DecodedSum:
    """The noisy sum of the sampled units' clipped gradients from the sites' ring sum: centre, bound its norm by
    :func:`sum_norm_bound` (scaling a hostile sum down), un-rotate, divide by γ."""
    if ring_sum.shape != (plan.padded_dimension,):
        raise DistributedDpError(f"expected a ring sum of {plan.padded_dimension} coordinates, "
                                 f"got shape {tuple(ring_sum.shape)}")
    integers = centred(ring_sum, plan.ring_bits).astype(np.float64)
    bound = sum_norm_bound(plan, participants=participants, honest_sites=honest_sites)
    norm = float(np.linalg.norm(integers))
    if clipped := norm > bound:
        integers *= bound / norm
    return DecodedSum(unrotate(integers[None, :], seed, plan.settings.dimension)[0] / plan.scale, clipped)


def mean_gradient(plan: DistributedDpPlan, noisy_sum: Floats) -> Floats:
    """The step's gradient: the noisy sum over the PUBLIC expected batch q·N (a positive constant: see the module's
    docstring)."""
    return noisy_sum / plan.settings.expected_batch


# --- the accountant -------------------------------------------------------------------------------------------


def skellam_rdp(orders: npt.NDArray[np.int64], *, variance: float, l2_bound: float, l1_bound: float) -> Floats:
    """RDP of the Skellam mechanism of variance μ per coordinate for integer sensitivities Δ₂, Δ₁ ([Skellam],
    Theorem 3.5): ε(α) = αΔ₂²/(2μ) + min(((2α − 1)Δ₂² + 6Δ₁)/(4μ²), 3Δ₁/(2μ)). The first term is the Gaussian's.
    For integer α > 1 and integer sensitivity vectors; μ is the variance (Poisson(μ/2) − Poisson(μ/2)). The
    d-dimensional bound follows from the 1-D one coordinate by coordinate (independent noise, Σ min ≤ min Σ)."""
    alpha = orders.astype(np.float64)
    return alpha * l2_bound**2 / (2 * variance) + np.minimum(
        ((2 * alpha - 1) * l2_bound**2 + 6 * l1_bound) / (4 * variance**2), 3 * l1_bound / (2 * variance))


def subsampled_rdp(orders: npt.NDArray[np.int64], rdp: Floats, sample_rate: float) -> Floats:
    """RDP at integer orders α of an additive-noise mechanism with RDP ``rdp`` (given at orders 2, 3, … max(orders))
    run on a Poisson sample at rate q, for adding or removing one unit.

    The other units' sampling and rounding (independent of this unit) and this unit's own random rounding make
    both outputs mixtures with the same weights, P = Σwᵢ·Pᵢ and M = Σwᵢ·Mᵢ, each (Pᵢ, Mᵢ) a fixed-shift pair. For
    α > 1, (m, p) ↦ m^α p^(1−α) is jointly convex, so e^((α−1)D_α(M‖P)) ≤ Σwᵢ e^((α−1)D_α(Mᵢ‖Pᵢ)), and likewise
    for D_α(P‖M) (joint quasi-convexity: van Erven & Harremoës 2014). Mixing can only lower either direction, so
    the worst case is one integer shift v with ‖v‖₂ ≤ Δ₂, ‖v‖₁ ≤ Δ₁ (this reduction comes before the symmetry
    argument below: a mixture of shifts is not a symmetric pair), and ε(l) bounds D_l(Q‖P) for every such v,
    as [Skellam]'s bound depends on v only through its two norms. With P the output without the unit, Q with it
    (P shifted by v), L = Q/P and M = (1−q)P + qQ:

    - add (M against P), for integer α, the binomial expansion (as Mironov, Talwar, Zhang 2019, "Rényi Differential
      Privacy of the Sampled Gaussian Mechanism", for the Gaussian), with E_P[L^l] = e^((l−1)D_l(Q‖P)) ≤ e^((l−1)ε(l)):
          E_P[(1 − q + qL)^α] ≤ (1−q)^(α−1)(αq − q + 1) + Σ_{l=2..α} C(α,l)(1−q)^(α−l) q^l e^((l−1)ε(l));
    - remove (P against M) is never larger, because the pair is symmetric: z ↦ s − z (s the shift) maps P to Q and Q
      to P (the Skellam noise is symmetric), so E_P[Ψ(L)] = E_P[L·Ψ(1/L)] for any Ψ. Splitting at L = 1, with
      f(L) = (1−q+qL)^(1−α) (remove) and g(L) = (1−q+qL)^α (add), E_P[f] ≤ E_P[g] holds if for every L > 1
      f(L) + L·f(1/L) ≤ g(L) + L·g(1/L). With φ(x) = x^α − x^(1−α), u = 1 + a, a = q(L−1), c = (1−q)L + q ≥ 1 and
      φ(1/x) = −φ(x)/x, that is φ(1 + a) ≥ c·φ(1 + a/c): true as h(x) = φ(1+x) is convex on x ≥ 0 (φ'' ≥ 0 on
      x ≥ 1) with h(0) = 0, so h(a/c) ≤ h(a)/c.

    The expansion is the expression of Zhu & Wang 2019 ("Poisson Subsampled Rényi Differential Privacy"), Theorem 6,
    stated there as a lower bound: it is an upper bound here because the add direction is an exact identity for
    integer α and the remove direction is dominated, Mironov, Talwar & Zhang's argument for the Gaussian, which
    uses only the symmetry of the pair. (Google's reference accountant for the Skellam mechanism uses Zhu & Wang's
    general upper bound, Theorem 5, whose factor 3 on the l ≥ 3 terms leaves a floor no noise removes.) Reviewed
    independently, with exact 1-, 2- and 4-dimensional divergences of the mixtures (remove ≤ add ≤ this bound in
    every case tried). Never above the mechanism's own ε(α) either. Evaluated in log space. For the Gaussian it
    is Mironov et al.'s exact value (tests/test_distributed_dp.py checks it against Opacus)."""
    top = int(orders.max())
    if rdp.shape != (top - 1,):
        raise DistributedDpError(f"rdp must be given at orders 2..{top}")
    own = rdp[orders - 2]
    if sample_rate >= 1:
        return own
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, top + 1)))])
    alpha = orders.astype(np.float64)
    ell = np.arange(2, top + 1)
    log_binomial = (log_factorial[orders][:, None] - log_factorial[ell][None, :]
                    - log_factorial[np.clip(orders[:, None] - ell[None, :], 0, None)])
    log_q, log_keep = math.log(sample_rate), math.log1p(-sample_rate)
    terms = log_binomial + (alpha[:, None] - ell) * log_keep + ell * log_q + (ell - 1) * rdp[None, :]
    terms = np.where(ell[None, :] <= orders[:, None], terms, -np.inf)
    first = (alpha - 1) * log_keep + np.log(alpha * sample_rate - sample_rate + 1)
    everything = np.concatenate([first[:, None], terms], axis=1)
    peak = everything.max(axis=1)
    add = peak + np.log(np.exp(everything - peak[:, None]).sum(axis=1))
    return np.minimum(add / (alpha - 1), own)


def rdp_to_epsilon(orders: npt.NDArray[np.int64], rdp: Floats, delta: float) -> float:
    """(ε, δ) from RDP, as Opacus' RDP accountant converts (Balle et al. 2020, "Hypothesis Testing Interpretations
    and Rényi Differential Privacy", Theorem 21): ε = min_α rdp(α) + log((α−1)/α) − (log δ + log α)/(α−1)."""
    alpha = orders.astype(np.float64)
    return float(np.min(rdp + np.log((alpha - 1) / alpha) - (math.log(delta) + np.log(alpha)) / (alpha - 1)))


@dataclass(frozen=True)
class SkellamCharge:
    """``steps`` Poisson-subsampled Skellam releases of one setting: a ledger's entry (client/privacy.py)."""

    variance: float
    l2_bound: float
    l1_bound: float
    sample_rate: float
    steps: int


def skellam_charges_epsilon(charges: tuple[SkellamCharge, ...], delta: float,
                            orders: npt.NDArray[np.int64] = RDP_ORDERS) -> float:
    """ε of a sequence of charges: each one's subsampled RDP times its steps, added up (RDP composes by addition),
    converted at δ. 0 without charges."""
    if not charges:
        return 0.0
    every = np.arange(2, int(orders.max()) + 1)
    total = np.zeros(len(orders))
    for c in charges:
        rdp = skellam_rdp(every, variance=c.variance, l2_bound=c.l2_bound, l1_bound=c.l1_bound)
        total += c.steps * subsampled_rdp(orders, rdp, c.sample_rate)
    return rdp_to_epsilon(orders, total, delta)


def skellam_epsilon(variance: float, *, delta: float, l2_bound: float, l1_bound: float, sample_rate: float,
                    steps: int, orders: npt.NDArray[np.int64] = RDP_ORDERS) -> float:
    """ε of ``steps`` Poisson-subsampled Skellam releases of variance μ: subsampled RDP, times T (composition),
    converted at δ."""
    return skellam_charges_epsilon((SkellamCharge(variance, l2_bound, l1_bound, sample_rate, steps),), delta, orders)


def variance_for_epsilon(epsilon: float, *, delta: float, l2_bound: float, l1_bound: float, sample_rate: float,
                         steps: int) -> float:
    """The smallest μ (to a relative 1e-6) whose :func:`skellam_epsilon` is ≤ ``epsilon`` (ε falls as μ grows)."""
    def spent(mu: float) -> float:
        return skellam_epsilon(mu, delta=delta, l2_bound=l2_bound, l1_bound=l1_bound, sample_rate=sample_rate,
                               steps=steps)

    low, high = l2_bound**2 * 1e-4, l2_bound**2
    while spent(high) > epsilon:
        low, high = high, high * 4
        if high > l2_bound**2 * 1e12:
            raise DistributedDpError(f"no Skellam variance reaches ε={epsilon:g} at δ={delta:g} over {steps} steps "
                                     f"at sample rate {sample_rate:g}: raise ε or lower the steps")
    while high / low > 1 + 1e-6:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if spent(middle) <= epsilon else (middle, high)
    return high
