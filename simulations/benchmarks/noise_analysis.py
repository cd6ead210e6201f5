"""``noise-analysis``: how much noise each way of placing DP noise puts on a federation's mean gradient.

With DP at each site, a site's noise is calibrated to its own n records, so the mean of K sites
carries σ·C/(q·n·√K); pooled DP-SGD over the K·n records carries σ·C/(q·K·n). Shared noise (each
site adds a 1/√K share of discrete Gaussian noise, the secure sum carries all of it) would match
pooled DP-SGD if it could be accounted as tightly. A sum of discrete shares is not Gaussian, so
its Poisson-subsampled Rényi DP needs the general bound of Zhu and Wang (2019, Theorem 6) for
a base mechanism with ε(α) = α/(2σ²), integer α:

    (1/(α−1))·log[(1−q)^(α−1)·(αq − q + 1) + C(α,2)·q²(1−q)^(α−2)·e^{ε(2)}
                  + 3·Σ_{l=3..α} C(α,l)·q^l·(1−q)^(α−l)·e^{(l−1)·ε(l)}]

This script prints σ for each (PRV for the Gaussian, the bound above for shared discrete noise)
and the noise on the mean gradient in units of C/(K·n):

    python -m simulations.benchmarks.noise_analysis --sites 5 --epsilon 8 --epochs 30 --sample-rate 0.25
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from opacus.accountants.analysis.rdp import get_privacy_spent
from scipy.special import gammaln, logsumexp

from client.privacy import noise_multiplier_for

ORDERS = tuple(range(2, 257))


def general_subsampled_rdp(sigma: float, q: float) -> np.ndarray:
    """One step's Rényi DP at each of ORDERS: the general Poisson-subsampling bound above."""
    log_q, log_1q = math.log(q), math.log1p(-q)
    out = []
    for alpha in ORDERS:
        l = np.arange(2, alpha + 1, dtype=np.float64)  # noqa: E741
        terms = (gammaln(alpha + 1) - gammaln(l + 1) - gammaln(alpha - l + 1) + l * log_q + (alpha - l) * log_1q
                 + (l - 1) * l / (2 * sigma * sigma))
        terms[1:] += math.log(3.0)  # l >= 3
        first = (alpha - 1) * log_1q + math.log(alpha * q - q + 1)
        out.append(float(logsumexp(np.concatenate([[first], terms]))) / (alpha - 1))
    return np.array(out)


def general_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    epsilon, _ = get_privacy_spent(orders=list(ORDERS), rdp=steps * general_subsampled_rdp(sigma, q), delta=delta)
    return float(epsilon)


def general_sigma(epsilon: float, q: float, steps: int, delta: float) -> float:
    """The smallest σ (to 0.1%) that the general bound keeps within (ε, δ)."""
    low, high = 0.1, 1.0
    while general_epsilon(high, q, steps, delta) > epsilon:
        low, high = high, 2 * high
    while high / low > 1.001:
        middle = math.sqrt(low * high)
        low, high = (middle, high) if general_epsilon(middle, q, steps, delta) > epsilon else (low, middle)
    return high


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--sample-rate", type=float, default=0.25)
    args = parser.parse_args(argv)
    q, k = args.sample_rate, args.sites
    if not 0 < q < 1 or k < 1 or args.epochs < 1:
        raise SystemExit("--sample-rate must be in (0, 1), --sites and --epochs at least 1")
    steps = math.ceil(args.epochs / q)
    gaussian = noise_multiplier_for("prv", args.epsilon, args.delta, q, steps)
    shared = general_sigma(args.epsilon, q, steps, args.delta)
    print(f"q = {q:g}, {steps} steps, ε = {args.epsilon:g}, δ = {args.delta:g}, K = {k} sites")
    print("| where the noise is added | σ | noise on the mean gradient, C/(K·n) |\n|---|---|---|")
    print(f"| at each site | {gaussian:.2f} | {gaussian * math.sqrt(k) / q:.1f} |")
    print(f"| shared, general subsampling bound | {shared:.2f} | {shared / q:.1f} |")
    print(f"| pooled (or shared with a tight bound) | {gaussian:.2f} | {gaussian / q:.1f} |")


if __name__ == "__main__":
    main()
